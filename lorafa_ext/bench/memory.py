"""Activation memory of one layer: bytes saved for backward, and peak CUDA memory of a fwd+bwd.

Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor that autograd
saves during the forward passes through the pack hook, and the bytes of the *unique storages* behind
them are added up (a tensor saved twice, or two views of one buffer, count once). Storages of the
layer's parameters (W, bias, A, B, a cached Gram inverse) are not activations and are left out; the
layer's input x counts when it is saved, because that is what keeps it alive until the backward.
"""
from __future__ import annotations

import gc
from typing import Callable, Iterable, Sequence

import torch

from .failures import free, status_of
from .progress import NullBar
from .variants import VARIANTS, Case, build_step, make_sets


def _storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return (t.device.type, t.device.index, st.data_ptr()), st.nbytes()


class SavedTensorCounter:
    """Context manager: counts unique storages saved for backward (minus `exclude` tensors' storages)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = set()
        for t in exclude:
            if t is not None:
                try:
                    self.exclude.add(_storage_key(t)[0])
                except Exception:  # noqa: BLE001
                    pass
        self.storages: dict = {}
        self.count = 0
        self._ctx = None

    def _pack(self, t):
        self.count += 1
        try:
            key, nbytes = _storage_key(t)
        except Exception:  # noqa: BLE001 - tensors without a plain storage are not counted
            return t
        if nbytes and key not in self.exclude:
            self.storages[key] = max(nbytes, self.storages.get(key, 0))
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return int(sum(self.storages.values()))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_memory(case: Case, variant: str, device, seed: int = 0) -> dict:
    """Saved-activation bytes of one forward and (CUDA only) the peak memory of one fwd+bwd above
    what was allocated before it. Returns a row dict."""
    device = torch.device(device)
    sets = make_sets(case, device, 1, seed=seed)
    step = build_step(variant, case, sets, dynamic=None)  # compiled variants: one graph over every N
    s = sets[0]
    step.run(0)  # warm-up (compiles torch.compile'd variants, initialises cuBLAS workspaces)
    _sync(device)
    params = [s.W, s.b, s.A, s.B, s.gram_inv]
    with SavedTensorCounter(exclude=params) as counter:
        y = step.forward(0)
    del y
    row = {"case": case.label, "device": device.type, "N": case.N, "in_features": case.in_features,
           "out_features": case.out_features, "r": case.r, "dtype": case.dtype, "variant": variant,
           "label": VARIANTS[variant].label, "saved_bytes": counter.bytes,
           "saved_mib": counter.bytes / 2**20, "saved_tensors": counter.count, "peak_fwdbwd_bytes": None,
           "peak_fwdbwd_mib": None}
    if device.type == "cuda":
        gc.collect()
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step.run(0)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        row["peak_fwdbwd_bytes"] = int(peak)
        row["peak_fwdbwd_mib"] = peak / 2**20
    return row


def run_memory(cases: Sequence[Case], variants: Sequence[str], device, bar=None,
               compile_for: Callable[[Case], bool] | None = None) -> dict:
    """Memory rows for every (case, variant); failures (OOM included) are listed in 'skipped'."""
    bar = bar or NullBar()
    device = torch.device(device)
    rows, skipped = [], []
    for case in cases:
        bar.set_description(f"memory {case.label}")
        vs = list(variants)
        if compile_for is not None and not compile_for(case):
            vs = [v for v in vs if not VARIANTS[v].compiled]
        for v in vs:
            err = None
            try:
                rows.append(layer_memory(case, v, device))
            except Exception as e:  # noqa: BLE001 - one failing variant must not end the run
                err = status_of(e)
            if err is not None:
                skipped.append({"case": case.label, "variant": v, "reason": err})
            free(device)
        bar.update(1)
    return {"cases": rows, "skipped": skipped}
