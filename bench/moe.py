"""Benchmark of fused expert routing (`pyops.moe_route` + `pyops.moe_experts`), family ``moe``.

Cases (issue 6; quick mode shrinks every size):

* ``layer fwd`` / ``layer fwd+bwd``: T=4096 tokens, d=512, hidden=1024, E=16 experts, k=2, SwiGLU,
  fp32 on CPU (bf16 on CUDA), from router logits to y (and, for fwd+bwd, the gradients of x,
  logits, w1, w2, w3 via `torch.autograd.grad` with a fixed random dy). Entries:
    - ``pyops <backend>``: moe_route + moe_experts.
    - ``per-expert loop`` (the baseline): softmax, topk, one matmul chain per expert, index_add combine
      — what multi-task MoE code (Mod-Squad style) runs.
    - ``sort + torch._grouped_mm``: softmax, topk, stable argsort by expert, bincount offsets, gather,
      three `torch._grouped_mm`, index_add combine.
    - ``plain mm`` (yardstick): one [T·k × d] @ [d × hidden] mm into a preallocated output (no page
      faults in the timing); its GFLOP/s is the GEMM speed of this
      machine in this run. GEMM share = pyops GFLOP/s (the MLP's GEMM FLOPs only) / plain-mm GFLOP/s.
* ``routing``: T=65536, E=64, k=4: pyops moe_route vs softmax + topk + argsort + bincount (+ cumsum).

Checks (targets from the issue): CPU fwd+bwd ≥ 2× the loop and ≥ 1.1× grouped_mm; forward no slower
than the loop (≥ 1×); GEMM share ≥ 0.85; peak memory ≤ both peers; routing ≥ 5× the torch chain.
CUDA: ≥ 1× the grouped_mm peer, forward and fwd+bwd.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .harness import Case, CaseResult, Check, Entry

FAMILY = "moe"
OPS = ("moe_route", "moe_experts")

_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def cases(device: str, quick: bool = False) -> Iterator[Case]:
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    backends = ("triton",) if gpu else ("cpu",)
    shape = dict(T=512, d=128, h=256, E=8, k=2) if quick else dict(T=4096, d=512, h=1024, E=16, k=2)
    reps = dict(repeats=5, max_seconds=8.0) if quick else dict(repeats=11, max_seconds=90.0)
    for backward in (False, True):
        yield _layer_case(dev, dtype, backends, backward, **shape, **reps)
    rt = dict(T=4096, E=64, k=4) if quick else dict(T=65536, E=64, k=4)
    yield _routing_case(dev, **rt, **reps)


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------

def _topk(z: torch.Tensor, k: int):
    p = torch.softmax(z.float(), dim=-1)
    w, e = torch.topk(p, k, dim=-1)
    return (w / w.sum(-1, keepdim=True)).to(z.dtype), e


def loop_moe(x, z, w1, w2, w3, k):
    """The per-expert loop with index_add (Mod-Squad / typical multi-task MoE code)."""
    w, e = _topk(z, k)
    y = torch.zeros_like(x)
    for i in range(w1.shape[0]):
        tok, slot = torch.nonzero(e == i, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        out = (F.silu(xe @ w1[i]) * (xe @ w3[i])) @ w2[i]
        y = y.index_add(0, tok, out * w[tok, slot, None])
    return y


def grouped_mm_moe(x, z, w1, w2, w3, k):
    """Sort by expert, offsets from bincount, three torch._grouped_mm, index_add combine."""
    E = w1.shape[0]
    w, e = _topk(z, k)
    flat = e.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    tok = order // k
    xs = x[tok]
    h = F.silu(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)
    ys = torch._grouped_mm(h, w2, offs=offs)
    return torch.zeros_like(x).index_add(0, tok, ys * w.reshape(-1)[order, None])


def torch_routing(z, k):
    p = torch.softmax(z, dim=-1)
    w, e = torch.topk(p, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    flat = e.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.cumsum(torch.bincount(flat, minlength=z.shape[1]), 0)
    return w, e, order, offsets


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

def _layer_case(dev, dtype, backends, backward: bool, T, d, h, E, k, repeats, max_seconds) -> Case:
    import pyops

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device=dev, dtype=dtype)

    x = rnd(T, d)
    z = rnd(T, E)
    w1, w3 = rnd(E, d, h, scale=d ** -0.5), rnd(E, d, h, scale=d ** -0.5)
    w2 = rnd(E, h, d, scale=h ** -0.5)
    dy = rnd(T, d)
    leaves = [t.requires_grad_(backward) for t in (x, z, w1, w2, w3)]
    gemm_flops = 3 * 2 * T * k * d * h * (3 if backward else 1)
    a_mm, b_mm = rnd(T * k, d), rnd(d, h)
    c_mm = torch.empty(T * k, h, device=dev, dtype=dtype)  # preallocated: the yardstick times the GEMM, not page faults

    def pyops_layer(backend):
        def layer(x, z, w1, w2, w3):
            r = pyops.moe_route(z, k, backend="auto")
            return pyops.moe_experts(x, r, w1, w2, w3, activation="swiglu", backend=backend)
        return layer

    def timed(fn):
        if not backward:
            def run():
                with torch.no_grad():
                    return fn(*leaves)
        else:
            def run():
                y = fn(*leaves)
                return torch.autograd.grad(y, leaves, dy)
        return run

    entries = [Entry(f"pyops {b}", timed(pyops_layer(b)), flops=gemm_flops, group="pyops",
                     note=f"moe_route + moe_experts(backend={b!r}), SwiGLU") for b in backends]
    entries.append(Entry("per-expert loop", timed(lambda *a: loop_moe(*a, k)), flops=gemm_flops,
                         note="softmax, topk, per-expert matmuls on x[tok], index_add combine"))
    gm_skip = None if hasattr(torch, "_grouped_mm") else f"torch {torch.__version__} has no torch._grouped_mm"
    entries.append(Entry("sort + torch._grouped_mm", timed(lambda *a: grouped_mm_moe(*a, k)), flops=gemm_flops,
                         skip=gm_skip, note="argsort by expert, bincount offsets, 3× torch._grouped_mm, index_add"))
    entries.append(Entry("plain mm", lambda: torch.mm(a_mm, b_mm, out=c_mm), flops=2 * T * k * d * h,
                         group="reference",
                         note=f"one [{T * k}x{d}]@[{d}x{h}] mm into a preallocated output: this machine's GEMM "
                              "speed in this run"))

    gpu = dev.type == "cuda"

    def checks(r: CaseResult) -> list[Check]:
        res = []
        loop, gm, mm = r.ok("per-expert loop"), r.ok("sort + torch._grouped_mm"), r.ok("plain mm")

        def mem(e):
            if e is None:
                return None
            return e.peak_dev_mib if gpu else e.peak_rss_mib

        for b in backends:
            p = r.ok(f"pyops {b}")
            if p is None:
                res.append(Check(f"pyops {b}", None, note="did not run"))
                continue
            if not gpu:
                res.append(Check(f"speed-up pyops {b} vs per-expert loop", p.speedup, 2.0 if backward else 1.0,
                                 ">=", "x"))
            if gm is not None:
                res.append(Check(f"speed-up pyops {b} vs sort + torch._grouped_mm", gm.median_s / p.median_s,
                                 (1.1 if backward else None) if not gpu else 1.0, ">=", "x"))
            if mm is not None and not gpu:
                res.append(Check(f"GEMM share pyops {b} (GFLOP/s / plain mm GFLOP/s)", p.gflops / mm.gflops, 0.85,
                                 ">=", "x", note=f"{p.gflops:.1f} vs {mm.gflops:.1f} GFLOP/s"))
            peers = [m for m in (mem(loop), mem(gm)) if m is not None]
            if mem(p) is not None and peers:
                res.append(Check(f"peak memory pyops {b}", mem(p), min(peers), "<=", " MiB",
                                 note=f"loop {mem(loop)}, grouped_mm {mem(gm)} MiB"))
        return res

    def verify() -> dict:
        from pyops.testing import compare, tolerance_for
        with torch.no_grad():
            want = loop_moe(x.detach(), z.detach(), w1.detach(), w2.detach(), w3.detach(), k)
            out = {}
            ok = True
            for b in backends:
                try:
                    got = pyops_layer(b)(x.detach(), z.detach(), w1.detach(), w2.detach(), w3.detach())
                except pyops.BackendUnavailableError:
                    continue
                c = compare(got, want, tolerance_for(dtype) if dtype != torch.float32 else
                            type(tolerance_for(dtype))(atol=2e-5, rtol=2e-5))
                out[f"pyops_{b}_max_abs_vs_loop"] = c.max_abs
                ok = ok and c.ok
        out["ok"] = ok
        return out

    params = dict(T=T, d=d, hidden=h, E=E, k=k, activation="swiglu", dtype=_DT[dtype], backward=backward,
                  device=str(dev), threads=torch.get_num_threads())
    return Case(f"layer {'fwd+bwd' if backward else 'fwd'} {_DT[dtype]} T={T} d={d} h={h} E={E} k={k}", entries,
                baseline="per-expert loop", params=params, repeats=repeats, max_seconds=max_seconds, warmup=1,
                checks=checks, verify=verify)


def _routing_case(dev, T, E, k, repeats, max_seconds) -> Case:
    import pyops

    z = torch.randn(T, E, generator=torch.Generator().manual_seed(1)).to(dev)
    backends = ("cuda",) if dev.type == "cuda" else ("cpu",)
    entries = [Entry(f"pyops {b}", (lambda b=b: pyops.moe_route(z, k, backend=b)), group="pyops",
                     note=f"moe_route(backend={b!r}): top-k, counts, offsets, stable permutation")
               for b in backends]
    entries.append(Entry("torch softmax+topk+argsort+bincount", lambda: torch_routing(z, k),
                         note="softmax, topk, renormalise, stable argsort by expert, bincount, cumsum"))

    def checks(r: CaseResult) -> list[Check]:
        res = []
        for b in backends:
            p = r.ok(f"pyops {b}")
            res.append(Check(f"routing speed-up pyops {b} vs torch chain", p and p.speedup, 5.0, ">=", "x",
                             note="" if p else "did not run"))
        return res

    def verify() -> dict:
        out, ok = {}, True
        w, e, order, offsets = torch_routing(z, k)
        for b in backends:
            try:
                r = pyops.moe_route(z, k, backend=b)
            except pyops.BackendUnavailableError:
                continue
            same = bool(torch.equal(r.experts.long(), e)) and bool(torch.equal(r.order, order)) and \
                bool(torch.equal(r.offsets[1:], offsets))
            out[f"pyops_{b}_same_selection"] = same
            out[f"pyops_{b}_weights_max_abs"] = float((r.weights - w).abs().max())
            ok = ok and same
        out["ok"] = ok
        return out

    return Case(f"routing fp32 T={T} E={E} k={k}", entries, baseline="torch softmax+topk+argsort+bincount",
                params=dict(T=T, E=E, k=k, device=str(dev), threads=torch.get_num_threads()),
                repeats=repeats, max_seconds=max_seconds, warmup=1, checks=checks, verify=verify)
