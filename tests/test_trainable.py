"""Which parameters train after each way of adding adapters (apply_lorafa twice, load_adapter into
an adapted model, modules_to_save, from_peft with PEFT's modules_to_save, set_adapter / add_adapter,
torch.compile), and bad configurations caught before any layer changes. A Trainer optimises every
parameter that requires grad, so that set must be exactly ``lorafa_parameters(model)``: the B's and
the modules to save."""
from __future__ import annotations

import copy
import os
import pickle
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lorafa_ext import AdapterError, apply_lorafa, from_peft, load_adapter, lorafa_parameters, save_adapter  # noqa: E402
from lorafa_ext.layers import LoRAFALayer, LoRAFALinear  # noqa: E402
from lorafa_ext.model import lorafa_layers  # noqa: E402
from tests.models import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_ids  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message="lorafa_parameters")  # no stray trainable parameter
        yield


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def lorafa_names(model):
    ids = {id(p) for p in lorafa_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    assert len(names) == len(ids)
    return names


def assert_trains_exactly(model, expected_suffixes):
    """Trainable parameters == lorafa_parameters == the names ending in one of ``expected_suffixes``
    (each suffix matched at least once)."""
    names = trainable_names(model)
    assert names == lorafa_names(model)
    for suffix in expected_suffixes:
        assert any(n.endswith(suffix) for n in names), (suffix, sorted(names))
    assert all(any(n.endswith(s) for s in expected_suffixes) for n in names), sorted(names)
    assert not any("lora_A" in n for n in names)


def randomize(params, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, {
        n: type(m) for n, m in model.named_modules()
    }, trainable_names(model)


def assert_untouched(model, snap):
    sd, types, trainable = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert trainable_names(model) == trainable
    now = model.state_dict()
    assert set(now) == set(sd) and all(torch.equal(now[k], v) for k, v in sd.items())


# ============================================================================== apply_lorafa / load_adapter


def test_second_apply_lorafa_keeps_earlier_b_trainable():
    model = apply_lorafa(tiny_llama(), ["q_proj"], 4, 8)
    model = apply_lorafa(model, ["v_proj"], 4, 8)
    assert_trains_exactly(model, ["q_proj.lora_B", "v_proj.lora_B"])
    assert len(list(lorafa_parameters(model))) == 4


def test_second_apply_lorafa_keeps_a_frozen_b_frozen():
    model = apply_lorafa(tiny_llama(), ["q_proj"], 4, 8)
    frozen = model.model.layers[0].self_attn.q_proj.lora_B
    frozen.requires_grad_(False)  # the user's choice survives a later apply_lorafa
    model = apply_lorafa(model, ["v_proj"], 4, 8)
    assert not frozen.requires_grad
    assert model.model.layers[1].self_attn.q_proj.lora_B.requires_grad


def test_load_adapter_into_adapted_model_keeps_earlier_b_trainable(tmp_path):
    donor = apply_lorafa(tiny_llama(), ["v_proj"], 4, 8)
    randomize(lorafa_parameters(donor))
    save_adapter(donor, str(tmp_path))
    model = apply_lorafa(tiny_llama(), ["q_proj"], 4, 8)
    model = load_adapter(model, str(tmp_path), strict=False)
    assert_trains_exactly(model, ["q_proj.lora_B", "v_proj.lora_B"])
    ids = token_ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lorafa_parameters(model))


def test_modules_to_save_trains_the_new_head_and_survives_more_adapters():
    model = apply_lorafa(tiny_bert_classifier(), ["query", "value"], 4, 8, modules_to_save=["classifier"])
    assert_trains_exactly(model, ["query.lora_B", "value.lora_B", "classifier.weight", "classifier.bias"])
    model = apply_lorafa(model, ["key"], 4, 8)  # a later call keeps the head and the B's trainable
    assert_trains_exactly(model, ["query.lora_B", "value.lora_B", "key.lora_B", "classifier.weight", "classifier.bias"])
    model.train()
    ids = token_ids()
    model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0


def test_modules_to_save_bad_names_leave_the_model_untouched():
    model = tiny_bert_classifier()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save entry 'score' matches no module"):
        apply_lorafa(model, ["query"], 4, 8, modules_to_save=["score"])
    with pytest.raises(ValueError, match=r"modules_to_save selects 'bert.encoder.layer.0', which is or contains "
                                         r"the adapted layer 'bert.encoder.layer.0.attention.self.query'"):
        apply_lorafa(model, ["query"], 4, 8, modules_to_save=["layer.0"])
    assert_untouched(model, snap)
    apply_lorafa(model, ["query"], 4, 8)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="which is or contains the adapted layer"):  # an earlier adapter
        apply_lorafa(model, ["value"], 4, 8, modules_to_save=["attention"])
    assert_untouched(model, snap)


