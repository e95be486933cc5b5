"""Checks of the CUDA backend, on a GPU and on the emulated CUDA device (tests/emulator): awkward
shapes with tile tails, layouts, dropout against the mask, determinism; on a GPU also CUDA graphs and
streams. The emulated device runs smaller shapes of the same classes."""
from __future__ import annotations

import pytest
import torch

from tests import emulator
from tests.helpers import (
    DTYPE_PAIRS,
    EMULATED,
    assert_matches,
    make_case,
    make_dy,
    ops,
    ops_for,
    plain_backward,
    plain_forward,
    plain_gram_inverse,
    requires_cuda,
    requires_emulator,
    seed_tensor,
)
from lorafa_ext import reference

SEED = 8675309
ON_GPU = [pytest.param("cuda", marks=requires_cuda)]
ON_EMULATED = [pytest.param(EMULATED, id="emulated", marks=[requires_emulator, pytest.mark.emulated])]

# (N, in, out, r). GPU: N in 1, 7, 1000, 4097; in/out not multiples of 8; r up to 128. Emulated: N in
# 1, 7, 129, 1000, in/out with tails of the 32- and 64-wide tiles (33, 63, 65, 66, 97, 129, 130), r across a
# rank tile (33) and up to 64.
GPU_SHAPES = [
    (n, 1000 if i % 2 else 1027, 1027 if i % 2 else 1000, r)
    for i, (n, r) in enumerate([(n, r) for n in (1, 7, 1000, 4097) for r in (1, 8, 16, 64, 128)])
]
EMULATED_SHAPES = [(1, 65, 33, 1), (7, 66, 130, 8), (129, 97, 63, 16), (129, 63, 97, 33), (1000, 129, 65, 16),
                   (300, 65, 129, 64)]


def _on_both(gpu, emulated):
    """Parameters (dev, value): each GPU value on "cuda", each emulated one on EMULATED."""
    return ([pytest.param("cuda", v, marks=requires_cuda, id=f"cuda-{v}") for v in gpu]
            + [pytest.param(EMULATED, v, marks=[requires_emulator, pytest.mark.emulated], id=f"emulated-{v}")
               for v in emulated])


def _ref_fwd(c, mask, p):
    # fp64 reference, on the GPU (the shapes here are too large for a quick CPU fp64 run)
    return reference.forward(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], mask, p)


def _ref_bwd(dy, c, mask, p):
    return reference.backward(dy, c["x"], c["weight"], c["lora_a"], c["lora_b"], c["scaling"], mask, p)


def _mask(dev, seed, rows, cols, p):
    return ops_for(dev).dropout_mask(seed_tensor(seed, dev), rows, cols, p) if p else None


