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