def test_modules_to_save_round_trip_through_peft(tmp_path):
    base = tiny_bert_classifier()
    ours = apply_lorafa(copy.deepcopy(base), ["query", "value"], 4, 8, modules_to_save=["classifier"])
    randomize(lorafa_parameters(ours))
    ids = token_ids()
    with torch.no_grad():
        y = ours(input_ids=ids).logits
    save_adapter(ours, str(tmp_path))
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, y, rtol=1e-5, atol=1e-6)
    again = load_adapter(copy.deepcopy(base), str(tmp_path))
    assert_trains_exactly(again, ["query.lora_B", "value.lora_B", "classifier.weight", "classifier.bias"])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, y, rtol=1e-6, atol=1e-6)
    # and the PEFT model loaded for training, switched, trains the same parameters (its copy of the head)
    pm = from_peft(PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True))
    names = trainable_names(pm)
    assert names == lorafa_names(pm)
    assert any("classifier.modules_to_save" in n for n in names) and not any("lora_A" in n for n in names)


def test_load_adapter_bad_modules_to_save_state(tmp_path):
    ours = apply_lorafa(tiny_bert_classifier(), ["query"], 4, 8, modules_to_save=["classifier"])
    save_adapter(ours, str(tmp_path))
    other = tiny_bert_classifier(num_labels=5)  # a head of another shape
    snap = snapshot(other)
    with pytest.raises(AdapterError, match=r"shape mismatch for classifier\.(weight|bias): the adapter has \(3,?"):
        load_adapter(other, str(tmp_path))
    assert_untouched(other, snap)


def test_load_adapter_rank_not_below_in_features(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(r=32, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(str(tmp_path))
    model = apply_lorafa(tiny_llama(), ["v_proj"], 4, 8)
    snap = snapshot(model)
    with pytest.raises(AdapterError, match=r"load_adapter: layer 'model.layers.0.self_attn.q_proj': r=32 must be "
                                           r"smaller than the layer's in_features=32"):
        load_adapter(model, str(tmp_path), strict=False)
    assert_untouched(model, snap)


def test_lorafa_parameters_warns_about_other_trainable_parameters():
    model = apply_lorafa(tiny_llama(), ["q_proj"], 4, 8)
    model.model.norm.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"1 parameters require grad .*model.norm.weight"):
        params = list(lorafa_parameters(model))
    assert len(params) == 2


# ============================================================================== from_peft


TARGETS = ["q_proj", "v_proj"]


def switched(model):
    return [m for m in model.modules() if isinstance(m, LoRAFALayer)]


def test_from_peft_modules_to_save_are_lorafa_parameters():
    pm = from_peft(get_peft_model(tiny_bert_classifier(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])))
    assert_trains_exactly(pm, ["lora_B.default.weight", "classifier.modules_to_save.default.weight",
                               "classifier.modules_to_save.default.bias"])


