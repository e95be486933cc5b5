"""Microbenchmarks: every variant of one layer, side by side, over a sweep of shapes.

Each row is one (case, variant): median fwd / bwd / fwd+bwd times with their spreads, TFLOP/s and
GB/s, and its ratios against F.linear and (ours) against each PEFT variant. A ratio is the median of
per-round ratios (the variants were sampled in the same rounds), with its own spread; the keys of
the noisy ones (stats.is_noisy) are listed in the row's "noisy".
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import stats
from .failures import free, is_oom_text, status_of, why
from .progress import NullBar
from .timing import PASSES, TimingConfig, measure, summarize
from .variants import (OURS, PEFT_VARIANTS, VARIANTS, Case, build_step, flops, make_sets, peft_available,
                       rotation_count, traffic_bytes)

HEADLINE_KEYS = ("fwd_vs_cublas", "fwdbwd_vs_frozen", "fwdbwd_dropout_vs_frozen", "speedup_vs_peft",
                 "speedup_vs_peft_compiled")
# headline key -> (variant whose row holds it, key in that row)
_HEADLINE_SOURCES = {"fwd_vs_cublas": ("lorafa", "fwd_vs_cublas"),
                     "fwdbwd_vs_frozen": ("lorafa", "fwdbwd_vs_cublas"),
                     "fwdbwd_dropout_vs_frozen": ("lorafa_dropout", "fwdbwd_vs_cublas"),
                     "speedup_vs_peft": ("lorafa", "speedup_vs_peft_lora"),
                     "speedup_vs_peft_compiled": ("lorafa", "speedup_vs_peft_lora_compiled")}


def available_variants(names: Sequence[str], notes: list | None = None) -> list:
    """Drop PEFT variants (with a note) when peft is not installed."""
    names = [n for n in names if n in VARIANTS]
    if any(VARIANTS[n].peft for n in names) and not peft_available():
        if notes is not None:
            notes.append("peft is not installed: PEFT variants skipped (pip install peft)")
        names = [n for n in names if not VARIANTS[n].peft]
    return names


def _measure_case(case: Case, variants: Sequence[str], device, timing: TimingConfig, rotate, seed, skipped):
    """(samples, failures) of one case; raises on a failure that hits the whole case (e.g. OOM)."""
    sets = make_sets(case, device, rotate or rotation_count(case, device), seed=seed)
    steps = {}
    for name in variants:
        try:
            steps[name] = build_step(name, case, sets)
        except Exception as e:  # noqa: BLE001
            skipped.append({"case": case.label, "variant": name, "reason": "build failed: " + why(e)})
    return measure(steps, device, timing)


def run_case(case: Case, variants: Sequence[str], device, timing: TimingConfig, rotate: int | None = None,
             seed: int = 0) -> tuple:
    """Measure one case. Returns (rows, skipped); rows are dicts with median times in microseconds."""
    device = torch.device(device)
    skipped, err = [], None
    if any(VARIANTS[v].compiled for v in variants):
        torch._dynamo.reset()  # fresh compile cache per case (keeps clear of the recompile limit)
    try:
        samples, failures = _measure_case(case, variants, device, timing, rotate, seed, skipped)
    except Exception as e:  # noqa: BLE001 - OOM (or anything) on one case must not end the sweep
        err = status_of(e)
    free(device)  # the tensors held by the traceback are gone once the except block has ended
    if err is not None:
        return [], skipped + [{"case": case.label, "variant": n, "reason": err} for n in variants]
    for name, reason in failures.items():
        skipped.append({"case": case.label, "variant": name, "reason": "OOM" if is_oom_text(reason) else reason})
    return rows_of(case, samples, device), skipped


def _base_row(case: Case, name: str, device) -> dict:
    return {"case": case.label, "device": str(device.type), "N": case.N, "in_features": case.in_features,
            "out_features": case.out_features, "r": case.r, "dtype": case.dtype, "bias": case.bias,
            "variant": name, "label": VARIANTS[name].label}


def _add_work(row: dict, case: Case, name: str) -> None:
    fl, by = flops(case, VARIANTS[name]), traffic_bytes(case, VARIANTS[name])
    for p in PASSES:
        t = row[f"{p}_us"] * 1e-6
        row[f"{p}_tflop_per_s"] = fl[p] / t / 1e12 if t > 0 else 0.0
        row[f"{p}_gb_per_s"] = by[p] / t / 1e9 if t > 0 else 0.0
    row["fwdbwd_gflop"] = fl["fwdbwd"] / 1e9
    row["fwdbwd_mb"] = by["fwdbwd"] / 1e6


def _add_ratio(row: dict, key: str, num, den) -> None:
    """row[key] = median of num[i] / den[i], row[key + "_spread"] its spread; noisy keys listed."""
    row[key], row[f"{key}_spread"] = stats.paired_ratio(num, den)
    if row[key] is not None and stats.is_noisy(row[f"{key}_spread"], min(len(num), len(den))):
        row["noisy"].append(key)


def rows_of(case: Case, samples: dict, device) -> list:
    """One row per measured variant of `case` (see the module doc)."""
    samples = {n: s for n, s in samples.items() if len(s)}
    base = samples.get("cublas")
    rows = []
    for name, s in samples.items():
        row = _base_row(case, name, device)
        row.update(summarize(s))
        row["noisy"] = [f"{p}_us" for p in PASSES if stats.is_noisy(row[f"{p}_spread"], len(s))]
        _add_work(row, case, name)
        if base is not None:
            _add_ratio(row, "fwd_vs_cublas", s.fwd, base.fwd)
            _add_ratio(row, "fwdbwd_vs_cublas", s.fwdbwd, base.fwdbwd)
        if name in OURS:
            for p in PEFT_VARIANTS:
                if p in samples:
                    _add_ratio(row, f"speedup_vs_{p}", samples[p].fwdbwd, s.fwdbwd)
        rows.append(row)
    return rows


def run_sweep(cases: Sequence[Case], variants: Sequence[str], device, timing: TimingConfig,
              compile_for: Callable[[Case], bool] | None = None, rotate: int | None = None, bar=None,
              seed: int = 0) -> dict:
    """Measure every case. compile_for(case) says whether the torch.compile'd variants run on it.
    Returns {"cases": rows, "skipped": [{"case", "variant", "reason"}]}."""
    bar = bar or NullBar()
    rows, skipped = [], []
    for case in cases:
        vs = list(variants)
        if compile_for is not None and not compile_for(case):
            vs = [v for v in vs if not VARIANTS[v].compiled]
        bar.set_description(f"micro {case.label}")
        r, s = run_case(case, vs, device, timing, rotate=rotate, seed=seed)
        rows += r
        skipped += s
        bar.update(1)
    return {"cases": rows, "skipped": skipped}


def find_rows(rows: Sequence[dict], case: Case) -> dict:
    """{variant: row} of one case."""
    return {r["variant"]: r for r in rows if r["case"] == case.label}


def headline_from_rows(rows: Sequence[dict], case: Case) -> dict:
    """The five headline ratios of one case (None where a variant is missing), their spreads
    ("spread": {key: spread}) and the noisy ones ("noisy": [key]).

    fwd_vs_cublas            lorafa forward / F.linear forward                 (time ratio, lower is better)
    fwdbwd_vs_frozen         lorafa fwd+bwd / frozen F.linear fwd+bwd          (time ratio, lower is better)
    fwdbwd_dropout_vs_frozen lorafa dropout 0.1 fwd+bwd / frozen F.linear      (time ratio, lower is better)
    speedup_vs_peft          PEFT LoRA fwd+bwd / lorafa fwd+bwd                (speedup, higher is better)
    speedup_vs_peft_compiled compiled PEFT LoRA fwd+bwd / lorafa fwd+bwd       (speedup, higher is better)
    """
    by = find_rows(rows, case)
    head = {"shape": case.label + (" with bias" if case.bias else ""), "spread": {}, "noisy": []}
    for key, (variant, src) in _HEADLINE_SOURCES.items():
        row = by.get(variant, {})
        head[key] = row.get(src)
        head["spread"][key] = row.get(f"{src}_spread")
        if src in row.get("noisy", ()):
            head["noisy"].append(key)
    return head
