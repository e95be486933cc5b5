"""Checkpoints that ``transformers.Trainer`` (and TRL's ``SFTTrainer``) write of ``apply_lorafa``
models: adapter-only, reloaded by PEFT, ``load_adapter`` and transformers' ``from_pretrained``
with the same logits; resumed bit for bit; a mismatched resume is an error; what ``apply_lorafa``
attaches survives deepcopy / pickling and ``merge_and_unload`` removes it. Tiny models from configs,
CPU only."""
from __future__ import annotations

import copy
import os
import pickle
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lorafa_ext import apply_lorafa, load_adapter, lorafa_parameters, merge_and_unload  # noqa: E402
from lorafa_ext.integrations.transformers import AdapterSavePretrained, check_adapter_keys  # noqa: E402
from tests.models import VOCAB, tiny_bert_classifier, tiny_llama, token_ids  # noqa: E402

CASES = {
    "llama": (tiny_llama, transformers.AutoModelForCausalLM, dict(target_modules=["q_proj", "v_proj"])),
    "bert": (tiny_bert_classifier, transformers.AutoModelForSequenceClassification,
             dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Examples(torch.utils.data.Dataset):
    def __init__(self, case, n=16):
        self.case, self.n = case, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = token_ids(1, 12, seed=i)[0]
        return {"input_ids": ids, "labels": ids if self.case == "llama" else torch.tensor(i % 3)}


def base_checkpoint(tmp_path, case):
    """A base model saved to disk and reloaded, as from the Hub (its name_or_path is the directory)."""
    path = tmp_path / f"base_{case}"
    if not path.exists():
        CASES[case][0]().save_pretrained(str(path))
    return str(path)


def adapted(tmp_path, case, **kwargs):
    make, auto, targets = CASES[case]
    base = auto.from_pretrained(base_checkpoint(tmp_path, case))
    torch.manual_seed(1)  # the same frozen A in every run
    return apply_lorafa(base, r=4, lora_alpha=8, **targets, **kwargs)


def train(model, case, out, *, max_steps=4, save_steps=None, resume=None):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Examples(case))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", ["llama", "bert"])
def test_save_model_writes_an_adapter_that_reloads_with_the_same_logits(tmp_path, case):
    model = adapted(tmp_path, case, lora_dropout=0.1)
    trainer = train(model, case, tmp_path / "run", max_steps=2)
    assert all(p.abs().sum() > 0 for p in lorafa_parameters(model) if p.dim() == 2)  # B trained away from 0
    ids = token_ids()
    y = logits(model, ids)
    out = str(tmp_path / "saved")
    trainer.save_model(out)
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= files
    assert "config.json" not in files  # from_pretrained(out) takes the base from base_model_name_or_path
    # model.safetensors holds the trainable tensors only, under the model's own keys (for resuming)
    resume_keys = set(load_file(os.path.join(out, "model.safetensors")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= resume_keys and all("lora_" in k or "classifier" in k for k in resume_keys)

    auto = CASES[case][1]
    fresh = auto.from_pretrained(base_checkpoint(tmp_path, case))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(fresh, out), ids), y, rtol=1e-5, atol=1e-6)
    again = auto.from_pretrained(out)  # transformers' PEFT integration: base + adapter
    assert any("lora_B" in n for n, _ in again.named_parameters())
    torch.testing.assert_close(logits(again, ids), y, rtol=1e-5, atol=1e-6)
    ours = load_adapter(auto.from_pretrained(base_checkpoint(tmp_path, case)), out)
    torch.testing.assert_close(logits(ours, ids), y, rtol=0, atol=0)  # the same layers: bit for bit


@pytest.mark.parametrize("case", ["llama", "bert"])
def test_resume_from_checkpoint_continues_bit_for_bit(tmp_path, case):
    straight = adapted(tmp_path, case, lora_dropout=0.1)
    train(straight, case, tmp_path / "straight")
    train(adapted(tmp_path, case, lora_dropout=0.1), case, tmp_path / "interrupted", save_steps=2)
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    assert not any("base_layer" in k for k in load_file(str(checkpoint / "model.safetensors")))
    resumed = adapted(tmp_path, case, lora_dropout=0.1)
    train(resumed, case, tmp_path / "resumed", resume=str(checkpoint))
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name


def test_resume_into_a_differently_adapted_model_is_an_error(tmp_path):
    train(adapted(tmp_path, "llama"), "llama", tmp_path / "run", max_steps=2, save_steps=2)
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    other = apply_lorafa(transformers.AutoModelForCausalLM.from_pretrained(base_checkpoint(tmp_path, "llama")),
                         ["q_proj", "k_proj"], 4, 8)
    with pytest.raises(RuntimeError, match=r"do not match the model's LoRA-FA layers \(missing: \['model.layers.0"
                                           r".self_attn.k_proj.lora_A'.*without a layer here: \['model.layers.0"
                                           r".self_attn.v_proj.lora_A'"):
        train(other, "llama", tmp_path / "other", resume=checkpoint)
    # a state dict without adapter tensors (the plain base's) is no error of the check
    base_sd = transformers.AutoModelForCausalLM.from_pretrained(base_checkpoint(tmp_path, "llama")).state_dict()
    result = other.load_state_dict(base_sd, strict=False)
    assert "model.layers.0.self_attn.k_proj.lora_A" in result.missing_keys


def test_save_pretrained_rejects_what_it_cannot_write(tmp_path):
    model = adapted(tmp_path, "llama")
    with pytest.raises(NotImplementedError, match="push_to_hub=True"):
        model.save_pretrained(str(tmp_path / "x"), push_to_hub=True)
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(str(tmp_path / "x"), safe_serialization=False)


def test_attachments_survive_deepcopy_and_pickle_and_merge_and_unload_removes_them(tmp_path):
    model = adapted(tmp_path, "llama")
    randomize = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lorafa_parameters(model):
            p.copy_(torch.randn(p.shape, generator=randomize) * 0.2)
    ids = token_ids()
    y = logits(model, ids)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(twin.save_pretrained, AdapterSavePretrained) and twin.save_pretrained.model is twin
        assert check_adapter_keys in twin._load_state_dict_post_hooks.values()
        twin.save_pretrained(str(tmp_path / "twin"))
        fresh = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "twin"))
        torch.testing.assert_close(logits(fresh, ids), y, rtol=1e-5, atol=1e-6)
    merged = merge_and_unload(model)
    assert "save_pretrained" not in merged.__dict__
    assert check_adapter_keys not in merged._load_state_dict_post_hooks.values()
    merged.save_pretrained(str(tmp_path / "merged"))  # the class's own: a whole model
    assert "config.json" in os.listdir(tmp_path / "merged")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(logits(again, ids), y, rtol=1e-5, atol=1e-5)


