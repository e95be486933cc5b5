"""One training run: the steps, the validation curve, and (first run of a configuration) the
training-state memory of one step."""
from __future__ import annotations

import time
from typing import Dict, Tuple

import torch
from torch import nn

from lorafa_ext.bench import SavedTensorCounter

from .. import shakespeare as shk
from .config import Method, Size
from .data import BalancedSampler
from .model import build, schedule


def forward_precision(device, size: Size):
    """The context of every forward pass: bf16 autocast for size.precision "bf16", else nothing."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=size.precision == "bf16")


@torch.inference_mode()
def predict(model: nn.Module, data: shk.Passages, device, size: Size) -> torch.Tensor:
    """The predicted genre of every passage (int64, on the CPU), size.eval_batch passages at a time."""
    was = model.training
    model.eval()
    preds = []
    for i in range(0, len(data), size.eval_batch):
        ids = data.input_ids[i: i + size.eval_batch].to(device)
        with forward_precision(device, size):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        preds.append(logits.argmax(-1).cpu())
    model.train(was)
    return torch.cat(preds)


def scores(pred: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Accuracy and balanced accuracy (mean per-genre recall)."""
    recalls = [float((pred[labels == c] == c).float().mean()) for c in range(len(shk.GENRES)) if (labels == c).any()]
    return {"acc": float((pred == labels).float().mean()), "balanced_acc": float(sum(recalls) / len(recalls))}


def evaluate(model: nn.Module, data: shk.Passages, device, size: Size) -> Dict[str, float]:
    return scores(predict(model, data, device, size), data.labels)


def _memory_breakdown(model, opt, saved_bytes: int) -> Dict[str, int]:
    """Bytes of parameters, gradients, optimizer state and saved activations (unique tensors)."""
    params = {id(p): p for p in model.parameters()}
    param_b = sum(p.numel() * p.element_size() for p in params.values())
    grad_b = sum(p.grad.numel() * p.grad.element_size() for p in params.values() if p.grad is not None)
    state_b = 0
    seen = set()
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and id(v) not in seen:
                seen.add(id(v))
                state_b += v.numel() * v.element_size()
    return {"params_bytes": int(param_b), "grads_bytes": int(grad_b), "optimizer_state_bytes": int(state_b),
            "saved_activations_bytes": int(saved_bytes),
            "total_bytes": int(param_b + grad_b + state_b + saved_bytes)}


def _forward(model, ids, count_saved: bool):
    """logits, and the bytes autograd saved for backward (None unless count_saved)."""
    if not count_saved:
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)), None
    with SavedTensorCounter(exclude=list(model.parameters()) + list(model.buffers())) as counter:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return logits, counter.bytes


class _Loop:
    """The training loop of one run: step(i) trains on one batch, timing only the step itself."""

    def __init__(self, model, opt, size: Size, data, device, seed: int):
        self.model, self.opt, self.size, self.data, self.device = model, opt, size, data, device
        self.sched = schedule(opt, size.steps, size.warmup_frac)
        self.sampler = BalancedSampler(data["train"].labels, size.batch, seed)
        self.cuda = torch.device(device).type == "cuda"
        self.train_s, self.losses, self.mem = 0.0, [], None

    def step(self, i: int, measure_memory: bool) -> None:
        t0 = time.perf_counter()
        ix = self.sampler.next()
        ids = self.data["train"].input_ids[ix].to(self.device, non_blocking=True)
        y = self.data["train"].labels[ix].to(self.device, non_blocking=True)
        with forward_precision(self.device, self.size):
            logits, saved = _forward(self.model, ids, measure_memory and i == 0)
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        self.opt.step()
        if saved is not None:
            self.mem = _memory_breakdown(self.model, self.opt, saved)
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.train_s += time.perf_counter() - t0
        self.losses.append(float(loss.detach()))


def train_run(spec: Method, r: int, lr: float, seed: int, size: Size, encoder, data: Dict[str, shk.Passages],
              device, measure_memory: bool = False, log=None, init_batches=None) -> Tuple[dict, nn.Module]:
    """One training run; returns (row, trained model). The validation curve: every size.eval_every
    steps on data["val_curve"]; at the last step the whole data["val"] (val_acc_final), whose
    curve-subset accuracy is the curve's last point."""
    t_init = time.perf_counter()
    model, opt, trainable = build(spec, r, lr, seed, encoder, device, init_batches=init_batches)
    init_s = time.perf_counter() - t_init
    loop = _Loop(model, opt, size, data, device, seed)
    torch.manual_seed(20_000 + seed)  # model dropout
    model.train()
    if loop.cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    curve_steps, curve_acc, t_run = [], [], time.perf_counter()
    for step in range(size.steps):
        loop.step(step, measure_memory)
        if (step + 1) % size.eval_every == 0 and step + 1 < size.steps:
            curve_steps.append(step + 1)
            curve_acc.append(evaluate(model, data["val_curve"], device, size)["acc"])
    val_pred = predict(model, data["val"], device, size)
    curve_steps.append(size.steps)
    idx = data["val_curve_index"]
    curve_acc.append(scores(val_pred[idx], data["val"].labels[idx])["acc"])
    val = scores(val_pred, data["val"].labels)
    losses = loop.losses
    row = {
        "method": spec.name, "r": None if spec.family == "full" else r, "lr": lr, "seed": seed,
        "trainable_params": trainable, "steps": size.steps, "batch": size.batch, "seq_len": size.seq_len,
        "val_steps": curve_steps, "val_acc": curve_acc, "val_acc_final": val["acc"],
        "val_balanced_acc_final": val["balanced_acc"], "init_s": init_s,
        "train_loss_first": losses[0], "train_loss_last10": float(sum(losses[-10:]) / len(losses[-10:])),
        "train_wall_s": loop.train_s, "run_wall_s": time.perf_counter() - t_run,
        "ms_per_step": 1000.0 * loop.train_s / size.steps,
    }
    if loop.mem is not None:
        row["memory"] = loop.mem
    if loop.cuda:
        row["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        row["cuda_peak_above_start_bytes"] = int(torch.cuda.max_memory_allocated(device) - base_alloc)
    if log:
        log(f"  {spec.name:18s} r={str(row['r']):4s} lr={lr:<8g} seed={seed} val={val['acc']:.3f} "
            f"loss {losses[0]:.3f}->{row['train_loss_last10']:.3f} {loop.train_s:6.1f}s")
    return row, model