def _check_all(dev, c, p, seed, correction=False):
    ops = ops_for(dev)
    x = c["x"]
    rows, n_in = x.reshape(-1, x.shape[-1]).shape
    r, out = c["lora_a"].shape[0], c["weight"].shape[0]
    mask = _mask(dev, seed, rows, n_in, p)
    y_ref, z_ref = _ref_fwd(c, mask, p)
    y_pl, z_pl = plain_forward(c, mask, p)
    zdt = torch.promote_types(x.dtype, c["lora_a"].dtype)

    # the ops
    y, z = ops.linear_forward(x, c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], p,
                              seed_tensor(seed, dev) if p else None)
    assert_matches(y, y_pl, y_ref, "y", dtype=x.dtype, k=n_in)
    assert_matches(z, z_pl, z_ref, "z", dtype=zdt, k=n_in)
    assert z.shape == (rows, r)

    dy = make_dy(y.shape, x.dtype, dev, seed=3)
    dx_ref, db_ref, dbias_ref = _ref_bwd(dy, c, mask, p)
    z_in = z_ref.to(zdt)
    dx_pl, db_pl, dbias_pl = plain_backward(dy, z_in, c, mask, p)
    dx, d_b, d_bias = ops.linear_backward(dy, z_in, c["weight"], c["lora_a"], c["lora_b"], c["scaling"], p,
                                          seed_tensor(seed, dev) if p else None, [True, True, True])
    assert_matches(dx, dx_pl, dx_ref, "dx", dtype=x.dtype, k=out)
    assert_matches(d_b, db_pl, db_ref, "dB", dtype=c["lora_b"].dtype, k=rows)
    assert_matches(d_bias, dbias_pl, dbias_ref, "dbias", dtype=x.dtype, k=rows)

    # autograd
    xg = x.detach().requires_grad_(True)
    bb = c["lora_b"].detach().clone().requires_grad_(True)
    b = c["bias"].detach().clone().requires_grad_(True)
    yl = ops.linear(xg, c["weight"], b, c["lora_a"], bb, c["scaling"], p, correction, seed if p else None)
    yl.backward(dy)
    assert_matches(yl.detach(), y_pl, y_ref, "linear y", dtype=x.dtype, k=n_in)
    dx_pl2, db_pl2, _ = plain_backward(dy, z_pl, c, mask, p)
    assert_matches(xg.grad, dx_pl2, dx_ref, "linear dx", dtype=x.dtype, k=out)
    assert_matches(b.grad, dbias_pl, dbias_ref, "linear dbias", dtype=x.dtype, k=rows)
    # dB here is built from the op's own z (n_in-long sums) as well as from rows-long sums
    if not correction:
        assert_matches(bb.grad, db_pl2, db_ref, "linear dB", dtype=c["lora_b"].dtype, k=rows + n_in)
    else:
        g_ref = reference.correct_grad(db_ref, c["lora_a"], c["scaling"])
        # plain: torch.linalg.inv of the regularised Gram matrix (independent of our gram_inverse)
        g_pl = ((db_pl2.float() @ plain_gram_inverse(c["lora_a"], 1e-6)) / c["scaling"] ** 2).to(bb.dtype)
        assert_matches(bb.grad, g_pl, g_ref, "linear corrected dB", dtype=c["lora_b"].dtype, ulps=4,
                       k=rows + n_in)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("dev,shape", _on_both(GPU_SHAPES, EMULATED_SHAPES))
def test_cuda_shapes_dtypes(dev, shape, dtypes, p):
    n, n_in, out, r = shape
    c = make_case(n, n_in, out, r, *dtypes, device=dev, seed=n + r)
    _check_all(dev, c, p, SEED)


# r = 128: the one-block Gram inverse loops over r * r > 1024 elements
@pytest.mark.parametrize("dtypes", [("bf16", "fp32"), ("fp32", "fp32"), ("fp16", "fp16")], ids=str)
@pytest.mark.parametrize("dev,shape", _on_both([(1000, 1027, 1000, 16), (1000, 1027, 1000, 128)],
                                               [(257, 129, 65, 16), (129, 513, 65, 128)]))
def test_cuda_correction(dev, shape, dtypes):
    n, n_in, out, r = shape
    c = make_case(n, n_in, out, r, *dtypes, device=dev, seed=1)
    _check_all(dev, c, 0.1, SEED, correction=True)


@pytest.mark.parametrize("layout", ["transposed", "strided", "padded"])
@pytest.mark.parametrize("dtypes", [("bf16", "fp32"), ("fp32", "fp32"), ("fp16", "fp16")], ids=str)
@pytest.mark.parametrize("dev,shape", _on_both([((1000,), 1027, 1000), ((7, 143), 1027, 1000)],
                                               [((129,), 129, 65), ((7, 19), 65, 97)]))
def test_cuda_noncontiguous(dev, shape, layout, dtypes):
    lead, n_in, out = shape
    c = make_case(lead, n_in, out, 16, *dtypes, device=dev, seed=2, layout=layout)
    assert not c["x"].is_contiguous()
    _check_all(dev, c, 0.25, SEED + 1)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dev", ON_GPU + ON_EMULATED)