def test_plain_modules_get_nothing_attached():
    model = apply_lorafa(torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], 2, 4)
    assert "save_pretrained" not in model.__dict__ and not model._load_state_dict_post_hooks


# ============================================================================== TRL


def word_tokenizer():
    """A word-level tokenizer over VOCAB tokens, built in memory."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def test_sft_trainer_checkpoint_reloads_and_resumes(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (10,), generator=g)) for _ in range(16)]
    data = datasets.Dataset.from_dict({"text": texts})

    def run(out, resume=None, save_steps=None):
        model = adapted(tmp_path, "llama", lora_dropout=0.1)
        args = trl.SFTConfig(
            output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, report_to=[],
            use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0, max_length=16,
            save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        )
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "interrupted", save_steps=2)
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "interrupted" / "checkpoint-2"))
    for (name, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name
    final = str(tmp_path / "final")
    straight.save_model(final)
    saved = load_file(os.path.join(final, "model.safetensors"))
    live = straight.model.state_dict()
    assert saved and all(torch.equal(t, live[k]) for k, t in saved.items())
    ids = token_ids()
    base = str(tmp_path / "base_llama")
    ours = logits(load_adapter(transformers.AutoModelForCausalLM.from_pretrained(base), final), ids)
    again = logits(transformers.AutoModelForCausalLM.from_pretrained(final), ids)
    pm = logits(PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), final), ids)
    plain = logits(transformers.AutoModelForCausalLM.from_pretrained(base), ids)
    torch.testing.assert_close(again, ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pm, ours, rtol=1e-5, atol=1e-6)
    assert (ours - plain).abs().max() > 1e-3  # the adapter was loaded
    # SFTConfig defaults to bf16 = True: accelerate wraps the trained model's forward in bf16 autocast
    # and leaves it wrapped; unwrapped, the live model computes exactly what the reloads compute
    assert straight.args.bf16
    live = straight.accelerator.unwrap_model(straight.model, keep_fp32_wrapper=False)
    torch.testing.assert_close(logits(live, ids), ours, rtol=0, atol=0)
