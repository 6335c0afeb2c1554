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
* ``routing-groups`` (builder ``routing_groups``): DeepSeek-V3 group-limited routing, T=65536,
  E=64, n_group=8, topk_group=4, k=6, sigmoid, bias, routed_scaling=2.5: pyops moe_route vs the
  torch chain Hugging Face's DeepSeek-V3 router runs (sigmoid, + bias, top-2 sum per group, top
  groups, mask, top-k, gather, renormalise with + 1e-20, scale; our own code, same operations).
* ``hf-mixtral-fwd`` / ``hf-mixtral-bwd`` (builder ``hf_block``): the layer's sizes (T=4096,
  d=512, hidden=1024, E=16, k=2, fp32, CPU) as a Hugging Face transformers `MixtralSparseMoeBlock`
  (router linear included; fwd+bwd: the gradients of the hidden states and of the router and
  expert weights). Entries:
    - ``transformers grouped_mm``: transformers' own block with ``_experts_implementation =
      "grouped_mm"`` (what `from_pretrained` picks by default in transformers 5).
    - ``transformers eager``: the same block with the per-expert loop (``"eager"``).
    - ``pyops patched block``: the block after `pyops.integrations.transformers.patch_model`:
      moe_route + moe_experts on views of transformers' ``[E, out, in]`` weights.
    - ``pyops contiguous weights``: moe_route + moe_experts on ``x @ W`` copies of the same weights
      (what the HF layout costs pyops; runs without transformers).
  The speed-ups are taken against the faster transformers implementation of the run. Without
  transformers (>= 5) its entries and the patched block are skipped with the reason.
* ``layer-ep2`` (builder ``expert_parallel``, ``--full`` only, CPU): the `TaskMoE` layer
  forward+backward, expert-parallel over W=2 gloo ranks (worker processes of one thread each,
  T=4096 tokens per rank, E/W=8 experts each), against the single-process layer on the tokens
  and the thread of one rank (the baseline: the same work per core) and on all the tokens with W
  threads (the same total work on the same cores). The EP entry's time includes the loopback
  exchanges; its per-phase split (routing, dispatch, experts, combine, losses, backward; medians
  over the timed calls) goes into the JSON.

Checks: speed-up against the loop and against grouped_mm, the GEMM share, peak memory against
both peers (pyops may use no more than the leaner of them), routing against the torch chain; for
the transformers block, the patched block against the faster transformers implementation (speed
and peak memory).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from .harness import (PYOPS, Build, Case, CaseResult, CaseSpec, Check, Entry, Timing, choice_info, nbytes, peak_mib,
                      prepare, randn, verify_backends)

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
    CaseSpec("routing-groups", "moe_route", "routing_groups", dict(T=65536, E=64, G=8, M=4, k=6), dict(T=4096),
             backends={"cpu": ("cpu",), "cuda": ("cuda",)}, peers=(PYOPS, "torch"), baseline="torch",
             targets={"cpu": {"vs_torch": 5.0}, "cuda": {"vs_torch": 5.0}}, timing=_timing(2, 2)),
    # transformers' Mixtral sparse-MoE block (grouped_mm and eager) against the pyops-patched block
    *(CaseSpec(f"hf-mixtral-{tag}", "moe_experts", "hf_block", _LAYER, _LAYER_QUICK, backward=bwd,
               backends={"cpu": ("cpu",)}, peers=(PYOPS, "hf_grouped_mm", "hf_eager", "gemm_floor"),
               baseline="hf_grouped_mm", targets={"cpu": {"vs_hf": 1.3, "layout_cost": None}}, timing=_timing(q, f),
               also=("moe_route",))
      for tag, bwd, q, f in (("fwd", False, 8, 75), ("bwd", True, 10, 110))),
    CaseSpec("layer-ep2", "moe_experts", "expert_parallel", dict(_LAYER, W=2), None, backward=True,
             peers=(PYOPS, "single", "single_all"), baseline="single", targets={"cpu": {"ep_cost": 1.5}},
             timing={"full": Timing(repeats=7, max_seconds=60.0, warmup=1, expect_s=45)}, also=("moe_route",)),
]


