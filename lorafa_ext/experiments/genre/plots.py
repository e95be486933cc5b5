"""val_acc_vs_step.png: validation accuracy against step, mean ± std over seeds, one panel per rank."""
from __future__ import annotations

from typing import Optional


def plot(out: dict, path: str) -> Optional[str]:
    """The plot, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ranks = out["meta"]["size"]["ranks"]
    fig, axes = plt.subplots(1, len(ranks), figsize=(6 * len(ranks), 4.2), squeeze=False, sharey=True)
    colors = {"full": "k", "peft_lora": "tab:blue", "peft_pissa": "tab:cyan", "peft_lorafa": "tab:orange",
              "ours_kaiming": "tab:red", "ours_kaiming_nocorr": "tab:pink", "ours_grad": "tab:green",
              "ours_act": "tab:olive", "ours_grad_sgd": "tab:purple", "ours_grad_sgd_corr": "tab:brown"}
    maj = out["data"]["majority_baseline"]["val"]
    for ax, r in zip(axes[0], ranks):
        for res in out["results"]:
            if res["r"] not in (r, None):
                continue
            c = res["val_curve"]
            mean = [100 * x for x in c["mean"]]
            std = [100 * x for x in c["std"]]
            lab = f"{res['label']} (lr {res['lr_selected']:g})"
            ax.plot(c["steps"], mean, marker="o", ms=3, color=colors.get(res["method"]), label=lab,
                    ls="--" if res["method"] == "full" else "-")
            ax.fill_between(c["steps"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colors.get(res["method"]), alpha=0.12)
        ax.axhline(100 * maj, color="gray", lw=0.8, ls=":", label="majority class")
        ax.set_title(f"r = {r}, alpha = {2 * r}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")  # per panel: each rank picked its own learning rates
    axes[0][0].set_ylabel("validation accuracy (%)")
    size = out["meta"]["size"]
    fig.suptitle(f"Shakespeare genre, all-MiniLM-L6-v2 ({size['name']}: {size['steps']} steps, batch "
                 f"{size['batch']} x {size['seq_len']} tokens)\nmean +- std over seeds at the selected lr; "
                 f"{out['data'].get('val_curve_passages', '')} validation passages",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
