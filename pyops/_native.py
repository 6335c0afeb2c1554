"""Loading of the native modules and the ABI helpers they share.

`pyops._C` (CPU kernels) and `pyops._C_cuda` (CUDA kernels) are optional at import time: a
missing or broken build degrades to the next backend with a stated reason, never to an
ImportError (docs/design.md#backend-choice). The dtype codes below are the ones `csrc/common/dtype.h` defines.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NATIVE_DTYPES = tuple(DTYPE_CODES)


def _load(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        return importlib.import_module(f"pyops.{name}"), None
    except Exception as exc:  # ImportError, OSError from a missing libcudart, ...
        return None, f"pyops.{name} is not available ({type(exc).__name__}: {exc})"


cpu_module, cpu_missing_reason = _load("_C")
cuda_module, cuda_missing_reason = _load("_C_cuda")


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def native_dtype_reason(*tensors: torch.Tensor) -> Optional[str]:
    """Reason the native kernels cannot take these tensors' dtypes, or None."""
    for t in tensors:
        if t.dtype not in DTYPE_CODES:
            return f"dtype {t.dtype} is not supported by the native kernels (float32, float16, bfloat16)"
    return None
