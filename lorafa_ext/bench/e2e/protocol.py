"""The end-to-end comparison: every method in every (gradient checkpointing, dropout) setting, with
an out-of-memory fallback, memory measured alone and speed measured side by side.

1. Fit and memory. Per setting, every method is probed alone at the requested batch (trainer.probe:
   warm-up steps, peak memory, saved activations); one that runs out of memory is reported as OOM and
   probed again at half the batch until it fits or batch 1 does not (every attempt is a row). The
   LoRA-type methods (all but full fine-tuning) are compared at the largest batch that fits all of
   them; full fine-tuning is shown there when it fits, as OOM otherwise, and is never part of the goals.
2. Speed. Every row that fits is timed: the rows of one batch, across all settings, are built and
   warmed up together and timed in interleaved rounds (trainer.interleaved_times); rows that do not
   fit in memory together are timed in smaller groups. tokens/s comes from the median step, with its
   spread; ratios between two rows of one group are medians of per-round ratios.

Saved activations are counted with saved_tensors_hooks, which non-reentrant gradient checkpointing
overrides with its own: with checkpointing on they are not measured (None), peak memory is the measure.
"""
from __future__ import annotations

import warnings

import torch

from .. import stats
from ..failures import free, is_oom, status_of, why
from ..goals import E2E_GOALS
from ..progress import NullBar
from ..variants import DTYPES, peft_available
from .models import METHOD_LABELS, METHODS, E2EConfig
from .trainer import Trainer, interleaved_times, probe, sync

CKPT_SAVED_NOTE = ("saved activations are n/a with gradient checkpointing: non-reentrant checkpointing installs "
                   "its own saved_tensors_hooks, so the counter would see almost nothing (the same for every "
                   "method); peak memory is the measure there")
_MEASURED = ("tokens_per_s", "step_ms", "step_spread", "peak_mem_bytes", "peak_mem_gib", "saved_activation_bytes",
             "saved_activation_mib", "loss")


def new_row(method: str, cfg: E2EConfig, batch: int, grad_ckpt: bool, dropout: float | None) -> dict:
    return {"method": method, "label": METHOD_LABELS[method], "batch": batch, "seq": cfg.seq,
            "grad_ckpt": grad_ckpt, "lora_dropout": dropout, "status": "ok", **{k: None for k in _MEASURED},
            "trainable_params": None, "samples": 0, "step_samples_ms": [], "timing_group": None, "noisy": []}


def run_one(method: str, cfg: E2EConfig, batch: int, grad_ckpt: bool, dropout: float | None, device,
            notes: list | None = None) -> dict:
    """Probe one method alone at one batch: status "ok", "OOM" or "error: ...", peak memory and saved
    activations (None unless ok). A failing torch.cuda.empty_cache() afterwards goes to `notes`."""
    device = torch.device(device)
    row = new_row(method, cfg, batch, grad_ckpt, dropout)
    err = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers/peft deprecation chatter
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            probe(method, cfg, batch, grad_ckpt, dropout, device, row)
        except Exception as e:  # noqa: BLE001 - an OOM (or a failure) in one method must not end the run
            err = "OOM" if is_oom(e) else "error: " + why(e)
    if err is not None:  # the traceback (and with it the model and optimizer) is gone here
        row.update({k: None for k in _MEASURED}, status=err)
    reason = free(device)
    if reason is not None and notes is not None:
        notes.append(f"e2e {method} batch={batch} grad_ckpt={grad_ckpt} dropout={dropout}: "
                     f"torch.cuda.empty_cache() failed afterwards: {reason}")
    return row


def available_methods(methods, notes: list | None = None) -> list:
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
        sync(device)
    except Exception as e:  # noqa: BLE001
        return why(e)
    return None


# ----------------------------------------------------------------------------------------------
# speed: the rows that fit, timed side by side


