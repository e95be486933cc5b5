"""Argument checks of the lorafa ops, shared by the fake kernels (lorafa_ext/ops.py) and the Python
backend's kernels (lorafa_ext/python_backend/kernels.py).

csrc/checks.cpp performs the same checks in the same order with the same messages: dtypes as Python
names them (torch.float32), shapes as tuples, floats as C's %g (tests/test_check_messages.py compares
the two on every bad input of tests/test_errors.py). ``torch._check`` keeps them traceable with
symbolic shapes.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t):
    return tuple(t.shape)


def check_scalars(op, scaling, dropout_p):
    torch._check(math.isfinite(scaling), lambda: f"{op}: scaling must be finite, got {scaling:g}")
    torch._check(
        0.0 <= dropout_p < 1.0, lambda: f"{op}: dropout_p must be in [0, 1), got {dropout_p:g}"
    )


def check_seed(op, seed, dropout_p, device):
    if dropout_p == 0.0:
        return
    torch._check(seed is not None, lambda: f"{op}: seed is required when dropout_p > 0")
    torch._check(
        seed.dtype == torch.int64 and seed.numel() == 1,
        lambda: f"{op}: seed must be a one-element int64 tensor, got {seed.dtype} of shape {_shape(seed)}",
    )
    torch._check(
        seed.device == device,
        lambda: f"{op}: seed must be on the inputs' device {device}, got {seed.device}",
    )


def check_params(op, x_name, x, weight, lora_a, lora_b, bias=None):
    """Check x-like tensor (last dim `in` for x, `out` for grad_y) against the parameters. ``weight`` is
    None for the low-rank ops, whose only parameters are the adapters: then out and in are lora_b's
    rows and lora_a's columns, and only r is matched between them."""
    torch._check(x.dim() >= 1, lambda: f"{op}: {x_name} must have at least 1 dimension, got a 0-d tensor")
    torch._check(
        x.dtype in FLOAT_DTYPES, lambda: f"{op}: {x_name} must be a floating-point tensor, got {x.dtype}"
    )
    if weight is not None:
        torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D (out, in), got shape {_shape(weight)}")
    torch._check(lora_a.dim() == 2, lambda: f"{op}: lora_a must be 2-D (r, in), got shape {_shape(lora_a)}")
    torch._check(lora_b.dim() == 2, lambda: f"{op}: lora_b must be 2-D (out, r), got shape {_shape(lora_b)}")
    r = lora_a.shape[0]
    torch._check(r >= 1, lambda: f"{op}: lora_a must have at least one row (rank r >= 1), got r = {r}")
    out = weight.shape[0] if weight is not None else lora_b.shape[0]
    if weight is not None:
        n_in = weight.shape[1]
        torch._check(
            lora_a.shape[1] == n_in,
            lambda: f"{op}: lora_a must have shape (r, in) with in = {n_in}, got {_shape(lora_a)}",
        )
        torch._check(
            lora_b.shape[0] == out and lora_b.shape[1] == r,
            lambda: f"{op}: lora_b must have shape (out, r) = ({out}, {r}), got {_shape(lora_b)}",
        )
        torch._check(
            weight.dtype == x.dtype,
            lambda: f"{op}: weight must have {x_name}'s dtype {x.dtype}, got {weight.dtype}",
        )
    else:
        torch._check(
            lora_b.shape[1] == r, lambda: f"{op}: lora_b must have shape (out, r) with r = {r}, got {_shape(lora_b)}"
        )
    torch._check(
        lora_a.dtype == lora_b.dtype,
        lambda: f"{op}: lora_a and lora_b must share a dtype, got {lora_a.dtype} and {lora_b.dtype}",
    )
    torch._check(
        lora_a.dtype in (x.dtype, torch.float32),
        lambda: f"{op}: lora_a/lora_b must have {x_name}'s dtype {x.dtype} or float32, got {lora_a.dtype}",
    )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == out,
            lambda: f"{op}: bias must have shape (out,) = ({out},), got {_shape(bias)}",
        )
        torch._check(
            bias.dtype == x.dtype, lambda: f"{op}: bias must have {x_name}'s dtype {x.dtype}, got {bias.dtype}"
        )
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None:
            torch._check(
                t.device == x.device,
                lambda: f"{op}: {name} must be on {x_name}'s device {x.device}, got {t.device}",
            )


