"""PEFT interoperability: save_adapter / load_adapter / from_peft against real PEFT on a small
transformers LlamaForCausalLM built from a config (random init, nothing from a hub), training parity
with PEFT's create_lorafa_optimizer, torch.compile of the whole model, and bad adapters."""
from __future__ import annotations

import copy
import json
import math
import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lorafa_ext.layers import LoRAFALayer, LoRAFALinear  # noqa: E402
from lorafa_ext.model import apply_lorafa, lorafa_layers, lorafa_parameters  # noqa: E402
from lorafa_ext.peft_compat import AdapterError, from_peft, load_adapter, save_adapter  # noqa: E402
from tests.models import tiny_llama, token_ids  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def randomize_b(model, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorafa_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def ref_gram_inverse(A, eps=1e-6):
    A = A.double()
    g = A @ A.t()
    r = g.shape[0]
    return torch.linalg.inv(g + eps * torch.trace(g) / r * torch.eye(r, dtype=torch.float64))


def peft_model_with_random_b(base, **config):
    """A PeftModel with PEFT's init for A and a random (nonzero) B."""
    pm = get_peft_model(base, LoraConfig(**config))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def state_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, {
        n: type(m) for n, m in model.named_modules()
    }


def assert_untouched(model, snapshot):
    sd, types = snapshot
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert set(now) == set(sd)
    for k, v in sd.items():
        assert torch.equal(now[k], v), k


# ============================================================================== save_adapter -> PEFT


@pytest.mark.parametrize("variant", ["plain", "patterns", "rslora"])
def test_save_adapter_loads_in_peft_with_same_outputs(tmp_path, variant):
    base = tiny_llama()
    kwargs = {}
    if variant == "patterns":
        kwargs = dict(rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"up_proj": 3})
    ours = apply_lorafa(copy.deepcopy(base), TARGETS, 4, 8, use_rslora=(variant == "rslora"), **kwargs)
    randomize_b(ours)
    ids = token_ids()
    y_ours = logits(ours, ids)
    assert not torch.allclose(y_ours, logits(base, ids))  # the adapter matters

    save_adapter(ours, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    if variant == "patterns":
        assert config["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 2}
        assert set(config["alpha_pattern"].values()) == {3}
    assert config["use_rslora"] == (variant == "rslora")

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm, ids), y_ours, rtol=1e-5, atol=1e-5)
    q1 = pm.base_model.model.model.layers[1].self_attn.q_proj
    assert q1.r["default"] == (2 if variant == "patterns" else 4)


