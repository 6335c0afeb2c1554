"""Philox4x32-10 in plain PyTorch (the reference for `csrc/common/philox.h`).

Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3" (SC'11). A
counter-based generator: the output is a pure function of a 128-bit counter and a 64-bit key,
so every backend draws the same bits for the same (seed, stream, element) (docs/design.md#determinism).

Arithmetic is on int64 tensors holding 32-bit values: the 32×32-bit products wrap modulo 2⁶⁴,
and an arithmetic right shift followed by a 32-bit mask still yields the correct high word.
"""
from __future__ import annotations

from typing import Tuple

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    p = b * a
    return (p >> 32) & _MASK, p & _MASK


def philox4x32_10(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                  k0: int, k1: int) -> Tuple[torch.Tensor, ...]:
    """Counters: int64 tensors of 32-bit values (broadcastable); key: two 32-bit ints.
    Returns the four output words as int64 tensors of 32-bit values."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK for c in (c0, c1, c2, c3))
    k0, k1 = k0 & _MASK, k1 & _MASK
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def uniform_from_word(word: torch.Tensor) -> torch.Tensor:
    """fp32 in [0, 1) from the top 24 bits of a 32-bit word (exact in fp32)."""
    return (word >> 8).to(torch.float32) * (1.0 / 16777216.0)
