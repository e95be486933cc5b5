"""Shared helpers for the lorafa_ext test suite: inputs, the fp64 reference, "plain PyTorch in the
same precision", and the comparison rule.

Every numerical check compares an op against the fp64 reference (``lorafa_ext.reference``) with the
flash-attention rule: the op's error must be at most ``FACTOR`` times the error of plain PyTorch doing
the same math in the same precision, plus a floor that summation order alone cannot exceed (see
``assert_matches``).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import lorafa_ext  # noqa: F401  (registers torch.ops.lorafa)
from lorafa_ext import reference
from tests import emulator

ops = torch.ops.lorafa

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


class EmulatedDevice(str):
    """The emulated CUDA device (tests/emulator): the CUDA backend's kernels and host code compiled for
    the CPU. Its tensors are CPU tensors, so to torch it is the string "cpu"; its ops are
    torch.ops.lorafa_emulated (``ops_for``)."""

    def __new__(cls):
        return super().__new__(cls, "cpu")

    def __repr__(self):
        return "EMULATED"


EMULATED = EmulatedDevice()
requires_emulator = pytest.mark.skipif(emulator.skip_reason() is not None, reason=str(emulator.skip_reason()))

# The devices of the op tests: the CPU, a GPU when present, and the emulated CUDA device.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=requires_cuda),
    pytest.param(EMULATED, id="emulated", marks=[requires_emulator, pytest.mark.emulated]),
]


def ops_for(device):
    """The op library that serves ``device``: torch.ops.lorafa, or torch.ops.lorafa_emulated."""
    return emulator.load() if isinstance(device, EmulatedDevice) else ops


DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}

# (x/weight/bias dtype, lora_a/lora_b dtype)
DTYPE_PAIRS = [
    ("fp32", "fp32"),
    ("fp16", "fp16"),
    ("bf16", "bf16"),
    ("bf16", "fp32"),
    ("fp16", "fp32"),
]

FACTOR = 2.0
SCALING = 1.375


def dt(name):
    return DTYPES[name] if isinstance(name, str) else name


# --------------------------------------------------------------------------------------------------
# inputs


def _randn(shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def make_x(lead, n_in, dtype, device, gen, layout="contiguous"):
    """x of shape (*lead, in); layouts 'transposed', 'strided' and 'padded' give non-contiguous views."""
    lead = tuple(lead)
    if layout == "contiguous":
        return _randn(lead + (n_in,), gen).to(dtype=dtype, device=device)
    if layout == "transposed":
        # stored as (in, *reversed(lead)) and permuted to (*lead, in): the last dim is not unit-stride
        base = _randn((n_in,) + lead[::-1], gen).to(dtype=dtype, device=device)
        x = base.permute(*range(base.dim() - 1, -1, -1))
    elif layout == "strided":
        base = _randn(lead + (2 * n_in + 1,), gen).to(dtype=dtype, device=device)
        x = base[..., 1::2]
    elif layout == "padded":
        # unit column stride, rows padded: used in place (leading dimension > in), never copied
        base = _randn(lead + (n_in + 5,), gen).to(dtype=dtype, device=device)
        x = base[..., :n_in]
    else:
        raise ValueError(layout)
    assert x.shape == lead + (n_in,)
    assert not x.is_contiguous() or math.prod(lead) <= 1
    return x


def make_case(lead, n_in, out, r, dtype="fp32", lora_dtype=None, device="cpu", bias=True, seed=0,
              layout="contiguous", scaling=SCALING):
    """Random, nonzero inputs (B is random, not the usual zero init)."""
    dtype = dt(dtype)
    lora_dtype = dt(lora_dtype) if lora_dtype is not None else dtype
    if isinstance(lead, int):
        lead = (lead,)
    gen = torch.Generator().manual_seed(1000 + seed)
    x = make_x(lead, n_in, dtype, device, gen, layout)
    w = (_randn((out, n_in), gen) / math.sqrt(n_in)).to(dtype=dtype, device=device)
    b = (_randn((out,), gen) * 0.5).to(dtype=dtype, device=device) if bias else None
    a = (_randn((r, n_in), gen) / math.sqrt(n_in)).to(dtype=lora_dtype, device=device)
    bb = (_randn((out, r), gen) / math.sqrt(r)).to(dtype=lora_dtype, device=device)
    return dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb, scaling=scaling)


def make_dy(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(5000 + seed)
    return _randn(shape, gen).to(dtype=dt(dtype), device=device)


def seed_tensor(seed, device):
    return torch.tensor(seed, dtype=torch.int64, device=device)


def flat_rows(x):
    return math.prod(x.shape[:-1])


def op_mask(seed, rows, cols, p, device):
    if p == 0.0:
        return None
    return ops_for(device).dropout_mask(seed_tensor(seed, device), rows, cols, p)


# --------------------------------------------------------------------------------------------------
# reference (fp64, CPU) and "plain PyTorch in the same precision"


def _cpu(t):
    return None if t is None else t.detach().cpu()


def ref_forward(c, mask=None, p=0.0):
    return reference.forward(_cpu(c["x"]), _cpu(c["weight"]), _cpu(c["bias"]), _cpu(c["lora_a"]),
                             _cpu(c["lora_b"]), c["scaling"], _cpu(mask), p)


def ref_backward(dy, c, mask=None, p=0.0):
    return reference.backward(_cpu(dy), _cpu(c["x"]), _cpu(c["weight"]), _cpu(c["lora_a"]),
                              _cpu(c["lora_b"]), c["scaling"], _cpu(mask), p)


def _plain_drop(t, mask, p):
    if mask is None or p == 0.0:
        return t
    return t * mask.to(t.dtype) * (1.0 / (1.0 - p))


def plain_forward(c, mask=None, p=0.0):
    """Same math with torch ops: base path in x's dtype, LoRA path in promote(x, lora) dtype."""
    x, w, b, a, bb, s = c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"]
    n_in, out = w.shape[1], w.shape[0]
    cd = torch.promote_types(x.dtype, a.dtype)
    x2 = x.reshape(-1, n_in)
    z = _plain_drop(x2.to(cd), mask, p) @ a.to(cd).t()
    low = (z @ bb.to(cd).t()) * s
    y = torch.nn.functional.linear(x2, w, b) + low.to(x.dtype)
    return y.reshape(*x.shape[:-1], out), z


