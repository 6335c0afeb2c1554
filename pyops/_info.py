"""What `python -m pyops info` reports: versions, devices, and which backends load (and why not)."""
from __future__ import annotations

import platform
from typing import Optional

import torch

from pyops import _native
from pyops._triton import triton_reason


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def collect() -> dict:
    import pyops

    cuda = torch.cuda.is_available()
    devices = ["cpu"] + ([f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())] if cuda else [])
    backends = {
        "reference": None,
        "cpu": _native.cpu_missing_reason,
        "cuda": _native.cuda_missing_reason or (None if cuda else "torch.cuda.is_available() is False"),
        "triton": triton_reason(torch.device("cuda" if cuda else "cpu")),
    }
    details = {}
    if _native.cpu_module is not None:
        details["cpu"] = f"ISA {_native.cpu_module.active_isa()}, {torch.get_num_threads()} threads"
    return {
        "pyops": pyops.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "devices": devices,
        "backends": backends,
        "backend_details": details,
    }


def render(info: dict) -> str:
    lines = [f"pyops {info['pyops']}  python {info['python']}  torch {info['torch']}"
             f" (cuda {info['torch_cuda']})  triton {info['triton']}",
             f"platform: {info['platform']}",
             f"devices:  {', '.join(info['devices'])}",
             "backends:"]
    for name, reason in info["backends"].items():
        status = "available" if reason is None else f"unavailable: {reason}"
        extra = info["backend_details"].get(name)
        lines.append(f"  {name:<10} {status}" + (f"  [{extra}]" if extra else ""))
    return "\n".join(lines)