def check_z(op, grad_y, z, lora_a):
    """Check z against grad_y and lora_a (the backward ops)."""
    rows = math.prod(grad_y.shape[:-1])
    torch._check(
        z.dim() == 2 and z.shape[0] == rows and z.shape[1] == lora_a.shape[0],
        lambda: f"{op}: z must have shape (N, r) = ({rows}, {lora_a.shape[0]}), got {_shape(z)}",
    )
    torch._check(
        z.dtype == torch.promote_types(grad_y.dtype, lora_a.dtype),
        lambda: f"{op}: z must have dtype {torch.promote_types(grad_y.dtype, lora_a.dtype)}, got {z.dtype}",
    )
    torch._check(
        z.device == grad_y.device, lambda: f"{op}: z must be on grad_y's device {grad_y.device}, got {z.device}"
    )


def check_forward(op, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    """The forward ops' arguments; weight (and bias) None for lowrank_forward."""
    check_params(op, "x", x, weight, lora_a, lora_b, bias)
    n_in, src = (weight.shape[1], "weight.shape[1]") if weight is not None else (lora_a.shape[1], "lora_a.shape[1]")
    torch._check(
        x.shape[-1] == n_in,
        lambda: f"{op}: x must have shape (*, in) with in = {src} = {n_in}, got {_shape(x)}",
    )
    check_scalars(op, scaling, dropout_p)
    check_seed(op, seed, dropout_p, x.device)


def check_backward(op, grad_y, z, weight, lora_a, lora_b, scaling, dropout_p, seed):
    """The backward ops' arguments; weight None for lowrank_backward."""
    check_params(op, "grad_y", grad_y, weight, lora_a, lora_b)
    out, src = (weight.shape[0], "weight.shape[0]") if weight is not None else (lora_b.shape[0], "lora_b.shape[0]")
    torch._check(
        grad_y.shape[-1] == out,
        lambda: f"{op}: grad_y must have shape (*, out) with out = {src} = {out}, got {_shape(grad_y)}",
    )
    check_z(op, grad_y, z, lora_a)
    check_scalars(op, scaling, dropout_p)
    check_seed(op, seed, dropout_p, grad_y.device)


def gram_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def check_gram_inverse(op, lora_a, eps):
    torch._check(lora_a.dim() == 2, lambda: f"{op}: lora_a must be 2-D (r, in), got shape {_shape(lora_a)}")
    torch._check(
        lora_a.shape[0] >= 1, lambda: f"{op}: lora_a must have at least one row (rank r >= 1), got r = 0"
    )
    torch._check(
        lora_a.dtype in FLOAT_DTYPES, lambda: f"{op}: lora_a must be floating-point, got {lora_a.dtype}"
    )
    torch._check(math.isfinite(eps) and eps >= 0.0, lambda: f"{op}: eps must be finite and >= 0, got {eps:g}")


def check_correct_grad(op, grad_b, gram_inv, scaling):
    torch._check(grad_b.dim() == 2, lambda: f"{op}: grad_b must be 2-D (out, r), got shape {_shape(grad_b)}")
    torch._check(
        grad_b.dtype in FLOAT_DTYPES, lambda: f"{op}: grad_b must be floating-point, got {grad_b.dtype}"
    )
    r = grad_b.shape[1]
    torch._check(
        gram_inv.dim() == 2 and gram_inv.shape[0] == r and gram_inv.shape[1] == r,
        lambda: f"{op}: gram_inv must have shape (r, r) = ({r}, {r}), got {_shape(gram_inv)}",
    )
    torch._check(
        gram_inv.dtype in (torch.float32, torch.float64),
        lambda: f"{op}: gram_inv must be float32 or float64, got {gram_inv.dtype}",
    )
    torch._check(
        gram_inv.device == grad_b.device,
        lambda: f"{op}: gram_inv must be on grad_b's device {grad_b.device}, got {gram_inv.device}",
    )
    torch._check(
        math.isfinite(scaling) and scaling != 0.0,
        lambda: f"{op}: scaling must be finite and nonzero, got {scaling:g}",
    )


def check_mask(op, seed, rows, cols, p):
    torch._check(rows >= 0 and cols >= 0, lambda: f"{op}: rows and cols must be >= 0, got ({rows}, {cols})")
    torch._check(0.0 <= p < 1.0, lambda: f"{op}: p must be in [0, 1), got {p:g}")
    torch._check(
        seed.dtype == torch.int64 and seed.numel() == 1,
        lambda: f"{op}: seed must be a one-element int64 tensor, got {seed.dtype} of shape {_shape(seed)}",
    )
