"""End-to-end: one training step (forward, backward, optimizer) of a Llama-architecture model.

The model is built from a ``transformers.LlamaConfig`` with random weights (nothing is downloaded).
LoRA goes on every linear layer of every decoder block (q, k, v, o, gate, up, down), r = 16,
alpha = 32. Methods:

    full         full fine-tuning, torch AdamW over every parameter
    peft_lora    PEFT LoRA (A and B trained), torch AdamW over the adapters
    peft_lorafa  PEFT LoRA-FA: PEFT LoRA layers + ``peft.optimizers.create_lorafa_optimizer``
    lorafa       this package: ``lorafa_ext.apply_lorafa(..., correction=True)``, torch AdamW over
                 ``lorafa_ext.lorafa_parameters(model)``

AdamW is fused on a GPU. A method that runs out of memory is reported as OOM; the comparison is then
repeated at the largest batch (halving) that fits every method.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field, asdict
from typing import Callable, Sequence

import torch

from .memory import SavedTensorCounter
from .micro import _is_oom, _why
from .progress import NullBar
from .variants import DTYPES, peft_available

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
METHOD_LABELS = {"full": "full fine-tuning", "peft_lora": "PEFT LoRA", "peft_lorafa": "PEFT LoRA-FA",
                 "lorafa": "lorafa_ext"}
# Goals on a GPU (the issue): peak memory >= 1.4x lower than PEFT LoRA, tokens/s >= 1.3x PEFT LoRA.
GOAL_MEM = 1.4
GOAL_TOKENS = 1.3


@dataclass
class E2EConfig:
    model: str = "tiny"
    dtype: str = "fp32"
    batch: int = 2
    seq: int = 128
    steps: int = 3
    warmup: int = 1
    r: int = 16
    alpha: int = 32
    grad_ckpt: Sequence[bool] = (False, True)
    dropouts: Sequence[float] = (0.0, 0.05)
    methods: Sequence[str] = METHODS
    lr: float = 1e-4
    adapter_dtype: str = "model"   # "model": adapters in the model's dtype for every method; "fp32"
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


def _apply_lorafa(model, cfg: "E2EConfig", dropout: float, adapter_dtype: torch.dtype):
    from lorafa_ext import apply_lorafa

    return apply_lorafa(model, list(TARGET_MODULES), r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=dropout,
                        correction=True, adapter_dtype=adapter_dtype)


def prepare(method: str, model, cfg: E2EConfig, dropout: float, device):
    """Wrap `model` for `method`; returns (model, optimizer, trainable parameter count)."""
    dtype = DTYPES[cfg.dtype]
    fused = {"fused": True} if torch.device(device).type == "cuda" else {}
    if method == "full":
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        return model, torch.optim.AdamW(params, lr=cfg.lr, **fused), sum(p.numel() for p in params)
    if method in ("peft_lora", "peft_lorafa"):
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=dropout, target_modules=list(TARGET_MODULES),
                          bias="none", task_type="CAUSAL_LM")
        pm = get_peft_model(model, lcfg, autocast_adapter_dtype=cfg.adapter_dtype == "fp32")
        if cfg.adapter_dtype == "model":
            for n, p in pm.named_parameters():
                if "lora_" in n and p.dtype != dtype:
                    p.data = p.data.to(dtype)
        if method == "peft_lora":
            params = [p for p in pm.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.lr, **fused)
        else:
            from peft.optimizers import create_lorafa_optimizer

            opt = create_lorafa_optimizer(pm, r=cfg.r, lora_alpha=cfg.alpha, lr=cfg.lr)
            params = [p for p in pm.parameters() if p.requires_grad]
        return pm, opt, sum(p.numel() for p in params)
    if method == "lorafa":
        from lorafa_ext import lorafa_parameters
        for p in model.parameters():
            p.requires_grad_(False)
        model = _apply_lorafa(model, cfg, dropout, torch.float32 if cfg.adapter_dtype == "fp32" else dtype)
        params = list(lorafa_parameters(model))
        keep = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        return model, torch.optim.AdamW(params, lr=cfg.lr, **fused), sum(p.numel() for p in params)
    raise ValueError(f"unknown method {method!r}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _measure(method: str, cfg: E2EConfig, batch: int, grad_ckpt: bool, dropout: float | None, device,
             row: dict) -> None:
    """Build, wrap, warm up and time one method, filling `row`. Everything it allocates is local, so
    it is all released when this returns or raises (an OOM must not keep a 7B model alive)."""
    if cfg.simulate_oom is not None and cfg.simulate_oom(method, batch):
        raise torch.OutOfMemoryError("simulated out of memory")
    model = build_model(cfg.model_config(), DTYPES[cfg.dtype], device, seed=cfg.seed)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base_params = list(model.parameters())
    model, opt, n_train = prepare(method, model, cfg, dropout or 0.0, device)
    row["trainable_params"] = int(n_train)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    vocab = cfg.model_config()["vocab_size"]
    ids = torch.randint(0, vocab, (batch, cfg.seq), generator=g).to(device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
    # Warm-up. The first step also counts what autograd saves (unique storages); parameters and
    # buffers (rotary tables, cached Gram inverses) are not activations.
    counter = SavedTensorCounter(exclude=base_params + list(model.parameters()) + list(model.buffers()))
    del base_params
    with counter:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del loss
    row["saved_activation_bytes"] = counter.bytes
    row["saved_activation_mib"] = counter.bytes / 2**20
    for _ in range(cfg.warmup - 1):
        _train_step(model, opt, ids)
    _sync(device)
    times, loss = [], None
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        loss = _train_step(model, opt, ids)
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    row["step_ms"] = step_s * 1e3
    row["tokens_per_s"] = batch * cfg.seq / step_s
    lv = float(loss.detach().float()) if loss is not None else None
    row["loss"] = lv if lv is not None and math.isfinite(lv) else None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_mem_bytes"] = int(peak)
        row["peak_mem_gib"] = peak / 2**30


def run_one(method: str, cfg: E2EConfig, batch: int, grad_ckpt: bool, dropout: float | None, device) -> dict:
    """One method at one batch size: tokens/s (median step), peak memory of the steps, saved
    activations. status is "ok", "OOM" or "error: ..."; the numbers are None unless ok."""
    device = torch.device(device)
    row = {"method": method, "label": METHOD_LABELS[method], "batch": batch, "seq": cfg.seq,
           "grad_ckpt": grad_ckpt, "lora_dropout": dropout, "status": "ok", "tokens_per_s": None,
           "step_ms": None, "peak_mem_bytes": None, "peak_mem_gib": None, "saved_activation_bytes": None,
           "saved_activation_mib": None, "trainable_params": None, "loss": None}
    err = None
    with warnings.catch_warnings():
        # transformers/peft deprecation chatter is not a result
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            _measure(method, cfg, batch, grad_ckpt, dropout, device, row)
        except Exception as e:  # noqa: BLE001 - an OOM (or a failure) in one method must not end the run
            err = "OOM" if _is_oom(e) else "error: " + _why(e)
    # the traceback (and with it _measure's frame, model and optimizer) is gone here
    if err is not None:
        row["status"] = err
        for k in ("tokens_per_s", "step_ms", "peak_mem_bytes", "peak_mem_gib", "saved_activation_bytes",
                  "saved_activation_mib", "loss"):
            row[k] = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def available_methods(methods: Sequence[str], notes: list | None = None) -> list:
    methods = [m for m in methods if m in METHODS]
    if not peft_available() and any(m.startswith("peft") for m in methods):
        if notes is not None:
            notes.append("peft is not installed: PEFT end-to-end methods skipped (pip install peft)")
        methods = [m for m in methods if not m.startswith("peft")]
    return methods


def _compare(rows: dict, device, batch: int, requested: int, grad_ckpt: bool, dropout: float) -> dict:
    """Ratios of one setting; rows is {method: row} at one batch."""
    def get(m, k):
        r = rows.get(m)
        return r.get(k) if r and r["status"] == "ok" else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    c = {"grad_ckpt": grad_ckpt, "lora_dropout": dropout, "batch": batch, "requested_batch": requested,
         "tokens_per_s": {m: get(m, "tokens_per_s") for m in rows},
         "peak_mem_gib": {m: get(m, "peak_mem_gib") for m in rows},
         "saved_activation_mib": {m: get(m, "saved_activation_mib") for m in rows},
         "mem_ratio_peft_lora_over_lorafa": ratio(get("peft_lora", "peak_mem_bytes"), get("lorafa", "peak_mem_bytes")),
         "saved_ratio_peft_lora_over_lorafa": ratio(get("peft_lora", "saved_activation_bytes"),
                                                    get("lorafa", "saved_activation_bytes")),
         "tokens_ratio_lorafa_over_peft_lora": ratio(get("lorafa", "tokens_per_s"), get("peft_lora", "tokens_per_s")),
         "tokens_ratio_lorafa_over_peft_lorafa": ratio(get("lorafa", "tokens_per_s"),
                                                      get("peft_lorafa", "tokens_per_s")),
         }
    gpu = torch.device(device).type == "cuda"
    m, t = c["mem_ratio_peft_lora_over_lorafa"], c["tokens_ratio_lorafa_over_peft_lora"]
    c["goal_mem_met"] = (m >= GOAL_MEM) if (gpu and m is not None) else None
    c["goal_tokens_met"] = (t >= GOAL_TOKENS) if (gpu and t is not None) else None
    return c


def run_e2e(cfg: E2EConfig, device, bar=None, notes: list | None = None) -> dict:
    """Every method in every (gradient checkpointing, dropout) setting, with the OOM fallback."""
    bar = bar or NullBar()
    device = torch.device(device)
    notes = notes if notes is not None else []
    methods = available_methods(cfg.methods, notes)
    rows, comparisons = [], []
    full_cache: dict = {}  # full fine-tuning has no LoRA dropout: run once per (grad_ckpt, batch)

    def run(method, batch, ckpt, p):
        if method == "full":
            key = (ckpt, batch)
            if key not in full_cache:
                bar.set_description(f"e2e full b={batch} ckpt={ckpt}")
                full_cache[key] = run_one("full", cfg, batch, ckpt, None, device)
                rows.append(full_cache[key])
            return full_cache[key]
        bar.set_description(f"e2e {method} b={batch} ckpt={ckpt} p={p}")
        r = run_one(method, cfg, batch, ckpt, p, device)
        rows.append(r)
        return r

    order = sorted(methods, key=lambda m: METHODS.index(m))  # the hungriest (full) first
    for ckpt in cfg.grad_ckpt:
        for p in cfg.dropouts:
            at = {m: run(m, cfg.batch, ckpt, p) for m in order}
            bar.update(1)
            failed = [m for m, r in at.items() if r["status"] not in ("ok", "OOM")]
            if failed:
                notes.append(f"e2e grad_ckpt={ckpt} dropout={p}: {', '.join(failed)} failed (not OOM): "
                             f"{at[failed[0]]['status']}")
            if not any(r["status"] == "OOM" for r in at.values()):
                comparisons.append(_compare(at, device, cfg.batch, cfg.batch, ckpt, p))
                continue
            # Something ran out of memory: halve the batch until every method that can run fits.
            b, fit = cfg.batch, None
            runnable = [m for m in order if m not in failed]
            while b > 1 and fit is None:
                b //= 2
                trial = {}
                for m in runnable:
                    trial[m] = run(m, b, ckpt, p)
                    if trial[m]["status"] == "OOM":
                        break
                if len(trial) == len(runnable) and not any(r["status"] == "OOM" for r in trial.values()):
                    fit = trial
            if fit is not None:
                comparisons.append(_compare(fit, device, b, cfg.batch, ckpt, p))
            else:
                notes.append(f"e2e grad_ckpt={ckpt} dropout={p}: no batch size fits every method")
                comparisons.append(_compare(at, device, cfg.batch, cfg.batch, ckpt, p))
    return {"config": cfg.describe(), "methods": methods, "rows": rows, "comparisons": comparisons}
