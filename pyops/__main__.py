"""`python -m pyops info | verify | bench | merge`.

Building the parser imports nothing heavy, so `--help` of every command answers without importing
torch; each command imports what it needs once it runs (pyops/__init__.py binds the public API
lazily while this module is the program).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

def _parser() -> argparse.ArgumentParser:
    from pyops import bench
    from pyops.merging.cli import add_parser as add_merge_parser

    p = argparse.ArgumentParser(prog="python -m pyops", description="pyops: fused, verified kernels")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and which backends load and why not",
                   description="Print the versions, the devices and which backends load here (and why the others do not).")
    v = sub.add_parser("verify", help="every op x every available backend vs the reference",
                       description="Run every op on every backend that loads here against the reference, forward and "
                                   "every gradient, and report each check's error beside its tolerance. By default a "
                                   "quick subset (every 5th case of each family, cycling through every op, method, dtype "
                                   "and layout); --full runs every case.")
    v.add_argument("--op", default=None, help="one family (merging, moe, neighborhood, task_attention) or op name")
    v.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    v.add_argument("--full", action="store_true", help="every case instead of the quick subset")
    v.add_argument("--verbose", action="store_true", help="also list skipped checks")
    b = sub.add_parser("bench", help="microbenchmarks with the peers side by side",
                       description="Benchmark each family against the peers a user would pick instead, measured in the "
                                   "same process.")
    bench.add_arguments(b)
    add_merge_parser(sub)
    return p


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _backend_env_error() -> Optional[str]:
    """The one-line error for a PYOPS_BACKEND the ops would refuse, or None. Checked before any
    command runs, as every op call would fail (or, for a CPU merge that never asks, be ignored)."""
    from pyops.merging.spec import BACKEND_CHOICES

    value = os.environ.get("PYOPS_BACKEND", "")
    if value in ("",) + BACKEND_CHOICES:
        return None
    return f"PYOPS_BACKEND: expected 'auto' or one of {BACKEND_CHOICES[1:]}, got {value!r}"


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    error = _backend_env_error()
    if error is not None:
        print(f"pyops {args.command}: {error}", file=sys.stderr)
        return 2
    if args.command == "merge":
        from pyops.merging.cli import run as run_merge_command

        return run_merge_command(args)
    if args.command == "info":
        from pyops._info import collect, render

        print(render(collect()))
        return 0
    if args.command == "verify":
        device = args.device or _default_device()
        if device == "cpu" and "TRITON_INTERPRET" not in os.environ:
            # On a CPU-only run the Triton kernels are verified through Triton's interpreter. The
            # variable must be set before Triton is first imported, and importing pyops' ops imports
            # it, so the command re-executes itself with it set (which also ends the recursion).
            os.environ["TRITON_INTERPRET"] = "1"
            os.execv(sys.executable, [sys.executable, "-m", "pyops", *(sys.argv[1:] if argv is None else argv)])
        import pyops._api  # noqa: F401  (registers every op before the cases are built)
        from pyops import verify

        return verify.run(args.op, device, verbose=args.verbose, full=args.full)
    if args.command == "bench":
        from pyops import bench

        return bench.main(args)
    return 2


if __name__ == "__main__":
    rc = main()
    if sys.argv[1:2] == ["merge"]:
        # The merge is on disk (synced, renamed) by now; the interpreter's teardown with torch loaded
        # would only delay the exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
