"""Tables (console and markdown), results.json and PNG plots."""
from __future__ import annotations

import json
import math
import os
import platform
from typing import Sequence

import torch

from .variants import OURS, PEFT_VARIANTS, VARIANTS


# ----------------------------------------------------------------------------------------------
# formatting

def fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.{digits}g}" if a < 10 else f"{v:.2f}"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def text_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# device description

def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)".replace("  ", " ")


def module_versions(names) -> dict:
    """{module: __version__ or None when it does not import}."""
    out = {}
    for mod in names:
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing or broken optional package is just "None"
            out[mod] = None
    return out


# ----------------------------------------------------------------------------------------------
# tables

MICRO_HEADERS = ["case", "variant", "fwd (us)", "bwd (us)", "fwd+bwd (us)", "fwd+bwd TFLOP/s", "fwd+bwd GB/s",
                 "fwd vs F.linear (x)", "fwd+bwd vs F.linear (x)", "speedup vs PEFT LoRA (x)", "samples"]


def micro_table_rows(rows: Sequence[dict]) -> list:
    out = []
    for r in rows:
        out.append([r["case"], r["label"], fmt(r["fwd_us"]), fmt(r["bwd_us"]), fmt(r["fwdbwd_us"]),
                    fmt(r["fwdbwd_tflop_per_s"]), fmt(r["fwdbwd_gb_per_s"]), fmt_x(r.get("fwd_vs_cublas")),
                    fmt_x(r.get("fwdbwd_vs_cublas")), fmt_x(r.get("speedup_vs_peft_lora")), r["samples"]])
    return out


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

        def t(name, p="fwdbwd"):
            return v[name][f"{p}_us"] if name in v else None

        def ratio(a, b):
            return a / b if a is not None and b else None

        out.append([case, fmt(t("cublas")), fmt(t("lorafa")), fmt(o["fwdbwd_tflop_per_s"]) if o else "-",
                    fmt_x(ratio(t("lorafa", "fwd"), t("cublas", "fwd"))), fmt_x(ratio(t("lorafa"), t("cublas"))),
                    fmt_x(ratio(t("lorafa_dropout"), t("cublas"))), fmt_x(ratio(t("lorafa_correction"), t("cublas"))),
                    fmt_x(ratio(t("peft_lora"), t("lorafa"))), fmt_x(ratio(t("peft_lorafa"), t("lorafa"))),
                    fmt_x(ratio(t("peft_lora_compiled"), t("lorafa")))])
        del c
    return out


MEMORY_HEADERS = ["case", "variant", "saved activations (bytes)", "saved activations (MiB)", "saved tensors",
                  "peak fwd+bwd (MiB)"]


def memory_table_rows(rows: Sequence[dict]) -> list:
    return [[r["case"], r["label"], fmt(r["saved_bytes"]), fmt(r["saved_mib"]), r["saved_tensors"],
             fmt(r["peak_fwdbwd_mib"])] for r in rows]


E2E_HEADERS = ["grad ckpt", "lora dropout", "method", "batch x seq", "status", "tokens/s", "step (ms)",
               "peak memory (GiB)", "saved activations (MiB)", "trainable params"]


def e2e_table_rows(rows: Sequence[dict]) -> list:
    def saved(r):  # not measured with gradient checkpointing (see e2e.CKPT_SAVED_NOTE)
        return "n/a" if r["grad_ckpt"] and r["status"] == "ok" else fmt(r["saved_activation_mib"])

    return [["on" if r["grad_ckpt"] else "off", "-" if r["lora_dropout"] is None else r["lora_dropout"], r["label"],
             f"{r['batch']} x {r['seq']}", r["status"], fmt(r["tokens_per_s"]), fmt(r["step_ms"]),
             fmt(r["peak_mem_gib"]), saved(r), fmt(r["trainable_params"])] for r in rows]


COMPARE_HEADERS = ["grad ckpt", "lora dropout", "batch", "largest fitting batch", "full fine-tuning",
                   "peak mem PEFT LoRA / ours (x)", "saved act PEFT LoRA / ours (x)", "tokens/s ours / PEFT LoRA (x)",
                   "tokens/s ours / PEFT LoRA-FA (x)", "memory goal >= 1.4x", "speed goal >= 1.3x"]


def _full_cell(c: dict) -> str:
    """Full fine-tuning at the compared batch: ok, OOM (with its own largest fitting batch), or absent."""
    st = (c.get("status") or {}).get("full")
    if st is None:
        return "-"
    if st != "OOM":
        return st
    lf = (c.get("largest_fitting_batch") or {}).get("full")
    return "OOM at every batch" if lf is None else f"OOM (fits at {lf})"


