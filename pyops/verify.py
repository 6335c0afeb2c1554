"""`python -m pyops verify`: every op × every backend that can run here vs the reference.

Each family module in this package yields `Case`s. For every case and every backend other than
the reference, the op runs forward and backward on random inputs (odd shapes, every dtype) and
each output and gradient is compared with the reference's on the same inputs, using the
tolerance table in `pyops.testing`. The exit status is non-zero on any mismatch or crash.
"""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

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


def _families():
    import importlib

    return {name: importlib.import_module(f"pyops.{name}.verify") for name in FAMILIES}


def op_names() -> List[str]:
    return sorted(_families())


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


def run(op: Optional[str] = None, device: str = "cpu", verbose: bool = False, out=sys.stdout) -> int:
    families = _families()
    if op is not None and op not in families:
        print(f"verify: unknown op {op!r}; choose from {', '.join(sorted(families))}", file=out)
        return 2
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("verify: --device cuda but torch.cuda.is_available() is False", file=out)
        return 2
    rows: List[Row] = []
    t0 = time.perf_counter()
    for name, module in sorted(families.items()):
        if op is not None and name != op:
            continue
        cases = list(module.cases())
        for i, case in enumerate(cases):
            for backend in case.backends:
                row = _check_one(case, backend, dev)
                rows.append(row)
                if row.status != "SKIP" or verbose:
                    worst = max(row.results.values(), key=lambda r: r.max_rel, default=None)
                    err = f"max_abs={worst.max_abs:.2e} max_rel={worst.max_rel:.2e}" if worst else ""
                    print(f"[{i + 1:>3}/{len(cases)}] {row.op:<16} {row.backend:<8} {row.case:<44} {row.status:<5} {err}",
                          file=out, flush=True)
    _summary(rows, time.perf_counter() - t0, out)
    return 1 if any(r.status in ("FAIL", "ERROR") for r in rows) else 0


def _summary(rows: List[Row], seconds: float, out) -> None:
    print("", file=out)
    print(f"{'op':<16} {'backend':<8} {'cases':>5} {'pass':>5} {'fail':>5} {'skip':>5}  worst max_abs / max_rel  (skip reason)", file=out)
    keys = sorted({(r.op, r.backend) for r in rows})
    for op, backend in keys:
        sel = [r for r in rows if r.op == op and r.backend == backend]
        n_pass = sum(r.status == "PASS" for r in sel)
        n_fail = sum(r.status in ("FAIL", "ERROR") for r in sel)
        n_skip = sum(r.status == "SKIP" for r in sel)
        comps = [c for r in sel for c in r.results.values()]
        worst = (f"{max(c.max_abs for c in comps):.2e} / {max(c.max_rel for c in comps):.2e}" if comps else "-")
        reason = next((r.detail for r in sel if r.status == "SKIP"), "") if n_skip == len(sel) else ""
        print(f"{op:<16} {backend:<8} {len(sel):>5} {n_pass:>5} {n_fail:>5} {n_skip:>5}  {worst}  {reason}", file=out)
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