def test_save_adapter_partial_targets_use_exact_names(tmp_path):
    """Only some q_proj layers adapted: target_modules must not select the others in PEFT."""
    base = tiny_llama()
    ours = apply_lorafa(copy.deepcopy(base), r"model\.layers\.0\.self_attn\.q_proj", 4, 8)
    randomize_b(ours)
    save_adapter(ours, str(tmp_path))
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    adapted = [n for n, m in pm.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert adapted == ["base_model.model.model.layers.0.self_attn.q_proj"]
    ids = token_ids()
    torch.testing.assert_close(logits(pm, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)


def test_save_adapter_needs_layers(tmp_path):
    with pytest.raises(ValueError, match="no LoRAFALinear layers"):
        save_adapter(tiny_llama(), str(tmp_path))


# ============================================================================== PEFT -> load_adapter


@pytest.mark.parametrize("into", ["plain_model", "lorafa_model"])
def test_load_adapter_from_peft_directory(tmp_path, into):
    base = tiny_llama()
    pm = peft_model_with_random_b(
        copy.deepcopy(base), r=4, lora_alpha=8, target_modules=TARGETS,
        rank_pattern={"model.layers.0.mlp.up_proj": 6}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 5},
    ).eval()
    pm.save_pretrained(str(tmp_path))
    ids = token_ids()
    y_peft = logits(pm, ids)

    model = copy.deepcopy(base)
    if into == "lorafa_model":
        apply_lorafa(model, TARGETS, 4, 8, rank_pattern={"model.layers.0.mlp.up_proj": 6})
    model = load_adapter(model, str(tmp_path))
    torch.testing.assert_close(logits(model, ids), y_peft, rtol=1e-5, atol=1e-5)
    layers = dict(lorafa_layers(model))
    assert len(layers) == 6
    assert layers["model.layers.0.mlp.up_proj"].r == 6
    assert layers["model.layers.1.self_attn.v_proj"].lora_alpha == 5
    assert layers["model.layers.1.self_attn.v_proj"].scaling == pytest.approx(5 / 4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_B" for n in layers}
    # the Gram cache follows the loaded A
    for layer in layers.values():
        torch.testing.assert_close(layer.lora_gram_inv.double(), ref_gram_inverse(layer.lora_A), rtol=1e-4, atol=1e-5)


def test_load_adapter_rslora(tmp_path):
    base = tiny_llama()
    pm = peft_model_with_random_b(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True)
    pm.save_pretrained(str(tmp_path))
    model = load_adapter(copy.deepcopy(base), str(tmp_path))
    assert all(layer.use_rslora and layer.scaling == pytest.approx(4.0) for _, layer in lorafa_layers(model))
    ids = token_ids()
    torch.testing.assert_close(logits(model, ids), logits(pm.eval(), ids), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    base = tiny_llama()
    ours = apply_lorafa(copy.deepcopy(base), TARGETS, 4, 8, alpha_pattern={"v_proj": 2})
    randomize_b(ours)
    save_adapter(ours, str(tmp_path))
    other = apply_lorafa(copy.deepcopy(base), TARGETS, 4, 8, init="gaussian")
    load_adapter(other, str(tmp_path))
    for (n, a), (m, b) in zip(lorafa_layers(ours), lorafa_layers(other)):
        assert n == m and a.scaling == b.scaling
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


# ============================================================================== bad adapters


def _saved_peft_adapter(tmp_path, base, **config):
    pm = peft_model_with_random_b(copy.deepcopy(base), **config)
    pm.save_pretrained(str(tmp_path))
    return tmp_path


def _edit_weights(directory, fn):
    path = os.path.join(directory, "adapter_model.safetensors")
    sd = safetensors_torch.load_file(path)
    sd = fn(sd)
    safetensors_torch.save_file(sd, path)


def _edit_config(directory, **changes):
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.fixture(params=["plain_model", "lorafa_model"])
def target_model(request):
    model = tiny_llama()
    if request.param == "lorafa_model":
        apply_lorafa(model, TARGETS, 4, 8)
        randomize_b(model)
    return model


def test_bad_adapter_shape(tmp_path, target_model):
    d = _saved_peft_adapter(tmp_path, tiny_llama(), r=4, lora_alpha=8, target_modules=TARGETS)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    _edit_weights(d, lambda sd: {**sd, key: torch.zeros(50, 4)})
    snap = state_snapshot(target_model)
    with pytest.raises(AdapterError, match=r"shape mismatch for 'model.layers.1.mlp.up_proj'"):
        load_adapter(target_model, str(d))
    assert_untouched(target_model, snap)


def test_bad_adapter_rank(tmp_path, target_model):
    d = _saved_peft_adapter(tmp_path, tiny_llama(), r=4, lora_alpha=8, target_modules=TARGETS)
    _edit_config(d, r=8)
    snap = state_snapshot(target_model)
    with pytest.raises(AdapterError, match=r"rank mismatch .*config gives r=8"):
        load_adapter(target_model, str(d))
    assert_untouched(target_model, snap)


def test_adapter_rank_differs_from_existing_layer(tmp_path):
    d = _saved_peft_adapter(tmp_path, tiny_llama(), r=2, lora_alpha=8, target_modules=TARGETS)
    model = apply_lorafa(tiny_llama(), TARGETS, 4, 8)
    snap = state_snapshot(model)
    with pytest.raises(AdapterError, match=r"rank mismatch .*the layer has r=4, the adapter r=2"):
        load_adapter(model, str(d))
    assert_untouched(model, snap)


@pytest.mark.parametrize("problem", ["missing_b", "unknown_module", "extra_key", "not_targeted"])
def test_bad_adapter_keys(tmp_path, target_model, problem):
    d = _saved_peft_adapter(tmp_path, tiny_llama(), r=4, lora_alpha=8, target_modules=TARGETS)
    prefix = "base_model.model.model.layers."

    def edit(sd):
        if problem == "missing_b":
            del sd[prefix + "1.self_attn.v_proj.lora_B.weight"]
        elif problem == "unknown_module":
            sd[prefix + "7.self_attn.v_proj.lora_A.weight"] = torch.zeros(4, 32)
            sd[prefix + "7.self_attn.v_proj.lora_B.weight"] = torch.zeros(16, 4)
        elif problem == "extra_key":
            sd[prefix + "0.self_attn.v_proj.lora_magnitude_vector"] = torch.zeros(16)
        else:
            sd[prefix + "0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
            sd[prefix + "0.self_attn.k_proj.lora_B.weight"] = torch.zeros(16, 4)
        return sd

    _edit_weights(d, edit)
    match = {
        "missing_b": r"'model.layers.1.self_attn.v_proj' has no lora_B.weight",
        "unknown_module": r"'model.layers.7.self_attn.v_proj', which is not a module of the model",
        "extra_key": r"unexpected keys .*lora_magnitude_vector",
        "not_targeted": r"target_modules .* does not select: \['model.layers.0.self_attn.k_proj'\]",
    }[problem]
    snap = state_snapshot(target_model)
    with pytest.raises(AdapterError, match=match):
        load_adapter(target_model, str(d))
    assert_untouched(target_model, snap)


def test_adapter_missing_targets(tmp_path, target_model):
    d = _saved_peft_adapter(tmp_path, tiny_llama(), r=4, lora_alpha=8, target_modules=TARGETS)
    _edit_config(d, target_modules=TARGETS + ["o_proj"])
    snap = state_snapshot(target_model)
    with pytest.raises(AdapterError, match=r"selects modules that have no weights .*o_proj"):
        load_adapter(target_model, str(d))
    assert_untouched(target_model, snap)


@pytest.mark.parametrize("how", ["truncated", "garbage", "bad_header"])
def test_corrupted_safetensors(tmp_path, target_model, how):
    d = _saved_peft_adapter(tmp_path, tiny_llama(), r=4, lora_alpha=8, target_modules=TARGETS)
    path = os.path.join(d, "adapter_model.safetensors")
    data = open(path, "rb").read()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data = os.urandom(len(data))
    else:
        data = (10**6).to_bytes(8, "little") + data[8:]
    with open(path, "wb") as f:
        f.write(data)
    snap = state_snapshot(target_model)
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        load_adapter(target_model, str(d))
    assert_untouched(target_model, snap)


def test_bad_config(tmp_path, target_model):
    d = _saved_peft_adapter(tmp_path, tiny_llama(), r=4, lora_alpha=8, target_modules=TARGETS)
    snap = state_snapshot(target_model)
    _edit_config(d, use_dora=True)
    with pytest.raises(AdapterError, match="use_dora=True"):
        load_adapter(target_model, str(d))
    _edit_config(d, use_dora=False, peft_type="IA3")
    with pytest.raises(AdapterError, match="only LoRA adapters"):
        load_adapter(target_model, str(d))
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(target_model, str(d))
    os.remove(os.path.join(d, "adapter_config.json"))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(target_model, str(d))
    assert_untouched(target_model, snap)


def test_strict_load_requires_cover(tmp_path):
    d = _saved_peft_adapter(tmp_path, tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"])
    model = apply_lorafa(tiny_llama(), ["q_proj", "v_proj"], 4, 8)
    snap = state_snapshot(model)
    with pytest.raises(AdapterError, match="does not cover"):
        load_adapter(model, str(d))
    assert_untouched(model, snap)
    load_adapter(model, str(d), strict=False)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.lora_A, snap[0]["model.layers.0.self_attn.q_proj.lora_A"])


# ============================================================================== from_peft


def test_from_peft_same_outputs_and_frozen_a():
    base = tiny_llama()
    pm = peft_model_with_random_b(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.1)
    ids = token_ids()
    pm.eval()
    y_peft = logits(pm, ids)
    out = from_peft(pm)
    assert out is pm
    switched = [m for m in pm.modules() if isinstance(m, LoRAFALayer)]
    assert len(switched) == 6 and all(isinstance(m, peft.tuners.lora.layer.Linear) for m in switched)
    torch.testing.assert_close(logits(pm, ids), y_peft, rtol=1e-6, atol=1e-6)
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "lora_A" in n)
    assert len(list(lorafa_parameters(pm))) == 6
    # PEFT's own machinery still works: disabled adapters give the base model, saving works
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm, ids), logits(base, ids), rtol=1e-6, atol=1e-6)
    sd = peft.get_peft_model_state_dict(pm)
    assert all("lorafa" not in k for k in sd) and len(sd) == 12


def _peft_lorafa_grad(pm_layer, scaling):
    """What PEFT's LoraFAOptimizer turns B's raw gradient into (in fp64)."""
    A = pm_layer.lora_A["default"].weight.double()
    G = pm_layer.lora_B["default"].weight.grad.double()
    inv = torch.linalg.pinv(A @ A.t() + 1e-8 * torch.eye(A.shape[0], dtype=torch.float64))
    return G @ inv / scaling**2


@pytest.mark.parametrize("path", ["apply_lorafa", "from_peft"])
def test_corrected_gradient_matches_peft_lorafa(path):
    base = tiny_llama()
    pm = peft_model_with_random_b(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=TARGETS)
    ours = _ours_like(pm, base, path)
    ids = token_ids(4, 12)
    pm(input_ids=ids, labels=ids).loss.backward()
    ours(input_ids=ids, labels=ids).loss.backward()
    for name, layer in _our_b_layers(ours):
        pl = pm.base_model.model.get_submodule(name)
        expected = _peft_lorafa_grad(pl, pl.scaling["default"])
        # delta differs (ours: 1e-6 * tr(AA^T)/r, PEFT: 1e-8): relative effect ~1e-6 * cond(AA^T)
        torch.testing.assert_close(_b_of(layer).grad.double(), expected, rtol=1e-4, atol=1e-7)


def _ours_like(pm, base, path):
    """Our model with the same A and B as the PeftModel ``pm``."""
    if path == "from_peft":
        return from_peft(copy.deepcopy(pm))
    ours = apply_lorafa(copy.deepcopy(base), TARGETS, 4, 8)
    with torch.no_grad():
        for name, layer in lorafa_layers(ours):
            pl = pm.base_model.model.get_submodule(name)
            layer.lora_A.copy_(pl.lora_A["default"].weight)
            layer.lora_B.copy_(pl.lora_B["default"].weight)
    return ours


def _our_b_layers(model):
    if isinstance(model, PeftModel):
        inner = model.base_model.model
        return [(n, m) for n, m in inner.named_modules() if isinstance(m, LoRAFALayer)]
    return list(lorafa_layers(model))


def _b_of(layer):
    return layer.lora_B if isinstance(layer, LoRAFALinear) else layer.lora_B["default"].weight


def _train_parity(path, monkeypatch, peft_bf16, correction=True, steps=5, lr=1e-2):
    import peft.optimizers.lorafa as peft_lorafa
    from peft.optimizers import create_lorafa_optimizer

    if not peft_bf16:
        # PEFT's optimizer computes the corrected gradient under a bf16 autocast whenever bf16 is
        # available (on the CPU too): switch that off to compare fp32 with fp32.
        monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda *a, **k: False)
    base = tiny_llama()
    pm = peft_model_with_random_b(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=TARGETS)
    ours = _ours_like(pm, base, path)
    if not correction:
        for _, layer in _our_b_layers(ours):
            layer.correction = False
    b0 = {n: _b_of(m).detach().clone() for n, m in _our_b_layers(ours)}

    opt_peft = create_lorafa_optimizer(pm, r=4, lora_alpha=8, lr=lr)
    opt_ours = torch.optim.AdamW(lorafa_parameters(ours), lr=lr, eps=1e-12, weight_decay=0.0)
    # Both are AdamW (beta 0.9/0.999) but PEFT's adds eps outside the bias correction
    # (transformers' AdamW): a negligible eps in both makes them the same update rule.
    for group in opt_peft.param_groups:
        group["eps"] = 1e-12
    pm.train(), ours.train()
    losses = []
    for step in range(steps):
        ids = token_ids(4, 12, seed=100 + step)
        lp = pm(input_ids=ids, labels=ids).loss
        lp.backward()
        opt_peft.step()
        opt_peft.zero_grad()
        lo = ours(input_ids=ids, labels=ids).loss
        lo.backward()
        opt_ours.step()
        opt_ours.zero_grad()
        losses.append((lp.item(), lo.item()))
    num = den = 0.0
    max_abs = 0.0
    for name, layer in _our_b_layers(ours):
        b_peft = pm.base_model.model.get_submodule(name).lora_B["default"].weight.detach()
        b_ours = _b_of(layer).detach()
        d_peft, d_ours = b_peft - b0[name], b_ours - b0[name]
        num += (d_peft - d_ours).double().norm().item() ** 2
        den += d_peft.double().norm().item() ** 2
        max_abs = max(max_abs, (b_peft - b_ours).abs().max().item())
    return losses, math.sqrt(num / den), max_abs


