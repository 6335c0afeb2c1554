"""Loading of the native modules and the ABI helpers they share.

`pyops._C` (CPU kernels) and `pyops._C_cuda` (CUDA kernels) are optional at import time: a
missing or broken build degrades to the next backend with a stated reason, never to an
ImportError (docs/design.md#backend-choice). The dtype codes below are the ones `csrc/common/dtype.h` defines.

``PYOPS_NATIVE_CPU=/path/to/_C.<abi>.so`` loads the CPU module from that file instead, under the
name `pyops._C` (so `import pyops._C` anywhere in the process gets the same module): CI's sanitizer
build (.ci/sanitize.sh) runs the tests on it this way. A file asked for by name that cannot be
loaded is an error (`RuntimeError`), not a silent fallback to another build.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Optional

import torch

NATIVE_CPU_ENV = "PYOPS_NATIVE_CPU"

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NATIVE_DTYPES = tuple(DTYPE_CODES)


def _load(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        return importlib.import_module(f"pyops.{name}"), None
    except Exception as exc:  # ImportError, OSError from a missing libcudart, ...
        return None, f"pyops.{name} is not available ({type(exc).__name__}: {exc})"


def _load_cpu_from_file(path: str) -> ModuleType:
    """`pyops._C` from the file `path` (PYOPS_NATIVE_CPU); raises RuntimeError if it cannot be."""
    path = os.path.abspath(path)
    loaded = sys.modules.get("pyops._C")
    if loaded is not None:
        if os.path.realpath(getattr(loaded, "__file__", "") or "") == os.path.realpath(path):
            return loaded
        raise RuntimeError(f"{NATIVE_CPU_ENV}={path}: pyops._C was already imported from "
                           f"{getattr(loaded, '__file__', None)}")
    try:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        spec = importlib.util.spec_from_file_location("pyops._C", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"not loadable as an extension module: {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["pyops._C"] = module
        spec.loader.exec_module(module)
        if "pyops" in sys.modules:
            setattr(sys.modules["pyops"], "_C", module)  # as an ordinary import of the submodule does
    except Exception as exc:
        sys.modules.pop("pyops._C", None)
        raise RuntimeError(f"{NATIVE_CPU_ENV}={path} cannot be loaded as pyops._C "
                           f"({type(exc).__name__}: {exc})") from exc
    return module


if os.environ.get(NATIVE_CPU_ENV):
    cpu_module, cpu_missing_reason = _load_cpu_from_file(os.environ[NATIVE_CPU_ENV]), None
else:
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
