"""The guard that keeps the fused attention kernels exact (docs/design.md#non-finite-values).

The C++ and Triton attention kernels are exact for finite inputs whose products and sums stay
finite in fp32. Outside that, their fast paths would differ from the definition: a NaN or ±inf can
reach a row through a pair the row does not attend (a masked-out key shares a tile with attended
ones, and 0·NaN is NaN), and a score that overflows meets the kernels' exponential. So each fused
attention op reads its inputs' largest magnitudes first (`maxima`: one min/max pass per tensor and
one host read for all of them), bounds every intermediate from them, and hands a call that is not
provably safe (`within`) to the reference's formula, forward and backward.

The values cannot be read while `torch.compile` traces (the reference and the Triton ops are
traced; the C++ ops are opaque and keep the guard), for FakeTensor or meta inputs, or during CUDA
graph capture; `maxima` returns None there and the kernels run as they are, as does the reference's
dense formula (NaN and ±inf at attended positions still propagate; values at unattended positions
may reach a row as NaN).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

try:  # torch's own test for FakeTensor (and functional wrappers of one)
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # pragma: no cover - every supported torch has it
    def _is_fake(t: Tensor) -> bool:
        return False

# Every bound must stay under 2**100 (fp32 overflows at 2**128): room for rounding and for the
# kernels' partial sums, which the bounds below (sums of magnitudes) already dominate.
LIMIT = 2.0 ** 100


def checkable(*tensors: Optional[Tensor]) -> bool:
    """True when the values of `tensors` can be read now: not while `torch.compile` (or export)
    traces, not for meta or fake tensors (torch's `is_fake` also sees functional wrappers of one),
    not on a CUDA stream being captured into a graph (a host read would break the capture)."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is None:
            continue
        if t.is_meta or _is_fake(t):
            return False
        if t.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
    return True


def maxima(*tensors: Optional[Tensor]) -> Optional[List[float]]:
    """max |x| of each tensor, in order: 0.0 for None or an empty tensor, inf for one holding a NaN
    or ±inf. None when the values cannot be read now (`checkable`)."""
    if not checkable(*tensors):
        return None
    present = [t for t in tensors if t is not None and t.numel() > 0]
    if not present:
        return [0.0] * len(tensors)
    ends = []
    for t in present:
        t = t.detach()
        # A NaN propagates into both ends. aminmax copies a non-contiguous tensor first (a model's
        # weights passed as transposed views); amin and amax read any strides in place.
        lo, hi = torch.aminmax(t) if t.is_contiguous() else (t.amin(), t.amax())
        ends.append(torch.maximum(-lo.to(torch.float64), hi.to(torch.float64)))
    found = iter(torch.stack(ends).nan_to_num(nan=float("inf"), posinf=float("inf")).tolist())
    return [next(found) if t is not None and t.numel() > 0 else 0.0 for t in tensors]


def all_finite(*tensors: Optional[Tensor]) -> bool:
    """True when no tensor holds a NaN or ±inf (and when the values cannot be read now)."""
    m = maxima(*tensors)
    return m is None or all(x < float("inf") for x in m)


def within(*bounds: float) -> bool:
    """True when every bound is finite and under `LIMIT`."""
    return all(b < LIMIT for b in bounds)
