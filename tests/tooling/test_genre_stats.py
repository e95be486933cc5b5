"""The genre experiment's paired bootstrap (lorafa_ext.experiments.genre.stats) against a plain loop
implementation of the same resampling and against the normal approximation."""
from __future__ import annotations

import math
import random

import pytest
import torch

from lorafa_ext.experiments.genre.stats import correctness, decode_preds, encode_preds, paired_difference


def _correct(seeds, n, p, gen):
    return (torch.rand(seeds, n, generator=gen) < p).long()


def _loop_bootstrap(d, groups, resamples, rng, by_group):
    """Resample seeds (and passages, or whole groups) with replacement; mean of d over the resample."""
    seeds, n = len(d), len(d[0])
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = sorted(members)
    out = []
    for _ in range(resamples):
        ss = [rng.randrange(seeds) for _ in range(seeds)]
        if by_group:
            idx = [i for _ in keys for i in members[keys[rng.randrange(len(keys))]]]
        else:
            idx = [rng.randrange(n) for _ in range(n)]
        out.append(sum(d[s][i] for s in ss for i in idx) / (len(ss) * len(idx)))
    out.sort()
    return out[int(0.025 * resamples)], out[int(0.975 * resamples) - 1]


def test_interval_matches_a_loop_bootstrap_and_the_normal_approximation():
    gen = torch.Generator().manual_seed(0)
    seeds, n = 3, 1201
    groups = torch.arange(n) % 7
    a, b = _correct(seeds, n, 0.62, gen), _correct(seeds, n, 0.58, gen)
    got = paired_difference(a, b, groups, resamples=4000, seed=1)
    d = (a - b).double()
    assert got["diff_pts"] == pytest.approx(100 * float(d.mean()), abs=1e-12)
    lo, hi = _loop_bootstrap(d.tolist(), groups.tolist(), 400, random.Random(2), by_group=False)
    width = got["ci_hi_pts"] - got["ci_lo_pts"]
    assert 100 * (hi - lo) == pytest.approx(width, rel=0.2)
    assert got["ci_lo_pts"] < got["diff_pts"] < got["ci_hi_pts"]
    # one seed: the interval of a mean of n independent passages, 2 * 1.96 * sd / sqrt(n)
    one = paired_difference(a[:1], b[:1], groups, resamples=4000, seed=1)
    normal = 2 * 1.96 * 100 * float(d[0].std()) / math.sqrt(n)
    assert one["ci_hi_pts"] - one["ci_lo_pts"] == pytest.approx(normal, rel=0.1)
    # more seeds add the seed-to-seed spread, so the interval does not shrink like 1 / sqrt(seeds)
    assert width > normal / math.sqrt(seeds)
    glo, ghi = _loop_bootstrap(d.tolist(), groups.tolist(), 400, random.Random(3), by_group=True)
    assert 100 * (ghi - glo) == pytest.approx(got["ci_plays_hi_pts"] - got["ci_plays_lo_pts"], rel=0.3)


def test_plays_interval_is_wider_when_plays_move_together():
    gen = torch.Generator().manual_seed(4)
    seeds, n, plays = 3, 900, 9
    groups = torch.arange(n) // (n // plays)
    play_effect = (torch.rand(plays, generator=gen) - 0.5) * 0.8  # a play is mostly right or mostly wrong
    p_a = (0.6 + play_effect[groups]).clamp(0, 1)
    a = (torch.rand(seeds, n, generator=gen) < p_a).long()
    b = _correct(seeds, n, 0.6, gen)
    got = paired_difference(a, b, groups, resamples=2000, seed=0)
    assert (got["ci_plays_hi_pts"] - got["ci_plays_lo_pts"]) > 1.5 * (got["ci_hi_pts"] - got["ci_lo_pts"])


def test_identical_methods_and_a_clear_shift():
    gen = torch.Generator().manual_seed(5)
    a = _correct(3, 500, 0.5, gen)
    same = paired_difference(a, a.clone(), torch.zeros(500, dtype=torch.long), resamples=200)
    assert same["diff_pts"] == 0.0 and same["ci_lo_pts"] == 0.0 and same["ci_hi_pts"] == 0.0
    better = a.clone()
    better[:, :100] = 1  # 100 of 500 passages always right: about +10 points
    shift = paired_difference(better, a, torch.arange(500) % 5, resamples=500)
    assert shift["ci_lo_pts"] > 0


def test_shapes_are_checked_and_predictions_round_trip():
    with pytest.raises(ValueError, match="correct_a and correct_b must be"):
        paired_difference(torch.ones(2, 5), torch.ones(3, 5), torch.zeros(5), resamples=10)
    pred = torch.tensor([2, 0, 1, 1, 0, 2])
    assert torch.equal(decode_preds(encode_preds(pred)), pred)
    labels = torch.tensor([2, 1, 1, 1, 0, 0])
    rows = [{"seed": 1, "test_pred": encode_preds(labels)}, {"seed": 0, "test_pred": encode_preds(pred)}]
    assert correctness(rows, labels).tolist() == [[1, 0, 1, 1, 1, 0], [1] * 6]  # ordered by seed