def build(spec: CaseSpec, device, *, full: bool = False, workdir: Optional[str] = None) -> Case:
    """The `Case` of `spec` on `device` (quick size unless `full`)."""
    b = prepare(spec, device, full, workdir)
    return {"layer": _layer_case, "routing": _routing_case, "routing_groups": _routing_groups_case,
            "hf_block": _hf_block_case, "expert_parallel": _ep_case}[spec.kind](b)


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


def torch_group_routing(z, bias, k, n_group, topk_group, scale):
    """DeepSeek-V3 group-limited routing as the Hugging Face router computes it (torch ops)."""
    T, E = z.shape
    s = torch.sigmoid(z)
    key = s + bias
    group_score = key.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)
    groups = torch.topk(group_score, topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_score).scatter_(1, groups, 1.0)
    keep = keep.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    key = key.masked_fill(~keep.bool(), 0.0)
    e = torch.topk(key, k, dim=-1, sorted=False).indices
    w = s.gather(1, e)
    w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, e


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


def _routing_groups_case(b: Build) -> Case:
    import pyops

    T, E, G, M, k = (b.sizes[n] for n in ("T", "E", "G", "M", "k"))
    scale = 2.5
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(T, E, generator=gen).to(b.device)
    bias = (0.01 * torch.randn(E, generator=gen)).to(b.device)
    kw = dict(score="sigmoid", bias=bias, n_group=G, topk_group=M, routed_scaling=scale)
    entries = b.entries({
        PYOPS: lambda: [Entry(f"pyops {x}", (lambda x=x: pyops.moe_route(z, k, backend=x, **kw)), group="pyops",
                              note=f"moe_route(backend={x!r}, n_group={G}, topk_group={M}): groups, top-k, "
                                   "counts, offsets, stable permutation")
                        for x in b.backends],
        "torch": lambda: Entry("torch HF DeepSeek-V3 router chain", lambda: torch_group_routing(z, bias, k, G, M, scale),
                               note="sigmoid, +bias, top-2 sum per group, topk groups, mask, topk, gather, "
                                    "renormalise (+1e-20), scale"),
    })

    def checks(r: CaseResult) -> list:
        res = []
        for x in b.backends:
            p = r.ok(f"pyops {x}")
            res.append(Check(f"group routing speed-up pyops {x} vs torch chain", p and p.speedup,
                             b.target("vs_torch"), ">=", "x", note="" if p else "did not run"))
        return res

    def verify() -> dict:
        w, e = torch_group_routing(z, bias, k, G, M, scale)
        e, pos = torch.sort(e, dim=-1)   # the chain's top-k is unsorted: compare as sets
        w = w.gather(1, pos)

        def figures(x: str) -> tuple:
            r = pyops.moe_route(z, k, backend=x, **kw)
            ex, p = torch.sort(r.experts.long(), dim=-1)
            same = bool(torch.equal(ex, e))
            return {f"pyops_{x}_same_selection": same,
                    f"pyops_{x}_weights_max_abs": float((r.weights.gather(1, p) - w).abs().max())}, same
        return verify_backends(b.backends, figures)

    return b.case(f"routing-groups fp32 T={T} E={E} G={G} M={M} k={k}", entries, "torch HF DeepSeek-V3 router chain",
                  dict(T=T, E=E, n_group=G, topk_group=M, k=k, routed_scaling=scale, device=str(b.device),
                       threads=torch.get_num_threads()), checks, verify,
                  bytes=4 * T * E + (4 + 4 + 8 + 1) * T * k + 8 * (E + 1))


# --------------------------------------------------------------------------------------------
# transformers' Mixtral block against the pyops-patched block
# --------------------------------------------------------------------------------------------

def hf_mixtral():
    """(transformers' modeling_mixtral, None), or (None, why not) where transformers >= 5 is absent."""
    try:
        from pyops.integrations import prefer_installed_kernels
        prefer_installed_kernels()
        import transformers
        from transformers.models.mixtral import modeling_mixtral
    except Exception as exc:   # not installed, or broken
        return None, f"transformers is not importable here ({type(exc).__name__}: {exc})"[:300]
    major = transformers.__version__.split(".")[0]
    if not major.isdigit() or int(major) < 5:
        return None, f"transformers {transformers.__version__} < 5 (no fused experts, no patch_model support)"
    return modeling_mixtral, None


