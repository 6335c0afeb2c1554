"""Recycled fp32 buffers of the CPU expert ops (pyops/moe/backend_cpu.py).

A freshly allocated large tensor is paid for in page faults on first touch, which can cost more
than the elementwise work it holds; the CPU ops therefore keep their large fp32 buffers between
calls. Two pools, both per thread (`threading.local`: a thread never sees another thread's
buffers, so concurrent calls never share memory and need no lock):

* `workspace` — scratch that never leaves an op: the gathered rows and dys/dxs ([T·k, d] each),
  one expert's h, dh, da, db ([rows of the largest expert, hidden] each), and, for an inference
  call, its a, b and ys. A buffer is keyed by its role (a name) and grown when a call needs more;
  it may be reused by the next call of the same thread because nothing returned to the caller or
  saved for a backward lives in it. One exception is read across calls: the "rows" buffer,
  whose key (see `Workspace.gathered_rows`) lets a backward reuse its own forward's gather.
* `saved_pool` — what the CPU forward saves for its backward (a, b, ys) and the fp32 results the
  ops return (y, dx, dW). A buffer is handed out again only when nothing but the pool references
  its storage (storage use count): a saved tensor still alive (graph kept, retain_graph, another
  layer in flight) or a result the caller keeps (x.grad, a stored output) is never reused, and a
  fresh buffer is taken instead. Without `torch._C._storage_Use_Count` nothing is recycled.

Both pools together keep at most PYOPS_MOE_WORKSPACE_MB (default 1024) MiB; a buffer beyond that is
allocated for the call and not kept. `release_workspace()` drops this thread's buffers of both.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Optional

import torch
from torch import Tensor

from pyops import _native

HAS_USE_COUNT = hasattr(torch._C, "_storage_Use_Count")


def _limit_bytes() -> int:
    return int(os.environ.get("PYOPS_MOE_WORKSPACE_MB", "1024")) << 20


class Workspace(threading.local):
    """Per-thread fp32 scratch buffers by name, kept between calls (see the module docstring)."""

    def __init__(self) -> None:
        self.bufs: dict = {}
        self.rows_key: Optional[tuple] = None  # what "rows" holds: see gathered_rows

    def get(self, name: str, rows: int, cols: int) -> Tensor:
        numel = rows * cols
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel:
            self.bufs.pop(name, None)
            buf = torch.empty(numel, dtype=torch.float32)
            if 4 * (numel + sum(b.numel() for b in self.bufs.values())) <= _limit_bytes():
                self.bufs[name] = buf
        return buf[:numel].view(rows, cols)

    def gathered_rows(self, x: Tensor, xf: Tensor, order: Tensor, k: int, nt: int, fresh: bool) -> Tensor:
        """x's rows in expert order, [T·k, d] fp32 (xf: x as contiguous fp32), in the "rows" buffer.
        The forward gathers them (fresh=True); its backward finds them still there unless another
        call has gathered since, and then skips the second gather. The key is the identity and
        version of x and order: both are saved for the backward, so no other tensor can occupy
        their memory meanwhile, and an in-place change bumps the version. An x that needed a
        converted copy (xf is not x's memory) is gathered every time: the copy's address could be
        reused by another call's copy."""
        T, d = xf.shape
        n = order.shape[0]
        key = (xf.data_ptr(), x._version, order.data_ptr(), order._version, T, d, k)
        rows = self.get("rows", n, d)
        if fresh or self.rows_key != key:
            _native.cpu_module.moe_gather(xf.data_ptr(), order.data_ptr(), k, T, d, rows.data_ptr(), 0, nt)
            kept = self.bufs.get("rows") is not None and xf.data_ptr() == x.data_ptr()
            self.rows_key = key if kept else None
        return rows


workspace = Workspace()


class SavedPool(threading.local):
    """Per-thread recycled fp32 buffers for saved intermediates and returned results (see the
    module docstring): the pages of last step's dead tensors serve the next step, which also
    lowers the peak RSS."""

    def __init__(self) -> None:
        self.bufs: list = []

    def take(self, rows: int, cols: int) -> Tensor:
        """The smallest free buffer of at least rows × cols elements, or a fresh one."""
        numel = rows * cols
        best = None
        for buf in self.bufs:
            # 2 = the pool's tensor + the temporary storage object of this very call
            if buf.numel() >= numel and torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2:
                if best is None or buf.numel() < best.numel():
                    best = buf
        if best is None:
            best = torch.empty(numel, dtype=torch.float32)
            used = sum(b.numel() for b in self.bufs) + sum(b.numel() for b in workspace.bufs.values())
            if 4 * (numel + used) <= _limit_bytes():
                self.bufs.append(best)
        return best[:numel].view(rows, cols)

    def take_out(self, shape, dtype: torch.dtype) -> Tensor:
        """A new-looking tensor for a result the op returns (y, dx, dW): fp32 ones come from the
        pool too, so once the caller has dropped last step's result (the usual training loop) its
        pages are reused. A result the caller keeps keeps its buffer out of the pool, exactly as a
        saved tensor does."""
        if dtype != torch.float32 or not HAS_USE_COUNT:
            return torch.empty(shape, dtype=dtype)
        numel = math.prod(shape)
        return self.take(numel, 1).view(shape) if numel else torch.empty(shape, dtype=dtype)


saved_pool = SavedPool()


def release_workspace() -> None:
    """Free the CPU scratch buffers of this thread (they are reallocated on the next call)."""
    workspace.bufs.clear()
    workspace.rows_key = None
    saved_pool.bufs.clear()
