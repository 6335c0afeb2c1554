"""Argument checks shared by every op family (docs/design.md#errors).

Each check raises TypeError (wrong type or dtype) or ValueError (wrong shape, range, device)
with a message that names the argument and says what was expected and what was received.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from pyops._finite import checkable

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


def fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_float_tensor(x: object, name: str) -> torch.Tensor:
    t = check_tensor(x, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float32, float16, bfloat16 or float64), got {t.dtype}")
    return t


def check_float_dtype(dtype: object, name: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected one of float32, float16, bfloat16, float64, got {dtype!r}")
    return dtype


def check_same_dtype(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {x.dtype}")


def check_same_device(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {x.device}")


def check_shape(x: torch.Tensor, name: str, expected: Sequence[int], what: str = "") -> None:
    if tuple(x.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {fmt_shape(expected)}{extra}, got {fmt_shape(x.shape)}")


def check_no_partial_overlap(out: torch.Tensor, inputs: Sequence[torch.Tensor], allow_alias: Optional[torch.Tensor] = None) -> None:
    """`out` may alias `allow_alias` exactly (an in-place update) but no input partially.
    Meta and fake tensors own no memory (their data pointers say nothing): not checked."""
    if out.numel() == 0 or not values_readable(out):
        return
    o0 = out.data_ptr()
    o1 = o0 + out.numel() * out.element_size()
    for t in inputs:
        if t.numel() == 0 or t.device != out.device:
            continue
        if allow_alias is not None and t is allow_alias and t.data_ptr() == o0 and t.stride() == out.stride():
            continue
        t0 = t.data_ptr()
        t1 = t0 + t.numel() * t.element_size()
        if t0 < o1 and o0 < t1:
            raise ValueError("out: overlaps an input tensor; only an exact alias of base (an in-place update) is allowed")


# --------------------------------------------------------------------------------------------
# Data-dependent checks and integer arguments
# --------------------------------------------------------------------------------------------

def values_readable(*tensors: Optional[torch.Tensor]) -> bool:
    """True when a check may read the values of `tensors`: an eager call on real tensors.

    False under `torch.compile` (and export) tracing, during CUDA graph capture, and for meta or
    fake tensors, which carry shapes only: data-dependent checks (value ranges, NaN scans) are
    skipped there and the call takes the shape-only path, as the registered ops' fake kernels do.
    The native kernels keep their own checks (docs/design.md#errors). The same test as the
    non-finite guard's (`pyops._finite.checkable`)."""
    return checkable(*tensors)


def _fmt_int(x: int) -> str:
    return {INT64_MAX: "2**63 - 1", INT64_MIN: "-2**63", INT64_MAX + 1: "2**63", (1 << 64): "2**64",
            (1 << 31) - 1: "2**31 - 1", 1 << 31: "2**31"}.get(x, str(x))


def check_int(x: object, name: str, lo: int = INT64_MIN, hi: int = INT64_MAX, what: str = "") -> int:
    """An int (never a bool) in [lo, hi] (default: the int64 range every op schema carries).
    `what` describes the argument in the message, e.g. " (the block size)"."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name}: expected an int{what}, got {type(x).__name__} {x!r}")
    if not lo <= x <= hi:
        raise ValueError(f"{name}: expected an int in [{_fmt_int(lo)}, {_fmt_int(hi)}]{what}, got {x}")
    return x


def fmt_index(idx: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(i)) for i in idx) + "]"


def first_out_of_range(ids: torch.Tensor, lo: int, hi: int) -> Optional[tuple]:
    """The first element of the integer tensor `ids` outside [lo, hi), as (index tuple, value), or
    None. The comparison runs in the ids' own dtype, before any narrowing: an int64 id of 2**32 is
    out of range for int32 bounds, never wrapped to 0. A bound beyond the dtype's range is no bound
    (a uint8 tensor has no id below 0). Reads the data: call it where `values_readable` holds."""
    if ids.numel() == 0:
        return None
    info = torch.iinfo(ids.dtype)
    bad = None
    if lo > info.min:
        bad = ids < lo if lo <= info.max else torch.ones_like(ids, dtype=torch.bool)
    if hi <= info.max:
        over = ids >= hi if hi > info.min else torch.ones_like(ids, dtype=torch.bool)
        bad = over if bad is None else bad | over
    if bad is None or not bool(bad.any()):
        return None
    idx = tuple(int(i) for i in bad.nonzero()[0])
    return idx, int(ids[idx])
