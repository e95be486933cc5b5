"""``LoRAFALinear``: an ``nn.Linear`` with a LoRA-FA adapter, run through ``torch.ops.lorafa.linear``.

    y = x W^T + bias + s * (drop(x) A^T) B^T,   s = alpha / r   (alpha / sqrt(r) with rsLoRA)

W, bias and A are frozen; only B trains. With ``correction=True`` B's gradient is the LoRA-FA
closed-form correction (1/s^2) dB (A A^T + delta I)^-1, so a plain optimizer (``torch.optim.AdamW``)
trains LoRA-FA. The Gram inverse (A A^T + delta I)^-1 is cached in a non-persistent buffer and
recomputed only when A changes.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["LoRAFALinear", "INITS"]

INITS = ("kaiming", "gaussian", "orthogonal")

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _gram_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_plain_tensor(t: Tensor) -> bool:
    """True for a tensor whose values can be read locally (not meta, not a sharded DTensor)."""
    if t.is_meta:
        return False
    try:  # DTensor (FSDP2 / tensor parallel) holds only a shard outside of forward
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch built without distributed
        return True
    return not isinstance(t, DTensor)


def _merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of merge/unmerge: fp32 (fp64 for fp64 weights)."""
    return torch.promote_types(dtype, torch.float32)


class _GramCacheMixin:
    """Caches ``gram_inverse(A, eps)`` in a non-persistent buffer, keyed on A's identity.

    The key is (A's version counter, data pointer, dtype, device, eps): in-place writes through the
    parameter (``copy_``, ``nn.init``, ``load_state_dict``, a DDP broadcast) bump the version; a new
    tensor (``.data = ...``, ``.to()``, FSDP2's unsharded parameter) changes the pointer. Writes through
    ``A.data`` bypass the version counter: call ``refresh_gram_inverse()`` after those.

    Under ``torch.compile`` the check is skipped (it would break the graph) and the buffer is used as
    is; it is refreshed eagerly on construction, on load_state_dict, on ``.to()`` and by every
    lorafa_ext function that writes A.
    """

    def _init_gram_cache(self) -> None:
        self._lorafa_gram_keys = {}

    @staticmethod
    def _gram_key(lora_a: Tensor, eps: float):
        return (lora_a._version, lora_a.data_ptr(), lora_a.dtype, lora_a.device, float(eps))

    @torch.no_grad()
    def _refresh_gram(self, buf_name: str, lora_a: Tensor, eps: float) -> Optional[Tensor]:
        """Recompute the buffer ``buf_name`` from ``lora_a`` (when A's values are readable here)."""
        want_dtype = _gram_dtype(lora_a.dtype)
        old = self._buffers.get(buf_name)
        if not _is_plain_tensor(lora_a):
            # Sharded or meta A: keep the old values (cast back to the gram dtype if a .to() changed it)
            # and let the next eager forward, which sees the unsharded A, recompute them.
            if old is not None and old.dtype not in (torch.float32, torch.float64):
                self._buffers[buf_name] = old.to(want_dtype)
            self._lorafa_gram_keys.pop(buf_name, None)
            return self._buffers.get(buf_name)
        gram = torch.ops.lorafa.gram_inverse(lora_a.detach(), float(eps))
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
        self._lorafa_gram_keys[buf_name] = self._gram_key(lora_a, eps)
        return self._buffers[buf_name]

    def _cached_gram(self, buf_name: str, lora_a: Tensor, eps: float) -> Optional[Tensor]:
        if not torch.compiler.is_compiling():
            if self._lorafa_gram_keys.get(buf_name) != self._gram_key(lora_a, eps):
                self._refresh_gram(buf_name, lora_a, eps)
        return self._buffers[buf_name]


