"""The sizes each suite runs when the command line leaves them open, and the headline cases."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .environment import default_device
from .timing import TimingConfig
from .variants import Case

# The GPU sweep and its headline case.
GPU_NS = (512, 2048, 8192, 32768)
GPU_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192))
GPU_RANKS = (8, 16, 64, 128)
GPU_DTYPES = ("bf16", "fp16")
GPU_HEADLINE = Case(8192, 4096, 4096, 16, "bf16", True)
# The CPU speed case: fp32, x 4096 x 1024, W 1024 x 1024, r = 16.
CPU_HEADLINE = Case(4096, 1024, 1024, 16, "fp32", True)

# The paper's end-to-end setting and the GPU timing, shared by the default and full GPU presets.
_GPU_E2E = dict(model="llama2-7b", dtype="bf16", batch=8, seq=1024, steps=7, warmup=2, grad_ckpt=(False, True),
                dropouts=(0.0, 0.05))
_GPU_TIMING = dict(warmup=5, reps=30, max_reps=200, min_time_s=0.3, max_time_s=20.0)
_GPU_MEMORY = dict(seq_lens=[512, 1024, 2048, 4096, 8192], mem_shape=(4096, 4096), mem_r=16, mem_dtype="bf16")
_CPU_DEFAULT_MEMORY = dict(seq_lens=[256, 512, 1024, 2048], mem_shape=(1024, 1024), mem_r=16, mem_dtype="fp32")

# "auto" is "default". CPU default: about two minutes on 2 idle cores, with at least 9 interleaved
# samples of every micro figure and 7 of every end-to-end step.
PRESETS = {
    "cuda": {
        "quick": dict(ns=[512, 2048], shapes=[(1024, 1024)], ranks=[16], dtypes=["bf16"], compile="headline",
                      seq_lens=[256, 1024], mem_shape=(1024, 1024), mem_r=16, mem_dtype="bf16",
                      e2e=dict(model="tiny", dtype="bf16", batch=2, seq=128, steps=5, warmup=1,
                               grad_ckpt=(False,), dropouts=(0.0,)),
                      timing=dict(warmup=2, reps=10, max_reps=50, min_time_s=0.0, max_time_s=5.0)),
        "default": dict(ns=list(GPU_NS), shapes=list(GPU_SHAPES), ranks=[16], dtypes=["bf16"], compile="subset",
                        **_GPU_MEMORY, e2e=_GPU_E2E, timing=_GPU_TIMING),
        "full": dict(ns=list(GPU_NS), shapes=list(GPU_SHAPES), ranks=list(GPU_RANKS), dtypes=list(GPU_DTYPES),
                     compile="subset", **_GPU_MEMORY, e2e=_GPU_E2E, timing=_GPU_TIMING),
    },
    "cpu": {
        "quick": dict(ns=[32, 64], shapes=[(64, 64)], ranks=[4], dtypes=["fp32"], compile="none",
                      seq_lens=[16, 32], mem_shape=(64, 64), mem_r=4, mem_dtype="fp32",
                      e2e=dict(model="micro", dtype="fp32", batch=2, seq=16, steps=3, warmup=1,
                               grad_ckpt=(False,), dropouts=(0.0,)),
                      timing=dict(warmup=1, reps=3, max_reps=3, min_time_s=0.0, max_time_s=2.0)),
        "default": dict(ns=[512, 1024, 2048, 4096], shapes=[(1024, 1024)], ranks=[16], dtypes=["fp32"],
                        compile="none", **_CPU_DEFAULT_MEMORY,
                        e2e=dict(model="tiny", dtype="fp32", batch=2, seq=64, steps=7, warmup=1,
                                 grad_ckpt=(False, True), dropouts=(0.0, 0.05)),
                        timing=dict(warmup=2, reps=9, max_reps=30, min_time_s=0.3, max_time_s=15.0)),
        "full": dict(ns=[512, 1024, 2048, 4096, 8192], shapes=[(1024, 1024), (1024, 2752), (2752, 1024)],
                     ranks=[8, 16, 64], dtypes=["fp32"], compile="headline", seq_lens=[256, 512, 1024, 2048, 4096],
                     mem_shape=(1024, 1024), mem_r=16, mem_dtype="fp32",
                     e2e=dict(model="tiny", dtype="fp32", batch=8, seq=256, steps=15, warmup=2,
                              grad_ckpt=(False, True), dropouts=(0.0, 0.05)),
                     timing=dict(warmup=2, reps=15, max_reps=60, min_time_s=0.5, max_time_s=30.0)),
    },
}


def preset_for(device, name: str) -> dict:
    return PRESETS["cuda" if torch.device(device).type == "cuda" else "cpu"][name]


def timing_config(device=None, preset: str = "default", **overrides) -> TimingConfig:
    """The TimingConfig of a preset ("quick", "default", "full") on `device`'s kind; overrides that
    are not None replace its fields."""
    d = dict(preset_for(device or default_device(), preset)["timing"])
    d.update({k: v for k, v in overrides.items() if v is not None})
    return TimingConfig(**d)


def headline_case(device=None) -> Case:
    """bf16 N=8192 in=out=4096 r=16 with bias on a GPU; the CPU speed case (fp32 4096x1024x1024) on the CPU."""
    return GPU_HEADLINE if torch.device(device or default_device()).type == "cuda" else CPU_HEADLINE


def sweep(ns: Iterable[int], shapes: Iterable[tuple], ranks: Iterable[int], dtypes: Iterable[str],
          bias: bool = True) -> list:
    """Every Case of the product ns x shapes x ranks x dtypes."""
    return [Case(n, i, o, r, dt, bias) for dt in dtypes for (i, o) in shapes for r in ranks for n in ns]


def gpu_sweep(dtypes: Sequence[str] = GPU_DTYPES, ranks: Sequence[int] = GPU_RANKS) -> list:
    """The GPU sweep: N in {512, 2048, 8192, 32768} x (in, out) in {4096x4096, 4096x11008, 11008x4096,
    8192x8192} x r in {8, 16, 64, 128} x {bf16, fp16}, with bias."""
    return sweep(GPU_NS, GPU_SHAPES, ranks, dtypes, True)
