"""Pure-PyTorch implementations of the ``lorafa`` ops.

Used when the compiled library is missing or ``LORAFA_FORCE_PYTHON=1``. They register the same schemas
as csrc/ops.cpp (tests/test_backends.py checks that the two agree) and compute the same math with the
same dropout mask, on any device.
"""
from __future__ import annotations

import math

import torch

from . import _checks

SCHEMAS = {
    "linear": "linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, "
    "float dropout_p=0., bool correction=False, int? seed=None, float eps=1e-06, "
    "Tensor? gram_inv=None) -> Tensor",
    "_linear": "_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, "
    "float dropout_p, Tensor? seed, bool correction, float eps, Tensor? gram_inv) -> (Tensor, Tensor)",
    "linear_forward": "linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
    "float scaling, float dropout_p=0., Tensor? seed=None) -> (Tensor, Tensor)",
    "linear_backward": "linear_backward(Tensor grad_y, Tensor z, Tensor weight, Tensor lora_a, Tensor lora_b, "
    "float scaling, float dropout_p, Tensor? seed, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "gram_inverse": "gram_inverse(Tensor lora_a, float eps=1e-06) -> Tensor",
    "correct_grad": "correct_grad(Tensor grad_b, Tensor gram_inv, float scaling) -> Tensor",
    "dropout_mask": "dropout_mask(Tensor seed, int rows, int cols, float p) -> Tensor",
}

_M32 = 0xFFFFFFFF


def _philox_words(seed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` Philox4x32-10 words of the stream for ``seed`` (int64 values in [0, 2**32))."""
    dev = seed.device
    c = torch.arange((count + 3) // 4, device=dev, dtype=torch.int64)
    c0, c1 = c & _M32, (c >> 32) & _M32
    c2 = torch.zeros_like(c)
    c3 = torch.zeros_like(c)
    s = seed.reshape(()).to(torch.int64)
    k0, k1 = s & _M32, (s >> 32) & _M32
    for i in range(10):
        if i:
            k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
        # 32 x 32 -> 64-bit products wrap in int64; the low 64 bits (all we use) are exact.
        p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        c0, c1, c2, c3 = ((p1 >> 32) & _M32) ^ c1 ^ k0, p1 & _M32, ((p0 >> 32) & _M32) ^ c3 ^ k1, p0 & _M32
    return torch.stack((c0, c1, c2, c3), dim=1).reshape(-1)[:count]


def _keep_mask(seed, rows, cols, p):
    threshold = int(p * 4294967296.0)
    return (_philox_words(seed, rows * cols) >= threshold).reshape(rows, cols)


def _no_autocast(device):
    return torch.autocast(device.type, enabled=False)


def dropout_mask(seed, rows, cols, p):
    _checks.check_mask("lorafa.dropout_mask", seed, rows, cols, p)
    return _keep_mask(seed, rows, cols, p)


def _dropped(t, seed, p):
    """drop(t) for a 2-D t: the kept elements scaled by 1 / (1 - p)."""
    if p == 0.0:
        return t
    keep = _keep_mask(seed, t.shape[0], t.shape[1], p)
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
        z = _dropped(x2.to(zdt), seed, dropout_p) @ lora_a.t()
        if zdt == x.dtype:
            y2.addmm_(z, lora_b.t(), alpha=scaling)
        else:
            y2.copy_(y2.to(zdt).addmm_(z, lora_b.t(), alpha=scaling))
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
            t = dyz @ lora_b
            lowrank = _dropped(t @ lora_a, seed, dropout_p)
            dx = grad_y.new_empty((*grad_y.shape[:-1], n_in))  # not a view of a temporary
            dx.view(rows, n_in).copy_((dy @ weight).to(z.dtype).add_(lowrank, alpha=scaling))
        if output_mask[1]:
            d_b = (dyz.t() @ z).mul_(scaling).to(lora_b.dtype)
        if output_mask[2]:
            d_bias = dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(grad_y.dtype)
    return dx, d_b, d_bias


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


def _linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, correction, eps, gram_inv):
    return linear_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


IMPLS = {
    "_linear": _linear,
    "linear_forward": linear_forward,
    "linear_backward": linear_backward,
    "gram_inverse": gram_inverse,
    "correct_grad": correct_grad,
    "dropout_mask": dropout_mask,
}


def register(lib: torch.library.Library, composite_linear) -> None:
    """Define every schema in ``lib`` and register the pure-PyTorch kernels for all devices."""
    for schema in SCHEMAS.values():
        lib.define(schema)
    for name, fn in IMPLS.items():
        lib.impl(name, fn, "CompositeExplicitAutograd")
    lib.impl("linear", composite_linear, "CompositeImplicitAutograd")