def test_cuda_dropout_mask(dev, p):
    m = ops_for(dev).dropout_mask(seed_tensor(SEED, dev), 1000, 1027, p)
    kept = m.double().mean().item()
    sigma = (p * (1 - p) / m.numel()) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma
    # a corner of the mask, bit for bit against the pure-Python definition (including a row
    # boundary that falls inside a Philox block)
    ref = reference.dropout_mask(SEED, 3, 1027, p)
    assert torch.equal(m[:3].cpu(), ref)
    # same as the CPU backend on the whole mask
    assert torch.equal(m.cpu(), ops.dropout_mask(seed_tensor(SEED, "cpu"), 1000, 1027, p))


@pytest.mark.parametrize("dtypes", [("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")], ids=str)
@pytest.mark.parametrize("dev", ON_GPU + ON_EMULATED)
def test_cuda_matches_cpu_backend(dev, dtypes):
    """The CUDA kernels against the CPU backend on the same inputs (moderate shape)."""
    c = make_case(257, 129, 65, 16, *dtypes, seed=3)
    cc = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    args = ("x", "weight", "bias", "lora_a", "lora_b", "scaling")
    y_cpu, z_cpu = ops.linear_forward(*(c[k] for k in args), 0.3, seed_tensor(5, "cpu"))
    y_gpu, z_gpu = ops_for(dev).linear_forward(*(cc[k] for k in args), 0.3, seed_tensor(5, dev))
    mask = ops.dropout_mask(seed_tensor(5, "cpu"), 257, 129, 0.3)
    y_ref, z_ref = reference.forward(*(c[k] for k in args), mask, 0.3)
    y_pl, z_pl = plain_forward(c, mask, 0.3)
    # both within the 2x rule of the same reference
    assert_matches(y_gpu, y_pl, y_ref, "y gpu", dtype=c["x"].dtype, k=129)
    assert_matches(y_cpu, y_pl, y_ref, "y cpu", dtype=c["x"].dtype, k=129)
    assert_matches(z_gpu, z_pl, z_ref, "z gpu", k=129)


def _run(dev, c, p, seed):
    ops = ops_for(dev)
    x = c["x"].detach().requires_grad_(True)
    bb = c["lora_b"].detach().clone().requires_grad_(True)
    b = c["bias"].detach().clone().requires_grad_(True)
    y = ops.linear(x, c["weight"], b, c["lora_a"], bb, c["scaling"], p, False, seed)
    y.backward(make_dy(y.shape, y.dtype, dev, seed=4))
    y2, z2 = ops.linear_forward(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], p,
                                seed_tensor(seed, dev))
    return [y.detach(), x.grad, bb.grad, b.grad, y2, z2]


@requires_cuda
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtypes", [("bf16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")], ids=str)
def test_cuda_determinism(dtypes, deterministic):
    c = make_case(4097, 1027, 1000, 16, *dtypes, device="cuda", seed=5)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        r1 = _run("cuda", c, 0.1, 42)
        r2 = _run("cuda", c, 0.1, 42)
    finally:
        torch.use_deterministic_algorithms(prev)
    for i, (a, b) in enumerate(zip(r1, r2)):
        assert torch.equal(a, b), f"output {i} differs between two identical runs"


@requires_emulator
@pytest.mark.emulated
@pytest.mark.parametrize("dtypes", [("bf16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")], ids=str)
def test_emulated_schedules_agree_bitwise(dtypes):
    """Every output is the same bit for bit whatever order the emulated device runs the blocks and
    the threads in (fixed-order reductions; no result depends on a race). N = 1000 cuts grad_b's rows
    into 7 splits."""
    c = make_case(1000, 129, 65, 16, *dtypes, device=EMULATED, seed=5)
    control = emulator.control()
    runs = []
    try:
        for schedule in (1, 2, 3):
            control.set_schedule_seed(schedule)
            runs.append(_run(EMULATED, c, 0.1, 42))
    finally:
        control.set_schedule_seed(0)
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            assert torch.equal(a, b), f"output {i} differs between two schedules"


