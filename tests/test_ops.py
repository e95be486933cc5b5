"""Every backend (cpu, cuda when present) against the fp64 reference."""
from __future__ import annotations

import pytest
import torch

import lorafa_ext
from tests.helpers import (
    EMULATED,
    DTYPE_PAIRS,
    assert_matches,
    dt,
    flat_rows,
    fp32_tight,
    make_case,
    make_dy,
    op_mask,
    ops,
    ops_for,
    plain_backward,
    plain_forward,
    plain_gram_inverse,
    ref_backward,
    ref_forward,
    seed_tensor,
)
from lorafa_ext import reference

# (leading dims of x, in, out, r): odd shapes, N in 1, 7, 129
SHAPES = [
    ((1,), 33, 65, 1),
    ((7,), 65, 33, 8),
    ((129,), 33, 65, 16),
    ((3, 5), 33, 33, 8),
]
SEED = 20240607
# every admitted (x, adapter) dtype pair: the CUDA-relevant ones plus fp64 x with fp64 or fp32 adapters
ALL_PAIRS = DTYPE_PAIRS + [("fp64", "fp64"), ("fp64", "fp32")]


def _check_fwd(c, y, z, p, mask):
    x, a = c["x"], c["lora_a"]
    y_ref, z_ref = ref_forward(c, mask, p)
    y_pl, z_pl = plain_forward(c, mask, p)
    zdt = torch.promote_types(x.dtype, a.dtype)
    n_in = x.shape[-1]
    assert_matches(y, y_pl, y_ref, "y", dtype=x.dtype, rtol_abs=fp32_tight(x.dtype), k=n_in)
    assert_matches(z, z_pl, z_ref, "z", dtype=zdt, rtol_abs=fp32_tight(zdt), k=n_in)
    assert y.device == x.device and z.device == x.device


def _check_bwd(c, dy, z, dx, d_b, d_bias, p, mask, check_bias=True):
    dx_ref, db_ref, dbias_ref = ref_backward(dy, c, mask, p)
    dx_pl, db_pl, dbias_pl = plain_backward(dy, z, c, mask, p)
    bdt = c["lora_b"].dtype
    out, rows = dy.shape[-1], flat_rows(dy)
    assert_matches(dx, dx_pl, dx_ref, "dx", dtype=dy.dtype, rtol_abs=fp32_tight(dy.dtype), k=out)
    assert_matches(d_b, db_pl, db_ref, "dB", dtype=bdt, rtol_abs=fp32_tight(bdt), k=rows)
    if check_bias:
        assert_matches(d_bias, dbias_pl, dbias_ref, "dbias", dtype=dy.dtype, rtol_abs=fp32_tight(dy.dtype),
                       k=rows)


# --------------------------------------------------------------------------------------------------
# linear_forward


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtypes", ALL_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_forward(device, shape, dtypes, p):
    ops = ops_for(device)
    lead, n_in, out, r = shape
    c = make_case(lead, n_in, out, r, *dtypes, device=device, seed=1)
    seed = seed_tensor(SEED, device) if p else None
    y, z = ops.linear_forward(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], p, seed)
    mask = op_mask(SEED, flat_rows(c["x"]), n_in, p, device)
    assert y.shape == (*lead, out) and z.shape == (flat_rows(c["x"]), r)
    _check_fwd(c, y, z, p, mask)


@pytest.mark.parametrize("layout", ["transposed", "strided", "padded"])
@pytest.mark.parametrize("lead", [(7,), (3, 5)], ids=str)
@pytest.mark.parametrize("dtypes", [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp16")], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_linear_forward_noncontiguous(device, layout, lead, dtypes, p):
    ops = ops_for(device)
    c = make_case(lead, 33, 17, 8, *dtypes, device=device, seed=2, layout=layout)
    assert not c["x"].is_contiguous()
    seed = seed_tensor(SEED + 1, device) if p else None
    y, z = ops.linear_forward(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], p, seed)
    _check_fwd(c, y, z, p, op_mask(SEED + 1, flat_rows(c["x"]), 33, p, device))


def test_linear_forward_no_bias(device):
    ops = ops_for(device)
    c = make_case(7, 33, 65, 8, "fp32", device=device, bias=False, seed=3)
    y, z = ops.linear_forward(c["x"], c["weight"], None, c["lora_a"], c["lora_b"], c["scaling"])
    _check_fwd(c, y, z, 0.0, None)


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_linear_forward_empty(device, lead, p):
    ops = ops_for(device)
    c = make_case(lead, 33, 17, 8, "fp32", device=device, seed=4)
    seed = seed_tensor(SEED, device) if p else None
    y, z = ops.linear_forward(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], p, seed)
    assert y.shape == (*lead, 17) and y.dtype == torch.float32
    assert z.shape == (0, 8) and z.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# linear_backward


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtypes", ALL_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_backward(device, shape, dtypes, p):
    ops = ops_for(device)
    lead, n_in, out, r = shape
    c = make_case(lead, n_in, out, r, *dtypes, device=device, seed=5)
    x = c["x"]
    mask = op_mask(SEED, flat_rows(x), n_in, p, device)
    seed = seed_tensor(SEED, device) if p else None
    zdt = torch.promote_types(x.dtype, c["lora_a"].dtype)
    # z from the reference, rounded to z's dtype: independent of linear_forward
    z = ref_forward(c, mask, p)[1].to(dtype=zdt, device=device)
    dy = make_dy((*lead, out), x.dtype, device, seed=6)
    dx, d_b, d_bias = ops.linear_backward(dy, z, c["weight"], c["lora_a"], c["lora_b"], c["scaling"], p, seed,
                                          [True, True, True])
    assert dx.shape == x.shape
    _check_bwd(c, dy, z, dx, d_b, d_bias, p, mask)