def _build_group(rows: list, cfg: E2EConfig, device) -> dict:
    """Trainers for as many of `rows` as fit in memory together, warmed up: {index in rows: Trainer}.
    A row whose trainer fails on its own gets its status set to the error."""
    trainers = {}
    for i, row in enumerate(rows):
        try:
            t = Trainer(row["method"], cfg, row["batch"], row["grad_ckpt"], row["lora_dropout"], device)
            for _ in range(max(1, cfg.warmup)):
                t.step()
            trainers[i] = t
        except Exception as e:  # noqa: BLE001
            if is_oom(e) and trainers:
                break  # the group is full: the others go into the next one
            row.update({k: None for k in _MEASURED}, status="error while timing: " + status_of(e))
    return trainers


def _fill_times(row: dict, times: list, cfg: E2EConfig, group: int) -> None:
    step_s = stats.median(times)
    row.update(step_ms=step_s * 1e3, tokens_per_s=row["batch"] * cfg.seq / step_s, samples=len(times),
               step_spread=stats.rel_iqr(times), step_samples_ms=[t * 1e3 for t in times], timing_group=group)
    row["noisy"] = ["tokens_per_s"] if stats.is_noisy(row["step_spread"], len(times)) else []


def time_rows(rows: list, cfg: E2EConfig, device, bar=None) -> None:
    """Time every "ok" row: the rows of one batch side by side, in groups that fit in memory."""
    bar = bar or NullBar()
    group = 0
    for batch in sorted({r["batch"] for r in rows if r["status"] == "ok"}, reverse=True):
        pending = [r for r in rows if r["status"] == "ok" and r["batch"] == batch]
        while pending:
            bar.set_description(f"e2e timing batch={batch}: {len(pending)} methods side by side")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                trainers = _build_group(pending, cfg, device)
                times = interleaved_times(trainers, cfg.steps, device) if trainers else {}
            for i, ts in times.items():
                _fill_times(pending[i], ts, cfg, group)
            done = set(trainers) | {i for i, r in enumerate(pending) if r["status"] != "ok"}
            trainers = None
            free(device)
            pending = [r for i, r in enumerate(pending) if i not in done]
            group += 1


# ----------------------------------------------------------------------------------------------
# fit: the OOM fallback of one setting


class _Fit:
    """Probes every (method, batch, grad_ckpt, dropout) at most once; rows in the order probed."""

    def __init__(self, cfg: E2EConfig, device, bar, notes: list):
        self.cfg, self.device, self.bar, self.notes = cfg, device, bar, notes
        self.rows, self.done = [], {}

    def key(self, method, batch, ckpt, p):
        return method, batch, ckpt, None if method == "full" else p  # full fine-tuning has no dropout

    def run(self, method, batch, ckpt, p) -> dict:
        k = self.key(method, batch, ckpt, p)
        if k not in self.done:
            self.bar.set_description(f"e2e {method} b={batch} ckpt={ckpt}" + ("" if k[3] is None else f" p={p}"))
            self.done[k] = run_one(method, self.cfg, batch, ckpt, k[3], self.device, notes=self.notes)
            self.rows.append(self.done[k])
        return self.done[k]

    def largest_fit(self, method, ckpt, p) -> int | None:
        """Halve the batch from the requested one while `method` runs out of memory: the largest
        batch that fits, or None (OOM at every batch, or a failure that is not OOM)."""
        b = self.cfg.batch
        r = self.run(method, b, ckpt, p)
        while r["status"] == "OOM" and b > 1:
            b //= 2
            r = self.run(method, b, ckpt, p)
        return b if r["status"] == "ok" else None

    def common_batch(self, lora, never, start, ckpt, p) -> int:
        """b*, the largest batch that fits every LoRA-type method. b* is in every method's halving
        chain; whatever has not run there runs there. Memory is not always monotonic in the batch: a
        method that runs out of memory at b* moves b* down."""
        b = start
        while True:
            at = {m: self.run(m, b, ckpt, p) for m in lora if m not in never}
            if b == 1 or not any(r["status"] == "OOM" for r in at.values()):
                return b
            b //= 2

    def setting(self, order, ckpt, p) -> dict:
        """Probe one setting; returns what its comparison needs."""
        cfg, where = self.cfg, f"e2e grad_ckpt={ckpt} dropout={p}"
        first = {m: self.run(m, cfg.batch, ckpt, p) for m in order}
        failed = [m for m, r in first.items() if r["status"] not in ("ok", "OOM")]
        if failed:
            self.notes.append(f"{where}: {', '.join(failed)} failed (not OOM): {first[failed[0]]['status']}")
        largest = {m: self.largest_fit(m, ckpt, p) for m in order}
        lora = [m for m in order if m != "full" and m not in failed]
        never = [m for m in lora if largest[m] is None]
        fits = [largest[m] for m in lora if largest[m] is not None]
        b = self.common_batch(lora, never, min(fits) if fits else cfg.batch, ckpt, p)
        cnotes = self._notes(order, failed, first, largest, lora, never, b, ckpt, p)
        self.notes.extend(f"{where}: {n}" for n in cnotes)
        keys = {m: self.key(m, b, ckpt, p) for m in order}
        return {"keys": keys, "failed": {m: first[m] for m in failed}, "batch": b, "largest": largest,
                "notes": cnotes, "grad_ckpt": ckpt, "dropout": p}

    def _notes(self, order, failed, first, largest, lora, never, b, ckpt, p) -> list:
        cnotes = []
        if never:
            cnotes.append(f"{', '.join(never)}: OOM at every batch down to 1, compared without")
        if b != self.cfg.batch:
            short = [m for m in lora if m not in never and first[m]["status"] == "OOM"]
            cnotes.append(f"compared at batch {b}, the largest that fits every LoRA-type method "
                          f"(asked {self.cfg.batch}; OOM there: {', '.join(short) or 'none'})")
        if "full" in order and "full" not in failed:
            lf = largest["full"]
            if lf is not None and lf >= b:
                self.run("full", b, ckpt, p)  # fits at a batch >= b*: measure it at b* too
            elif lf is None:
                cnotes.append("full fine-tuning: OOM at every batch down to 1 (not in the comparison)")
            else:
                cnotes.append(f"full fine-tuning: OOM at batch {b}, fits at batch {lf} (not in the comparison)")
        return cnotes