def compare_table_rows(comps: Sequence[dict]) -> list:
    def goal(v):
        return "n/a" if v is None else ("met" if v else "MISSED")

    def largest(c):
        lf = c.get("largest_fitting_batch") or {}
        return ", ".join(f"{m} {'OOM' if b is None else b}" for m, b in lf.items()) or "-"

    def saved(c):
        v = c["saved_ratio_peft_lora_over_lorafa"]
        return "n/a (ckpt)" if v is None and c["grad_ckpt"] else fmt_x(v)

    return [["on" if c["grad_ckpt"] else "off", c["lora_dropout"],
             f"{c['batch']}" + ("" if c["batch"] == c["requested_batch"] else f" (asked {c['requested_batch']})"),
             largest(c), _full_cell(c), fmt_x(c["mem_ratio_peft_lora_over_lorafa"]), saved(c),
             fmt_x(c["tokens_ratio_lorafa_over_peft_lora"]), fmt_x(c["tokens_ratio_lorafa_over_peft_lorafa"]),
             goal(c["goal_mem_met"]), goal(c["goal_tokens_met"])] for c in comps]


HEADLINE_TEXT = {
    "fwd_vs_cublas": "lorafa forward / F.linear forward (time, lower is better)",
    "fwdbwd_vs_frozen": "lorafa fwd+bwd / frozen F.linear fwd+bwd (time, lower is better)",
    "fwdbwd_dropout_vs_frozen": "lorafa dropout 0.1 fwd+bwd / frozen F.linear fwd+bwd (time, lower is better)",
    "speedup_vs_peft": "PEFT LoRA fwd+bwd / lorafa fwd+bwd (speedup, higher is better)",
    "speedup_vs_peft_compiled": "compiled PEFT LoRA fwd+bwd / lorafa fwd+bwd (speedup, higher is better)",
}


def headline_rows(h: dict) -> list:
    return [[k, fmt_x(h.get(k)), text] for k, text in HEADLINE_TEXT.items()]


# ----------------------------------------------------------------------------------------------
# JSON