@pytest.mark.parametrize("path", ["apply_lorafa", "from_peft"])
def test_training_parity_with_peft_create_lorafa_optimizer(path, monkeypatch):
    losses, rel, max_abs = _train_parity(path, monkeypatch, peft_bf16=False)
    for lp, lo in losses:
        assert lo == pytest.approx(lp, rel=1e-5)
    # differences come only from the Gram regulariser (1e-6 * tr/r against 1e-8) and fp32 rounding
    assert rel < 1e-3, rel
    assert max_abs < 1e-3 * 1e-2 * 5, max_abs  # 0.1 % of the largest possible total update


def test_training_parity_peft_default_bf16_correction(monkeypatch):
    """PEFT as it ships (corrected gradient rounded to bf16 on a bf16-capable machine): close."""
    losses, rel, _ = _train_parity("apply_lorafa", monkeypatch, peft_bf16=True)
    for lp, lo in losses:
        assert lo == pytest.approx(lp, rel=1e-4)
    assert rel < 0.15, rel


def test_training_parity_detects_missing_correction(monkeypatch):
    """Sanity check of the parity test: without the correction the updates clearly differ."""
    _, rel, _ = _train_parity("apply_lorafa", monkeypatch, peft_bf16=False, correction=False)
    assert rel > 0.05, rel


