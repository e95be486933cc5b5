"""The models and methods of the end-to-end suite: a Llama-architecture model built from a
transformers config with random weights (nothing is downloaded), wrapped for each method.

LoRA goes on every linear layer of every decoder block (q, k, v, o, gate, up, down), r = 16,
alpha = 32. Methods:

    full         full fine-tuning, torch AdamW over every parameter
    peft_lora    PEFT LoRA (A and B trained), torch AdamW over the adapters
    peft_lorafa  PEFT LoRA-FA: PEFT LoRA layers + ``peft.optimizers.create_lorafa_optimizer``
    lorafa       this package: ``lorafa_ext.apply_lorafa(..., correction=True)``, torch AdamW over
                 ``lorafa_ext.lorafa_parameters(model)``

AdamW is fused on a GPU.

QLoRA (``E2EConfig.quant``: "nf4", "fp4" or "int8"): the seven projections of every decoder block
are bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers (compute in the model's dtype), as
transformers loads a model in 4 or 8 bit, and the three LoRA methods train adapters over them: PEFT
QLoRA (PEFT's bitsandbytes LoRA layers), PEFT's LoRA-FA optimizer over those, and QLoRA-FA
(``apply_lorafa`` over the quantized layers). Full fine-tuning has no quantized variant.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from ..variants import DTYPES

MODEL_PRESETS = {
    # Llama-2-7B's shapes (the LoRA-FA paper's setting).
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    # A small model for the CPU: same architecture, minutes become seconds.
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1024, max_position_embeddings=1024, rms_norm_eps=1e-5),
    # The smallest thing that runs (tests).
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5),
}
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("full", "peft_lora", "peft_lorafa", "lorafa")
QUANTS = ("none", "nf4", "fp4", "int8")
METHOD_LABELS = {"full": "full fine-tuning", "peft_lora": "PEFT LoRA", "peft_lorafa": "PEFT LoRA-FA",
                 "lorafa": "lorafa_ext"}
CKPT_SAVED_NOTE = ("saved activations are n/a with gradient checkpointing: non-reentrant checkpointing installs "
                   "its own saved_tensors_hooks, so the counter would see almost nothing (the same for every "
                   "method); peak memory is the measure there")


@dataclass
class E2EConfig:
    model: str = "tiny"
    dtype: str = "fp32"
    batch: int = 2
    seq: int = 128
    steps: int = 9             # timed steps per method, one per interleaved round
    warmup: int = 2            # untimed steps first (the first one allocates the optimizer state)
    r: int = 16
    alpha: int = 32
    grad_ckpt: Sequence[bool] = (False, True)
    dropouts: Sequence[float] = (0.0, 0.05)
    methods: Sequence[str] = METHODS
    lr: float = 1e-4
    adapter_dtype: str = "model"   # "model": adapters in the model's dtype for every method; "fp32"
    quant: str = "none"            # "nf4", "fp4", "int8": bitsandbytes-quantized projections (QLoRA)
    seed: int = 0
    # Test hook: simulate_oom(method, batch) -> True raises torch.OutOfMemoryError in that run.
    simulate_oom: Callable | None = field(default=None, repr=False)

    def model_config(self) -> dict:
        return dict(MODEL_PRESETS[self.model])

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("simulate_oom", None)
        d["grad_ckpt"] = list(self.grad_ckpt)
        d["dropouts"] = list(self.dropouts)
        d["methods"] = list(self.methods)
        d["model_config"] = self.model_config()
        return d


def build_model(model_cfg: dict, dtype: torch.dtype, device, seed: int = 0):
    """A LlamaForCausalLM with random weights, created directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**model_cfg)
    cfg.use_cache = False
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    model.train()
    return model


def quantize_projections(model, quant: str, dtype: torch.dtype, device):
    """Replace the TARGET_MODULES projections of `model` by bitsandbytes layers holding their weights
    quantized ("nf4", "fp4": ``Linear4bit`` computing in `dtype`; "int8": ``Linear8bitLt``), in place,
    and mark the model as transformers marks one loaded in 4 or 8 bit (PEFT then builds its
    bitsandbytes LoRA layers)."""
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGET_MODULES]
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent, lin = model.get_submodule(parent_name), model.get_submodule(name)
        w = lin.weight.detach().to("cpu", torch.float32)
        if quant == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, lin.bias is not None, has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(w.to(dtype), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, compute_dtype=dtype,
                                  quant_type=quant)
            q.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type=quant)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.detach().cpu(), requires_grad=False)
        setattr(parent, child, q.to(device))  # the move quantizes
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = quant != "int8", quant == "int8"
    return model


def _apply_lorafa(model, cfg: "E2EConfig", dropout: float, adapter_dtype: torch.dtype):
    from lorafa_ext import apply_lorafa

    return apply_lorafa(model, list(TARGET_MODULES), r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=dropout,
                        correction=True, adapter_dtype=adapter_dtype)


def _fused(device) -> dict:
    return {"fused": True} if torch.device(device).type == "cuda" else {}


def _prepare_full(model, cfg: E2EConfig, device):
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    return model, torch.optim.AdamW(params, lr=cfg.lr, **_fused(device)), params


def _prepare_peft(method: str, model, cfg: E2EConfig, dropout: float, device):
    from peft import LoraConfig, get_peft_model

    dtype = DTYPES[cfg.dtype]
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=dropout, target_modules=list(TARGET_MODULES),
                      bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, lcfg, autocast_adapter_dtype=cfg.adapter_dtype == "fp32")
    if cfg.adapter_dtype == "model":
        for n, p in pm.named_parameters():
            if "lora_" in n and p.dtype != dtype:
                p.data = p.data.to(dtype)
    if method == "peft_lora":
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=cfg.lr, **_fused(device))
    else:
        from peft.optimizers import create_lorafa_optimizer

        opt = create_lorafa_optimizer(pm, r=cfg.r, lora_alpha=cfg.alpha, lr=cfg.lr)  # freezes A
    return pm, opt, [p for p in pm.parameters() if p.requires_grad]


def _prepare_lorafa(model, cfg: E2EConfig, dropout: float, device):
    from lorafa_ext import lorafa_parameters

    for p in model.parameters():
        p.requires_grad_(False)
    adapter_dtype = torch.float32 if cfg.adapter_dtype == "fp32" else DTYPES[cfg.dtype]
    model = _apply_lorafa(model, cfg, dropout, adapter_dtype)
    params = list(lorafa_parameters(model))
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model, torch.optim.AdamW(params, lr=cfg.lr, **_fused(device)), params


def prepare(method: str, model, cfg: E2EConfig, dropout: float, device):
    """Wrap `model` for `method`; returns (model, optimizer, trainable parameter count)."""
    if method == "full":
        model, opt, params = _prepare_full(model, cfg, device)
    elif method in ("peft_lora", "peft_lorafa"):
        model, opt, params = _prepare_peft(method, model, cfg, dropout, device)
    elif method == "lorafa":
        model, opt, params = _prepare_lorafa(model, cfg, dropout, device)
    else:
        raise ValueError(f"unknown method {method!r}")
    return model, opt, sum(p.numel() for p in params)
