"""How a failed measurement is described, recognised as out-of-memory, and cleaned up after."""
from __future__ import annotations

import gc
import logging

import torch


def why(e: BaseException) -> str:
    """The exception's type and first line, at most 300 characters."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:300]


def is_oom_text(msg: str) -> bool:
    """An "out of memory" message, or cuBLAS failing to allocate (a handle or its workspace created
    near the memory limit)."""
    return "out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg


def is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError, or an error whose message says the memory ran out."""
    return isinstance(e, torch.OutOfMemoryError) or is_oom_text(str(e))


def status_of(e: BaseException) -> str:
    """"OOM" or the error's description."""
    return "OOM" if is_oom(e) else why(e)


def free(device) -> str | None:
    """gc, then torch.cuda.empty_cache() on a GPU. Never raises: after a sticky CUDA error (an illegal
    address) empty_cache raises too, and that must not end the whole run. Returns None, or the error
    (which is also logged)."""
    gc.collect()
    if torch.device(device).type != "cuda":
        return None
    try:
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        logging.getLogger(__name__).warning("torch.cuda.empty_cache() failed: %s", why(e))
        return why(e)
    return None
