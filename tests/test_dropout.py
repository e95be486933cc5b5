"""Dropout: determinism, seed semantics, mask statistics and the mask definition."""
from __future__ import annotations

import math

import pytest
import torch

import json

import lorafa_ext
from tests.helpers import make_case, make_dy, ops, ops_for, ref_backward, ref_forward, run_python, seed_tensor
from lorafa_ext import reference


def _fwd_bwd(device, c, p, seed):
    ops = ops_for(device)
    x = c["x"].detach().requires_grad_(True)
    bb = c["lora_b"].detach().clone().requires_grad_(True)
    b = c["bias"].detach().clone().requires_grad_(True)
    y = ops.linear(x, c["weight"], b, c["lora_a"], bb, c["scaling"], p, False, seed)
    y.backward(make_dy(y.shape, y.dtype, y.device, seed=1))
    return y.detach(), x.grad, bb.grad, b.grad


@pytest.mark.parametrize("dtypes", [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp16")], ids=str)
def test_same_seed_same_results_bitwise(device, dtypes):
    ops = ops_for(device)
    c = make_case((3, 5), 33, 17, 8, *dtypes, device=device, seed=1)
    r1 = _fwd_bwd(device, c, 0.5, 1234)
    r2 = _fwd_bwd(device, c, 0.5, 1234)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)
    args = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], 0.5)
    y1, z1 = ops.linear_forward(*args, seed_tensor(1234, device))
    y2, z2 = ops.linear_forward(*args, seed_tensor(1234, device))
    assert torch.equal(y1, y2) and torch.equal(z1, z2)
    # the int seed of `linear` and the tensor seed of `linear_forward` mean the same mask
    assert torch.equal(y1, r1[0])


def test_different_seeds_differ(device):
    ops = ops_for(device)
    c = make_case((3, 5), 33, 17, 8, "fp32", device=device, seed=2)
    r1 = _fwd_bwd(device, c, 0.5, 1)
    r2 = _fwd_bwd(device, c, 0.5, 2)
    r3 = _fwd_bwd(device, c, 0.5, 1 + 2**32)  # the high key word matters too
    for a, b, d in zip(r1[:3], r2[:3], r3[:3]):  # y, dx, dB (dbias does not depend on the mask)
        assert not torch.equal(a, b)
        assert not torch.equal(a, d)
    m1 = ops.dropout_mask(seed_tensor(1, device), 15, 33, 0.5)
    m2 = ops.dropout_mask(seed_tensor(2, device), 15, 33, 0.5)
    assert not torch.equal(m1, m2)


def _corr(a, b):
    a = a.double().flatten()
    b = b.double().flatten()
    a = a - a.mean()
    b = b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_statistics(device, p):
    ops = ops_for(device)
    rows, cols = 255, 257  # rows * cols not a multiple of 4: counters straddle rows
    m = ops.dropout_mask(seed_tensor(987654321, device), rows, cols, p).cpu()
    assert m.dtype == torch.bool and m.shape == (rows, cols)
    n = rows * cols
    sigma = math.sqrt(p * (1 - p) / n)
    kept = m.double().mean().item()
    assert abs(kept - (1 - p)) < 5 * sigma, f"kept fraction {kept} vs {1 - p}"
    # each of the 4 Philox output words is used
    flat = m.flatten()
    for j in range(4):
        part = flat[j::4].double()
        assert abs(part.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / part.numel())
    # no obvious correlation between neighbouring elements, elements 4 apart (next counter),
    # neighbouring rows, or two seeds
    lim = 5 / math.sqrt(n)
    assert abs(_corr(m[:, :-1], m[:, 1:])) < lim
    assert abs(_corr(flat[:-4], flat[4:])) < lim
    assert abs(_corr(m[:-1], m[1:])) < lim
    m2 = ops.dropout_mask(seed_tensor(987654322, device), rows, cols, p).cpu()
    assert abs(_corr(m, m2)) < lim
    # per-row kept counts vary like a binomial (not all identical rows)
    per_row = m.double().mean(1)
    assert per_row.std().item() > 0.3 * math.sqrt(p * (1 - p) / cols)


def test_dropout_mask_p0_keeps_everything(device):
    ops = ops_for(device)
    m = ops.dropout_mask(seed_tensor(5, device), 7, 9, 0.0)
    assert m.dtype == torch.bool and bool(m.all())


def test_dropout_mask_empty(device):
    ops = ops_for(device)
    assert ops.dropout_mask(seed_tensor(5, device), 0, 9, 0.5).shape == (0, 9)
    assert ops.dropout_mask(seed_tensor(5, device), 4, 0, 0.5).shape == (4, 0)


