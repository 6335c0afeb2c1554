"""Run a function on W spawned CPU processes joined by a gloo process group (torch.distributed).

`run_ranks(fn, W, *args)` starts W processes, each with one thread, initialises the default
process group (gloo, a free local port, a short timeout so a broken collective fails the test
instead of hanging CI), calls ``fn(rank, W, *args)`` and returns the W return values (anything
`torch.save` can write), rank order. An exception on any rank fails the call with that rank's
traceback. `fn` must be a module-level function (the children import it by name).
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = {"ok": fn(rank, world, *args)}
    except BaseException:  # reported to the parent with the rank's traceback
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args) -> List[Any]:
    with tempfile.TemporaryDirectory(prefix="pyops-dist-") as out:
        mp.spawn(_entry, args=(world, free_port(), out, fn, args), nprocs=world, join=True)
        results = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if "error" in res]
    if errors:
        raise AssertionError("\n".join(errors))
    return [res["ok"] for res in results]
