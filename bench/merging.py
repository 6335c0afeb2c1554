"""Benchmarks of the merging family: `pyops.task_arithmetic`, `pyops.merge` and the checkpoint
command `python -m pyops merge`.

Task arithmetic (builder ``task_arithmetic``), N = 3 task vectors::

    θ = base + Σᵢ cᵢ · τᵢ        one coefficient per task (or per row: ``blocks="rows"``)

The operation is memory-bound: it reads N + 1 tensors and writes one, so its yardstick is the
machine's copy bandwidth, measured in the same process. Entries:

* ``copy_``: ``out.copy_(base)`` into a preallocated tensor; bytes = 2 × tensor bytes (on CUDA a
  device-to-device copy).
* ``pyops <backend> out=``: the fused kernel writing into a preallocated output;
  bytes = (N + 1) reads + 1 write.
* ``pyops <backend>``: the same with a new output each call (same bytes). On CPU a new large
  tensor is fresh pages from the kernel, so this entry pays the page faults of the first write —
  reported as measured.
* ``torch expression`` (the baseline): what a user writes, ``base + c0*d0 + c1*d1 + c2*d2``
  (one temporary per product and per sum).
* ``torch in-place``: the careful user's version, ``out.copy_(base); out.add_(d0, alpha=c0); ...``
  into a preallocated output (N + 1 passes over memory instead of one).

The peers get the same bytes as pyops (the minimum traffic of the operation), so their GB/s are
effective bandwidths, comparable across entries; the useful FLOPs are 2·N per element (one
multiply-add per task). Checks: pyops(out=) GB/s against copy_ GB/s, speed-up against the torch
expression, and peak memory (pyops needs no temporary beyond its output; out=: nothing), where
the expression needs several.

Merge methods (builder ``method``): TIES, DARE, DARE-TIES, breadcrumbs, DELLA; N = 3 task vectors,
per-tensor weights, density 0.3, one block = the whole tensor (rows of 4096 in one CUDA case).
Entries: ``copy_`` (the bandwidth yardstick), ``pyops <backend> out=`` (bytes = (N + 1) reads +
1 write, the minimum traffic; TIES' selection passes are extra reads it pays for), and
``mergekit-style torch`` (the baseline): the same math the way mergekit 0.1.5 and most merging
code write it — per tensor, `torch.topk` over |τ| (TIES) or `torch.bernoulli` masks (DARE), sign
election with full-size temporaries, then the disjoint mean.

Whole checkpoints (builder ``checkpoint``): `python -m pyops merge CONFIG` against `mergekit-yaml`
on the same YAML, on synthetic Llama-shaped checkpoints (mergekit needs a known architecture to
enumerate the tensors) written into the run's temporary directory. Each side runs in a fresh
process; its peak RSS is the child's ``ru_maxrss``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import torch

from .harness import (DTYPE_NAMES, M, PYOPS, Build, Case, CaseResult, CaseSpec, Check, Entry, Timing,
                      choice_info, fmt_count, last_level_cache_bytes, nbytes, not_run, peak_mib, prepare, uniform,
                      verify_backends)

FAMILY = "merging"
OPS = ("task_arithmetic", "task_arithmetic_from_models", "merge", "merge_from_models")

COEFFS = (0.5, 0.3, -0.2)          # task arithmetic: N = 3 task vectors
WEIGHTS = (0.5, 0.3, 0.7)          # merge methods
DENSITY = 0.3
GAMMA, EPSILON = 0.01, 0.1         # breadcrumbs' dropped top fraction, DELLA's keep-probability spread

# A Llama-shaped checkpoint of ~1.08 GB fp32 (270M parameters), and a small one (~22 MB) for the
# quick run, large enough that the merge itself shows next to the process start.
LLAMA = dict(vocab=32000, hidden=1024, intermediate=2816, layers=16, heads=16)
LLAMA_QUICK = dict(vocab=4096, hidden=256, intermediate=704, layers=4, heads=4)

_BOTH = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
_TA_PEERS = ("copy", PYOPS, "expression", "inplace")
_TA_TARGETS = {"cpu": {"bandwidth": 0.7, "speedup": 3.0}, "cuda": {"bandwidth": 0.8, "speedup": None}}
_TA_QUICK = Timing(repeats=5, max_seconds=3.0, expect_s=4.0)
_TA_BIG = {"full": Timing(repeats=15, max_seconds=40.0, warmup=1, expect_s=16.0), "quick": _TA_QUICK,
           "cuda full": Timing(repeats=40, max_seconds=20.0), "cuda quick": Timing(repeats=10, max_seconds=20.0)}
_TA_HALF = {"full": Timing(repeats=11, max_seconds=20.0, expect_s=4.0), "quick": _TA_QUICK,
            "cuda full": Timing(repeats=40, max_seconds=10.0), "cuda quick": Timing(repeats=10, max_seconds=10.0)}
_MERGE_PEERS = ("copy", PYOPS, "mergekit")
_MERGE_TARGETS = {"cpu": {"speedup": 10.0}, "cuda": {"speedup": None}}
_RANKED_TARGETS = {"cpu": {"speedup": None}, "cuda": {"speedup": None}}   # no target: the ratio is reported


def _merge_timing(full_s: float, quick_s: float) -> dict:
    return {"full": Timing(repeats=3, max_seconds=120.0, warmup=1, expect_s=full_s),
            "quick": Timing(repeats=3, min_repeats=2, max_seconds=4.0, warmup=1, expect_s=quick_s)}


def _ckpt_timing(full_s: float, quick_s: Optional[float]) -> dict:
    one = dict(repeats=1, min_repeats=1, warmup=1, max_seconds=600.0, min_sample_s=0.0)
    return {"full": Timing(**one, expect_s=full_s), "quick": Timing(**one, expect_s=quick_s)}


def _ta(name, dtype, shape, quick_shape, timing, blocks=None) -> CaseSpec:
    return CaseSpec(name, "task_arithmetic", "task_arithmetic", {"shape": shape, "blocks": blocks},
                    {"shape": quick_shape}, dtype=dtype, backends=_BOTH, peers=_TA_PEERS, baseline="expression",
                    targets=_TA_TARGETS, timing=timing)


def _method(method, numel, quick_numel, targets, timing, blocks=None, backends=_BOTH, name=None) -> CaseSpec:
    return CaseSpec(name or method, "merge", "method", {"method": method, "numel": numel, "blocks": blocks},
                    {"numel": quick_numel}, backends=backends, peers=_MERGE_PEERS, baseline="mergekit",
                    targets=targets, timing=timing)


def _ckpt(method, params, speedup, timing, quick=True, *, n=3, weights=True, base=True, top=None,
          layout=None) -> CaseSpec:
    """A whole-model merge case: `n` fine-tuned models (with the base as base_model when `base`),
    per-model `params` (and `weight` from WEIGHTS when `weights`), top-level parameters `top`.
    `layout` "slices": a passthrough frankenmerge (see _slices_yaml); "lora": the models with a
    PEFT LoRA adapter each (model+adapter, see write_lora_adapter)."""
    return CaseSpec(f"checkpoint-{layout or method}", "merge_from_models", "checkpoint",
                    {"method": method, "params": params, "model": LLAMA, "n": n, "weights": weights, "base": base,
                     "top": top or {}, "layout": layout},
                    {"model": LLAMA_QUICK} if quick else None, peers=("pyops_cli", "mergekit_yaml"),
                    baseline="mergekit_yaml", targets={"cpu": {"speedup": speedup, "peak_rss_ratio": 0.25}},
                    timing=timing, also=("task_arithmetic_from_models",) if method == "task_arithmetic" else ())


CASES = [
    _ta("ta-fp32", "fp32", (64 * M,), (M,), _TA_BIG),
    _ta("ta-fp16", "fp16", (16 * M,), (M,), _TA_HALF),
    _ta("ta-bf16", "bf16", (16 * M,), (M,), _TA_HALF),
    _ta("ta-fp32-rows", "fp32", (4096, 4096), (256, 4096), _TA_HALF, blocks="rows"),
    _method("ties", 64 * M, M, _MERGE_TARGETS, _merge_timing(172.0, 8.0)),
    _method("dare_ties", 64 * M, M, _MERGE_TARGETS, _merge_timing(65.0, 4.0)),
    _method("dare", 64 * M, M, _MERGE_TARGETS, _merge_timing(24.0, 3.0)),
    # TIES trimmed per row of 4096: the one-CTA-per-block selection of the GPU kernels (the peer
    # still trims whole tensors).
    _method("ties", 64 * M, 4 * M, _MERGE_TARGETS, _merge_timing(120.0, 30.0), blocks=4096,
            backends={"cuda": _BOTH["cuda"]}, name="ties-rows4096"),
    # The rank-based methods sort every block: a quarter of the size keeps the argsort peer's run
    # time in bounds.
    _method("breadcrumbs", 16 * M, M // 4, _RANKED_TARGETS, _merge_timing(64.0, 8.0)),
    _method("della", 16 * M, M // 4, _RANKED_TARGETS, _merge_timing(65.0, 6.0)),
    _ckpt("task_arithmetic", {}, 5.0, _ckpt_timing(60.0, 5.0)),
    _ckpt("ties", {"density": DENSITY}, 10.0, _ckpt_timing(360.0, None), quick=False),
    _ckpt("dare_ties", {"density": DENSITY}, 10.0, _ckpt_timing(120.0, None), quick=False),
    # mergekit 0.1.5's other methods (issue 16: 5x, per-element methods 10x; full size only, where
    # the merge outweighs the process start)
    _ckpt("linear", {}, 10.0, _ckpt_timing(60.0, None), quick=False, base=False),
    _ckpt("slerp", {}, 5.0, _ckpt_timing(60.0, 5.0), n=1, weights=False, top={"t": 0.4}),
    _ckpt("nearswap", {}, 10.0, _ckpt_timing(60.0, None), quick=False, n=1, weights=False, top={"t": 0.001}),
    _ckpt("nuslerp", {}, 5.0, _ckpt_timing(60.0, None), quick=False, n=2),
    _ckpt("multislerp", {}, 5.0, _ckpt_timing(60.0, None), quick=False),
    _ckpt("karcher", {}, 5.0, _ckpt_timing(120.0, None), quick=False, weights=False, base=False),
    _ckpt("breadcrumbs_ties", {"density": DENSITY, "gamma": GAMMA}, 5.0, _ckpt_timing(300.0, None), quick=False),
    _ckpt("ram", {}, 10.0, _ckpt_timing(60.0, None), quick=False, weights=False),
    _ckpt("sce", {}, 5.0, _ckpt_timing(120.0, None), quick=False, weights=False, top={"select_topk": 0.5}),
    _ckpt("arcee_fusion", {}, 5.0, _ckpt_timing(120.0, None), quick=False, n=1, weights=False),
    # issue 16: a slices frankenmerge and a LoRA merge, 3x mergekit
    _ckpt("passthrough", {}, 3.0, _ckpt_timing(60.0, None), quick=False, layout="slices"),
    _ckpt("linear", {}, 3.0, _ckpt_timing(240.0, None), quick=False, base=False, layout="lora"),
]

LORA_RANK = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(spec: CaseSpec, device, *, full: bool = False, workdir: Optional[str] = None) -> Case:
    """The `Case` of `spec` on `device` (quick size unless `full`). Checkpoint cases write their
    models into `workdir` (shared by the cases of a run), or into a temporary directory of their
    own that `Case.release()` removes."""
    b = prepare(spec, device, full, workdir)
    return {"task_arithmetic": _task_arithmetic, "method": _method_case, "checkpoint": _checkpoint}[spec.kind](b)


def disk_bytes(specs, full: bool) -> int:
    """Peak disk use of the checkpoint cases among `specs`: the four models, plus the two outputs
    of one case (each case removes its outputs when it is done)."""
    models = {json.dumps(s.sizes_for(full)["model"], sort_keys=True) for s in specs if s.kind == "checkpoint"}
    per_model = max((4 * sum(math.prod(v) for v in _llama_tensors(json.loads(m)).values()) for m in models),
                    default=0)
    return (4 + 2) * per_model if models else 0


# --------------------------------------------------------------------------------------------
# Task arithmetic
# --------------------------------------------------------------------------------------------

def _task_arithmetic(b: Build) -> Case:
    import pyops

    dev, dtype, blocks = b.device, b.dtype, b.sizes["blocks"]
    shape = tuple(b.sizes["shape"])
    n_tasks, numel = len(COEFFS), math.prod(shape)
    tensor_bytes = nbytes(numel, dtype)
    gen = b.generator(1234)
    base = uniform(shape, dtype, dev, gen)
    deltas = [uniform(shape, dtype, dev, gen) for _ in range(n_tasks)]
    out = torch.zeros(shape, dtype=dtype, device=dev)   # shared by the preallocated-output entries
    d0, d1, d2 = deltas
    if blocks is None:
        coeffs = torch.tensor(COEFFS, dtype=torch.float32, device=dev)
        k0, k1, k2 = COEFFS
        coeff_desc = "per tensor [N]"
        expr_src = "base + c0*d0 + c1*d1 + c2*d2"
        inplace_src = "out.copy_(base); out.add_(d_i, alpha=c_i) for each task"

        def inplace():
            out.copy_(base)
            out.add_(d0, alpha=k0)
            out.add_(d1, alpha=k1)
            out.add_(d2, alpha=k2)
    else:
        rows = shape[0]
        scale = 1.0 + 0.5 * torch.linspace(-1.0, 1.0, rows, device=dev)
        coeffs = torch.stack([c * scale for c in COEFFS]).to(torch.float32)   # [N, rows]
        # The columns a user would broadcast, in the tensors' dtype (fp32 columns would promote
        # a half-precision expression to fp32).
        k0, k1, k2 = (coeffs[i].to(dtype).unsqueeze(1) for i in range(n_tasks))
        coeff_desc = f"per row [N, {rows}]"
        expr_src = "base + k0*d0 + k1*d1 + k2*d2 with k_i = coeffs[i, :, None]"
        inplace_src = "out.copy_(base); out.addcmul_(d_i, k_i) for each task"

        def inplace():
            out.copy_(base)
            out.addcmul_(d0, k0)
            out.addcmul_(d1, k1)
            out.addcmul_(d2, k2)

    def expr():
        return base + k0 * d0 + k1 * d1 + k2 * d2

    op_bytes = (n_tasks + 2) * tensor_bytes      # N + 1 reads, one write
    copy_name = "copy_" if b.cpu else "copy_ (device to device)"

    def pyops_entry(backend: str, preallocated: bool) -> Entry:
        kw = dict(blocks=blocks, backend=backend, **({"out": out} if preallocated else {}))
        note = (f"pyops.task_arithmetic(base, deltas, coeffs, blocks={blocks!r}, out=out, backend={backend!r})"
                if preallocated else
                f"pyops.task_arithmetic(base, deltas, coeffs, blocks={blocks!r}, backend={backend!r}): "
                "a new output each call" + (" (fresh pages: page-fault bound on Linux)" if b.cpu else ""))
        return Entry(f"pyops {backend}" + (" out=" if preallocated else ""),
                     lambda: pyops.task_arithmetic(base, deltas, coeffs, **kw), bytes=op_bytes, group="pyops",
                     note=note, info=choice_info("task_arithmetic"))

    entries = b.entries({
        "copy": lambda: Entry(copy_name, lambda: out.copy_(base), bytes=2 * tensor_bytes, group="reference",
                              note="out.copy_(base) into a preallocated tensor; bytes = 1 read + 1 write "
                                   "(bandwidth reference)"),
        PYOPS: lambda: [pyops_entry(x, True) for x in b.backends] + [pyops_entry(x, False) for x in b.backends],
        "expression": lambda: Entry("torch expression", expr, bytes=op_bytes, group="peer",
                                    note=f"plain PyTorch, what a user writes: {expr_src}"),
        "inplace": lambda: Entry("torch in-place", inplace, bytes=op_bytes, group="peer",
                                 note=f"in-place PyTorch into a preallocated output: {inplace_src}"),
    })

    out_mib = tensor_bytes / M
    # A copy whose two tensors fit in the last-level cache runs (partly) from the cache, the
    # fused op's N + 2 tensors may not: say so next to the ratio.
    llc = last_level_cache_bytes() if b.cpu else None
    cache_note = ""
    if llc and 2 * tensor_bytes <= llc:
        cache_note = (f"; copy_ working set {2 * tensor_bytes / M:.0f} MiB fits in the {llc / M:.0f} MiB "
                      f"last-level cache (op: {op_bytes / M:.0f} MiB), so the copy reference may run from cache")
    slack_mib = max(4.0, 0.02 * out_mib)

    def checks(r: CaseResult) -> list:
        copy, plain, smart = r.ok(copy_name), r.ok("torch expression"), r.ok("torch in-place")
        mem_kind = "peak RSS" if b.cpu else "peak device memory"
        others = (f"torch expression {_mib(peak_mib(plain, dev))} MiB, torch in-place "
                  f"{_mib(peak_mib(smart, dev))} MiB, output {out_mib:.0f} MiB")
        res: list = []
        for x in b.backends:
            o, f = r.ok(f"pyops {x} out="), r.ok(f"pyops {x}")
            if o is None and f is None:
                res.append(Check(f"pyops {x}", None, note="did not run: " + not_run(r, f"pyops {x} out=")))
                continue
            bw = o.gbps / copy.gbps if (o and copy and o.gbps and copy.gbps) else None
            res.append(Check(f"pyops {x} out= GB/s / {copy_name} GB/s", bw, b.target("bandwidth"), ">=", "x",
                             note=f"{_g(o and o.gbps)} vs {_g(copy and copy.gbps)} GB/s" + cache_note))
            res.append(Check(f"speed-up pyops {x} out= vs torch expression", o and o.speedup,
                             b.target("speedup"), ">=", "x"))
            res.append(Check(f"speed-up pyops {x} (new output) vs torch expression", f and f.speedup,
                             b.target("speedup"), ">=", "x"))
            if o and smart:
                res.append(Check(f"speed-up pyops {x} out= vs torch in-place", smart.median_s / o.median_s,
                                 None, ">=", "x"))
            res.append(Check(f"{mem_kind} pyops {x} out= (extra)", peak_mib(o, dev), slack_mib, "<=", " MiB",
                             note="no temporary: " + others))
            res.append(Check(f"{mem_kind} pyops {x} (new output)", peak_mib(f, dev), out_mib + slack_mib, "<=",
                             " MiB", note="the output only"))
        return res

    def verify() -> dict:
        # The tolerance rule of pyops.testing (|got - ref| <= atol*max(1, max|ref|) + rtol*|ref|),
        # evaluated in fp32 in a few passes: pyops.testing.compare works in fp64 and would cost
        # more than the timing itself at these sizes.
        from pyops.testing import TOLERANCES
        tol = TOLERANCES[dtype]
        ref = base.to(torch.float32, copy=True)
        for i, d in enumerate(deltas):
            if blocks is None:
                ref.add_(d.to(torch.float32), alpha=COEFFS[i])
            else:
                ref.addcmul_(d.to(torch.float32), coeffs[i].unsqueeze(1))
        bound = ref.abs().mul_(tol.rtol).add_(tol.atol * max(1.0, float(ref.abs().max())))

        def err(got: torch.Tensor) -> tuple:
            e = got.to(torch.float32).sub_(ref).abs_() if got.dtype != torch.float32 else (got - ref).abs_()
            return float(e.max()), bool((e <= bound).all())

        def figures(x: str) -> tuple:
            m, ok = err(pyops.task_arithmetic(base, deltas, coeffs, blocks=blocks, out=out, backend=x))
            return {f"pyops_{x}_max_abs": m, f"pyops_{x}_ok": ok}, ok

        res = verify_backends(b.backends, figures, tolerance=f"atol={tol.atol:g} rtol={tol.rtol:g} (pyops.testing)")
        res["torch_expression_max_abs"] = err(expr())[0]
        return res

    params = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "numel": numel, "n_tasks": n_tasks,
              "coeffs": coeff_desc, "blocks": blocks, "device": str(dev),
              "tensor_mib": out_mib, "op_bytes": op_bytes, "threads": torch.get_num_threads()}
    name = (f"{DTYPE_NAMES[dtype]} {'x'.join(fmt_count(s) if len(shape) == 1 else str(s) for s in shape)}"
            f" N={n_tasks} {'rows' if blocks == 'rows' else 'per-tensor'}")
    return b.case(name, entries, "torch expression", params, checks, verify, flops=2 * n_tasks * numel)


def _mib(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _g(x: Optional[float]) -> str:
    return "n/a" if not x else f"{x:.2f}"


# --------------------------------------------------------------------------------------------
# Merge methods
# --------------------------------------------------------------------------------------------

def _ascending_ranks(mag: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(mag, dtype=torch.int64)
    ranks[torch.argsort(mag, stable=True)] = torch.arange(mag.numel(), device=mag.device)
    return ranks


def mergekit_style(method: str, base: torch.Tensor, deltas: list, gen: torch.Generator) -> torch.Tensor:
    """Per-tensor PyTorch, as mergekit's generalized task arithmetic computes it (breadcrumbs and
    DELLA rank |τ| with a full argsort of the tensor, as mergekit's magnitude sparsifiers do)."""
    w = torch.tensor(WEIGHTS, dtype=base.dtype, device=base.device)
    trimmed = []
    for d in deltas:
        if method == "breadcrumbs":
            n = d.numel()
            n_top, n_keep = int(GAMMA * n), int(float(torch.tensor(DENSITY)) * n)  # fp32 density, as pyops
            r = _ascending_ranks(d.abs().view(-1)).view_as(d)
            trimmed.append(d * ((r >= n - n_keep - n_top) & (r < n - n_top)))
        elif method == "della":
            r = _ascending_ranks(d.abs().view(-1)).view_as(d)
            p = DENSITY - EPSILON + 2 * EPSILON * r.to(d.dtype) / max(d.numel() - 1, 1)
            trimmed.append(d * torch.bernoulli(p, generator=gen) / p)
        elif method == "ties":
            k = int(DENSITY * d.numel())
            mask = torch.zeros_like(d)
            mask.view(-1)[torch.topk(d.abs().view(-1), k).indices] = 1
            trimmed.append(d * mask)
        else:  # dare, dare_ties: bernoulli keep, rescale by 1/density
            mask = torch.bernoulli(torch.full_like(d, DENSITY), generator=gen)
            trimmed.append(d * mask / DENSITY)
    stacked = torch.stack(trimmed)
    weighted = stacked * w.view(-1, *([1] * base.dim()))
    if method in ("dare", "breadcrumbs"):
        return base + weighted.sum(dim=0)
    sign = (weighted.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    agree = stacked.sign() == sign
    mixed = (weighted * agree).sum(dim=0)
    divisor = (w.view(-1, *([1] * base.dim())) * agree).sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return base + mixed / divisor


def _method_case(b: Build) -> Case:
    import pyops

    dev, method, numel, blocks = b.device, b.sizes["method"], b.sizes["numel"], b.sizes["blocks"]
    gen = b.generator(7)
    base = torch.empty(numel, device=dev).uniform_(-1, 1, generator=gen)
    deltas = [torch.empty(numel, device=dev).normal_(0, 0.01, generator=gen) for _ in WEIGHTS]
    out = torch.zeros(numel, device=dev)
    tensor_bytes = numel * 4
    op_bytes = (len(deltas) + 2) * tensor_bytes
    kw = dict(method=method, coeffs=list(WEIGHTS), density=DENSITY, seed=1, name="bench", out=out,
              gamma=GAMMA, epsilon=EPSILON)

    def pyops_entry(backend: str) -> Entry:
        return Entry(f"pyops {backend} out=", lambda: pyops.merge(base, deltas, backend=backend, blocks=blocks, **kw),
                     bytes=op_bytes, group="pyops", info=choice_info("merge"),
                     note=f"pyops.merge(method={method!r}, density={DENSITY}, out=out, backend={backend!r})")

    entries = b.entries({
        "copy": lambda: Entry("copy_", lambda: out.copy_(base), bytes=2 * tensor_bytes, group="reference",
                              note="out.copy_(base): bandwidth yardstick"),
        PYOPS: lambda: [pyops_entry(x) for x in b.backends],
        "mergekit": lambda: Entry("mergekit-style torch", lambda: mergekit_style(method, base, deltas, gen),
                                  bytes=op_bytes, group="peer", note="per-tensor torch.topk / torch.bernoulli "
                                  "masks, sign election, disjoint mean"),
    })

    def checks(r: CaseResult) -> list:
        res, copy = [], r.ok("copy_")
        for x in b.backends:
            e = r.ok(f"pyops {x} out=")
            res.append(Check(f"speed-up pyops {x} vs mergekit-style torch", e and e.speedup, b.target("speedup"),
                             ">=", "x"))
            if e and copy and e.gbps and copy.gbps:
                res.append(Check(f"pyops {x} out= GB/s / copy_ GB/s", e.gbps / copy.gbps, None, ">=", "x"))
        return res

    def verify() -> dict:
        if not b.cpu:
            return {"note": "random masks differ by construction between pyops (Philox) and torch.bernoulli"}
        got = pyops.merge(base, deltas, backend=b.backends[0], **kw)
        if method == "breadcrumbs":  # deterministic: the same rank band
            ref = mergekit_style(method, base, deltas, gen)
            n_bad = int(((got - ref).abs() > 1e-5 * max(1.0, float(ref.abs().max()))).sum())
            return {"elements_differing_from_mergekit_style": n_bad, "ok": n_bad == 0}
        if method != "ties":
            return {"note": "random masks differ by construction between pyops (Philox) and torch.bernoulli"}
        # TIES is deterministic: pyops equals the per-tensor formulation except where some |τᵢ|
        # equals its task's k-th largest magnitude (pyops keeps every tied entry, as docs/merging.md
        # defines; torch.topk keeps exactly k). At 64M fp32 samples such ties do occur.
        ref = mergekit_style("ties", base, deltas, gen)
        bad = (got - ref).abs() > 1e-5 * max(1.0, float(ref.abs().max()))
        tied = torch.zeros_like(bad)
        for d in deltas:
            k = int(DENSITY * d.numel())
            tied |= d.abs() == torch.topk(d.abs().view(-1), k).values[-1]
        n_bad, n_explained = int(bad.sum()), int((bad & tied).sum())
        return {"elements_differing_from_mergekit_style": n_bad, "of_which_at_threshold_ties": n_explained,
                "ok": n_bad == n_explained}

    rows = "" if blocks is None else f" blocks={blocks}"
    return b.case(f"{method} fp32 {fmt_count(numel)} N={len(WEIGHTS)} density={DENSITY}{rows}", entries,
                  "mergekit-style torch", {"method": method, "numel": numel, "n_tasks": len(WEIGHTS),
                                           "density": DENSITY, "blocks": blocks, "device": str(dev)},
                  checks, verify)


# --------------------------------------------------------------------------------------------
# Whole checkpoints: `python -m pyops merge` vs `mergekit-yaml` on the same YAML
# --------------------------------------------------------------------------------------------

def _llama_tensors(cfg: dict) -> dict:
    h, i, v = cfg["hidden"], cfg["intermediate"], cfg["vocab"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(cfg["layers"]):
        p = f"model.layers.{layer}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes


def write_llama_checkpoint(path, seed: int, base=None, cfg: dict = LLAMA) -> dict:
    """A synthetic HF-layout checkpoint (config.json + model.safetensors) of the Llama shape `cfg`
    (vocab, hidden, intermediate, layers, heads), fp32 N(0, 0.02). With `base` (the tensors a
    previous call returned), the weights are base + N(0, 0.002) task-vector noise, as fine-tuned
    models are. Returns the tensors written."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in _llama_tensors(cfg).items():
        if base is None:
            tensors[name] = torch.empty(shape).normal_(0, 0.02, generator=gen)
        else:
            tensors[name] = base[name] + torch.empty(shape).normal_(0, 0.002, generator=gen)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg["hidden"],
              "intermediate_size": cfg["intermediate"], "num_hidden_layers": cfg["layers"],
              "num_attention_heads": cfg["heads"], "num_key_value_heads": cfg["heads"], "vocab_size": cfg["vocab"],
              "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False,
              "torch_dtype": "float32"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return tensors


def write_lora_adapter(path, seed: int, cfg: dict = LLAMA, r: int = LORA_RANK) -> None:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) of rank `r`
    on every attention and MLP projection of the Llama shape `cfg`, A and B ~ N(0, 0.02)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in _llama_tensors(cfg).items():
        module = name[:-len(".weight")]
        if module.rsplit(".", 1)[-1] in LORA_TARGETS:
            out_f, in_f = shape
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.empty(r, in_f).normal_(0, 0.02, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.empty(out_f, r).normal_(0, 0.02, generator=gen)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": list(LORA_TARGETS), "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
              "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": None}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def _slices_yaml(models: list, layers: int) -> str:
    """A frankenmerge: layers [0, 3/4·L) of m1 then [L/4, L) of m2 (1.5·L layers), passthrough."""
    a, b = 3 * layers // 4, layers // 4
    return (f"merge_method: passthrough\ndtype: float32\nslices:\n"
            f"  - sources:\n      - model: {models[1]}\n        layer_range: [0, {a}]\n"
            f"  - sources:\n      - model: {models[2]}\n        layer_range: [{b}, {layers}]\n")


def mergekit_yaml() -> Optional[str]:
    """The mergekit-yaml executable: $PYOPS_MERGEKIT_YAML, else the one on PATH, else None."""
    return os.environ.get("PYOPS_MERGEKIT_YAML") or shutil.which("mergekit-yaml")


def _timed_child(cmd: list) -> float:
    """Runs cmd; returns the child's peak RSS in MiB (ru_maxrss of a fresh wrapper process)."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {p.stderr[-2000:]}")
    return int(p.stdout.strip().splitlines()[-1]) / 1024.0


def _models(root: str, cfg: dict) -> list:
    """The base and three fine-tuned checkpoints of shape `cfg` under `root`, written once per run
    (the checkpoint cases of a run share them)."""
    tag = "x".join(str(cfg[k]) for k in ("layers", "hidden", "intermediate", "vocab"))
    models = [os.path.join(root, f"llama-{tag}", n) for n in ("base", "m1", "m2", "m3")]
    if not all(os.path.exists(os.path.join(m, "model.safetensors")) for m in models):
        base = write_llama_checkpoint(models[0], 0, cfg=cfg)
        for k, m in enumerate(models[1:], start=1):
            write_llama_checkpoint(m, k, base=base, cfg=cfg)
    return models


def _checkpoint(b: Build) -> Case:
    if b.workdir is not None:
        return _checkpoint_in(b, b.workdir, own=False)
    root = tempfile.mkdtemp(prefix="pyops-bench-")
    try:
        return _checkpoint_in(b, root, own=True)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _checkpoint_in(b: Build, root: str, own: bool) -> Case:
    """The case, its models and outputs in `root`; `own`: the case removes `root` when released."""
    method, params = b.sizes["method"], b.sizes["params"]
    models = _models(root, b.sizes["model"])
    model_bytes = sum(os.path.getsize(os.path.join(m, "model.safetensors")) for m in models)
    mergekit = mergekit_yaml()
    layout = b.sizes.get("layout")
    tag = layout or method
    cfg = os.path.join(root, f"{tag}.yaml")
    n, top = b.sizes.get("n", 3), b.sizes.get("top") or {}
    adapters = [os.path.join(os.path.dirname(models[0]), f"lora{k}") for k in range(1, 1 + n)]
    if layout == "lora":
        for k, a in enumerate(adapters, start=1):
            if not os.path.exists(os.path.join(a, "adapter_model.safetensors")):
                write_lora_adapter(a, 100 + k, b.sizes["model"])
    with open(cfg, "w") as f:
        if layout == "slices":
            f.write(_slices_yaml(models, b.sizes["model"]["layers"]))
        else:
            f.write(f"merge_method: {method}\n" + (f"base_model: {models[0]}\n" if b.sizes.get("base", True) else "")
                    + "dtype: float32\n")
            if top:
                f.write("parameters: {" + ", ".join(f"{k}: {v}" for k, v in top.items()) + "}\n")
            f.write("models:\n")
            for m, w, a in zip(models[1:1 + n], WEIGHTS, adapters):
                per = ({"weight": w} if b.sizes.get("weights", True) else {}) | dict(params)
                f.write(f"  - model: {m}" + (f"+{a}" if layout == "lora" else "") + "\n"
                        + ("    parameters: {" + ", ".join(f"{k}: {v}" for k, v in per.items()) + "}\n" if per
                           else ""))
    out_pyops, out_mk = os.path.join(root, f"out-pyops-{tag}"), os.path.join(root, f"out-mk-{tag}")
    rss: dict = {}

    def run_pyops():
        rss["pyops"] = _timed_child([sys.executable, "-m", "pyops", "merge", cfg, "--out", out_pyops, "--overwrite",
                                     "--no-progress"])

    lora_cache = os.path.join(root, "mergekit-lora-cache")

    def run_mergekit():
        shutil.rmtree(out_mk, ignore_errors=True)
        # mergekit merges each adapter into a full copy of its model there first: emptied before every
        # run, so that each timed run pays it as a first merge does
        shutil.rmtree(lora_cache, ignore_errors=True)
        extra = ["--lora-merge-cache", lora_cache] if layout == "lora" else []
        rss["mergekit"] = _timed_child([mergekit, cfg, out_mk, "--lazy-unpickle", "--no-copy-tokenizer", *extra])

    # Each side runs in a child process: its peak RSS is the child's (info), not this process's.
    io_bytes = model_bytes + model_bytes // 4          # four models read, one written
    entries = b.entries({
        "pyops_cli": lambda: Entry(
            "pyops merge (CLI)", run_pyops, bytes=io_bytes, group="pyops", measure_memory=False,
            note="python -m pyops merge CONFIG --out DIR (a fresh process: import time included)",
            info=lambda: {"peak_rss_child_mib": rss.get("pyops")}),
        "mergekit_yaml": lambda: Entry(
            "mergekit-yaml", run_mergekit if mergekit else None, bytes=io_bytes, group="peer", measure_memory=False,
            skip=None if mergekit else
            "mergekit-yaml not found (install mergekit into its own venv and set PYOPS_MERGEKIT_YAML)",
            note="mergekit-yaml CONFIG DIR --lazy-unpickle --no-copy-tokenizer (same YAML; the synthetic "
                 "models have no tokenizer)",
            info=lambda: {"peak_rss_child_mib": rss.get("mergekit")}),
    })

    def checks(r: CaseResult) -> list:
        e = r.ok("pyops merge (CLI)")
        res = [Check("speed-up pyops merge vs mergekit-yaml", e and e.speedup if r.ok("mergekit-yaml") else None,
                     b.target("speedup"), ">=", "x")]
        if rss.get("pyops") and rss.get("mergekit"):
            res.append(Check("peak RSS pyops / mergekit", rss["pyops"] / rss["mergekit"], b.target("peak_rss_ratio"),
                             "<=", "x", note=f"{rss['pyops']:.0f} vs {rss['mergekit']:.0f} MiB"))
        elif rss.get("pyops"):
            res.append(Check("peak RSS pyops merge (MiB)", rss["pyops"], None, "<=", " MiB"))
        return res

    what = {"slices": "slices frankenmerge (passthrough)", "lora": f"{method} of model+LoRA (r={LORA_RANK})"}
    case = b.case(f"whole model {what.get(layout, method)} 3x{model_bytes / 4 / 1e9:.2f} GB fp32", entries,
                  "mergekit-yaml" if mergekit else "pyops merge (CLI)",
                  {"method": method, "model_bytes_each": model_bytes // 4, "mergekit": mergekit}, checks)
    def cleanup():
        # the models stay for the run's other checkpoint cases unless this case made its own folder
        for path in ((root,) if own else (out_pyops, out_mk, lora_cache)):
            shutil.rmtree(path, ignore_errors=True)

    case.cleanup.append(cleanup)
    return case
