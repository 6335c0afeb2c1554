"""`python -m pyops info | verify | bench` (and, as the families land, `merge`)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyops", description="pyops: fused, verified kernels")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and which backends load and why not")
    v = sub.add_parser("verify", help="every op x every available backend vs the reference")
    v.add_argument("--op", default=None, help="only this op")
    v.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    v.add_argument("--verbose", action="store_true", help="also list skipped cases")
    b = sub.add_parser("bench", help="microbenchmarks with peers side by side")
    b.add_argument("--op", default=None, help="only this family / op")
    b.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    b.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    b.add_argument("--results-dir", default=None, help="where JSON and PNG go (default: bench/results)")
    from pyops.merging.cli import add_parser as add_merge_parser
    add_merge_parser(sub)
    return p


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify" and (args.device or _default_device()) == "cpu" and "TRITON_INTERPRET" not in os.environ:
        # On a CPU-only run the Triton kernels are verified through Triton's interpreter. The
        # variable must be set before Triton is first imported, and importing pyops imports it,
        # so re-run this command with it set.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "pyops", *(sys.argv[1:] if argv is None else argv)])
    if args.command == "info":
        from pyops._info import collect, render
        print(render(collect()))
        return 0
    if args.command == "verify":
        from pyops import verify
        return verify.run(args.op, args.device or _default_device(), verbose=args.verbose)
    if args.command == "bench":
        try:
            from pyops import bench
        except ImportError as exc:
            print(f"bench: the benchmark package is not installed ({exc})", file=sys.stderr)
            return 2
        return bench.run(args.op, quick=args.quick, device=args.device or _default_device(),
                         results_dir=args.results_dir)
    if args.command == "merge":
        from pyops.merging.cli import run as run_merge_command
        return run_merge_command(args)
    return 2


if __name__ == "__main__":
    rc = main()
    if sys.argv[1:2] == ["merge"]:
        # The merge is on disk (synced, renamed) by now. Tearing down an interpreter that has torch
        # loaded took 0.58 s of a 4.4 s whole-model merge, for nothing this process still needs.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
