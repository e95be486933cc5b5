"""``lorafa_ext.layers``: the LoRA-FA layer classes, defined in ``lorafa_ext.modules``."""
from .modules.base import LoRAFALayer
from .modules.linear import INITS, LoRAFALinear

__all__ = ["LoRAFALayer", "LoRAFALinear", "INITS"]
