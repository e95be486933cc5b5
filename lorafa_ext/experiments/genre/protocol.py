"""The protocol: every (method, rank) configuration trained over its learning-rate grid and seeds, the
learning rate picked on validation, the test accuracy of the picked runs, and the goal.

protocol "grid": every (lr, seed), lr picked by the mean final validation accuracy over seeds.
protocol "sweep": every lr on seed 0, then seeds 1.. at the picked lr. Ties go to the lower lr.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Sequence, Tuple

from lorafa_ext.bench.goals import GENRE_MAX_GAP_TO_LORA_PTS, GENRE_MIN_GAIN_OVER_NOCORR_PTS

from .config import METHOD_LABELS, Size
from .train import evaluate, train_run


def _mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    xs = [float(x) for x in xs]
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


class Runner:
    """Trains runs for one experiment and keeps every run's row (in the order run)."""

    def __init__(self, size: Size, encoder, data, device, init: str, log):
        self.size, self.encoder, self.data, self.device, self.init, self.log = size, encoder, data, device, init, log
        self.runs: List[dict] = []

    def train(self, method: str, r: int, lr: float, seed: int, measure_memory: bool = False, test: bool = False):
        """One run; with test=True its test accuracy goes into the row. Returns (row, model)."""
        row, model = train_run(method, r, lr, seed, self.size, self.encoder, self.data, self.device,
                               measure_memory=measure_memory, log=self.log, init=self.init)
        if test:
            self.add_test(row, model)
        self.runs.append(row)
        return row, model

    def add_test(self, row: dict, model) -> None:
        scores = evaluate(model, self.data["test"], self.device, self.size.eval_batch)
        row.update({f"test_{k}": v for k, v in scores.items()})


def run_config(runner: Runner, method: str, r: int, grid: Sequence[float]) -> Tuple[float, Dict[float, list]]:
    """Train one configuration over its grid and seeds. Returns (picked lr, {lr: rows})."""
    size, grid_protocol = runner.size, runner.size.protocol == "grid"
    by_lr: Dict[float, List[dict]] = {}
    best = None  # (val, row, model) of seed 0 for the sweep protocol
    first = True
    for lr in grid:
        for seed in (range(size.seeds) if grid_protocol else [0]):
            row, model = runner.train(method, r, lr, seed, measure_memory=first, test=grid_protocol)
            first = False
            if not grid_protocol and (best is None or row["val_acc_final"] > best[0]):
                best = (row["val_acc_final"], row, model)
            by_lr.setdefault(lr, []).append(row)
            del model
    val_by_lr = {lr: statistics.fmean(x["val_acc_final"] for x in rows) for lr, rows in by_lr.items()}
    lr_sel = max(grid, key=lambda lr: (val_by_lr[lr], -grid.index(lr)))
    if not grid_protocol:
        runner.add_test(best[1], best[2])
        best = None
        for seed in range(1, size.seeds):
            row, _ = runner.train(method, r, lr_sel, seed, test=True)
            by_lr[lr_sel].append(row)
    return lr_sel, by_lr


def _stats(res: dict, sel: List[dict]) -> None:
    for key in ("test_acc", "test_balanced_acc", "val_acc_final", "train_wall_s", "ms_per_step"):
        res[key] = [x[key] for x in sel]
        res[f"{key}_mean"], std = _mean_std(res[key])
        if key != "ms_per_step":
            res[f"{key}_std"] = std
    curves = list(zip(*[x["val_acc"] for x in sel]))
    res["val_curve"] = {"steps": sel[0]["val_steps"], "mean": [statistics.fmean(c) for c in curves],
                        "std": [statistics.stdev(c) if len(c) > 1 else 0.0 for c in curves]}


def _peak_memory(res: dict, sel: List[dict], cuda: bool) -> None:
    if cuda:
        res["peak_memory_bytes"] = int(max(x["cuda_peak_bytes"] for x in sel if "cuda_peak_bytes" in x))
        res["peak_memory_kind"] = "torch.cuda.max_memory_allocated over the run"
    else:
        res["peak_memory_bytes"] = res["memory"]["total_bytes"]
        res["peak_memory_kind"] = ("counted: parameters + gradients + optimizer state + activations saved "
                                   "for backward (one training step)")
    res["peak_memory_mib"] = res["peak_memory_bytes"] / 2 ** 20


def summarize_config(method: str, r, grid, lr_sel: float, by_lr: dict, runs: List[dict], cuda: bool) -> dict:
    """The result of one configuration: the picked lr's runs, their mean ± std, curve and memory."""
    sel = by_lr[lr_sel]
    mem_row = next(x for x in runs if x["method"] == method and x["r"] == r and "memory" in x)
    val_by_lr = {lr: statistics.fmean(x["val_acc_final"] for x in rows) for lr, rows in by_lr.items()}
    res = {"method": method, "label": METHOD_LABELS[method], "r": r, "lora_alpha": None if r is None else 2 * r,
           "trainable_params": sel[0]["trainable_params"], "lr_grid": list(grid), "lr_selected": lr_sel,
           "val_acc_final_by_lr": {f"{lr:g}": v for lr, v in val_by_lr.items()},
           "seeds": [x["seed"] for x in sel], "memory": mem_row["memory"]}
    _stats(res, sel)
    _peak_memory(res, sel, cuda)
    return res


def goal_check(results: List[dict], ranks) -> dict:
    """Per rank: ours with correction against PEFT LoRA, ours without correction and PEFT LoRA-FA
    (points of test accuracy), and whether the goal (lorafa_ext.bench.goals) is met."""
    def get(m, r):
        for x in results:
            if x["method"] == m and (x["r"] == r or (m == "full" and x["r"] is None)):
                return x
        return None

    out = {"target": f"ours_corr at most {GENRE_MAX_GAP_TO_LORA_PTS:g} point below peft_lora, and at least "
                     f"{GENRE_MIN_GAIN_OVER_NOCORR_PTS:g} above ours_nocorr (test accuracy, mean over seeds)"}
    for r in ranks:
        c, l, n, p = get("ours_corr", r), get("peft_lora", r), get("ours_nocorr", r), get("peft_lorafa", r)
        row = {}
        if c and l:
            row["ours_corr_minus_peft_lora_pts"] = 100 * (c["test_acc_mean"] - l["test_acc_mean"])
            row["within_1pt_of_lora"] = row["ours_corr_minus_peft_lora_pts"] >= -GENRE_MAX_GAP_TO_LORA_PTS
        if c and n:
            row["ours_corr_minus_ours_nocorr_pts"] = 100 * (c["test_acc_mean"] - n["test_acc_mean"])
            row["corr_at_or_above_nocorr"] = row["ours_corr_minus_ours_nocorr_pts"] >= GENRE_MIN_GAIN_OVER_NOCORR_PTS
        if c and p:
            row["ours_corr_minus_peft_lorafa_pts"] = 100 * (c["test_acc_mean"] - p["test_acc_mean"])
        if row:
            row["met"] = bool(row.get("within_1pt_of_lora", False) and row.get("corr_at_or_above_nocorr", False))
        out[str(r)] = row
    return out
