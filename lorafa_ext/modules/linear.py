"""``LoRAFALinear``: an ``nn.Linear`` with a LoRA-FA adapter, run through ``torch.ops.lorafa.linear``.

    y = x W^T + bias + s * (drop(x) A^T) B^T,   s = alpha / r   (alpha / sqrt(r) with rsLoRA)

Over a quantized base layer (QLoRA-FA: bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, an
``nn.Linear`` with a torchao quantized weight) the base layer runs its own forward and the adapter
branch runs through ``torch.ops.lorafa.lowrank``: y = base_layer(x) + s * (drop(x) A^T) B^T.

W, bias and A are frozen; only B trains. With ``correction=True`` B's gradient is the LoRA-FA
closed-form correction (1/s^2) dB (A A^T + delta I)^-1, so a plain optimizer (``torch.optim.AdamW``)
trains LoRA-FA. The Gram inverse (A A^T + delta I)^-1 is cached in a non-persistent buffer and
recomputed only when A changes (see ``LoRAFALayer``).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import ActiveAdapter, LoRAFALayer, check_alpha, check_dropout, check_eps, check_rank, gram_dtype
from .quantized import quantization_of

__all__ = ["LoRAFALinear", "INITS", "check_init"]

INITS = ("kaiming", "gaussian", "orthogonal")

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_GRAM_BUFFER = "lora_gram_inv"


def merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of merge/unmerge: fp32 (fp64 for fp64 weights)."""
    return torch.promote_types(dtype, torch.float32)


def check_init(init, where: str = "LoRAFALinear") -> str:
    """The init's canonical name; PEFT's ``init_lora_weights=True`` is "kaiming"."""
    if init is True:
        return "kaiming"
    if not isinstance(init, str) or init.lower() not in INITS:
        raise ValueError(f"{where}: init must be one of {INITS}, got {init!r}")
    return init.lower()


