"""Clear errors that name the offending argument (matched loosely: the wording is the implementer's)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import make_case, ops, requires_cuda, seed_tensor

ERR = (RuntimeError, ValueError)


def _good(device="cpu", dtype="fp32", lora_dtype=None):
    return make_case(4, 9, 5, 2, dtype, lora_dtype, device=device, seed=1)


def _both(c, p=0.0, seed=None):
    """Call the forward op and the autograd entry point with the same (bad) arguments."""
    args = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], p)
    yield lambda: ops.linear_forward(*args, seed)
    yield lambda: ops.linear(*args, False, 1 if p else None)


def _expect(c, match, p=0.0, seed=None):
    for call in _both(c, p, seed):
        with pytest.raises(ERR, match=match):
            call()


def test_good_inputs_pass(device):
    # the baseline the error cases below perturb
    c = _good(device)
    for call in _both(c):
        call()


def test_x_rank0(device):
    c = _good(device)
    c["x"] = torch.tensor(1.0, device=device)
    _expect(c, r"\bx\b")


@pytest.mark.parametrize("shape", [(5,), (5, 9, 1)])
def test_weight_not_2d(device, shape):
    c = _good(device)
    c["weight"] = torch.randn(shape, device=device)
    _expect(c, "weight")


def test_in_mismatch_x_weight(device):
    c = _good(device)
    c["x"] = torch.randn(4, 8, device=device)  # weight and lora_a agree on in = 9
    _expect(c, r"weight|\bx\b")
    c["x"] = torch.randn(2, 2, 10, device=device)
    _expect(c, r"weight|\bx\b")


def test_in_mismatch_lora_a(device):
    c = _good(device)
    c["lora_a"] = torch.randn(2, 8, device=device)
    _expect(c, "lora_a")


@pytest.mark.parametrize("shape", [(6, 2), (5, 3), (5,), (2, 5)])
def test_lora_b_shape(device, shape):
    c = _good(device)
    c["lora_b"] = torch.randn(shape, device=device)
    _expect(c, "lora_b")


@pytest.mark.parametrize("shape", [(4,), (6,), (1, 5), ()])
def test_bias_shape(device, shape):
    c = _good(device)
    c["bias"] = torch.randn(shape, device=device)
    _expect(c, "bias")


def test_rank_zero(device):
    c = _good(device)
    c["lora_a"] = torch.randn(0, 9, device=device)
    c["lora_b"] = torch.randn(5, 0, device=device)
    _expect(c, r"lora_a|lora_b|rank|\br\b")
    with pytest.raises(ERR, match=r"lora_a|rank|\br\b"):
        ops.gram_inverse(c["lora_a"], 1e-6)


@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16, torch.float64])
def test_x_weight_dtype_mismatch(device, wdtype):
    c = _good(device)
    c["weight"] = c["weight"].to(wdtype)
    _expect(c, "weight")


def test_bias_dtype_mismatch(device):
    c = _good(device)
    c["bias"] = c["bias"].to(torch.float16)
    _expect(c, "bias")


@pytest.mark.parametrize(
    "xdtype,adtype,bdtype",
    [
        ("fp32", torch.float16, torch.float16),  # lora fp16 with fp32 x
        ("bf16", torch.float16, torch.float16),  # lora fp16 with bf16 x
        ("fp16", torch.bfloat16, torch.bfloat16),
        ("bf16", torch.float32, torch.bfloat16),  # lora_a and lora_b disagree
        ("fp32", torch.float64, torch.float64),  # fp64 adapters with fp32 x
    ],
)
def test_lora_dtype(device, xdtype, adtype, bdtype):
    c = _good(device, xdtype)
    c["lora_a"] = c["lora_a"].to(adtype)
    c["lora_b"] = c["lora_b"].to(bdtype)
    _expect(c, "lora")


def test_allowed_lora_dtypes_pass(device):
    for xdtype in ("fp16", "bf16"):
        for ldtype in (xdtype, "fp32"):
            for call in _both(_good(device, xdtype, ldtype)):
                call()


@requires_cuda
@pytest.mark.parametrize("name", ["weight", "bias", "lora_a", "lora_b"])
def test_mismatched_devices(name):
    c = _good("cuda")
    c[name] = c[name].cpu()
    _expect(c, name + "|device")
    c = _good("cpu")
    c[name] = c[name].cuda()
    _expect(c, name + "|device")


@requires_cuda
def test_seed_on_wrong_device():
    c = _good("cuda")
    with pytest.raises(ERR, match="seed"):
        ops.linear_forward(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], 1.0, 0.5, seed_tensor(1, "cpu"))


@pytest.mark.parametrize("scaling", [float("inf"), float("-inf"), float("nan")])
def test_scaling_not_finite(device, scaling):
    c = _good(device)
    c["scaling"] = scaling
    _expect(c, "scaling")
    dy = torch.randn(4, 5, device=device)
    z = torch.randn(4, 2, device=device)
    with pytest.raises(ERR, match="scaling"):
        ops.linear_backward(dy, z, c["weight"], c["lora_a"], c["lora_b"], scaling, 0.0, None, [True, True, True])
    with pytest.raises(ERR, match="scaling"):
        ops.correct_grad(c["lora_b"], ops.gram_inverse(c["lora_a"], 1e-6), scaling)


@pytest.mark.parametrize("p", [1.0, -0.1])
def test_dropout_p_out_of_range(device, p):
    c = _good(device)
    _expect(c, "dropout_p", p=p, seed=seed_tensor(1, device))
    dy = torch.randn(4, 5, device=device)
    z = torch.randn(4, 2, device=device)
    with pytest.raises(ERR, match="dropout_p"):
        ops.linear_backward(dy, z, c["weight"], c["lora_a"], c["lora_b"], 1.0, p, seed_tensor(1, device),
                            [True, True, True])


def test_seed_missing(device):
    c = _good(device)
    with pytest.raises(ERR, match="seed"):
        ops.linear_forward(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], 1.0, 0.5, None)
    dy = torch.randn(4, 5, device=device)
    z = torch.randn(4, 2, device=device)
    with pytest.raises(ERR, match="seed"):
        ops.linear_backward(dy, z, c["weight"], c["lora_a"], c["lora_b"], 1.0, 0.5, None, [True, True, True])


@pytest.mark.parametrize("bad", [torch.tensor(1, dtype=torch.int32), torch.tensor(1.0), torch.tensor([1, 2])])
def test_seed_bad_tensor(device, bad):
    c = _good(device)
    with pytest.raises(ERR, match="seed"):
        ops.linear_forward(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], 1.0, 0.5, bad.to(device))


def test_linear_backward_shape_errors(device):
    c = _good(device)
    dy = torch.randn(4, 5, device=device)
    z = torch.randn(4, 2, device=device)
    args = (c["weight"], c["lora_a"], c["lora_b"], 1.0, 0.0, None, [True, True, True])
    with pytest.raises(ERR, match="grad_y"):
        ops.linear_backward(torch.randn(4, 6, device=device), z, *args)
    with pytest.raises(ERR, match=r"\bz\b"):
        ops.linear_backward(dy, torch.randn(3, 2, device=device), *args)
    with pytest.raises(ERR, match=r"\bz\b"):
        ops.linear_backward(dy, torch.randn(4, 3, device=device), *args)
    ops.linear_backward(dy, z, *args)  # and the good call passes


def test_correct_grad_shape_errors(device):
    g = torch.randn(5, 3, device=device)
    with pytest.raises(ERR, match="gram_inv"):
        ops.correct_grad(g, torch.eye(2, device=device), 1.0)
    with pytest.raises(ERR, match="grad_b"):
        ops.correct_grad(torch.randn(5, device=device), torch.eye(3, device=device), 1.0)
    with pytest.raises(ERR, match="lora_a"):
        ops.gram_inverse(torch.randn(3, device=device), 1e-6)
