"""Backend registry and selection (docs/design.md#backend-choice).

Every op offers some of the backends below. For a given call, each backend's `can_run` returns
None (it can run) or the reason it cannot. `select` then picks one:

* ``backend="auto"`` (default): ``PYOPS_BACKEND`` from the environment is tried first when set;
  then the op's preference order for the tensors' device (on CPU: ``cpu`` then ``reference``;
  on CUDA: the op's GPU order, then ``reference``). The reference runs anywhere, so ``auto``
  never fails for want of a backend.
* an explicit backend name: that backend or a ``BackendUnavailableError`` carrying the reason.
  Explicit requests never fall back silently, so a benchmark or a test knows what it ran.

The decision and the reasons the faster backends were passed over are logged on the ``pyops``
logger at DEBUG level and kept in `last_choice(op)`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from pyops import _native

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "PYOPS_BACKEND"

log = logging.getLogger("pyops")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


@dataclass(frozen=True)
class Choice:
    op: str
    backend: str
    passed_over: Mapping[str, str] = field(default_factory=dict)

    def explain(self) -> str:
        skipped = "; ".join(f"{b}: {r}" for b, r in self.passed_over.items())
        return f"{self.op}: ran '{self.backend}'" + (f" (passed over: {skipped})" if skipped else "")


_last: dict[str, Choice] = {}


def last_choice(op: str) -> Optional[Choice]:
    """The backend the most recent eager call of `op` ran on, with the reasons for the others."""
    return _last.get(op)


_direct = threading.local()


@contextlib.contextmanager
def direct_kernels():
    """Within this context (this thread), the merge ops' `out=` calls on CPU run their C++ kernels
    directly instead of through the registered torch.library ops: the same kernels and results,
    without the op dispatcher. For internal callers that never trace, transform or differentiate
    (the streaming model merge): the first call of any custom op in a process imports
    torch._dynamo, a cost a one-shot command should not pay."""
    prev = getattr(_direct, "on", False)
    _direct.on = True
    try:
        yield
    finally:
        _direct.on = prev


def direct() -> bool:
    """Whether `direct_kernels()` is active on this thread."""
    return getattr(_direct, "on", False)


# ---------------------------------------------------------------------------------------------
# What a backend can do, declared as data
# ---------------------------------------------------------------------------------------------

_KERNELS = {"cpu": "the C++ kernels", "cuda": "the CUDA kernels", "triton": "the Triton kernels"}
_DEVICE_WORD = {"cpu": "CPU", "cuda": "CUDA"}


@dataclass(frozen=True)
class Capability:
    """What one backend of one op can run: devices, dtypes, native entry points and size limits.

    Each family declares one `Capability` per backend next to its glue (e.g.
    ``Capability("cpu", functions=("task_attention_forward",), limits={"groups": 64})``);
    `reason` turns the declaration into `can_run`'s answer, so every family words a refusal the
    same way. Checks that depend on more than a size (a head dim that must fit a tile, a method a
    kernel lacks) stay beside the backend and run after `reason` returns None.

    Attributes:
        backend: ``"cpu"`` (pyops._C), ``"cuda"`` (pyops._C_cuda) or ``"triton"``.
        devices: device types the kernels take. Triton on ``"cpu"`` means under the interpreter.
        dtypes: input dtypes the kernels take (default fp32, fp16, bf16).
        functions: entry points the native module must export (a build without a family's
            kernels then degrades with a reason instead of an AttributeError).
        kernels: for Triton, the module under `pyops.kernels` holding the family's kernels.
        limits: inclusive upper bounds of named sizes, checked by `reason(**sizes)`.
    """
    backend: str
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = _native.NATIVE_DTYPES
    functions: tuple[str, ...] = ()
    kernels: Optional[str] = None
    limits: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in _KERNELS:
            raise ValueError(f"backend: expected one of {tuple(_KERNELS)}, got {self.backend!r}")
        if not self.devices:
            object.__setattr__(self, "devices", ("cuda",) if self.backend == "cuda" else
                               ("cpu",) if self.backend == "cpu" else ("cuda", "cpu"))

    def _loaded(self, device: torch.device) -> Optional[str]:
        if self.backend == "triton":
            from pyops._triton import triton_family_reason

            return triton_family_reason(device, self.kernels or "")
        module, missing, name = ((_native.cpu_module, _native.cpu_missing_reason, "pyops._C")
                                 if self.backend == "cpu" else
                                 (_native.cuda_module, _native.cuda_missing_reason, "pyops._C_cuda"))
        if module is None:
            return missing
        for fn in self.functions:
            if not hasattr(module, fn):
                return f"{name} has no {fn} (built without these kernels)"
        return None

    def reason(self, device: torch.device, *tensors: torch.Tensor, **sizes: Optional[int]) -> Optional[str]:
        """None if this backend can take tensors on `device` with these dtypes and sizes, else why not.

        `sizes` name entries of `limits`; a size given as None is not checked."""
        if self.backend != "triton" and device.type not in self.devices:
            return (f"tensors are on {device.type}, {_KERNELS[self.backend]} take "
                    f"{' or '.join(_DEVICE_WORD.get(d, d) for d in self.devices)} tensors")
        loaded = self._loaded(device)
        if loaded is not None:
            return loaded
        if self.backend == "triton" and device.type not in self.devices:
            return f"tensors are on {device.type}, {_KERNELS[self.backend]} take {' or '.join(self.devices)} tensors"
        for t in tensors:
            if t.dtype not in self.dtypes:
                names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
                return f"dtype {t.dtype} is not supported by {_KERNELS[self.backend]} ({names})"
        for key, value in sizes.items():
            limit = self.limits[key]
            if value is not None and value > limit:
                return f"{_KERNELS[self.backend]} take up to {limit} {key}, got {value}"
        return None


def check_backend_name(backend: str) -> None:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {backend!r}")


def default_order(device: torch.device, gpu_order: Sequence[str]) -> tuple[str, ...]:
    if device.type == "cuda":
        return tuple(gpu_order) + ("reference",)
    return ("cpu", "reference")


# ---- fork ---------------------------------------------------------------------------------------
# torch's CPU thread pool (GNU OpenMP in the Linux wheels) does not survive fork: once the parent
# has run a parallel op, any parallel op in a forked child waits forever for threads that do not
# exist there (plain torch.mm included). pyops' own pool starts afresh in the child
# (csrc/common/thread_pool.h), but its ops call torch too. So a child forked from a process running
# torch with several threads is set to one thread, as torch's DataLoader does for its workers, and
# the first pyops op in it says so once. Start children with "spawn", or call
# torch.set_num_threads(1) before forking, to choose yourself (README, Troubleshooting).
_forked_from_threads = 0


def _after_fork_in_child() -> None:
    global _forked_from_threads
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
        _forked_from_threads = n


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _note_fork() -> None:
    global _forked_from_threads
    if _forked_from_threads:
        n, _forked_from_threads = _forked_from_threads, 0
        warnings.warn(f"pyops: this process was forked from one running torch with {n} threads; torch's "
                      "thread pool cannot run in a forked child (it would hang), so torch.set_num_threads(1) "
                      "was applied here. Use the 'spawn' start method to keep several threads.",
                      RuntimeWarning, stacklevel=3)


def select(
    op: str,
    backend: str,
    can_run: Mapping[str, Callable[[], Optional[str]]],
    order: Sequence[str],
) -> str:
    """Pick the backend for one call. `can_run[name]()` returns None or a reason."""
    _note_fork()
    check_backend_name(backend)
    if backend != "auto":
        if backend not in can_run:
            raise BackendUnavailableError(f"{op}: backend '{backend}' is not implemented for this op "
                                          f"(available: {sorted(can_run)})")
        reason = can_run[backend]()
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend '{backend}' cannot run this call: {reason}")
        return _record(op, backend, {})

    preferred = os.environ.get(ENV_VAR, "auto") or "auto"
    candidates = list(order)
    if preferred != "auto" and preferred not in BACKENDS:
        raise ValueError(f"{ENV_VAR}: expected 'auto' or one of {BACKENDS}, got {preferred!r}")
    if preferred != "auto":
        candidates = [preferred] + [b for b in candidates if b != preferred]
    passed: dict[str, str] = {}
    for name in candidates:
        if name not in can_run:
            passed[name] = "not implemented for this op"
            continue
        reason = can_run[name]()
        if reason is None:
            return _record(op, name, passed)
        passed[name] = reason
    raise BackendUnavailableError(f"{op}: no backend can run this call: {passed}")


def _record(op: str, name: str, passed: dict[str, str]) -> str:
    if not torch.compiler.is_compiling():
        choice = Choice(op, name, dict(passed))
        _last[op] = choice
        if log.isEnabledFor(logging.DEBUG):
            log.debug(choice.explain())
    return name
