"""``init_from_data``: choose every LoRA-FA layer's frozen A from the data, before training.

With A frozen, the update s B A lies in A's row space, so A decides what LoRA-FA can learn (see
docs/CORRECTION.md). ``init_from_data`` runs the model over a few batches and sets each layer's A
to an r-dimensional subspace of its input space read off the data:

- ``method="gradient"``: the top-r right singular subspace of the layer's full-weight gradient
  G = sum over batches of dy^T x (out, in), at the current weights (LoRA-GA, LoRA-One). It minimises
  ||s g A - G||_F over s g: the part of the full-gradient step that LoRA-FA's corrected step keeps.
- ``method="activation"``: the top-r right singular vectors of the layer's inputs X (all rows x of
  all batches), i.e. the top-r eigenvectors of X^T X (EVA; uncentred).

The rows of the new A are orthonormal, ordered by decreasing singular value, each with its entry of
largest magnitude positive, and scaled by 1/sqrt(3): A A^T = I / 3, the expected Gram matrix of
the kaiming init (and exactly that of init="orthogonal"), so learning rates tuned for the default
init carry over. B stays 0, so the model's output is unchanged; base weights are untouched and A
stays frozen.

Statistics. Each layer's statistic is summed exactly, in fp32 (fp64 for fp64 adapters), from
forward hooks (x) and hooks on the layer's output gradient (dy): G (out x in) for "gradient",
X^T X (in x in) for "activation". The top-r subspace comes from ``torch.linalg.svd`` of G itself
(forming G^T G would square its condition number) or ``torch.linalg.eigh`` of X^T X. Holding every
layer's statistic at once would cost, for "gradient", twice the memory of a bf16 model; so layers
are processed in groups, in module order, whose statistics together stay within ``max_stat_bytes``
(default: the bytes of the model's parameters), one pass over ``batches`` per group. A layer whose
statistic alone exceeds the limit makes a group of its own. With more than one group ``batches``
must be re-iterable (a list, a DataLoader). For "gradient", the layers of the current group also keep their input x until the
backward pass reaches them (the LoRA-FA op itself keeps only x A^T).

Every pass runs with the model in eval mode (no dropout), so each pass computes the same function;
the train/eval flags are restored afterwards. Under torch.distributed (initialised) the statistics
and row counts are summed across ranks and rank 0's A is broadcast, so every rank gets the same A;
call it on every rank, before wrapping the model in DDP or FSDP.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .modules.base import LoRAFALayer
from .modules.base import is_plain_tensor as _is_plain_tensor
from .modules.linear import LoRAFALinear
from .model import lorafa_layers
from .integrations.peft import _unwrap

__all__ = ["init_from_data", "METHODS"]

METHODS = ("gradient", "activation")

# A's rows are orthonormal / sqrt(3): A A^T = I/3, the expected Gram matrix of kaiming-uniform(a=sqrt(5)).
A_ROW_NORM = 1.0 / math.sqrt(3.0)

# "activation": an eigenvalue of X^T X counts towards the available rank when it exceeds RANK_RTOL times
# the rounding noise of forming the Gram; "gradient" uses numpy's matrix_rank rule (see _subspace).
RANK_RTOL = 10.0


# ---------------------------------------------------------------------------------- layer access


@dataclass
class _Adapter:
    """One LoRA-FA layer as init_from_data sees it: its A and B parameters and its rank."""

    name: str
    module: nn.Module
    lora_a: Tensor  # (r, in), frozen
    lora_b: Tensor  # (out, r)

    @property
    def r(self) -> int:
        return self.lora_a.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_a.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_b.shape[0]

    def refresh_gram_inverse(self) -> None:
        self.module.refresh_gram_inverse()


def _adapters(model: nn.Module) -> List[_Adapter]:
    """Every LoRA-FA layer of the model: ``LoRAFALinear`` layers and PEFT layers switched by
    ``from_peft`` (their active adapter). The one place here that knows the layer classes."""
    found = [_Adapter(name, layer, layer.lora_A, layer.lora_B) for name, layer in lorafa_layers(model)]
    for name, mod in model.named_modules():
        if isinstance(mod, LoRAFALinear) or not isinstance(mod, LoRAFALayer):
            continue
        active = [a for a in mod.active_adapters if a in mod.lora_A]
        if len(active) != 1:
            raise ValueError(
                f"init_from_data: layer {name!r} has {len(active)} active adapters {active}; "
                "activate exactly one (PeftModel.set_adapter)"
            )
        adapter = active[0]
        found.append(_Adapter(name, mod, mod.lora_A[adapter].weight, mod.lora_B[adapter].weight))
    return found


# ---------------------------------------------------------------------------------- statistics


def _stat_dtype(adapter: _Adapter) -> torch.dtype:
    return torch.promote_types(adapter.lora_a.dtype, torch.float32)


def _stat_shape(adapter: _Adapter, method: str) -> Tuple[int, int]:
    n = adapter.in_features
    return (adapter.out_features, n) if method == "gradient" else (n, n)


def _stat_bytes(adapter: _Adapter, method: str) -> int:
    rows, cols = _stat_shape(adapter, method)
    return rows * cols * (torch.finfo(_stat_dtype(adapter)).bits // 8)


class _Stat:
    """The running statistic of one layer: G = sum dy^T x, or C = sum x^T x; and the rows of x seen."""

    def __init__(self, adapter: _Adapter, method: str) -> None:
        self.adapter = adapter
        self.value = torch.zeros(
            _stat_shape(adapter, method), dtype=_stat_dtype(adapter), device=adapter.lora_a.device
        )
        self.rows = 0

    def _flat(self, t: Tensor, cols: int) -> Tensor:
        return t.detach().reshape(-1, cols).to(self.value.dtype)

    @torch.no_grad()
    def add_activation(self, x: Tensor) -> None:
        x2 = self._flat(x, self.adapter.in_features)
        self.value.addmm_(x2.t(), x2)
        self.rows += x2.shape[0]

    @torch.no_grad()
    def add_gradient(self, x: Tensor, dy: Tensor) -> None:
        x2 = self._flat(x, self.adapter.in_features)
        self.value.addmm_(self._flat(dy, self.adapter.out_features).t(), x2)
        self.rows += x2.shape[0]


def _activation_hook(stat: _Stat):
    def hook(module, args, output):
        stat.add_activation(args[0])

    return hook


def _gradient_hook(stat: _Stat):
    def hook(module, args, output):
        if isinstance(output, Tensor) and output.requires_grad:
            x = args[0]
            output.register_hook(lambda dy: stat.add_gradient(x, dy))

    return hook


def _default_loss(model: nn.Module, batch):
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"init_from_data: a batch of type {type(batch).__name__} needs loss_fn(model, batch) returning "
            "the loss (without loss_fn, batches must be dicts and model(**batch).loss is used)"
        )
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "init_from_data: model(**batch).loss is None; put the labels in the batches or pass loss_fn"
        )
    return loss


def _default_forward(model: nn.Module, batch):
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def _check_loss(loss) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise TypeError(f"init_from_data: loss_fn must return a scalar floating-point tensor, got {loss!r:.200}")
    if not loss.requires_grad:
        raise ValueError(
            "init_from_data: the loss does not depend on any LoRA-FA layer's output (it does not require "
            "grad); check loss_fn and that the batches go through the model"
        )
    return loss.reshape(())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _collect(model, group, method, batches, num_batches, loss_fn) -> int:
    """One pass over ``batches``: fill the statistics of ``group``; return the number of batches seen."""
    handles = []
    hook = _gradient_hook if method == "gradient" else _activation_hook
    b_flags = [(stat.adapter.lora_b, stat.adapter.lora_b.requires_grad) for stat in group]
    try:
        for stat in group:
            handles.append(stat.adapter.module.register_forward_hook(hook(stat)))
            if method == "gradient":
                stat.adapter.lora_b.requires_grad_(True)  # puts the layer's output on the autograd graph
        seen = 0
        for batch in itertools.islice(batches, num_batches):
            if method == "gradient":
                with torch.enable_grad():
                    loss = _check_loss((loss_fn or _default_loss)(model, batch))
                    torch.autograd.grad(loss, [b for b, _ in b_flags], allow_unused=True)
            else:
                with torch.no_grad():
                    (loss_fn or _default_forward)(model, batch)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for b, flag in b_flags:
            b.requires_grad_(flag)
    if _distributed():
        counts = torch.tensor([seen] + [stat.rows for stat in group], dtype=torch.float64,
                              device=group[0].value.device)
        torch.distributed.all_reduce(counts)
        seen = int(counts[0].item())
        for stat, rows in zip(group, counts[1:].tolist()):
            torch.distributed.all_reduce(stat.value)
            stat.rows = int(rows)
    return seen


# ---------------------------------------------------------------------------------- subspace


def _numerical_rank(values: Tensor, tol_scale: float) -> int:
    """How many of the decreasing, non-negative ``values`` exceed tol_scale times the largest one."""
    if not values.numel() or values[0] <= 0:
        return 0
    return int((values > tol_scale * values[0]).sum().item())


def _subspace(stat: _Stat, method: str) -> Tuple[Optional[Tensor], int]:
    """Orthonormal rows (r, in) spanning the layer's top-r subspace, or None; and the rank available.

    "activation": eigenvectors of the Gram X^T X. Forming it in precision eps perturbs its eigenvalues
    by about n * eps * lambda_max, so a direction counts when lambda > RANK_RTOL * n * eps * lambda_max.
    "gradient": the SVD of G itself, never of G^T G (which would square G's condition number and lose
    every direction with sigma / sigma_max below sqrt(n eps), a few percent in fp32); a direction counts
    when sigma > max(out, in) * eps * sigma_max, the threshold of numpy.linalg.matrix_rank. (A classifier
    with few classes has a last-layer gradient whose spectrum falls to ~1e-3 sigma_max after a handful
    of directions: real signal, which a stricter threshold would refuse at r = 16.)
    """
    r, value = stat.adapter.r, stat.value
    eps = torch.finfo(value.dtype).eps
    if method == "activation":
        values, vectors = torch.linalg.eigh(value)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        rank = _numerical_rank(values, RANK_RTOL * value.shape[0] * eps)
        basis = vectors[:, :r]
    else:
        _, sing, vh = torch.linalg.svd(value, full_matrices=False)  # G = U diag(sing) Vh, Vh (k, in)
        rank = _numerical_rank(sing, max(value.shape) * eps)
        basis = vh[:r].t()
    if rank < r:
        return None, rank
    rows = basis.t().contiguous()
    idx = rows.abs().argmax(dim=1, keepdim=True)
    rows = rows * torch.sign(rows.gather(1, idx))  # deterministic sign: largest entry positive
    return rows, rank


def _rank_error(stat: _Stat, method: str, rank: int) -> ValueError:
    a = stat.adapter
    what = "inputs x" if method == "activation" else "full-weight gradient dy^T x"
    return ValueError(
        f"init_from_data: layer {a.name!r} has r={a.r}, but its {what} has rank {rank} over the batches "
        f"seen ({stat.rows} rows of x); pass more data in batches (or a larger num_batches) or lower that "
        "layer's r (r / rank_pattern)"
    )


# ---------------------------------------------------------------------------------- entry point


def _check_args(model, batches, method, loss_fn, num_batches, max_stat_bytes) -> str:
    if not isinstance(model, nn.Module):
        raise TypeError(f"init_from_data: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"init_from_data: method must be one of {METHODS}, got {method!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"init_from_data: loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    for arg, value in (("num_batches", num_batches), ("max_stat_bytes", max_stat_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"init_from_data: {arg} must be a positive integer or None, got {value!r}")
    if batches is None or isinstance(batches, (Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"init_from_data: batches must be an iterable of batches (a list, a DataLoader), got "
            f"{type(batches).__name__}"
        )
    if isinstance(batches, Mapping):
        raise TypeError("init_from_data: batches must be an iterable of batches, got a single dict; wrap it in a list")
    if hasattr(batches, "__len__") and len(batches) == 0:
        raise ValueError("init_from_data: batches is empty; pass at least one batch")
    return method.lower()


def _check_adapters(adapters: List[_Adapter], method: str) -> None:
    if not adapters:
        raise ValueError(
            "init_from_data: model has no LoRA-FA layers (use lorafa_ext.apply_lorafa or lorafa_ext.from_peft first)"
        )
    for a in adapters:
        if getattr(a.module, "merged", False):
            raise ValueError(f"init_from_data: layer {a.name!r} is merged; unmerge it first")
        if not (_is_plain_tensor(a.lora_a) and _is_plain_tensor(a.lora_b)):
            raise ValueError(
                f"init_from_data: layer {a.name!r} has a sharded or meta A/B; call init_from_data before "
                "fully_shard and after the weights are materialised"
            )
        if torch.count_nonzero(a.lora_b.detach()).item() != 0:
            raise ValueError(
                f"init_from_data: layer {a.name!r} has a nonzero lora_B; init_from_data sets A before training, "
                "while B = 0 (so that the model's output does not change)"
            )
        limit = a.in_features if method == "activation" else min(a.in_features, a.out_features)
        if a.r > limit:
            dims = (f"in_features={a.in_features}" if method == "activation"
                    else f"min(in_features, out_features)={limit}")
            raise ValueError(
                f"init_from_data: layer {a.name!r} has r={a.r} > {dims}: its statistic has at most rank {limit}; "
                "lower that layer's r (r / rank_pattern)"
            )


def _groups(adapters: List[_Adapter], method: str, limit: int) -> List[List[_Adapter]]:
    """Consecutive layers whose statistics together stay within ``limit`` bytes (at least one each)."""
    groups, current, used = [], [], 0
    for a in adapters:
        size = _stat_bytes(a, method)
        if current and used + size > limit:
            groups.append(current)
            current, used = [], 0
        current.append(a)
        used += size
    if current:
        groups.append(current)
    return groups


def init_from_data(
    model: nn.Module,
    batches: Iterable,
    method: str = "gradient",
    *,
    loss_fn: Optional[Callable] = None,
    num_batches: Optional[int] = None,
    max_stat_bytes: Optional[int] = None,
) -> nn.Module:
    """Set every LoRA-FA layer's frozen A from the data (B stays 0: the output is unchanged); return the model.

    Args:
        model: a model from ``apply_lorafa`` or ``from_peft`` (DDP / torch.compile wrappers are looked
            through), before training: every lora_B must be zero and no layer merged.
        batches: an iterable of batches (a list, a DataLoader); re-iterable when the layers need more
            than one pass (see ``max_stat_bytes``).
        method: "gradient" (top-r right singular subspace of each layer's full-weight gradient
            sum dy^T x) or "activation" (top-r right singular vectors of each layer's inputs x).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` ("gradient"; for "activation" it is only run,
            under no_grad, as the forward pass). Default: ``model(**batch).loss`` for dict batches
            ("activation": ``model(**batch)``, or ``model(batch)`` for other batches). It is called with
            the unwrapped model and must not call backward itself.
        num_batches: use at most this many batches per pass (default: all of them).
        max_stat_bytes: the statistics held at once stay within this many bytes (default: the bytes of
            the model's parameters); more layers than fit are processed in further passes.

    A's rows are orthonormal and scaled by 1/sqrt(3) (A A^T = I/3, the kaiming init's expected Gram
    matrix), ordered by decreasing singular value. Raises ValueError, naming the argument, for an empty
    ``batches``, a model without LoRA-FA layers, an unknown ``method``, or a layer whose r exceeds the
    rank its statistic has (too few samples, or r > in_features); nothing is written then.
    """
    method = _check_args(model, batches, method, loss_fn, num_batches, max_stat_bytes)
    model = _unwrap(model)
    adapters = _adapters(model)
    _check_adapters(adapters, method)
    if max_stat_bytes is None:
        max_stat_bytes = max(1, sum(p.numel() * p.element_size() for p in model.parameters()))
    groups = _groups(adapters, method, max_stat_bytes)
    if len(groups) > 1 and iter(batches) is batches:
        raise ValueError(
            f"init_from_data: batches is a one-shot iterator, but the statistics need {len(groups)} passes "
            f"within max_stat_bytes={max_stat_bytes}; pass a list or a DataLoader, or a larger max_stat_bytes"
        )

    modes = [(m, m.training) for m in model.modules()]
    new_a: List[Tuple[_Adapter, Tensor]] = []
    try:
        model.eval()
        for group in groups:
            stats = [_Stat(a, method) for a in group]
            seen = _collect(model, stats, method, batches, num_batches, loss_fn)
            if seen == 0:
                raise ValueError("init_from_data: batches is empty; pass at least one batch")
            for stat in stats:
                rows, rank = _subspace(stat, method)
                if rows is None:
                    raise _rank_error(stat, method, rank)
                new_a.append((stat.adapter, rows * A_ROW_NORM))
            del stats
    finally:
        for m, flag in modes:
            m.training = flag

    with torch.no_grad():  # write every A only once all of them are known
        for adapter, a in new_a:
            a = a.to(adapter.lora_a.dtype)
            if _distributed():
                torch.distributed.broadcast(a, src=0)
            adapter.lora_a.copy_(a)
            adapter.refresh_gram_inverse()
    return model
