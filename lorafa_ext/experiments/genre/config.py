"""What the experiment compares and at which sizes: methods, learning-rate grids, size presets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

METHODS = ("full", "peft_lora", "peft_lorafa", "ours_nocorr", "ours_corr")
METHOD_LABELS = {
    "full": "Full fine-tuning",
    "peft_lora": "PEFT LoRA",
    "peft_lorafa": "PEFT LoRA-FA optimizer",
    "ours_nocorr": "ours, no correction",
    "ours_corr": "ours, with correction",
}
TARGET_MODULES = ("query", "key", "value", "dense")

# Learning-rate grids: three values half a decade apart per method. LoRA-FA (B alone trains, A stays at
# its small kaiming init) tolerates larger steps than LoRA: in a CPU pilot (60 steps, r = 8, one seed)
# PEFT LoRA collapsed to chance at 1e-2 while ours with correction still learned there and did best
# at 3e-3, so its grid sits half a decade higher. The same grid for the three LoRA-FA methods.
LR_GRIDS = {
    "full": (3e-5, 1e-4, 3e-4),
    "peft_lora": (3e-4, 1e-3, 3e-3),
    "peft_lorafa": (1e-3, 3e-3, 1e-2),
    "ours_nocorr": (1e-3, 3e-3, 1e-2),
    "ours_corr": (1e-3, 3e-3, 1e-2),
}


@dataclass
class Size:
    """Everything that the size presets set."""

    name: str
    seq_len: int          # tokens per passage, [CLS] and [SEP] included
    batch: int
    steps: int
    eval_every: int       # validation accuracy every that many steps (and at the last step)
    val_cap: Optional[int]   # passages per validation play (evenly spaced); None: all
    test_cap: Optional[int]  # passages per test play; None: all
    seeds: int
    protocol: str         # "grid": every (lr, seed); "sweep": lrs on seed 0, then the best lr on the other seeds
    ranks: Tuple[int, ...] = (8, 16)
    lrs_per_method: int = 3
    max_chars: Optional[int] = None  # keep only the start of each cleaned play (toy runs)
    eval_batch: int = 64
    warmup_frac: float = 0.1


SIZES = {
    # A GPU run: 128-token passages, every (lr, seed) of the grid.
    "full": Size("full", seq_len=128, batch=32, steps=600, eval_every=50, val_cap=64, test_cap=None,
                 seeds=3, protocol="grid"),
    # The CPU run (15-20 minutes on 2 idle cores): shorter passages and runs, smaller evaluation
    # sets, and the learning rate swept on seed 0 only.
    "quick": Size("quick", seq_len=64, batch=16, steps=60, eval_every=15, val_cap=16, test_cap=24,
                  seeds=3, protocol="sweep"),
    # For the tests: seconds.
    "toy": Size("toy", seq_len=32, batch=4, steps=2, eval_every=1, val_cap=2, test_cap=2, seeds=1,
                protocol="sweep", ranks=(8,), lrs_per_method=1, max_chars=3000, eval_batch=16),
}


def pick_lrs(grid: Sequence[float], n: int) -> Tuple[float, ...]:
    """n values of the grid, evenly spread (the middle one for n = 1)."""
    if n >= len(grid):
        return tuple(grid)
    if n == 1:
        return (grid[len(grid) // 2],)
    idx = sorted({round(i * (len(grid) - 1) / (n - 1)) for i in range(n)})
    return tuple(grid[i] for i in idx)
