"""Clear errors that name the offending argument.

The bad inputs are data (``bad_inputs``): each is an op of ``torch.ops.lorafa``, its arguments and a
pattern that the error must match (loosely here: the argument's name). tests/test_check_messages.py
sends the same inputs through every check layer and requires the same message from each.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import make_case, ops, ops_for, requires_cuda, seed_tensor

ERR = (RuntimeError, ValueError)
MASK3 = [True, True, True]
MASK2 = [True, True]


def _good(device="cpu", dtype="fp32", lora_dtype=None):
    return make_case(4, 9, 5, 2, dtype, lora_dtype, device=device, seed=1)


def _args(c):
    return c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"]


def _forward_and_linear(cases, name, c, match, p=0.0, seed=None):
    """The forward op and the autograd entry point with the same (bad) arguments."""
    cases[f"{name}-linear_forward"] = ("linear_forward", (*_args(c), p, seed), match)
    cases[f"{name}-linear"] = ("linear", (*_args(c), p, False, 1 if p else None), match)


def _lowrank_args(c):
    return c["x"], c["lora_a"], c["lora_b"], c["scaling"]


def _lowrank_forward_and_lowrank(cases, name, c, match, p=0.0, seed=None):
    """The adapter-branch forward op and its autograd entry point with the same (bad) arguments."""
    cases[f"{name}-lowrank_forward"] = ("lowrank_forward", (*_lowrank_args(c), p, seed), match)
    cases[f"{name}-lowrank"] = ("lowrank", (*_lowrank_args(c), p, False, 1 if p else None), match)


def _with(device, **changes):
    c = _good(device)
    for k, v in changes.items():
        c[k] = v(c) if callable(v) else v
    return c


def bad_inputs(device="cpu"):
    """{id: (op name, args, pattern the error must match)} for inputs on ``device``."""
    d = device
    cases = {}

    def randn(*shape):
        return torch.randn(shape, device=d)

    _forward_and_linear(cases, "x_rank0", _with(d, x=torch.tensor(1.0, device=d)), r"\bx\b")
    for shape in [(5,), (5, 9, 1)]:
        _forward_and_linear(cases, f"weight_shape{shape}", _with(d, weight=randn(*shape)), "weight")
    # weight and lora_a agree on in = 9
    for shape in [(4, 8), (2, 2, 10)]:
        _forward_and_linear(cases, f"x_shape{shape}", _with(d, x=randn(*shape)), r"weight|\bx\b")
    _forward_and_linear(cases, "lora_a_in", _with(d, lora_a=randn(2, 8)), "lora_a")
    for shape in [(6, 2), (5, 3), (5,), (2, 5)]:
        _forward_and_linear(cases, f"lora_b_shape{shape}", _with(d, lora_b=randn(*shape)), "lora_b")
    for shape in [(4,), (6,), (1, 5), ()]:
        _forward_and_linear(cases, f"bias_shape{shape}", _with(d, bias=randn(*shape)), "bias")
    rank0 = _with(d, lora_a=randn(0, 9), lora_b=randn(5, 0))
    _forward_and_linear(cases, "rank0", rank0, r"lora_a|lora_b|rank|\br\b")
    cases["rank0-gram_inverse"] = ("gram_inverse", (rank0["lora_a"], 1e-6), r"lora_a|rank|\br\b")
    for wdtype in [torch.float16, torch.bfloat16, torch.float64]:
        c = _with(d, weight=lambda c: c["weight"].to(wdtype))
        _forward_and_linear(cases, f"weight_dtype_{wdtype}", c, "weight")
    _forward_and_linear(cases, "bias_dtype", _with(d, bias=lambda c: c["bias"].to(torch.float16)), "bias")
    for xdtype, adtype, bdtype in [
        ("fp32", torch.float16, torch.float16),  # fp16 adapters with fp32 x
        ("bf16", torch.float16, torch.float16),  # fp16 adapters with bf16 x
        ("fp16", torch.bfloat16, torch.bfloat16),
        ("bf16", torch.float32, torch.bfloat16),  # lora_a and lora_b disagree
        ("fp32", torch.float64, torch.float64),  # fp64 adapters with fp32 x
    ]:
        c = _good(d, xdtype)
        c["lora_a"], c["lora_b"] = c["lora_a"].to(adtype), c["lora_b"].to(bdtype)
        _forward_and_linear(cases, f"lora_dtype_{xdtype}_{adtype}_{bdtype}", c, "lora")

    c = _good(d)
    dy, z = randn(4, 5), randn(4, 2)
    params = (c["weight"], c["lora_a"], c["lora_b"])
    gram_inv = torch.eye(2, device=d)
    for scaling in [float("inf"), float("-inf"), float("nan")]:
        _forward_and_linear(cases, f"scaling_{scaling}", _with(d, scaling=scaling), "scaling")
        cases[f"scaling_{scaling}-linear_backward"] = (
            "linear_backward", (dy, z, *params, scaling, 0.0, None, MASK3), "scaling")
        cases[f"scaling_{scaling}-correct_grad"] = ("correct_grad", (c["lora_b"], gram_inv, scaling), "scaling")
    for p in [1.0, -0.1]:
        _forward_and_linear(cases, f"dropout_p_{p}", c, "dropout_p", p=p, seed=seed_tensor(1, d))
        cases[f"dropout_p_{p}-linear_backward"] = (
            "linear_backward", (dy, z, *params, 1.0, p, seed_tensor(1, d), MASK3), "dropout_p")
    cases["seed_missing-linear_forward"] = ("linear_forward", (*_args(c), 0.5, None), "seed")
    cases["seed_missing-linear_backward"] = ("linear_backward", (dy, z, *params, 1.0, 0.5, None, MASK3), "seed")
    for name, bad in [("int32", torch.tensor(1, dtype=torch.int32)), ("float", torch.tensor(1.0)),
                      ("two", torch.tensor([1, 2]))]:
        cases[f"seed_{name}-linear_forward"] = ("linear_forward", (*_args(c), 0.5, bad.to(d)), "seed")
        cases[f"seed_{name}-dropout_mask"] = ("dropout_mask", (bad.to(d), 4, 9, 0.5), "seed")

    tail = (*params, 1.0, 0.0, None, MASK3)
    cases["grad_y_shape-linear_backward"] = ("linear_backward", (randn(4, 6), z, *tail), "grad_y")
    cases["z_rows-linear_backward"] = ("linear_backward", (dy, randn(3, 2), *tail), r"\bz\b")
    cases["z_rank-linear_backward"] = ("linear_backward", (dy, randn(4, 3), *tail), r"\bz\b")
    cases["z_dtype-linear_backward"] = ("linear_backward", (dy, z.double(), *tail), r"\bz\b")
    grad_b = randn(5, 3)
    cases["gram_inv_shape-correct_grad"] = ("correct_grad", (grad_b, torch.eye(2, device=d), 1.0), "gram_inv")
    cases["gram_inv_dtype-correct_grad"] = (
        "correct_grad", (grad_b, torch.eye(3, device=d, dtype=torch.float16), 1.0), "gram_inv")
    cases["grad_b_rank1-correct_grad"] = ("correct_grad", (randn(5), torch.eye(3, device=d), 1.0), "grad_b")
    cases["scaling_zero-correct_grad"] = ("correct_grad", (grad_b, torch.eye(3, device=d), 0.0), "scaling")
    cases["lora_a_rank1-gram_inverse"] = ("gram_inverse", (randn(3), 1e-6), "lora_a")
    cases["lora_a_int-gram_inverse"] = ("gram_inverse", (torch.ones(2, 3, dtype=torch.int64, device=d), 1e-6),
                                        "lora_a")
    cases["eps_negative-gram_inverse"] = ("gram_inverse", (c["lora_a"], -1.0), "eps")
    cases["rows_negative-dropout_mask"] = ("dropout_mask", (seed_tensor(1, d), -1, 3, 0.5), "rows")
    cases["p_one-dropout_mask"] = ("dropout_mask", (seed_tensor(1, d), 2, 3, 1.0), r"\bp\b")

    _lowrank_bad_inputs(cases, d, randn)

    # what only the composite entry point checks
    frozen = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], 1.0)
    cases["weight_requires_grad-linear"] = (
        "linear", (frozen[0], frozen[1].clone().requires_grad_(), *frozen[2:]), "weight")
    cases["lora_a_requires_grad-linear"] = (
        "linear", (*frozen[:3], frozen[3].clone().requires_grad_(), *frozen[4:]), "lora_a")
    cases["correction_scaling_zero-linear"] = ("linear", (*frozen[:5], 0.0, 0.0, True), "scaling")
    return cases


def _lowrank_bad_inputs(cases, d, randn):
    """The bad inputs of lowrank, lowrank_forward and lowrank_backward (x (4, 9), r = 2, out = 5)."""
    _lowrank_forward_and_lowrank(cases, "x_rank0", _with(d, x=torch.tensor(1.0, device=d)), r"\bx\b")
    _lowrank_forward_and_lowrank(cases, "x_int", _with(d, x=torch.ones(4, 9, dtype=torch.int64, device=d)),
                                 r"\bx\b")
    _lowrank_forward_and_lowrank(cases, "x_in", _with(d, x=randn(4, 8)), r"\bx\b")
    _lowrank_forward_and_lowrank(cases, "lora_a_rank1", _with(d, lora_a=randn(9)), "lora_a")
    for shape in [(5,), (5, 3)]:
        _lowrank_forward_and_lowrank(cases, f"lora_b_shape{shape}", _with(d, lora_b=randn(*shape)), "lora_b")
    _lowrank_forward_and_lowrank(cases, "rank0", _with(d, lora_a=randn(0, 9), lora_b=randn(5, 0)),
                                 r"lora_a|rank|\br\b")
    for xdtype, adtype, bdtype in [("fp32", torch.float16, torch.float16), ("bf16", torch.float32, torch.bfloat16)]:
        c = _good(d, xdtype)
        c["lora_a"], c["lora_b"] = c["lora_a"].to(adtype), c["lora_b"].to(bdtype)
        _lowrank_forward_and_lowrank(cases, f"lora_dtype_{xdtype}_{adtype}_{bdtype}", c, "lora")
    c = _good(d)
    _lowrank_forward_and_lowrank(cases, "scaling_nan", _with(d, scaling=float("nan")), "scaling")
    _lowrank_forward_and_lowrank(cases, "dropout_p_1.0", c, "dropout_p", p=1.0, seed=seed_tensor(1, d))
    cases["seed_missing-lowrank_forward"] = ("lowrank_forward", (*_lowrank_args(c), 0.5, None), "seed")
    cases["seed_int32-lowrank_forward"] = (
        "lowrank_forward", (*_lowrank_args(c), 0.5, torch.tensor(1, dtype=torch.int32, device=d)), "seed")
    dy, z = randn(4, 5), randn(4, 2)
    tail = (c["lora_a"], c["lora_b"], 1.0, 0.0, None, MASK2)
    cases["grad_y_shape-lowrank_backward"] = ("lowrank_backward", (randn(4, 6), z, *tail), "grad_y")
    cases["z_rows-lowrank_backward"] = ("lowrank_backward", (dy, randn(3, 2), *tail), r"\bz\b")
    cases["z_dtype-lowrank_backward"] = ("lowrank_backward", (dy, z.double(), *tail), r"\bz\b")
    cases["seed_missing-lowrank_backward"] = (
        "lowrank_backward", (dy, z, c["lora_a"], c["lora_b"], 1.0, 0.5, None, MASK2), "seed")
    cases["lora_a_requires_grad-lowrank"] = (
        "lowrank", (c["x"], c["lora_a"].clone().requires_grad_(), c["lora_b"], 1.0), "lora_a")
    cases["correction_scaling_zero-lowrank"] = ("lowrank", (*_lowrank_args(c)[:3], 0.0, 0.0, True), "scaling")


def device_bad_inputs():
    """Like ``bad_inputs``: the inputs that need two devices (CPU and CUDA)."""
    cases = {}
    for name in ["weight", "bias", "lora_a", "lora_b"]:
        for on, other in [("cuda", "cpu"), ("cpu", "cuda")]:
            c = _good(on)
            c[name] = c[name].to(other)
            _forward_and_linear(cases, f"{name}_on_{other}", c, name + "|device")
    c = _good("cuda")
    cases["seed_on_cpu-linear_forward"] = ("linear_forward", (*_args(c), 0.5, seed_tensor(1, "cpu")), "seed")
    dy, z = torch.randn(4, 5, device="cuda"), torch.randn(4, 2, device="cuda")
    cases["z_on_cpu-linear_backward"] = (
        "linear_backward", (dy, z.cpu(), c["weight"], c["lora_a"], c["lora_b"], 1.0, 0.0, None, MASK3), r"\bz\b")
    cases["gram_inv_on_cpu-correct_grad"] = ("correct_grad", (c["lora_b"], torch.eye(2), 1.0), "gram_inv")
    for name in ["lora_a", "lora_b"]:
        c = _good("cuda")
        c[name] = c[name].cpu()
        _lowrank_forward_and_lowrank(cases, f"{name}_on_cpu", c, name + "|device")
    c = _good("cuda")
    cases["z_on_cpu-lowrank_backward"] = (
        "lowrank_backward", (dy, z.cpu(), c["lora_a"], c["lora_b"], 1.0, 0.0, None, MASK2), r"\bz\b")
    return cases


BAD_INPUT_IDS = sorted(bad_inputs())


def _expect(lib, op, args, match):
    with pytest.raises(ERR, match=match):
        getattr(lib, op)(*args)


@pytest.mark.parametrize("case", BAD_INPUT_IDS)
def test_bad_input(device, case):
    _expect(ops_for(device), *bad_inputs(device)[case])


@requires_cuda
def test_bad_devices():
    for op, args, match in device_bad_inputs().values():
        _expect(ops, op, args, match)


def test_good_inputs_pass(device):
    # the baseline the error cases perturb
    ops = ops_for(device)
    c = _good(device)
    ops.linear_forward(*_args(c), 0.0, None)
    ops.linear(*_args(c))
    dy, z = torch.randn(4, 5, device=device), torch.randn(4, 2, device=device)
    ops.linear_backward(dy, z, c["weight"], c["lora_a"], c["lora_b"], 1.0, 0.0, None, MASK3)
    ops.correct_grad(torch.randn(5, 3, device=device), torch.eye(3, device=device), 1.0)
    ops.lowrank_forward(*_lowrank_args(c), 0.0, None)
    ops.lowrank(*_lowrank_args(c))
    ops.lowrank_backward(dy, z, c["lora_a"], c["lora_b"], 1.0, 0.0, None, MASK2)


def test_allowed_lora_dtypes_pass(device):
    ops = ops_for(device)
    for xdtype in ("fp64", "fp32", "fp16", "bf16"):
        for ldtype in (xdtype, "fp32"):
            c = _good(device, xdtype, ldtype)
            ops.linear_forward(*_args(c), 0.0, None)
            ops.linear(*_args(c))
            ops.lowrank_forward(*_lowrank_args(c), 0.0, None)
            ops.lowrank(*_lowrank_args(c))
