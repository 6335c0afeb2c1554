"""Benchmarks of fused expert routing (`pyops.moe_route` + `pyops.moe_experts`), family ``moe``.

Cases (the quick run shrinks every size):

* ``layer fwd`` / ``layer fwd+bwd`` (builder ``layer``): T=4096 tokens, d=512, hidden=1024,
  E=16 experts, k=2, SwiGLU, fp32 on CPU (bf16 on CUDA), from router logits to y (and, for
  fwd+bwd, the gradients of x, logits, w1, w2, w3 via `torch.autograd.grad` with a fixed random
  dy). Entries:
    - ``pyops <backend>``: moe_route + moe_experts.
    - ``per-expert loop`` (the baseline): softmax, topk, one matmul chain per expert, index_add
      combine — what multi-task MoE code (Mod-Squad style) runs.
    - ``sort + torch._grouped_mm``: softmax, topk, stable argsort by expert, bincount offsets,
      gather, three `torch._grouped_mm`, index_add combine.
    - ``plain mm`` (yardstick): one [T·k × d] @ [d × hidden] mm into a preallocated output (no
      page faults in the timing); its GFLOP/s is the GEMM speed of this machine in this run.
      GEMM share = pyops GFLOP/s (the MLP's GEMM FLOPs only) / plain-mm GFLOP/s.
* ``routing`` (builder ``routing``): T=65536, E=64, k=4: pyops moe_route vs softmax + topk +
  argsort + bincount (+ cumsum).

Checks: speed-up against the loop and against grouped_mm, the GEMM share, peak memory against
both peers (pyops may use no more than the leaner of them), routing against the torch chain.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from .harness import (PYOPS, Build, Case, CaseResult, CaseSpec, Check, Entry, Timing, nbytes, peak_mib, prepare,
                      randn, verify_backends)

FAMILY = "moe"
OPS = ("moe_route", "moe_experts")

_LAYER = dict(T=4096, d=512, h=1024, E=16, k=2)
_LAYER_QUICK = dict(T=128, d=64, h=128, E=4, k=2)


def _timing(quick_s: float, full_s: float) -> dict:
    return {"full": Timing(repeats=11, max_seconds=90.0, warmup=1, expect_s=full_s),
            "quick": Timing(repeats=3, min_repeats=2, max_seconds=3.0, warmup=1, expect_s=quick_s)}


def _layer(name, backward, targets, quick_s, full_s) -> CaseSpec:
    return CaseSpec(name, "moe_experts", "layer", _LAYER, _LAYER_QUICK, backward=backward,
                    backends={"cpu": ("cpu",)}, peers=(PYOPS, "loop", "grouped_mm", "mm"), baseline="loop",
                    targets=targets, timing=_timing(quick_s, full_s), also=("moe_route",))


_CPU_LAYERS = [
    _layer("layer-fwd", False, {"cpu": {"vs_loop": 1.0, "vs_grouped_mm": None, "gemm_share": 0.85}}, 7, 8),
    _layer("layer-bwd", True, {"cpu": {"vs_loop": 2.0, "vs_grouped_mm": 1.1, "gemm_share": 0.85}}, 10, 22),
]
CASES = [
    *_CPU_LAYERS,
    # The same layers in bf16 on CUDA (the Triton grouped GEMM), against grouped_mm only.
    *(replace(s, name=f"{s.name}-bf16", dtype="bf16", backends={"cuda": ("triton",)},
              targets={"cuda": {"vs_grouped_mm": 1.0}}) for s in _CPU_LAYERS),
    CaseSpec("routing", "moe_route", "routing", dict(T=65536, E=64, k=4), dict(T=4096),
             backends={"cpu": ("cpu",), "cuda": ("cuda",)}, peers=(PYOPS, "torch"), baseline="torch",
             targets={"cpu": {"vs_torch": 5.0}, "cuda": {"vs_torch": 5.0}}, timing=_timing(2, 1)),
]


def build(spec: CaseSpec, device, *, full: bool = False, workdir: Optional[str] = None) -> Case:
    """The `Case` of `spec` on `device` (quick size unless `full`)."""
    b = prepare(spec, device, full, workdir)
    return {"layer": _layer_case, "routing": _routing_case}[spec.kind](b)


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

def _layer_case(b: Build) -> Case:
    import pyops

    dev, dtype, backward = b.device, b.dtype, b.spec.backward
    T, d, h, E, k = (b.sizes[n] for n in ("T", "d", "h", "E", "k"))
    g = b.generator(0, device="cpu")

    def rnd(*shape, scale=1.0):
        return randn(shape, dtype, dev, g, scale)

    x = rnd(T, d)
    z = rnd(T, E)
    w1, w3 = rnd(E, d, h, scale=d ** -0.5), rnd(E, d, h, scale=d ** -0.5)
    w2 = rnd(E, h, d, scale=h ** -0.5)
    dy = rnd(T, d)
    leaves = [t.requires_grad_(backward) for t in (x, z, w1, w2, w3)]
    gemm_flops = 3 * 2 * T * k * d * h * (3 if backward else 1)

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

    def plain_mm() -> Entry:
        a_mm, b_mm = rnd(T * k, d), rnd(d, h)
        c_mm = torch.empty(T * k, h, device=dev, dtype=dtype)  # preallocated: the yardstick times the GEMM, not page faults
        return Entry("plain mm", lambda: torch.mm(a_mm, b_mm, out=c_mm), flops=2 * T * k * d * h, group="reference",
                     note=f"one [{T * k}x{d}]@[{d}x{h}] mm into a preallocated output: this machine's GEMM "
                          "speed in this run")

    gm_skip = None if hasattr(torch, "_grouped_mm") else f"torch {torch.__version__} has no torch._grouped_mm"
    entries = b.entries({
        PYOPS: lambda: [Entry(f"pyops {x}", timed(pyops_layer(x)), flops=gemm_flops, group="pyops",
                              note=f"moe_route + moe_experts(backend={x!r}), SwiGLU") for x in b.backends],
        "loop": lambda: Entry("per-expert loop", timed(lambda *a: loop_moe(*a, k)), flops=gemm_flops,
                              note="softmax, topk, per-expert matmuls on x[tok], index_add combine"),
        "grouped_mm": lambda: Entry("sort + torch._grouped_mm", timed(lambda *a: grouped_mm_moe(*a, k)),
                                    flops=gemm_flops, skip=gm_skip,
                                    note="argsort by expert, bincount offsets, 3× torch._grouped_mm, index_add"),
        "mm": plain_mm,
    })

    def checks(r: CaseResult) -> list:
        res = []
        loop, gm, mm = r.ok("per-expert loop"), r.ok("sort + torch._grouped_mm"), r.ok("plain mm")
        for x in b.backends:
            p = r.ok(f"pyops {x}")
            if p is None:
                res.append(Check(f"pyops {x}", None, note="did not run"))
                continue
            if "vs_loop" in b.targets:
                res.append(Check(f"speed-up pyops {x} vs per-expert loop", p.speedup, b.target("vs_loop"), ">=", "x"))
            if gm is not None and "vs_grouped_mm" in b.targets:
                res.append(Check(f"speed-up pyops {x} vs sort + torch._grouped_mm", gm.median_s / p.median_s,
                                 b.target("vs_grouped_mm"), ">=", "x"))
            if mm is not None and "gemm_share" in b.targets:
                res.append(Check(f"GEMM share pyops {x} (GFLOP/s / plain mm GFLOP/s)", p.gflops / mm.gflops,
                                 b.target("gemm_share"), ">=", "x", note=f"{p.gflops:.1f} vs {mm.gflops:.1f} GFLOP/s"))
            # pyops may use no more memory than the leaner peer
            peers = [m for m in (peak_mib(loop, dev), peak_mib(gm, dev)) if m is not None]
            if peak_mib(p, dev) is not None and peers:
                res.append(Check(f"peak memory pyops {x}", peak_mib(p, dev), min(peers), "<=", " MiB",
                                 note=f"loop {peak_mib(loop, dev)}, grouped_mm {peak_mib(gm, dev)} MiB"))
        return res

    def verify() -> dict:
        from pyops.testing import compare, tolerance_for
        tol = tolerance_for(dtype) if dtype != torch.float32 else type(tolerance_for(dtype))(atol=2e-5, rtol=2e-5)
        with torch.no_grad():
            args = [t.detach() for t in (x, z, w1, w2, w3)]
            want = loop_moe(*args, k)

            def figures(backend: str) -> tuple:
                c = compare(pyops_layer(backend)(*args), want, tol)
                return {f"pyops_{backend}_max_abs_vs_loop": c.max_abs}, c.ok
            return verify_backends(b.backends, figures)

    params = dict(T=T, d=d, hidden=h, E=E, k=k, activation="swiglu", dtype=b.spec.dtype, backward=backward,
                  device=str(dev), threads=torch.get_num_threads())
    # minimum traffic: x, logits, w1, w2, w3 read and y written; the backward reads dy and the
    # inputs again and writes their gradients
    ins, outs = T * d + T * E + 3 * E * d * h, T * d
    op_bytes = nbytes(3 * ins + 2 * outs if backward else ins + outs, dtype)
    return b.case(f"layer {b.tag} {b.spec.dtype} T={T} d={d} h={h} E={E} k={k}", entries, "per-expert loop", params,
                  checks, verify, bytes=op_bytes, flops=gemm_flops)


def _routing_case(b: Build) -> Case:
    import pyops

    T, E, k = b.sizes["T"], b.sizes["E"], b.sizes["k"]
    z = torch.randn(T, E, generator=torch.Generator().manual_seed(1)).to(b.device)
    entries = b.entries({
        PYOPS: lambda: [Entry(f"pyops {x}", (lambda x=x: pyops.moe_route(z, k, backend=x)), group="pyops",
                              note=f"moe_route(backend={x!r}): top-k, counts, offsets, stable permutation")
                        for x in b.backends],
        "torch": lambda: Entry("torch softmax+topk+argsort+bincount", lambda: torch_routing(z, k),
                               note="softmax, topk, renormalise, stable argsort by expert, bincount, cumsum"),
    })

    def checks(r: CaseResult) -> list:
        res = []
        for x in b.backends:
            p = r.ok(f"pyops {x}")
            res.append(Check(f"routing speed-up pyops {x} vs torch chain", p and p.speedup, b.target("vs_torch"),
                             ">=", "x", note="" if p else "did not run"))
        return res

    def verify() -> dict:
        w, e, order, offsets = torch_routing(z, k)

        def figures(x: str) -> tuple:
            r = pyops.moe_route(z, k, backend=x)
            same = bool(torch.equal(r.experts.long(), e)) and bool(torch.equal(r.order, order)) and \
                bool(torch.equal(r.offsets[1:], offsets))
            return {f"pyops_{x}_same_selection": same,
                    f"pyops_{x}_weights_max_abs": float((r.weights - w).abs().max())}, same
        return verify_backends(b.backends, figures)

    # logits read; weights (fp32), experts (int32), order (int64), dropped (bool) and offsets written
    return b.case(f"routing fp32 T={T} E={E} k={k}", entries, "torch softmax+topk+argsort+bincount",
                  dict(T=T, E=E, k=k, device=str(b.device), threads=torch.get_num_threads()), checks, verify,
                  bytes=4 * T * E + (4 + 4 + 8 + 1) * T * k + 8 * (E + 1))
