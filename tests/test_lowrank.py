"""``lowrank``, the adapter branch alone (s drop(x) A^T B^T, for quantized base layers), on every
device against the fp64 reference: the forward and backward ops, autograd with and without the
correction, what it saves, opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

from lorafa_ext import reference
from tests.helpers import (
    DTYPE_PAIRS,
    _cpu,
    assert_matches,
    flat_rows,
    fp32_tight,
    make_case,
    make_dy,
    op_mask,
    ops_for,
    seed_tensor,
)

# (leading dims of x, in, out, r): odd shapes, N in 1, 7, 129
SHAPES = [((1,), 33, 65, 1), ((7,), 65, 33, 8), ((129,), 33, 65, 16), ((3, 5), 33, 33, 8)]
SEED = 20261201
# every admitted (x, adapter) dtype pair
ALL_PAIRS = DTYPE_PAIRS + [("fp64", "fp64"), ("fp64", "fp32")]


def _ref(c, mask, p):
    return reference.lowrank(_cpu(c["x"]), _cpu(c["lora_a"]), _cpu(c["lora_b"]), c["scaling"], _cpu(mask), p)


def _ref_backward(dy, c, mask, p):
    return reference.lowrank_backward(_cpu(dy), _cpu(c["x"]), _cpu(c["lora_a"]), _cpu(c["lora_b"]), c["scaling"],
                                      _cpu(mask), p)


def _drop(t, mask, p):
    return t if p == 0.0 else t * mask.to(t.dtype) / (1.0 - p)


def _plain(c, mask, p):
    """The same math with torch ops in promote(x, lora) precision."""
    x, a, b, s = c["x"], c["lora_a"], c["lora_b"], c["scaling"]
    cd = torch.promote_types(x.dtype, a.dtype)
    z = _drop(x.reshape(-1, x.shape[-1]).to(cd), mask, p) @ a.to(cd).t()
    return (s * (z @ b.to(cd).t())).to(x.dtype).reshape(*x.shape[:-1], b.shape[0]), z


def _plain_backward(dy, z, c, mask, p):
    a, b, s = c["lora_a"], c["lora_b"], c["scaling"]
    cd = torch.promote_types(dy.dtype, a.dtype)
    dy2 = dy.reshape(-1, b.shape[0]).to(cd)
    dx = _drop(s * ((dy2 @ b.to(cd)) @ a.to(cd)), mask, p).to(dy.dtype)
    return dx.reshape(*dy.shape[:-1], a.shape[1]), (s * (dy2.t() @ z.to(cd))).to(b.dtype)


def _case(shape, dtypes, device, layout="contiguous", seed=1):
    lead, n_in, out, r = shape
    return make_case(lead, n_in, out, r, *dtypes, device=device, bias=False, seed=seed, layout=layout)


def _check_forward(c, y, z, mask, p):
    x, a = c["x"], c["lora_a"]
    y_ref, z_ref = _ref(c, mask, p)
    y_pl, z_pl = _plain(c, mask, p)
    zdt = torch.promote_types(x.dtype, a.dtype)
    assert_matches(y, y_pl, y_ref, "y", dtype=x.dtype, rtol_abs=fp32_tight(x.dtype), k=x.shape[-1])
    assert_matches(z, z_pl, z_ref, "z", dtype=zdt, rtol_abs=fp32_tight(zdt), k=x.shape[-1])


def _check_backward(c, dy, z, dx, d_b, mask, p):
    dx_ref, db_ref = _ref_backward(dy, c, mask, p)
    dx_pl, db_pl = _plain_backward(dy, z, c, mask, p)
    bdt = c["lora_b"].dtype
    assert_matches(dx, dx_pl, dx_ref, "dx", dtype=dy.dtype, rtol_abs=fp32_tight(dy.dtype), k=dy.shape[-1])
    assert_matches(d_b, db_pl, db_ref, "dB", dtype=bdt, rtol_abs=fp32_tight(bdt), k=flat_rows(dy))


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtypes", ALL_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lowrank_forward_backward(device, shape, dtypes, p):
    ops = ops_for(device)
    c = _case(shape, dtypes, device)
    x, a, b, s = c["x"], c["lora_a"], c["lora_b"], c["scaling"]
    seed = seed_tensor(SEED, device) if p else None
    mask = op_mask(SEED, flat_rows(x), x.shape[-1], p, device)
    y, z = ops.lowrank_forward(x, a, b, s, p, seed)
    assert y.shape == (*x.shape[:-1], b.shape[0]) and z.shape == (flat_rows(x), a.shape[0])
    _check_forward(c, y, z, mask, p)
    dy = make_dy(y.shape, x.dtype, device)
    dx, d_b = ops.lowrank_backward(dy, z, a, b, s, p, seed, [True, True])
    _check_backward(c, dy, z, dx, d_b, mask, p)
    only_dx, no_db = ops.lowrank_backward(dy, z, a, b, s, p, seed, [True, False])
    assert torch.equal(only_dx, dx) and no_db.shape == (0,)


@pytest.mark.parametrize("layout", ["transposed", "strided", "padded"])
def test_lowrank_non_contiguous(device, layout):
    ops = ops_for(device)
    c = _case(((7, 3), 33, 65, 8), ("fp32", "fp32"), device, layout=layout)
    x, a, b, s = c["x"], c["lora_a"], c["lora_b"], c["scaling"]
    mask = op_mask(SEED, flat_rows(x), x.shape[-1], 0.25, device)
    y, z = ops.lowrank_forward(x, a, b, s, 0.25, seed_tensor(SEED, device))
    _check_forward(c, y, z, mask, 0.25)
    dy = make_dy(y.shape, x.dtype, device).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous dy
    dx, d_b = ops.lowrank_backward(dy, z, a, b, s, 0.25, seed_tensor(SEED, device), [True, True])
    _check_backward(c, dy, z, dx, d_b, mask, 0.25)


def test_lowrank_empty(device):
    ops = ops_for(device)
    c = _case(((0,), 33, 65, 8), ("fp32", "fp32"), device)
    y, z = ops.lowrank_forward(c["x"], c["lora_a"], c["lora_b"], 1.0)
    assert y.shape == (0, 65) and z.shape == (0, 8)
    dx, d_b = ops.lowrank_backward(torch.randn(0, 65, device=device), z, c["lora_a"], c["lora_b"], 1.0, 0.0, None,
                                   [True, True])
    assert dx.shape == (0, 33) and torch.equal(d_b, torch.zeros_like(d_b))


@pytest.mark.parametrize("correction", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lowrank_autograd(device, p, correction):
    """Gradients reach x and lora_b, exact or corrected, through the composite entry point."""
    ops = ops_for(device)
    c = _case(((5, 7), 33, 65, 8), ("fp32", "fp32"), device)
    x = c["x"].detach().requires_grad_(True)
    b = c["lora_b"].detach().requires_grad_(True)
    y = ops.lowrank(x, c["lora_a"], b, c["scaling"], p, correction, SEED if p else None)
    dy = make_dy(y.shape, y.dtype, device)
    y.backward(dy)
    mask = op_mask(SEED, flat_rows(x), x.shape[-1], p, device)
    dx_ref, db_ref = _ref_backward(dy, c, mask, p)
    if correction:
        db_ref = reference.correct_grad(db_ref, _cpu(c["lora_a"]), c["scaling"])
    torch.testing.assert_close(x.grad.cpu().double(), dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.cpu().double(), db_ref, rtol=1e-4, atol=1e-4)
    assert_matches(y, _plain(c, mask, p)[0], _ref(c, mask, p)[0], "y", dtype=y.dtype, k=x.shape[-1])


def test_lowrank_saves_only_z(device):
    """With dropout on, the activations saved for backward are z (N x r) alone: no x, no mask."""
    ops = ops_for(device)
    c = _case(((9, 4), 33, 65, 8), ("bf16", "fp32"), device)
    x = c["x"].detach().requires_grad_(True)
    b = c["lora_b"].detach().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.lowrank(x, c["lora_a"], b, c["scaling"], 0.25, True)
    params = {c["lora_a"].data_ptr(), b.data_ptr()}
    activations = [t for t in saved if t.data_ptr() not in params and t.numel() > 1]
    assert [tuple(t.shape) for t in activations] in ([(36, 8)], [(36, 8), (8, 8)])  # z (and the Gram inverse)
    assert not any(t.dtype == torch.bool for t in saved)
    y.sum().backward()
    assert x.grad is not None and b.grad is not None


def test_lowrank_frozen_lora_a(device):
    ops = ops_for(device)
    c = _case(((4,), 9, 5, 2), ("fp32", "fp32"), device)
    with pytest.raises(RuntimeError, match="lora_a must not require grad"):
        ops.lowrank(c["x"], c["lora_a"].clone().requires_grad_(), c["lora_b"], 1.0)


def _samples(device):
    out = []
    for shape, dtypes, p in [(((7,), 33, 65, 8), ("fp32", "fp32"), 0.0), (((3, 5), 33, 17, 4), ("bf16", "fp32"), 0.3),
                             (((1,), 9, 5, 1), ("fp64", "fp64"), 0.0)]:
        c = _case(shape, dtypes, device)
        x = c["x"].detach().requires_grad_(True)
        b = c["lora_b"].detach().requires_grad_(True)
        out.append((x, c["lora_a"], b, c["scaling"], p))
    return out


def test_opcheck(device):
    ops = ops_for(device)
    for x, a, b, s, p in _samples(device):
        seed = seed_tensor(SEED, device) if p else None
        torch.library.opcheck(ops.lowrank_forward, (x.detach(), a, b.detach(), s, p, seed))
        for correction in (False, True):
            torch.library.opcheck(ops._lowrank, (x, a, b, s, p, seed, correction, 1e-6, None))
        y, z = ops.lowrank_forward(x.detach(), a, b.detach(), s, p, seed)
        dy = make_dy(y.shape, y.dtype, y.device)
        torch.library.opcheck(ops.lowrank_backward, (dy, z, a, b.detach(), s, p, seed, [True, True]))


class _Adapter(nn.Module):
    def __init__(self, c, dropout_p, correction):
        super().__init__()
        self.register_buffer("lora_a", c["lora_a"].detach().clone())
        self.lora_b = nn.Parameter(c["lora_b"].detach().clone())
        self.scaling, self.dropout_p, self.correction = c["scaling"], dropout_p, correction

    def forward(self, x):
        y = torch.ops.lorafa.lowrank(x, self.lora_a, self.lora_b, self.scaling, self.dropout_p, self.correction,
                                     SEED if self.dropout_p else None)
        return torch.tanh(y) + x.sum(-1, keepdim=True)


@pytest.mark.parametrize("cfg", [dict(backend="inductor", p=0.0, correction=False),
                                 dict(backend="aot_eager", p=0.3, correction=True)], ids=str)
def test_compile_fullgraph(cfg):
    torch._dynamo.reset()
    c = _case(((6, 5), 33, 17, 4), ("fp32", "fp32"), "cpu")
    model = _Adapter(c, cfg["p"], cfg["correction"])
    compiled = torch.compile(model, backend=cfg["backend"], fullgraph=True)
    results = []
    for m in (model, compiled):
        m.zero_grad(set_to_none=True)
        x = c["x"].detach().clone().requires_grad_(True)
        y = m(x)
        y.backward(make_dy(y.shape, y.dtype, "cpu"))
        results.append((y.detach(), x.grad, model.lora_b.grad.clone()))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
