"""Whether the Triton backend can run, and why not."""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def _import_reason() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not installed ({type(exc).__name__}: {exc})"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_reason(device: torch.device) -> Optional[str]:
    """None if Triton kernels can run on `device`, else the reason."""
    reason = _import_reason()
    if reason is not None:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"Triton kernels run on CUDA tensors, got {device.type} (TRITON_INTERPRET=1 interprets them on CPU)"


@functools.lru_cache(maxsize=None)
def kernel_module_reason(family: str) -> Optional[str]:
    """None if `pyops.kernels.<family>` imports, else the reason (checked once per process)."""
    if _import_reason() is not None:
        return _import_reason()
    try:
        __import__(f"pyops.kernels.{family}")
    except Exception as exc:
        return f"pyops.kernels.{family} failed to import ({type(exc).__name__}: {exc})"
    return None


def triton_family_reason(device: torch.device, family: str) -> Optional[str]:
    return triton_reason(device) or kernel_module_reason(family)
