"""End-to-end: one training step (forward, backward, optimizer) of a Llama-architecture model.

The model is built from a ``transformers.LlamaConfig`` with random weights (nothing is downloaded).
LoRA goes on every linear layer of every decoder block (q, k, v, o, gate, up, down), r = 16,
alpha = 32. Methods:

    full         full fine-tuning, torch AdamW over every parameter
    peft_lora    PEFT LoRA (A and B trained), torch AdamW over the adapters
    peft_lorafa  PEFT LoRA-FA: PEFT LoRA layers + ``peft.optimizers.create_lorafa_optimizer``
    lorafa       this package: ``lorafa_ext.apply_lorafa(..., correction=True)``, torch AdamW over
                 ``lorafa_ext.lorafa_parameters(model)``

AdamW is fused on a GPU. A method that runs out of memory is reported as OOM, and run again at half the
batch until it fits (every attempt is a row). The LoRA-type methods (all but full fine-tuning) are
compared at the largest batch that fits all of them; full fine-tuning is shown there when it fits, as
OOM otherwise, and is never part of the goals (ours against PEFT LoRA).

Saved activations are counted with saved_tensors_hooks, which non-reentrant gradient checkpointing
overrides with its own: with checkpointing on they are not measured (None), peak memory is the measure.
"""
from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field, asdict
from typing import Callable, Sequence

import torch

from .memory import SavedTensorCounter
from .micro import _free, _is_oom, _why
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
CKPT_SAVED_NOTE = ("saved activations are n/a with gradient checkpointing: non-reentrant checkpointing installs "
                   "its own saved_tensors_hooks, so the counter would see almost nothing (the same for every "
                   "method); peak memory is the measure there")


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
    # buffers (rotary tables, cached Gram inverses) are not activations. Not with gradient
    # checkpointing: its own saved_tensors_hooks hide the saved tensors from ours (CKPT_SAVED_NOTE).
    counter = None if grad_ckpt else \
        SavedTensorCounter(exclude=base_params + list(model.parameters()) + list(model.buffers()))
    del base_params
    with counter or contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del loss
    if counter is not None:
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


def run_one(method: str, cfg: E2EConfig, batch: int, grad_ckpt: bool, dropout: float | None, device,
            notes: list | None = None) -> dict:
    """One method at one batch size: tokens/s (median step), peak memory of the steps, saved
    activations (None with gradient checkpointing). status is "ok", "OOM" or "error: ..."; the numbers
    are None unless ok. A failing torch.cuda.empty_cache() afterwards goes to `notes`."""
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
    why = _free(device)
    if why is not None and notes is not None:
        notes.append(f"e2e {method} batch={batch} grad_ckpt={grad_ckpt} dropout={dropout}: "
                     f"torch.cuda.empty_cache() failed afterwards: {why}")
    return row


def available_methods(methods: Sequence[str], notes: list | None = None) -> list:
    methods = [m for m in methods if m in METHODS]
    if not peft_available() and any(m.startswith("peft") for m in methods):
        if notes is not None:
            notes.append("peft is not installed: PEFT end-to-end methods skipped (pip install peft)")
        methods = [m for m in methods if not m.startswith("peft")]
    return methods