@requires_cuda
def test_cuda_graph_capture():
    dev = "cuda"
    c = make_case(513, 1027, 1000, 16, "bf16", "fp32", device=dev, seed=6)
    w, a, s, p = c["weight"], c["lora_a"], c["scaling"], 0.5
    x = c["x"].detach().clone().requires_grad_(True)
    bb = c["lora_b"].detach().clone().requires_grad_(True)
    b = c["bias"].detach().clone().requires_grad_(True)
    dy = make_dy((513, 1000), torch.bfloat16, dev, seed=7)

    def step():
        y = ops.linear(x, w, b, a, bb, s, p, False, None)  # the seed is drawn inside, on the device
        y.backward(dy)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            x.grad = bb.grad = b.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)

    x.grad = bb.grad = b.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    statics = (y_static, x.grad, bb.grad, b.grad)

    def replay(k):
        torch.cuda.manual_seed(k)
        graph.replay()
        torch.cuda.synchronize()
        return [t.detach().clone() for t in statics]

    def eager(k):
        x.grad = bb.grad = b.grad = None
        torch.cuda.manual_seed(k)
        y = step()
        torch.cuda.synchronize()
        return [y.detach().clone(), x.grad.clone(), bb.grad.clone(), b.grad.clone()]

    g1, g1b, g2 = replay(1), replay(1), replay(2)
    for t1, t2 in zip(g1, g1b):
        assert torch.equal(t1, t2), "two replays from the same generator state differ"
    assert not torch.equal(g1[0], g2[0]), "replays with different seeds gave the same dropout"
    assert all(bool(torch.isfinite(t.float()).all()) for t in g1)
    # a replay computes what the eager code computes from the same generator state
    e1 = eager(1)
    for name, t1, t2 in zip(("y", "dx", "dB", "dbias"), g1, e1):
        # a different dropout mask would be far outside the default tolerances
        torch.testing.assert_close(t1, t2, msg=lambda m: f"{name}: {m}")


@requires_cuda
@pytest.mark.parametrize("dtypes", [("bf16", "fp32"), ("fp32", "fp32")], ids=str)
def test_cuda_current_stream(dtypes):
    """Ops must launch on the current stream: inputs written late on a busy side stream must be seen.
    (The emulated device checks every launch's stream instead.)"""
    dev = "cuda"
    c = make_case(1000, 1027, 1000, 16, *dtypes, device=dev, seed=8)
    dy = make_dy((1000, 1000), c["x"].dtype, dev, seed=9)
    seed_t = seed_tensor(7, dev)
    p, s = 0.25, c["scaling"]

    def run(c):
        x = c["x"].detach().requires_grad_(True)
        bb = c["lora_b"].detach().clone().requires_grad_(True)
        b = c["bias"].detach().clone().requires_grad_(True)
        y = ops.linear(x, c["weight"], b, c["lora_a"], bb, s, p, False, 7)
        y.backward(dy)
        y2, z2 = ops.linear_forward(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], s, p, seed_t)
        bw = ops.linear_backward(dy, z2, c["weight"], c["lora_a"], c["lora_b"], s, p, seed_t, [True] * 3)
        g = ops.gram_inverse(c["lora_a"], 1e-6)
        return [y.detach(), x.grad, bb.grad, b.grad, y2, z2, *bw, g, ops.correct_grad(bw[1], g, s),
                ops.dropout_mask(seed_t, 1000, 1027, p)]

    want = run(c)
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # keep the side stream busy so that the inputs below are written late
        c2 = {k: (v * 1 if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
        got = run(c2)
    side.synchronize()
    torch.cuda.synchronize()
    for i, (g, w) in enumerate(zip(got, want)):
        # reading the inputs before the side stream wrote them would give garbage, far outside these
        # tolerances (which only allow for non-bitwise-reproducible reductions)
        torch.testing.assert_close(g, w, msg=lambda m: f"output {i}: {m}")
