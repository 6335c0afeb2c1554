"""Helpers of the task-attention tests: inputs, the independent dense oracle, backend availability.

The oracle (`dense_attention`) is written independently of `pyops.task_attention.reference`:
it builds the boolean mask element by element in Python loops from the definition in docs/task_attention.md
and runs torch's SDPA math on it, patching rows that have no allowed key.
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch

from pyops.task_attention import ops as ta
from pyops._philox import philox4x32_10, uniform_from_word

FP32, FP16, BF16, FP64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
KERNEL_BACKENDS = ("cpu", "triton")


def device_for(backend: str) -> torch.device:
    """Triton runs on the GPU when there is one (else under the interpreter on CPU)."""
    return torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")


def backend_reason(backend: str, dtype=FP32, head_dim: int = 8) -> Optional[str]:
    """The library's own reason `backend` cannot run a small problem on its device, or None."""
    q = torch.zeros(1, 1, 2, head_dim, dtype=dtype, device=device_for(backend))
    p = ta.prepare(q, q, q, torch.zeros(2, dtype=torch.int64, device=q.device), None, None, False, 0.0, None, None)
    return ta._can_run(p)[backend]()


def require_backend(backend: str, dtype=FP32) -> torch.device:
    reason = backend_reason(backend, dtype)
    if reason is not None:
        pytest.skip(f"backend '{backend}' cannot run here: {reason}")
    return device_for(backend)


def to_device(x: dict, dev: torch.device) -> dict:
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}


def randn(shape, dtype, gen, scale=1.0, requires_grad=False):
    t = (torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def dense_mask_loops(q_groups, kv_groups, allow, B, Lq, Lk, causal):
    """Bool [B, Lq, Lk] straight from the definition, with Python loops (tiny shapes only)."""
    qg = q_groups.tolist()
    kg = (q_groups if kv_groups is None else kv_groups).tolist()
    m = torch.zeros(B, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        qrow = qg[b] if isinstance(qg[0], list) else qg
        krow = kg[b] if isinstance(kg[0], list) else kg
        for i in range(Lq):
            for j in range(Lk):
                a, c = qrow[i], krow[j]
                ok = a >= 0 and c >= 0 and (a == c if allow is None else bool(allow[a, c]))
                m[b, i, j] = ok and (not causal or j <= i)
    return m


def dropout_keep_loops(seed, B, H, Lq, Lk, p):
    """The interface's keep rule, one Philox call per element (tiny shapes only)."""
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    keep = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    w = philox4x32_10(torch.tensor(j), torch.tensor(i), torch.tensor(b * H + h),
                                      torch.tensor(0x5441534B), k0, k1)[0]
                    keep[b, h, i, j] = bool(uniform_from_word(w) >= p)
    return keep


def dense_attention(q, k, v, mask, scale=None, keep=None, dropout_p=0.0):
    """Independent oracle: fp64 SDPA math with a dense bool mask (True = attend), GQA by
    expanding the kv heads, empty rows -> zeros, optional explicit dropout keep mask."""
    B, Hq, Lq, D = q.shape
    rep = Hq // k.shape[1]
    kk = k.double().repeat_interleave(rep, 1)
    vv = v.double().repeat_interleave(rep, 1)
    scale = D ** -0.5 if scale is None else scale
    s = q.double() @ kk.transpose(-1, -2) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return p @ vv, lse


def fmt(dtype) -> str:
    return {FP32: "fp32", FP16: "fp16", BF16: "bf16", FP64: "fp64"}[dtype]