def _hf_block_case(b: Build) -> Case:
    import pyops

    dev, dtype, backward = b.device, b.dtype, b.spec.backward
    T, d, h, E, k = (b.sizes[n] for n in ("T", "d", "h", "E", "k"))
    g = b.generator(0, device="cpu")

    def rnd(*shape, scale=1.0):
        return randn(shape, dtype, dev, g, scale)

    # the block's parameters in transformers' layout: router [E, d], gate_up [E, 2h, d] (gate rows
    # first), down [E, d, h], used as x @ W.T
    x = rnd(1, T, d)
    router = torch.nn.Parameter(rnd(E, d, scale=d ** -0.5), requires_grad=backward)
    gate_up = torch.nn.Parameter(rnd(E, 2 * h, d, scale=d ** -0.5), requires_grad=backward)
    down = torch.nn.Parameter(rnd(E, d, h, scale=h ** -0.5), requires_grad=backward)
    dy = rnd(1, T, d)
    x.requires_grad_(backward)
    leaves = [x, router, gate_up, down]
    gemm_flops = 3 * 2 * T * k * d * h * (3 if backward else 1)

    mixtral, why = hf_mixtral()
    blocks: dict = {}

    def block(impl: str):
        """A MixtralSparseMoeBlock on the shared Parameters: transformers' `impl`, or "pyops"
        (patched); made once per case, on first use."""
        if impl not in blocks:
            from transformers import MixtralConfig

            cfg = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=E, num_experts_per_tok=k,
                                hidden_act="silu", router_jitter_noise=0.0)
            cfg._experts_implementation = "grouped_mm" if impl == "pyops" else impl
            m = mixtral.MixtralSparseMoeBlock(cfg).to(dtype)
            m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj = router, gate_up, down
            if impl == "pyops":
                from pyops.integrations.transformers import patch_model
                patch_model(m)
            blocks[impl] = m.train(backward)
        return blocks[impl]

    # pyops on x @ W copies of the same weights (no transformers needed)
    w1 = gate_up.detach()[:, :h].transpose(1, 2).contiguous().requires_grad_(backward)
    w3 = gate_up.detach()[:, h:].transpose(1, 2).contiguous().requires_grad_(backward)
    w2 = down.detach().transpose(1, 2).contiguous().requires_grad_(backward)
    wr = router.detach().t().contiguous().requires_grad_(backward)
    own = [x, wr, w1, w2, w3]

    def contiguous(x, wr, w1, w2, w3):
        xt = x.reshape(T, d)
        r = pyops.moe_route(xt @ wr, k)
        return pyops.moe_experts(xt, r, w1, w2, w3, activation="swiglu").reshape(1, T, d)

    def timed(fn, args):
        if not backward:
            def run():
                with torch.no_grad():
                    return fn(*args)
        else:
            def run():
                return torch.autograd.grad(fn(*args), args, dy)
        return run

    def hf_entry(impl: str, name: str, note: str) -> Entry:
        if why is not None:
            return Entry(name, None, skip=why, note=note)
        return Entry(name, timed(lambda x, *_: block(impl)(x), leaves), setup=lambda: block(impl),
                     flops=gemm_flops, note=note)

    HF = {"grouped_mm": "transformers grouped_mm", "eager": "transformers eager"}
    PATCHED, CONTIG, FLOOR = "pyops patched block", "pyops contiguous weights", "GEMM floor"

    def gemm_floor() -> Entry:
        """The block's expert GEMMs alone: torch.mm on contiguous per-expert operands, outputs
        preallocated, with this routing's per-expert row counts (3 GEMMs per expert forward, 9 with
        the backward). Every implementation here runs these GEMMs on the same BLAS, so the faster
        transformers' time over this one bounds the speed-up any of them can reach."""
        state: dict = {}

        def setup():
            with torch.no_grad():
                xt = x.detach().reshape(T, d)
                r = pyops.moe_route(xt @ router.detach().t(), k)
            counts = (r.offsets[1:] - r.offsets[:-1]).tolist()
            f32 = dict(dtype=torch.float32)
            ops = []
            for m in counts:
                if m == 0:
                    continue
                rows, dys = torch.randn(m, d, **f32), torch.randn(m, d, **f32)
                a, bb, hh, ys = (torch.empty(m, h, **f32), torch.empty(m, h, **f32), torch.randn(m, h, **f32),
                                 torch.empty(m, d, **f32))
                wg, wu, wd = torch.randn(d, h, **f32), torch.randn(d, h, **f32), torch.randn(h, d, **f32)
                ops += [(rows, wg, a), (rows, wu, bb), (hh, wd, ys)]
                if backward:
                    dw1, dw2, dx = torch.empty(d, h, **f32), torch.empty(h, d, **f32), torch.empty(m, d, **f32)
                    ops += [(dys, wd.t(), a), (hh.t(), dys, dw2), (a, wg.t(), dx), (bb, wu.t(), ys),
                            (rows.t(), a, dw1), (rows.t(), bb, dw1)]
            state["ops"] = ops

        def run():
            for p_, q_, o_ in state["ops"]:
                torch.mm(p_, q_, out=o_)

        return Entry(FLOOR, run, setup=setup, flops=gemm_flops, group="floor",
                     note="the expert GEMMs alone (torch.mm, contiguous, preallocated): the bound of every entry")
    entries = b.entries({
        PYOPS: lambda: [
            Entry(PATCHED, None, skip=why, group="pyops") if why is not None else
            Entry(PATCHED, timed(lambda x, *_: block("pyops")(x), leaves), setup=lambda: block("pyops"),
                  flops=gemm_flops, group="pyops", info=choice_info("moe_experts"),
                  note="MixtralSparseMoeBlock after patch_model: its router, moe_route, moe_experts on views "
                       "of the [E, out, in] weights"),
            Entry(CONTIG, timed(contiguous, own), flops=gemm_flops, group="pyops", info=choice_info("moe_experts"),
                  note="router mm, moe_route, moe_experts on x @ W copies of the weights (not the HF layout)"),
        ],
        "hf_grouped_mm": lambda: hf_entry("grouped_mm", HF["grouped_mm"],
                                          "transformers' MixtralSparseMoeBlock, _experts_implementation='grouped_mm' "
                                          "(its default)"),
        "hf_eager": lambda: hf_entry("eager", HF["eager"],
                                     "transformers' MixtralSparseMoeBlock, _experts_implementation='eager' "
                                     "(per-expert loop)"),
        "gemm_floor": gemm_floor,
    })

    def checks(r: CaseResult) -> list:
        ran = [e for e in (r.ok(n) for n in HF.values()) if e is not None]
        p, c = r.ok(PATCHED), r.ok(CONTIG)
        if not ran or p is None:
            return [Check("pyops patched block vs transformers", None, note="did not run: " + (why or "an entry failed"))]
        fast = min(ran, key=lambda e: e.median_s)
        res = [Check(f"speed-up pyops patched block vs {fast.name} (the faster transformers)",
                     fast.median_s / p.median_s, b.target("vs_hf"), ">=", "x",
                     note=", ".join(f"{e.name} {e.median_s * 1e3:.1f} ms" for e in ran))]
        peers = [m for m in (peak_mib(e, dev) for e in ran) if m is not None]
        if peak_mib(p, dev) is not None and peers:
            res.append(Check("peak memory pyops patched block", peak_mib(p, dev), min(peers), "<=", " MiB",
                             note=", ".join(f"{e.name} {peak_mib(e, dev)}" for e in ran) + " MiB"))
        if c is not None and "layout_cost" in b.targets:
            res.append(Check("HF layout cost: patched block time / contiguous-weights time", p.median_s / c.median_s,
                             b.target("layout_cost"), "<=", "x"))
        floor = r.ok(FLOOR)
        if floor is not None:
            res.append(Check(f"bound: {fast.name} / GEMM floor (the largest speed-up any torch.mm-based block "
                             "could reach)", fast.median_s / floor.median_s, None, ">=", "x"))
            res.append(Check("GEMM share of the pyops patched block (GEMM floor / patched)",
                             floor.median_s / p.median_s, None, ">=", "x"))
        return res

    def verify() -> dict:
        from pyops.testing import compare, tolerance_for

        tol = type(tolerance_for(dtype))(atol=2e-5, rtol=2e-5)

        def outputs(fn, args) -> list:
            if not backward:
                with torch.no_grad():
                    return [fn(*args)]
            y = fn(*args)
            return [y.detach(), *torch.autograd.grad(y, args, dy)]

        names = ["y", *(["dx", "d_router", "d_gate_up", "d_down"] if backward else [])]
        out, ok = {"reference": "transformers grouped_mm" if why is None else "per-expert loop"}, True
        if why is None:
            want = outputs(lambda x, *_: block("grouped_mm")(x), leaves)
            got = outputs(lambda x, *_: block("pyops")(x), leaves)
            for n, a, e in zip(names, got, want):
                cmp = compare(a, e, tol)
                out[f"patched_{n}_max_abs"], ok = cmp.max_abs, ok and cmp.ok
        else:
            out["skipped"] = why
            with torch.no_grad():
                xt = x.detach().reshape(T, d)
                want = [loop_moe(xt, xt @ wr.detach(), w1.detach(), w2.detach(), w3.detach(), k).reshape(1, T, d)]
        got = outputs(contiguous, own)
        if backward and why is None:   # the same gradients, in the x @ W layout
            got = [got[0], got[1], got[2].t(), torch.cat([got[3], got[5]], 2).transpose(1, 2), got[4].transpose(1, 2)]
        for n, a, e in zip(names, got, want):
            cmp = compare(a, e, tol)
            out[f"contiguous_{n}_max_abs"], ok = cmp.max_abs, ok and cmp.ok
        out["ok"] = ok
        return out

    params = dict(T=T, d=d, hidden=h, E=E, k=k, activation="swiglu", dtype=b.spec.dtype, backward=backward,
                  device=str(dev), threads=torch.get_num_threads(), layout="transformers [E, out, in]",
                  transformers=None if why is not None else __import__("transformers").__version__)
    ins, outs = T * d + E * d + 3 * E * d * h, T * d
    op_bytes = nbytes(3 * ins + 2 * outs if backward else ins + outs, dtype)
    return b.case(f"hf-mixtral-block {b.tag} {b.spec.dtype} T={T} d={d} h={h} E={E} k={k}", entries,
                  HF["grouped_mm"], params, checks, verify, bytes=op_bytes, flops=gemm_flops)


