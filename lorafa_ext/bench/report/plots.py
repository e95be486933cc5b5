"""PNG plots. Noisy figures (stats.py) are drawn hollow (lines) or hatched (bars), and the legend says so."""
from __future__ import annotations

from typing import Sequence

from ..variants import OURS, PEFT_VARIANTS, VARIANTS

NOISY_LEGEND = "hollow / hatched: noisy (spread too wide to support the figure)"

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


def _ratio_line(ax, pts: dict, ns, key: str, invert: bool, label: str, style: dict) -> None:
    """One line of ratios against N; noisy points hollow. pts is {N: row}; invert plots 1 / ratio."""
    xs = [n for n in ns if n in pts and pts[n].get(key)]
    if not xs:
        return
    ys = [1 / pts[n][key] if invert else pts[n][key] for n in xs]
    line, = ax.plot(xs, ys, label=label, **style)
    noisy = [(x, y) for x, y, n in zip(xs, ys, xs) if key in pts[n].get("noisy", ())]
    if noisy:
        ax.plot(*zip(*noisy), linestyle="none", marker=style.get("marker", "o"), markersize=9,
                markerfacecolor="white", markeredgecolor=line.get_color())


def _panel(ax, title: str, ylabel: str | None) -> None:
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (rows of x)")
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)


def _shape_column(axes, j: int, cur: list, fi: int, fo: int) -> None:
    by = {}
    for x in cur:
        by.setdefault(x["variant"], {})[x["N"]] = x
    ns = sorted({x["N"] for x in cur})
    for v, pts in by.items():
        if v != "cublas":
            _ratio_line(axes[0][j], pts, ns, "fwdbwd_vs_cublas", True, VARIANTS[v].label, _STYLE.get(v, {}))
    _panel(axes[0][j], f"in={fi} out={fo}: vs frozen F.linear",
           "speedup over frozen F.linear (cuBLAS on GPU), fwd+bwd (x)" if j == 0 else None)
    ours = by.get("lorafa", {})
    for v in PEFT_VARIANTS:
        _ratio_line(axes[1][j], ours, ns, f"speedup_vs_{v}", False, f"lorafa vs {VARIANTS[v].label}",
                    _STYLE.get(v, {}))
    _panel(axes[1][j], f"in={fi} out={fo}: lorafa vs PEFT", "speedup over PEFT, fwd+bwd (x)" if j == 0 else None)


def _legends(axes) -> None:
    for row in axes:
        handles, labels = [], []
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        if handles:
            row[-1].legend(handles, labels, fontsize=7, loc="best", title=NOISY_LEGEND, title_fontsize=6)


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
    plt = _plt()
    fig, axes = plt.subplots(2, len(shapes), figsize=(max(7.5, 4.2 * len(shapes) + 1), 8), squeeze=False)
    for j, (fi, fo) in enumerate(shapes):
        _shape_column(axes, j, [x for x in sel if (x["in_features"], x["out_features"]) == (fi, fo)], fi, fo)
    _legends(axes)
    bias = any(x["bias"] for x in sel)
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


def _e2e_groups(e2e: dict) -> list:
    """(label, {method: row}) per (grad ckpt, dropout) comparison: the requested batch (where something
    ran out of memory), then the batch that fits every method."""
    groups = []
    for c in e2e.get("comparisons") or []:
        batches = ([c["requested_batch"]] if c["requested_batch"] != c["batch"] else []) + [c["batch"]]
        for b in batches:
            sel = {r["method"]: r for r in e2e["rows"] if r["grad_ckpt"] == c["grad_ckpt"] and r["batch"] == b and (
                r["lora_dropout"] is None or r["lora_dropout"] == c["lora_dropout"])}
            groups.append((f"ckpt {'on' if c['grad_ckpt'] else 'off'}\ndropout {c['lora_dropout']}\nbatch {b}", sel))
    return groups


def _e2e_bars(ax, groups: list, methods: list, rows: list, key: str) -> None:
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        bars, marks = [], []  # (x, y, noisy), (x, text)
        for g, (_, sel) in enumerate(groups):
            r, x = sel.get(m), g + (i - (len(methods) - 1) / 2) * width
            if r is None:
                continue
            if r["status"] != "ok" or r.get(key) is None:  # not measured (saved with ckpt) is not a failure
                marks.append((x, r["status"] if r["status"] in ("ok", "OOM") else "err"))
            else:
                bars.append((x, r[key], key == "tokens_per_s" and "tokens_per_s" in r.get("noisy", ())))
        label = next((r.get("label") for r in rows if r["method"] == m and r.get("label")), m)
        bars = bars or [(0, 0, False)]  # an empty bar keeps the legend's colour
        ax.bar([b[0] for b in bars], [b[1] for b in bars], width=width, label=label, color=_METHOD_COLORS.get(m),
               hatch=None, edgecolor="black", linewidth=0.3)
        for x, y, noisy in bars:
            if noisy:
                ax.bar([x], [y], width=width, color="white", alpha=0.6, hatch="///", edgecolor="black", linewidth=0.3)
        for x, text in marks:
            ax.text(x, 0, "n/a" if text == "ok" else text, rotation=90, ha="center", va="bottom", fontsize=8)


def plot_e2e(e2e: dict, path: str, device_label: str) -> str | None:
    rows = e2e.get("rows") or []
    if not rows:
        return None
    plt = _plt()
    cfg, methods, groups = e2e["config"], e2e["methods"], _e2e_groups(e2e)
    gpu = any(r.get("peak_mem_gib") is not None for r in rows)
    mem_key, mem_label = ("peak_mem_gib", "peak memory of a step (GiB)") if gpu else \
        ("saved_activation_mib", "saved activations of a step (MiB)")
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.6 * len(groups) + 4), 4.8))
    for ax, key, ylabel in ((axes[0], "tokens_per_s", "tokens/s, median step (higher is better)"),
                            (axes[1], mem_key, mem_label + " (lower is better)")):
        _e2e_bars(ax, groups, methods, rows, key)
        ax.set_xticks(range(len(groups)))
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_xticklabels([g[0] for g in groups], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8, title="hatched: noisy (spread too wide)", title_fontsize=7)
    mc = cfg["model_config"]
    fig.suptitle(f"Training step, {cfg['model']} (hidden {mc['hidden_size']}, {mc['num_hidden_layers']} layers), "
                 f"{cfg['dtype']}, seq {cfg['seq']}, r={cfg['r']} alpha={cfg['alpha']} - {device_label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
