"""Benchmark of task-masked attention (`pyops.task_masked_attention`), family ``task_attention``.

Cases (from issue 4), fp32 on CPU (fp32 and fp16 on CUDA):

* MultiTab-Net shape: B=2048, H=4, L=29 (5 task tokens + 24 features), D=4, ``TxT`` mask;
  forward, and forward+backward. Peers: SDPA with the dense bool mask (baseline), the explicit
  ``baddbmm + softmax + bmm`` that `nn.MultiheadAttention` runs, compiled FlexAttention
  (forward only on CPU: it raises on backward there).
* Block-diagonal: B=2, H=8, L=4096, D=64, 4 equal groups; forward, and forward+backward.
  Peers: SDPA with the dense bool mask (baseline), SDPA run on each group separately (the ideal:
  no masked work at all), compiled FlexAttention.

FlexAttention's compile (and `create_block_mask`) happen in the case setup, timed separately and
reported in the entry's info (``compile_s``, ``block_mask_s``); its timed calls are warm. Quick
mode (a smoke test) shrinks every shape and leaves FlexAttention out (its compile alone takes
tens of seconds).

Useful FLOPs count only allowed (query, key) pairs P: forward 4·B·H·P·D (q·kᵀ and p·v);
forward+backward 3× that (the backward's four products, no recomputation counted). A plain
fp32 ``torch.mm`` (1024³) is measured in the same run as the machine's GFLOP/s yardstick.
"""
from __future__ import annotations

import time
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .harness import Case, CaseResult, Check, Entry

FAMILY = "task_attention"
OPS = ("task_masked_attention",)
OP = "task_masked_attention"
_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        return flex_attention, create_block_mask, None
    except Exception as exc:  # older torch or a build without it
        return None, None, f"FlexAttention is not available ({type(exc).__name__}: {exc})"


def _info():
    import pyops
    ch = pyops.last_choice(OP)
    return {"backend_ran": ch.backend if ch else None, "choice": ch.explain() if ch else None}


class _Problem:
    def __init__(self, dev, dtype, B, H, L, D, groups, allow, backward):
        gen = torch.Generator(device=dev).manual_seed(0)

        def rnd(*shape):
            return torch.randn(*shape, device=dev, generator=gen, dtype=torch.float32).to(dtype)
        self.dev, self.dtype, self.B, self.H, self.L, self.D = dev, dtype, B, H, L, D
        self.q, self.k, self.v = rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)
        self.dout = rnd(B, H, L, D)
        if backward:
            for t in (self.q, self.k, self.v):
                t.requires_grad_(True)
        self.backward = backward
        self.groups, self.allow = groups.to(dev), allow.to(dev)
        from pyops.task_attention.masks import dense
        self.attend = dense(self.groups, None, self.allow)                      # [L, L], True = attend
        self.additive = torch.zeros(L, L, device=dev, dtype=dtype).masked_fill(~self.attend, float("-inf"))
        pairs = int(self.attend.sum())
        self.flops = 4 * B * H * pairs * D * (3 if backward else 1)

    def step(self, fwd):
        """fwd() -> out; with backward: out.backward(dout), grads cleared (not accumulated)."""
        if not self.backward:
            return fwd
        q, k, v, dout = self.q, self.k, self.v, self.dout

        def fn():
            q.grad = k.grad = v.grad = None
            fwd().backward(dout)
        return fn


