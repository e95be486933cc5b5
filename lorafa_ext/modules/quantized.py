"""Quantized base layers: which ``nn.Linear`` modules hold a quantized weight that only their own
forward can use.

    bitsandbytes   ``bnb.nn.Linear4bit`` (NF4, FP4; ``LinearNF4``, ``LinearFP4``), ``bnb.nn.Linear8bitLt``
    torchao        an ``nn.Linear`` whose weight is a torchao quantized tensor (``quantize_`` with
                   ``Int8WeightOnlyConfig``, ...)

A LoRA-FA layer over such a base runs ``base_layer(x) + lowrank(x, A, B, s, ...)``: the base layer's
own quantized forward, and the adapter branch through ``torch.ops.lorafa.lowrank``. Neither library is
imported here.
"""
from __future__ import annotations

import sys
from typing import Optional

from torch import nn

__all__ = ["quantization_of", "is_quantized"]


def quantization_of(layer: nn.Module) -> Optional[str]:
    """"bitsandbytes 4-bit", "bitsandbytes 8-bit" or "torchao" for a quantized linear layer, None for
    any other module (a plain ``nn.Linear`` among them). A library that is not imported cannot have
    made the layer, so only imported ones are asked (through ``isinstance``, which torch.compile
    traces)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        if isinstance(layer, bnb.nn.Linear4bit):
            return "bitsandbytes 4-bit"
        if isinstance(layer, bnb.nn.Linear8bitLt):
            return "bitsandbytes 8-bit"
    torchao_utils = sys.modules.get("torchao.utils")
    if (
        torchao_utils is not None
        and isinstance(layer, nn.Linear)
        and isinstance(getattr(layer, "weight", None), torchao_utils.TorchAOBaseTensor)
    ):
        return "torchao"
    return None


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a quantized linear layer that LoRA-FA adapts through ``lowrank``."""
    return quantization_of(layer) is not None
