"""Microbenchmarks on one shared harness (shipped as `pyops.bench`); run with `python -m pyops bench`.

One module per family stem (docs/design.md#benchmarks): `merging`, `task_attention`, `neighborhood`, `moe`.
Each starts with ``CASES``, a table of `harness.CaseSpec` records, and has ``build(spec, device,
*, full=False, workdir=None)``, which turns one spec into a `harness.Case`; the peers a user
would pick instead are measured in the same process, alternating with pyops.

    import pyops.bench
    pyops.bench.run("merging")                   # quick sizes (the default) -> exit status
    pyops.bench.run("na2d", full=True)           # the cases of one op, full sizes

Results: `<results_dir>/<stem>-<device>.json` and `.png`, and a README.md rendered from every
JSON file there (`report.py`). The default results_dir is a new folder per run under
``$XDG_CACHE_HOME/pyops/bench/`` (``~/.cache/pyops/bench/``), outside the source tree;
``--results-dir bench/results`` refreshes the committed tables. The checkpoint cases write their
synthetic models into a temporary directory of the run, removed at its end (kept with
``--keep-checkpoints``).

The same case tables drive a pytest-benchmark suite (``conftest.py``, ``test_benchmarks.py``:
``pytest bench/ --benchmark-only``, quick sizes unless ``--bench-full``), one benchmark per case
and entry; ``python -m pyops bench --compare OLD.json NEW.json`` (`compare.py`) sets two saved
runs of either front end side by side and flags the regressions.

This module imports no torch: `add_arguments`, `--report` and `--compare` work without it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

# stem -> the public ops its cases measure: what `--op` accepts besides the stems and "all".
# Kept here, without torch, so that a bad name is answered at once; tests/test_bench.py checks it
# against each module's OPS and CASES.
FAMILIES: dict[str, tuple[str, ...]] = {
    "merging": ("task_arithmetic", "task_arithmetic_from_models", "merge", "merge_from_models"),
    "task_attention": ("task_masked_attention",),
    "neighborhood": ("na1d", "na2d", "na3d"),
    "moe": ("moe_route", "moe_experts"),
}

COMMITTED_RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Per family: importing pyops, describing the machine (git, /proc) and writing JSON and PNG.
_FAMILY_OVERHEAD_S = 4.0

__all__ = ["FAMILIES", "COMMITTED_RESULTS_DIR", "add_arguments", "choices", "default_results_dir", "main",
           "module", "resolve", "resolve_device", "run"]


def module(stem: str):
    """The benchmark module of a family stem (imports torch)."""
    if stem not in FAMILIES:
        raise ValueError(f"unknown family {stem!r}; expected one of {', '.join(FAMILIES)}")
    return importlib.import_module(f".{stem}", __name__)


def choices() -> dict[str, tuple[str, ...]]:
    """{family stem: the op names it measures}: with "all", the names `run(op=...)` accepts."""
    return dict(FAMILIES)


def resolve(op: Optional[str]) -> list[tuple[str, Optional[tuple[str, ...]]]]:
    """[(family stem, the ops whose cases run, None: all of them)] for `op`: None or "all" (every
    family), a stem, or an op name (the cases of the family that measure it). ValueError lists the
    choices."""
    if op is None or op == "all":
        return [(stem, None) for stem in FAMILIES]
    if op in FAMILIES:
        return [(op, None)]
    for stem, ops in FAMILIES.items():
        if op in ops:
            return [(stem, (op,))]
    listed = "; ".join(f"{stem} (ops: {', '.join(ops)})" for stem, ops in FAMILIES.items())
    raise ValueError(f"unknown benchmark {op!r}: expected 'all', a family or an op name; choices: {listed}")


def default_results_dir(now: Optional[_dt.datetime] = None) -> Path:
    """``$XDG_CACHE_HOME/pyops/bench/<UTC timestamp>`` (``~/.cache/...`` when it is unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    stamp = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return Path(cache) / "pyops" / "bench" / stamp


def resolve_device(device: Optional[str]) -> str:
    """"cpu" or "cuda[:N]" for `device` (None: CUDA when available, else CPU); ValueError for a
    device that is not one of those or not present (imports torch)."""
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


def _plan(op: Optional[str], device_type: str, full: bool) -> list:
    """[(stem, module, selected specs, ops filter)] of the families with a case to run."""
    from . import harness

    out = []
    for stem, ops in resolve(op):
        mod = module(stem)
        specs = harness.select(mod.CASES, device_type, full, ops)
        if specs:
            out.append((stem, mod, specs, ops))
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _estimate(plan: list, device_type: str, full: bool, out_dir: Path) -> tuple[str, int]:
    """The line printed before a run starts, and the peak bytes of its temporary checkpoints."""
    expected, bounded, n_cases, disk = 0.0, False, 0, 0
    for _stem, mod, specs, _ops in plan:
        expected += _FAMILY_OVERHEAD_S
        for s in specs:
            n_cases += 1
            t = s.timing_for(device_type, full)
            if device_type == "cpu" and t.expect_s is not None:
                expected += t.expect_s
            else:
                expected += t.max_seconds + 5.0
                bounded = True
        if hasattr(mod, "disk_bytes"):
            disk = max(disk, int(mod.disk_bytes(specs, full)))
    families = ", ".join(stem for stem, *_ in plan)
    size = "full sizes" if full else "quick sizes (--full for the full ones)"
    when = f"up to {_minutes(expected)} (time limits)" if bounded else f"about {_minutes(expected)}"
    ckpt = (f"; checkpoint cases: up to {disk / 1e9:.2f} GB of temporary files under {tempfile.gettempdir()}"
            if disk else "")
    return (f"pyops bench: {families} on {device_type}, {size}: {n_cases} cases, {when}{ckpt}; "
            f"results -> {out_dir}"), disk


def run(op: Optional[str] = None, *, full: bool = False, device: Optional[str] = None,
        results_dir: Optional[str] = None, keep_checkpoints: bool = False, quick: Optional[bool] = None) -> int:
    """Run the benchmarks of one family (or op), or all; print the tables; write JSON, PNG and
    README.md.

    Args:
        op: a family stem (``"merging"``), an op it measures (``"na2d"``: only the cases of that
            op), ``"all"`` or None (every family).
        full: the full sizes and repeats (the figures to quote); default the quick sizes, a
            smoke test of every case in a few minutes.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default CUDA when available, else CPU.
        results_dir: where `<stem>-<device>.json` / `.png` and README.md go; default a new
            folder under ``$XDG_CACHE_HOME/pyops/bench/`` (`default_results_dir`).
        keep_checkpoints: keep the temporary directory of the checkpoint cases' synthetic models
            (its path is printed) instead of removing it at the end.
        quick: accepted for old callers and ignored: quick sizes are the default.

    Returns:
        0 when every family ran; 1 when an entry failed with an error other than an unavailable
        backend (skips are recorded, not failures) or a pyops output disagreed with the
        reference; 2 for bad arguments. Missed speed targets are reported, not failures.
    """
    del quick
    try:
        resolve(op)
        dev = resolve_device(device)
        dev_type = dev.split(":")[0]
        plan = _plan(op, dev_type, full)
        if not plan:
            raise ValueError(f"no case of {op!r} runs on {dev_type}" + ("" if full else " at quick size (try --full)"))
    except ValueError as exc:
        print(f"pyops bench: {exc}", file=sys.stderr, flush=True)
        return 2
    from . import harness, report

    out_dir = Path(results_dir) if results_dir else default_results_dir()
    line, disk = _estimate(plan, dev_type, full, out_dir)
    print(line, flush=True)
    workdir = tempfile.mkdtemp(prefix="pyops-bench-") if disk else None
    status, t0 = 0, time.perf_counter()
    try:
        for stem, mod, specs, ops in plan:
            builds = [(s.name, lambda s=s: mod.build(s, dev, full=full, workdir=workdir)) for s in specs]
            result = harness.run_family(stem, builds, dev, not full, selection=list(ops) if ops else None)
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
        try:
            print(f"wrote {report.write(out_dir)}", flush=True)
        except (OSError, ValueError) as exc:
            print(f"pyops bench: README.md not written: {exc}", file=sys.stderr, flush=True)
    finally:
        if workdir is not None:
            if keep_checkpoints:
                print(f"pyops bench: checkpoints kept in {workdir}", flush=True)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    print(f"pyops bench: done in {_minutes(time.perf_counter() - t0)}; results in {out_dir}", flush=True)
    return status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `python -m pyops bench` (no torch import)."""
    parser.add_argument("--op", default=None, metavar="NAME",
                        help="a family (" + ", ".join(FAMILIES) + "), an op it measures (e.g. task_arithmetic, "
                             "merge, na2d, moe_experts) or 'all' (default)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="full sizes and repeats: the figures to quote (default: quick sizes, a smoke test)")
    size.add_argument("--quick", action="store_true", help="quick sizes: the default (kept for old scripts)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--results-dir", default=None, metavar="DIR",
                        help="where JSON, PNG and README.md go (default: a new folder under "
                             "$XDG_CACHE_HOME/pyops/bench/; bench/results refreshes the committed tables); "
                             "with --report: the folder to render (default: bench/results)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep the synthetic checkpoints of the whole-model merge cases (their path is printed)")
    parser.add_argument("--list", action="store_true", help="list the cases (as --op selects them) and exit")
    parser.add_argument("--report", action="store_true",
                        help="render README.md from the JSON files in --results-dir and exit (runs nothing)")
    parser.add_argument("--compare", nargs=2, default=None, metavar=("OLD.json", "NEW.json"),
                        help="compare two saved runs (pytest-benchmark JSON from --benchmark-json or "
                             "--benchmark-autosave, or a results JSON of this command): the new/old median time "
                             "of each benchmark; exits 1 when one is a regression beyond --noise (runs nothing)")
    parser.add_argument("--noise", type=float, default=None, metavar="FRACTION",
                        help="with --compare: the noise band, a new/old ratio above 1 + FRACTION is a regression "
                             "(default 0.10)")


def _list(op: Optional[str], full: bool) -> int:
    try:
        families = resolve(op)
    except ValueError as exc:
        print(f"pyops bench: {exc}", file=sys.stderr)
        return 2
    for stem, ops in families:
        specs = [s for s in module(stem).CASES if ops is None or set(ops) & set(s.ops)]
        width = max(len(s.name) for s in specs)
        print(f"{stem}:")
        for s in specs:
            sizes = s.sizes_for(full) if (full or s.quick is not None) else None
            what = "full only" if sizes is None else ", ".join(f"{k}={v}" for k, v in sizes.items())
            print(f"  {s.name:<{width}}  {s.op:<21} {s.dtype} {'fwd+bwd' if s.backward else 'fwd':<7} "
                  f"{'/'.join(s.devices):<8} {what}")
    return 0


def main(args: argparse.Namespace) -> int:
    """`python -m pyops bench` with the arguments of `add_arguments`; returns the exit status."""
    if getattr(args, "compare", None):
        from . import compare
        noise = compare.DEFAULT_NOISE if args.noise is None else args.noise
        return compare.main(args.compare[0], args.compare[1], noise=noise)
    if getattr(args, "noise", None) is not None:
        print("pyops bench: --noise applies to --compare only", file=sys.stderr)
        return 2
    if args.report:
        from . import report
        try:
            path = report.write(Path(args.results_dir) if args.results_dir else COMMITTED_RESULTS_DIR)
        except (OSError, ValueError) as exc:
            print(f"pyops bench --report: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
        return 0
    if args.list:
        return _list(args.op, args.full)
    try:
        return run(args.op, full=args.full, device=args.device, results_dir=args.results_dir,
                   keep_checkpoints=args.keep_checkpoints)
    except KeyboardInterrupt:
        print("pyops bench: interrupted", file=sys.stderr)
        return 130