def _entries_common(p: _Problem, backends) -> list[Entry]:
    import pyops
    q, k, v, g, allow = p.q, p.k, p.v, p.groups, p.allow
    out = [Entry(f"pyops {b}", p.step(lambda b=b: pyops.task_masked_attention(q, k, v, g, allow=allow, backend=b)),
                 flops=p.flops, group="pyops", info=_info,
                 note=f"pyops.task_masked_attention(q, k, v, groups, allow=allow, backend={b!r})") for b in backends]
    mask = p.attend
    out.append(Entry("SDPA + bool mask", p.step(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
                     flops=p.flops, group="peer", note="F.scaled_dot_product_attention(q, k, v, attn_mask=dense bool [L, L])"))
    return out


def _flex_entry(p: _Problem, quick: bool) -> Entry:
    name = "FlexAttention (compiled)"
    if quick:
        return Entry(name, None, skip="quick mode: left out (its compile alone takes tens of seconds)")
    flex, cbm, reason = _flex()
    if reason:
        return Entry(name, None, skip=reason)
    if p.backward and p.dev.type == "cpu":
        return Entry(name, None, skip=f"FlexAttention on CPU is forward only in torch {torch.__version__} "
                                      "(it raises on backward)")
    g, allow, L = p.groups, p.allow, p.L

    def mask_mod(b, h, q_idx, kv_idx):
        return allow[g[q_idx], g[kv_idx]]
    state: dict = {}

    def setup():
        t0 = time.perf_counter()
        state["bm"] = cbm(mask_mod, None, None, L, L, device=str(p.dev))
        state["bm_s"] = time.perf_counter() - t0
        state["fn"] = torch.compile(flex)
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


def _mm_entry(dev, dtype) -> Entry:
    n = 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    return Entry("torch.mm 1024^3", lambda: torch.mm(a, b), flops=2 * n ** 3, group="reference",
                 note="plain torch.mm: the machine's GFLOP/s yardstick")


def _gflops_checks(r: CaseResult, backends) -> list[Check]:
    mm = r.ok("torch.mm 1024^3")
    res = []
    for b in backends:
        e = r.ok(f"pyops {b}")
        if e and mm and e.gflops and mm.gflops:
            res.append(Check(f"pyops {b} useful GFLOP/s / torch.mm GFLOP/s", e.gflops / mm.gflops, None, ">=", "x",
                             note=f"{e.gflops:.1f} vs {mm.gflops:.1f} GFLOP/s"))
    return res


def _ratio(r: CaseResult, slow: str, fast: str) -> Optional[float]:
    a, b = r.ok(slow), r.ok(fast)
    return a.median_s / b.median_s if (a and b) else None


def _verify(p: _Problem, backends, expected_fn) -> dict:
    import pyops
    from pyops.testing import compare, tolerance_for
    with torch.no_grad():
        exp = expected_fn()
        res, ok = {}, True
        for b in backends:
            try:
                got = pyops.task_masked_attention(p.q.detach(), p.k.detach(), p.v.detach(), p.groups,
                                                  allow=p.allow, backend=b)
            except pyops.BackendUnavailableError:
                continue
            c = compare(got, exp, tolerance_for(p.dtype))
            res[f"pyops_{b}_max_abs"], res[f"pyops_{b}_ok"] = c.max_abs, c.ok
            ok = ok and c.ok
    res["ok"] = ok
    return res


def _multitab_case(dev, dtype, backends, quick, backward) -> Case:
    from pyops.task_attention.masks import multitab
    B = 64 if quick else 2048
    g, allow = multitab(5, 24, "TxT")
    p = _Problem(dev, dtype, B, 4, 29, 4, g, allow, backward)
    q, k, v, add = p.q, p.k, p.v, p.additive
    BH, L, D = B * 4, 29, 4
    scale = D ** -0.5

    def explicit():  # nn.MultiheadAttention's math path
        qs = (q * scale).reshape(BH, L, D)
        w = torch.softmax(torch.baddbmm(add, qs, k.reshape(BH, L, D).transpose(1, 2)), dim=-1)
        return torch.bmm(w, v.reshape(BH, L, D)).view(B, 4, L, D)

    entries = _entries_common(p, backends)
    entries.append(Entry("explicit baddbmm+softmax+bmm", p.step(explicit), flops=p.flops, group="peer",
                         note="what nn.MultiheadAttention runs: baddbmm(additive mask, q*scale, kᵀ), softmax, bmm"))
    entries.append(_flex_entry(p, quick))
    entries.append(_mm_entry(dev, torch.float32))
    what = "fwd+bwd" if backward else "fwd"

    def checks(r: CaseResult) -> list[Check]:
        res = []
        for b in backends:
            n = f"pyops {b}"
            if dev.type == "cpu" and backward:
                res.append(Check(f"{what}: speed-up {n} vs SDPA + bool mask", _ratio(r, "SDPA + bool mask", n), 5.0))
                res.append(Check(f"{what}: speed-up {n} vs explicit", _ratio(r, "explicit baddbmm+softmax+bmm", n), 3.0))
            elif dev.type == "cpu":
                res.append(Check(f"{what}: speed-up {n} vs compiled FlexAttention",
                                 _ratio(r, "FlexAttention (compiled)", n), 5.0))
                res.append(Check(f"{what}: speed-up {n} vs SDPA + bool mask", _ratio(r, "SDPA + bool mask", n)))
            else:
                res.append(Check(f"{what}: speed-up {n} vs compiled FlexAttention",
                                 _ratio(r, "FlexAttention (compiled)", n)))
        return res + _gflops_checks(r, backends)

    def expected():
        return F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=p.attend)
    return Case(f"multitab TxT {_DT[dtype]} B={B} H=4 L=29 D=4 {what}", entries, "SDPA + bool mask",
                params={"dtype": _DT[dtype], "B": B, "H": 4, "L": 29, "D": 4, "mask": "multitab TxT (5 tasks)",
                        "backward": backward, "threads": torch.get_num_threads(), "device": str(dev)},
                repeats=7 if quick else 15, max_seconds=10.0 if quick else 60.0, checks=checks,
                verify=lambda: _verify(p, backends, expected))