def _warm_cublas(device, dtype: torch.dtype) -> str | None:
    """Create the cuBLAS (and cuBLASLt) handles and workspaces of this thread and of the autograd
    thread now, with a tiny matmul + backward: created later, near the memory limit, their allocation
    fails (CUBLAS_STATUS_ALLOC_FAILED), which is not the method's fault. Returns None or the error."""
    try:
        x = torch.randn(16, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(16, 16, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(16, device=device, dtype=dtype, requires_grad=True)
        torch.nn.functional.linear(x @ w, w, b).float().sum().backward()
        _sync(device)
    except Exception as e:  # noqa: BLE001
        return _why(e)
    return None


def _compare(rows: dict, device, batch: int, requested: int, grad_ckpt: bool, dropout: float,
             largest: dict | None = None, notes: Sequence[str] = ()) -> dict:
    """Ratios of one setting; rows is {method: row} at one batch, `batch`.

    batch                  the batch every number here is at: the largest that fits every LoRA-type
                           method (all but full fine-tuning); requested_batch when nothing ran out of memory
    requested_batch        the batch asked for; batch_reduced: batch < requested_batch
    status                 {method: status at batch}: "ok", "OOM", "error: ...", or "not run"
    largest_fitting_batch  {method: largest batch that fit, halving from requested_batch; None: OOM at
                           every batch down to 1 (or failed)}
    tokens_per_s, peak_mem_gib, saved_activation_mib   {method: value at batch, None unless ok}
    *_ratio_*              ours (lorafa) against PEFT LoRA / PEFT LoRA-FA at batch; the saved-activation
                           ratio is None with gradient checkpointing (CKPT_SAVED_NOTE)
    goal_mem_met, goal_tokens_met   the goals (GPU only, else None); full fine-tuning never counts
    notes                  why something is missing or moved, in words
    """
    def get(m, k):
        r = rows.get(m)
        return r.get(k) if r and r["status"] == "ok" else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    notes = list(notes)
    if grad_ckpt:
        notes.append(CKPT_SAVED_NOTE)
    c = {"grad_ckpt": grad_ckpt, "lora_dropout": dropout, "batch": batch, "requested_batch": requested,
         "batch_reduced": batch != requested,
         "status": {m: (r["status"] if r else "not run") for m, r in rows.items()},
         "largest_fitting_batch": dict(largest) if largest is not None else
         {m: (batch if r and r["status"] == "ok" else None) for m, r in rows.items()},
         "tokens_per_s": {m: get(m, "tokens_per_s") for m in rows},
         "peak_mem_gib": {m: get(m, "peak_mem_gib") for m in rows},
         "saved_activation_mib": {m: get(m, "saved_activation_mib") for m in rows},
         "mem_ratio_peft_lora_over_lorafa": ratio(get("peft_lora", "peak_mem_bytes"), get("lorafa", "peak_mem_bytes")),
         "saved_ratio_peft_lora_over_lorafa": None if grad_ckpt else
         ratio(get("peft_lora", "saved_activation_bytes"), get("lorafa", "saved_activation_bytes")),
         "tokens_ratio_lorafa_over_peft_lora": ratio(get("lorafa", "tokens_per_s"), get("peft_lora", "tokens_per_s")),
         "tokens_ratio_lorafa_over_peft_lorafa": ratio(get("lorafa", "tokens_per_s"),
                                                      get("peft_lorafa", "tokens_per_s")),
         }
    gpu = torch.device(device).type == "cuda"
    m, t = c["mem_ratio_peft_lora_over_lorafa"], c["tokens_ratio_lorafa_over_peft_lora"]
    c["goal_mem_met"] = (m >= GOAL_MEM) if (gpu and m is not None) else None
    c["goal_tokens_met"] = (t >= GOAL_TOKENS) if (gpu and t is not None) else None
    c["notes"] = notes
    return c


def run_e2e(cfg: E2EConfig, device, bar=None, notes: list | None = None) -> dict:
    """Every method in every (gradient checkpointing, dropout) setting, with the OOM fallback.

    Per setting, every method runs at the requested batch; one that runs out of memory runs again at
    half the batch until it fits or batch 1 does not (every attempt is a row), which gives each method's
    largest fitting batch. The LoRA-type methods (all but "full") are compared at b*, the largest batch
    that fits all of them (each is run there if it has not been). Full fine-tuning is in the comparison
    when it fits at b* and shown as OOM otherwise (with its own largest fitting batch); it is never part
    of the goals. No method runs twice at one (batch, grad_ckpt, dropout); full fine-tuning has no
    dropout and runs once per (grad_ckpt, batch).
    """
    bar = bar or NullBar()
    device = torch.device(device)
    notes = notes if notes is not None else []
    methods = available_methods(cfg.methods, notes)
    if device.type == "cuda":
        why = _warm_cublas(device, DTYPES[cfg.dtype])
        if why is not None:
            notes.append(f"e2e: warming the cuBLAS handles failed: {why}")
    rows, comparisons = [], []
    done: dict = {}  # (method, batch, grad_ckpt, dropout) -> row; dropout None for full fine-tuning

    def key(method, batch, ckpt, p):
        return method, batch, ckpt, None if method == "full" else p

    def run(method, batch, ckpt, p):
        k = key(method, batch, ckpt, p)
        if k not in done:
            bar.set_description(f"e2e {method} b={batch} ckpt={ckpt}" + ("" if k[3] is None else f" p={p}"))
            done[k] = run_one(method, cfg, batch, ckpt, k[3], device, notes=notes)
            rows.append(done[k])
        return done[k]

    def largest_fit(method, ckpt, p):
        """Halve the batch from the requested one while `method` runs out of memory: the largest
        batch that fits, or None (OOM at every batch, or a failure that is not OOM)."""
        b = cfg.batch
        r = run(method, b, ckpt, p)
        while r["status"] == "OOM" and b > 1:
            b //= 2
            r = run(method, b, ckpt, p)
        return b if r["status"] == "ok" else None

    order = sorted(methods, key=lambda m: METHODS.index(m))
    for ckpt in cfg.grad_ckpt:
        for p in cfg.dropouts:
            where = f"e2e grad_ckpt={ckpt} dropout={p}"
            first = {m: run(m, cfg.batch, ckpt, p) for m in order}
            failed = [m for m, r in first.items() if r["status"] not in ("ok", "OOM")]
            if failed:
                notes.append(f"{where}: {', '.join(failed)} failed (not OOM): {first[failed[0]]['status']}")
            largest = {m: largest_fit(m, ckpt, p) for m in order}
            lora = [m for m in order if m != "full" and m not in failed]
            never = [m for m in lora if largest[m] is None]
            fits = [largest[m] for m in lora if largest[m] is not None]
            b = min(fits) if fits else cfg.batch
            # b* is in every method's halving chain; run there whatever has not run there. Memory is not
            # always monotonic in the batch: a method that runs out of memory at b* moves b* down.
            while True:
                at = {m: run(m, b, ckpt, p) for m in lora if m not in never}
                if b == 1 or not any(r["status"] == "OOM" for r in at.values()):
                    break
                b //= 2
            cnotes = []
            if never:
                cnotes.append(f"{', '.join(never)}: OOM at every batch down to 1, compared without")
            if b != cfg.batch:
                short = [m for m in lora if m not in never and first[m]["status"] == "OOM"]
                cnotes.append(f"compared at batch {b}, the largest that fits every LoRA-type method "
                              f"(asked {cfg.batch}; OOM there: {', '.join(short) or 'none'})")
            if "full" in order and "full" not in failed:
                lf = largest["full"]
                if lf is not None and lf >= b:
                    run("full", b, ckpt, p)  # fits at a batch >= b*: measure it at b* too
                elif lf is None:
                    cnotes.append("full fine-tuning: OOM at every batch down to 1 (not in the comparison)")
                else:
                    cnotes.append(f"full fine-tuning: OOM at batch {b}, fits at batch {lf} (not in the comparison)")
            at_b = {m: done.get(key(m, b, ckpt, p)) or (first[m] if m in failed else None) for m in order}
            notes.extend(f"{where}: {n}" for n in cnotes)
            comparisons.append(_compare(at_b, device, b, cfg.batch, ckpt, p, largest=largest, notes=cnotes))
            bar.update(1)
    if any(cfg.grad_ckpt):
        notes.append("e2e: " + CKPT_SAVED_NOTE)
    return {"config": cfg.describe(), "methods": methods, "rows": rows, "comparisons": comparisons}
