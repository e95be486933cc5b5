"""LoRA-FA layers: ``LoRAFALayer``, the base that owns the forward, the Gram cache and the
trainable parameters, and ``LoRAFALinear``. The PEFT layer switched by ``from_peft`` derives from the
same base (``lorafa_ext.integrations.peft``)."""
from .base import ActiveAdapter, LoRAFALayer
from .linear import INITS, LoRAFALinear

__all__ = ["LoRAFALayer", "ActiveAdapter", "LoRAFALinear", "INITS"]
