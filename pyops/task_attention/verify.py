"""Verify cases for `task_masked_attention`: odd shapes, every dtype, GQA, Dv != D, causal, padding,
per-batch ids, cross attention, dropout; forward (out, lse) and dq, dk, dv against the reference."""
from __future__ import annotations

from typing import Dict

import torch

import pyops
from pyops.task_attention import masks
from pyops.testing import tolerance_for
from pyops.verify import Case

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# name: (B, Hq, Hkv, Lq, Lk, D, Dv, groups, causal, dropout_p)
PROBLEMS = {
    "L=1": (1, 1, 1, 1, 1, 8, 8, "one", False, 0.0),
    "multitab TxT B=5 H=4 L=29 D=4": (5, 4, 4, 29, 29, 4, 4, "multitab", False, 0.0),
    "GQA 4/2 causal padded L=45 D=16 Dv=8": (2, 4, 2, 45, 45, 16, 8, "padded", True, 0.0),
    "cross per-batch 19x77 D=8 Dv=12": (2, 2, 1, 19, 77, 8, 12, "per-batch", False, 0.0),
    "block-diagonal 3 groups L=131": (1, 2, 2, 131, 131, 32, 32, "block", False, 0.0),
    "dropout 0.2 multitab FxT_TxT L=21": (2, 2, 2, 21, 21, 8, 8, "multitab-both", False, 0.2),
}


def _groups(kind, B, Lq, Lk):
    if kind == "one":
        return torch.zeros(Lq, dtype=torch.int64), None, None
    if kind in ("multitab", "multitab-both"):
        g, a = masks.multitab(4, Lq - 4, "TxT" if kind == "multitab" else "FxT_TxT")
        return g, None, a
    if kind == "padded":
        g = torch.randint(0, 3, (B, Lq))
        g[:, -5:] = -1
        return g, None, torch.tensor([[True, False, True], [True, True, False], [False, False, False]])
    if kind == "per-batch":
        a = torch.rand(4, 4) < 0.5
        a[0, 0] = True
        return torch.randint(-1, 4, (B, Lq)), torch.randint(-1, 4, (B, Lk)), a
    if kind == "block":
        g, a = masks.block_diagonal([50, 33, 48])
        return g, None, a
    raise ValueError(kind)


def _make(spec, dtype):
    B, Hq, Hkv, Lq, Lk, D, Dv, kind, causal, p = spec

    def make(device):
        qg, kg, allow = _groups(kind, B, Lq, Lk)
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dict(q=torch.randn(B, Hq, Lq, D, device=device).to(dtype),
                    k=torch.randn(B, Hkv, Lk, D, device=device).to(dtype),
                    v=torch.randn(B, Hkv, Lk, Dv, device=device).to(dtype),
                    dout=torch.randn(B, Hq, Lq, Dv, device=device).to(dtype),
                    q_groups=mv(qg), kv_groups=mv(kg), allow=mv(allow), causal=causal, dropout_p=p)
    return make


def _run(backend: str, x: dict) -> Dict[str, torch.Tensor]:
    q, k, v = (x[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
    out, lse = pyops.task_masked_attention(q, k, v, x["q_groups"], x["kv_groups"], x["allow"], causal=x["causal"],
                                           dropout_p=x["dropout_p"], seed=2024, return_lse=True, backend=backend)
    out.backward(x["dout"])
    return {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def cases():
    for name, spec in PROBLEMS.items():
        for dtype in DTYPES:
            tol = tolerance_for(dtype)
            tols = {"out": tol, "lse": tol, "dq": tol, "dk": tol, "dv": tol}
            yield Case("task_attention", f"{name} {str(dtype)[6:]}", _make(spec, dtype), _run, tols,
                       backends=("cpu", "triton"))
