"""The kernels of the lorafa ops in plain PyTorch, one implementation for every device (the compiled
library's are csrc/cpu/lorafa_cpu.cpp and csrc/cuda/: lorafa_cuda.cu over kernels/*.cuh). They compute the same math with
the same dropout mask; python_backend/ops.py registers them.

The low-rank products run in z's dtype, promote(x.dtype, lora_a.dtype): with fp32 adapters and bf16,
fp16 or fp64 x, the adapters or x are cast to it first.
"""
from __future__ import annotations

import math

import torch

from .. import _checks
from .philox import keep_mask


def _no_autocast(device):
    return torch.autocast(device.type, enabled=False)


def _dropped(t, seed, p):
    """drop(t) for a 2-D t: the kept elements scaled by 1 / (1 - p)."""
    if p == 0.0:
        return t
    keep = keep_mask(seed, t.shape[0], t.shape[1], p)
    return t * keep.to(t.dtype) * (1.0 / (1.0 - p))


def linear_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=None):
    _checks.check_forward("lorafa.linear_forward", x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    out, n_in = weight.shape
    zdt = torch.promote_types(x.dtype, lora_a.dtype)
    # y is allocated in its final shape and filled through a 2-D view, so the op returns no view.
    y = x.new_empty((*x.shape[:-1], out))
    with _no_autocast(x.device):
        rows = math.prod(x.shape[:-1])
        x2 = x.reshape(rows, n_in)
        y2 = y.view(rows, out)
        if bias is None:
            torch.mm(x2, weight.t(), out=y2)
        else:
            torch.addmm(bias, x2, weight.t(), out=y2)
        z = _dropped(x2.to(zdt), seed, dropout_p) @ lora_a.to(zdt).t()
        lowrank_b = lora_b.to(zdt).t()
        if zdt == x.dtype:
            y2.addmm_(z, lowrank_b, alpha=scaling)
        else:
            y2.copy_(y2.to(zdt).addmm_(z, lowrank_b, alpha=scaling))
    return y, z


def linear_backward(grad_y, z, weight, lora_a, lora_b, scaling, dropout_p, seed, output_mask):
    _checks.check_backward("lorafa.linear_backward", grad_y, z, weight, lora_a, lora_b, scaling, dropout_p, seed)
    out, n_in = weight.shape
    dx, d_b, d_bias = grad_y.new_empty(0), lora_b.new_empty(0), grad_y.new_empty(0)
    with _no_autocast(grad_y.device):
        rows = math.prod(grad_y.shape[:-1])
        dy = grad_y.reshape(rows, out)
        dyz = dy.to(z.dtype)
        if output_mask[0]:
            t = dyz @ lora_b.to(z.dtype)
            lowrank = _dropped(t @ lora_a.to(z.dtype), seed, dropout_p)
            dx = grad_y.new_empty((*grad_y.shape[:-1], n_in))  # not a view of a temporary
            dx.view(rows, n_in).copy_((dy @ weight).to(z.dtype).add_(lowrank, alpha=scaling))
        if output_mask[1]:
            d_b = (dyz.t() @ z).mul_(scaling).to(lora_b.dtype)
        if output_mask[2]:
            d_bias = dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(grad_y.dtype)
    return dx, d_b, d_bias


def lowrank_forward(x, lora_a, lora_b, scaling, dropout_p=0.0, seed=None):
    _checks.check_forward("lorafa.lowrank_forward", x, None, None, lora_a, lora_b, scaling, dropout_p, seed)
    out, n_in = lora_b.shape[0], lora_a.shape[1]
    zdt = torch.promote_types(x.dtype, lora_a.dtype)
    y = x.new_empty((*x.shape[:-1], out))
    with _no_autocast(x.device):
        rows = math.prod(x.shape[:-1])
        z = _dropped(x.reshape(rows, n_in).to(zdt), seed, dropout_p) @ lora_a.to(zdt).t()
        y.view(rows, out).copy_((z @ lora_b.to(zdt).t()).mul_(scaling))
    return y, z


def lowrank_backward(grad_y, z, lora_a, lora_b, scaling, dropout_p, seed, output_mask):
    _checks.check_backward("lorafa.lowrank_backward", grad_y, z, None, lora_a, lora_b, scaling, dropout_p, seed)
    out, n_in = lora_b.shape[0], lora_a.shape[1]
    dx, d_b = grad_y.new_empty(0), lora_b.new_empty(0)
    with _no_autocast(grad_y.device):
        rows = math.prod(grad_y.shape[:-1])
        dyz = grad_y.reshape(rows, out).to(z.dtype)
        if output_mask[0]:
            lowrank = _dropped((dyz @ lora_b.to(z.dtype)) @ lora_a.to(z.dtype), seed, dropout_p)
            dx = grad_y.new_empty((*grad_y.shape[:-1], n_in))  # not a view of a temporary
            dx.view(rows, n_in).copy_(lowrank.mul_(scaling))
        if output_mask[1]:
            d_b = (dyz.t() @ z).mul_(scaling).to(lora_b.dtype)
    return dx, d_b


def gram_inverse(lora_a, eps=1e-6):
    _checks.check_gram_inverse("lorafa.gram_inverse", lora_a, eps)
    a = lora_a.to(_checks.gram_dtype(lora_a.dtype))
    with _no_autocast(a.device):
        g = a @ a.t()
        r = g.shape[0]
        delta = torch.clamp_min(torch.trace(g) * (eps / r), torch.finfo(torch.float32).tiny)
        g = g + delta * torch.eye(r, dtype=g.dtype, device=g.device)
        chol, _ = torch.linalg.cholesky_ex(g)
        return torch.cholesky_inverse(chol).contiguous()


def correct_grad(grad_b, gram_inv, scaling):
    _checks.check_correct_grad("lorafa.correct_grad", grad_b, gram_inv, scaling)
    with _no_autocast(grad_b.device):
        return ((grad_b.to(gram_inv.dtype) @ gram_inv) * (1.0 / (scaling * scaling))).to(grad_b.dtype)


def dropout_mask(seed, rows, cols, p):
    _checks.check_mask("lorafa.dropout_mask", seed, rows, cols, p)
    return keep_mask(seed, rows, cols, p)
