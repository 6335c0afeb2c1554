"""The streaming merge's native engine: the C++ CPU kernels called on raw memory, without torch.

Importing torch is a large share of a whole-model merge of a few GB of checkpoints, and a CPU
merge on the C++ kernels needs nothing from torch: the tensors are bytes in file mappings and
reusable anonymous buffers, and `pyops._C` takes addresses (it links no torch). This engine runs
those merges: device cpu, backend auto or cpu, every method with a C++ kernel (task_arithmetic,
linear, ties, dare, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear,
consensus, and mergekit's slerp, nearswap, nuslerp, multislerp, karcher, ram, ramplus_tl, sce,
arcee_fusion — their scalars between kernel passes from interp_scalars, as the C++ ops take them),
float32 / float16 / bfloat16 tensors whose dtype is the same in every model, passthrough (a copy,
or task arithmetic from a zero base for a scale), slices. `reason` says why a merge needs the
torch engine instead (model_stock, a model in another dtype, float64, a `.bin` checkpoint, a LoRA
adapter, a GPU, another backend, --compute-dtype config);
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

from pyops.merging import interp_scalars as S
from pyops.merging.safetensors_io import ITEMSIZES, Checkpoint, RawBuffer, RawTensor
from pyops.merging.spec import (MERGE_DEFAULTS, NATIVE_METHOD_CODES, RANKED, check_params, name_hash, nuslerp_t,
                                     resolve_blocks, resolve_normalize)

# The safetensors codes the kernels take, as csrc/common/dtype.h numbers them.
NATIVE_DTYPES = {"F32": 0, "F16": 1, "BF16": 2}
# mergekit's interpolating and selective methods this engine runs, with the pyops._C functions
# each needs (csrc/merging/interpolate.h, fusion.h).
INTERPOLATING = {"slerp": ("vector_gram", "vector_combine"), "nearswap": ("nearswap_forward",),
                 "nuslerp": ("vector_gram", "vector_combine"), "multislerp": ("vector_gram", "vector_combine"),
                 "karcher": ("vector_gram", "vector_combine"), "ram": ("ram_forward", "vector_combine"),
                 "ramplus_tl": ("ram_counts", "ram_forward", "vector_combine"),
                 "sce": ("sce_forward", "vector_combine"), "arcee_fusion": ("arcee_fusion_forward",)}


def _module():
    try:
        return importlib.import_module("pyops._C"), None
    except Exception as exc:  # ImportError, OSError
        return None, f"pyops._C is not available ({type(exc).__name__}: {exc})"


def reason(cfg, device, backend: str, checkpoints: Sequence[Checkpoint], items) -> Optional[str]:
    """Why this merge cannot run on the native engine, or None. `checkpoints`: every input opened;
    `items`: the runner's plan (each item's `inputs`, (checkpoint, tensor name))."""
    if os.environ.get("PYOPS_MERGE_ENGINE", "auto") == "torch":
        return "PYOPS_MERGE_ENGINE=torch"
    if str(device) != "cpu":
        return f"device {device}"
    if backend not in ("auto", "cpu"):
        return f"backend {backend!r}"
    if cfg.pyops_method not in NATIVE_METHOD_CODES and cfg.method not in INTERPOLATING:
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
    missing = [f for f in INTERPOLATING.get(cfg.method, ()) if not hasattr(mod, f)]
    if missing:
        return f"pyops._C was built without {', '.join(missing)}"
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
        if "mergekit" in item.kwargs:
            return self._interpolate(item, tensors, out, tally)
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
            c32 = array.array("f", [S.fp32(c) * S.fp32(lam) for c in coeffs])
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

    # mergekit's interpolating and selective methods: the kernels of csrc/merging/interpolate.h
    # (and fusion.h), the scalars between their passes from interp_scalars, as backend_cpu's ops
    # call them; the inputs share one dtype (reason() sends a merge with mixed dtypes to torch).

    def _interpolate(self, item, tensors: List[Optional[RawTensor]], out: RawTensor, tally: dict) -> RawTensor:
        method = item.kwargs["mergekit"]
        p = S.resolve_params(method, dict(item.kwargs["params"]))
        base, models = tensors[0], list(tensors[1:])
        S.check_inputs(method, base is not None, len(models))
        S.check_params(method, p, len(models))
        first = base if base is not None else models[0]
        tally[method] = tally.get(method, 0) + 1
        if first.nbytes == 0:
            return RawTensor(item.entry.dtype, item.entry.shape, 0, 0, None)
        mod, threads = self.mod, self.threads
        ind, od = NATIVE_DTYPES[first.dtype], NATIVE_DTYPES[out.dtype]
        numel = first.nbytes // ITEMSIZES[first.dtype]
        shape = first.shape
        addr = [m.address for m in models]
        b = base.address if base is not None else 0

        def gram(layout, inputs, with_base: bool = False) -> list:
            return mod.vector_gram(b if with_base else 0, inputs, ind, *layout, threads)

        def combine(layout, inputs, coeffs, divisor=None, with_base: bool = False) -> RawTensor:
            c32 = array.array("f", coeffs)
            d32 = array.array("f", divisor) if divisor is not None else None
            mod.vector_combine(out.address, od, b if with_base else 0, inputs, ind, *layout, c32.buffer_info()[0],
                               d32.buffer_info()[0] if d32 is not None else 0, threads)
            return out

        whole = S.whole_layout(shape)
        if method == "slerp":
            g = gram(whole, [b] + addr)
            return combine(whole, [b] + addr, S.slerp_coeffs(g, float(p["t"]), 0.9995, 1e-8))
        if method == "nearswap":
            mod.nearswap_forward(out.address, od, b, addr[0], ind, numel, float(p["t"]), threads)
            return out
        if method == "nuslerp":
            layout = S.nuslerp_layout(shape, p["nuslerp_flatten"], p["nuslerp_row_wise"])
            g = gram(layout, addr, with_base=True)
            coeffs, div = S.nuslerp_coeffs(g, layout[0], nuslerp_t(p["weight"]), 1e-8)
            return combine(layout, addr, coeffs, div, with_base=True)
        if method in ("multislerp", "karcher"):
            if len(models) == 1:
                return combine(whole, addr, [1.0])  # a copy, rounded once to the output dtype
            if method == "karcher":
                coeffs = S.karcher_coeffs(gram(whole, addr), len(models), int(p["max_iter"]), float(p["tol"]))
                return combine(whole, addr, coeffs)
            g = gram(whole, addr, with_base=True)
            coeffs = S.multislerp_coeffs(g, p["weight"], p["normalize_weights"], float(p["eps"]))
            return combine(whole, addr, coeffs, with_base=True)
        if not models:  # ram, ramplus_tl, sce without task models: the base
            return combine(whole, [b], [1.0])
        if method in ("ram", "ramplus_tl"):
            eps = float(p["epsilon"])
            lam = None
            if method == "ramplus_tl":
                counts = mod.ram_counts(b, addr, ind, numel, eps, threads)
                n = len(models)
                lam = array.array("f", S.ramplus_lambda(counts[:n], counts[n:], float(p["r"]), float(p["alpha"]), eps))
            mod.ram_forward(out.address, od, b, addr, ind, numel, eps, lam.buffer_info()[0] if lam is not None else 0,
                            threads)
            return out
        if method == "sce":
            mod.sce_forward(out.address, od, b, addr, ind, numel, float(p["select_topk"]), threads)
            return out
        if not shape:  # arcee_fusion
            raise ValueError("base: arcee_fusion takes softmaxes over the last dimension, got a 0-d tensor")
        mod.arcee_fusion_forward(out.address, od, b, addr[0], ind, numel // shape[-1], shape[-1], threads)
        return out

