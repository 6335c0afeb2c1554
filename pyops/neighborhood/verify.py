"""Verify cases for `na1d` / `na2d` / `na3d`: odd shapes, even and odd kernels, dilation that does
not divide the extent, stride, mixed causal, rpb; every dtype; forward, lse and the gradients of
q, k, v and rpb."""
from __future__ import annotations

import itertools
from typing import Dict

import torch

import pyops
from pyops.testing import tolerance_for
from pyops.verify import Case

T, F = True, False
# (spatial, kernel, stride, dilation, causal, rpb, H, D, Dv)
PROBLEMS = [
    ((37,), (5,), (1,), (3,), (F,), True, 2, 16, 16),
    ((33,), (8,), (3,), (2,), (T,), False, 3, 8, 12),
    ((13, 11), (3, 4), (1, 2), (2, 1), (F, F), False, 2, 16, 16),
    ((9, 14), (5, 3), (1, 1), (1, 3), (F, F), True, 2, 8, 8),
    ((10, 9), (3, 3), (2, 1), (1, 2), (T, F), False, 1, 24, 24),
    ((3, 7, 9), (3, 3, 4), (1, 2, 1), (1, 2, 1), (F, T, F), False, 1, 8, 8),
    ((4, 5, 6), (3, 3, 3), (1, 1, 1), (1, 1, 2), (F, F, F), True, 1, 16, 16),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _make(spatial, kernel, rpb, H, D, Dv, dtype):
    def make(device):
        shp = (2 if len(spatial) < 3 else 1, *spatial, H)
        x = {n: torch.randn(*shp, d, device=device).to(dtype) for n, d in (("q", D), ("k", D), ("v", Dv))}
        x["grad"] = torch.randn(*shp, Dv, device=device).to(dtype)
        x["rpb"] = (0.5 * torch.randn(H, *[2 * kk - 1 for kk in kernel], device=device)).to(dtype) if rpb else None
        return x
    return make


def _run(n, kernel, stride, dilation, causal):
    fn = (pyops.na1d, pyops.na2d, pyops.na3d)[n - 1]

    def run(backend: str, x: dict) -> Dict[str, torch.Tensor]:
        q, k, v = (x[n_].clone().requires_grad_(True) for n_ in "qkv")
        rpb = x["rpb"].clone().requires_grad_(True) if x["rpb"] is not None else None
        out, lse = fn(q, k, v, kernel, stride=stride, dilation=dilation, is_causal=causal, rpb=rpb,
                      return_lse=True, backend=backend)
        out.backward(x["grad"])
        res = {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        if rpb is not None:
            res["drpb"] = rpb.grad
        return res
    return run


def cases():
    for (spatial, kernel, stride, dilation, causal, rpb, H, D, Dv), dtype in itertools.product(PROBLEMS, DTYPES):
        n = len(spatial)
        tol = tolerance_for(dtype)
        names = ["out", "lse", "dq", "dk", "dv"] + (["drpb"] if rpb else [])
        name = (f"{'x'.join(map(str, spatial))} k={kernel} s={stride} d={dilation} c={''.join('T' if c else 'F' for c in causal)}"
                f"{' rpb' if rpb else ''} {str(dtype)[6:]}")
        yield Case(f"na{n}d", name, _make(spatial, kernel, rpb, H, D, Dv, dtype),
                   _run(n, kernel, stride, dilation, causal), {k: tol for k in names}, backends=("cpu", "triton"))
