"""LoRAFALinear, apply_lorafa, lorafa_parameters: numerics against fp64 references, init, merge,
the Gram-inverse cache, state_dict, training with a plain AdamW, torch.compile and bad input."""
from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import lorafa_ext
from lorafa_ext.layers import LoRAFALinear
from lorafa_ext.model import apply_lorafa, lorafa_layers, lorafa_parameters, merge_and_unload

from tests.helpers import ROOT


def make_layer(n_in=24, out=12, r=4, alpha=6.0, dtype=torch.float32, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, out, bias=bias).to(dtype)
    layer = LoRAFALinear(base, r, alpha, **kw)
    with torch.no_grad():  # a nonzero B, or the adapter would contribute nothing
        layer.lora_B.copy_(torch.randn(out, r, dtype=torch.float64) * 0.5)
    return layer


def ref_output(layer, x):
    """y = x W^T + b + s (x A^T) B^T in fp64, from the layer's tensors."""
    W = layer.base_layer.weight.double()
    b = layer.base_layer.bias
    A, B = layer.lora_A.double(), layer.lora_B.double()
    y = x.double() @ W.t() + (x.double() @ A.t()) @ B.t() * layer.scaling
    return y + b.double() if b is not None else y


def ref_gram_inverse(A, eps=1e-6):
    A = A.double()
    g = A @ A.t()
    r = g.shape[0]
    return torch.linalg.inv(g + eps * torch.trace(g) / r * torch.eye(r, dtype=torch.float64))


class TinyNet(nn.Module):
    def __init__(self, d=16, h=32, o=8):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.block = nn.ModuleDict({"fc1": nn.Linear(h, h), "fc2": nn.Linear(h, h)})
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(h, o)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        x = x + self.block["fc2"](torch.relu(self.block["fc1"](x)))
        return self.head(self.norm(x))


# ============================================================================== forward / backward


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_fp64_reference(use_rslora, bias):
    layer = make_layer(bias=bias, use_rslora=use_rslora, r=9, alpha=5.0)
    assert layer.scaling == pytest.approx(5.0 / math.sqrt(9) if use_rslora else 5.0 / 9)
    x = torch.randn(3, 7, 24)
    y = layer(x)
    assert y.shape == (3, 7, 12) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref_output(layer, x), rtol=1e-5, atol=1e-5)


def test_forward_bf16_base_fp32_adapter():
    layer = make_layer(dtype=torch.bfloat16)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32  # PEFT's default
    assert layer.lora_gram_inv.dtype == torch.float32
    x = torch.randn(5, 24).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = ref_output(layer, x)
    err = (y.double() - ref).abs().max().item()
    assert err <= 4 * 2.0 ** -8 * ref.abs().max().item()


def test_adapter_dtype_option():
    layer = make_layer(dtype=torch.bfloat16, adapter_dtype=torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="adapter_dtype must be"):
        make_layer(dtype=torch.float32, adapter_dtype=torch.float16)


def test_zero_b_gives_base_output():
    torch.manual_seed(0)
    base = nn.Linear(24, 12)
    layer = LoRAFALinear(copy.deepcopy(base), 4, 8)
    x = torch.randn(6, 24)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("correction", [False, True])
