"""`python -m pyops merge CONFIG.yaml --out DIR ...`: argument parsing and the exit status.

Kept free of heavy imports so that building the `python -m pyops` parser stays cheap.
Exit status: 0 merged; 2 bad input (configuration, checkpoints, output path) or an output that
cannot be written (read-only, no permission, full disk), with exactly one line on stderr and
nothing left behind; 130 interrupted (Ctrl-C) or 143 terminated (SIGTERM), nothing left behind.
Under torchrun (`torchrun --nproc-per-node N -m pyops merge ...`) every rank exits so, and only
rank 0 prints the summary; a rank whose peer failed names that rank and its cause.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pyops.merging.spec import BACKEND_CHOICES


def add_parser(sub) -> argparse.ArgumentParser:
    m = sub.add_parser("merge", help="merge whole safetensors checkpoints from a mergekit YAML (streaming)",
                       description="Merge whole Hugging Face safetensors checkpoints as a mergekit YAML describes "
                                   "(task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, della, della_linear, "
                                   "model_stock, consensus, linear), one tensor at a time, into a new directory.")
    m.add_argument("config", help="the merge configuration (mergekit YAML)")
    m.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory (only once the new model is complete)")
    m.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N): where tensors are merged (default: cpu)")
    m.add_argument("--shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB (default: 5GB)")
    m.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the tokenizer files of the base model (or tokenizer_source) (default: yes)")
    m.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="pyops backend (default: auto)")
    m.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the merge (default: OMP_NUM_THREADS, else the CPUs available; under "
                        "torchrun, the CPUs available divided by the processes on the machine)")
    m.add_argument("--dist-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="under torchrun: a rank that stops answering (killed, hung) for this long makes the "
                        "others fail and clean up instead of waiting forever (default: 600)")
    m.add_argument("--compute-dtype", choices=("fp32", "config"), default="fp32",
                   help="fp32: accumulate in fp32 and round once to the output dtype (default); config: "
                        "mergekit's arithmetic in the configuration's dtype and its order of operations, to "
                        "reproduce a mergekit merge bit for bit (task_arithmetic, linear, ties)")
    m.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    return m


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e9:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _say(line: str) -> None:
    """One line on stderr in one write: the ranks of a distributed merge share the terminal, and
    a line written in two pieces (text, then newline) can be split by another rank's."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    from pyops.merging.errors import MergeError, one_line
    from pyops.merging.runner import run_merge

    try:
        previous = signal.signal(signal.SIGTERM, _terminate)  # clean up on `kill` as on Ctrl-C
    except ValueError:  # not the main thread
        previous = None
    try:
        report = run_merge(Path(args.config), args.out, overwrite=args.overwrite, device=args.device,
                           shard_size=args.shard_size, backend=args.backend, progress=args.progress,
                           copy_tokenizer=args.copy_tokenizer, threads=args.threads,
                           dist_timeout=args.dist_timeout, compute_dtype=args.compute_dtype)
    except MergeError as exc:
        _say(f"pyops merge: error: {one_line(str(exc))}")
        return 2
    except KeyboardInterrupt:
        _say("pyops merge: interrupted; nothing was written")
        return 130
    except SystemExit as exc:
        _say("pyops merge: terminated; nothing was written")
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if report.rank == 0:
        print(report.summary())
    return 0
