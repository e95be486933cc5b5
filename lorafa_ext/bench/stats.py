"""Medians, spreads and the rule that marks a figure or a ratio as noisy.

Every timed figure is the median of its samples; its spread is the interquartile range relative to
the median (``rel_iqr``). The ratio of two medians is uncertain by about sqrt(sa^2 + sb^2) for spreads
sa and sb. A figure or ratio is *noisy* when that spread exceeds ``NOISY_SPREAD`` or it rests on fewer
than ``MIN_SAMPLES`` samples: the tables print it with a leading "~" and the plots draw it hollow or
hatched, so it reads as an indication, not a result.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

NOISY_SPREAD = 0.10   # relative IQR above which a figure (or a ratio of two) is noisy
MIN_SAMPLES = 5       # fewer samples than this: noisy whatever the spread


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def rel_iqr(xs: Sequence[float]) -> float | None:
    """(Q3 - Q1) / median; None for fewer than two samples or a zero median."""
    if len(xs) < 2:
        return None
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    m = statistics.median(xs)
    return (q3 - q1) / m if m > 0 else None


def combined_spread(*spreads: float | None) -> float | None:
    """The spread of a ratio (or product) of medians with these spreads; None if any is unknown."""
    if any(s is None for s in spreads):
        return None
    return math.sqrt(sum(s * s for s in spreads))


def is_noisy(spread: float | None, samples: int) -> bool:
    return samples < MIN_SAMPLES or spread is None or spread > NOISY_SPREAD


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> tuple:
    """(median of a[i] / b[i], its relative IQR) over samples taken in the same round i."""
    rs = [x / y for x, y in zip(a, b) if y > 0]
    if not rs:
        return None, None
    return median(rs), rel_iqr(rs)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
