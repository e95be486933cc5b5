"""Philox4x32-10 and the dropout keep-mask, vectorised over torch int64 tensors (csrc/philox.h).

The keep-bit of element e of the flattened (rows, cols) input is word (e & 3) of
Philox(counter = (e >> 2, (e >> 2) >> 32, 0, 0), key = (seed, seed >> 32)); the element is dropped iff
that word < floor(p * 2^32).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def philox_words(seed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` words of the stream for ``seed`` (int64 values in [0, 2**32)), on seed's
    device."""
    dev = seed.device
    c = torch.arange((count + 3) // 4, device=dev, dtype=torch.int64)
    c0, c1 = c & _M32, (c >> 32) & _M32
    c2 = torch.zeros_like(c)
    c3 = torch.zeros_like(c)
    s = seed.reshape(()).to(torch.int64)
    k0, k1 = s & _M32, (s >> 32) & _M32
    for i in range(10):
        if i:
            k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
        # 32 x 32 -> 64-bit products wrap in int64; the low 64 bits (all we use) are exact.
        p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        c0, c1, c2, c3 = ((p1 >> 32) & _M32) ^ c1 ^ k0, p1 & _M32, ((p0 >> 32) & _M32) ^ c3 ^ k1, p0 & _M32
    return torch.stack((c0, c1, c2, c3), dim=1).reshape(-1)[:count]


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The bool (rows, cols) keep-mask (True = kept) for ``seed`` and dropout probability ``p``."""
    threshold = int(p * 4294967296.0)
    return (philox_words(seed, rows * cols) >= threshold).reshape(rows, cols)
