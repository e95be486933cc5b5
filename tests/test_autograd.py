"""gradcheck, torch.library.opcheck, what `linear` saves for backward, frozen-parameter errors."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import _cpu, make_case, make_dy, op_mask, ops, ops_for, ref_backward, seed_tensor
from lorafa_ext import reference


# --------------------------------------------------------------------------------------------------
# gradcheck


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p,seed", [(0.0, None), (0.4, 123), (0.4, 2**35 + 9)])
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=str)
def test_gradcheck(device, lead, p, seed, bias):
    ops = ops_for(device)
    c = make_case(lead, 6, 4, 3, "fp64", device=device, bias=bias, seed=1)
    x = c["x"].detach().requires_grad_(True)
    bb = c["lora_b"].detach().requires_grad_(True)
    inputs = [x, bb]
    if bias:
        inputs.append(c["bias"].detach().requires_grad_(True))

    def f(x, bb, *b):
        return ops.linear(x, c["weight"], b[0] if b else None, c["lora_a"], bb, c["scaling"], p, False, seed)

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_detects_correction(device):
    """Sanity of the gradcheck above: with correction=True, lora_b's gradient is not the true one."""
    ops = ops_for(device)
    c = make_case(5, 6, 4, 3, "fp64", device=device, seed=2)
    bb = c["lora_b"].detach().requires_grad_(True)

    def f(bb):
        return ops.linear(c["x"], c["weight"], c["bias"], c["lora_a"], bb, c["scaling"], 0.0, True)

    assert not torch.autograd.gradcheck(f, (bb,), eps=1e-6, atol=1e-8, rtol=1e-6, raise_exception=False)


@pytest.mark.parametrize("wanted", ["x", "lora_b", "bias", "x+lora_b", "lora_b+bias", "all"])
@pytest.mark.parametrize("p,correction", [(0.0, False), (0.3, False), (0.3, True)])
def test_grad_subsets(device, wanted, p, correction):
    """torch.autograd.grad on any subset of the differentiable inputs (the kernel computes only the
    requested gradients) gives the reference values, with or without a bias and the correction."""
    ops = ops_for(device)
    c = make_case((3, 4), 11, 6, 3, "fp64", device=device, seed=8)
    leaves = {k: c[k].detach().requires_grad_(True) for k in ("x", "lora_b", "bias")}
    names = ["x", "lora_b", "bias"] if wanted == "all" else wanted.split("+")
    y = ops.linear(leaves["x"], c["weight"], leaves["bias"], c["lora_a"], leaves["lora_b"], c["scaling"],
                   p, correction, 77)
    dy = make_dy(y.shape, y.dtype, device, seed=3)
    got = dict(zip(names, torch.autograd.grad(y, [leaves[k] for k in names], dy)))
    mask = op_mask(77, 12, 11, p, device)
    dx, d_b, d_bias = ref_backward(dy, c, mask, p)
    if correction:
        d_b = reference.correct_grad(d_b, _cpu(c["lora_a"]), c["scaling"])
    want = {"x": dx, "lora_b": d_b, "bias": d_bias}
    for k in names:
        torch.testing.assert_close(got[k].cpu(), want[k], rtol=1e-10, atol=1e-10, msg=k)


# --------------------------------------------------------------------------------------------------
# opcheck


def _case(device, lead=(7,), n_in=9, out=5, r=3, dtype="fp32", lora_dtype=None, bias=True, seed=0, grad=False):
    c = make_case(lead, n_in, out, r, dtype, lora_dtype, device=device, bias=bias, seed=seed)
    if grad:
        c["x"].requires_grad_(True)
        c["lora_b"].requires_grad_(True)
        if c["bias"] is not None:
            c["bias"].requires_grad_(True)
    return c


def _linear_samples(device):
    ops = ops_for(device)
    out = []
    for grad in (False, True):
        c = _case(device, grad=grad)
        base = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"])
        out.append((base, {}))
        out.append((base, dict(dropout_p=0.3, seed=42)))
        out.append((base, dict(dropout_p=0.3, seed=42, correction=True)))
    c = _case(device, lead=(2, 3), dtype="bf16", lora_dtype="fp32", bias=False, grad=True, seed=1)
    out.append(((c["x"], c["weight"], None, c["lora_a"], c["lora_b"], 0.5, 0.1, True, 7), {}))
    c = _case(device, r=2, grad=True, seed=2)
    g = ops.gram_inverse(c["lora_a"], 1e-6)
    out.append(((c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], 2.0),
                dict(correction=True, gram_inv=g, eps=1e-4)))
    return out


def _forward_samples(device):
    out = []
    c = _case(device)
    base = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"])
    out.append((base, {}))
    out.append((base + (0.25, seed_tensor(5, device)), {}))
    c = _case(device, lead=(2, 3), dtype="bf16", lora_dtype="fp32", bias=False, seed=1)
    out.append(((c["x"], c["weight"], None, c["lora_a"], c["lora_b"], 0.5), dict(dropout_p=0.5,
                                                                                   seed=seed_tensor(-3, device))))
    c = _case(device, dtype="fp16", seed=2)
    out.append(((c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], 1.0), {}))
    return out


def _backward_samples(device):
    out = []
    for dtype, lora_dtype, p, mask in (("fp32", None, 0.0, [True, True, True]),
                                       ("fp32", None, 0.25, [True, True, True]),
                                       ("fp32", None, 0.25, [True, False, True]),
                                       ("bf16", "fp32", 0.5, [False, True, False]),
                                       ("fp16", None, 0.0, [True, True, False])):
        c = _case(device, lead=(2, 3), dtype=dtype, lora_dtype=lora_dtype)
        zdt = torch.promote_types(c["x"].dtype, c["lora_a"].dtype)
        z = torch.randn(6, 3, dtype=zdt, device=device)
        dy = make_dy((2, 3, 5), c["x"].dtype, device)
        seed = seed_tensor(99, device) if p else None
        out.append(((dy, z, c["weight"], c["lora_a"], c["lora_b"], c["scaling"], p, seed, mask), {}))
    return out


