"""Benchmark of `pyops.merge` (TIES, DARE, DARE-TIES), family ``merge``.

N = 3 task vectors, per-tensor weights, density 0.3, one block = the whole tensor. Entries:

* ``copy_``: the memory-bandwidth yardstick (bytes = 1 read + 1 write).
* ``pyops <backend> out=``: the fused kernels into a preallocated output; bytes = (N + 1) reads
  + 1 write (the minimum traffic; TIES' selection passes are extra reads it pays for).
* ``mergekit-style torch`` (the baseline): the same math the way mergekit 0.1.5 and most merging
  code write it — per tensor, `torch.topk` over |τ| (TIES) or `torch.bernoulli` masks (DARE),
  sign election with full-size temporaries, then the disjoint mean. Same bytes, so its GB/s is
  an effective bandwidth.

Target (issue #3): TIES and DARE at least 10× faster than the per-tensor PyTorch formulation on
CPU; task arithmetic is benchmarked by the ``task_arithmetic`` family.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from .harness import Case, CaseResult, Check, Entry

FAMILY = "merge"
OPS = ("merge", "merge_from_models")
WEIGHTS = (0.5, 0.3, 0.7)
DENSITY = 0.3
SPEEDUP_TARGET = 10.0
M = 1 << 20


def _mergekit_style(method: str, base: torch.Tensor, deltas: list, gen: torch.Generator) -> torch.Tensor:
    """Per-tensor PyTorch, as mergekit's generalized task arithmetic computes it."""
    w = torch.tensor(WEIGHTS, dtype=base.dtype, device=base.device)
    trimmed = []
    for d in deltas:
        if method == "ties":
            k = int(DENSITY * d.numel())
            mask = torch.zeros_like(d)
            mask.view(-1)[torch.topk(d.abs().view(-1), k).indices] = 1
            trimmed.append(d * mask)
        else:  # dare, dare_ties: bernoulli keep, rescale by 1/density
            mask = torch.bernoulli(torch.full_like(d, DENSITY), generator=gen)
            trimmed.append(d * mask / DENSITY)
    stacked = torch.stack(trimmed)
    weighted = stacked * w.view(-1, *([1] * base.dim()))
    if method == "dare":
        return base + weighted.sum(dim=0)
    sign = (weighted.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    agree = stacked.sign() == sign
    mixed = (weighted * agree).sum(dim=0)
    divisor = (w.view(-1, *([1] * base.dim())) * agree).sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return base + mixed / divisor


def cases(device: str, quick: bool = False) -> Iterator[Case]:
    dev = torch.device(device)
    numel = (4 if quick else 64) * M
    backends = ("cpu",) if dev.type == "cpu" else ("cuda", "triton")
    for method in ("ties", "dare_ties", "dare"):
        yield _make_case(dev, backends, method, numel, repeats=3 if quick else 3,
                         max_seconds=30.0 if quick else 120.0)


def _make_case(dev, backends, method, numel, repeats, max_seconds) -> Case:
    import pyops

    gen = torch.Generator(device=dev).manual_seed(7)
    base = torch.empty(numel, device=dev).uniform_(-1, 1, generator=gen)
    deltas = [torch.empty(numel, device=dev).normal_(0, 0.01, generator=gen) for _ in WEIGHTS]
    out = torch.zeros(numel, device=dev)
    tensor_bytes = numel * 4
    op_bytes = (len(deltas) + 2) * tensor_bytes

    def pyops_entry(backend: str) -> Entry:
        def fn():
            return pyops.merge(base, deltas, method=method, coeffs=list(WEIGHTS), density=DENSITY, seed=1,
                               name="bench", out=out, backend=backend)

        def info():
            ch = pyops.last_choice("merge")
            return {"backend_ran": ch.backend if ch else None, "choice": ch.explain() if ch else None}
        return Entry(f"pyops {backend} out=", fn, bytes=op_bytes, group="pyops", info=info,
                     note=f"pyops.merge(method={method!r}, density={DENSITY}, out=out, backend={backend!r})")

    entries = [Entry("copy_", lambda: out.copy_(base), bytes=2 * tensor_bytes, group="reference",
                     note="out.copy_(base): bandwidth yardstick")]
    entries += [pyops_entry(b) for b in backends]
    entries.append(Entry("mergekit-style torch", lambda: _mergekit_style(method, base, deltas, gen),
                         bytes=op_bytes, group="peer",
                         note="per-tensor torch.topk / torch.bernoulli masks, sign election, disjoint mean"))

    def checks(r: CaseResult) -> list[Check]:
        res = []
        copy = r.ok("copy_")
        for b in backends:
            e = r.ok(f"pyops {b} out=")
            res.append(Check(f"speed-up pyops {b} vs mergekit-style torch", e and e.speedup,
                             SPEEDUP_TARGET if dev.type == "cpu" else None, ">=", "x"))
            if e and copy and e.gbps and copy.gbps:
                res.append(Check(f"pyops {b} out= GB/s / copy_ GB/s", e.gbps / copy.gbps, None, ">=", "x"))
        return res

    def verify() -> dict:
        got = pyops.merge(base, deltas, method=method, coeffs=list(WEIGHTS), density=DENSITY, seed=1,
                          name="bench", out=out, backend=backends[0]) if dev.type == "cpu" else None
        if got is None or method != "ties":
            return {"note": "DARE masks differ by construction between pyops (Philox) and torch.bernoulli"}
        # TIES is deterministic: pyops equals the per-tensor formulation (random data, no ties at the threshold).
        ref = _mergekit_style("ties", base, deltas, gen)
        err = float((got - ref).abs().max())
        return {"max_abs_vs_mergekit_style": err, "ok": err <= 1e-5 * max(1.0, float(ref.abs().max()))}

    return Case(name=f"{method} fp32 {numel // M}M N={len(WEIGHTS)} density={DENSITY}", entries=entries,
                baseline="mergekit-style torch", params={"method": method, "numel": numel, "n_tasks": len(WEIGHTS),
                                                          "density": DENSITY, "device": str(dev)},
                repeats=repeats, max_seconds=max_seconds, warmup=1, checks=checks, verify=verify)
