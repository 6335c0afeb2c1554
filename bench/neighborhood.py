"""Benchmark of neighbourhood attention (`pyops.na1d/na2d/na3d`), family ``neighborhood``.

Cases (issue 5), fp32 on CPU (fp16/bf16 on CUDA), heads-last layout [B, *spatial, H, D]:

* 2D, B=2, 56×56, H=4, D=32, k=7, dilation 1 and 4 — forward, and forward+backward:
    - ``reference`` (the baseline): the gather-based PyTorch definition (`pyops.reference`),
      autograd for the backward;
    - ``pyops <backend>``: the fused kernel (C++ on CPU, Triton on CUDA);
    - ``flex_attention compiled (NA mask)``: `torch.compile(flex_attention)` with a `mask_mod`
      that encodes the same windows (compile time reported separately; skipped if it fails;
      forward only on CPU, where FlexAttention has no backward);
    - ``natten flex-fna``: NATTEN's own path, when `natten` is installed.
* 1D L=16384, k=129 and 3D 8×32×32, k=(3,7,7) — forward and forward+backward, with useful
  GFLOP/s (2·N·H·K·(D+Dv) per forward; 2.5× that for forward+backward) against a plain
  `torch.mm` measured in the same run.

Checks (targets from the issue, CPU): forward ≥ 5× compiled FlexAttention with the NA mask,
≥ 20× NATTEN's CPU path, ≥ 20× the gather reference; forward+backward ≥ 10× autograd through the
reference. On CUDA: forward and forward+backward ≥ NATTEN flex-fna (≥ 1×).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Iterator, Optional

import torch

from .harness import Case, CaseResult, Check, Entry

FAMILY = "neighborhood"
OPS = ("na1d", "na2d", "na3d")

_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


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


def _make_case(dev, dtype, n, B, spatial, H, D, kernel, dilation, backward, quick, mm_peer, peers=True) -> Case:
    import pyops
    fn = _fn(n)
    kernel = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel,) * n
    dilation = tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation,) * n
    gen = torch.Generator(device=dev).manual_seed(0)
    shp = (B, *spatial, H, D)
    q, k, v = (torch.randn(shp, generator=gen, device=dev, dtype=torch.float32).to(dtype) for _ in range(3))
    dout = torch.randn(shp, generator=gen, device=dev, dtype=torch.float32).to(dtype)
    flops = _useful_flops(B, spatial, H, D, D, kernel) * (5 if backward else 2) // 2
    backends = ("triton",) if dev.type == "cuda" else ("cpu",)
    tag = "fwd+bwd" if backward else "fwd"
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

    entries = [Entry("reference", call(fn, backend="reference"),
                     flops=flops, group="peer", note=f"gather-based PyTorch reference ({tag}, autograd)")]
    for b in backends:
        def info(b=b):
            ch = pyops.last_choice(f"na{n}d")
            return {"backend_ran": ch.backend if ch else None}
        entries.append(Entry(f"pyops {b}", call(fn, backend=b), flops=flops, group="pyops",
                             note=f"pyops.na{n}d(..., backend={b!r}) {tag}", info=info))

    compile_s = {}
    if peers and not (backward and dev.type == "cpu"):
        # compiled FlexAttention with an NA mask_mod ([B, H, N, D] layout)
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

        entries.append(Entry("flex_attention compiled (NA mask)", lambda: state["fn"](), setup=flex_setup,
                             flops=flops, group="peer",
                             note="torch.compile(flex_attention) with an NA mask_mod; compile time in info",
                             info=lambda: {"compile_and_first_call_s": compile_s.get("flex")}))
    if peers:
        try:
            import natten  # noqa: F401
            have_natten = None
        except Exception as exc:  # noqa: BLE001
            have_natten = f"natten is not installed ({type(exc).__name__})"
        nat = None
        if have_natten is None and not (backward and dev.type == "cpu"):
            import natten

            def nat_call(f_unused=None):
                nf = getattr(natten, f"na{n}d")
                extra = {}
                if dev.type == "cuda":   # NATTEN's flex path compiled, as NATTEN recommends on GPU
                    natten.allow_flex_compile(True, backprop=True)
                    extra = {"torch_compile": True}

                def f(q_, k_, v_, kernel_, **kw_):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return nf(q_, k_, v_, kernel_size=kernel_, backend="flex-fna", **kw_, **extra)
                return call(f)
            nat = Entry("natten flex-fna", nat_call(), flops=flops, group="peer",
                        note=f"natten {natten.__version__} na{n}d(..., backend='flex-fna')")
        elif have_natten is not None:
            nat = Entry("natten flex-fna", None, skip=have_natten, group="peer")
        else:
            nat = Entry("natten flex-fna", None, skip="NATTEN has no backward on CPU", group="peer")
        entries.append(nat)
    if mm_peer:
        m = 1024
        a = torch.randn(m, m, device=dev, dtype=dtype)
        bmat = torch.randn(m, m, device=dev, dtype=dtype)
        entries.append(Entry("torch.mm 1024³", lambda: torch.mm(a, bmat), flops=2 * m ** 3, group="reference",
                             note="plain torch.mm, the machine's GFLOP/s yardstick in this run"))

    def checks(r: CaseResult) -> list[Check]:
        out = []
        cpu = dev.type == "cpu"
        for b in backends:
            p = r.ok(f"pyops {b}")
            if p is None:
                e = r.get(f"pyops {b}")
                out.append(Check(f"pyops {b}", None, note=f"did not run: {e.reason if e else '?'}"))
                continue

            def ratio(name):
                e = r.ok(name)
                return e.median_s / p.median_s if e else None

            def has(name):
                return r.get(name) is not None
            if backward:
                out.append(Check(f"{tag} speed-up vs reference autograd", ratio("reference"), 10.0 if cpu else None, ">=", "x"))
                if not cpu and has("natten flex-fna"):
                    out.append(Check(f"{tag} speed-up vs natten flex-fna", ratio("natten flex-fna"), 1.0, ">=", "x"))
            else:
                out.append(Check(f"{tag} speed-up vs reference", ratio("reference"), 20.0 if cpu else None, ">=", "x"))
                if has("flex_attention compiled (NA mask)"):
                    out.append(Check(f"{tag} speed-up vs compiled flex_attention", ratio("flex_attention compiled (NA mask)"),
                                     5.0 if cpu else None, ">=", "x"))
                if has("natten flex-fna"):
                    out.append(Check(f"{tag} speed-up vs natten flex-fna", ratio("natten flex-fna"), 20.0 if cpu else 1.0, ">=", "x"))
            mm = r.ok("torch.mm 1024³")
            if mm:
                out.append(Check(f"pyops {b} useful GFLOP/s / torch.mm GFLOP/s", p.gflops / mm.gflops, None, ">=", "x",
                                 note=f"{p.gflops:.1f} vs {mm.gflops:.1f} GFLOP/s"))
        if "flex" in compile_s:
            out.append(Check("flex_attention compile + first call", compile_s["flex"], None, "<=", " s"))
        return out

    def verify():
        with torch.no_grad():
            got = fn(q, k, v, kernel, **kw, backend=backends[0])
            exp = fn(q, k, v, kernel, **kw, backend="reference")
        from pyops.testing import compare, tolerance_for
        c = compare(got, exp, tolerance_for(dtype))
        return {"max_abs": c.max_abs, "ok": c.ok}

    name = f"na{n}d {tag} {'x'.join(map(str, spatial))} k={'x'.join(map(str, kernel))} d={'x'.join(map(str, dilation))} B={B} H={H} D={D} {_DT[dtype]}"
    params = dict(B=B, spatial=list(spatial), H=H, D=D, kernel=kernel, dilation=dilation, dtype=_DT[dtype],
                  backward=backward, useful_flops=flops)
    return Case(name, entries, baseline="reference", params=params, checks=checks, verify=verify,
                repeats=5 if quick else 9, min_repeats=2 if quick else 3, max_seconds=10.0 if quick else 60.0,
                warmup=1 if (quick or dev.type == "cpu") else 2)


def cases(device: str, quick: bool = False) -> Iterator[Case]:
    dev = torch.device(device)
    dtypes = (torch.float32,) if dev.type == "cpu" else (torch.bfloat16,)
    side = 24 if quick else 56
    for dtype in dtypes:
        for dil in (1, 4) if not quick else (1, 2):
            for backward in (False, True):
                yield _make_case(dev, dtype, 2, 2, (side, side), 4, 32, 7, dil, backward, quick, mm_peer=False)
    L, k1 = (1024, 33) if quick else (16384, 129)
    sp3, k3 = ((4, 12, 12), (3, 5, 5)) if quick else ((8, 32, 32), (3, 7, 7))
    for dtype in dtypes[:1]:
        for backward in (False, True):
            yield _make_case(dev, dtype, 1, 1, (L,), 4, 32, k1, 1, backward, quick, mm_peer=True, peers=False)
            yield _make_case(dev, dtype, 3, 1, sp3, 4, 32, k3, 1, backward, quick, mm_peer=True, peers=False)
