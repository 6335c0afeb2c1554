"""Microbenchmarks on one shared harness (shipped as `pyops.bench`); run with `python -m pyops bench`.

Each op family has one module here (DESIGN rule 9) that yields its cases to `bench/harness.py`;
the peers a user would pick instead are measured in the same process, alternating with pyops.
`run()` is what `python -m pyops bench` calls:

    import pyops.bench
    pyops.bench.run("task_arithmetic", quick=True)      # -> exit status

Results: `<results_dir>/<family>-<device>.json` and `.png` (default results_dir: `bench/results`).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

# family name -> module (relative to this package). Each module defines FAMILY, OPS (the public
# op names it measures) and cases(device, quick) -> iterable of harness.Case.
FAMILIES: dict[str, str] = {
    "task_arithmetic": ".merging",
    "merge": ".merging_methods",
    "moe": ".moe",
    "neighborhood": ".neighborhood",
    "task_attention": ".task_attention",
}

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["FAMILIES", "DEFAULT_RESULTS_DIR", "choices", "resolve", "run"]


def _module(family: str) -> ModuleType:
    return importlib.import_module(FAMILIES[family], __name__)


def choices() -> dict[str, tuple[str, ...]]:
    """{family: the op names it measures}: the names `run(op=...)` accepts."""
    out = {}
    for fam, mod_name in FAMILIES.items():
        try:
            out[fam] = tuple(getattr(_module(fam), "OPS", ()))
        except Exception:
            out[fam] = ()
    return out


def resolve(op: Optional[str]) -> list[str]:
    """The families to run for `op` (None or "all": every family); ValueError lists the choices."""
    if op is None or op == "all":
        return list(FAMILIES)
    if op in FAMILIES:
        return [op]
    table = choices()
    for fam, ops in table.items():
        if op in ops or op == FAMILIES[fam].lstrip("."):
            return [fam]
    listed = "; ".join(f"{fam} (ops: {', '.join(ops) or '-'})" for fam, ops in table.items())
    raise ValueError(f"unknown benchmark {op!r}: expected 'all', a family or an op name; choices: {listed}")


def _resolve_device(device: Optional[str]) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu' or 'cuda[:index]', got {device!r} ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda[:index]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but torch {torch.__version__} sees no CUDA device "
                         f"(torch.cuda.is_available() is False)")
    return str(dev)


def run(op: Optional[str] = None, *, quick: bool = False, device: Optional[str] = None,
        results_dir: Optional[str] = None) -> int:
    """Run the benchmarks of one family (or op), or all; print the table; write JSON and PNG.

    Args:
        op: a family (``"task_arithmetic"``), an op it measures, ``"all"`` or None (every family).
        quick: small sizes and few repeats: a smoke test, not numbers to quote.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default CUDA when available, else CPU.
        results_dir: where `<family>-<device>.json` / `.png` go; default `bench/results`.

    Returns:
        0 when every family ran; 1 when an entry failed with an error other than an unavailable
        backend (skips are recorded, not failures) or a pyops output disagreed with the
        reference; 2 for bad arguments. Missed speed targets are reported, not failures.
    """
    from . import harness

    try:
        families = resolve(op)
        dev = _resolve_device(device)
    except ValueError as exc:
        print(f"pyops bench: {exc}", file=sys.stderr, flush=True)
        return 2
    out_dir = Path(results_dir) if results_dir else DEFAULT_RESULTS_DIR
    status = 0
    for fam in families:
        try:
            mod = _module(fam)
            result = harness.run_family(fam, mod.cases(dev, quick), dev, quick)
        except Exception as exc:
            print(f"pyops bench: {fam}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            status = 1
            continue
        print("", flush=True)
        print(harness.format_table(result), flush=True)
        try:
            json_path = harness.write_json(result, out_dir)
        except OSError as exc:
            print(f"pyops bench: could not write results to {out_dir}: {exc}", file=sys.stderr, flush=True)
            status = 1
            continue
        png_path = harness.write_chart(result, out_dir)
        print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""), flush=True)
        if result.failed:
            status = 1
    return status
