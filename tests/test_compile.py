"""torch.compile(fullgraph=True) of a module built on torch.ops.lorafa.linear."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn

from tests.helpers import assert_matches, make_case, make_dy, op_mask, plain_forward, ref_forward


class LoraFALinear(nn.Module):
    def __init__(self, c, dropout_p=0.0, correction=False, seed=None):
        super().__init__()
        self.weight = nn.Parameter(c["weight"].detach().clone(), requires_grad=False)
        self.bias = None if c["bias"] is None else nn.Parameter(c["bias"].detach().clone())
        self.register_buffer("lora_a", c["lora_a"].detach().clone())
        self.lora_b = nn.Parameter(c["lora_b"].detach().clone())
        self.scaling = c["scaling"]
        self.dropout_p = dropout_p
        self.correction = correction
        self.seed = seed

    def forward(self, x):
        y = torch.ops.lorafa.linear(x, self.weight, self.bias, self.lora_a, self.lora_b, self.scaling,
                                    self.dropout_p, self.correction, self.seed)
        return torch.relu(y) * 2.0 + 1.0  # something around the op for the compiler to fuse


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(model, x, dy_seed=1):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = model(x)
    y.backward(make_dy(y.shape, y.dtype, y.device, seed=dy_seed))
    grads = [x.grad, model.lora_b.grad, None if model.bias is None else model.bias.grad]
    return y.detach(), grads


def _assert_same(a, b, exact):
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(backend="inductor", bias=True, correction=False, p=0.0),
        dict(backend="aot_eager", bias=True, correction=True, p=0.0),
        dict(backend="inductor", bias=True, correction=True, p=0.3),
        dict(backend="aot_eager", bias=False, correction=False, p=0.3),
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_compile_matches_eager(device, cfg):
    c = make_case((3, 5), 33, 17, 8, "fp32", bias=cfg["bias"], seed=1, device=device)
    model = LoraFALinear(c, cfg["p"], cfg["correction"], seed=1234 if cfg["p"] else None)
    y_e, g_e = _step(model, c["x"])
    compiled = torch.compile(model, backend=cfg["backend"], fullgraph=True)
    y_c, g_c = _step(compiled, c["x"])
    # the op is opaque to the compiler: with aot_eager nothing is reordered at all
    exact = cfg["backend"] == "aot_eager"
    _assert_same(y_c, y_e, exact)
    for a, b in zip(g_c, g_e):
        assert (a is None) == (b is None)
        if a is not None:
            _assert_same(a, b, exact)
    # and the eager result is right (so the comparison is not between two wrong answers)
    mask = op_mask(1234, 15, 33, cfg["p"], "cpu")
    y_ref = ref_forward(c, mask, cfg["p"])[0]
    torch.testing.assert_close(y_e.cpu(), (torch.relu(y_ref) * 2.0 + 1.0).float(), rtol=1e-5, atol=1e-5)


def test_no_graph_breaks():
    c = make_case((3, 5), 33, 17, 8, "fp32", seed=2)
    model = LoraFALinear(c, 0.3, True, seed=99)
    explanation = torch._dynamo.explain(model)(c["x"])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # the op appears in the captured graph as itself
    code = "\n".join(g.code for g in explanation.graphs)
    assert "lorafa" in code


def test_no_graph_breaks_counters():
    from torch._dynamo.utils import counters

    counters.clear()
    c = make_case(7, 33, 17, 8, "fp32", seed=3)
    model = LoraFALinear(c, 0.3, False, seed=5)
    compiled = torch.compile(model, backend="aot_eager")  # not fullgraph: a break would be counted
    _step(compiled, c["x"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_dynamic_shapes(backend):
    c = make_case(5, 33, 17, 8, "fp32", seed=4)
    model = LoraFALinear(c, 0.25, False, seed=77)
    cnt = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(5)
    counts = []
    for n in (5, 9):
        x = torch.randn(n, 33, generator=gen)
        y_c, g_c = _step(compiled, x)
        counts.append(cnt.frame_count)
        y_e, g_e = _step(model, x)
        assert y_c.shape == (n, 17)
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counts[0] >= 1 and counts[1] == counts[0], f"recompiled for a new N: compilations {counts}"


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_autocast_bf16(device, backend):
    c = make_case((2, 6), 33, 17, 8, "fp32", seed=6, device=device)
    model = LoraFALinear(c, 0.0, False)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = c["x"]
    with torch.autocast(device, dtype=torch.bfloat16):
        y_e, g_e = _step(model, x)
    with torch.autocast(device, dtype=torch.bfloat16):
        y_c, g_c = _step(compiled, x)
    assert y_e.dtype == torch.bfloat16 and y_c.dtype == torch.bfloat16
    torch.testing.assert_close(y_c, y_e, rtol=1.6e-2, atol=1e-2)
    # gradients land in the parameters' own dtypes
    assert g_c[0].dtype == torch.float32 and g_c[1].dtype == torch.float32 and g_c[2].dtype == torch.float32
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2)
    # against the fp64 reference on the bf16-cast inputs, with the 2x-plain-bf16 rule on the op's output
    cb = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    y_ref = ref_forward(cb)[0]
    y_plain = plain_forward(cb)[0]
    y_op = torch.ops.lorafa.linear(*(cb[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "scaling")))
    with torch.autocast(device, dtype=torch.bfloat16):
        y_ac = torch.ops.lorafa.linear(*(c[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "scaling")))
    assert y_ac.dtype == torch.bfloat16
    assert torch.equal(y_ac, y_op), "autocast must cast the inputs to bf16, like F.linear"
    assert_matches(y_ac, y_plain, y_ref, "y (autocast)", dtype=torch.bfloat16, k=33)
    final_ref = torch.relu(y_ref) * 2.0 + 1.0
    err = (y_c.double().cpu() - final_ref).abs().max().item()
    assert err <= 4 * 2**-8 * final_ref.abs().max().item()