def test_gradients_match_reference(correction):
    layer = make_layer(correction=correction)
    x = torch.randn(4, 5, 24, dtype=torch.float32, requires_grad=True)
    dy = torch.randn(4, 5, 12)
    layer(x).backward(dy)

    s = layer.scaling
    A, B = layer.lora_A.double(), layer.lora_B.double()
    W = layer.base_layer.weight.double()
    x2, dy2 = x.detach().double().reshape(-1, 24), dy.double().reshape(-1, 12)
    dB = s * dy2.t() @ (x2 @ A.t())
    if correction:
        dB = dB @ ref_gram_inverse(A) / s**2
    dx = dy2 @ W + s * (dy2 @ B) @ A
    torch.testing.assert_close(layer.lora_B.grad.double(), dB, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double().reshape(-1, 24), dx, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.grad is None and layer.base_layer.weight.grad is None
    assert not layer.lora_A.requires_grad and not layer.base_layer.weight.requires_grad
    assert not layer.base_layer.bias.requires_grad and layer.lora_B.requires_grad


def test_corrected_gradient_is_least_squares_fit():
    """g* = argmin ||s g A - G||_F with G = dy^T x the full-weight gradient (DESIGN.md)."""
    layer = make_layer(r=3, n_in=10, out=7)
    x = torch.randn(50, 10, dtype=torch.float32)
    dy = torch.randn(50, 7)
    layer(x).backward(dy)
    G = dy.double().t() @ x.double()
    A, s = layer.lora_A.double(), layer.scaling
    g_ls = torch.linalg.lstsq((s * A).t(), G.t()).solution.t()  # solves (s A)^T g^T = G^T
    torch.testing.assert_close(layer.lora_B.grad.double(), g_ls, rtol=1e-4, atol=1e-5)


def test_dropout_only_on_adapter_and_only_in_training():
    layer = make_layer(lora_dropout=0.5)
    x = torch.randn(8, 24)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), ref_output(layer, x), rtol=1e-5, atol=1e-5)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)  # a fresh mask each call
    with torch.no_grad():
        layer.lora_B.zero_()
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-6)  # base path untouched


# ============================================================================== init


def test_init_kaiming_matches_peft_default():
    base = nn.Linear(40, 20)
    torch.manual_seed(123)
    layer = LoRAFALinear(base, 8, 16)
    torch.manual_seed(123)
    expected = torch.empty(8, 40)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))  # what PEFT does to lora_A
    torch.testing.assert_close(layer.lora_A.detach(), expected, rtol=0, atol=0)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(40)  # kaiming-uniform bound with a = sqrt(5)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_init_gaussian_matches_peft():
    torch.manual_seed(0)
    layer = LoRAFALinear(nn.Linear(4000, 8), 5, 10, init="gaussian")
    A = layer.lora_A.detach().double()
    assert A.std().item() == pytest.approx(1 / 5, rel=0.03)  # PEFT: normal(std = 1 / r)
    assert abs(A.mean().item()) < 0.01
    assert torch.count_nonzero(layer.lora_B) == 0


def test_init_orthogonal():
    torch.manual_seed(0)
    layer = LoRAFALinear(nn.Linear(64, 8), 16, 32, init="orthogonal")
    A = layer.lora_A.detach().double()
    gram = A @ A.t()
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64) * gram[0, 0], rtol=0, atol=1e-6)
    assert gram[0, 0].item() == pytest.approx(1 / 3, rel=1e-5)
    assert torch.count_nonzero(layer.lora_B) == 0
    # a multiple of the identity: the cached Gram inverse is (1/3 + delta)^-1 I
    torch.testing.assert_close(layer.lora_gram_inv.double(), ref_gram_inverse(A), rtol=1e-5, atol=1e-5)


# ============================================================================== merge / unmerge


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge(dtype):
    layer = make_layer(dtype=dtype)
    W0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, 24).to(dtype)
    y_adapter = layer(x).detach()
    delta = layer.scaling * layer.lora_B.double() @ layer.lora_A.double()  # fp64 reference
    ref = W0.double() + delta

    assert not layer.merged
    layer.merge()
    assert layer.merged
    W1 = layer.base_layer.weight.detach()
    ulp = torch.finfo(dtype).eps
    # fp32 accumulation: one rounding of the fp64 sum to the weight dtype (plus fp32 noise)
    assert ((W1.double() - ref).abs() <= ulp * ref.abs() + 1e-6 * delta.abs().max()).all()

    y_merged = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 4 * ulp * y_adapter.abs().max().item()
    torch.testing.assert_close(y_merged.float(), y_adapter.float(), rtol=0, atol=tol)
    # merged forward skips the adapter: changing B no longer changes the output
    B = layer.lora_B.detach().clone()
    with torch.no_grad():
        layer.lora_B.add_(100.0)
    torch.testing.assert_close(layer(x), y_merged, rtol=0, atol=0)
    with torch.no_grad():
        layer.lora_B.copy_(B)

    layer.unmerge()
    assert not layer.merged
    W2 = layer.base_layer.weight.detach()
    bound = 2 * ulp * (W0.double().abs() + delta.abs()) + 1e-6 * delta.abs().max()
    assert ((W2.double() - W0.double()).abs() <= bound).all()
    if dtype == torch.float32:
        torch.testing.assert_close(W2, W0, rtol=0, atol=1e-6)


