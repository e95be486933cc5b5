"""Side-by-side timing of training-style steps.

A *step* is ``y = forward(k)`` followed by ``torch.autograd.grad(y, inputs(k), dy(k))`` on rotation
set ``k``. One sample takes three timestamps (before the forward, between forward and backward, after
the backward), so one run gives forward, backward and forward+backward times that add up exactly.

* GPU: CUDA events on the current stream. Before every sample the L2 cache is flushed by zeroing a
  buffer twice its size (outside the timed region), and the inputs/parameters are rotated over several
  independent sets, so nothing runs from cache. A short spin kernel (``queue_ahead_us``) then holds the
  GPU while the host enqueues the sample, so that the events measure the GPU's time and not the host's
  launch latency (which would otherwise dominate small N). The host synchronises once per round, never
  inside a sample.
* CPU: ``time.perf_counter_ns`` around each part, Python's garbage collector off while sampling.
  Operations on the CPU are synchronous, so wall time is the op's time.

All variants are measured side by side: warm-up first (at least one step per rotation set, which
also compiles torch.compile'd variants), then every round runs one sample of each variant, in an
order that rotates from round to round, so drift (clocks, thermal state, other processes) hits every
variant alike. Sample i of every variant comes from round i, so ratios can be taken round by round
(``stats.paired_ratio``). Figures are medians with their relative interquartile range (stats.py).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import stats

PASSES = ("fwd", "bwd", "fwdbwd")


@dataclass
class Step:
    """What the timer needs from a variant: forward(k) -> y, inputs(k) -> tensors to differentiate, dy(k)."""

    forward: Callable[[int], torch.Tensor]
    inputs: Callable[[int], Sequence[torch.Tensor]]
    grad_output: Callable[[int], torch.Tensor]
    sets: int = 1

    def run(self, k: int, marks: Callable[[], object] | None = None):
        """One step on set k; returns the three marks (or None when marks is None)."""
        m0 = marks() if marks else None
        y = self.forward(k)
        m1 = marks() if marks else None
        torch.autograd.grad(y, list(self.inputs(k)), self.grad_output(k))
        m2 = marks() if marks else None
        return m0, m1, m2


@dataclass
class TimingConfig:
    warmup: int = 3          # warm-up rounds (at least one per rotation set)
    reps: int = 20           # target number of samples per variant
    max_reps: int = 200      # hard cap on samples (short ops keep sampling until min_time_s)
    min_time_s: float = 0.0  # keep sampling up to max_reps until this much wall time has passed
    max_time_s: float = 60.0 # stop once this much wall time has passed and min_samples were taken
    min_samples: int = stats.MIN_SAMPLES  # never fewer samples than this (max_time_s permitting)
    queue_ahead_us: float = 300.0  # GPU only: spin this long before each sample (see the module doc)


@dataclass
class Samples:
    """Per-variant samples in seconds."""

    fwd: list = field(default_factory=list)
    bwd: list = field(default_factory=list)
    fwdbwd: list = field(default_factory=list)

    def add(self, f: float, b: float):
        self.fwd.append(f)
        self.bwd.append(b)
        self.fwdbwd.append(f + b)

    def __len__(self):
        return len(self.fwdbwd)


def summarize(s: Samples) -> dict:
    """Per pass: the median in microseconds (``<pass>_us``) and the relative IQR (``<pass>_spread``)."""
    out = {}
    for p in PASSES:
        xs = getattr(s, p)
        out[f"{p}_us"] = stats.median(xs) * 1e6
        out[f"{p}_spread"] = stats.rel_iqr(xs)
    out["samples"] = len(s)
    return out


class _L2Flusher:
    def __init__(self, device: torch.device):
        self.buf = None
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            l2 = int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)
            self.buf = torch.empty(2 * l2 // 4 + 1024, dtype=torch.int32, device=device)

    def __call__(self):
        if self.buf is not None:
            self.buf.zero_()


def _spin_cycles(device: torch.device, us: float) -> int:
    """GPU clock cycles in `us` microseconds (torch.cuda._sleep spins for a number of cycles)."""
    if us <= 0:
        return 0
    khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 0) or 1_500_000
    return int(us * khz / 1000)


def _cuda_mark():
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def _warm_up(steps: dict, cfg: TimingConfig, device: torch.device) -> dict:
    """At least one step on every rotation set of every variant; returns {name: error} of those that
    raised (they are left out of the measurement)."""
    failures = {}
    for name, st in steps.items():
        try:
            for i in range(max(cfg.warmup, st.sets)):
                st.run(i % st.sets)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - a failing variant must not end the run
            failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    return failures


class _Round:
    """One sample of every variant, on the GPU (events, L2 flush, queue-ahead spin) or the CPU."""

    def __init__(self, steps: dict, device: torch.device, cfg: TimingConfig):
        self.steps, self.device = steps, device
        self.cuda = device.type == "cuda"
        self.flush = _L2Flusher(device)
        self.spin = _spin_cycles(device, cfg.queue_ahead_us) if self.cuda else 0

    def __call__(self, order: Sequence[str], rnd: int, samples: dict) -> None:
        pending = []
        for name in order:
            st = self.steps[name]
            k = rnd % st.sets
            if not self.cuda:
                m = st.run(k, time.perf_counter_ns)
                samples[name].add((m[1] - m[0]) * 1e-9, (m[2] - m[1]) * 1e-9)
                continue
            self.flush()
            if self.spin:
                torch.cuda._sleep(self.spin)
            pending.append((name, st.run(k, _cuda_mark)))
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for name, (e0, e1, e2) in pending:
                samples[name].add(e0.elapsed_time(e1) * 1e-3, e1.elapsed_time(e2) * 1e-3)


def _done(rnd: int, elapsed: float, cfg: TimingConfig) -> bool:
    if rnd >= cfg.max_reps:
        return True
    if rnd >= cfg.reps and elapsed >= cfg.min_time_s:
        return True
    return rnd >= cfg.min_samples and elapsed >= cfg.max_time_s


def measure(steps: dict, device: torch.device, cfg: TimingConfig, on_round: Callable[[], None] | None = None):
    """Time every step side by side: warm-up, then rounds of one sample each, in rotating order.

    Returns (samples: {name: Samples}, failures: {name: "error text"}). A step that raises during
    warm-up is dropped and reported in failures; the others go on.
    """
    device = torch.device(device)
    failures = _warm_up(steps, cfg, device)
    names = [n for n in steps if n not in failures]
    samples = {n: Samples() for n in names}
    if not names:
        return samples, failures
    one_round = _Round(steps, device, cfg)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    t_start, rnd = time.perf_counter(), 0
    try:
        while not _done(rnd, time.perf_counter() - t_start, cfg):
            shift = rnd % len(names)
            one_round(names[shift:] + names[:shift], rnd, samples)
            rnd += 1
            if on_round is not None:
                on_round()
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, failures
