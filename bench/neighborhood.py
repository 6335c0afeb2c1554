"""Benchmarks of neighbourhood attention (`pyops.na1d/na2d/na3d`), family ``neighborhood``.

Cases, fp32 on CPU (bf16 on CUDA), heads-last layout [B, *spatial, H, D], forward and
forward+backward (one builder, ``na``):

* 2D, B=2, 56×56, H=4, D=32, k=7, dilation 1 and 4:
    - ``reference`` (the baseline): the gather-based PyTorch definition (`pyops.reference`),
      autograd for the backward;
    - ``pyops <backend>``: the fused kernel (C++ on CPU, Triton on CUDA);
    - ``flex_attention compiled (NA mask)``: `torch.compile(flex_attention)` with a `mask_mod`
      that encodes the same windows (compile time reported separately; skipped if it fails, and
      in the quick run; forward only on CPU, where FlexAttention has no backward);
    - ``natten flex-fna``: NATTEN's own path, when `natten` is installed.
* 1D L=16384, k=129 and 3D 8×32×32, k=(3,7,7), with useful GFLOP/s (2·N·H·K·(D+Dv) per forward;
  2.5× that for forward+backward) against a plain `torch.mm` measured in the same run.

Bytes (the case's minimum traffic): forward q, k, v read and the output written, 4·B·N·H·D
elements; forward+backward 12 (the backward reads q, k, v, out and dout, and writes dq, dk, dv).

Checks: forward against compiled FlexAttention with the NA mask, NATTEN's CPU path and the gather
reference; forward+backward against autograd through the reference; on CUDA, forward and
forward+backward against NATTEN flex-fna.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace
from typing import Optional

import torch

from .harness import (PYOPS, Build, Case, CaseResult, CaseSpec, Check, Entry, Timing, choice_info, mm_entry, nbytes,
                      prepare, randn)

FAMILY = "neighborhood"
OPS = ("na1d", "na2d", "na3d")

# check key -> (name after "<fwd|fwd+bwd> ", the peer pyops is compared with)
_CHECKS = {
    "vs_reference": ("speed-up vs reference", "reference"),
    "vs_reference_autograd": ("speed-up vs reference autograd", "reference"),
    "vs_flex": ("speed-up vs compiled flex_attention", "flex_attention compiled (NA mask)"),
    "vs_natten": ("speed-up vs natten flex-fna", "natten flex-fna"),
}
_FWD = {"cpu": {"vs_reference": 20.0, "vs_flex": 5.0, "vs_natten": 20.0},
        "cuda": {"vs_reference": None, "vs_flex": None, "vs_natten": 1.0}}
_BWD = {"cpu": {"vs_reference_autograd": 10.0}, "cuda": {"vs_reference_autograd": None, "vs_natten": 1.0}}
# 1D and 3D are measured against the reference and torch.mm only.
_FWD_MM = {"cpu": {"vs_reference": 20.0}, "cuda": {"vs_reference": None}}
_BWD_MM = {"cpu": {"vs_reference_autograd": 10.0}, "cuda": {"vs_reference_autograd": None}}

_NA2D_PEERS = ("reference", PYOPS, "flex", "natten")
_MM_PEERS = ("reference", PYOPS, "mm")
_NA2D = dict(B=2, spatial=(56, 56), H=4, D=32, kernel=7)
_NA1D = dict(B=1, spatial=(16384,), H=4, D=32, kernel=129, dilation=1)
_NA1D_QUICK = dict(spatial=(1024,), kernel=33)
_NA3D = dict(B=1, spatial=(8, 32, 32), H=4, D=32, kernel=(3, 7, 7), dilation=1)
_NA3D_QUICK = dict(spatial=(4, 12, 12), kernel=(3, 5, 5))


def _spec(name, op, sizes, quick, backward, peers, targets, quick_s, full_s) -> CaseSpec:
    timing = {"full": Timing(repeats=9, max_seconds=60.0, warmup=1, expect_s=full_s),
              "quick": Timing(repeats=5, min_repeats=2, max_seconds=3.0, warmup=1, expect_s=quick_s),
              "cuda full": Timing(repeats=9, max_seconds=60.0, warmup=2)}
    return CaseSpec(name, op, "na", sizes, quick, backward=backward, backends={"cpu": ("cpu",)}, peers=peers,
                    baseline="reference", targets=targets, timing=timing)


_CPU_CASES = [
    _spec("na2d-d1-fwd", "na2d", {**_NA2D, "dilation": 1}, {"spatial": (24, 24)}, False, _NA2D_PEERS, _FWD, 6, 26),
    _spec("na2d-d1-bwd", "na2d", {**_NA2D, "dilation": 1}, {"spatial": (24, 24)}, True, _NA2D_PEERS, _BWD, 5, 9),
    _spec("na2d-d4-fwd", "na2d", {**_NA2D, "dilation": 4}, {"spatial": (24, 24), "dilation": 2}, False,
          _NA2D_PEERS, _FWD, 5, 24),
    _spec("na2d-d4-bwd", "na2d", {**_NA2D, "dilation": 4}, {"spatial": (24, 24), "dilation": 2}, True,
          _NA2D_PEERS, _BWD, 5, 9),
    _spec("na1d-fwd", "na1d", _NA1D, _NA1D_QUICK, False, _MM_PEERS, _FWD_MM, 4, 19),
    _spec("na3d-fwd", "na3d", _NA3D, _NA3D_QUICK, False, _MM_PEERS, _FWD_MM, 4, 12),
    _spec("na1d-bwd", "na1d", _NA1D, _NA1D_QUICK, True, _MM_PEERS, _BWD_MM, 6, 61),
    _spec("na3d-bwd", "na3d", _NA3D, _NA3D_QUICK, True, _MM_PEERS, _BWD_MM, 6, 34),
]
# The same cases in bf16 on CUDA (the Triton kernels).
CASES = _CPU_CASES + [replace(s, name=f"{s.name}-bf16", dtype="bf16", backends={"cuda": ("triton",)})
                      for s in _CPU_CASES]


def build(spec: CaseSpec, device, *, full: bool = False, workdir: Optional[str] = None) -> Case:
    """The `Case` of `spec` on `device` (quick size unless `full`)."""
    b = prepare(spec, device, full, workdir)
    return {"na": _na_case}[spec.kind](b)


def _fn(n):
    import pyops
    return (pyops.na1d, pyops.na2d, pyops.na3d)[n - 1]


def _useful_flops(B, spatial, H, D, Dv, kernel):
    return 2 * B * math.prod(spatial) * H * math.prod(kernel) * (D + Dv)


def _flex_mask_mod(spatial, kernel, dilation, device):
    """A FlexAttention mask_mod for the NA windows (non-causal, stride 1), from the window tables."""
    from pyops.neighborhood.reference import window_indices

    n = len(spatial)
    lo, hi = [], []
    for S, k, d in zip(spatial, kernel, dilation):
        idx, _, _ = window_indices(S, k, 1, d, False, device)
        lo.append(idx[:, 0].contiguous())
        hi.append(idx[:, -1].contiguous())
    dil = list(dilation)
    sizes = list(spatial)

    def coords(flat):
        out = []
        for S in reversed(sizes):
            out.append(flat % S)
            flat = flat // S
        return out[::-1]

    def mask_mod(b, h, q_idx, kv_idx):
        qc, kc = coords(q_idx), coords(kv_idx)
        ok = None
        for a in range(n):
            # the window is every d-th position from lo to hi (same group as the query)
            t = (kc[a] >= lo[a][qc[a]]) & (kc[a] <= hi[a][qc[a]]) & ((kc[a] - qc[a]) % dil[a] == 0)
            ok = t if ok is None else ok & t
        return ok
    return mask_mod


def _unavailable(msg):
    import pyops
    return pyops.BackendUnavailableError(msg)


def _na_case(b: Build) -> Case:
    s, dev, dtype, backward, tag = b.sizes, b.device, b.dtype, b.spec.backward, b.tag
    spatial, B, H, D = tuple(s["spatial"]), s["B"], s["H"], s["D"]
    n = len(spatial)
    fn = _fn(n)
    kernel = tuple(s["kernel"]) if isinstance(s["kernel"], (tuple, list)) else (s["kernel"],) * n
    dilation = tuple(s["dilation"]) if isinstance(s["dilation"], (tuple, list)) else (s["dilation"],) * n
    gen = b.generator(0)
    shp = (B, *spatial, H, D)
    q, k, v = (randn(shp, dtype, dev, gen) for _ in range(3))
    dout = randn(shp, dtype, dev, gen)
    flops = _useful_flops(B, spatial, H, D, D, kernel) * (5 if backward else 2) // 2
    kw = dict(dilation=dilation)

    def call(f, **extra):
        if not backward:
            return lambda: f(q, k, v, kernel, **kw, **extra)
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

        def run():
            out = f(qg, kg, vg, kernel, **kw, **extra)
            qg.grad = kg.grad = vg.grad = None
            out.backward(dout)
        return run

    compile_s: dict = {}

    def flex() -> list:
        # compiled FlexAttention with an NA mask_mod ([B, H, N, D] layout); no backward on CPU
        if backward and b.cpu:
            return []
        if not b.full:
            return [Entry("flex_attention compiled (NA mask)", None, group="peer",
                          skip="quick mode: left out (its compile alone takes tens of seconds)")]
        state = {}

        def flex_setup():
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                N = math.prod(spatial)
                mm = _flex_mask_mod(spatial, kernel, dilation, dev)
                t0 = time.perf_counter()
                bm = create_block_mask(mm, None, None, N, N, device=str(dev))
                cf = torch.compile(flex_attention, fullgraph=True)
                qf, kf, vf = (t.reshape(B, N, H, D).transpose(1, 2).contiguous() for t in (q, k, v))
                if backward:
                    qf, kf, vf = (t.requires_grad_(True) for t in (qf, kf, vf))
                    do = dout.reshape(B, N, H, D).transpose(1, 2)
                    state["fn"] = lambda: cf(qf, kf, vf, block_mask=bm).backward(do)
                else:
                    state["fn"] = lambda: cf(qf, kf, vf, block_mask=bm)
                state["fn"]()
                compile_s["flex"] = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run is skipped, not an error
                raise _unavailable(f"compiled flex_attention failed: {type(exc).__name__}: {str(exc)[:200]}")

        return [Entry("flex_attention compiled (NA mask)", lambda: state["fn"](), setup=flex_setup,
                      flops=flops, group="peer",
                      note="torch.compile(flex_attention) with an NA mask_mod; compile time in info",
                      info=lambda: {"compile_and_first_call_s": compile_s.get("flex")})]

    def natten_entry() -> Entry:
        try:
            import natten
        except Exception as exc:  # noqa: BLE001
            return Entry("natten flex-fna", None, skip=f"natten is not installed ({type(exc).__name__})", group="peer")
        if backward and b.cpu:
            return Entry("natten flex-fna", None, skip="NATTEN has no backward on CPU", group="peer")
        nf = getattr(natten, f"na{n}d")
        extra = {}
        if not b.cpu:   # NATTEN's flex path compiled, as NATTEN recommends on GPU
            natten.allow_flex_compile(True, backprop=True)
            extra = {"torch_compile": True}

        def f(q_, k_, v_, kernel_, **kw_):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return nf(q_, k_, v_, kernel_size=kernel_, backend="flex-fna", **kw_, **extra)
        return Entry("natten flex-fna", call(f), flops=flops, group="peer",
                     note=f"natten {natten.__version__} na{n}d(..., backend='flex-fna')")

    entries = b.entries({
        "reference": lambda: Entry("reference", call(fn, backend="reference"), flops=flops, group="peer",
                                   note=f"gather-based PyTorch reference ({tag}, autograd)"),
        PYOPS: lambda: [Entry(f"pyops {x}", call(fn, backend=x), flops=flops, group="pyops",
                              note=f"pyops.na{n}d(..., backend={x!r}) {tag}", info=choice_info(f"na{n}d"))
                        for x in b.backends],
        "flex": flex,
        "natten": natten_entry,
        "mm": lambda: mm_entry("torch.mm 1024³", dev, dtype,
                               note="plain torch.mm, the machine's GFLOP/s yardstick in this run"),
    })

    def checks(r: CaseResult) -> list:
        out = []
        for x in b.backends:
            p = r.ok(f"pyops {x}")
            if p is None:
                e = r.get(f"pyops {x}")
                out.append(Check(f"pyops {x}", None, note=f"did not run: {e.reason if e else '?'}"))
                continue
            for key, target in b.targets.items():
                label, peer = _CHECKS[key]
                e = r.ok(peer)
                out.append(Check(f"{tag} {label}", e.median_s / p.median_s if e else None, target, ">=", "x"))
            mm = r.ok("torch.mm 1024³")
            if mm:
                out.append(Check(f"pyops {x} useful GFLOP/s / torch.mm GFLOP/s", p.gflops / mm.gflops, None, ">=",
                                 "x", note=f"{p.gflops:.1f} vs {mm.gflops:.1f} GFLOP/s"))
        if "flex" in compile_s:
            out.append(Check("flex_attention compile + first call", compile_s["flex"], None, "<=", " s"))
        return out

    def verify():
        with torch.no_grad():
            got = fn(q, k, v, kernel, **kw, backend=b.backends[0])
            exp = fn(q, k, v, kernel, **kw, backend="reference")
        from pyops.testing import compare, tolerance_for
        c = compare(got, exp, tolerance_for(dtype))
        return {"max_abs": c.max_abs, "ok": c.ok}

    name = (f"na{n}d {tag} {'x'.join(map(str, spatial))} k={'x'.join(map(str, kernel))} "
            f"d={'x'.join(map(str, dilation))} B={B} H={H} D={D} {b.spec.dtype}")
    params = dict(B=B, spatial=list(spatial), H=H, D=D, kernel=kernel, dilation=dilation, dtype=b.spec.dtype,
                  backward=backward, useful_flops=flops)
    op_bytes = (12 if backward else 4) * nbytes(math.prod(shp), dtype)
    return b.case(name, entries, "reference", params, checks, verify, bytes=op_bytes, flops=flops)