class LoRAFALinear(LoRAFALayer):
    """LoRA-FA adapter around an ``nn.Linear``.

    Args:
        base_layer: the ``nn.Linear`` to adapt, or a quantized linear layer (see modules/quantized.py);
            its weight and bias are frozen (``requires_grad=False``).
        r: rank of the adapter, 1 <= r < in_features (see ``check_rank``).
        lora_alpha: scaling numerator; s = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``.
        lora_dropout: dropout probability on the adapter's input (training mode only), in [0, 1).
        use_rslora: rank-stabilised scaling.
        correction: give B the LoRA-FA corrected gradient (1/s^2) dB (A A^T + delta I)^-1.
        init: "kaiming" (PEFT's default: A kaiming-uniform with a = sqrt(5), B zeros), "gaussian"
            (PEFT's: A ~ N(0, 1/r^2), B zeros) or "orthogonal" (A = Q / sqrt(3) with Q having
            orthonormal rows, so A A^T = I / 3, the expected Gram matrix of the kaiming init; B zeros).
        eps: relative regulariser of the Gram matrix, delta = eps * trace(A A^T) / r.
        adapter_dtype: dtype of A and B. Default: float32 for a float16/bfloat16 or quantized base layer
            (as PEFT's ``autocast_adapter_dtype``), else the base layer's dtype. Must be the base dtype
            or float32 (any floating-point dtype over a quantized base; the input's dtype or float32
            at forward).
        name: the layer's name in its model, used in error messages.

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
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        adapter_dtype = self.check_arguments(
            base_layer, r, lora_alpha, lora_dropout, init, eps, adapter_dtype,
            "LoRAFALinear" if name is None else f"LoRAFALinear {name!r}",
        )
        init = check_init(init)
        weight = base_layer.weight
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
        self.merged = False

        factory = dict(device=weight.device, dtype=adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.register_buffer(
            _GRAM_BUFFER,
            torch.zeros(r, r, device=weight.device, dtype=gram_dtype(adapter_dtype)),
            persistent=False,
        )
        self._init_lorafa(correction, eps)
        self.reset_lora_parameters(init)

    @staticmethod
    def check_arguments(base_layer, r, lora_alpha, lora_dropout=0.0, init="kaiming", eps=1e-6,
                        adapter_dtype=None, where="LoRAFALinear") -> torch.dtype:
        """Check the constructor's arguments (without building anything); returns the adapter dtype.
        ``where`` starts every error message."""
        if isinstance(base_layer, LoRAFALayer):
            raise TypeError(f"{where}: base_layer already has a LoRA-FA adapter")
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{where}: base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        check_rank(r, base_layer.in_features, where)
        check_alpha(lora_alpha, where)
        check_dropout(lora_dropout, where)
        check_eps(eps, where)
        check_init(init, where)
        weight = base_layer.weight
        if quantization_of(base_layer) is not None:
            if adapter_dtype is None:
                return torch.float32
            if not adapter_dtype.is_floating_point:
                raise ValueError(f"{where}: adapter_dtype must be a floating-point dtype, got {adapter_dtype}")
            return adapter_dtype
        if not weight.dtype.is_floating_point:
            raise TypeError(f"{where}: base layer weight must be floating point, got {weight.dtype}")
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
        if adapter_dtype not in (weight.dtype, torch.float32):
            raise ValueError(
                f"{where}: adapter_dtype must be the base layer's dtype ({weight.dtype}) or "
                f"torch.float32, got {adapter_dtype}"
            )
        return adapter_dtype

    # ---------------------------------------------------------------- LoRAFALayer

    def lorafa_base_layer(self) -> nn.Linear:
        return self.base_layer

    def lorafa_adapters(self) -> Dict[str, Tuple[Tensor, Tensor]]:
        return {_GRAM_BUFFER: (self.lora_A, self.lora_B)}

    def lorafa_active_adapter(self) -> Optional[ActiveAdapter]:
        if self.merged:
            return None
        dropout_p = self.lora_dropout if self.training else 0.0
        return ActiveAdapter(self.lora_A, self.lora_B, self.scaling, dropout_p, _GRAM_BUFFER)

    def lorafa_plain_forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x)

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
        init = check_init(init)
        if self.merged:
            raise RuntimeError("LoRAFALinear: unmerge() before re-initialising the adapter")
        a = self.lora_A
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.r)
        elif not a.is_meta:  # orthogonal (r < in_features holds)
            g = torch.randn(self.in_features, self.r, dtype=torch.float64, device="cpu")
            q, rr = torch.linalg.qr(g)  # q: (in, r) with orthonormal columns
            q = q * torch.sign(torch.diagonal(rr)).unsqueeze(0)  # unique (Haar) orthonormal frame
            a.copy_((q.t() / math.sqrt(3.0)).to(a.dtype))
        nn.init.zeros_(self.lora_B)
        self.refresh_gram_inverse()

    def gram_inverse(self) -> Tensor:
        """The cached (A A^T + delta I)^-1, (r, r), recomputed first if A changed."""
        return self._cached_gram(_GRAM_BUFFER, self.lora_A)

    # ---------------------------------------------------------------- merge / unmerge

    @torch.no_grad()
    def get_delta_weight(self) -> Tensor:
        """s B A in the merge accumulation dtype (fp32, or fp64 for fp64 weights)."""
        acc = merge_dtype(self.base_layer.weight.dtype)
        return (self.lora_B.to(acc) @ self.lora_A.to(acc)) * self.scaling

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add s B A into the base weight (accumulated in fp32). Forward then skips the adapter.

        ``safe_merge``: check the merged weight for inf/NaN before writing it (raises ValueError)."""
        if self.merged:
            warnings.warn("LoRAFALinear.merge(): already merged, nothing to do")
            return
        quantization = quantization_of(self.base_layer)
        if quantization is not None:
            raise NotImplementedError(
                f"LoRAFALinear.merge(): the base layer is quantized ({quantization}); merging s B A into a "
                "quantized weight is not supported (save the adapter instead)"
            )
        w = self.base_layer.weight
        merged = (w.to(merge_dtype(w.dtype)) + self.get_delta_weight()).to(w.dtype)
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
        w.copy_((w.to(merge_dtype(w.dtype)) - self.get_delta_weight()).to(w.dtype))
        self.merged = False