def test_merge_twice_and_unmerge_unmerged_warn():
    layer = make_layer()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    layer.merge()
    W = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=0)


def test_safe_merge_rejects_nan_and_leaves_weight():
    layer = make_layer()
    W = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=0)


def test_merge_and_unload():
    torch.manual_seed(0)
    net = TinyNet()
    apply_lorafa(net, ["fc1", "fc2"], 4, 8)
    for p in lorafa_parameters(net):
        with torch.no_grad():
            p.normal_()
    x = torch.randn(5, 16)
    y = net(x).detach()
    merge_and_unload(net)
    assert type(net.block["fc1"]) is nn.Linear and not list(lorafa_layers(net))
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-5)


# ============================================================================== Gram-inverse cache


def _count_refreshes(monkeypatch):
    calls = []
    orig = LoRAFALinear._refresh_gram

    def counting(self, *args, **kwargs):
        calls.append(1)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(LoRAFALinear, "_refresh_gram", counting)
    return calls


def test_gram_cache_recomputed_only_when_a_changes(monkeypatch):
    layer = make_layer()
    torch.testing.assert_close(layer.lora_gram_inv.double(), ref_gram_inverse(layer.lora_A), rtol=1e-5, atol=1e-6)
    calls = _count_refreshes(monkeypatch)
    x = torch.randn(4, 24)
    for _ in range(3):
        layer(x).sum().backward()
    assert calls == []  # A unchanged: never recomputed

    with torch.no_grad():  # in-place change of A (version counter)
        layer.lora_A.mul_(2.0).add_(0.1)
    layer(x).sum().backward()
    assert len(calls) == 1
    torch.testing.assert_close(layer.lora_gram_inv.double(), ref_gram_inverse(layer.lora_A), rtol=1e-5, atol=1e-6)
    layer(x).sum().backward()
    assert len(calls) == 1

    layer.lora_A.data = torch.randn(4, 24)  # new storage (data pointer)
    layer(x).sum().backward()
    assert len(calls) == 2
    torch.testing.assert_close(layer.lora_gram_inv.double(), ref_gram_inverse(layer.lora_A), rtol=1e-5, atol=1e-6)

    # the gradient uses the fresh inverse
    layer.lora_B.grad = None
    dy = torch.randn(4, 12)
    layer(x).backward(dy)
    s = layer.scaling
    dB = s * dy.double().t() @ (x.double() @ layer.lora_A.double().t())
    torch.testing.assert_close(
        layer.lora_B.grad.double(), dB @ ref_gram_inverse(layer.lora_A) / s**2, rtol=1e-4, atol=1e-5
    )


def test_gram_not_computed_without_grad(monkeypatch):
    layer = make_layer()
    with torch.no_grad():
        layer.lora_A.mul_(3.0)
    calls = _count_refreshes(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(2, 24))
    with torch.inference_mode():
        layer(torch.randn(2, 24))
    assert calls == []


def test_gram_cache_is_not_in_state_dict_and_state_dict_round_trips():
    layer = make_layer(seed=0)
    sd = layer.state_dict()
    assert set(sd) == {"lora_A", "lora_B", "base_layer.weight", "base_layer.bias"}
    other = make_layer(seed=1)
    assert not torch.equal(other.lora_A, layer.lora_A)
    other.load_state_dict(sd)
    # refreshed on load (not only lazily on the next eager forward)
    torch.testing.assert_close(other.lora_gram_inv, layer.lora_gram_inv, rtol=0, atol=0)
    x = torch.randn(3, 24)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    for name, t in other.state_dict().items():
        torch.testing.assert_close(t, sd[name], rtol=0, atol=0)


