"""The compiled library and the pure-PyTorch backend: same schemas, same masks, same results."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import lorafa_ext
from tests.helpers import make_case, make_dy, ops, run_python, seed_tensor

OP_NAMES = ["linear", "_linear", "linear_forward", "linear_backward", "lowrank", "_lowrank", "lowrank_forward",
            "lowrank_backward", "gram_inverse", "correct_grad", "dropout_mask"]
FORCED = os.environ.get("LORAFA_FORCE_PYTHON") == "1"
compiled_only = pytest.mark.skipif(lorafa_ext.backend() == "python", reason="the compiled library is not in use")

SCHEMA_CODE = """
import json, torch, lorafa_ext
names = %r
print(json.dumps({
    "backend": lorafa_ext.backend(),
    "schemas": {n: str(getattr(torch.ops.lorafa, n).default._schema) for n in names},
    "all": sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lorafa::")),
}))
"""


def _lorafa_op_names():
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lorafa::"))


def _schemas_here():
    return {n: str(getattr(ops, n).default._schema) for n in OP_NAMES}


def test_backend_value():
    b = lorafa_ext.backend()
    assert b in ("cuda", "cpu", "python")
    if FORCED:
        assert b == "python"


def test_backend_python_when_forced():
    info = json.loads(run_python(SCHEMA_CODE % OP_NAMES, force_python=True))
    assert info["backend"] == "python"
    assert set(info["all"]) == {"lorafa::" + n for n in OP_NAMES}


@pytest.mark.skipif(FORCED, reason="LORAFA_FORCE_PYTHON=1")
def test_compiled_library_is_used_when_built():
    if importlib.util.find_spec("lorafa_ext._C") is None:
        pytest.skip("lorafa_ext._C is not built")
    assert lorafa_ext.backend() in ("cpu", "cuda")
    info = json.loads(run_python(SCHEMA_CODE % OP_NAMES))
    assert info["backend"] == lorafa_ext.backend()


@compiled_only
def test_backend_matches_registered_kernels():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for n in ("_linear", "linear_forward", "linear_backward", "gram_inverse", "correct_grad", "dropout_mask"):
        assert has(f"lorafa::{n}", "CPU"), n
        assert has(f"lorafa::{n}", "CUDA") == (lorafa_ext.backend() == "cuda"), n


def test_schemas_match_python_backend():
    """The schemas of lorafa_ext/python_backend/ops.py are those of csrc/ops.cpp, op for op."""
    from lorafa_ext.python_backend.ops import SCHEMAS

    parsed = [torch._C.parse_schema("lorafa::" + s) for s in SCHEMAS]
    python = {s.name: str(s) for s in parsed}
    if lorafa_ext.backend() != "python":
        compiled = {n: str(getattr(ops, n.split("::")[1]).default._schema) for n in _lorafa_op_names()}
    elif importlib.util.find_spec("lorafa_ext._C") is not None:
        info = json.loads(run_python(SCHEMA_CODE % OP_NAMES))
        assert info["backend"] != "python"
        compiled = {"lorafa::" + n: s for n, s in info["schemas"].items()}
        assert sorted(compiled) == info["all"]
    else:
        pytest.skip("lorafa_ext._C is not built")
    assert sorted(python) == sorted(compiled)
    for n in compiled:
        assert python[n] == compiled[n], f"{n}:\n  compiled: {compiled[n]}\n  python:   {python[n]}"


def test_documented_schemas():
    """The schemas in docs/API.md (default values aside, which print as the parser normalises them)."""
    s = _schemas_here()
    assert s["linear"].startswith(
        "lorafa::linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, "
        "float dropout_p=0., bool correction=False, int? seed=None, float eps=")
    assert s["linear"].endswith("Tensor? gram_inv=None) -> Tensor")
    assert s["linear_forward"] == (
        "lorafa::linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "float scaling, float dropout_p=0., Tensor? seed=None) -> (Tensor, Tensor)")
    assert s["linear_backward"] == (
        "lorafa::linear_backward(Tensor grad_y, Tensor z, Tensor weight, Tensor lora_a, Tensor lora_b, "
        "float scaling, float dropout_p, Tensor? seed, bool[3] output_mask) -> (Tensor, Tensor, Tensor)")
    assert s["gram_inverse"].startswith("lorafa::gram_inverse(Tensor lora_a, float eps=")
    assert s["correct_grad"] == "lorafa::correct_grad(Tensor grad_b, Tensor gram_inv, float scaling) -> Tensor"
    assert s["dropout_mask"] == "lorafa::dropout_mask(Tensor seed, int rows, int cols, float p) -> Tensor"
    assert abs(ops.linear.default._schema.arguments[9].default_value - 1e-6) < 1e-18
    assert abs(ops.gram_inverse.default._schema.arguments[1].default_value - 1e-6) < 1e-18


COMPUTE_CODE = """
import torch, lorafa_ext
ops = torch.ops.lorafa
cases = torch.load(%r)
out = []
for c in cases:
    s = torch.tensor(c["seed"], dtype=torch.int64)
    args = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], c["p"])
    y, z = ops.linear_forward(*args, s if c["p"] else None)
    bw = ops.linear_backward(c["dy"], z, c["weight"], c["lora_a"], c["lora_b"], c["scaling"], c["p"],
                             s if c["p"] else None, [True, True, True])
    x = c["x"].clone().requires_grad_(True)
    bb = c["lora_b"].clone().requires_grad_(True)
    yl = ops.linear(x, c["weight"], c["bias"], c["lora_a"], bb, c["scaling"], c["p"], c["correction"], c["seed"])
    yl.backward(c["dy"])
    mask = ops.dropout_mask(s, c["x"].shape[0], c["x"].shape[1], max(c["p"], 0.5))
    g = ops.gram_inverse(c["lora_a"], 1e-6)
    out.append(dict(y=y, z=z, dx=bw[0], dB=bw[1], db=bw[2], yl=yl.detach(), gx=x.grad, gB=bb.grad, mask=mask,
                    gram=g, cg=ops.correct_grad(bw[1], g, c["scaling"])))