class LoRAFALinear(_GramCacheMixin, nn.Module):
    """LoRA-FA adapter around an ``nn.Linear``.

    Args:
        base_layer: the ``nn.Linear`` to adapt; its weight and bias are frozen (``requires_grad=False``).
        r: rank of the adapter.
        lora_alpha: scaling numerator; s = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``.
        lora_dropout: dropout probability on the adapter's input (training mode only), in [0, 1).
        use_rslora: rank-stabilised scaling.
        correction: give B the LoRA-FA corrected gradient (1/s^2) dB (A A^T + delta I)^-1.
        init: "kaiming" (PEFT's default: A kaiming-uniform with a = sqrt(5), B zeros), "gaussian"
            (PEFT's: A ~ N(0, 1/r^2), B zeros) or "orthogonal" (A = Q / sqrt(3) with Q having
            orthonormal rows, so A A^T = I / 3, the expected Gram matrix of the kaiming init; B zeros;
            needs r <= in_features).
        eps: relative regulariser of the Gram matrix, delta = eps * trace(A A^T) / r.
        adapter_dtype: dtype of A and B. Default: float32 for a float16/bfloat16 base layer (as PEFT's
            ``autocast_adapter_dtype``), else the base layer's dtype. Must be the base dtype or float32.

    Parameters and buffers: ``base_layer`` (frozen), ``lora_A`` (r, in; frozen), ``lora_B``
    (out, r; trainable), ``lora_gram_inv`` (r, r; non-persistent cache). ``merged`` tells whether
    s B A is currently added into ``base_layer.weight``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        correction: bool = True,
        init: str = "kaiming",
        *,
        eps: float = 1e-6,
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if isinstance(base_layer, LoRAFALinear):
            raise TypeError("LoRAFALinear: base_layer is already a LoRAFALinear")
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRAFALinear: base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRAFALinear: r must be a positive integer, got {r!r}")
        _check_alpha(lora_alpha)
        _check_dropout(lora_dropout)
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"LoRAFALinear: eps must be finite and >= 0, got {eps}")
        init = _check_init(init)
        weight = base_layer.weight
        if not weight.dtype.is_floating_point:
            raise TypeError(f"LoRAFALinear: base layer weight must be floating point, got {weight.dtype}")
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
        if adapter_dtype not in (weight.dtype, torch.float32):
            raise ValueError(
                f"LoRAFALinear: adapter_dtype must be the base layer's dtype ({weight.dtype}) or "
                f"torch.float32, got {adapter_dtype}"
            )

        self._init_gram_cache()
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.lora_dropout = float(lora_dropout)
        self.correction = bool(correction)
        self.eps = float(eps)
        self.merged = False

        factory = dict(device=weight.device, dtype=adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.register_buffer(
            "lora_gram_inv",
            torch.zeros(r, r, device=weight.device, dtype=_gram_dtype(adapter_dtype)),
            persistent=False,
        )
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.reset_lora_parameters(init)

    # ---------------------------------------------------------------- nn.Linear look-alike

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        if self.use_rslora:
            return self.lora_alpha / math.sqrt(self.r)
        return self.lora_alpha / self.r

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, correction={self.correction}, merged={self.merged}"
        )

    # ---------------------------------------------------------------- init and cache

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """Re-initialise A and B (B = 0) with ``init`` and refresh the Gram inverse."""
        init = _check_init(init)
        if self.merged:
            raise RuntimeError("LoRAFALinear: unmerge() before re-initialising the adapter")
        a = self.lora_A
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.r)
        else:  # orthogonal
            if self.r > self.in_features:
                raise ValueError(
                    f"LoRAFALinear: init='orthogonal' needs r <= in_features, got r={self.r} > "
                    f"in_features={self.in_features}"
                )
            if not a.is_meta:
                g = torch.randn(self.in_features, self.r, dtype=torch.float64, device="cpu")
                q, rr = torch.linalg.qr(g)  # q: (in, r) with orthonormal columns
                q = q * torch.sign(torch.diagonal(rr)).unsqueeze(0)  # unique (Haar) orthonormal frame
                a.copy_((q.t() / math.sqrt(3.0)).to(a.dtype))
        nn.init.zeros_(self.lora_B)
        self.refresh_gram_inverse()

    def refresh_gram_inverse(self) -> None:
        """Recompute the cached (A A^T + delta I)^-1. Needed only after writing A through ``A.data``
        while running under ``torch.compile``; every other change of A is detected."""
        self._refresh_gram("lora_gram_inv", self.lora_A, self.eps)

    def gram_inverse(self) -> Tensor:
        """The cached (A A^T + delta I)^-1, (r, r), recomputed first if A changed."""
        return self._cached_gram("lora_gram_inv", self.lora_A, self.eps)

    def _apply(self, fn, recurse=True):
        old = self._buffers.get("lora_gram_inv")
        old_dtype = self.lora_A.dtype
        super()._apply(fn, recurse)
        new = self._buffers.get("lora_gram_inv")
        if old is not None and new is not None and new.dtype != old.dtype and self.lora_A.dtype == old_dtype:
            # e.g. a .half() of the whole model with an fp32 adapter: keep the full-precision values
            self._buffers["lora_gram_inv"] = old.to(new.device)
        self.refresh_gram_inverse()
        return self

    # ---------------------------------------------------------------- merge / unmerge

    @torch.no_grad()
    def get_delta_weight(self) -> Tensor:
        """s B A in the merge accumulation dtype (fp32, or fp64 for fp64 weights)."""
        acc = _merge_dtype(self.base_layer.weight.dtype)
        return (self.lora_B.to(acc) @ self.lora_A.to(acc)) * self.scaling

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add s B A into the base weight (accumulated in fp32). Forward then skips the adapter.

        ``safe_merge``: check the merged weight for inf/NaN before writing it (raises ValueError)."""
        if self.merged:
            warnings.warn("LoRAFALinear.merge(): already merged, nothing to do")
            return
        w = self.base_layer.weight
        merged = (w.to(_merge_dtype(w.dtype)) + self.get_delta_weight()).to(w.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("LoRAFALinear.merge(): NaN or inf in the merged weight; the adapter seems broken")
        w.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s B A from the base weight again (accumulated in fp32)."""
        if not self.merged:
            warnings.warn("LoRAFALinear.unmerge(): not merged, nothing to do")
            return
        w = self.base_layer.weight
        w.copy_((w.to(_merge_dtype(w.dtype)) - self.get_delta_weight()).to(w.dtype))
        self.merged = False

    # ---------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        correction = self.correction and torch.is_grad_enabled() and self.lora_B.requires_grad
        gram_inv = self.gram_inverse() if correction else None
        dropout_p = self.lora_dropout if self.training else 0.0
        return torch.ops.lorafa.linear(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            dropout_p,
            correction,
            None,
            self.eps,
            gram_inv,
        )


def _refresh_after_load(module, incompatible_keys) -> None:
    module.refresh_gram_inverse()


# -------------------------------------------------------------------- argument checks


def _check_init(init) -> str:
    if init is True:  # PEFT's init_lora_weights=True
        return "kaiming"
    if not isinstance(init, str) or init.lower() not in INITS:
        raise ValueError(f"LoRAFALinear: init must be one of {INITS}, got {init!r}")
    return init.lower()


def _check_alpha(lora_alpha) -> None:
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"LoRAFALinear: lora_alpha must be a finite number, got {lora_alpha!r}")
    if lora_alpha == 0:
        raise ValueError("LoRAFALinear: lora_alpha must be nonzero (the scaling s = alpha / r would be 0)")


def _check_dropout(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"LoRAFALinear: lora_dropout must be in [0, 1), got {p!r}")