def test_to_dtype_keeps_gram_in_full_precision():
    layer = make_layer()
    layer.to(torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16 and layer.lora_gram_inv.dtype == torch.float32
    torch.testing.assert_close(layer.lora_gram_inv.double(), ref_gram_inverse(layer.lora_A), rtol=1e-4, atol=1e-5)
    y = layer(torch.randn(2, 24, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.bfloat16
    layer.double()
    assert layer.lora_gram_inv.dtype == torch.float64


# ============================================================================== apply_lorafa


def test_apply_lorafa_names_freezes_and_returns_model():
    torch.manual_seed(0)
    net = TinyNet()
    out = apply_lorafa(net, ["fc1", "fc2"], r=4, lora_alpha=8)
    assert out is net
    assert isinstance(net.block["fc1"], LoRAFALinear) and isinstance(net.block["fc2"], LoRAFALinear)
    assert type(net.inp) is nn.Linear and type(net.head) is nn.Linear
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"block.fc1.lora_B", "block.fc2.lora_B"}
    params = list(lorafa_parameters(net))
    assert [id(p) for p in params] == [id(net.block["fc1"].lora_B), id(net.block["fc2"].lora_B)]


def test_apply_lorafa_again_and_modules_to_save():
    torch.manual_seed(0)
    net = apply_lorafa(TinyNet(), ["fc1"], r=4, lora_alpha=8, modules_to_save=["head"])
    with pytest.raises(ValueError, match="modules_to_save selects 'block', which is or contains the adapted layer"):
        apply_lorafa(net, ["fc2"], r=4, lora_alpha=8, modules_to_save=["block"])
    net = apply_lorafa(net, ["fc2", "inp"], r=4, lora_alpha=8)  # earlier B and the head stay trainable
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"block.fc1.lora_B", "block.fc2.lora_B", "inp.lora_B", "head.weight", "head.bias"}
    assert {id(p) for p in lorafa_parameters(net)} == {id(p) for p in net.parameters() if p.requires_grad}
    net(torch.randn(3, 16)).sum().backward()
    assert net.head.weight.grad is not None and net.block["fc1"].lora_B.grad is not None
    with pytest.raises(ValueError, match="modules_to_save selects 'head', which is or contains the adapted layer 'head'"):
        apply_lorafa(net, ["head"], r=4, lora_alpha=8)  # the head trains in full already
    assert type(net.head) is nn.Linear


def test_apply_lorafa_regex_and_patterns():
    torch.manual_seed(0)
    net = TinyNet()
    apply_lorafa(net, r"block\.fc\d", 4, 8, rank_pattern={"fc2": 2}, alpha_pattern={r"block\.fc1": 3},
                 use_rslora=False, lora_dropout=0.1, correction=False)
    fc1, fc2 = net.block["fc1"], net.block["fc2"]
    assert (fc1.r, fc1.lora_alpha, fc2.r, fc2.lora_alpha) == (4, 3, 2, 8)
    assert fc1.lora_dropout == 0.1 and fc1.correction is False
    assert type(net.inp) is nn.Linear


def test_apply_lorafa_all_linear_and_exclude():
    net = TinyNet()
    apply_lorafa(net, "all-linear", 2, 4, exclude_modules=["head"])
    assert {n for n, _ in lorafa_layers(net)} == {"inp", "block.fc1", "block.fc2"}


def test_apply_lorafa_shared_module_replaced_everywhere():
    shared = nn.Linear(8, 8)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    apply_lorafa(net, ["0"], 2, 4)
    assert net[0] is net[2] and isinstance(net[2], LoRAFALinear)


def test_apply_lorafa_no_match_is_a_clear_error():
    net = TinyNet()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"matched no module.*fc1"):
        apply_lorafa(net, ["q_proj", "v_proj"], 4, 8)
    with pytest.raises(ValueError, match="matched no module"):
        apply_lorafa(net, r"nothing\..*", 4, 8)
    assert all(p.requires_grad for p in net.parameters())  # untouched
    assert not list(lorafa_layers(net))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_apply_lorafa_bad_targets():
    net = TinyNet()
    with pytest.raises(TypeError, match="only nn.Linear"):
        apply_lorafa(net, ["norm"], 4, 8)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        apply_lorafa(net, "fc(", 4, 8)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        apply_lorafa(net, ["fc1"], 0, 8)
    assert not list(lorafa_layers(net)) and all(p.requires_grad for p in net.parameters())
    apply_lorafa(net, ["fc1"], 4, 8)
    with pytest.raises(ValueError, match="already has a LoRA-FA adapter"):
        apply_lorafa(net, ["fc1"], 4, 8)


