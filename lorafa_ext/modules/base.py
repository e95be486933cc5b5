"""``LoRAFALayer``: the base of every layer whose adapter runs through the LoRA-FA ops.

    y = x W^T + bias + s * (drop(x) A^T) B^T        torch.ops.lorafa.linear, for an nn.Linear base
    y = base_layer(x) + s * (drop(x) A^T) B^T       torch.ops.lorafa.lowrank, for a quantized base
                                                    (bitsandbytes, torchao: modules/quantized.py)

The base owns what all LoRA-FA layers share: the forward, the cache of the Gram inverse
(A A^T + delta I)^-1 that B's corrected gradient needs, A's freezing and the list of trainable
parameters. A subclass says where its adapters live (one in ``LoRAFALinear``; one per adapter name in
a PEFT ``lora.Linear`` switched by ``from_peft``) through four methods:

    lorafa_base_layer()        the frozen nn.Linear (W, bias), or a quantized linear layer
    lorafa_adapters()          every adapter: {gram buffer name: (lora_A, lora_B)}
    lorafa_active_adapter()    the adapter this forward uses, as an ``ActiveAdapter``; None to run
                               ``lorafa_plain_forward`` instead (merged, disabled, ...)
    lorafa_plain_forward(...)  the forward without the LoRA-FA op

and sets ``correction`` and ``eps`` (through ``_init_lorafa``).
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .quantized import is_quantized

__all__ = ["LoRAFALayer", "ActiveAdapter", "check_rank", "check_alpha", "check_dropout", "check_eps"]


class ActiveAdapter(NamedTuple):
    """The adapter one forward runs: its weights, scaling s, dropout probability and Gram buffer."""

    lora_a: Tensor
    lora_b: Tensor
    scaling: float
    dropout_p: float
    gram_buffer: str


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the Gram inverse: fp32 (fp64 for an fp64 adapter)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_plain_tensor(t: Tensor) -> bool:
    """True for a tensor whose values can be read locally (not meta, not a sharded DTensor)."""
    if t.is_meta:
        return False
    try:  # DTensor (FSDP2 / tensor parallel) holds only a shard outside of forward
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch built without distributed
        return True
    return not isinstance(t, DTensor)


class LoRAFALayer(nn.Module):
    """Base of the LoRA-FA layers (``LoRAFALinear`` and PEFT layers switched by ``from_peft``).

    Gram cache: each adapter's (A A^T + delta I)^-1, delta = eps * tr(A A^T) / r, lives in a
    non-persistent buffer keyed on A's identity: (version counter, data pointer, dtype, device, eps).
    In-place writes through the parameter (``copy_``, ``nn.init``, ``load_state_dict``, a DDP
    broadcast) bump the version; a new tensor (``.data = ...``, ``.to()``, FSDP2's unsharded
    parameter) changes the pointer. Writes through ``A.data`` bypass the version counter: call
    ``refresh_gram_inverse()`` after those. Under ``torch.compile`` the check is skipped (it would
    break the graph) and the buffer is used as is; it is refreshed eagerly on construction, on
    ``load_state_dict``, on ``.to()`` and by every lorafa_ext function that writes A.
    """

    correction: bool
    eps: float

    # ------------------------------------------------------------------ what a subclass provides

    def lorafa_base_layer(self) -> nn.Linear:
        raise NotImplementedError

    def lorafa_adapters(self) -> Dict[str, Tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def lorafa_active_adapter(self) -> Optional[ActiveAdapter]:
        raise NotImplementedError

    def lorafa_plain_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared behaviour

    def _init_lorafa(self, correction: bool, eps: float) -> None:
        """Set the LoRA-FA options and the cache bookkeeping (once per instance)."""
        self.correction = bool(correction)
        self.eps = float(eps)
        if "_lorafa_gram_keys" not in self.__dict__:
            self._lorafa_gram_keys = {}
            self.register_load_state_dict_post_hook(_refresh_after_load)

    def adapter_parameters(self) -> List[nn.Parameter]:
        """The adapter parameters that train: every B that requires grad (A is frozen)."""
        return [b for _, b in self.lorafa_adapters().values() if b.requires_grad]

    def freeze_lora_a(self) -> None:
        """Set requires_grad=False on every A (LoRA-FA trains only B)."""
        for a, _ in self.lorafa_adapters().values():
            a.requires_grad_(False)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        active = None if (args or kwargs) else self.lorafa_active_adapter()
        if active is None:
            return self.lorafa_plain_forward(x, *args, **kwargs)
        base = self.lorafa_base_layer()
        correction = self.correction and torch.is_grad_enabled() and active.lora_b.requires_grad
        gram_inv = self._cached_gram(active.gram_buffer, active.lora_a) if correction else None
        if is_quantized(base):
            y = base(x)
            lowrank = torch.ops.lorafa.lowrank(
                x, active.lora_a, active.lora_b, active.scaling, active.dropout_p, correction, None, self.eps,
                gram_inv,
            )
            return y + lowrank.to(y.dtype)
        return torch.ops.lorafa.linear(
            x, base.weight, base.bias, active.lora_a, active.lora_b, active.scaling, active.dropout_p,
            correction, None, self.eps, gram_inv,
        )

    def refresh_gram_inverse(self) -> None:
        """Recompute every cached (A A^T + delta I)^-1. Needed only after writing A through ``A.data``
        while running under ``torch.compile``; every other change of A is detected."""
        for buf_name, (a, _) in self.lorafa_adapters().items():
            self._refresh_gram(buf_name, a)

    def _gram_key(self, lora_a: Tensor):
        return (lora_a._version, lora_a.data_ptr(), lora_a.dtype, lora_a.device, self.eps)

    @torch.no_grad()
    def _refresh_gram(self, buf_name: str, lora_a: Tensor) -> Optional[Tensor]:
        """Recompute the buffer ``buf_name`` from ``lora_a`` (when A's values are readable here)."""
        want_dtype = gram_dtype(lora_a.dtype)
        old = self._buffers.get(buf_name)
        if not is_plain_tensor(lora_a):
            # Sharded or meta A: keep the old values (cast back to the gram dtype if a .to() changed it)
            # and let the next eager forward, which sees the unsharded A, recompute them.
            if old is not None and old.dtype not in (torch.float32, torch.float64):
                self._buffers[buf_name] = old.to(want_dtype)
            elif buf_name not in self._buffers:
                self.register_buffer(buf_name, None, persistent=False)
            self._lorafa_gram_keys.pop(buf_name, None)
            return self._buffers.get(buf_name)
        gram = torch.ops.lorafa.gram_inverse(lora_a.detach(), self.eps)
        if (
            old is not None
            and old.shape == gram.shape
            and old.dtype == gram.dtype
            and old.device == gram.device
            and not torch.is_inference(old)
        ):
            old.copy_(gram)  # in place: DDP keeps references to the module's buffers
        elif buf_name in self._buffers:
            self._buffers[buf_name] = gram
        else:
            self.register_buffer(buf_name, gram, persistent=False)
        self._lorafa_gram_keys[buf_name] = self._gram_key(lora_a)
        return self._buffers[buf_name]

    def _cached_gram(self, buf_name: str, lora_a: Tensor) -> Optional[Tensor]:
        if not torch.compiler.is_compiling():
            if self._lorafa_gram_keys.get(buf_name) != self._gram_key(lora_a):
                self._refresh_gram(buf_name, lora_a)
        return self._buffers[buf_name]

    def _apply(self, fn, recurse=True):
        adapters = self.lorafa_adapters()
        before = {n: (self._buffers.get(n), a.dtype) for n, (a, _) in adapters.items()}
        super()._apply(fn, recurse)
        for n, (a, _) in self.lorafa_adapters().items():
            old, a_dtype = before.get(n, (None, None))
            new = self._buffers.get(n)
            if old is not None and new is not None and new.dtype != old.dtype and a.dtype == a_dtype:
                # e.g. a .half() of the whole model with an fp32 adapter: keep the full-precision values
                self._buffers[n] = old.to(new.device)
        self.refresh_gram_inverse()
        return self


def _refresh_after_load(module: LoRAFALayer, incompatible_keys) -> None:
    module.refresh_gram_inverse()


# ---------------------------------------------------------------------- argument checks
# ``where`` names the caller and the layer, e.g. "apply_lorafa: layer 'model.layers.0.q_proj'".


def check_rank(r, in_features: int, where: str, name: str = "r") -> None:
    """r must be an integer in [1, in_features).

    With A frozen, the adapter's update B A lies in the row space of A. At r >= in_features that
    space is all of R^in (nothing is saved over training W itself), and the r x r Gram matrix A A^T
    is singular (r > in) or, for a random square A, badly conditioned, so the corrected gradient
    (1/s^2) dB (A A^T + delta I)^-1 is dominated by the regulariser delta."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {r!r}")
    if r >= in_features:
        raise ValueError(
            f"{where}: {name}={r} must be smaller than the layer's in_features={in_features} (with A "
            "frozen, r >= in_features gives a singular or ill-conditioned Gram matrix A A^T and no "
            "saving over training the weight itself)"
        )


def check_alpha(lora_alpha, where: str, name: str = "lora_alpha") -> None:
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"{where}: {name} must be a finite number, got {lora_alpha!r}")
    if lora_alpha == 0:
        raise ValueError(f"{where}: {name} must be nonzero (the scaling s = alpha / r would be 0)")


def check_dropout(p, where: str, name: str = "lora_dropout") -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{where}: {name} must be in [0, 1), got {p!r}")


def check_eps(eps, where: str) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"{where}: eps must be finite and >= 0, got {eps!r}")