@pytest.mark.parametrize(
    "seed,rows,cols,p",
    [
        (0, 3, 5, 0.5),
        (1234, 7, 13, 0.1),
        (2**40 + 17, 5, 11, 0.9),
        (-7, 9, 3, 0.3),
        (2**63 - 1, 2, 33, 0.5),
        (99, 3, 4099, 0.5),  # several parallel chunks, numel % 4 == 1
        (5, 9, 1031, 0.2),  # numel % 4 == 3
    ],
)
def test_dropout_mask_matches_reference(device, seed, rows, cols, p):
    ops = ops_for(device)
    got = ops.dropout_mask(seed_tensor(seed, device), rows, cols, p)
    assert got.device.type == device and got.dtype == torch.bool
    assert torch.equal(got.cpu(), reference.dropout_mask(seed, rows, cols, p))


@pytest.mark.parametrize("p", [0.25, 0.75])
@pytest.mark.parametrize("seed", [3, 2**33 + 5])
def test_forward_applies_the_reference_mask(device, p, seed):
    """With A = I (r = in), z = drop(x) element for element: read the applied mask off z."""
    ops = ops_for(device)
    lead, n = (3, 4), 13
    c = make_case(lead, n, 6, n, "fp64", device=device, seed=4)
    eye = torch.eye(n, dtype=torch.float64, device=device)
    y, z = ops.linear_forward(c["x"], c["weight"], c["bias"], eye, c["lora_b"], c["scaling"], p,
                              seed_tensor(seed, device))
    mask = reference.dropout_mask(seed, 12, n, p)
    x2 = c["x"].reshape(12, n).cpu()
    torch.testing.assert_close(z.cpu(), torch.where(mask, x2 / (1 - p), torch.zeros_like(x2)), rtol=1e-14, atol=0)
    c2 = dict(c, lora_a=eye)
    torch.testing.assert_close(y.cpu(), ref_forward(c2, mask, p)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.25, 0.75])
