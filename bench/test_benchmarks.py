"""One pytest-benchmark benchmark per (case, entry) of the case tables (see conftest.py).

    pytest bench/ --benchmark-only                         # quick sizes, every family
    pytest bench/ --benchmark-only --bench-full            # the full sizes
    pytest bench/ --benchmark-only -k neighborhood --benchmark-group-by=param:case

Each benchmark: the entry's untimed setup; for a pyops entry, the case's correctness check, once
per case (a wrong result fails the test and records no time); warm-up calls that size the calls
per round (`harness.warm_up`); the rounds of the case table's timing (`harness.planned_rounds`,
pedantic mode: ``--benchmark-min-rounds``/``--benchmark-max-time`` do not apply); a clock that
waits for the GPU on CUDA. An entry that cannot run here (peer not installed, a backend's
refusal: `pyops.BackendUnavailableError`) is skipped with the reason. ``extra_info`` holds what a
reader of the saved JSON needs to turn times into GB/s and GFLOP/s and to know what ran where.
"""
from __future__ import annotations

import json

import pytest
import torch

import pyops

from . import harness


def test_benchmark(case, entry, benchmark, pyops_bench):
    """Time `entry` of `case` on its own: pyops and each peer are separate benchmarks of one group,
    so pytest-benchmark's tables, histograms and comparisons set them side by side."""
    s = pyops_bench
    built = s.case(case)
    if entry == s.BUILD_FAILED:
        pytest.fail(f"{case}: building the case failed at collection", pytrace=False)
    e = next((x for x in built.entries if x.name == entry), None)
    if e is None:
        pytest.fail(f"{case}: the built case has no entry {entry!r} (it has {[x.name for x in built.entries]})",
                    pytrace=False)
    if e.skip is not None or e.fn is None:
        pytest.skip(e.skip or "no callable")
    verify = s.verify(case) if e.group == "pyops" else None

    number, rounds, first_s = 1, 1, None
    try:
        try:
            if e.setup is not None:
                e.setup()
            if benchmark.enabled:
                first_s, per_call_s, number = harness.warm_up(e.fn, built, s.device)
                rounds = harness.planned_rounds(built, per_call_s, number)
            benchmark.pedantic(e.fn, rounds=rounds, iterations=number)
        except Exception as exc:
            status, reason = harness.classify(exc)
            if status == "skipped":
                pytest.skip(reason)
            raise
        info = dict(e.info() or {}) if e.info is not None else {}
    finally:
        if e.teardown is not None:
            e.teardown()

    backend, choice = info.pop("backend_ran", None), info.pop("choice", None)
    if e.group == "pyops" and backend is None and e.measure_memory and built.op:
        # the entry ran in this process, so the op's last choice is its own
        ch = pyops.last_choice(built.op)
        backend, choice = (ch.backend, ch.explain()) if ch else (None, None)
    nbytes, flops = harness.work(built, e)
    m = s.machine()
    family, spec = case.split("/", 1)
    benchmark.extra_info.update({
        "family": family, "spec": spec, "op": built.op, "case_name": built.name, "entry": e.name,
        "group": e.group, "note": e.note, "sizes": "full" if s.full else "quick",
        "bytes": nbytes, "flops": flops, "backend": backend, "choice": choice,
        "threads": torch.get_num_threads(), "device": s.device, "device_name": m.get("device_name"),
        "torch": m.get("torch"), "pyops": m.get("pyops"), "pyops_commit": m.get("pyops_commit"),
        "pyops_dirty": m.get("pyops_dirty"), "calls_per_round": number, "rounds": rounds,
        "first_call_ms": None if first_s is None else first_s * 1e3,
        "params": built.params, "verify": verify, "info": info,
    })
    if benchmark.enabled and benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["gb_per_s"] = nbytes / median / 1e9 if nbytes and median else None
        benchmark.extra_info["gflop_per_s"] = flops / median / 1e9 if flops and median else None
    # JSON values only (tuples, dtypes, paths in the params): the saved file must load anywhere
    benchmark.extra_info.update(json.loads(json.dumps(benchmark.extra_info, default=str)))
