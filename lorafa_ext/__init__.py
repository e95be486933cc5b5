"""lorafa_ext: fast, memory-frugal LoRA-FA for PyTorch.

``import lorafa_ext`` loads one backend of the ``torch.ops.lorafa`` ops: the compiled library
(``lorafa_ext._C``, whose static initialisers register everything) when it is present, else (or when
``LORAFA_FORCE_PYTHON=1``) the pure-PyTorch backend (``lorafa_ext.python_backend``), which registers
the same schemas, kernels, composite and autograd. Then ``lorafa_ext.ops`` registers the fake kernels
for whichever was loaded. Importing never initialises CUDA.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

__version__ = "0.1.0"


def _load_backend() -> str:
    forced = os.environ.get("LORAFA_FORCE_PYTHON", "0") == "1"
    if not forced and importlib.util.find_spec(f"{__name__}._C") is not None:
        try:
            from . import _C  # noqa: F401  (registers the ops in its static initialisers)

            return "compiled"
        except ImportError as err:  # present but not loadable: say why, then fall back
            warnings.warn(f"lorafa_ext: compiled library failed to load ({err}); using the Python backend")
    from . import python_backend

    python_backend.load()
    return "python"


_KIND = _load_backend()
from . import ops  # noqa: E402  (registers the fakes of the ops just defined)


def backend() -> str:
    """Which implementation serves ``torch.ops.lorafa``: "cuda" (compiled, with CUDA kernels),
    "cpu" (compiled without CUDA) or "python" (the pure-PyTorch backend)."""
    if _KIND == "python":
        return "python"
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("lorafa::_linear", "CUDA")
    return "cuda" if has_cuda else "cpu"


from .layers import LoRAFALinear  # noqa: E402
from .model import apply_lorafa, lorafa_layers, lorafa_parameters, merge_and_unload  # noqa: E402
from .ops import (  # noqa: E402
    correct_grad,
    dropout_mask,
    gram_inverse,
    linear,
    linear_backward,
    linear_forward,
    lowrank,
    lowrank_backward,
    lowrank_forward,
)
from .peft_compat import AdapterError, from_peft, load_adapter, save_adapter  # noqa: E402
from .data_init import init_from_data  # noqa: E402

__all__ = [
    "backend",
    "linear",
    "linear_forward",
    "linear_backward",
    "lowrank",
    "lowrank_forward",
    "lowrank_backward",
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
