"""The ``torch.ops.lorafa`` ops: documented Python wrappers, fake kernels and autograd.

The kernels come from the compiled library (csrc/) or from the pure-PyTorch fallback
(``_fallback.py``); the fake kernels below serve every backend, the autograd formula the fallback
(the compiled library registers the same formula in C++, csrc/autograd.cpp). Shapes: x ``(*, in)``, weight ``(out, in)``, bias ``(out)``, lora_a ``(r, in)``,
lora_b ``(out, r)``; N is the number of rows of x once its leading dims are flattened.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _checks

_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    correction: bool = False,
    seed: Optional[int] = None,
    eps: float = 1e-6,
    gram_inv: Optional[Tensor] = None,
) -> Tensor:
    """LoRA-FA linear layer: ``y = x W^T + bias + scaling * (drop(x) A^T) B^T``.

    Differentiable in x, lora_b and bias; weight and lora_a are frozen (requiring grad is an error).
    Only z = drop(x) A^T (N x r) is saved for backward; the dropout mask is regenerated from its seed.

    Args:
        dropout_p: dropout probability on the adapter's input, in [0, 1).
        correction: deliver the corrected gradient (1/s^2) dB (A A^T + delta I)^-1 to lora_b, so that a
            plain optimizer trains LoRA-FA as the paper does (see :func:`gram_inverse`).
        seed: dropout seed; None draws one from torch's generator for x's device.
        eps: relative regulariser of the Gram matrix, delta = eps * trace(A A^T) / r.
        gram_inv: a precomputed :func:`gram_inverse` of lora_a (saves recomputing it every step).
    """
    return torch.ops.lorafa.linear(
        x, weight, bias, lora_a, lora_b, scaling, dropout_p, correction, seed, eps, gram_inv
    )


def linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Forward pass, not differentiable. Returns ``(y, z)``: y ``(*, out)`` in x's dtype and
    z = drop(x) A^T ``(N, r)`` in ``torch.promote_types(x.dtype, lora_a.dtype)``.
    ``seed`` is a one-element int64 tensor on x's device, required when dropout_p > 0."""
    return torch.ops.lorafa.linear_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


def linear_backward(
    grad_y: Tensor,
    z: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    output_mask: Sequence[bool] = (True, True, True),
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward pass. Returns ``(dx, dB, dbias)``: dx ``(*, in)``, the exact dB = s dy^T z ``(out, r)``
    in lora_b's dtype and dbias ``(out)``. An output whose ``output_mask`` entry is False comes back
    as an empty tensor of shape (0,)."""
    return torch.ops.lorafa.linear_backward(
        grad_y, z, weight, lora_a, lora_b, scaling, dropout_p, seed, list(output_mask)
    )


def gram_inverse(lora_a: Tensor, eps: float = 1e-6) -> Tensor:
    """``(A A^T + delta I)^-1`` with ``delta = eps * trace(A A^T) / r``, ``(r, r)`` in float32
    (float64 for a float64 lora_a). Needs no host synchronisation."""
    return torch.ops.lorafa.gram_inverse(lora_a, eps)


def correct_grad(grad_b: Tensor, gram_inv: Tensor, scaling: float) -> Tensor:
    """The LoRA-FA gradient correction ``(1/s^2) grad_b @ gram_inv``, in grad_b's dtype."""
    return torch.ops.lorafa.correct_grad(grad_b, gram_inv, scaling)


def dropout_mask(seed: Tensor, rows: int, cols: int, p: float) -> Tensor:
    """The keep-mask (bool, True = kept) that the ops apply to a flattened ``(rows, cols)`` x for
    ``seed``, on seed's device."""
    return torch.ops.lorafa.dropout_mask(seed, rows, cols, p)


# --- composite entry point (the Python fallback's; the compiled library has its own in C++) ---------


def composite_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, correction=False,
                     seed=None, eps=1e-6, gram_inv=None):
    op = "lorafa.linear"
    torch._check(not weight.requires_grad, lambda: f"{op}: weight must not require grad (LoRA-FA freezes it)")
    torch._check(not lora_a.requires_grad, lambda: f"{op}: lora_a must not require grad (LoRA-FA freezes it)")
    torch._check(
        not correction or (math.isfinite(scaling) and scaling != 0.0),
        lambda: f"{op}: correction needs a finite nonzero scaling, got {scaling}",
    )
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)

        def cast(t):
            return t.to(dtype) if t is not None and t.dtype in _AUTOCAST_DTYPES else t

        x, weight, bias, lora_a, lora_b = map(cast, (x, weight, bias, lora_a, lora_b))
    seed_t = None
    if dropout_p > 0.0:
        if seed is None:
            seed_t = torch.randint(1 << 62, (), device=x.device, dtype=torch.int64)
        else:
            seed_t = torch.full((), seed, device=x.device, dtype=torch.int64)
    y, _ = torch.ops.lorafa._linear(
        x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed_t, correction, eps, gram_inv
    )
    return y