# ----------------------------------------------------------------------------------------------
# comparisons


def _tokens_ratio(a: dict | None, b: dict | None) -> tuple:
    """(tokens/s of a / tokens/s of b, its spread): per-round step ratios when both were timed in one
    group, else the ratio of the medians with the combined spread."""
    if not a or not b or a.get("tokens_per_s") is None or b.get("tokens_per_s") is None:
        return None, None
    if a["timing_group"] == b["timing_group"]:
        return stats.paired_ratio(b["step_samples_ms"], a["step_samples_ms"])
    return (stats.ratio(a["tokens_per_s"], b["tokens_per_s"]),
            stats.combined_spread(a["step_spread"], b["step_spread"]))


def _ok(rows: dict, m: str, k: str):
    r = rows.get(m)
    return r.get(k) if r and r["status"] == "ok" else None


def _ratios(rows: dict, grad_ckpt: bool) -> dict:
    get = lambda m, k: _ok(rows, m, k)  # noqa: E731
    c = {"mem_ratio_peft_lora_over_lorafa": stats.ratio(get("peft_lora", "peak_mem_bytes"),
                                                        get("lorafa", "peak_mem_bytes")),
         "saved_ratio_peft_lora_over_lorafa": None if grad_ckpt else
         stats.ratio(get("peft_lora", "saved_activation_bytes"), get("lorafa", "saved_activation_bytes")),
         "noisy": []}
    ours = rows.get("lorafa") if _ok(rows, "lorafa", "status") else None
    for other in ("peft_lora", "peft_lorafa"):
        theirs = rows.get(other) if _ok(rows, other, "status") else None
        key = f"tokens_ratio_lorafa_over_{other}"
        c[key], c[f"{key}_spread"] = _tokens_ratio(ours, theirs)
        samples = min(ours["samples"], theirs["samples"]) if ours and theirs else 0
        if c[key] is not None and stats.is_noisy(c[f"{key}_spread"], samples):
            c["noisy"].append(key)
    return c


