"""The pure-PyTorch backend of ``torch.ops.lorafa``, laid out as csrc/ is:

    ================================  ==========================================================
    module                            mirrors
    ================================  ==========================================================
    python_backend/ops.py             csrc/ops.cpp: the schemas, the composite ``linear`` and the
                                      kernel registrations
    python_backend/kernels.py         csrc/cpu/lorafa_cpu.cpp and csrc/cuda/ (lorafa_cuda.cu, kernels/): the
                                      kernels, one implementation for every device
    python_backend/philox.py          csrc/philox.h: the Philox4x32-10 stream of the dropout mask
    python_backend/autograd.py        csrc/autograd.cpp: the autograd formula of ``_linear``
    lorafa_ext/_checks.py             csrc/checks.cpp: the argument checks, shared with the fake
                                      kernels (lorafa_ext/ops.py)
    ================================  ==========================================================

:func:`load` registers all of it, as loading the compiled library (``lorafa_ext._C``) does. Importing
this package or its modules registers nothing, so the kernels can be called directly beside the
compiled library.
"""
from __future__ import annotations

import torch

_LIB: torch.library.Library | None = None  # the "lorafa" library; alive as long as the ops are


def load() -> None:
    """Define the ``lorafa`` ops and register their pure-PyTorch kernels, composite and autograd."""
    global _LIB
    if _LIB is not None:
        return
    from . import autograd, ops

    lib = torch.library.Library("lorafa", "DEF")
    ops.register(lib)
    autograd.register(lib)
    _LIB = lib
