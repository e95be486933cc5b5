"""The lorafa op library in Python (csrc/ops.cpp): every schema, the composite entry points ``linear``
and ``lowrank``
and the registration of the kernels (python_backend/kernels.py) for every device.

tests/test_backends.py checks that these schemas are the compiled library's.
"""
from __future__ import annotations

import math

import torch

from . import kernels

SCHEMAS = (
    "linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, "
    "float dropout_p=0., bool correction=False, int? seed=None, float eps=1e-06, "
    "Tensor? gram_inv=None) -> Tensor",
    "_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, "
    "float dropout_p, Tensor? seed, bool correction, float eps, Tensor? gram_inv) -> (Tensor, Tensor)",
    "linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
    "float scaling, float dropout_p=0., Tensor? seed=None) -> (Tensor, Tensor)",
    "linear_backward(Tensor grad_y, Tensor z, Tensor weight, Tensor lora_a, Tensor lora_b, "
    "float scaling, float dropout_p, Tensor? seed, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "lowrank(Tensor x, Tensor lora_a, Tensor lora_b, float scaling, float dropout_p=0., "
    "bool correction=False, int? seed=None, float eps=1e-06, Tensor? gram_inv=None) -> Tensor",
    "_lowrank(Tensor x, Tensor lora_a, Tensor lora_b, float scaling, float dropout_p, Tensor? seed, "
    "bool correction, float eps, Tensor? gram_inv) -> (Tensor, Tensor)",
    "lowrank_forward(Tensor x, Tensor lora_a, Tensor lora_b, float scaling, float dropout_p=0., "
    "Tensor? seed=None) -> (Tensor, Tensor)",
    "lowrank_backward(Tensor grad_y, Tensor z, Tensor lora_a, Tensor lora_b, float scaling, "
    "float dropout_p, Tensor? seed, bool[2] output_mask) -> (Tensor, Tensor)",
    "gram_inverse(Tensor lora_a, float eps=1e-06) -> Tensor",
    "correct_grad(Tensor grad_b, Tensor gram_inv, float scaling) -> Tensor",
    "dropout_mask(Tensor seed, int rows, int cols, float p) -> Tensor",
)

_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, correction=False, seed=None, eps=1e-6,
           gram_inv=None):
    """CompositeImplicitAutograd: checks what only autograd can see, applies autocast, draws the
    dropout seed, then calls the autograd-carrying ``_linear``."""
    op = "lorafa.linear"
    torch._check(not weight.requires_grad, lambda: f"{op}: weight must not require grad (LoRA-FA freezes it)")
    torch._check(not lora_a.requires_grad, lambda: f"{op}: lora_a must not require grad (LoRA-FA freezes it)")
    torch._check(
        not correction or (math.isfinite(scaling) and scaling != 0.0),
        lambda: f"{op}: correction needs a finite nonzero scaling, got {scaling:g}",
    )
    x, weight, bias, lora_a, lora_b = _autocast(x, weight, bias, lora_a, lora_b)
    y, _ = torch.ops.lorafa._linear(
        x, weight, bias, lora_a, lora_b, scaling, dropout_p, _seed_tensor(x, dropout_p, seed), correction,
        eps, gram_inv,
    )
    return y


def _seed_tensor(x, dropout_p, seed):
    """The dropout seed of a composite entry point: a device scalar, drawn from torch's generator for
    x's device when ``seed`` is None; None without dropout."""
    if dropout_p == 0.0:
        return None
    if seed is None:
        return torch.randint(1 << 62, (), device=x.device, dtype=torch.int64)
    return torch.full((), seed, device=x.device, dtype=torch.int64)


def _autocast(*tensors):
    """The tensors cast to the autocast dtype of their device when autocast is on (floats only)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.dtype in _AUTOCAST_DTYPES else t for t in tensors)


def lowrank(x, lora_a, lora_b, scaling, dropout_p=0.0, correction=False, seed=None, eps=1e-6, gram_inv=None):
    """CompositeImplicitAutograd: the adapter branch alone, as ``linear`` does it, through the
    autograd-carrying ``_lowrank``."""
    op = "lorafa.lowrank"
    torch._check(not lora_a.requires_grad, lambda: f"{op}: lora_a must not require grad (LoRA-FA freezes it)")
    torch._check(
        not correction or (math.isfinite(scaling) and scaling != 0.0),
        lambda: f"{op}: correction needs a finite nonzero scaling, got {scaling:g}",
    )
    x, lora_a, lora_b = _autocast(x, lora_a, lora_b)
    y, _ = torch.ops.lorafa._lowrank(
        x, lora_a, lora_b, scaling, dropout_p, _seed_tensor(x, dropout_p, seed), correction, eps, gram_inv
    )
    return y


def _linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, correction, eps, gram_inv):
    """The forward of ``_linear``; correction, eps and gram_inv matter only to its autograd."""
    return kernels.linear_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


def _lowrank(x, lora_a, lora_b, scaling, dropout_p, seed, correction, eps, gram_inv):
    """The forward of ``_lowrank``; correction, eps and gram_inv matter only to its autograd."""
    return kernels.lowrank_forward(x, lora_a, lora_b, scaling, dropout_p, seed)


KERNELS = {
    "_linear": _linear,
    "linear_forward": kernels.linear_forward,
    "linear_backward": kernels.linear_backward,
    "_lowrank": _lowrank,
    "lowrank_forward": kernels.lowrank_forward,
    "lowrank_backward": kernels.lowrank_backward,
    "gram_inverse": kernels.gram_inverse,
    "correct_grad": kernels.correct_grad,
    "dropout_mask": kernels.dropout_mask,
}


def register(lib: torch.library.Library) -> None:
    """Define every schema in ``lib``, the composite ``linear`` and the kernels for all devices."""
    for schema in SCHEMAS:
        lib.define(schema)
    lib.impl("linear", linear, "CompositeImplicitAutograd")
    lib.impl("lowrank", lowrank, "CompositeImplicitAutograd")
    for name, fn in KERNELS.items():
        lib.impl(name, fn, "CompositeExplicitAutograd")
