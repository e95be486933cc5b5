"""``lorafa_ext.peft_compat``: PEFT interoperability, defined in ``lorafa_ext.integrations.peft``."""
from .integrations import peft as _peft
from .integrations.peft import AdapterError, from_peft, load_adapter, save_adapter

__all__ = ["save_adapter", "load_adapter", "from_peft", "AdapterError", "LoRAFAPeftLinear"]


def __getattr__(name):  # LoRAFAPeftLinear is built on first use (peft is optional)
    if name == "LoRAFAPeftLinear":
        return _peft.LoRAFAPeftLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
