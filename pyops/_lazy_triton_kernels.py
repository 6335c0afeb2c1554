"""Deferred discovery of the Triton kernels inside pyops's `torch.library.triton_op`s.

`triton_op` finds the kernels a wrapped function launches by parsing its source, and that parser
imports `torch._inductor` (a large share of `import pyops`) at op definition time, even in
processes that never compile or launch Triton (`python -m pyops merge`, CPU-only use). The kernel list is only read when torch.compile builds an AOTAutograd cache key
(`torch._library.triton.get_triton_kernels_for_op`), where inductor is loaded anyway. While
pyops defines its ops, `deferred()` swaps in a discovery that returns a list computing the real
one (with torch's own function) the first time it is read. Nothing else changes; a torch
without that hook is left alone.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator


class _DeferredKernels(list):
    """A list of the kernels of `fn`, found by `find` on first use."""

    def __init__(self, find: Callable[[Any], list], fn: Any) -> None:
        super().__init__()
        self._find, self._fn = find, fn

    def _load(self) -> None:
        if self._find is not None:
            find, fn, self._find, self._fn = self._find, self._fn, None, None
            super().extend(find(fn))

    def __iter__(self) -> Iterator[Any]:
        self._load()
        return super().__iter__()

    def __len__(self) -> int:
        self._load()
        return super().__len__()

    def __getitem__(self, i):
        self._load()
        return super().__getitem__(i)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        self._load()
        return super().__repr__()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    try:
        import torch._library.triton as lib
    except ImportError:
        yield
        return
    find = getattr(lib, "get_inner_triton_kernels", None)
    if find is None:
        yield
        return
    lib.get_inner_triton_kernels = lambda fn: _DeferredKernels(find, fn)
    try:
        yield
    finally:
        lib.get_inner_triton_kernels = find
