"""Benchmarks of task-masked attention (`pyops.task_masked_attention`), family ``task_attention``.

Cases, fp32 on CPU (fp32 and fp16 on CUDA), forward and forward+backward:

* MultiTab-Net shape (builder ``multitab``): B=2048, H=4, L=29 (5 task tokens + 24 features),
  D=4, ``TxT`` mask. Peers: SDPA with the dense bool mask (baseline), the explicit
  ``baddbmm + softmax + bmm`` that `nn.MultiheadAttention` runs, compiled FlexAttention
  (forward only on CPU: it raises on backward there).
* Block-diagonal (builder ``block_diagonal``): B=2, H=8, L=4096, D=64, 4 equal groups. Peers:
  SDPA with the dense bool mask (baseline), SDPA run on each group separately (the ideal: no
  masked work at all), compiled FlexAttention.

FlexAttention's compile (and `create_block_mask`) happen in the entry's setup, timed separately
and reported in its info (``compile_s``, ``block_mask_s``); its timed calls are warm. The quick
run shrinks every shape and leaves FlexAttention out (its compile alone takes tens of seconds).

Useful FLOPs count only allowed (query, key) pairs P: forward 4·B·H·P·D (q·kᵀ and p·v);
forward+backward 3× that (the backward's four products, no recomputation counted). A plain
fp32 ``torch.mm`` (1024³) is measured in the same run as the machine's GFLOP/s yardstick. Bytes
(the case's minimum traffic): forward q, k, v read and the output written, 4·B·H·L·D elements;
forward+backward 12 (the backward reads q, k, v, out and dout, and writes dq, dk, dv).
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

from .harness import (PYOPS, Build, Case, CaseResult, CaseSpec, Check, Entry, Timing, choice_info,
                      mm_entry, nbytes, prepare, randn, ratio, verify_backends)

FAMILY = "task_attention"
OPS = ("task_masked_attention",)
OP = "task_masked_attention"

_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton",)}
_CUDA = {"cuda": ("triton",)}

# check key -> (name after "<fwd|fwd+bwd>: ", slow entry, fast entry, cmp); "{n}" is the pyops entry.
_CHECKS = {
    "vs_sdpa": ("speed-up {n} vs SDPA + bool mask", "SDPA + bool mask", "{n}", ">="),
    "vs_explicit": ("speed-up {n} vs explicit", "explicit baddbmm+softmax+bmm", "{n}", ">="),
    "vs_flex": ("speed-up {n} vs compiled FlexAttention", "FlexAttention (compiled)", "{n}", ">="),
    "time_vs_ideal": ("time {n} / SDPA per group (ideal)", "{n}", "SDPA per group (ideal)", "<="),
    "vs_ideal": ("speed-up {n} vs SDPA per group (ideal)", "SDPA per group (ideal)", "{n}", ">="),
}

_MT_SIZES, _MT_QUICK = dict(B=2048, H=4, tasks=5, features=24, D=4, rule="TxT"), dict(B=64)
_MT_PEERS = (PYOPS, "sdpa", "explicit", "flex", "mm")
_MT_TIMING = {"full": Timing(repeats=15, max_seconds=60.0, expect_s=8.0),
              "quick": Timing(repeats=5, max_seconds=3.0, expect_s=3.0)}
_BD_SIZES, _BD_QUICK = dict(B=2, H=8, L=4096, D=64, groups=4), dict(B=1, H=2, L=512)
_BD_PEERS = (PYOPS, "sdpa", "per_group", "flex", "mm")
_BD_TIMING = {"full": Timing(repeats=11, max_seconds=90.0, warmup=1, expect_s=25.0),
              "quick": Timing(repeats=5, max_seconds=3.0, expect_s=4.0)}


def _multitab(name, dtype, backward, targets, backends=_BACKENDS) -> CaseSpec:
    return CaseSpec(name, OP, "multitab", _MT_SIZES, _MT_QUICK, dtype=dtype, backward=backward, backends=backends,
                    peers=_MT_PEERS, baseline="sdpa", targets=targets, timing=_MT_TIMING)


def _blockdiag(name, dtype, backward, targets, backends=_BACKENDS) -> CaseSpec:
    return CaseSpec(name, OP, "block_diagonal", _BD_SIZES, _BD_QUICK, dtype=dtype, backward=backward,
                    backends=backends, peers=_BD_PEERS, baseline="sdpa", targets=targets, timing=_BD_TIMING)


CASES = [
    _multitab("multitab-fwd", "fp32", False, {"cpu": {"vs_flex": 5.0, "vs_sdpa": None}, "cuda": {"vs_flex": None}}),
    _multitab("multitab-bwd", "fp32", True, {"cpu": {"vs_sdpa": 5.0, "vs_explicit": 3.0}, "cuda": {"vs_flex": None}}),
    _blockdiag("blockdiag-fwd", "fp32", False, {"cpu": {"time_vs_ideal": 1.2, "vs_flex": 1.8, "vs_ideal": None},
                                                "cuda": {"vs_flex": None, "vs_ideal": None}}),
    _blockdiag("blockdiag-bwd", "fp32", True, {"cpu": {"vs_sdpa": 3.5, "vs_ideal": None},
                                               "cuda": {"vs_flex": None, "vs_ideal": None}}),
    _multitab("multitab-fwd-fp16", "fp16", False, {"cuda": {"vs_flex": None}}, _CUDA),
    _multitab("multitab-bwd-fp16", "fp16", True, {"cuda": {"vs_flex": None}}, _CUDA),
    # On the GPU, half precision and long sequences are where FlexAttention's tiles pay off: the
    # target applies at full size only.
    _blockdiag("blockdiag-fwd-fp16", "fp16", False, {"cuda": {"vs_flex": 1.0, "vs_ideal": None},
                                                     "cuda quick": {"vs_flex": None, "vs_ideal": None}}, _CUDA),
    _blockdiag("blockdiag-bwd-fp16", "fp16", True, {"cuda": {"vs_flex": 1.0, "vs_ideal": None},
                                                    "cuda quick": {"vs_flex": None, "vs_ideal": None}}, _CUDA),
]


def build(spec: CaseSpec, device, *, full: bool = False, workdir: Optional[str] = None) -> Case:
    """The `Case` of `spec` on `device` (quick size unless `full`)."""
    b = prepare(spec, device, full, workdir)
    return {"multitab": _multitab_case, "block_diagonal": _blockdiag_case}[spec.kind](b)


class _Problem:
    """q, k, v, dout [B, H, L, D] and the mask of one case; `step(fwd)` adds the backward."""

    def __init__(self, b: Build, B, H, L, D, groups, allow):
        gen = b.generator(0)
        dev, dtype = b.device, b.dtype
        self.dev, self.dtype, self.B, self.H, self.L, self.D = dev, dtype, B, H, L, D
        self.q, self.k, self.v = (randn((B, H, L, D), dtype, dev, gen) for _ in range(3))
        self.dout = randn((B, H, L, D), dtype, dev, gen)
        self.backward = b.spec.backward
        if self.backward:
            for t in (self.q, self.k, self.v):
                t.requires_grad_(True)
        self.groups, self.allow = groups.to(dev), allow.to(dev)
        from pyops.task_attention.masks import dense
        self.attend = dense(self.groups, None, self.allow)                      # [L, L], True = attend
        self.additive = torch.zeros(L, L, device=dev, dtype=dtype).masked_fill(~self.attend, float("-inf"))
        self.flops = 4 * B * H * int(self.attend.sum()) * D * (3 if self.backward else 1)
        self.bytes = (12 if self.backward else 4) * nbytes(B * H * L * D, dtype)

    def step(self, fwd):
        """fwd() -> out; with backward: out.backward(dout), grads cleared (not accumulated)."""
        if not self.backward:
            return fwd
        q, k, v, dout = self.q, self.k, self.v, self.dout

        def fn():
            q.grad = k.grad = v.grad = None
            fwd().backward(dout)
        return fn


def _common(b: Build, p: _Problem) -> dict:
    """The entry factories both builders share: pyops, SDPA + bool mask, FlexAttention, torch.mm."""
    import pyops
    q, k, v, g, allow, mask = p.q, p.k, p.v, p.groups, p.allow, p.attend

    def pyops_entries():
        return [Entry(f"pyops {x}", p.step(lambda x=x: pyops.task_masked_attention(q, k, v, g, allow=allow, backend=x)),
                      flops=p.flops, group="pyops", info=choice_info(OP),
                      note=f"pyops.task_masked_attention(q, k, v, groups, allow=allow, backend={x!r})")
                for x in b.backends]

    return {
        PYOPS: pyops_entries,
        "sdpa": lambda: Entry("SDPA + bool mask",
                              p.step(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
                              flops=p.flops, group="peer",
                              note="F.scaled_dot_product_attention(q, k, v, attn_mask=dense bool [L, L])"),
        "flex": lambda: _flex_entry(b, p),
        "mm": lambda: mm_entry("torch.mm 1024^3", p.dev, torch.float32,
                               note="plain torch.mm: the machine's GFLOP/s yardstick"),
    }


def _flex_entry(b: Build, p: _Problem) -> Entry:
    name = "FlexAttention (compiled)"
    if not b.full:
        return Entry(name, None, skip="quick mode: left out (its compile alone takes tens of seconds)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # older torch or a build without it
        return Entry(name, None, skip=f"FlexAttention is not available ({type(exc).__name__}: {exc})")
    if p.backward and p.dev.type == "cpu":
        return Entry(name, None, skip=f"FlexAttention on CPU is forward only in torch {torch.__version__} "
                                      "(it raises on backward)")
    g, allow, L = p.groups, p.allow, p.L

    def mask_mod(b_, h, q_idx, kv_idx):
        return allow[g[q_idx], g[kv_idx]]
    state: dict = {}

    def setup():
        t0 = time.perf_counter()
        state["bm"] = create_block_mask(mask_mod, None, None, L, L, device=str(p.dev))
        state["bm_s"] = time.perf_counter() - t0
        state["fn"] = torch.compile(flex_attention)
        t0 = time.perf_counter()
        o = state["fn"](p.q, p.k, p.v, block_mask=state["bm"])
        if p.backward:
            o.backward(p.dout)
        if p.dev.type == "cuda":
            torch.cuda.synchronize()
        state["compile_s"] = time.perf_counter() - t0

    def fn():
        return state["fn"](p.q, p.k, p.v, block_mask=state["bm"])
    return Entry(name, p.step(fn), setup=setup, flops=p.flops, group="peer",
                 info=lambda: {"compile_s": state.get("compile_s"), "block_mask_s": state.get("bm_s")},
                 note="torch.compile(flex_attention)(q, k, v, block_mask=create_block_mask(allow[g[i], g[j]])); "
                      "compile and create_block_mask timed in setup (info)")


def _checks(b: Build):
    """The spec's target checks in its order, then pyops' useful GFLOP/s against torch.mm."""
    def checks(r: CaseResult) -> list:
        res = []
        for x in b.backends:
            n = f"pyops {x}"
            for key, target in b.targets.items():
                label, slow, fast, cmp = _CHECKS[key]
                res.append(Check(f"{b.tag}: {label.format(n=n)}", ratio(r, slow.format(n=n), fast.format(n=n)),
                                 target, cmp))
        mm = r.ok("torch.mm 1024^3")
        for x in b.backends:
            e = r.ok(f"pyops {x}")
            if e and mm and e.gflops and mm.gflops:
                res.append(Check(f"pyops {x} useful GFLOP/s / torch.mm GFLOP/s", e.gflops / mm.gflops, None, ">=",
                                 "x", note=f"{e.gflops:.1f} vs {mm.gflops:.1f} GFLOP/s"))
        return res
    return checks


def _verify(b: Build, p: _Problem, expected_fn):
    def verify() -> dict:
        import pyops
        from pyops.testing import compare, tolerance_for
        with torch.no_grad():
            exp = expected_fn()

            def figures(x: str) -> tuple:
                got = pyops.task_masked_attention(p.q.detach(), p.k.detach(), p.v.detach(), p.groups,
                                                  allow=p.allow, backend=x)
                c = compare(got, exp, tolerance_for(p.dtype))
                return {f"pyops_{x}_max_abs": c.max_abs, f"pyops_{x}_ok": c.ok}, c.ok
            return verify_backends(b.backends, figures)
    return verify


def _params(b: Build, **extra) -> dict:
    return {"dtype": b.spec.dtype, **extra, "backward": b.spec.backward, "threads": torch.get_num_threads(),
            "device": str(b.device)}


def _multitab_case(b: Build) -> Case:
    from pyops.task_attention.masks import multitab
    s = b.sizes
    B, H, D, L = s["B"], s["H"], s["D"], s["tasks"] + s["features"]
    g, allow = multitab(s["tasks"], s["features"], s["rule"])
    p = _Problem(b, B, H, L, D, g, allow)
    q, k, v, add = p.q, p.k, p.v, p.additive
    BH, scale = B * H, D ** -0.5

    def explicit():  # nn.MultiheadAttention's math path
        qs = (q * scale).reshape(BH, L, D)
        w = torch.softmax(torch.baddbmm(add, qs, k.reshape(BH, L, D).transpose(1, 2)), dim=-1)
        return torch.bmm(w, v.reshape(BH, L, D)).view(B, H, L, D)

    entries = b.entries({**_common(b, p), "explicit": lambda: Entry(
        "explicit baddbmm+softmax+bmm", p.step(explicit), flops=p.flops, group="peer",
        note="what nn.MultiheadAttention runs: baddbmm(additive mask, q*scale, kᵀ), softmax, bmm")})

    def expected():
        return F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=p.attend)
    return b.case(f"multitab {s['rule']} {b.spec.dtype} B={B} H={H} L={L} D={D} {b.tag}", entries, "SDPA + bool mask",
                  _params(b, B=B, H=H, L=L, D=D, mask=f"multitab {s['rule']} ({s['tasks']} tasks)"),
                  _checks(b), _verify(b, p, expected), bytes=p.bytes, flops=p.flops)


def _blockdiag_case(b: Build) -> Case:
    from pyops.task_attention.masks import block_diagonal
    s = b.sizes
    B, H, L, D, n_groups = s["B"], s["H"], s["L"], s["D"], s["groups"]
    g, allow = block_diagonal([L // n_groups] * n_groups)
    p = _Problem(b, B, H, L, D, g, allow)
    q, k, v = p.q, p.k, p.v
    seg = L // n_groups

    def per_group():
        return torch.cat([F.scaled_dot_product_attention(q[:, :, s:s + seg], k[:, :, s:s + seg], v[:, :, s:s + seg])
                          for s in range(0, L, seg)], dim=2)

    entries = b.entries({**_common(b, p), "per_group": lambda: Entry(
        "SDPA per group (ideal)", p.step(per_group), flops=p.flops, group="peer",
        note="SDPA on each group's slice separately, then torch.cat: no masked work at all")})
    return b.case(f"block-diagonal {b.spec.dtype} B={B} H={H} L={L} D={D} {n_groups} groups {b.tag}", entries,
                  "SDPA + bool mask", _params(b, B=B, H=H, L=L, D=D, groups=n_groups),
                  _checks(b), _verify(b, p, lambda: per_group().detach()), bytes=p.bytes, flops=p.flops)
