"""The streaming merge's native engine: the C++ CPU kernels called on raw memory, without torch.

Importing torch is a large share of a whole-model merge of a few GB of checkpoints, and a CPU
merge on the C++ kernels needs nothing from torch: the tensors are bytes in file mappings and
reusable anonymous buffers, and `pyops._C` takes addresses (it links no torch). This engine runs
those merges: device cpu, backend auto or cpu, every method with a C++ kernel (task_arithmetic,
linear, ties, dare, dare_linear, dare_ties, breadcrumbs, della, della_linear, consensus),
float32 / float16 / bfloat16 tensors whose dtype is the same in every model, passthrough (a copy, or
task arithmetic from a zero base for a scale), slices. `reason` says why a merge needs the
torch engine instead (model_stock, a model in another dtype, float64, a `.bin` checkpoint, a LoRA
adapter, a GPU, another backend);
``PYOPS_MERGE_ENGINE=torch`` forces the torch engine.

The kernels are the ones `pyops.merge_from_models` reaches on CPU tensors, called with the
same arguments as `pyops.merging.merge` and `pyops.merging.backend_cpu` form them (coefficients
rounded to fp32, λ folded into task arithmetic's coefficients in fp32, the same block layout,
name hash and seed), so both engines write the same bytes; the tests compare them file for file.
"""
from __future__ import annotations

import array
import contextlib
import importlib
import os
import sys
from typing import List, Optional, Sequence

from pyops.merging.safetensors_io import ITEMSIZES, Checkpoint, RawBuffer, RawTensor
from pyops.merging.spec import (MERGE_DEFAULTS, NATIVE_METHOD_CODES, RANKED, check_params, name_hash,
                                     resolve_blocks, resolve_normalize)

# The safetensors codes the kernels take, as csrc/common/dtype.h numbers them.
NATIVE_DTYPES = {"F32": 0, "F16": 1, "BF16": 2}


def _module():
    try:
        return importlib.import_module("pyops._C"), None
    except Exception as exc:  # ImportError, OSError
        return None, f"pyops._C is not available ({type(exc).__name__}: {exc})"


def _fp32(x: float) -> float:
    return array.array("f", [x])[0]


def reason(cfg, device, backend: str, checkpoints: Sequence[Checkpoint], items) -> Optional[str]:
    """Why this merge cannot run on the native engine, or None. `checkpoints`: every input opened;
    `items`: the runner's plan (each item's `inputs`, (checkpoint, tensor name))."""
    if os.environ.get("PYOPS_MERGE_ENGINE", "auto") == "torch":
        return "PYOPS_MERGE_ENGINE=torch"
    if str(device) != "cpu":
        return f"device {device}"
    if backend not in ("auto", "cpu"):
        return f"backend {backend!r}"
    if cfg.pyops_method not in NATIVE_METHOD_CODES:
        return f"{cfg.method} runs through pyops.merge_from_models"
    for c in checkpoints:
        if c.is_bin:
            return f"{c.label} is a .bin checkpoint (torch.load reads it)"
        if getattr(c, "adapter", None) is not None:
            return f"{c.label} has a LoRA adapter (applied with torch as its tensors are read)"
    mod, missing = _module()
    if mod is None:
        return missing
    if not hasattr(mod, "merge_forward") or not hasattr(mod, "task_arithmetic_forward"):
        return "pyops._C was built without the merge kernels"
    for it in items:
        if it.kwargs is None:
            continue
        c0, n0 = it.inputs[0]
        info = c0.tensors[n0]
        if info.dtype not in NATIVE_DTYPES or it.entry.dtype not in NATIVE_DTYPES:
            return f"tensor {it.name!r} is {info.dtype} -> {it.entry.dtype}"
        if any(c.tensors[n].dtype != info.dtype for c, n in it.inputs):
            return f"tensor {it.name!r} has another dtype in a model"
        if cfg.pyops_method in RANKED:
            block, _ = resolve_blocks(it.kwargs.get("blocks"), info.shape)
            if min(block, info.numel) >= 2**32:
                return f"tensor {it.name!r}: blocks of 2**32 elements or more"
    return None


