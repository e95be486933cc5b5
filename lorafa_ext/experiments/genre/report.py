"""results.md of the genre experiment."""
from __future__ import annotations

from lorafa_ext.bench.goals import GENRE_MAX_GAP_TO_LORA_PTS


def _pm(mean, std, scale=100.0, fmt="{:.1f}"):
    return f"{fmt.format(scale * mean)} ± {fmt.format(scale * std)}"


def _intro(out: dict) -> list:
    m, size = out["meta"], out["meta"]["size"]
    L = [f"# Shakespeare genre with all-MiniLM-L6-v2: {size['name']} run", ""]
    device = m["device"] if "thread" in m["device"] else f"{m['device']} ({m['threads']} threads)"
    L.append(f"`{m['command']}` on {device}, {m['date']}, "
             f"lorafa backend `{m['lorafa_backend']}`, torch {m['versions']['torch']}, transformers "
             f"{m['versions']['transformers']}, peft {m['versions']['peft']}; total {m['wall_s'] / 60:.1f} min"
             + (f" ({m['wall_s_earlier_parts'] / 60:.1f} of them in the parts --resume continued)."
                if m.get("wall_s_earlier_parts") else "."))
    L.append("")
    L.append(f"Budget per run: {size['steps']} steps, batch {size['batch']} passages of {size['seq_len']} tokens, "
             f"{m['schedule']}; {m['optimizer']}. Precision: {m['precision']}. Learning rate: {m['selection']}. "
             f"{size['seeds']} seeds. Adapters on {', '.join(m['target_modules'])} (36 layers), alpha = 2r; "
             f"head: {m['head']}, trainable in every method. Data-aware A: init_from_data on {m['init_from_data']}.")
    L.append("")
    return L


def _data(out: dict) -> list:
    d = out["data"]
    L = []
    L.append("## Data")
    L.append("")
    L.append("| split | plays (comedy / tragedy / history) | passages (all) | passages evaluated |")
    L.append("|---|---|---|---|")
    for s in ("train", "val", "test"):
        pp = d["plays_per_genre"][s]
        pa = d["passages_all"][s]
        pu = d["passages_used"][s]
        fmt = lambda c: f"{c['comedy']} / {c['tragedy']} / {c['history']}"  # noqa: E731
        L.append(f"| {s} | {fmt(pp)} | {fmt(pa)} | {fmt(pu) if s != 'train' else 'all (' + d['train_sampling'] + ')'} |")
    L.append("")
    L.append(f"Majority class of the training passages: **{d['majority_class']}**; always answering it scores "
             f"{100 * d['majority_baseline']['val']:.1f}% on validation and "
             f"**{100 * d['majority_baseline']['test']:.1f}%** on test"
             + (f" (the best constant answer scores {100 * d['best_constant_baseline']['test']:.1f}% on test)."
                if "best_constant_baseline" in d else "."))
    L.append("")
    return L


