"""Microbenchmarks: every variant of one layer, side by side, over a sweep of shapes."""
from __future__ import annotations

import gc
from typing import Callable, Iterable, Sequence

import torch

from .progress import NullBar
from .timing import TimingConfig, measure, summarize
from .variants import (OURS, PEFT_VARIANTS, VARIANTS, Case, build_step, flops, make_sets, peft_available,
                       rotation_count, traffic_bytes)

# The CUDA issue's sweep and headline.
GPU_NS = (512, 2048, 8192, 32768)
GPU_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192))
GPU_RANKS = (8, 16, 64, 128)
GPU_DTYPES = ("bf16", "fp16")
GPU_HEADLINE = Case(8192, 4096, 4096, 16, "bf16", True)
# The CPU speed case: fp32, x 4096 x 1024, W 1024 x 1024, r = 16.
CPU_HEADLINE = Case(4096, 1024, 1024, 16, "fp32", True)

HEADLINE_KEYS = ("fwd_vs_cublas", "fwdbwd_vs_frozen", "fwdbwd_dropout_vs_frozen", "speedup_vs_peft",
                 "speedup_vs_peft_compiled")


def sweep(ns: Iterable[int], shapes: Iterable[tuple], ranks: Iterable[int], dtypes: Iterable[str],
          bias: bool = True) -> list:
    return [Case(n, i, o, r, dt, bias) for dt in dtypes for (i, o) in shapes for r in ranks for n in ns]


def available_variants(names: Sequence[str], notes: list | None = None) -> list:
    """Drop PEFT variants (with a note) when peft is not installed."""
    names = [n for n in names if n in VARIANTS]
    if any(VARIANTS[n].peft for n in names) and not peft_available():
        if notes is not None:
            notes.append("peft is not installed: PEFT variants skipped (pip install peft)")
        names = [n for n in names if not VARIANTS[n].peft]
    return names


def _free(device) -> str | None:
    """gc, then torch.cuda.empty_cache() on a GPU. Never raises: after a sticky CUDA error (an illegal
    address) empty_cache raises too, and that must not end the whole run. Returns None, or the error
    (which is also logged)."""
    gc.collect()
    if torch.device(device).type != "cuda":
        return None
    try:
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        import logging

        why = _why(e)
        logging.getLogger(__name__).warning("torch.cuda.empty_cache() failed: %s", why)
        return why
    return None


def _why(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:300]


def _is_oom_text(msg: str) -> bool:
    """An "out of memory" message, or cuBLAS failing to allocate (a handle or its workspace created
    near the memory limit)."""
    return "out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg


def _is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError, or an error whose message says the memory ran out."""
    return isinstance(e, torch.OutOfMemoryError) or _is_oom_text(str(e))


def run_case(case: Case, variants: Sequence[str], device, timing: TimingConfig, rotate: int | None = None,
             seed: int = 0) -> tuple:
    """Measure one case. Returns (rows, skipped); rows are dicts with median times in microseconds."""
    device = torch.device(device)
    skipped = []
    if any(VARIANTS[v].compiled for v in variants):
        torch._dynamo.reset()  # fresh compile cache per case (keeps clear of the recompile limit)
    sets, steps, err = None, {}, None
    try:
        k = rotate or rotation_count(case, device)
        sets = make_sets(case, device, k, seed=seed)
        for name in variants:
            try:
                steps[name] = build_step(name, case, sets)
            except Exception as e:  # noqa: BLE001
                skipped.append({"case": case.label, "variant": name, "reason": "build failed: " + _why(e)})
        samples, failures = measure(steps, device, timing)
    except Exception as e:  # noqa: BLE001 - OOM (or anything) on one case must not end the sweep
        err = "OOM" if _is_oom(e) else _why(e)
    if err is not None:  # tensors held by the traceback are gone once the except block has ended
        sets = steps = None
        _free(device)
        return [], skipped + [{"case": case.label, "variant": n, "reason": err} for n in variants]
    for name, why in failures.items():
        skipped.append({"case": case.label, "variant": name, "reason": "OOM" if _is_oom_text(why) else why})
    sets = steps = None
    _free(device)
    rows = _rows(case, samples, device)
    return rows, skipped


def _rows(case: Case, samples: dict, device) -> list:
    stats = {n: summarize(s) for n, s in samples.items() if len(s)}
    rows = []
    base = stats.get("cublas")
    for name, st in stats.items():
        v = VARIANTS[name]
        fl, by = flops(case, v), traffic_bytes(case, v)
        row = {
            "case": case.label, "device": str(device.type), "N": case.N, "in_features": case.in_features,
            "out_features": case.out_features, "r": case.r, "dtype": case.dtype, "bias": case.bias,
            "variant": name, "label": v.label,
        }
        row.update({k: st[k] for k in ("fwd_us", "bwd_us", "fwdbwd_us", "fwdbwd_iqr_us", "samples")})
        for p in ("fwd", "bwd", "fwdbwd"):
            t = st[f"{p}_us"] * 1e-6
            row[f"{p}_tflop_per_s"] = fl[p] / t / 1e12 if t > 0 else 0.0
            row[f"{p}_gb_per_s"] = by[p] / t / 1e9 if t > 0 else 0.0
        row["fwdbwd_gflop"] = fl["fwdbwd"] / 1e9
        row["fwdbwd_mb"] = by["fwdbwd"] / 1e6
        if base:
            row["fwd_vs_cublas"] = _ratio(st["fwd_us"], base["fwd_us"])
            row["fwdbwd_vs_cublas"] = _ratio(st["fwdbwd_us"], base["fwdbwd_us"])
        if name in OURS:
            for p in PEFT_VARIANTS:
                if p in stats:
                    row[f"speedup_vs_{p}"] = _ratio(stats[p]["fwdbwd_us"], st["fwdbwd_us"])
        rows.append(row)
    return rows


def _ratio(a, b):
    return a / b if b and b > 0 else None


def run_sweep(cases: Sequence[Case], variants: Sequence[str], device, timing: TimingConfig,
              compile_for: Callable[[Case], bool] | None = None, rotate: int | None = None, bar=None,
              seed: int = 0) -> dict:
    """Measure every case. compile_for(case) says whether the torch.compile'd variants run on it."""
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
    """The five headline ratios of one case (None where a variant is missing).

    fwd_vs_cublas            lorafa forward / F.linear forward                 (time ratio, lower is better)
    fwdbwd_vs_frozen         lorafa fwd+bwd / frozen F.linear fwd+bwd          (time ratio, lower is better)
    fwdbwd_dropout_vs_frozen lorafa dropout 0.1 fwd+bwd / frozen F.linear      (time ratio, lower is better)
    speedup_vs_peft          PEFT LoRA fwd+bwd / lorafa fwd+bwd                (speedup, higher is better)
    speedup_vs_peft_compiled compiled PEFT LoRA fwd+bwd / lorafa fwd+bwd       (speedup, higher is better)
    """
    by = find_rows(rows, case)

    def t(v, p="fwdbwd"):
        return by[v][f"{p}_us"] if v in by else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    return {
        "shape": case.label + (" with bias" if case.bias else ""),
        "fwd_vs_cublas": ratio(t("lorafa", "fwd"), t("cublas", "fwd")),
        "fwdbwd_vs_frozen": ratio(t("lorafa"), t("cublas")),
        "fwdbwd_dropout_vs_frozen": ratio(t("lorafa_dropout"), t("cublas")),
        "speedup_vs_peft": ratio(t("peft_lora"), t("lorafa")),
        "speedup_vs_peft_compiled": ratio(t("peft_lora_compiled"), t("lorafa")),
    }