def compare(rows: dict, device, batch: int, requested: int, grad_ckpt: bool, dropout: float,
            largest: dict | None = None, notes=()) -> dict:
    """Ratios of one setting; rows is {method: row} at one batch, `batch`.

    batch                  the batch every number here is at: the largest that fits every LoRA-type
                           method (all but full fine-tuning); requested_batch when nothing ran out of memory
    requested_batch        the batch asked for; batch_reduced: batch < requested_batch
    status                 {method: status at batch}: "ok", "OOM", "error: ...", or "not run"
    largest_fitting_batch  {method: largest batch that fit, halving from requested_batch; None: OOM at
                           every batch down to 1 (or failed)}
    tokens_per_s, peak_mem_gib, saved_activation_mib   {method: value at batch, None unless ok}
    *_ratio_*              ours (lorafa) against PEFT LoRA / PEFT LoRA-FA at batch (tokens ratios with
                           their *_spread; "noisy" lists the ratios too noisy to support); the
                           saved-activation ratio is None with gradient checkpointing (CKPT_SAVED_NOTE)
    goal_mem_met, goal_tokens_met   the goals (goals.E2E_GOALS; GPU only, else None); full
                           fine-tuning never counts; a noisy tokens ratio judges nothing (None)
    notes                  why something is missing or moved, in words
    """
    notes = list(notes) + ([CKPT_SAVED_NOTE] if grad_ckpt else [])
    c = {"grad_ckpt": grad_ckpt, "lora_dropout": dropout, "batch": batch, "requested_batch": requested,
         "batch_reduced": batch != requested,
         "status": {m: (r["status"] if r else "not run") for m, r in rows.items()},
         "largest_fitting_batch": dict(largest) if largest is not None else
         {m: (batch if r and r["status"] == "ok" else None) for m, r in rows.items()},
         **{k: {m: _ok(rows, m, k) for m in rows} for k in ("tokens_per_s", "peak_mem_gib", "saved_activation_mib")},
         **_ratios(rows, grad_ckpt)}
    gpu = c["gpu"] = torch.device(device).type == "cuda"
    mem_key, tok_key = "mem_ratio_peft_lora_over_lorafa", "tokens_ratio_lorafa_over_peft_lora"
    c["goal_mem_met"] = E2E_GOALS[mem_key].met(c[mem_key]) if gpu else None
    c["goal_tokens_met"] = E2E_GOALS[tok_key].met(c[tok_key]) if gpu and tok_key not in c["noisy"] else None
    c["notes"] = notes
    return c


def run_e2e(cfg: E2EConfig, device, bar=None, notes: list | None = None) -> dict:
    """Every method in every (gradient checkpointing, dropout) setting: fit and memory, then speed
    (see the module doc). No method is probed twice at one (batch, grad_ckpt, dropout); full
    fine-tuning has no dropout and runs once per (grad_ckpt, batch)."""
    bar = bar or NullBar()
    device = torch.device(device)
    notes = notes if notes is not None else []
    methods = available_methods(cfg.methods, notes)
    if cfg.quant != "none" and "full" in methods:
        notes.append(f"e2e: full fine-tuning has no {cfg.quant}-quantized variant: skipped")
        methods = [m for m in methods if m != "full"]
    if device.type == "cuda":
        reason = _warm_cublas(device, DTYPES[cfg.dtype])
        if reason is not None:
            notes.append(f"e2e: warming the cuBLAS handles failed: {reason}")
    fit = _Fit(cfg, device, bar, notes)
    order = sorted(methods, key=METHODS.index)
    settings = []
    for ckpt in cfg.grad_ckpt:
        for p in cfg.dropouts:
            settings.append(fit.setting(order, ckpt, p))
            bar.update(1)
    time_rows(fit.rows, cfg, device, bar=bar)
    comparisons = []
    for s in settings:
        at_b = {m: fit.done.get(k) or s["failed"].get(m) for m, k in s["keys"].items()}
        comparisons.append(compare(at_b, device, s["batch"], cfg.batch, s["grad_ckpt"], s["dropout"],
                                   largest=s["largest"], notes=s["notes"]))
    if any(cfg.grad_ckpt):
        notes.append("e2e: " + CKPT_SAVED_NOTE)
    return {"config": cfg.describe(), "methods": methods, "rows": fit.rows, "comparisons": comparisons}