# --- fake kernels -----------------------------------------------------------------------------------


def _forward_fake(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=None):
    _checks.check_forward("lorafa.linear_forward", x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    rows = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    z = x.new_empty((rows, lora_a.shape[0]), dtype=torch.promote_types(x.dtype, lora_a.dtype))
    return y, z


def _linear_fake(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, correction, eps, gram_inv):
    return _forward_fake(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


def _backward_fake(grad_y, z, weight, lora_a, lora_b, scaling, dropout_p, seed, output_mask):
    _checks.check_backward("lorafa.linear_backward", grad_y, z, weight, lora_a, lora_b, scaling, dropout_p, seed)
    dx = grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1])) if output_mask[0] else grad_y.new_empty(0)
    d_b = lora_b.new_empty(lora_b.shape) if output_mask[1] else lora_b.new_empty(0)
    d_bias = grad_y.new_empty(weight.shape[0]) if output_mask[2] else grad_y.new_empty(0)
    return dx, d_b, d_bias


def _gram_inverse_fake(lora_a, eps=1e-6):
    _checks.check_gram_inverse("lorafa.gram_inverse", lora_a, eps)
    r = lora_a.shape[0]
    return lora_a.new_empty((r, r), dtype=_checks.gram_dtype(lora_a.dtype))


def _correct_grad_fake(grad_b, gram_inv, scaling):
    _checks.check_correct_grad("lorafa.correct_grad", grad_b, gram_inv, scaling)
    return grad_b.new_empty(grad_b.shape)


def _dropout_mask_fake(seed, rows, cols, p):
    _checks.check_mask("lorafa.dropout_mask", seed, rows, cols, p)
    return seed.new_empty((rows, cols), dtype=torch.bool)


# --- autograd of _linear ---------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, correction, eps, gram_inv = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(z, weight, lora_a, lora_b, seed, gram_inv)
    ctx.scaling, ctx.dropout_p, ctx.correction, ctx.eps = scaling, dropout_p, correction, eps


def _backward(ctx, grad_y, grad_z):
    z, weight, lora_a, lora_b, seed, gram_inv = ctx.saved_tensors
    need_x, need_bias, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[4]
    dx, d_b, d_bias = torch.ops.lorafa.linear_backward(
        grad_y, z, weight, lora_a, lora_b, ctx.scaling, ctx.dropout_p, seed, [need_x, need_b, need_bias]
    )
    if need_b and ctx.correction:
        if gram_inv is None:
            gram_inv = torch.ops.lorafa.gram_inverse(lora_a, ctx.eps)
        d_b = torch.ops.lorafa.correct_grad(d_b, gram_inv, ctx.scaling)
    return (
        dx if need_x else None, None, d_bias if need_bias else None, None, d_b if need_b else None,
        None, None, None, None, None, None,
    )


def register_common(python_autograd: bool) -> None:
    """Register the fake kernels (for every backend) and, for the Python fallback, the autograd
    formula. The compiled library registers the same formula in C++ (csrc/autograd.cpp), which keeps
    the host cost of a differentiable call at a few microseconds instead of ~80."""
    for name, fake in (
        ("lorafa::_linear", _linear_fake),
        ("lorafa::linear_forward", _forward_fake),
        ("lorafa::linear_backward", _backward_fake),
        ("lorafa::gram_inverse", _gram_inverse_fake),
        ("lorafa::correct_grad", _correct_grad_fake),
        ("lorafa::dropout_mask", _dropout_mask_fake),
    ):
        torch.library.register_fake(name)(fake)
    if python_autograd:
        torch.library.register_autograd("lorafa::_linear", _backward, setup_context=_setup_context)
