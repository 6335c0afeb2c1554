"""`python -m pyops verify`: every op × every backend that can run here vs the reference.

Each family's `pyops/<stem>/verify.py` yields `Case`s. For every case and every backend other than
the reference, the op runs forward and backward on random inputs (odd shapes, every dtype) and
each output and gradient is compared with the reference's on the same inputs, using the
tolerance table in `pyops.testing`. The exit status is non-zero on any mismatch or crash.

By default a quick subset runs: every `QUICK_STRIDE`-th case of each family. The cases are
enumerated as products of shapes, dtypes, methods and layouts, and a prime stride cycles through
every op, method, dtype and layout of a family while taking a fifth of the rows (a test checks the
coverage). `full=True` runs every case.
"""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from pyops import _backend
from pyops.testing import Comparison, Tol, compare


@dataclass
class Case:
    """One problem: `make()` builds fresh inputs; `run(backend, inputs)` returns named tensors
    (the output and every gradient); `tols` gives the tolerance of each named tensor."""
    op: str
    name: str
    make: Callable[[torch.device], dict]
    run: Callable[[str, dict], Dict[str, torch.Tensor]]
    tols: Dict[str, Tol]
    backends: Iterable[str] = ("cpu", "triton", "cuda")


@dataclass
class Row:
    op: str
    backend: str
    case: str
    status: str  # PASS | FAIL | SKIP | ERROR
    detail: str = ""
    results: Dict[str, Comparison] = field(default_factory=dict)


FAMILIES = ("merging", "moe", "neighborhood", "task_attention")
QUICK_STRIDE = 5
# Rough seconds per check (one case on one backend) on a 2-core CPU with Triton interpreted; used
# only for the estimate printed before the run starts.
SECONDS_PER_CHECK = {"merging": 0.25, "moe": 0.5, "neighborhood": 0.6, "task_attention": 0.5}


def _families():
    import importlib

    return {name: importlib.import_module(f"pyops.{name}.verify") for name in FAMILIES}


def select_cases(family_cases: Sequence[Case], full: bool) -> List[Case]:
    """Every case (`full`) or the quick subset: every `QUICK_STRIDE`-th, starting with the first."""
    cases = list(family_cases)
    return cases if full else cases[::QUICK_STRIDE]