def _blockdiag_case(dev, dtype, backends, quick, backward) -> Case:
    from pyops.task_attention.masks import block_diagonal
    B, H, L, D = (1, 2, 512, 64) if quick else (2, 8, 4096, 64)
    n_groups = 4
    g, allow = block_diagonal([L // n_groups] * n_groups)
    p = _Problem(dev, dtype, B, H, L, D, g, allow, backward)
    q, k, v = p.q, p.k, p.v
    seg = L // n_groups

    def per_group():
        return torch.cat([F.scaled_dot_product_attention(q[:, :, s:s + seg], k[:, :, s:s + seg], v[:, :, s:s + seg])
                          for s in range(0, L, seg)], dim=2)

    entries = _entries_common(p, backends)
    entries.append(Entry("SDPA per group (ideal)", p.step(per_group), flops=p.flops, group="peer",
                         note="SDPA on each group's slice separately, then torch.cat: no masked work at all"))
    entries.append(_flex_entry(p, quick))
    entries.append(_mm_entry(dev, torch.float32))
    what = "fwd+bwd" if backward else "fwd"

    def checks(r: CaseResult) -> list[Check]:
        res = []
        for b in backends:
            n = f"pyops {b}"
            if dev.type == "cpu" and backward:
                res.append(Check(f"{what}: speed-up {n} vs SDPA + bool mask", _ratio(r, "SDPA + bool mask", n), 3.5))
            elif dev.type == "cpu":
                res.append(Check(f"{what}: time {n} / SDPA per group (ideal)", _ratio(r, n, "SDPA per group (ideal)"),
                                 1.2, "<="))
                res.append(Check(f"{what}: speed-up {n} vs compiled FlexAttention",
                                 _ratio(r, "FlexAttention (compiled)", n), 1.8))
            else:
                target = 1.0 if (dtype != torch.float32 and L >= 1024) else None
                res.append(Check(f"{what}: speed-up {n} vs compiled FlexAttention",
                                 _ratio(r, "FlexAttention (compiled)", n), target))
            res.append(Check(f"{what}: speed-up {n} vs SDPA per group (ideal)", _ratio(r, "SDPA per group (ideal)", n)))
        return res + _gflops_checks(r, backends)

    return Case(f"block-diagonal {_DT[dtype]} B={B} H={H} L={L} D={D} {n_groups} groups {what}", entries,
                "SDPA + bool mask",
                params={"dtype": _DT[dtype], "B": B, "H": H, "L": L, "D": D, "groups": n_groups, "backward": backward,
                        "threads": torch.get_num_threads(), "device": str(dev)},
                repeats=5 if quick else 11, min_repeats=3, max_seconds=10.0 if quick else 90.0, warmup=1 if not quick else 2,
                checks=checks, verify=lambda: _verify(p, backends, lambda: per_group().detach()))


def cases(device: str, quick: bool = False) -> Iterator[Case]:
    dev = torch.device(device)
    backends = ("triton",) if dev.type == "cuda" else ("cpu",)
    dtypes = (torch.float32, torch.float16) if dev.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        for backward in (False, True):
            yield _multitab_case(dev, dtype, backends, quick, backward)
        for backward in (False, True):
            yield _blockdiag_case(dev, dtype, backends, quick, backward)
