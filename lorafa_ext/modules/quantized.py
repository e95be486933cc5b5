"""Quantized base layers: which ``nn.Linear`` modules hold a quantized weight that only their own
forward can use.

    bitsandbytes   ``bnb.nn.Linear4bit`` (NF4, FP4; ``LinearNF4``, ``LinearFP4``), ``bnb.nn.Linear8bitLt``
    torchao        an ``nn.Linear`` whose weight is a torchao quantized tensor (``quantize_`` with
                   ``Int8WeightOnlyConfig``, ...)

A LoRA-FA layer over such a base runs ``base_layer(x) + lowrank(x, A, B, s, ...)``: the base layer's
own quantized forward, and the adapter branch through ``torch.ops.lorafa.lowrank``. Neither library is
imported here: a module is recognised by the module path of its class (or of its weight's class).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["quantization_of", "is_quantized"]

_BNB_LINEAR = {"Linear4bit": "bitsandbytes 4-bit", "LinearNF4": "bitsandbytes 4-bit",
               "LinearFP4": "bitsandbytes 4-bit", "Linear8bitLt": "bitsandbytes 8-bit"}


def _from_library(cls: type, library: str) -> bool:
    return any(c.__module__.split(".")[0] == library for c in cls.__mro__)


def quantization_of(layer: nn.Module) -> Optional[str]:
    """"bitsandbytes 4-bit", "bitsandbytes 8-bit" or "torchao" for a quantized linear layer, None for
    any other module (a plain ``nn.Linear`` among them)."""
    for cls in type(layer).__mro__:
        if cls.__module__.split(".")[0] == "bitsandbytes" and cls.__name__ in _BNB_LINEAR:
            return _BNB_LINEAR[cls.__name__]
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) and weight is not None and _from_library(type(weight), "torchao"):
        return "torchao"
    return None


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a quantized linear layer that LoRA-FA adapts through ``lowrank``."""
    return quantization_of(layer) is not None
