"""Argument checks shared by every op family (docs/design.md#errors).

Each check raises TypeError (wrong type or dtype) or ValueError (wrong shape, range, device)
with a message that names the argument and says what was expected and what was received.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
    """`out` may alias `allow_alias` exactly (an in-place update) but no input partially."""
    if out.numel() == 0:
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
