"""The rows of every table (console and markdown share them)."""
from __future__ import annotations

from typing import Sequence

from .format import fmt, fmt_noisy, fmt_spread, fmt_x

MICRO_HEADERS = ["case", "variant", "fwd (us)", "bwd (us)", "fwd+bwd (us)", "fwd+bwd spread", "fwd+bwd TFLOP/s",
                 "fwd+bwd GB/s", "fwd vs F.linear (x)", "fwd+bwd vs F.linear (x)", "speedup vs PEFT LoRA (x)",
                 "samples"]


def _x(row: dict | None, key: str) -> str:
    """A ratio of a row, marked when the row lists it as noisy."""
    if not row:
        return "-"
    return fmt_x(row.get(key), key in row.get("noisy", ()))


def _us(row: dict, p: str) -> str:
    return fmt_noisy(row[f"{p}_us"], f"{p}_us" in row.get("noisy", ()))


def micro_table_rows(rows: Sequence[dict]) -> list:
    return [[r["case"], r["label"], _us(r, "fwd"), _us(r, "bwd"), _us(r, "fwdbwd"), fmt_spread(r.get("fwdbwd_spread")),
             fmt(r["fwdbwd_tflop_per_s"]), fmt(r["fwdbwd_gb_per_s"]), _x(r, "fwd_vs_cublas"),
             _x(r, "fwdbwd_vs_cublas"), _x(r, "speedup_vs_peft_lora"), r["samples"]] for r in rows]


SUMMARY_HEADERS = ["case", "F.linear fwd+bwd (us)", "lorafa fwd+bwd (us)", "lorafa TFLOP/s", "fwd vs F.linear (x)",
                   "fwd+bwd vs frozen (x)", "dropout vs frozen (x)", "correction vs frozen (x)",
                   "speedup vs PEFT LoRA (x)", "vs PEFT LoRA-FA (x)", "vs PEFT compiled (x)"]


def summary_rows(rows: Sequence[dict]) -> list:
    """One line per case: the ratios that matter."""
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["variant"]] = r
    out = []
    for case, v in by_case.items():
        c, o = v.get("cublas"), v.get("lorafa")
        out.append([case, _us(c, "fwdbwd") if c else "-", _us(o, "fwdbwd") if o else "-",
                    fmt(o["fwdbwd_tflop_per_s"]) if o else "-", _x(o, "fwd_vs_cublas"), _x(o, "fwdbwd_vs_cublas"),
                    _x(v.get("lorafa_dropout"), "fwdbwd_vs_cublas"), _x(v.get("lorafa_correction"), "fwdbwd_vs_cublas"),
                    _x(o, "speedup_vs_peft_lora"), _x(o, "speedup_vs_peft_lorafa"),
                    _x(o, "speedup_vs_peft_lora_compiled")])
    return out


MEMORY_HEADERS = ["case", "variant", "saved activations (bytes)", "saved activations (MiB)", "saved tensors",
                  "peak fwd+bwd (MiB)"]


def memory_table_rows(rows: Sequence[dict]) -> list:
    return [[r["case"], r["label"], fmt(r["saved_bytes"]), fmt(r["saved_mib"]), r["saved_tensors"],
             fmt(r["peak_fwdbwd_mib"])] for r in rows]


E2E_HEADERS = ["grad ckpt", "lora dropout", "method", "batch x seq", "status", "tokens/s", "step (ms)",
               "step spread", "samples", "peak memory (GiB)", "saved activations (MiB)", "trainable params"]


def e2e_table_rows(rows: Sequence[dict]) -> list:
    def saved(r):  # not measured with gradient checkpointing (see e2e.CKPT_SAVED_NOTE)
        return "n/a" if r["grad_ckpt"] and r["status"] == "ok" else fmt(r["saved_activation_mib"])

    def noisy(r):
        return "tokens_per_s" in r.get("noisy", ())

    return [["on" if r["grad_ckpt"] else "off", "-" if r["lora_dropout"] is None else r["lora_dropout"], r["label"],
             f"{r['batch']} x {r['seq']}", r["status"], fmt_noisy(r["tokens_per_s"], noisy(r)),
             fmt_noisy(r["step_ms"], noisy(r)), fmt_spread(r.get("step_spread")), r.get("samples", 0),
             fmt(r["peak_mem_gib"]), saved(r), fmt(r["trainable_params"])] for r in rows]


