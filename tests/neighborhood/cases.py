"""Shared helpers of the neighbourhood-attention tests: problem cases (`NACase`, whose id shows the
shape, e.g. ``B2-L9-H2-D8-k4-d2``), an independent brute-force implementation of the window rule
(written from the text of docs/neighborhood.md, python loops over positions), and backend
availability asked of the package itself (the backends' `can_run`, so a test skips with the
library's own reason)."""
from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

import pyops
from pyops.neighborhood import ops as ops_na

FNS = {1: pyops.na1d, 2: pyops.na2d, 3: pyops.na3d}
CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class NACase:
    spatial: Tuple[int, ...]
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...] = ()
    dilation: Tuple[int, ...] = ()
    causal: Tuple[bool, ...] = ()
    rpb: bool = False
    B: int = 1
    H: int = 2
    D: int = 8
    Dv: Optional[int] = None

    @property
    def n(self) -> int:
        return len(self.spatial)

    def st(self):
        return self.stride or (1,) * self.n

    def dl(self):
        return self.dilation or (1,) * self.n

    def ca(self):
        return self.causal or (False,) * self.n

    @property
    def id(self) -> str:
        """The shape first, then what differs from the defaults: ``B2-L9-H2-D8-k4-d2``,
        ``B1-S5x9-H2-D8-k3x4-d1x2``, ``B1-S3x4x7-H1-D8-k2x3x3-s1x2x1-d1x1x2-causalFTF``."""
        x = lambda t: "x".join(map(str, t))  # noqa: E731
        parts = [f"B{self.B}", ("L" if self.n == 1 else "S") + x(self.spatial), f"H{self.H}", f"D{self.D}"]
        if self.Dv:
            parts.append(f"Dv{self.Dv}")
        parts.append("k" + x(self.kernel))
        if any(s != 1 for s in self.st()):
            parts.append("s" + x(self.st()))
        if any(d != 1 for d in self.dl()):
            parts.append("d" + x(self.dl()))
        if any(self.ca()):
            parts.append("causal" + "".join("T" if c else "F" for c in self.ca()))
        if self.rpb:
            parts.append("rpb")
        return "-".join(parts)

    @property
    def seed(self) -> int:
        """A seed for this case's inputs, from a compact key of its parameters (spatial, kernel,
        stride, dilation, causal, rpb, B, H, D, Dv), independent of how `id` spells them."""
        parts = ["x".join(map(str, self.spatial)), "k" + "x".join(map(str, self.kernel))]
        if any(s != 1 for s in self.st()):
            parts.append("s" + "x".join(map(str, self.st())))
        if any(d != 1 for d in self.dl()):
            parts.append("d" + "x".join(map(str, self.dl())))
        if any(self.ca()):
            parts.append("causal" + "".join("T" if c else "F" for c in self.ca()))
        if self.rpb:
            parts.append("rpb")
        if self.B != 1:
            parts.append(f"B{self.B}")
        parts.append(f"H{self.H}D{self.D}" + (f"Dv{self.Dv}" if self.Dv else ""))
        return zlib.crc32("-".join(parts).encode())

    def kwargs(self):
        return dict(stride=self.st(), dilation=self.dl(), is_causal=self.ca())

    def make(self, dtype=torch.float32, device="cpu", gen=None, requires_grad=False):
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        shp = (self.B, *self.spatial, self.H)
        def r(*s, scale=1.0):
            t = (torch.randn(s, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype, device=device)
            return t.requires_grad_(requires_grad)
        q, k, v = r(*shp, self.D), r(*shp, self.D), r(*shp, self.Dv or self.D)
        rpb = None
        if self.rpb:
            rpb = r(self.H, *[2 * x - 1 for x in self.kernel], scale=0.5)
        return q, k, v, rpb


# ------------------------------------------------------------------------------------------------
# Brute force, from the text of docs/neighborhood.md
# ------------------------------------------------------------------------------------------------

def in_window(x: int, y: int, L: int, k: int, s: int, d: int, causal: bool) -> bool:
    """Does query x see key y along one dimension of extent L? The rule: dilation d splits positions into
    d groups by x mod d; rules run on in-group indices with the group's length."""
    if x % d != y % d:
        return False
    group = [p for p in range(L) if p % d == x % d]
    Lg = len(group)
    i, j = group.index(x), group.index(y)
    left = k // 2
    if causal:
        leader = min((i // s) * s + s - 1, Lg - 1)
        return max(leader - k + 1, 0) <= j <= i
    leader = min((i // s) * s + s // 2, Lg - 1)
    start = max(0, min(leader - left, Lg - k))
    return start <= j < start + k


def brute_force(case: NACase, q, k, v, rpb=None, scale=None):
    """out, lse by loops over every (query, key) pair of the grid; fp64."""
    n = case.n
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    lse = torch.zeros(q.shape[:-1], dtype=torch.float64)
    positions = list(itertools.product(*[range(S) for S in case.spatial]))
    for x in positions:
        keys = [y for y in positions
                if all(in_window(x[a], y[a], case.spatial[a], case.kernel[a], case.st()[a], case.dl()[a], case.ca()[a])
                       for a in range(n))]
        for b in range(q.shape[0]):
            for h in range(q.shape[-2]):
                logits = []
                for y in keys:
                    val = scale * float((q[(b, *x, h)] * k[(b, *y, h)]).sum())
                    if rpb is not None:
                        rel = []
                        for a in range(n):
                            d = case.dl()[a]
                            rel.append(y[a] // d - x[a] // d + case.kernel[a] - 1)
                        val += float(rpb[(h, *rel)])
                    logits.append(val)
                m = max(logits)
                w = [math.exp(t - m) for t in logits]
                z = sum(w)
                lse[(b, *x, h)] = m + math.log(z)
                acc = torch.zeros(v.shape[-1], dtype=torch.float64)
                for wi, y in zip(w, keys):
                    acc += (wi / z) * v[(b, *y, h)]
                out[(b, *x, h)] = acc
    return out, lse


def keys_seen(case: NACase, x):
    positions = itertools.product(*[range(S) for S in case.spatial])
    return [y for y in positions
            if all(in_window(x[a], y[a], case.spatial[a], case.kernel[a], case.st()[a], case.dl()[a], case.ca()[a])
                   for a in range(case.n))]


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------

def device_for(backend: str) -> torch.device:
    return torch.device("cuda") if (backend == "triton" and CUDA) else torch.device("cpu")


def backend_reason(backend: str, n: int = 2, dtype=torch.float32) -> Optional[str]:
    dev = device_for(backend)
    case = NACase((4,) * n, (2,) * n)
    q, k, v, _ = case.make(dtype, dev)
    p = ops_na.prepare(n, q, k, v, case.kernel, 1, 1, False, None, None)
    return ops_na._can_run(p)[backend]()


def require_backend(backend: str, n: int = 2, dtype=torch.float32) -> torch.device:
    reason = backend_reason(backend, n, dtype)
    if reason is not None:
        pytest.skip(f"backend '{backend}' cannot run: {reason}")
    return device_for(backend)


def interpreted(backend: str) -> bool:
    return backend == "triton" and not CUDA


def fmt_dtype(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}[dtype]
