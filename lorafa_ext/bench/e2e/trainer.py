"""One method's model, optimizer and batch (Trainer), the memory probe of one method alone, and the
interleaved timing of several.

Memory (peak CUDA memory, saved activations) is measured with the method alone on the device: the
probe builds it, runs its warm-up steps and frees it. Speed is measured afterwards with the methods
side by side: every trainer is built and warmed up, then each round takes one timed step of every
trainer, in an order that rotates from round to round, so that drift hits every method alike.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from ..memory import SavedTensorCounter
from ..variants import DTYPES
from .models import E2EConfig, build_model, prepare, quantize_projections


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """model, opt and a fixed batch of token ids for one (method, batch, grad_ckpt, dropout)."""

    def __init__(self, method: str, cfg: E2EConfig, batch: int, grad_ckpt: bool, dropout: float | None, device):
        if cfg.simulate_oom is not None and cfg.simulate_oom(method, batch):
            raise torch.OutOfMemoryError("simulated out of memory")
        self.device = torch.device(device)
        model = build_model(cfg.model_config(), DTYPES[cfg.dtype], self.device, seed=cfg.seed)
        if cfg.quant != "none":
            model = quantize_projections(model, cfg.quant, DTYPES[cfg.dtype], self.device)
        if grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.frozen = list(model.parameters())  # before wrapping: every base weight
        self.model, self.opt, self.trainable_params = prepare(method, model, cfg, dropout or 0.0, self.device)
        g = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
        self.ids = torch.randint(0, cfg.model_config()["vocab_size"], (batch, cfg.seq), generator=g).to(self.device)
        self.grad_ckpt = grad_ckpt

    def step(self, counter=None) -> float:
        """One training step (forward, backward, optimizer); returns the loss. `counter` (a
        SavedTensorCounter) sees what the forward saves for backward."""
        with counter or contextlib.nullcontext():
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach().float())

    def counted_step(self) -> tuple:
        """A step that counts the activations saved for backward (unique storages; parameters and
        buffers excluded): (saved bytes, loss). The bytes are None with gradient checkpointing, whose
        own hooks hide the saved tensors."""
        if self.grad_ckpt:
            return None, self.step()
        exclude = self.frozen + list(self.model.parameters()) + list(self.model.buffers())
        counter = SavedTensorCounter(exclude=exclude)
        loss = self.step(counter)
        return counter.bytes, loss


def probe(method: str, cfg: E2EConfig, batch: int, grad_ckpt: bool, dropout: float | None, device,
          row: dict) -> None:
    """Build `method` alone, run its warm-up steps (the first one counts the saved activations) and
    fill row's memory fields. Everything it allocates is local: released when it returns or raises."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = Trainer(method, cfg, batch, grad_ckpt, dropout, device)
    row["trainable_params"] = int(t.trainable_params)
    saved, loss = t.counted_step()
    for _ in range(cfg.warmup - 1):
        loss = t.step()
    sync(device)
    if saved is not None:
        row["saved_activation_bytes"], row["saved_activation_mib"] = saved, saved / 2**20
    row["loss"] = loss if loss is not None and math.isfinite(loss) else None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_mem_bytes"], row["peak_mem_gib"] = int(peak), peak / 2**30


def interleaved_times(trainers: dict, steps: int, device) -> dict:
    """{key: [seconds of each timed step]}: `steps` rounds, one step of every trainer per round, the
    order rotating by one each round. The trainers are warmed up already."""
    keys = list(trainers)
    times = {k: [] for k in keys}
    for rnd in range(steps):
        shift = rnd % len(keys)
        for k in keys[shift:] + keys[:shift]:
            sync(device)
            t0 = time.perf_counter()
            trainers[k].step()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times
