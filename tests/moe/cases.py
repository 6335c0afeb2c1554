"""Shared helpers of the moe tests: backend availability (asked of the library), problem builders."""
from __future__ import annotations

from typing import Optional

import pytest
import torch

import pyops
from _support import CUDA, device_for, randn
from pyops.moe import ops as M
from pyops.testing import REDUCTION_TOL, tolerance_for

FP32, FP16, BF16, FP64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
GLU = M.GLU  # the library's GLU activations (swiglu, geglu, swiglu_oai): they take w3


def backend_reason(backend: str, op: str = "moe_experts") -> Optional[str]:
    """None if `backend` can run `op` on its device (fp32), else the library's own reason (the
    backend's declared capability: native module and entry points, Triton and pyops.kernels.moe)."""
    if backend == "cuda" and not CUDA:
        return "CUDA is not available"
    z = torch.zeros(2, 2, device=device_for(backend))
    table = M._route_can_run(z) if op == "moe_route" else M._experts_can_run(z, z)
    if backend not in table:
        return f"{op} has no '{backend}' backend"
    return table[backend]()


def require(backend: str, op: str = "moe_experts") -> torch.device:
    reason = backend_reason(backend, op)
    if reason is not None:
        pytest.skip(f"backend '{backend}' cannot run {op}: {reason}")
    return device_for(backend)


def interpreted(backend: str) -> bool:
    return backend == "triton" and not CUDA


def make_weights(E, d, h, act, dtype, gen, dev, requires_grad=False):
    s1, s2 = d ** -0.5, h ** -0.5
    w1 = randn((E, d, h), dtype, gen, dev, scale=s1).requires_grad_(requires_grad)
    w2 = randn((E, h, d), dtype, gen, dev, scale=s2).requires_grad_(requires_grad)
    w3 = randn((E, d, h), dtype, gen, dev, scale=s1).requires_grad_(requires_grad) if act in GLU else None
    return w1, w2, w3


def make_logits(T, E, gen, dev, dtype=FP32, hot: Optional[int] = None, skip=()):
    """Random router logits; `hot` sends every token to that expert first; `skip` experts get no token."""
    z = randn((T, E), FP32, gen)
    if hot is not None:
        z[:, hot] += 20.0
    for e in skip:
        z[:, e] -= 30.0
    return z.to(dtype=dtype, device=dev)


def grads_tol(name: str, dtype: torch.dtype):
    """Weight gradients are sums over the tokens of an expert: fp32 judged with REDUCTION_TOL."""
    if dtype == FP32 and name in ("w1", "w2", "w3", "weights", "logits"):
        return REDUCTION_TOL
    return tolerance_for(dtype)


def run_layer(x, logits, k, w1, w2, w3, act, backend, capacity_factor=None, route_backend="reference", dy=None):
    """Route (on `route_backend`) and run the experts on `backend`; returns y and the gradients of <y, dy>."""
    r = pyops.moe_route(logits, k, capacity_factor=capacity_factor, backend=route_backend)
    y = pyops.moe_experts(x, r, w1, w2, w3, activation=act, backend=backend)
    if dy is None:
        return y, {}
    ins = {"x": x, "w1": w1, "w2": w2, "logits": logits}
    if w3 is not None:
        ins["w3"] = w3
    ins = {n: t for n, t in ins.items() if t.requires_grad}
    g = torch.autograd.grad(y, list(ins.values()), dy, allow_unused=False)
    return y, dict(zip(ins, g))
