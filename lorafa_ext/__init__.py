"""lorafa_ext: fast, memory-frugal LoRA-FA for PyTorch.

``import lorafa_ext`` registers the ``torch.ops.lorafa`` ops: from the compiled library when it is
present, else (or when ``LORAFA_FORCE_PYTHON=1``) from a pure-PyTorch fallback with the same schemas.
Importing never initialises CUDA.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import ops

__version__ = "0.1.0"

_LIB = None  # keeps the fallback's torch.library.Library alive


def _load_backend() -> str:
    global _LIB
    forced = os.environ.get("LORAFA_FORCE_PYTHON", "0") == "1"
    if not forced and importlib.util.find_spec(f"{__name__}._C") is not None:
        try:
            from . import _C  # noqa: F401  (registers the ops in its static initialisers)

            return "compiled"
        except ImportError as err:  # present but not loadable: say why, then fall back
            warnings.warn(f"lorafa_ext: compiled library failed to load ({err}); using the Python fallback")
    from . import _fallback

    _LIB = torch.library.Library("lorafa", "DEF")
    _fallback.register(_LIB, ops.composite_linear)
    return "python"


_KIND = _load_backend()
ops.register_common(python_autograd=_KIND == "python")


def backend() -> str:
    """Which implementation serves ``torch.ops.lorafa``: "cuda" (compiled, with CUDA kernels),
    "cpu" (compiled without CUDA) or "python" (the pure-PyTorch fallback)."""
    if _KIND == "python":
        return "python"
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("lorafa::_linear", "CUDA")
    return "cuda" if has_cuda else "cpu"


from .layers import LoRAFALinear  # noqa: E402
from .model import apply_lorafa, lorafa_layers, lorafa_parameters, merge_and_unload  # noqa: E402
from .ops import correct_grad, dropout_mask, gram_inverse, linear, linear_backward, linear_forward  # noqa: E402
from .peft_compat import AdapterError, from_peft, load_adapter, save_adapter  # noqa: E402
from .data_init import init_from_data  # noqa: E402

__all__ = [
    "backend",
    "linear",
    "linear_forward",
    "linear_backward",
    "gram_inverse",
    "correct_grad",
    "dropout_mask",
    "LoRAFALinear",
    "apply_lorafa",
    "lorafa_parameters",
    "lorafa_layers",
    "merge_and_unload",
    "save_adapter",
    "load_adapter",
    "from_peft",
    "AdapterError",
    "init_from_data",
]
