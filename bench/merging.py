"""Benchmark of block-wise task arithmetic (`pyops.task_arithmetic`), family ``task_arithmetic``.

    θ = base + Σᵢ cᵢ · τᵢ        N = 3 task vectors, one coefficient per task (or per row)

The operation is memory-bound: it must read N + 1 tensors and write one, so its yardstick is the
machine's copy bandwidth, measured in the same process. Entries of each case:

* ``copy_``: ``out.copy_(base)`` into a preallocated tensor; bytes = 2 × tensor bytes. The
  bandwidth reference (on CUDA a device-to-device copy).
* ``pyops <backend> out=``: the fused kernel writing into a preallocated output;
  bytes = (N + 1) reads + 1 write.
* ``pyops <backend>``: the same with a new output each call (same bytes). On CPU a new 256 MiB
  tensor is fresh pages from the kernel, so this entry pays the page faults of the first write —
  reported as measured.
* ``torch expression`` (the baseline): what a user writes, ``base + c0*d0 + c1*d1 + c2*d2``
  (one temporary per product and per sum).
* ``torch in-place``: the careful user's version, ``out.copy_(base); out.add_(d0, alpha=c0); ...``
  into a preallocated output (N + 1 passes over memory instead of one).

The peers get the same bytes as pyops (the minimum traffic of the operation), so their GB/s are
effective bandwidths, comparable across entries.

Checks reported per case (targets from the issue): pyops(out=) GB/s ≥ 0.7 × copy_ GB/s on CPU
(≥ 0.8 on CUDA); speed-up ≥ 3× against the torch expression (CPU); and peak memory: pyops needs
no temporary beyond its output (out=: nothing), where the expression needs several.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch

from .harness import Case, CaseResult, Check, Entry, last_level_cache_bytes

FAMILY = "task_arithmetic"
OPS = ("task_arithmetic", "task_arithmetic_from_models")
OP = "task_arithmetic"

COEFFS = (0.5, 0.3, -0.2)          # N = 3 task vectors
BW_TARGET = {"cpu": 0.7, "cuda": 0.8}
SPEEDUP_TARGET = {"cpu": 3.0, "cuda": None}
M = 1 << 20

_DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _specs(device_type: str, quick: bool) -> list[dict]:
    """The cases: (dtype, shape, blocks, repeats, max_seconds)."""
    gpu = device_type == "cuda"
    big = 4 * M if quick else 64 * M
    half = 4 * M if quick else 16 * M
    rows = (1024, 4096) if quick else (4096, 4096)
    if gpu:
        r_big, r_half = (10, 10) if quick else (40, 40)
        t_big, t_half = 20.0, 10.0
    else:
        r_big, r_half = (9, 7) if quick else (15, 11)
        t_big, t_half = (10.0, 5.0) if quick else (40.0, 20.0)
    return [
        dict(dtype=torch.float32, shape=(big,), blocks=None, repeats=r_big, max_seconds=t_big,
             warmup=1 if (not gpu and not quick) else 2),
        dict(dtype=torch.float16, shape=(half,), blocks=None, repeats=r_half, max_seconds=t_half),
        dict(dtype=torch.bfloat16, shape=(half,), blocks=None, repeats=r_half, max_seconds=t_half),
        dict(dtype=torch.float32, shape=rows, blocks="rows", repeats=r_half, max_seconds=t_half),
    ]


def cases(device: str, quick: bool = False) -> Iterator[Case]:
    """One case at a time: each allocates its tensors when it is built and drops them after."""
    dev = torch.device(device)
    backends = ("cuda", "triton") if dev.type == "cuda" else ("cpu",)
    for spec in _specs(dev.type, quick):
        yield _make_case(dev, backends, **spec)


def _fmt_count(n: int) -> str:
    return f"{n // M}M" if n % M == 0 else (f"{n // 1024}K" if n % 1024 == 0 else str(n))


def _random(shape: Sequence[int], dtype: torch.dtype, dev: torch.device, gen: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=dev)
    return t.uniform_(-1.0, 1.0, generator=gen)   # writes every page: no page faults left in the timing


def _make_case(dev: torch.device, backends: Sequence[str], dtype: torch.dtype, shape: tuple,
               blocks: Optional[str], repeats: int, max_seconds: float, warmup: int = 2) -> Case:
    import pyops

    n_tasks = len(COEFFS)
    numel = math.prod(shape)
    esize = torch.empty(0, dtype=dtype).element_size()
    tensor_bytes = numel * esize
    gen = torch.Generator(device=dev).manual_seed(1234)
    base = _random(shape, dtype, dev, gen)
    deltas = [_random(shape, dtype, dev, gen) for _ in range(n_tasks)]
    out = torch.zeros(shape, dtype=dtype, device=dev)   # shared by the preallocated-output entries
    c0, c1, c2 = COEFFS
    d0, d1, d2 = deltas

    if blocks is None:
        coeffs = torch.tensor(COEFFS, dtype=torch.float32, device=dev)
        coeff_desc = "per tensor [N]"

        def expr():
            return base + c0 * d0 + c1 * d1 + c2 * d2

        def inplace():
            out.copy_(base)
            out.add_(d0, alpha=c0)
            out.add_(d1, alpha=c1)
            out.add_(d2, alpha=c2)

        expr_src = "base + c0*d0 + c1*d1 + c2*d2"
        inplace_src = "out.copy_(base); out.add_(d_i, alpha=c_i) for each task"
    elif blocks == "rows":
        n_rows = shape[0]
        scale = 1.0 + 0.5 * torch.linspace(-1.0, 1.0, n_rows, device=dev)
        coeffs = torch.stack([c * scale for c in COEFFS]).to(torch.float32)   # [N, rows]
        # The columns a user would broadcast, in the tensors' dtype (fp32 columns would promote
        # a half-precision expression to fp32).
        k0, k1, k2 = (coeffs[i].to(dtype).unsqueeze(1) for i in range(n_tasks))
        coeff_desc = f"per row [N, {n_rows}]"

        def expr():
            return base + k0 * d0 + k1 * d1 + k2 * d2

        def inplace():
            out.copy_(base)
            out.addcmul_(d0, k0)
            out.addcmul_(d1, k1)
            out.addcmul_(d2, k2)

        expr_src = "base + k0*d0 + k1*d1 + k2*d2 with k_i = coeffs[i, :, None]"
        inplace_src = "out.copy_(base); out.addcmul_(d_i, k_i) for each task"
    else:
        raise ValueError(f"unsupported blocks {blocks!r}")

    op_bytes = (n_tasks + 2) * tensor_bytes      # N + 1 reads, one write
    copy_name = "copy_" if dev.type == "cpu" else "copy_ (device to device)"

    def pyops_entry(backend: str, preallocated: bool) -> Entry:
        if preallocated:
            def fn():
                return pyops.task_arithmetic(base, deltas, coeffs, blocks=blocks, out=out, backend=backend)
            note = f"pyops.task_arithmetic(base, deltas, coeffs, blocks={blocks!r}, out=out, backend={backend!r})"
        else:
            def fn():
                return pyops.task_arithmetic(base, deltas, coeffs, blocks=blocks, backend=backend)
            note = (f"pyops.task_arithmetic(base, deltas, coeffs, blocks={blocks!r}, backend={backend!r}): "
                    "a new output each call" + (" (fresh pages: page-fault bound on Linux)" if dev.type == "cpu" else ""))

        def info():
            ch = pyops.last_choice(OP)
            return {"backend_ran": ch.backend if ch else None, "choice": ch.explain() if ch else None}

        return Entry(f"pyops {backend}" + (" out=" if preallocated else ""), fn, bytes=op_bytes,
                     group="pyops", note=note, info=info)

    entries = [Entry(copy_name, lambda: out.copy_(base), bytes=2 * tensor_bytes, group="reference",
                     note="out.copy_(base) into a preallocated tensor; bytes = 1 read + 1 write (bandwidth reference)")]
    entries += [pyops_entry(b, True) for b in backends]
    entries += [pyops_entry(b, False) for b in backends]
    entries += [Entry("torch expression", expr, bytes=op_bytes, group="peer",
                      note=f"plain PyTorch, what a user writes: {expr_src}"),
                Entry("torch in-place", inplace, bytes=op_bytes, group="peer",
                      note=f"in-place PyTorch into a preallocated output: {inplace_src}")]

    out_mib = tensor_bytes / M
    # A copy whose two tensors fit in the last-level cache runs (partly) from the cache, the
    # fused op's N + 2 tensors may not: say so next to the ratio.
    llc = last_level_cache_bytes() if dev.type == "cpu" else None
    cache_note = ""
    if llc and 2 * tensor_bytes <= llc:
        cache_note = (f"; copy_ working set {2 * tensor_bytes / M:.0f} MiB fits in the {llc / M:.0f} MiB "
                      f"last-level cache (op: {op_bytes / M:.0f} MiB), so the copy reference may run from cache")
    slack_mib = max(4.0, 0.02 * out_mib)

    def checks(r: CaseResult) -> list[Check]:
        dt = dev.type
        copy, plain, smart = r.ok(copy_name), r.ok("torch expression"), r.ok("torch in-place")

        def mem(e):
            if e is None:
                return None
            return e.peak_dev_mib if dt == "cuda" else e.peak_rss_mib

        mem_kind = "peak device memory" if dt == "cuda" else "peak RSS"
        others = f"torch expression {_mib(mem(plain))} MiB, torch in-place {_mib(mem(smart))} MiB, output {out_mib:.0f} MiB"
        res: list[Check] = []
        for b in backends:
            o, f = r.ok(f"pyops {b} out="), r.ok(f"pyops {b}")
            if o is None and f is None:
                res.append(Check(f"pyops {b}", None, note="did not run: " + _reason(r, b)))
                continue
            bw = o.gbps / copy.gbps if (o and copy and o.gbps and copy.gbps) else None
            res.append(Check(f"pyops {b} out= GB/s / {copy_name} GB/s", bw, BW_TARGET[dt], ">=", "x",
                             note=f"{_g(o and o.gbps)} vs {_g(copy and copy.gbps)} GB/s" + cache_note))
            res.append(Check(f"speed-up pyops {b} out= vs torch expression", o and o.speedup,
                             SPEEDUP_TARGET[dt], ">=", "x"))
            res.append(Check(f"speed-up pyops {b} (new output) vs torch expression", f and f.speedup,
                             SPEEDUP_TARGET[dt], ">=", "x"))
            if o and smart:
                res.append(Check(f"speed-up pyops {b} out= vs torch in-place", smart.median_s / o.median_s,
                                 None, ">=", "x"))
            res.append(Check(f"{mem_kind} pyops {b} out= (extra)", mem(o), slack_mib, "<=", " MiB",
                             note="no temporary: " + others))
            res.append(Check(f"{mem_kind} pyops {b} (new output)", mem(f), out_mib + slack_mib, "<=", " MiB",
                             note="the output only"))
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

        def err(got: torch.Tensor) -> tuple[float, bool]:
            e = got.to(torch.float32).sub_(ref).abs_() if got.dtype != torch.float32 else (got - ref).abs_()
            return float(e.max()), bool((e <= bound).all())

        res: dict = {"tolerance": f"atol={tol.atol:g} rtol={tol.rtol:g} (pyops.testing)"}
        ok = True
        for b in backends:
            try:
                got = pyops.task_arithmetic(base, deltas, coeffs, blocks=blocks, out=out, backend=b)
            except pyops.BackendUnavailableError:
                continue
            res[f"pyops_{b}_max_abs"], res[f"pyops_{b}_ok"] = err(got)
            ok = ok and res[f"pyops_{b}_ok"]
        res["torch_expression_max_abs"] = err(expr())[0]
        res["ok"] = ok
        return res

    params = {"dtype": _DTYPE_NAME[dtype], "shape": list(shape), "numel": numel, "n_tasks": n_tasks,
              "coeffs": coeff_desc, "blocks": blocks, "device": str(dev),
              "tensor_mib": out_mib, "op_bytes": op_bytes, "threads": torch.get_num_threads()}
    name = (f"{_DTYPE_NAME[dtype]} {'x'.join(_fmt_count(s) if len(shape) == 1 else str(s) for s in shape)}"
            f" N={n_tasks} {'rows' if blocks == 'rows' else 'per-tensor'}")
    return Case(name=name, entries=entries, baseline="torch expression", params=params,
                repeats=repeats, max_seconds=max_seconds, warmup=warmup, checks=checks, verify=verify)


def _mib(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _g(x: Optional[float]) -> str:
    return "n/a" if not x else f"{x:.2f}"


def _reason(r: CaseResult, backend: str) -> str:
    e = r.get(f"pyops {backend} out=") or r.get(f"pyops {backend}")
    return (e.reason or e.status) if e else "not measured"