torch.save(out, %r)
print(lorafa_ext.backend())
"""


def _cases():
    cases = []
    for i, (dtype, ldtype, p, corr) in enumerate([("fp32", "fp32", 0.0, False), ("fp32", "fp32", 0.3, True),
                                                  ("bf16", "fp32", 0.5, False), ("bf16", "bf16", 0.1, True),
                                                  ("fp16", "fp16", 0.0, False)]):
        c = make_case(37, 33, 19, 8, dtype, ldtype, seed=i)
        c.update(p=p, correction=corr, seed=1000 + 7 * i + (2**33 if i % 2 else 0),
                 dy=make_dy((37, 19), c["x"].dtype, "cpu", seed=i))
        cases.append(c)
    return cases


def _tol(dtype):
    return {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 2e-2)}[dtype]


@compiled_only
def test_compiled_cpu_matches_python_backend(tmp_path):
    cases = _cases()
    inp, outp = str(tmp_path / "in.pt"), str(tmp_path / "out.pt")
    torch.save(cases, inp)
    assert run_python(COMPUTE_CODE % (inp, outp), force_python=True).strip() == "python"
    python_out = torch.load(outp)
    for i, c in enumerate(cases):
        s = seed_tensor(c["seed"], "cpu")
        p = c["p"]
        args = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], p)
        y, z = ops.linear_forward(*args, s if p else None)
        bw = ops.linear_backward(c["dy"], z, c["weight"], c["lora_a"], c["lora_b"], c["scaling"], p,
                                 s if p else None, [True, True, True])
        x = c["x"].clone().requires_grad_(True)
        bb = c["lora_b"].clone().requires_grad_(True)
        yl = ops.linear(x, c["weight"], c["bias"], c["lora_a"], bb, c["scaling"], p, c["correction"], c["seed"])
        yl.backward(c["dy"])
        mask = ops.dropout_mask(s, 37, 33, max(p, 0.5))
        g = ops.gram_inverse(c["lora_a"], 1e-6)
        mine = dict(y=y, z=z, dx=bw[0], dB=bw[1], db=bw[2], yl=yl.detach(), gx=x.grad, gB=bb.grad, mask=mask,
                    gram=g, cg=ops.correct_grad(bw[1], g, c["scaling"]))
        assert torch.equal(mine["mask"], python_out[i]["mask"]), f"case {i}: dropout masks differ"
        for k, v in mine.items():
            if k == "mask":
                continue
            rtol, atol = _tol(v.dtype)
            if k in ("gB", "cg"):  # divided by s^2 and multiplied by (A A^T)^-1: a little more slack
                rtol, atol = 4 * rtol, 4 * atol * max(1.0, python_out[i][k].abs().max().item())
            assert v.dtype == python_out[i][k].dtype and v.shape == python_out[i][k].shape, f"case {i} {k}"
            torch.testing.assert_close(v, python_out[i][k], rtol=rtol, atol=atol, msg=lambda m: f"case {i} {k}: {m}")


CUDA_INIT_CODE = """
import torch, lorafa_ext
assert not torch.cuda.is_initialized(), "import initialised CUDA"
b = lorafa_ext.backend()
assert not torch.cuda.is_initialized(), "backend() initialised CUDA"
x = torch.randn(3, 4)
y = torch.ops.lorafa.linear(x, torch.randn(2, 4), None, torch.randn(1, 4), torch.randn(2, 1), 1.0, 0.5)
assert not torch.cuda.is_initialized(), "a CPU op initialised CUDA"
print(b)
"""


@pytest.mark.parametrize("force_python", [False, True])
def test_import_does_not_initialise_cuda(force_python):
    b = run_python(CUDA_INIT_CODE, force_python=force_python).strip()
    assert b in ("cuda", "cpu", "python")
    if force_python:
        assert b == "python"
