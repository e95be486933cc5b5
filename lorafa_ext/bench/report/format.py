"""Number formatting and plain / markdown tables. A figure too noisy to support is printed with a
leading "~" (stats.py)."""
from __future__ import annotations

import math
from typing import Sequence

NOISY_MARK = "~"


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


def fmt_x(v, noisy: bool = False) -> str:
    """A ratio: "1.31x", "~1.31x" when noisy, "-" when missing."""
    return "-" if v is None else f"{NOISY_MARK if noisy else ''}{v:.2f}x"


def fmt_noisy(v, noisy: bool = False) -> str:
    """A figure (fmt), with the noisy mark."""
    text = fmt(v)
    return NOISY_MARK + text if noisy and text != "-" else text


def fmt_spread(s) -> str:
    """A relative spread as a percentage: "4.2%", "-" when unknown."""
    return "-" if s is None else f"{100 * s:.1f}%"


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