# ============================================================================== torch.compile


@pytest.mark.parametrize("path", ["apply_lorafa", "from_peft"])
def test_compile_whole_llama_without_graph_breaks(path):
    base = tiny_llama()
    if path == "apply_lorafa":
        model = apply_lorafa(copy.deepcopy(base), "all-linear", 4, 8, lora_dropout=0.1)
        randomize_b(model)
    else:
        model = from_peft(peft_model_with_random_b(copy.deepcopy(base), r=4, lora_alpha=8,
                                                   target_modules="all-linear", lora_dropout=0.1))
    ids = token_ids()
    model.train()
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    ops_in_breaks = [str(r.reason) for r in explain.break_reasons if "lorafa" in str(r.reason).lower()]
    assert not ops_in_breaks, ops_in_breaks

    # When this transformers version compiles the plain Llama to one graph, ours must too (fullgraph).
    torch._dynamo.reset()
    base_explain = torch._dynamo.explain(base)(input_ids=ids, labels=ids)
    fullgraph = base_explain.graph_break_count == 0
    if fullgraph:
        assert explain.graph_break_count == 0, explain.break_reasons
    model.eval()  # no dropout: compare with eager exactly
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    eager = copy.deepcopy(model)
    out = compiled(input_ids=ids, labels=ids)
    ref = eager(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    grads = [p.grad for p in lorafa_parameters(model)]
    ref_grads = [p.grad for p in lorafa_parameters(eager)]
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_save_adapter_of_compiled_model_has_plain_names(tmp_path):
    base = tiny_llama()
    ours = apply_lorafa(copy.deepcopy(base), TARGETS, 4, 8)
    randomize_b(ours)
    save_adapter(torch.compile(ours, backend="eager"), str(tmp_path))
    keys = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any("_orig_mod" in k for k in keys)