@pytest.mark.parametrize("case", ["embedding", "conv1d"])
def test_from_peft_names_every_layer_it_cannot_switch(case):
    if case == "embedding":
        pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
        match = r"1 LoRA layers cannot run as LoRA-FA .*base_model.model.model.embed_tokens \(Embedding\)"
    else:
        pm = get_peft_model(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
        match = (r"2 LoRA layers cannot run as LoRA-FA .*transformer.h.0.attn.c_attn \(lora.Linear over a Conv1D\), "
                 r".*transformer.h.1.attn.c_attn")
    snap = snapshot(pm)
    with pytest.raises(TypeError, match=match):
        from_peft(pm)
    assert not switched(pm)
    assert_untouched(pm, snap)


@pytest.mark.parametrize("bad", ["dropout", "rank", "rank_pattern"])
def test_from_peft_bad_config_fails_before_switching(bad):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    if bad == "dropout":
        kwargs["lora_dropout"] = 1.0
        match = r"from_peft: layer '.*q_proj' \(adapter 'default'\): lora_dropout must be in \[0, 1\), got 1.0"
    elif bad == "rank":
        kwargs["r"] = 32  # hidden size 32
        match = r"from_peft: layer '.*q_proj' \(adapter 'default'\): r=32 must be smaller than .*in_features=32"
    else:
        kwargs["rank_pattern"] = {"model.layers.1.self_attn.v_proj": 40}
        match = r"from_peft: layer '.*layers.1.self_attn.v_proj' \(adapter 'default'\): r=40"
    pm = get_peft_model(tiny_llama(), LoraConfig(**kwargs))
    snap = snapshot(pm)
    with pytest.raises(ValueError, match=match):
        from_peft(pm)
    assert not switched(pm)
    assert_untouched(pm, snap)


@pytest.mark.parametrize("bad", ["r", "rank_pattern", "dropout"])
def test_apply_lorafa_bad_config_fails_before_changing(bad):
    model = tiny_llama()
    snap = snapshot(model)
    if bad == "r":
        with pytest.raises(ValueError, match=r"apply_lorafa: layer 'model.layers.0.self_attn.q_proj': r=32 must be smaller "
                                             r"than the layer's in_features=32"):
            apply_lorafa(model, TARGETS, 32, 8)
    elif bad == "rank_pattern":
        with pytest.raises(ValueError, match=r"apply_lorafa: layer 'model.layers.1.mlp.down_proj': r=64 must be smaller .*in_features=64"):
            apply_lorafa(model, "all-linear", 4, 8, rank_pattern={r"layers\.1\.mlp\.down_proj": 64})
    else:
        with pytest.raises(ValueError, match=r"apply_lorafa: lora_dropout must be in \[0, 1\), got 1.0"):
            apply_lorafa(model, TARGETS, 4, 8, lora_dropout=1.0)
    assert_untouched(model, snap)


def test_set_adapter_keeps_a_frozen_eager_and_compiled():
    pm = from_peft(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    pm.set_adapter("default")  # PEFT sets requires_grad=True on lora_A and lora_B here
    assert_trains_exactly(pm, ["lora_B.default.weight"])
    pm.train()
    ids = token_ids()
    torch._dynamo.reset()
    compiled = torch.compile(pm, backend="aot_eager")
    compiled(input_ids=ids, labels=ids).loss.backward()
    pm.base_model.enable_adapter_layers()
    pm.set_adapter("default")
    assert_trains_exactly(pm, ["lora_B.default.weight"])
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in lorafa_parameters(pm))


def test_add_adapter_then_set_adapter_trains_the_new_b_compiled():
    pm = from_peft(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    pm.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    pm.set_adapter("second")
    assert_trains_exactly(pm, ["lora_B.second.weight"])
    layer = switched(pm)[0]
    a = layer.lora_A["second"].weight.double()
    g = a @ a.t()
    ref = torch.linalg.inv(g + 1e-6 * torch.trace(g) / 2 * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(layer.lorafa_gram_inv_second.double(), ref, rtol=1e-5, atol=1e-6)
    randomize(lorafa_parameters(pm))
    pm.train()
    ids = token_ids()
    torch._dynamo.reset()
    compiled = torch.compile(pm, backend="aot_eager")
    compiled(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in lorafa_parameters(pm)]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_add_adapter_with_bad_config_is_an_error():
    pm = from_peft(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    with pytest.raises(ValueError, match=r"adapter 'bad'.*lora_dropout must be in \[0, 1\)"):
        pm.add_adapter("bad", LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=1.0))


def test_switched_peft_model_pickles():
    pm = from_peft(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    randomize(lorafa_parameters(pm))
    ids = token_ids()
    with torch.no_grad():
        y = pm(input_ids=ids).logits
    again = pickle.loads(pickle.dumps(pm))
    assert type(switched(again)[0]).__module__ == "lorafa_ext.integrations.peft"
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, y, rtol=0, atol=0)
    assert_trains_exactly(again, ["lora_B.default.weight"])


def test_lorafa_layer_base_is_shared():
    model = apply_lorafa(tiny_llama(), TARGETS, 4, 8)
    pm = from_peft(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    ours = [m for _, m in lorafa_layers(model)]
    assert ours and all(isinstance(m, LoRAFALayer) for m in ours)
    assert all(isinstance(m, LoRAFALayer) and not isinstance(m, LoRAFALinear) for m in switched(pm))
    assert type(switched(pm)[0]).forward is LoRAFALinear.forward is LoRAFALayer.forward
    with pytest.raises(TypeError, match="already has a LoRA-FA adapter"):
        LoRAFALinear(ours[0], 2, 4)
    assert isinstance(nn.Linear(2, 2), nn.Module)


# ============================================================================== HF Trainer


def test_trainer_trains_exactly_lorafa_parameters_and_saves_a_peft_adapter(tmp_path):
    from torch.utils.data import Dataset

    class Tokens(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = token_ids(1, 12, seed=i)[0]
            return {"input_ids": ids, "labels": ids}

    base = tiny_llama()
    pm = from_peft(get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=pm, args=args, train_dataset=Tokens())
    trainer.train()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed == lorafa_names(pm) and changed and all("lora_B" in n for n in changed)
    pm.eval()
    ids = token_ids()
    with torch.no_grad():
        y = pm(input_ids=ids).logits
    trainer.save_model(str(tmp_path / "adapter"))
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    again = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, y, rtol=1e-6, atol=1e-6)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = token_ids(1, 12, seed=i)[0]
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("path", ["from_peft", "apply_lorafa"])
def test_trainer_resume_from_checkpoint_continues_bit_for_bit(tmp_path, path):
    def make():
        if path == "from_peft":
            return from_peft(get_peft_model(tiny_llama(), LoraConfig(
                r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.1)))
        return apply_lorafa(tiny_llama(), TARGETS, 4, 8, lora_dropout=0.1)

    def train(model, out, resume=None, save_steps=None):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
            report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0,
            save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        )
        transformers.Trainer(model=model, args=args, train_dataset=_Tokens()).train(resume_from_checkpoint=resume)
        return model

    straight = train(make(), "straight")
    train(make(), "interrupted", save_steps=2)
    resumed = train(make(), "resumed", resume=str(tmp_path / "interrupted" / "checkpoint-2"))
    trained = lorafa_names(straight)
    assert trained and trained == lorafa_names(resumed)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name