COMPARE_HEADERS = ["grad ckpt", "lora dropout", "batch", "largest fitting batch", "full fine-tuning",
                   "peak mem PEFT LoRA / ours (x)", "saved act PEFT LoRA / ours (x)", "tokens/s ours / PEFT LoRA (x)",
                   "tokens/s ours / PEFT LoRA-FA (x)", "memory goal", "speed goal"]


def _full_cell(c: dict) -> str:
    """Full fine-tuning at the compared batch: ok, OOM (with its own largest fitting batch), or absent."""
    st = (c.get("status") or {}).get("full")
    if st is None:
        return "-"
    if st != "OOM":
        return st
    lf = (c.get("largest_fitting_batch") or {}).get("full")
    return "OOM at every batch" if lf is None else f"OOM (fits at {lf})"


def _goal_cell(met, goal, noisy: bool = False) -> str:
    if noisy:
        return f"{goal}: too noisy to judge"
    return f"{goal}: n/a" if met is None else f"{goal}: " + ("met" if met else "MISSED")


def compare_table_rows(comps: Sequence[dict]) -> list:
    from ..goals import E2E_GOALS

    mem_goal, tok_goal = E2E_GOALS["mem_ratio_peft_lora_over_lorafa"], E2E_GOALS["tokens_ratio_lorafa_over_peft_lora"]

    def largest(c):
        lf = c.get("largest_fitting_batch") or {}
        return ", ".join(f"{m} {'OOM' if b is None else b}" for m, b in lf.items()) or "-"

    def saved(c):
        v = c["saved_ratio_peft_lora_over_lorafa"]
        return "n/a (ckpt)" if v is None and c["grad_ckpt"] else fmt_x(v)

    return [["on" if c["grad_ckpt"] else "off", c["lora_dropout"],
             f"{c['batch']}" + ("" if c["batch"] == c["requested_batch"] else f" (asked {c['requested_batch']})"),
             largest(c), _full_cell(c), fmt_x(c["mem_ratio_peft_lora_over_lorafa"]), saved(c),
             _x(c, "tokens_ratio_lorafa_over_peft_lora"), _x(c, "tokens_ratio_lorafa_over_peft_lorafa"),
             _goal_cell(c["goal_mem_met"], mem_goal),
             _goal_cell(c["goal_tokens_met"], tok_goal,
                        c.get("gpu", False) and "tokens_ratio_lorafa_over_peft_lora" in c.get("noisy", ()))]
            for c in comps]


HEADLINE_TEXT = {
    "fwd_vs_cublas": "lorafa forward / F.linear forward (time, lower is better)",
    "fwdbwd_vs_frozen": "lorafa fwd+bwd / frozen F.linear fwd+bwd (time, lower is better)",
    "fwdbwd_dropout_vs_frozen": "lorafa dropout 0.1 fwd+bwd / frozen F.linear fwd+bwd (time, lower is better)",
    "speedup_vs_peft": "PEFT LoRA fwd+bwd / lorafa fwd+bwd (speedup, higher is better)",
    "speedup_vs_peft_compiled": "compiled PEFT LoRA fwd+bwd / lorafa fwd+bwd (speedup, higher is better)",
}
HEADLINE_HEADERS = ["ratio", "value", "spread", "meaning"]


def headline_rows(h: dict) -> list:
    spread, noisy = h.get("spread") or {}, h.get("noisy") or ()
    return [[k, fmt_x(h.get(k), k in noisy), fmt_spread(spread.get(k)), text] for k, text in HEADLINE_TEXT.items()]