def test_backward_applies_the_reference_mask(device, p):
    """With W = 0 and A = I, dx = s * drop'(dy B): read the applied mask off dx."""
    ops = ops_for(device)
    seed, n, out, r_rows = 77, 13, 6, 12
    c = make_case(r_rows, n, out, n, "fp64", device=device, seed=5)
    eye = torch.eye(n, dtype=torch.float64, device=device)
    w0 = torch.zeros(out, n, dtype=torch.float64, device=device)
    z = torch.randn(r_rows, n, dtype=torch.float64, device=device)
    dy = make_dy((r_rows, out), torch.float64, device, seed=6)
    dx, _, _ = ops.linear_backward(dy, z, w0, eye, c["lora_b"], c["scaling"], p, seed_tensor(seed, device),
                                   [True, True, True])
    mask = reference.dropout_mask(seed, r_rows, n, p)
    t = c["scaling"] * (dy @ c["lora_b"]).cpu()
    torch.testing.assert_close(dx.cpu(), torch.where(mask, t / (1 - p), torch.zeros_like(t)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("p", [0.1, 0.6])
def test_backward_matches_reference_given_mask(device, p):
    seed = 31337
    c = make_case((2, 3), 11, 7, 4, "fp64", device=device, seed=7)
    y, gx, gb, gbias = _fwd_bwd(device, c, p, seed)
    mask = reference.dropout_mask(seed, 6, 11, p)
    assert not bool(mask.all())
    dy = make_dy(y.shape, y.dtype, "cpu", seed=1)
    dx_ref, db_ref, dbias_ref = ref_backward(dy, c, mask, p)
    torch.testing.assert_close(y.cpu(), ref_forward(c, mask, p)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx.cpu(), dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb.cpu(), db_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gbias.cpu(), dbias_ref, rtol=1e-12, atol=1e-12)


def test_seed_none_uses_torch_generator(device):
    ops = ops_for(device)
    c = make_case((4, 5), 33, 17, 8, "fp32", device=device, seed=8)
    args = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], 0.5, False, None)
    torch.manual_seed(11)
    y1 = ops.linear(*args)
    after1 = torch.rand(4, device=device)
    torch.manual_seed(11)
    y2 = ops.linear(*args)
    after2 = torch.rand(4, device=device)
    torch.manual_seed(12)
    y3 = ops.linear(*args)
    assert torch.equal(y1, y2)
    assert torch.equal(after1, after2)
    assert not torch.equal(y1, y3)
    # it drew from the generator of x's device
    torch.manual_seed(11)
    fresh = torch.rand(4, device=device)
    assert not torch.equal(after1, fresh)
    # and it is some dropout mask of the documented kind: y equals the reference for *some* mask,
    # so at least check that a mask was applied (differs from no dropout)
    y0 = ops.linear(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"])
    assert not torch.equal(y1, y0)


def test_seed_none_backward_uses_forward_mask(device):
    """The seed drawn in forward is the one backward uses. With A = I (r = in) and out > in, the
    forward mask can be read off y (drop(x) = lstsq(B, (y - x W^T - b) / s)) and the backward mask
    off dx (dx - dy W = s * drop'(dy B)); they must agree."""
    ops = ops_for(device)
    n, out, rows, p = 13, 17, 12, 0.5
    c = make_case(rows, n, out, n, "fp64", device=device, seed=9)
    eye = torch.eye(n, dtype=torch.float64, device=device)
    x = c["x"].detach().requires_grad_(True)
    torch.manual_seed(3)
    y = ops.linear(x, c["weight"], c["bias"], eye, c["lora_b"], c["scaling"], p, False, None)
    dy = make_dy(y.shape, y.dtype, device, seed=2)
    y.backward(dy)
    low = (y.detach() - c["x"] @ c["weight"].T - c["bias"]) / c["scaling"]
    dropped_x = torch.linalg.lstsq(c["lora_b"].cpu(), low.T.cpu()).solution.T
    fwd_mask = dropped_x.abs() > 1e-6 * dropped_x.abs().max()
    torch.testing.assert_close(dropped_x, torch.where(fwd_mask, c["x"].cpu() / (1 - p), 0.0), rtol=1e-8, atol=1e-8)
    lowb = ((x.grad - dy @ c["weight"]) / c["scaling"]).cpu()
    t = (dy @ c["lora_b"]).cpu()
    bwd_mask = lowb.abs() > 1e-9 * t.abs().max()
    assert 0 < int(fwd_mask.sum()) < fwd_mask.numel()
    assert torch.equal(fwd_mask, bwd_mask)
    torch.testing.assert_close(lowb, torch.where(bwd_mask, t / (1 - p), 0.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_p_outside_range_is_an_error(device, p):
    ops = ops_for(device)
    c = make_case(4, 9, 5, 2, "fp32", device=device, seed=10)
    args = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], p)
    with pytest.raises((RuntimeError, ValueError), match="dropout_p"):
        ops.linear(*args, False, 1)
    with pytest.raises((RuntimeError, ValueError), match="dropout_p"):
        ops.linear_forward(*args, seed_tensor(1, device))


def test_dropped_inf_gives_nan_like_the_reference(device):
    """drop(x) multiplies by the mask, as torch's dropout does: a dropped inf becomes NaN (inf * 0),
    a kept one stays infinite; every backend agrees with the reference on where."""
    ops = ops_for(device)
    seed, p, rows, n_in = 7, 0.5, 4, 8
    c = make_case(rows, n_in, 5, 3, "fp32", device=device, bias=False, seed=11)
    mask = reference.dropout_mask(seed, rows, n_in, p)
    x = c["x"].detach().clone()
    x[0, int((~mask[0]).nonzero()[0])] = float("inf")  # dropped
    x[2, int(mask[2].nonzero()[0])] = float("inf")  # kept
    c["x"] = x
    y, z = ops.linear_forward(x, c["weight"], None, c["lora_a"], c["lora_b"], c["scaling"], p,
                              seed_tensor(seed, device))
    y_ref, z_ref = ref_forward(c, mask, p)
    assert torch.equal(z.isnan().cpu(), z_ref.isnan()) and torch.equal(z.isinf().cpu(), z_ref.isinf())
    assert bool(z_ref[0].isnan().all()) and bool(z_ref[2].isinf().all())
    assert torch.equal(y.isnan().cpu(), y_ref.isnan())


_PHILOX_CODE = """
import json, torch, lorafa_ext
from lorafa_ext import reference
res = {"masks_match_reference": []}
for seed, rows, cols in [(5, 3, 4099), (2**40 + 3, 9, 1031), (7, 1, 1), (11, 100, 1024)]:
    m = torch.ops.lorafa.dropout_mask(torch.tensor(seed), rows, cols, 0.3)
    res["masks_match_reference"].append(bool(torch.equal(m, reference.dropout_mask(seed, rows, cols, 0.3))))
g = torch.Generator().manual_seed(3)
x, w, a, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(37, 33), (5, 33), (3, 33), (5, 3)])
y, z = torch.ops.lorafa.linear_forward(x, w, None, a, b, 0.5, 0.3, torch.tensor(99))
dx, _, _ = torch.ops.lorafa.linear_backward(torch.ones(37, 5, dtype=torch.float64), z, w, a, b, 0.5, 0.3,
                                            torch.tensor(99), [True, False, False])
res["z"], res["dx"] = z.tolist(), dx.tolist()
print(json.dumps(res))
"""


@pytest.mark.skipif(lorafa_ext.backend() == "python", reason="the compiled CPU kernels' Philox paths")
def test_cpu_philox_paths_agree():
    """The scalar, AVX2 and (where the CPU has it) AVX-512 Philox loops give the same masks as the
    reference and bitwise the same op results (forced with LORAFA_CPU_PHILOX); the odd sizes leave
    scalar tails after the vector loops."""
    runs = {isa: json.loads(run_python(_PHILOX_CODE, env_extra={"LORAFA_CPU_PHILOX": isa}))
            for isa in ("scalar", "avx2", "best")}
    for isa, res in runs.items():
        assert all(res["masks_match_reference"]), isa
        assert res["z"] == runs["scalar"]["z"] and res["dx"] == runs["scalar"]["dx"], isa
