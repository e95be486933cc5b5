"""Paired comparisons of two methods on the same test passages and seeds, with bootstrap intervals.

Both methods of a pair are trained on the same batches for each seed and scored on the same passages,
so their difference is measured per (seed, passage): d[s, i] = correct_a[s, i] - correct_b[s, i].
The point estimate is the mean of d. Two percentile bootstrap intervals come with it:

- "passages and seeds" resamples the seeds and the passages independently, with replacement
  (B resamples), and takes the mean of d over the resampled grid;
- "plays and seeds" resamples whole test plays instead of passages: passages of one play share its
  style and are right or wrong together, so this interval is the wider, more honest one.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch


def decode_preds(text: str) -> torch.Tensor:
    """The predictions a run stores as a string of digits (one class index per passage)."""
    return torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long() - ord("0")


def encode_preds(pred: torch.Tensor) -> str:
    return "".join(str(int(c)) for c in pred.tolist())


def _interval(values: torch.Tensor, level: float):
    lo, hi = torch.quantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=values.dtype))
    return float(lo), float(hi)


def paired_difference(correct_a: torch.Tensor, correct_b: torch.Tensor, groups: torch.Tensor, resamples: int,
                      seed: int = 0, level: float = 0.95) -> Dict[str, float]:
    """Mean of correct_a - correct_b ((seeds, passages) 0/1 tensors), in points (x 100), with percentile
    bootstrap intervals over passages and seeds and over groups (plays) and seeds."""
    if correct_a.shape != correct_b.shape or correct_a.dim() != 2:
        raise ValueError(f"paired_difference: correct_a and correct_b must be (seeds, passages) of one shape, got "
                         f"{tuple(correct_a.shape)} and {tuple(correct_b.shape)}")
    d = (correct_a.double() - correct_b.double())  # (S, N)
    n_seeds, n = d.shape
    gen = torch.Generator().manual_seed(seed)
    seed_w = torch.zeros(resamples, n_seeds, dtype=torch.float64)
    seed_w.scatter_add_(1, torch.randint(n_seeds, (resamples, n_seeds), generator=gen),
                        torch.ones(resamples, n_seeds, dtype=torch.float64))
    per_passage = (seed_w / n_seeds) @ d  # (B, N): the seed-resampled mean of each passage's difference
    pick = torch.randint(n, (resamples, n), generator=gen)
    by_passage = per_passage.gather(1, pick).mean(1)
    # plays: resample whole groups, weight each passage by how often its group was drawn
    uniq, inv = torch.unique(groups, return_inverse=True)
    g = uniq.numel()
    group_w = torch.zeros(resamples, g, dtype=torch.float64)
    group_w.scatter_add_(1, torch.randint(g, (resamples, g), generator=gen), torch.ones(resamples, g, dtype=torch.float64))
    w = group_w[:, inv]  # (B, N)
    by_play = (per_passage * w).sum(1) / w.sum(1)
    lo_p, hi_p = _interval(by_passage, level)
    lo_g, hi_g = _interval(by_play, level)
    return {"diff_pts": 100 * float(d.mean()), "ci_lo_pts": 100 * lo_p, "ci_hi_pts": 100 * hi_p,
            "ci_plays_lo_pts": 100 * lo_g, "ci_plays_hi_pts": 100 * hi_g, "level": level, "resamples": resamples,
            "seeds": n_seeds, "passages": n, "plays": g}


def correctness(rows: Sequence[dict], labels: torch.Tensor) -> torch.Tensor:
    """(seeds, passages) 0/1 correctness of runs ordered by seed."""
    rows = sorted(rows, key=lambda x: x["seed"])
    return torch.stack([(decode_preds(x["test_pred"]) == labels).long() for x in rows])