def _check_one(case: Case, backend: str, device: torch.device) -> Row:
    torch.manual_seed(0)
    inputs = case.make(device)
    try:
        expected = case.run("reference", inputs)
        actual = case.run(backend, inputs)
    except _backend.BackendUnavailableError as exc:
        return Row(case.op, backend, case.name, "SKIP", str(exc).split(": ", 2)[-1])
    except Exception as exc:  # a crash is a failure, reported with its traceback
        return Row(case.op, backend, case.name, "ERROR", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    results = {k: compare(actual[k], expected[k], case.tols[k]) for k in expected}
    ok = all(r.ok for r in results.values()) and set(actual) == set(expected)
    return Row(case.op, backend, case.name, "PASS" if ok else "FAIL", results=results)


def _plan(op: Optional[str], full: bool) -> Dict[str, List[Case]]:
    """{family: its selected cases}, restricted to `op` (a stem or an op name); KeyError if unknown."""
    families = _families()
    if op is not None and op in families:
        families = {op: families[op]}
    plan = {}
    for name, module in families.items():
        cases = select_cases(module.cases(), full)
        if op is not None and op not in FAMILIES:
            cases = [c for c in cases if c.op == op]
        if cases:
            plan[name] = cases
    if not plan:
        raise KeyError(op)
    return plan


def _known_ops() -> List[str]:
    return sorted({c.op for m in _families().values() for c in m.cases()})


def _worst(row: Row) -> str:
    worst = max(row.results.values(), key=lambda r: r.used, default=None)
    if worst is None:
        return ""
    tol = f" tol(atol={worst.tol.atol:.2g}, rtol={worst.tol.rtol:.2g}) {worst.used:4.0%} used" if worst.tol else ""
    return f"max_abs={worst.max_abs:.2e} max_rel={worst.max_rel:.2e}{tol}"


def run(op: Optional[str] = None, device: str = "cpu", verbose: bool = False, full: bool = False,
        out=sys.stdout) -> int:
    """Verify every selected case on every backend it names; print one row per check and a summary.

    Args:
        op: a family stem (``"merging"``), an op name (``"merge"``, ``"na2d"``, ...) or None (all).
        device: ``"cpu"`` or ``"cuda"``.
        verbose: also print the skipped checks.
        full: every case; by default the quick subset (see the module docstring).

    Returns 0 when nothing failed, 1 on any mismatch or crash, 2 for bad arguments."""
    try:
        plan = _plan(op, full)
    except KeyError:
        print(f"verify: unknown op {op!r}; choose a family ({', '.join(FAMILIES)}) or an op "
              f"({', '.join(_known_ops())})", file=out)
        return 2
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("verify: --device cuda but torch.cuda.is_available() is False", file=out)
        return 2
    checks = [(fam, case, backend) for fam, cases in plan.items() for case in cases for backend in case.backends]
    total = len(checks)
    estimate = sum(SECONDS_PER_CHECK[fam] for fam, _, _ in checks)
    scope = "every case" if full else f"quick subset, every {QUICK_STRIDE}th case; --full for every case"
    print(f"verify: {total} checks ({len(plan)} families, {scope}) on {device}; "
          f"about {max(1, round(estimate / 60))} min on a 2-core CPU", file=out, flush=True)
    rows: List[Row] = []
    t0 = time.perf_counter()
    width = len(str(total))
    for i, (_, case, backend) in enumerate(checks):
        row = _check_one(case, backend, dev)
        rows.append(row)
        if row.status != "SKIP" or verbose:
            detail = _worst(row) if row.status != "SKIP" else row.detail
            print(f"[{i + 1:>{width}}/{total}] {row.op:<21} {row.backend:<8} {row.case:<44} {row.status:<5} {detail}",
                  file=out, flush=True)
    _summary(rows, time.perf_counter() - t0, out)
    return 1 if any(r.status in ("FAIL", "ERROR") for r in rows) else 0


def _summary(rows: List[Row], seconds: float, out) -> None:
    print("", file=out)
    print(f"{'op':<21} {'backend':<8} {'cases':>5} {'pass':>5} {'fail':>5} {'skip':>5}  worst max_abs / max_rel / tol used  "
          "(skip reason)", file=out)
    keys = sorted({(r.op, r.backend) for r in rows})
    for op, backend in keys:
        sel = [r for r in rows if r.op == op and r.backend == backend]
        n_pass = sum(r.status == "PASS" for r in sel)
        n_fail = sum(r.status in ("FAIL", "ERROR") for r in sel)
        n_skip = sum(r.status == "SKIP" for r in sel)
        comps = [c for r in sel for c in r.results.values()]
        worst = (f"{max(c.max_abs for c in comps):.2e} / {max(c.max_rel for c in comps):.2e} / "
                 f"{max(c.used for c in comps):.0%}" if comps else "-")
        reason = next((r.detail for r in sel if r.status == "SKIP"), "") if n_skip == len(sel) else ""
        print(f"{op:<21} {backend:<8} {len(sel):>5} {n_pass:>5} {n_fail:>5} {n_skip:>5}  {worst}  {reason}", file=out)
    for r in rows:
        if r.status in ("FAIL", "ERROR"):
            print(f"\n{r.status}: {r.op} [{r.backend}] {r.case}", file=out)
            for k, c in r.results.items():
                print(f"    {k}: {c}", file=out)
            if r.detail:
                print("    " + r.detail.replace("\n", "\n    "), file=out)
    n_bad = sum(r.status in ("FAIL", "ERROR") for r in rows)
    print(f"\nverify: {sum(r.status == 'PASS' for r in rows)} passed, {n_bad} failed, "
          f"{sum(r.status == 'SKIP' for r in rows)} skipped in {seconds:.1f}s", file=out)