def sanitize(obj, path="", found=None):
    """Replace NaN/inf by None (JSON has no NaN); found collects the paths that had them."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            if found is not None:
                found.append(path)
            return None
        return obj
    if isinstance(obj, dict):
        return {str(k): sanitize(v, f"{path}.{k}", found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(path: str, results: dict) -> list:
    found: list = []
    clean = sanitize(results, "", found)
    with open(path, "w") as f:
        json.dump(clean, f, indent=1, allow_nan=False)
        f.write("\n")
    return found


# ----------------------------------------------------------------------------------------------
# markdown report

def _skipped_lines(suite: dict) -> list:
    skipped = suite.get("skipped") or []
    if not skipped:
        return []
    return ["Skipped:", ""] + [f"- {s['case']} {s['variant']}: {s['reason']}" for s in skipped] + [""]


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = ["# lorafa_ext benchmarks", "",
             f"- device: {meta['device_name']} ({meta['device']})",
             f"- torch {meta['torch']}, lorafa_ext backend: {meta['backend']}, peft: {meta.get('peft') or 'not installed'}, "
             f"transformers: {meta.get('transformers') or 'not installed'}",
             f"- date: {meta['date']}; command: `{meta['command']}`", ""]
    lines += ["Times are medians of side-by-side samples (CUDA events on a GPU, perf_counter on the CPU), in "
              "microseconds. TFLOP/s and GB/s use each variant's own FLOPs and its compulsory traffic (every "
              "operand read once, every result written once). W and bias are frozen in every variant.", ""]
    micro = results.get("micro")
    if micro:
        h = micro.get("headline")
        if h:
            lines += [f"## Headline ({h['shape']})", "", md_table(["ratio", "value", "meaning"], headline_rows(h)), ""]
        if micro["cases"]:
            lines += ["## Microbenchmarks: summary", "", md_table(SUMMARY_HEADERS, summary_rows(micro["cases"])), ""]
            lines += ["## Microbenchmarks: every variant", "", md_table(MICRO_HEADERS, micro_table_rows(micro["cases"])), ""]
        lines += _skipped_lines(micro)
    mem = results.get("memory")
    if mem:
        lines += ["## Activation memory per layer", "",
                  "Saved activations: unique storages saved for backward (saved_tensors_hooks), parameters "
                  "excluded. Peak: CUDA max_memory_allocated during one forward+backward above what was "
                  "allocated before it (CUDA only).", "",
                  md_table(MEMORY_HEADERS, memory_table_rows(mem["cases"])), ""]
        lines += _skipped_lines(mem)
    e2e = results.get("e2e")
    if e2e:
        c = e2e["config"]
        mc = c["model_config"]
        lines += ["## End-to-end training step", "",
                  f"Llama-architecture model from a transformers config, random weights: {c['model']} "
                  f"(hidden {mc['hidden_size']}, intermediate {mc['intermediate_size']}, {mc['num_hidden_layers']} "
                  f"layers, vocab {mc['vocab_size']}), {c['dtype']}, LoRA on every linear layer of the decoder "
                  f"blocks, r = {c['r']}, alpha = {c['alpha']}. Step = forward + backward + optimizer; tokens/s from "
                  f"the median of {c['steps']} steps after {c['warmup']} warm-up.", "",
                  md_table(E2E_HEADERS, e2e_table_rows(e2e["rows"])), "",
                  "A method that runs out of memory is run again at half the batch until it fits (every attempt "
                  "is a row above). The comparison is at the largest batch that fits every LoRA-type method "
                  "(PEFT LoRA, PEFT LoRA-FA, ours); full fine-tuning is shown there when it fits, as OOM "
                  "otherwise, and is not part of the goals (ours against PEFT LoRA, GPU only). Saved "
                  "activations are n/a with gradient checkpointing (its own saved-tensor hooks hide them); "
                  "peak memory is the measure there.", "",
                  md_table(COMPARE_HEADERS, compare_table_rows(e2e["comparisons"])), ""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in results["plots"]] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# plots

_STYLE = {
    "lorafa": dict(color="tab:red", marker="o"),
    "lorafa_dropout": dict(color="tab:orange", marker="s"),
    "lorafa_correction": dict(color="tab:brown", marker="^"),
    "peft_lora": dict(color="tab:blue", marker="o", linestyle="--"),
    "peft_lorafa": dict(color="tab:cyan", marker="s", linestyle="--"),
    "peft_lora_compiled": dict(color="tab:purple", marker="D", linestyle=":"),
    "peft_lorafa_compiled": dict(color="tab:pink", marker="v", linestyle=":"),
    "cublas": dict(color="black", marker="x"),
}
_METHOD_COLORS = {"full": "tab:gray", "peft_lora": "tab:blue", "peft_lorafa": "tab:cyan", "lorafa": "tab:red"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup_vs_n(rows: Sequence[dict], path: str, device_label: str, r: int | None = None,
                      dtype: str | None = None) -> str | None:
    """Two rows of panels, one column per (in, out): speedup over frozen F.linear (cuBLAS) and
    our op's speedup over each PEFT variant, fwd+bwd, against N."""
    if not rows:
        return None
    dtype = dtype or rows[0]["dtype"]
    rs = sorted({x["r"] for x in rows if x["dtype"] == dtype})
    if not rs:
        return None
    r = r if r in rs else (16 if 16 in rs else rs[0])
    sel = [x for x in rows if x["dtype"] == dtype and x["r"] == r]
    shapes = sorted({(x["in_features"], x["out_features"]) for x in sel}, key=lambda s: (s[0] * s[1], s))
    if not shapes:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(shapes), figsize=(max(7.5, 4.2 * len(shapes) + 1), 8), squeeze=False)
    bias = any(x["bias"] for x in sel)
    for j, (fi, fo) in enumerate(shapes):
        cur = [x for x in sel if x["in_features"] == fi and x["out_features"] == fo]
        by = {}
        for x in cur:
            by.setdefault(x["variant"], {})[x["N"]] = x
        ns = sorted({x["N"] for x in cur})
        ax = axes[0][j]
        base = by.get("cublas", {})
        for v, pts in by.items():
            if v == "cublas":
                continue
            xs = [n for n in ns if n in pts and n in base]
            if xs:
                ax.plot(xs, [base[n]["fwdbwd_us"] / pts[n]["fwdbwd_us"] for n in xs], label=VARIANTS[v].label,
                        **_STYLE.get(v, {}))
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_title(f"in={fi} out={fo}: vs frozen F.linear", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (rows of x)")
        if j == 0:
            ax.set_ylabel("speedup over frozen F.linear (cuBLAS on GPU), fwd+bwd (x)", fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes[1][j]
        ours = by.get("lorafa", {})
        for v in PEFT_VARIANTS:
            pts = by.get(v, {})
            xs = [n for n in ns if n in pts and n in ours]
            if xs:
                ax.plot(xs, [pts[n]["fwdbwd_us"] / ours[n]["fwdbwd_us"] for n in xs],
                        label=f"lorafa vs {VARIANTS[v].label}", **_STYLE.get(v, {}))
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_title(f"in={fi} out={fo}: lorafa vs PEFT", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (rows of x)")
        if j == 0:
            ax.set_ylabel("speedup over PEFT, fwd+bwd (x)")
        ax.grid(alpha=0.3)
    for row in axes:
        handles, labels = [], []
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        if handles:
            row[-1].legend(handles, labels, fontsize=7, loc="best")
    fig.suptitle(f"LoRA-FA layer, forward+backward speedup against N\n{device_label}, {dtype}, r={r}"
                 + (", with bias" if bias else ", no bias"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_saved_vs_seqlen(rows: Sequence[dict], path: str, device_label: str) -> str | None:
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    by = {}
    for x in rows:
        by.setdefault(x["variant"], []).append(x)
    zero = []
    for v, pts in sorted(by.items(), key=lambda kv: kv[0] in OURS):  # ours drawn last, on top
        pts = sorted((p for p in pts if p["saved_bytes"] > 0), key=lambda x: x["N"])
        if not pts:  # nothing saved (the frozen F.linear): no point on a log axis
            zero.append(VARIANTS[v].label)
            continue
        ax.plot([p["N"] for p in pts], [p["saved_mib"] for p in pts], label=VARIANTS[v].label,
                **_STYLE.get(v, {}))
    x0 = rows[0]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens per layer call, batch 1)")
    ax.set_ylabel("saved activations per layer (MiB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"Saved activations vs sequence length - {device_label}\n{x0['dtype']}, in={x0['in_features']} "
                 f"out={x0['out_features']} r={x0['r']}"
                 + (f"; saves nothing (0 B): {', '.join(zero)}" if zero else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_e2e(e2e: dict, path: str, device_label: str) -> str | None:
    comps = e2e.get("comparisons") or []
    rows = e2e.get("rows") or []
    if not rows:
        return None
    plt = _plt()
    cfg = e2e["config"]
    methods = e2e["methods"]
    # one group per (grad ckpt, dropout) at the compared batch
    groups = []
    for c in comps:
        # the requested batch (where something ran out of memory), then the batch that fits every method
        batches = ([c["requested_batch"]] if c["requested_batch"] != c["batch"] else []) + [c["batch"]]
        for b in batches:
            sel = {}
            for r in rows:
                if r["grad_ckpt"] == c["grad_ckpt"] and r["batch"] == b and (
                        r["lora_dropout"] is None or r["lora_dropout"] == c["lora_dropout"]):
                    sel[r["method"]] = r
            groups.append((f"ckpt {'on' if c['grad_ckpt'] else 'off'}\ndropout {c['lora_dropout']}\nbatch {b}", sel))
    gpu = any(r.get("peak_mem_gib") is not None for r in rows)
    mem_key, mem_label = ("peak_mem_gib", "peak memory of a step (GiB)") if gpu else \
        ("saved_activation_mib", "saved activations of a step (MiB)")
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.6 * len(groups) + 4), 4.8))
    width = 0.8 / max(1, len(methods))
    for ax, key, ylabel in ((axes[0], "tokens_per_s", "tokens/s (higher is better)"),
                            (axes[1], mem_key, mem_label + " (lower is better)")):
        for i, m in enumerate(methods):
            xs, ys, oom = [], [], []
            for g, (_, sel) in enumerate(groups):
                r = sel.get(m)
                x = g + (i - (len(methods) - 1) / 2) * width
                if r is None:
                    continue
                if r["status"] != "ok" or r.get(key) is None:
                    # not measured (saved activations with checkpointing) is not a failure
                    oom.append((x, r["status"] if r["status"] != "ok" else "n/a"))
                    continue
                xs.append(x)
                ys.append(r[key])
            label = next((r.get("label") for r in rows if r["method"] == m and r.get("label")), m)
            if not xs:  # no bar at all (full fine-tuning OOM everywhere): an empty one keeps the legend's colour
                xs, ys = [0], [0]
            ax.bar(xs, ys, width=width, label=label, color=_METHOD_COLORS.get(m))
            for x, st in oom:
                ax.text(x, 0, st if st in ("OOM", "n/a") else "err", rotation=90, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(groups)))
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_xticklabels([g[0] for g in groups], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    mc = cfg["model_config"]
    fig.suptitle(f"Training step, {cfg['model']} (hidden {mc['hidden_size']}, {mc['num_hidden_layers']} layers), "
                 f"{cfg['dtype']}, seq {cfg['seq']}, r={cfg['r']} alpha={cfg['alpha']} - {device_label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