def _gram_samples(device):
    out = []
    for dtype, r, n_in, kw in (("fp32", 3, 9, {}), ("bf16", 4, 7, dict(eps=1e-3)), ("fp64", 1, 5, {}),
                               ("fp16", 8, 4, dict(eps=1e-2))):
        out.append(((_case(device, n_in=n_in, r=r, dtype=dtype)["lora_a"],), kw))
    return out


def _correct_samples(device):
    ops = ops_for(device)
    out = []
    for dtype, gdtype in (("fp32", torch.float32), ("bf16", torch.float32), ("fp64", torch.float64)):
        c = _case(device, dtype=dtype)
        g = ops.gram_inverse(c["lora_a"].to(gdtype), 1e-6)
        out.append(((c["lora_b"], g, 0.5), {}))
    return out


def _mask_samples(device):
    return [((seed_tensor(s, device), rows, cols, p), {})
            for s, rows, cols, p in ((1, 5, 7, 0.5), (2**40, 3, 3, 0.1), (-1, 1, 9, 0.0), (7, 0, 4, 0.3))]


def _private_samples(device):
    """Samples for lorafa::_linear, built from its registered schema by argument name."""
    ops = ops_for(device)
    schema = ops._linear.default._schema
    samples = []
    for grad, p in ((False, 0.0), (True, 0.0), (True, 0.3)):
        c = _case(device, grad=grad, seed=3)
        values = dict(c, dropout_p=p, correction=False, eps=1e-6, gram_inv=None)
        args = []
        for a in schema.arguments:
            if a.name == "seed":
                if p == 0.0:
                    args.append(None)
                elif "Tensor" in str(a.type):
                    args.append(seed_tensor(11, device))
                else:
                    args.append(11)
            elif a.name in values:
                args.append(values[a.name])
            elif a.has_default_value():
                break
            else:
                pytest.skip(f"unknown argument {a.name} of lorafa::_linear")
        samples.append((tuple(args), {}))
    return samples


SAMPLES = {
    "linear": _linear_samples,
    "_linear": _private_samples,
    "linear_forward": _forward_samples,
    "linear_backward": _backward_samples,
    "gram_inverse": _gram_samples,
    "correct_grad": _correct_samples,
    "dropout_mask": _mask_samples,
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_opcheck(device, name):
    op = getattr(ops, name).default
    samples = SAMPLES[name](device)
    assert len(samples) >= 3
    failures = []
    for i, (args, kwargs) in enumerate(samples):
        try:
            torch.library.opcheck(op, args, kwargs)
        except Exception as err:  # report every failing sample, not just the first
            desc = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
            failures.append(f"sample {i} args={desc} kwargs={kwargs}: {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------------
# saved tensors


@pytest.mark.parametrize("correction", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=str)
def test_saved_tensors(device, lead, p, correction):
    ops = ops_for(device)
    n_in, out, r, rows = 10, 7, 3, 6  # N = 6 differs from out and r; no parameter has N * in elements
    c = make_case(lead, n_in, out, r, "fp32", device=device, seed=4)
    x = c["x"].detach().requires_grad_(True)
    bb = c["lora_b"].detach().clone().requires_grad_(True)
    b = c["bias"].detach().clone().requires_grad_(True)
    params = [c["weight"], c["lora_a"], bb, b]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.linear(x, c["weight"], b, c["lora_a"], bb, c["scaling"], p, correction, 5 if p else None)
    y.backward(make_dy(y.shape, y.dtype, device))
    assert x.grad is not None and bb.grad is not None

    def is_param(t):
        return any(t.data_ptr() == q.data_ptr() and t.shape == q.shape for q in params if q.numel())

    assert saved, "linear saved nothing (z is needed for dB)"
    big = [tuple(t.shape) for t in saved if t.numel() == rows * n_in or (not is_param(t) and t.numel() >= rows * n_in)]
    assert not big, f"linear saved activations with >= N*in elements: {big}"
    z_like = [t for t in saved if tuple(t.shape) == (rows, r)]
    assert len(z_like) == 1, f"expected exactly one saved (N, r) tensor, got shapes {[tuple(t.shape) for t in saved]}"
    others = [t for t in saved if not is_param(t) and tuple(t.shape) != (rows, r)]
    for t in others:
        # a 0-dim seed tensor, and with correction possibly an (r, r) gram inverse
        ok = t.numel() <= 1 or (correction and tuple(t.shape) == (r, r))
        assert ok, f"unexpected saved tensor of shape {tuple(t.shape)} dtype {t.dtype}"
    non_param_elems = sum(t.numel() for t in saved if not is_param(t))
    assert non_param_elems <= rows * r + r * r + 1


# --------------------------------------------------------------------------------------------------
# frozen parameters


@pytest.mark.parametrize("name", ["weight", "lora_a"])
def test_frozen_parameter_requires_grad_is_an_error(device, name):
    ops = ops_for(device)
    c = make_case(4, 9, 5, 2, "fp32", device=device, seed=6)
    c[name] = c[name].detach().requires_grad_(True)
    x = c["x"].detach().requires_grad_(True)
    with pytest.raises(RuntimeError, match=name):
        y = ops.linear(x, c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"])
        y.sum().backward()