def _results(out: dict) -> list:
    m = out["meta"]
    L = []
    L.append("## Results (test accuracy, mean ± std over seeds, at the learning rate picked on validation)")
    L.append("")
    L.append("| method | r | trainable params | lr | val acc (%) | test acc (%) | vs PEFT LoRA (pts, 95% CI) | "
             "balanced test acc (%) | train wall time / run (s) | ms / step | peak memory (MiB) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for res in out["results"]:
        L.append(f"| {res['label']} | {res['r'] if res['r'] is not None else 'all'} | {res['trainable_params']:,} | "
                 f"{res['lr_selected']:g}{'' if not res.get('lr_from') else ' (from ' + res['lr_from'] + ')'} | "
                 f"{_pm(res['val_acc_final_mean'], res['val_acc_final_std'])} | "
                 f"**{_pm(res['test_acc_mean'], res['test_acc_std'])}** | {_vs_baseline(out, res)} | "
                 f"{_pm(res['test_balanced_acc_mean'], res['test_balanced_acc_std'])} | "
                 f"{_pm(res['train_wall_s_mean'], res['train_wall_s_std'], 1.0)} | {res['ms_per_step_mean']:.0f} | "
                 f"{res['peak_memory_mib']:.1f} |")
    L.append("")
    kind = out["results"][0]["peak_memory_kind"] if out["results"] else ""
    L.append(f"Peak memory: {kind}. Wall times are of the training steps alone (no evaluation)"
             + ("; this machine was shared with other work, so they are noisy." if "cpu" in m["device"] else "."))
    L.append("")
    return L


def _ci(d: dict) -> str:
    return f"{d['diff_pts']:+.1f} [{d['ci_lo_pts']:+.1f}, {d['ci_hi_pts']:+.1f}]"


def _vs_baseline(out: dict, res: dict) -> str:
    if res["method"] == out.get("baseline"):
        return "(baseline)"
    r = res["r"]
    ranks = [str(r)] if r is not None else [str(x) for x in out["meta"]["size"]["ranks"]]
    cells = [(k, out.get("paired", {}).get(k, {}).get(res["method"])) for k in ranks]
    cells = [(k, d) for k, d in cells if d]
    if not cells:
        return "n/a"
    if r is not None:
        return _ci(cells[0][1])
    return "; ".join(f"r={k}: {_ci(d)}" for k, d in cells)


def _paired(out: dict) -> list:
    if not out.get("paired"):
        return []
    L = ["## Paired differences against PEFT LoRA (test accuracy, points)", ""]
    L.append("Each method minus PEFT LoRA at the same rank, per (seed, test passage), averaged; the same batches, "
             "head initialisation and passages for both. 95% percentile bootstrap intervals, resampling seeds and "
             "passages (the goal's interval), and resampling seeds and whole test plays (wider: passages of a play "
             "are right or wrong together).")
    L.append("")
    L.append("| r | method | difference | 95% CI (passages, seeds) | 95% CI (plays, seeds) | seeds x passages |")
    L.append("|---|---|---|---|---|---|")
    labels = {x["method"]: x["label"] for x in out["results"]}
    for r, rows in out["paired"].items():
        for m, d in rows.items():
            L.append(f"| {r} | {labels.get(m, m)} | {d['diff_pts']:+.2f} | [{d['ci_lo_pts']:+.2f}, {d['ci_hi_pts']:+.2f}] | "
                     f"[{d['ci_plays_lo_pts']:+.2f}, {d['ci_plays_hi_pts']:+.2f}] | {d['seeds']} x {d['passages']} |")
    L.append("")
    return L


def _lr_sweep(out: dict) -> list:
    L = []
    L.append("### Learning-rate sweep (final validation accuracy, %)")
    L.append("")
    L.append("| method | r | " + " | ".join(["lr / val"] * max(len(x["lr_grid"]) for x in out["results"])) + " |")
    L.append("|---|---|" + "---|" * max(len(x["lr_grid"]) for x in out["results"]))
    for res in out["results"]:
        cells = [f"{lr}: {100 * v:.1f}" + (" *" if float(lr) == res["lr_selected"] else "")
                 for lr, v in res["val_acc_final_by_lr"].items()]
        L.append(f"| {res['label']} | {res['r'] if res['r'] is not None else 'all'} | " + " | ".join(cells) + " |")
    L.append("")
    return L


def _goal(out: dict) -> list:
    size = out["meta"]["size"]
    L = [f"## Goal: ours with the better data-aware A (picked on validation) at most {GENRE_MAX_GAP_TO_LORA_PTS:g} "
         "point below PEFT LoRA (95% lower bound of the paired difference)", ""]
    L.append("| r | method | difference (pts) | 95% CI (passages, seeds) | 95% CI (plays, seeds) | met |")
    L.append("|---|---|---|---|---|---|")
    for r in size["ranks"]:
        g = out["goal"].get(str(r))
        if not g:
            L.append(f"| {r} | n/a | | | | no |")
            continue
        L.append(f"| {r} | {g['label']} | {g['diff_pts']:+.2f} | [{g['ci_lo_pts']:+.2f}, {g['ci_hi_pts']:+.2f}] | "
                 f"[{g['ci_plays_lo_pts']:+.2f}, {g['ci_plays_hi_pts']:+.2f}] | {'yes' if g['met'] else 'no'} |")
    return L


def _diagnostics(out: dict) -> list:
    L = []
    if not out.get("diagnostics"):
        return []
    L.append("")
    L.append("## Diagnostics: how much the correction changes B's gradient")
    L.append("")
    L.append("Our layers at initialisation (seed 0, kaiming-uniform A), one training batch; dB* = (1/s^2) dB "
             "(A A^T + delta I)^-1. cos = cosine(dB, dB*) per layer.")
    L.append("")
    L.append("| r | when | cond(A A^T) mean / max | mean eig(A A^T) | cos mean / min | |dB*| / |dB| "
             "(expected 1/(s^2 mean eig)) |")
    L.append("|---|---|---|---|---|---|")
    for r, rows in out["diagnostics"].items():
        for phase, x in rows.items():
            cos = (f"{x['cos_dB_dBcorr_mean']:.4f} / {x['cos_dB_dBcorr_min']:.4f}"
                   if x["cos_dB_dBcorr_mean"] is not None else "n/a")
            nr = (f"{x['norm_ratio_dBcorr_over_dB_mean']:.3f} ({x['expected_norm_ratio']:.3f})"
                  if x["norm_ratio_dBcorr_over_dB_mean"] is not None else "n/a")
            L.append(f"| {r} | {phase} | {x['cond_AAt_mean']:.2f} / {x['cond_AAt_max']:.2f} | "
                     f"{x['eig_AAt_mean']:.4f} | {cos} | {nr} |")
    return L


def _plot(out: dict) -> list:
    L = []
    if not out["plots"]:
        return []
    L.append("")
    L.append(f"![validation accuracy against step]({out['plots'][0]})")
    return L


def markdown(out: dict) -> str:
    L = []
    for section in (_intro, _data, _results, _lr_sweep, _paired, _goal, _diagnostics, _plot):
        L += section(out)
    return "\n".join(L + [""])