@pytest.mark.parametrize("layout", ["transposed", "strided", "padded"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_linear_backward_noncontiguous_grad(device, layout, p):
    ops = ops_for(device)
    lead, n_in, out, r = (3, 5), 33, 17, 8
    c = make_case(lead, n_in, out, r, "fp32", device=device, seed=7)
    mask = op_mask(SEED, 15, n_in, p, device)
    seed = seed_tensor(SEED, device) if p else None
    z = ref_forward(c, mask, p)[1].float().to(device)
    gen = torch.Generator().manual_seed(8)
    if layout == "transposed":
        dy = torch.randn(out, 5, 3, generator=gen).to(device).permute(2, 1, 0)
    elif layout == "padded":
        dy = torch.randn(3, 5, out + 5, generator=gen).to(device)[..., :out]
    else:
        dy = torch.randn(3, 5, 2 * out, generator=gen).to(device)[..., ::2]
    assert not dy.is_contiguous()
    dx, d_b, d_bias = ops.linear_backward(dy, z, c["weight"], c["lora_a"], c["lora_b"], c["scaling"], p, seed,
                                          [True, True, True])
    _check_bwd(c, dy, z, dx, d_b, d_bias, p, mask)


@pytest.mark.parametrize(
    "output_mask",
    [[True, False, False], [False, True, False], [False, False, True], [True, True, False], [False, False, False]],
    ids=str,
)
@pytest.mark.parametrize("dtypes", [("fp32", "fp32"), ("bf16", "fp32")], ids=str)
def test_linear_backward_output_mask(device, output_mask, dtypes):
    ops = ops_for(device)
    lead, n_in, out, r, p = (7,), 33, 17, 8, 0.25
    c = make_case(lead, n_in, out, r, *dtypes, device=device, seed=9)
    mask = op_mask(SEED, 7, n_in, p, device)
    zdt = torch.promote_types(c["x"].dtype, c["lora_a"].dtype)
    z = ref_forward(c, mask, p)[1].to(dtype=zdt, device=device)
    dy = make_dy((*lead, out), c["x"].dtype, device, seed=10)
    got = ops.linear_backward(dy, z, c["weight"], c["lora_a"], c["lora_b"], c["scaling"], p,
                              seed_tensor(SEED, device), output_mask)
    assert len(got) == 3
    refs = ref_backward(dy, c, mask, p)
    plains = plain_backward(dy, z, c, mask, p)
    dtypes = (dy.dtype, c["lora_b"].dtype, dy.dtype)
    lengths = (out, flat_rows(dy), flat_rows(dy))  # reduction length behind dx, dB, dbias
    for name, want, g, ref, pl, d, k in zip(("dx", "dB", "dbias"), output_mask, got, refs, plains, dtypes, lengths):
        if want:
            assert_matches(g, pl, ref, name, dtype=d, rtol_abs=fp32_tight(d), k=k)
        else:
            assert g.shape == (0,), f"{name}: masked-out output has shape {tuple(g.shape)}, expected (0,)"


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("dtypes", [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp16")], ids=str)
def test_linear_backward_empty(device, p, dtypes):
    ops = ops_for(device)
    c = make_case(0, 33, 17, 8, *dtypes, device=device, seed=11)
    zdt = torch.promote_types(c["x"].dtype, c["lora_a"].dtype)
    z = torch.empty(0, 8, dtype=zdt, device=device)
    dy = torch.empty(0, 17, dtype=c["x"].dtype, device=device)
    seed = seed_tensor(SEED, device) if p else None
    dx, d_b, d_bias = ops.linear_backward(dy, z, c["weight"], c["lora_a"], c["lora_b"], c["scaling"], p, seed,
                                          [True, True, True])
    assert dx.shape == (0, 33) and dx.dtype == dy.dtype
    assert d_b.shape == (17, 8) and d_b.dtype == c["lora_b"].dtype
    assert d_bias.shape == (17,) and d_bias.dtype == dy.dtype
    assert bool((d_b == 0).all()) and bool((d_bias == 0).all())


# --------------------------------------------------------------------------------------------------
# linear (autograd)


def _run_linear(device, c, p, seed, correction=False, gram_inv=None, eps=1e-6, grad_x=True, grad_bias=True, dy_seed=13):
    ops = ops_for(device)
    x = c["x"].detach().requires_grad_(grad_x)  # keeps x's (possibly non-contiguous) layout
    bb = c["lora_b"].detach().clone().requires_grad_(True)
    b = None
    if c["bias"] is not None:
        b = c["bias"].detach().clone().requires_grad_(grad_bias)
    y = ops.linear(x, c["weight"], b, c["lora_a"], bb, c["scaling"], p, correction, seed, eps, gram_inv)
    dy = make_dy(y.shape, y.dtype, y.device, seed=dy_seed)
    y.backward(dy)
    return y.detach(), x.grad if grad_x else None, bb.grad, (b.grad if b is not None else None), dy


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtypes", ALL_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_autograd(device, shape, dtypes, p):
    lead, n_in, out, r = shape
    c = make_case(lead, n_in, out, r, *dtypes, device=device, seed=12)
    y, gx, gb, gbias, dy = _run_linear(device, c, p, SEED if p else None)
    mask = op_mask(SEED, flat_rows(c["x"]), n_in, p, device)
    y_ref, z_ref = ref_forward(c, mask, p)
    y_pl, z_pl = plain_forward(c, mask, p)
    assert_matches(y, y_pl, y_ref, "y", dtype=c["x"].dtype, rtol_abs=fp32_tight(c["x"].dtype), k=n_in)
    assert gx.shape == c["x"].shape
    _check_bwd(c, dy, z_pl, gx, gb, gbias, p, mask)


@pytest.mark.parametrize("layout", ["transposed", "strided", "padded"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_linear_autograd_noncontiguous(device, layout, p):
    c = make_case((3, 5), 33, 17, 8, "fp32", device=device, seed=14, layout=layout)
    assert not c["x"].is_contiguous()
    y, gx, gb, gbias, dy = _run_linear(device, c, p, SEED if p else None)
    mask = op_mask(SEED, 15, 33, p, device)
    y_pl, z_pl = plain_forward(c, mask, p)
    assert_matches(y, y_pl, ref_forward(c, mask, p)[0], "y", dtype=torch.float32, rtol_abs=2e-6, k=33)
    _check_bwd(c, dy, z_pl, gx, gb, gbias, p, mask)


@pytest.mark.parametrize("grad_x,grad_bias", [(False, True), (True, False), (False, False)])
def test_linear_autograd_partial_requires_grad(device, grad_x, grad_bias):
    c = make_case(7, 33, 17, 8, "fp32", device=device, seed=15)
    y, gx, gb, gbias, dy = _run_linear(device, c, 0.25, SEED, grad_x=grad_x, grad_bias=grad_bias)
    mask = op_mask(SEED, 7, 33, 0.25, device)
    _, z_pl = plain_forward(c, mask, 0.25)
    dx_ref, db_ref, dbias_ref = ref_backward(dy, c, mask, 0.25)
    dx_pl, db_pl, dbias_pl = plain_backward(dy, z_pl, c, mask, 0.25)
    assert_matches(gb, db_pl, db_ref, "dB", dtype=torch.float32, rtol_abs=2e-6, k=7)
    if grad_x:
        assert_matches(gx, dx_pl, dx_ref, "dx", dtype=torch.float32, rtol_abs=2e-6, k=17)
    if grad_bias:
        assert_matches(gbias, dbias_pl, dbias_ref, "dbias", dtype=torch.float32, rtol_abs=2e-6, k=7)
    else:
        assert gbias is None


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_linear_autograd_empty(device, p):
    c = make_case(0, 33, 17, 8, "fp32", device=device, seed=16)
    y, gx, gb, gbias, _ = _run_linear(device, c, p, SEED if p else None)
    assert y.shape == (0, 17)
    assert gx.shape == (0, 33)
    assert gb.shape == (17, 8) and bool((gb == 0).all())
    assert gbias.shape == (17,) and bool((gbias == 0).all())


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("n_in", [1, 6])
def test_size_one_operands_with_degenerate_strides(device, n_in, p):
    """One row and one output column: a size-1 dim's stride is arbitrary (0 from expand, 1 from a
    transposed column) while the tensor still counts as contiguous; the kernels and the GEMMs'
    leading dimensions must not rely on it."""
    ops = ops_for(device)
    g = torch.Generator().manual_seed(21)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, torch.float32)

    x = rnd(1, n_in).expand(3, n_in)[:1]  # strides (0, 1)
    weight = rnd(n_in, 1).t()  # (1, n_in) with strides (1, 1)
    bias, lora_a = rnd(1), rnd(2, n_in)
    lora_b = rnd(1, 2)
    b_leaf, bias_leaf = (t.clone().requires_grad_(True) for t in (lora_b, bias))
    y = ops.linear(x.requires_grad_(True), weight, bias_leaf, lora_a, b_leaf, 0.5, p, False, 9)
    y.sum().backward()  # the gradient reaching the op is expanded: strides (0, 0)
    c = dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, scaling=0.5)
    mask = op_mask(9, 1, n_in, p, device)
    y_ref, _ = ref_forward(c, mask, p)
    dx_ref, db_ref, dbias_ref = ref_backward(torch.ones(1, 1, dtype=torch.float64), c, mask, p)
    for got, want in ((y, y_ref), (x.grad, dx_ref), (b_leaf.grad, db_ref), (bias_leaf.grad, dbias_ref)):
        torch.testing.assert_close(got.detach().cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_wrappers_are_the_ops(device):
    if device is EMULATED:
        pytest.skip("the wrappers call torch.ops.lorafa, which the emulated device does not serve")
    c = make_case(7, 33, 17, 8, "fp32", device=device, seed=17)
    args = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"])
    s = seed_tensor(SEED, device)
    y1, z1 = lorafa_ext.linear_forward(*args, 0.5, s)
    y2, z2 = ops.linear_forward(*args, 0.5, s)
    assert torch.equal(y1, y2) and torch.equal(z1, z2)
    assert torch.equal(lorafa_ext.ops.linear(*args, 0.5, False, SEED), ops.linear(*args, 0.5, False, SEED))
    assert torch.equal(lorafa_ext.dropout_mask(s, 7, 33, 0.5), ops.dropout_mask(s, 7, 33, 0.5))
    g = lorafa_ext.gram_inverse(c["lora_a"])
    assert torch.equal(g, ops.gram_inverse(c["lora_a"], 1e-6))
    assert torch.equal(lorafa_ext.correct_grad(c["lora_b"], g, 2.0), ops.correct_grad(c["lora_b"], g, 2.0))
    dy = make_dy((7, 17), torch.float32, device)
    w1 = lorafa_ext.linear_backward(dy, z1, c["weight"], c["lora_a"], c["lora_b"], c["scaling"], 0.5, s)
    w2 = ops.linear_backward(dy, z1, c["weight"], c["lora_a"], c["lora_b"], c["scaling"], 0.5, s, [True] * 3)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))


# --------------------------------------------------------------------------------------------------
# gram_inverse / correct_grad / correction


@pytest.mark.parametrize("eps", [1e-6, 1e-3])
@pytest.mark.parametrize("r,n_in", [(1, 33), (8, 33), (16, 65), (16, 17), (128, 1027)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "fp64"])
def test_gram_inverse(device, dtype, r, n_in, eps):
    ops = ops_for(device)
    a = make_case(1, n_in, 3, r, dtype, device=device, seed=r)["lora_a"]
    g = ops.gram_inverse(a, eps)
    want_dtype = torch.float64 if dt(dtype) == torch.float64 else torch.float32
    ref = reference.gram_inverse(a.cpu(), eps)
    plain = plain_gram_inverse(a, eps)
    eye = torch.eye(r, dtype=torch.float64)
    a64 = a.cpu().double()
    m = a64 @ a64.T
    m = m + eps * torch.trace(m) / r * eye
    cond = torch.linalg.cond(m).item()
    # inversion error grows with the condition number: allow ~cond ulps on top of 2x plain PyTorch
    assert_matches(g, plain, ref, "gram_inv", dtype=want_dtype, ulps=4 + cond, k=n_in)
    assert g.device == a.device
    # and it is a (regularised) inverse, to the accuracy its condition number allows
    unit = torch.finfo(want_dtype).eps
    torch.testing.assert_close(m @ g.cpu().double(), eye, rtol=0, atol=max(10 * cond * unit, 100 * unit))


def test_gram_inverse_rank_deficient(device):
    # r > in: A A^T is singular; delta = eps * trace / r keeps the result finite and SPD
    ops = ops_for(device)
    a = make_case(1, 4, 3, 8, "fp64", device=device, seed=18)["lora_a"]
    g = ops.gram_inverse(a, 1e-3)
    torch.testing.assert_close(g.cpu(), reference.gram_inverse(a.cpu(), 1e-3), rtol=1e-8, atol=1e-8)
    g32 = ops.gram_inverse(a.float(), 1e-3)
    assert g32.dtype == torch.float32 and bool(torch.isfinite(g32).all())
    ref = reference.gram_inverse(a.cpu(), 1e-3)
    cond = torch.linalg.cond(ref).item()
    assert cond > 100  # really ill-conditioned
    assert_matches(g32, plain_gram_inverse(a.float(), 1e-3), ref, "gram_inv fp32", ulps=4 + cond, k=4)


@pytest.mark.parametrize("gdtype", ["fp32", "fp64"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_correct_grad(device, dtype, gdtype):
    ops = ops_for(device)
    out, r, n_in, s = 33, 8, 65, 0.75
    c = make_case(1, n_in, out, r, "fp64", device=device, seed=19)
    a = c["lora_a"]
    gen = torch.Generator().manual_seed(20)
    grad_b = torch.randn(out, r, generator=gen, dtype=torch.float64).to(dtype=dt(dtype), device=device)
    gram_inv = reference.gram_inverse(a.cpu()).to(dtype=dt(gdtype), device=device)
    got = ops.correct_grad(grad_b, gram_inv, s)
    ref = reference.correct_grad(grad_b.cpu(), a.cpu(), s)
    cd = gram_inv.dtype
    plain = ((grad_b.to(cd) @ gram_inv) / (s * s)).to(grad_b.dtype)
    assert_matches(got, plain, ref, "correct_grad", dtype=grad_b.dtype, ulps=2, k=r)
    assert got.shape == (out, r) and got.device == grad_b.device


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("precomputed", [False, True])
def test_correction_is_least_squares(device, p, dtype, precomputed):
    """With correction=True, lora_b.grad = argmin_g ||s g A - G||_F with G = dy^T drop(x)."""
    ops = ops_for(device)
    lead, n_in, out, r = (3, 5), 65, 33, 16
    c = make_case(lead, n_in, out, r, dtype, device=device, seed=21)
    eps = 1e-9 if dtype == "fp32" else 1e-13
    gram_inv = ops.gram_inverse(c["lora_a"], eps) if precomputed else None
    y, gx, gb, gbias, dy = _run_linear(device, c, p, SEED if p else None, correction=True, gram_inv=gram_inv, eps=eps)
    y0, gx0, gb0, gbias0, _ = _run_linear(device, c, p, SEED if p else None, correction=False)
    # correction only changes lora_b's gradient
    assert torch.equal(y, y0) and torch.equal(gx, gx0) and torch.equal(gbias, gbias0)
    assert gb.dtype == c["lora_b"].dtype

    x2 = c["x"].cpu().double().reshape(-1, n_in)
    if p:
        mask = reference.dropout_mask(SEED, x2.shape[0], n_in, p)
        x2 = x2 * mask / (1 - p)
    g_full = dy.cpu().double().reshape(-1, out).T @ x2  # (out, in)
    s = c["scaling"]
    a64 = c["lora_a"].cpu().double()
    g_star = torch.linalg.lstsq(a64.T, g_full.T / s).solution.T
    tol = 1e-4 if dtype == "fp32" else 1e-9
    err = (gb.cpu().double() - g_star).abs().max().item()
    assert err <= tol * g_star.abs().max().item(), f"corrected grad vs lstsq: {err:.3e}"
    # and it differs from the uncorrected gradient (the check above can fail)
    assert (gb0.cpu().double() - g_star).abs().max().item() > 10 * tol * g_star.abs().max().item()


def test_correction_bf16_adapters(device):
    """bf16 x with fp32 adapters: the corrected gradient is delivered in fp32 and is close to g*."""
    c = make_case(9, 65, 33, 8, "bf16", "fp32", device=device, seed=22)
    y, gx, gb, gbias, dy = _run_linear(device, c, 0.0, None, correction=True)
    assert gb.dtype == torch.float32
    _, d_b, _ = ref_backward(dy, c)
    want = reference.correct_grad(d_b, c["lora_a"].cpu(), c["scaling"])
    err = (gb.cpu().double() - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item()