def test_layer_bad_arguments():
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        LoRAFALinear(nn.Conv1d(3, 3, 1), 2, 4)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRAFALinear(nn.Linear(4, 4), 0, 4)
    with pytest.raises(ValueError, match="init must be one of"):
        LoRAFALinear(nn.Linear(4, 4), 2, 4, init="pissa")
    for r in (4, 8):  # r >= in_features
        with pytest.raises(ValueError, match=rf"LoRAFALinear: r={r} must be smaller than the layer's in_features=4"):
            LoRAFALinear(nn.Linear(4, 4), r, 4)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        LoRAFALinear(nn.Linear(4, 4), 2, 4, lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_alpha must be nonzero"):
        LoRAFALinear(nn.Linear(4, 4), 2, 0)


# ============================================================================== training


def test_plain_adamw_trains_only_b():
    torch.manual_seed(0)
    net = TinyNet()
    apply_lorafa(net, ["inp", "fc1", "fc2", "head"], 4, 8)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(lorafa_parameters(net), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    target = torch.randn(64, 8, generator=g)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for n, p in net.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_corrected_training_matches_manual_correction():
    """AdamW with correction=True equals AdamW fed the manually corrected exact gradient."""
    torch.manual_seed(0)
    a = make_layer(correction=True)
    b = make_layer(correction=False)
    opt_a = torch.optim.AdamW([a.lora_B], lr=1e-2)
    opt_b = torch.optim.AdamW([b.lora_B], lr=1e-2)
    for step in range(4):
        x = torch.randn(16, 24)
        for layer in (a, b):
            (layer(x) ** 2).mean().backward()
        with torch.no_grad():
            s = b.scaling
            b.lora_B.grad.copy_(b.lora_B.grad.double() @ ref_gram_inverse(b.lora_A) / s**2)
        opt_a.step(), opt_b.step(), opt_a.zero_grad(), opt_b.zero_grad()
    torch.testing.assert_close(a.lora_B, b.lora_B, rtol=1e-4, atol=1e-5)


# ============================================================================== torch.compile


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    net = TinyNet()
    apply_lorafa(net, ["inp", "fc1", "fc2", "head"], 4, 8)
    for p in lorafa_parameters(net):
        with torch.no_grad():
            p.normal_(std=0.1)
    ref = copy.deepcopy(net)
    x = torch.randn(8, 16)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    for (n, p), p_ref in zip(lorafa_layers(net), [m for _, m in lorafa_layers(ref)]):
        torch.testing.assert_close(p.lora_B.grad, p_ref.lora_B.grad, rtol=1e-4, atol=1e-6)


def test_torch_compile_no_graph_breaks_with_dropout():
    torch.manual_seed(0)
    net = TinyNet()
    apply_lorafa(net, ["fc1", "fc2"], 4, 8, lora_dropout=0.2)
    net.train()
    torch._dynamo.reset()
    explain = torch._dynamo.explain(net)(torch.randn(4, 16))
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


# ============================================================================== packaging


def test_import_does_not_pull_optional_dependencies():
    code = (
        "import sys, lorafa_ext, lorafa_ext.layers, lorafa_ext.model, lorafa_ext.peft_compat\n"
        "bad = [m for m in ('peft', 'transformers', 'safetensors', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_top_level_exports():
    from lorafa_ext import layers, model, peft_compat

    for name, mod in [
        ("LoRAFALinear", layers),
        ("apply_lorafa", model),
        ("lorafa_parameters", model),
        ("save_adapter", peft_compat),
        ("load_adapter", peft_compat),
        ("from_peft", peft_compat),
    ]:
        assert getattr(lorafa_ext, name, None) is getattr(mod, name), f"lorafa_ext.{name} is not exported"


@pytest.mark.parametrize("shape", [(3, 24), (2, 3, 24)])
def test_inplace_on_output_is_differentiable(shape):
    layer = make_layer()
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert not y._is_view()
    y += 1.0  # residual-style in-place update, as model code does
    y.sum().backward()
    assert layer.lora_B.grad is not None and torch.isfinite(layer.lora_B.grad).all()
