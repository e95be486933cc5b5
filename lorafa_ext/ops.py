"""The ``torch.ops.lorafa`` ops: documented Python wrappers, each with its fake (meta) kernel.

The kernels, the composite ``linear`` and the autograd formula come from the loaded backend: the
compiled library (csrc/) or the pure-PyTorch one (lorafa_ext/python_backend/). The fakes here serve
both; they run the argument checks of lorafa_ext/_checks.py, worded as csrc/checks.cpp words them.
Shapes: x ``(*, in)``, weight ``(out, in)``, bias ``(out)``, lora_a ``(r, in)``, lora_b ``(out, r)``;
N is the number of rows of x once its leading dims are flattened.

This module registers the fakes when it is imported, after a backend has defined the ops (see
lorafa_ext/__init__.py).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _checks


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


# ``linear`` is composite: it decomposes into ``_linear``, the op that carries autograd.
@torch.library.register_fake("lorafa::_linear")
def _linear_fake(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, correction, eps, gram_inv):
    return _linear_forward_fake(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


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


def _forward_outputs(x, out, lora_a):
    """The forward ops' (y, z): y (*, out) in x's dtype, z (N, r) in promote(x, lora_a)."""
    y = x.new_empty((*x.shape[:-1], out))
    z = x.new_empty((math.prod(x.shape[:-1]), lora_a.shape[0]), dtype=torch.promote_types(x.dtype, lora_a.dtype))
    return y, z


def _backward_outputs(grad_y, n_in, lora_b, output_mask):
    """The backward ops' dx (*, in) and d_lora_b, each empty (0,) where output_mask says so."""
    dx = grad_y.new_empty((*grad_y.shape[:-1], n_in)) if output_mask[0] else grad_y.new_empty(0)
    d_b = lora_b.new_empty(lora_b.shape) if output_mask[1] else lora_b.new_empty(0)
    return dx, d_b


@torch.library.register_fake("lorafa::linear_forward")
def _linear_forward_fake(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=None):
    _checks.check_forward("lorafa.linear_forward", x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    return _forward_outputs(x, weight.shape[0], lora_a)


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


@torch.library.register_fake("lorafa::linear_backward")
def _linear_backward_fake(grad_y, z, weight, lora_a, lora_b, scaling, dropout_p, seed, output_mask):
    _checks.check_backward("lorafa.linear_backward", grad_y, z, weight, lora_a, lora_b, scaling, dropout_p, seed)
    dx, d_b = _backward_outputs(grad_y, weight.shape[1], lora_b, output_mask)
    d_bias = grad_y.new_empty(weight.shape[0]) if output_mask[2] else grad_y.new_empty(0)
    return dx, d_b, d_bias


def lowrank(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    correction: bool = False,
    seed: Optional[int] = None,
    eps: float = 1e-6,
    gram_inv: Optional[Tensor] = None,
) -> Tensor:
    """The LoRA-FA adapter branch alone: ``scaling * (drop(x) A^T) B^T``, ``(*, out)`` in x's dtype.

    For a base layer that runs its own forward (a quantized one: ``y = base(x) + lowrank(x, ...)``).
    Differentiable in x and lora_b; lora_a is frozen (requiring grad is an error). Only
    z = drop(x) A^T (N x r) is saved for backward, never a dropout mask. The arguments are those of
    :func:`linear`.
    """
    return torch.ops.lorafa.lowrank(x, lora_a, lora_b, scaling, dropout_p, correction, seed, eps, gram_inv)


# ``lowrank`` is composite: it decomposes into ``_lowrank``, the op that carries autograd.
@torch.library.register_fake("lorafa::_lowrank")
def _lowrank_fake(x, lora_a, lora_b, scaling, dropout_p, seed, correction, eps, gram_inv):
    return _lowrank_forward_fake(x, lora_a, lora_b, scaling, dropout_p, seed)


def lowrank_forward(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Forward of :func:`lowrank`, not differentiable. Returns ``(y, z)``: y = s z B^T ``(*, out)`` in
    x's dtype and z = drop(x) A^T ``(N, r)`` in ``torch.promote_types(x.dtype, lora_a.dtype)``.
    ``seed`` is a one-element int64 tensor on x's device, required when dropout_p > 0."""
    return torch.ops.lorafa.lowrank_forward(x, lora_a, lora_b, scaling, dropout_p, seed)


@torch.library.register_fake("lorafa::lowrank_forward")
def _lowrank_forward_fake(x, lora_a, lora_b, scaling, dropout_p=0.0, seed=None):
    _checks.check_forward("lorafa.lowrank_forward", x, None, None, lora_a, lora_b, scaling, dropout_p, seed)
    return _forward_outputs(x, lora_b.shape[0], lora_a)


def lowrank_backward(
    grad_y: Tensor,
    z: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    output_mask: Sequence[bool] = (True, True),
) -> Tuple[Tensor, Tensor]:
    """Backward of :func:`lowrank`. Returns ``(dx, dB)``: dx = s drop'(dy B A) ``(*, in)`` and the
    exact dB = s dy^T z ``(out, r)`` in lora_b's dtype. An output whose ``output_mask`` entry is False
    comes back as an empty tensor of shape (0,)."""
    return torch.ops.lorafa.lowrank_backward(grad_y, z, lora_a, lora_b, scaling, dropout_p, seed, list(output_mask))


@torch.library.register_fake("lorafa::lowrank_backward")
def _lowrank_backward_fake(grad_y, z, lora_a, lora_b, scaling, dropout_p, seed, output_mask):
    _checks.check_backward("lorafa.lowrank_backward", grad_y, z, None, lora_a, lora_b, scaling, dropout_p, seed)
    return _backward_outputs(grad_y, lora_a.shape[1], lora_b, output_mask)


def gram_inverse(lora_a: Tensor, eps: float = 1e-6) -> Tensor:
    """``(A A^T + delta I)^-1`` with ``delta = eps * trace(A A^T) / r``, ``(r, r)`` in float32
    (float64 for a float64 lora_a). Needs no host synchronisation."""
    return torch.ops.lorafa.gram_inverse(lora_a, eps)


@torch.library.register_fake("lorafa::gram_inverse")
def _gram_inverse_fake(lora_a, eps=1e-6):
    _checks.check_gram_inverse("lorafa.gram_inverse", lora_a, eps)
    r = lora_a.shape[0]
    return lora_a.new_empty((r, r), dtype=_checks.gram_dtype(lora_a.dtype))


def correct_grad(grad_b: Tensor, gram_inv: Tensor, scaling: float) -> Tensor:
    """The LoRA-FA gradient correction ``(1/s^2) grad_b @ gram_inv``, in grad_b's dtype."""
    return torch.ops.lorafa.correct_grad(grad_b, gram_inv, scaling)


@torch.library.register_fake("lorafa::correct_grad")
def _correct_grad_fake(grad_b, gram_inv, scaling):
    _checks.check_correct_grad("lorafa.correct_grad", grad_b, gram_inv, scaling)
    return grad_b.new_empty(grad_b.shape)


def dropout_mask(seed: Tensor, rows: int, cols: int, p: float) -> Tensor:
    """The keep-mask (bool, True = kept) that the ops apply to a flattened ``(rows, cols)`` x for
    ``seed``, on seed's device."""
    return torch.ops.lorafa.dropout_mask(seed, rows, cols, p)


@torch.library.register_fake("lorafa::dropout_mask")
def _dropout_mask_fake(seed, rows, cols, p):
    _checks.check_mask("lorafa.dropout_mask", seed, rows, cols, p)
    return seed.new_empty((rows, cols), dtype=torch.bool)
