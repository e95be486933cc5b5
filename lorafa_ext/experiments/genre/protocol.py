"""The protocol: every (method, rank) configuration trained over its learning rates on seed 0, the
learning rate picked on validation, seeds 1.. at it, the test predictions of the picked runs, and the
paired comparison against PEFT LoRA that decides the goal.

Selection: the learning rate with the best final validation accuracy on seed 0 (ties go to the lower
one: the learning rates run in ascending order). A method with ``lr_from`` runs only at the learning rate picked for that method at its rank.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Sequence, Tuple

import torch

from lorafa_ext.bench.goals import GENRE_MAX_GAP_TO_LORA_PTS

from .config import BASELINE, DATA_AWARE, METHODS, Method, Size
from .data import init_batches
from .stats import correctness, encode_preds, paired_difference
from .train import predict, scores, train_run


def _mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    xs = [float(x) for x in xs]
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


class Runner:
    """Trains runs for one experiment and keeps every run's row (in the order run)."""

    def __init__(self, size: Size, encoder, data, device, log):
        self.size, self.encoder, self.data, self.device, self.log = size, encoder, data, device, log
        self.runs: List[dict] = []
        self._init_batches: Dict[int, list] = {}

    def batches_for_init(self, seed: int) -> list:
        if seed not in self._init_batches:
            self._init_batches[seed] = init_batches(self.data["train"], self.size, seed)
        return self._init_batches[seed]

    def train(self, spec: Method, r: int, lr: float, seed: int, measure_memory: bool = False, test: bool = False):
        """One run; with test=True its test predictions and scores go into the row. Returns (row, model)."""
        batches = self.batches_for_init(seed) if spec.family == "ours" and spec.init != "kaiming" else None
        row, model = train_run(spec, r, lr, seed, self.size, self.encoder, self.data, self.device,
                               measure_memory=measure_memory, log=self.log, init_batches=batches)
        if test:
            self.add_test(row, model)
        self.runs.append(row)
        return row, model

    def add_test(self, row: dict, model) -> None:
        pred = predict(model, self.data["test"], self.device, self.size)
        row.update({f"test_{k}": v for k, v in scores(pred, self.data["test"].labels).items()})
        row["test_pred"] = encode_preds(pred)


def run_config(runner: Runner, spec: Method, r: int, lrs: Sequence[float]) -> Tuple[float, Dict[float, list]]:
    """Train one configuration: every lr on seed 0, then seeds 1.. at the picked lr.
    Returns (picked lr, {lr: rows})."""
    by_lr: Dict[float, List[dict]] = {}
    best = None  # (val, row, model) of seed 0
    for i, lr in enumerate(lrs):
        row, model = runner.train(spec, r, lr, 0, measure_memory=(i == 0))
        if best is None or row["val_acc_final"] > best[0]:
            best = (row["val_acc_final"], row, model)
        by_lr[lr] = [row]
        del model
    lr_sel = best[1]["lr"]
    runner.add_test(best[1], best[2])
    best = None
    for seed in range(1, runner.size.seeds):
        row, _ = runner.train(spec, r, lr_sel, seed, test=True)
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
                                   "for backward (one training step; under bf16 autocast the bf16 weight "
                                   "copies backward keeps count as saved)")
    res["peak_memory_mib"] = res["peak_memory_bytes"] / 2 ** 20


def summarize_config(spec: Method, r, lrs, lr_sel: float, by_lr: dict, runs: List[dict], cuda: bool,
                     borrowed_from=None) -> dict:
    """The result of one configuration: the picked lr's runs, their mean ± std, curve and memory.
    borrowed_from: the method whose picked lr this configuration ran at (None: it swept lrs)."""
    sel = sorted(by_lr[lr_sel], key=lambda x: x["seed"])
    mem_row = next(x for x in runs if x["method"] == spec.name and x["r"] == r and "memory" in x)
    res = {"method": spec.name, "label": spec.label, "r": r, "lora_alpha": None if r is None else 2 * r,
           "primary": spec.primary, "optimizer": spec.optimizer, "init": spec.init,
           "correction": spec.correction if spec.family == "ours" else None,
           "trainable_params": sel[0]["trainable_params"], "lr_grid": list(lrs), "lr_from": borrowed_from,
           "lr_selected": lr_sel,
           "val_acc_final_by_lr": {f"{lr:g}": rows[0]["val_acc_final"] for lr, rows in by_lr.items()},
           "seeds": [x["seed"] for x in sel], "memory": mem_row["memory"],
           "init_s_mean": statistics.fmean(x["init_s"] for x in sel)}
    _stats(res, sel)
    _peak_memory(res, sel, cuda)
    return res


def _selected_rows(runs: List[dict], res: dict) -> List[dict]:
    return [x for x in runs if x["method"] == res["method"] and x["r"] == res["r"] and x["lr"] == res["lr_selected"]
            and "test_pred" in x]


def paired_comparisons(results: List[dict], runs: List[dict], labels: torch.Tensor, plays: torch.Tensor,
                       ranks: Sequence[int], resamples: int) -> dict:
    """Per rank: every method against PEFT LoRA at that rank (full fine-tuning against each rank's),
    paired over seeds and test passages (see stats.py)."""
    out = {}
    for r in ranks:
        base = next((x for x in results if x["method"] == BASELINE and x["r"] == r), None)
        if base is None:
            continue
        base_rows = {x["seed"]: x for x in _selected_rows(runs, base)}
        rows = {}
        for res in results:
            if res["method"] == BASELINE or res["r"] not in (r, None):
                continue
            mine = {x["seed"]: x for x in _selected_rows(runs, res)}
            seeds = sorted(set(mine) & set(base_rows))  # pair run with run, seed by seed
            ca = correctness([mine[s] for s in seeds], labels)
            cb = correctness([base_rows[s] for s in seeds], labels)
            rows[res["method"]] = paired_difference(ca, cb, plays, resamples, seed=r)
        out[str(r)] = rows
    return out


def goal_check(results: List[dict], paired: dict, ranks) -> dict:
    """Per rank: the data-aware A with the better mean validation accuracy against PEFT LoRA; the goal
    is met when the paired difference's 95% lower bound (passages and seeds) is at least
    -GENRE_MAX_GAP_TO_LORA_PTS."""
    out = {"target": f"ours with the better data-aware A (picked on validation) at most "
                     f"{GENRE_MAX_GAP_TO_LORA_PTS:g} point below {BASELINE}: the 95% lower bound of the paired "
                     f"test-accuracy difference (bootstrap over passages and seeds) >= -{GENRE_MAX_GAP_TO_LORA_PTS:g}"}
    for r in ranks:
        cands = [x for x in results if x["method"] in DATA_AWARE and x["r"] == r and x["method"] in paired.get(str(r), {})]
        if not cands:
            continue
        best = max(cands, key=lambda x: x["val_acc_final_mean"])
        d = paired[str(r)][best["method"]]
        out[str(r)] = {"method": best["method"], "label": METHODS[best["method"]].label, **d,
                       "met": d["ci_lo_pts"] >= -GENRE_MAX_GAP_TO_LORA_PTS}
    return out