def default_threads() -> int:
    """torch's thread count when torch is loaded (in-process callers), else OMP_NUM_THREADS or the
    CPUs this process may run on."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
        if n > 0:
            return n
    except ValueError:
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class NativeEngine:
    """The per-tensor operations of `pyops.merging.runner._stream` on raw memory."""

    name = "native"
    device = "cpu"

    def __init__(self, cfg, threads: Optional[int]):
        self.cfg = cfg
        self.mod = _module()[0]
        self.threads = threads if threads is not None else default_threads()
        self._zeros: Optional[RawBuffer] = None

    # buffers (the runner's _BytePool allocates and sizes them through these)
    @staticmethod
    def alloc(nbytes: int) -> RawBuffer:
        return RawBuffer(nbytes)

    @staticmethod
    def size(buf: RawBuffer) -> int:
        return buf.nbytes

    @staticmethod
    def view(buf: RawBuffer, entry) -> RawTensor:
        return RawTensor(entry.dtype, entry.shape, buf.address, entry.nbytes, buf)

    @staticmethod
    def map(c: Checkpoint, name: str) -> RawTensor:
        return c.map_raw(name)

    @staticmethod
    def read(c: Checkpoint, name: str, buf: RawBuffer) -> RawTensor:
        return c.read_raw(name, buf)

    @contextlib.contextmanager
    def running(self, threads: Optional[int]):
        yield  # the thread count went to the constructor: torch's is not touched

    def _zero_base(self, nbytes: int) -> int:
        """The address of `nbytes` zero bytes (linear's base: θ = Σ cᵢ·(θᵢ − 0))."""
        if self._zeros is None or self._zeros.nbytes < nbytes:
            self._zeros = RawBuffer(nbytes)  # anonymous pages read as zeros and are never written
        return self._zeros.address

    def merge(self, item, tensors: List[RawTensor], out: Optional[RawTensor], tally: dict) -> RawTensor:
        base = tensors[0]  # None: a zero base (linear, passthrough: item.zero_base)
        if item.kwargs is None:
            return base  # copied from its input: the writer reads its mapping
        models = tensors[1:]
        first = base if base is not None else models[0]
        if first.nbytes == 0:
            return RawTensor(item.entry.dtype, item.entry.shape, 0, 0, None)
        kw = {**MERGE_DEFAULTS, **item.kwargs}
        method, lam = kw["method"], kw["lam"]
        numel = first.nbytes // ITEMSIZES[first.dtype]
        base_addr = self._zero_base(first.nbytes) if base is None else base.address
        n = len(models)
        dens = check_params(method, kw["density"], lam, kw["seed"], kw["name"], kw["gamma"], kw["epsilon"], kw["k"],
                            kw["tall_lambda"], kw["normalize"], n)
        coeffs = [1.0] * n if kw["coeffs"] is None else list(kw["coeffs"])
        if len(coeffs) != n:
            raise ValueError(f"coeffs: expected {n} weights, got {len(coeffs)}")
        block_size, _ = resolve_blocks(kw["blocks"], first.shape)
        block_size = min(block_size, max(numel, 1))  # as task_arithmetic.check_blocks: one block of the tensor
        common = dict(out=out.address, out_dtype=NATIVE_DTYPES[out.dtype], base=base_addr,
                      deltas=[m.address for m in models], in_dtype=NATIVE_DTYPES[first.dtype], coeff_stride_n=1,
                      coeff_stride_block=0, numel=numel, block_size=block_size, from_models=True,
                      n_threads=self.threads)
        if method == "task_arithmetic":
            # pyops.merge folds λ into the fp32 coefficients: fl32(fl32(c)·fl32(λ)), exact in double.
            c32 = array.array("f", [_fp32(c) * _fp32(lam) for c in coeffs])
            self.mod.task_arithmetic_forward(coeffs=c32.buffer_info()[0], **common)
        else:
            c32 = array.array("f", coeffs)
            self.mod.merge_forward(
                coeffs=c32.buffer_info()[0], density=dens, method=NATIVE_METHOD_CODES[method], lam=float(lam),
                seed=kw["seed"], name_hash=name_hash(kw["name"]), k=kw["k"], tall_lambda=float(kw["tall_lambda"]),
                normalize=resolve_normalize(method, kw["normalize"]), gamma=float(kw["gamma"]),
                epsilon=float(kw["epsilon"]), **common)
        tally["cpu"] = tally.get("cpu", 0) + 1
        return out
