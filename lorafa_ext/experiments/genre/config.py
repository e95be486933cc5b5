"""What the experiment compares and at which sizes: the methods, their learning rates, the size presets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


@dataclass(frozen=True)
class Method:
    """One method of the comparison.

    family: "full" (every parameter), "peft" (PEFT's LoRA layers) or "ours" (``apply_lorafa``).
    init: A's initialisation (PEFT: "kaiming" or "pissa"; ours: "kaiming", "gradient", "activation").
    correction: ours only, the corrected B gradient (1/s^2) dB (A A^T)^-1.
    optimizer: "adamw", "sgd" (momentum 0.9) or "peft_lorafa" (PEFT's create_lorafa_optimizer).
    lrs: the learning-rate grid, swept on seed 0 and picked on validation. lr_from: instead of a grid,
    the learning rate picked for that method at the same rank (a secondary method that shares its
    primary's optimizer and A scale). top_rank_only: run at the size's largest rank only.
    primary: part of the comparison that decides the goal (never cut by a size).
    """

    name: str
    label: str
    family: str
    init: str = "kaiming"
    correction: bool = True
    optimizer: str = "adamw"
    lrs: Tuple[float, ...] = ()
    lr_from: Optional[str] = None
    top_rank_only: bool = False
    primary: bool = False


# Learning rates. LoRA and data-aware LoRA-FA share one grid, half a decade apart around 1e-3 (the
# value a 60-step CPU pilot picked for both PEFT LoRA and our kaiming LoRA-FA). The kaiming LoRA-FA
# variants borrow the learning rate picked for ours_grad: init_from_data scales A so that
# A A^T = I/3, kaiming's expected Gram matrix, so the same step sizes apply. PiSSA borrows PEFT
# LoRA's to save runs, although its A and B scale with W's singular values (a cut: see the README).
# With A A^T = I/3 and s = 2 the correction is the scalar 3/4, so the SGD pair at one learning rate
# compares SGD at lr and at 0.75 lr. SGD's grid brackets
# the step Adam takes (about lr = 1e-3 per coordinate): B's gradient has an RMS of about 8e-4 at a
# gradient-initialised A here, and heavy-ball momentum 0.9 multiplies the step by 10.
_ADAPTER_GRID = (3e-4, 1e-3, 3e-3)
METHOD_LIST = (
    Method("full", "Full fine-tuning", "full", lrs=(3e-5, 1e-4, 3e-4)),
    Method("peft_lora", "PEFT LoRA", "peft", lrs=_ADAPTER_GRID, primary=True),
    Method("ours_grad", "ours, gradient A", "ours", init="gradient", lrs=_ADAPTER_GRID, primary=True),
    Method("ours_act", "ours, activation A", "ours", init="activation", lrs=_ADAPTER_GRID, primary=True),
    Method("peft_pissa", "PEFT LoRA, PiSSA init", "peft", init="pissa", lr_from="peft_lora", top_rank_only=True),
    Method("peft_lorafa", "PEFT LoRA-FA optimizer", "peft", optimizer="peft_lorafa", lr_from="ours_grad",
           top_rank_only=True),
    Method("ours_kaiming", "ours, kaiming A", "ours", lr_from="ours_grad", top_rank_only=True),
    Method("ours_kaiming_nocorr", "ours, kaiming A, no correction", "ours", correction=False, lr_from="ours_grad",
           top_rank_only=True),
    Method("ours_grad_sgd", "ours, gradient A, SGD", "ours", init="gradient", correction=False, optimizer="sgd",
           lrs=(0.05, 0.2), top_rank_only=True),
    Method("ours_grad_sgd_corr", "ours, gradient A, SGD, correction", "ours", init="gradient", optimizer="sgd",
           lr_from="ours_grad_sgd", top_rank_only=True),
)
METHODS = {m.name: m for m in METHOD_LIST}
METHOD_LABELS = {m.name: m.label for m in METHOD_LIST}
BASELINE = "peft_lora"  # paired differences are taken against it
DATA_AWARE = ("ours_grad", "ours_act")  # the goal: the better of these (picked on validation) against BASELINE
TARGET_MODULES = ("query", "key", "value", "dense")


# The precision of the training and evaluation forward passes. In both, init_from_data's statistics
# pass runs in fp32, and parameters, gradients and optimizer states are fp32.
PRECISIONS = {
    "fp32": "fp32 throughout",
    "bf16": "torch.autocast(bfloat16) around every forward pass; parameters, gradients and optimizer states in fp32",
}


@dataclass
class Size:
    """Everything that the size presets set."""

    name: str
    seq_len: int          # tokens per passage, [CLS] and [SEP] included
    batch: int
    steps: int
    eval_every: int       # validation-curve point every that many steps (on the curve subset)
    val_passages: Optional[int]    # validation passages for selection (evenly over the plays); None: all
    curve_passages: int            # of them, the subset the intermediate curve points use
    test_cap: Optional[int]        # passages per test play; None: all
    seeds: int
    methods: Tuple[str, ...] = tuple(METHODS)
    ranks: Tuple[int, ...] = (8, 16)
    lrs_per_method: int = 3        # at most this many values of each method's grid (evenly spread)
    init_batches: int = 8          # batches init_from_data sees (drawn apart from the training batches)
    bootstrap: int = 2000          # bootstrap resamples for the paired confidence intervals
    max_chars: Optional[int] = None  # keep only the start of each cleaned play (toy runs)
    eval_batch: int = 64
    warmup_frac: float = 0.1
    precision: str = "bf16"        # see PRECISIONS


SIZES = {
    # The committed run: every test passage, 1,008 validation passages, every method, 200 steps (where
    # the horizon size's validation curves have flattened), about 100 minutes on 2 idle cores.
    "full": Size("full", seq_len=64, batch=16, steps=200, eval_every=40, val_passages=1008, curve_passages=252,
                 test_cap=None, seeds=3),
    # About 14 minutes on 2 idle cores: the goal's comparison (and full fine-tuning) at shorter runs, one
    # learning rate each (the grid's middle), 2 seeds, a fifth of the test set.
    "quick": Size("quick", seq_len=64, batch=16, steps=100, eval_every=25, val_passages=252, curve_passages=126,
                  test_cap=96, seeds=2, methods=("full", "peft_lora", "ours_grad", "ours_act", "ours_kaiming"),
                  lrs_per_method=1, init_batches=4, bootstrap=1000),
    # How validation accuracy evolves far past the full size's budget: one seed, one learning rate per
    # method (the grid's middle), r = 8, a curve point every 50 steps on 504 validation passages.
    "horizon": Size("horizon", seq_len=64, batch=16, steps=600, eval_every=50, val_passages=1008,
                    curve_passages=504, test_cap=None, seeds=1, methods=("full", "peft_lora", "ours_grad", "ours_act"),
                    ranks=(8,), lrs_per_method=1, bootstrap=1000),
    # For the tests: seconds.
    "toy": Size("toy", seq_len=32, batch=4, steps=2, eval_every=1, val_passages=12, curve_passages=6, test_cap=2,
                seeds=2, methods=("full", "peft_lora", "ours_grad", "ours_act", "ours_kaiming", "ours_grad_sgd",
                                  "ours_grad_sgd_corr"),
                ranks=(8,), lrs_per_method=2, init_batches=2, bootstrap=200, max_chars=3000, eval_batch=16),
}


def pick_lrs(grid: Sequence[float], n: int) -> Tuple[float, ...]:
    """n values of the grid, evenly spread (the middle one for n = 1)."""
    if n >= len(grid):
        return tuple(grid)
    if n == 1:
        return (grid[len(grid) // 2],)
    idx = sorted({round(i * (len(grid) - 1) / (n - 1)) for i in range(n)})
    return tuple(grid[i] for i in idx)