def plain_backward(dy, z, c, mask=None, p=0.0):
    w, a, bb, s = c["weight"], c["lora_a"], c["lora_b"], c["scaling"]
    out, n_in = w.shape
    cd = torch.promote_types(dy.dtype, a.dtype)
    dy2 = dy.reshape(-1, out)
    t = dy2.to(cd) @ bb.to(cd)
    low = _plain_drop((t @ a.to(cd)) * s, mask, p)
    dx = ((dy2 @ w).to(cd) + low).to(dy.dtype)
    d_b = (s * (dy2.to(cd).t() @ z.to(cd))).to(bb.dtype)
    d_bias = dy2.sum(0)
    return dx.reshape(*dy.shape[:-1], n_in), d_b, d_bias


def plain_gram_inverse(a, eps):
    """(A A^T + delta I)^-1 with torch.linalg.inv in promote(A, fp32): independent of our gram_inverse."""
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    g = a @ a.T
    r = g.shape[0]
    return torch.linalg.inv(g + (eps * torch.trace(g) / r) * torch.eye(r, dtype=g.dtype, device=g.device))


# --------------------------------------------------------------------------------------------------
# comparison


def max_err(a, ref):
    if a.numel() == 0:
        return 0.0
    return (a.detach().cpu().double() - ref.detach().cpu().double()).abs().max().item()


def assert_matches(ours, plain, ref, name="", *, k, dtype=None, factor=FACTOR, ulps=1.0, rtol_abs=None):
    """|ours - ref| <= factor * |plain - ref| + floor, in max norms, with
    floor = (ulps * eps(ours.dtype) + 2 sqrt(k) * eps_acc) * max|ref|.

    ``k``: the length of the reductions behind the output (the inner dimension of its products; 1
    for an elementwise result). The floor covers what summation order alone can do: plain PyTorch
    and the op may sum the k terms in different orders (blocked, split, vectorised sums differ
    between CPUs and GPUs), and when plain PyTorch's error is lucky, 2x of it could be less than a
    correct op's rounding. Rounding errors of a k-term sum grow like sqrt(k) units of the
    accumulation precision eps_acc (fp32; fp64 for fp64 outputs) on random inputs: 2 sqrt(k) eps_acc
    is about 8e-6 relative at k = 1027 in fp32, far below a TF32 product (1e-3) or a single wrong
    term. ``dtype``: the expected dtype of ``ours`` (checked). ``rtol_abs``: an additional upper bound
    relative to max|ref| (tight fp32 checks)."""
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if dtype is not None:
        assert ours.dtype == dtype, f"{name}: dtype {ours.dtype} != {dtype}"
    if ref.numel() == 0:
        return
    scale = ref.abs().max().item()
    err = max_err(ours, ref)
    perr = max_err(plain, ref) if plain is not None else 0.0
    eps = torch.finfo(ours.dtype).eps if ours.dtype.is_floating_point else 0.0
    eps_acc = torch.finfo(torch.float64 if ours.dtype == torch.float64 else torch.float32).eps
    floor = (ulps * eps + 2.0 * math.sqrt(k) * eps_acc) * scale
    bound = factor * perr + floor
    assert err <= bound, (
        f"{name}: max error {err:.3e} vs reference exceeds {factor} x plain-PyTorch error {perr:.3e} "
        f"+ floor {floor:.3e} ({ulps} ulp, k = {k}); max|ref| = {scale:.3e}"
    )
    if rtol_abs is not None:
        assert err <= rtol_abs * max(scale, 1e-30), f"{name}: max error {err:.3e} > {rtol_abs} * {scale:.3e}"


def fp32_tight(dtype):
    """Extra absolute bound (relative to max|ref|) for full-precision outputs."""
    return {torch.float32: 2e-6, torch.float64: 1e-12}.get(dtype)


# --------------------------------------------------------------------------------------------------
# subprocess


def run_python(code, force_python=False, timeout=240, env_extra=None):
    """Run ``code`` in a fresh interpreter from the repo root; return stdout (fails on a non-zero exit)."""
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if force_python:
        env["LORAFA_FORCE_PYTHON"] = "1"
    else:
        env.pop("LORAFA_FORCE_PYTHON", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout
