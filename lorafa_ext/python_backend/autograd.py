"""Autograd of ``_linear`` and ``_lowrank`` for the Python backend (csrc/autograd.cpp registers the same formula for
the compiled library). Only z = drop(x) A^T (N x r) is saved from the activations; the dropout mask is
regenerated from the seed.
"""
from __future__ import annotations

import torch


def setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, correction, eps, gram_inv = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(z, weight, lora_a, lora_b, seed, gram_inv)
    ctx.scaling, ctx.dropout_p, ctx.correction, ctx.eps = scaling, dropout_p, correction, eps


def backward(ctx, grad_y, grad_z):
    z, weight, lora_a, lora_b, seed, gram_inv = ctx.saved_tensors
    need_x, need_bias, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[4]
    dx, d_b, d_bias = torch.ops.lorafa.linear_backward(
        grad_y, z, weight, lora_a, lora_b, ctx.scaling, ctx.dropout_p, seed, [need_x, need_b, need_bias]
    )
    if need_b and ctx.correction:
        d_b = _corrected(d_b, gram_inv, lora_a, ctx.scaling, ctx.eps)
    return (
        dx if need_x else None, None, d_bias if need_bias else None, None, d_b if need_b else None,
        None, None, None, None, None, None,
    )


def _corrected(d_b, gram_inv, lora_a, scaling, eps):
    """The corrected B-gradient (1/s^2) dB (A A^T + delta I)^-1, with the saved gram_inv when given."""
    if gram_inv is None:
        gram_inv = torch.ops.lorafa.gram_inverse(lora_a, eps)
    return torch.ops.lorafa.correct_grad(d_b, gram_inv, scaling)


def setup_context_lowrank(ctx, inputs, output):
    x, lora_a, lora_b, scaling, dropout_p, seed, correction, eps, gram_inv = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(z, lora_a, lora_b, seed, gram_inv)
    ctx.scaling, ctx.dropout_p, ctx.correction, ctx.eps = scaling, dropout_p, correction, eps


def backward_lowrank(ctx, grad_y, grad_z):
    z, lora_a, lora_b, seed, gram_inv = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dx, d_b = torch.ops.lorafa.lowrank_backward(
        grad_y, z, lora_a, lora_b, ctx.scaling, ctx.dropout_p, seed, [need_x, need_b]
    )
    if need_b and ctx.correction:
        d_b = _corrected(d_b, gram_inv, lora_a, ctx.scaling, ctx.eps)
    return dx if need_x else None, None, d_b if need_b else None, None, None, None, None, None, None


def register(lib: torch.library.Library) -> None:
    torch.library.register_autograd("lorafa::_linear", backward, setup_context=setup_context, lib=lib)
    torch.library.register_autograd(
        "lorafa::_lowrank", backward_lowrank, setup_context=setup_context_lowrank, lib=lib
    )