# --------------------------------------------------------------------------------------------
# Expert parallelism: W worker processes (gloo, one thread each) driven from this process
# --------------------------------------------------------------------------------------------

EP_PHASES = ("routing", "dispatch", "experts", "combine", "losses", "backward")


def _ep_worker(rank: int, world: int, port: int, sizes: dict, conn) -> None:
    """One rank of the EP layer: on each "run", TaskMoE(ep_group)'s forward step by step (each
    phase timed) and the backward; answers the phase times."""
    import datetime
    import time

    import torch.distributed as dist

    import pyops
    from pyops.moe import ops as M
    from pyops.moe import parallel as P

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    T, d, h, E, k = (sizes[n] for n in ("T", "d", "h", "E", "k"))
    torch.manual_seed(rank)
    m = pyops.nn.TaskMoE(d, h, E, k, ep_group=dist.group.WORLD)
    dist.broadcast(m.router.data, 0)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(100 + rank), requires_grad=True)
    dy = torch.randn(T, d, generator=torch.Generator().manual_seed(200 + rank))
    conn.send("ready")
    while conn.recv() == "run":
        dist.barrier()
        t = [time.perf_counter()]
        logits = x @ m.router[0]
        r = P.global_capacity(M.moe_route(logits, k), m.capacity_factor, m.ep_group)
        t.append(time.perf_counter())
        rows, plan = P.dispatch(x, r, m.ep_group)
        t.append(time.perf_counter())
        out = M.moe_experts(rows, plan.routing, m.w1, m.w2, m.w3)
        t.append(time.perf_counter())
        y = P.combine(out, plan, r.weights)
        t.append(time.perf_counter())
        lb = P.global_load_balance_loss(logits, r.experts, group=m.ep_group)
        t.append(time.perf_counter())
        torch.autograd.backward([y, lb], [dy, torch.ones_like(lb)])
        t.append(time.perf_counter())
        m.zero_grad(set_to_none=True)
        x.grad = None
        conn.send([b - a for a, b in zip(t, t[1:])])
    dist.destroy_process_group()


