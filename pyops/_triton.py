"""Whether the Triton backend can run, and why not.

The import checks are marked `assume_constant_result`: under torch.compile they are evaluated
once at trace time and baked into the graph (Dynamo cannot trace an import), so choosing a
backend never breaks a graph.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, Optional

import torch

_cache: Dict[str, Optional[str]] = {}


def _constant_under_compile(fn):
    """What `torch.compiler.assume_constant_result` does (it sets this one attribute), without
    importing torch._dynamo when pyops is imported (a large import that most processes never need)."""
    fn._dynamo_marked_constant = True
    return fn


def _try_import(module: str, what: str) -> Optional[str]:
    if module not in _cache:
        try:
            importlib.import_module(module)
            _cache[module] = None
        except Exception as exc:
            _cache[module] = f"{what} ({type(exc).__name__}: {exc})"
    return _cache[module]


@_constant_under_compile
def _import_reason() -> Optional[str]:
    return _try_import("triton", "triton is not installed")


@_constant_under_compile
def kernel_module_reason(family: str) -> Optional[str]:
    """None if `pyops.kernels.<family>` imports, else the reason (checked once per process)."""
    return _import_reason() or _try_import(f"pyops.kernels.{family}", f"pyops.kernels.{family} failed to import")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@_constant_under_compile
def _interpreter_ready() -> bool:
    """Triton decides at import whether its @jit functions (tl.sum, ...) are interpreted, so
    setting TRITON_INTERPRET=1 after `import pyops` (which imports Triton) is too late."""
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


def triton_reason(device: torch.device) -> Optional[str]:
    """None if Triton kernels can run on `device`, else the reason."""
    reason = _import_reason()
    if reason is not None:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        if not _interpreter_ready():
            return ("TRITON_INTERPRET=1 was set after Triton was imported (importing pyops imports it); "
                    "set it before importing pyops")
        return None
    return f"Triton kernels run on CUDA tensors, got {device.type} (TRITON_INTERPRET=1 interprets them on CPU)"


def triton_family_reason(device: torch.device, family: str) -> Optional[str]:
    return triton_reason(device) or kernel_module_reason(family)