class _EPWorkers:
    """W spawned ranks of `_ep_worker`, driven through pipes; `run()` is one timed call."""

    def __init__(self, world: int, sizes: dict):
        self.world, self.sizes, self.procs, self.conns = world, sizes, [], []
        self.phases: list = []

    def start(self) -> None:
        import socket

        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for rank in range(self.world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_ep_worker, args=(rank, self.world, port, self.sizes, child), daemon=True)
            p.start()
            self.procs.append(p)
            self.conns.append(parent)
        for c in self.conns:
            if not c.poll(180) or c.recv() != "ready":
                raise RuntimeError("expert-parallel benchmark: a worker did not start")

    def run(self) -> None:
        for c in self.conns:
            c.send("run")
        self.phases.append([c.recv() for c in self.conns])

    def stop(self) -> None:
        for c in self.conns:
            try:
                c.send("stop")
            except OSError:
                pass
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        self.procs, self.conns = [], []

    def split(self) -> dict:
        """Median seconds per phase (the slowest rank of each call), warm-up calls left out."""
        import statistics

        timed = self.phases[2:] or self.phases
        return {name: statistics.median(max(ranks[r][i] for r in range(self.world)) for ranks in timed)
                for i, name in enumerate(EP_PHASES)}


def _ep_case(b: Build) -> Case:
    import pyops

    T, d, h, E, k, W = (b.sizes[n] for n in ("T", "d", "h", "E", "k", "W"))
    threads = torch.get_num_threads()
    workers = _EPWorkers(W, dict(T=T, d=d, h=h, E=E, k=k))

    def single(tokens: int, n_threads: int) -> Entry:
        torch.manual_seed(0)
        m = pyops.nn.TaskMoE(d, h, E, k)
        x = torch.randn(tokens, d, requires_grad=True)
        dy = torch.randn(tokens, d)

        def run():
            torch.set_num_threads(n_threads)
            try:
                y, aux = m(x)
                torch.autograd.backward([y, aux["load_balance"]], [dy, torch.ones_like(aux["load_balance"])])
                m.zero_grad(set_to_none=True)
                x.grad = None
            finally:
                torch.set_num_threads(threads)
        return Entry(f"1 process T={tokens} {n_threads} thread{'s' if n_threads > 1 else ''}", run,
                     flops=3 * 2 * tokens * k * d * h * 3, group="pyops",
                     note=f"TaskMoE forward+backward, all {E} experts in this process")

    ep_name = f"EP {W} ranks T={T} each, 1 thread each"
    entries = b.entries({
        PYOPS: lambda: Entry(ep_name, workers.run, setup=workers.start, teardown=workers.stop, group="pyops",
                             flops=3 * 2 * T * k * d * h * 3, measure_memory=False,
                             note=f"TaskMoE(ep_group) forward+backward over {W} gloo ranks (worker processes), "
                                  f"{E // W} experts each; time of the slowest rank incl. the all-to-alls"),
        "single": lambda: single(T, 1),
        "single_all": lambda: single(W * T, W),
    })
    base = f"1 process T={T} 1 thread"

    def checks(r: CaseResult) -> list:
        ep, one = r.ok(ep_name), r.ok(base)
        if ep is None or one is None:
            return [Check("EP cost", None, note="did not run")]
        split = workers.split() if workers.phases else {}
        return [Check(f"EP cost: {W}-rank layer time / 1-process time per rank's work", ep.median_s / one.median_s,
                      b.target("ep_cost"), "<=", "x",
                      note="split (ms, slowest rank): " + ", ".join(f"{n} {v * 1e3:.1f}" for n, v in split.items()))]

    def verify() -> dict:
        return {"ok": True, "phase_median_ms": {n: v * 1e3 for n, v in workers.split().items()}} if workers.phases \
            else {"ok": True}

    params = dict(T_per_rank=T, d=d, hidden=h, E=E, k=k, W=W, activation="swiglu", dtype="fp32", backward=True,
                  device=str(b.device), threads=threads)
    return b.case(f"layer EP fwd+bwd fp32 W={W} T={T}/rank d={d} h={h} E={E} k={k}", entries, base, params,
                  checks, verify, flops=3 * 2 * T * k * d * h * 3)
