"""Fused expert routing: validation, backend choice, registered ops and autograd.

Public entry points (re-exported as `pyops.moe_route`, `pyops.moe_experts`, `pyops.Routing`);
the math is in `pyops/reference/moe.py`.

Registered ops (DESIGN rule 2):
    pyops::moe_route                   C++ CPU (`pyops._C.moe_route`) or CUDA (`pyops._C_cuda.moe_route`)
    pyops::moe_route_backward          gradient of the routing weights w.r.t. the logits (torch ops, any device)
    pyops::moe_experts_cpu             gather → per-expert torch.mm on contiguous row slices → fused
                                       activation → torch.mm → combine (native gather/act/combine)
    pyops::moe_experts_cpu_backward    the mirror image
    pyops::moe_experts_cpu_inference   y only, when no gradient is needed (intermediates in scratch)
    pyops::moe_experts_triton          Triton grouped GEMMs (kernels/moe.py)
    pyops::moe_experts_triton_backward

The expert ops return, besides y, the intermediates the backward needs (pre-activations a, b,
the activation h and the unweighted expert outputs ys, all fp32, rows in `order`), so the
backward runs no forward GEMM again. Shapes are static ([T*k, ...]); the per-expert slicing
by `offsets` happens inside the ops, so the public functions compile with fullgraph=True.
"""
from __future__ import annotations

import math
import os
import threading
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from pyops import _backend, _native
from pyops._triton import triton_family_reason
from pyops import _validate as V
from pyops.moe import reference as ref

ROUTE_OP = "moe_route"
EXPERTS_OP = "moe_experts"
ACTIVATIONS = ref.ACTIVATIONS
GLU = ref.GLU_ACTIVATIONS
ACT_CODES = {"swiglu": 0, "geglu": 1, "gelu": 2, "silu": 3, "relu": 4}
SCORE_CODES = {"softmax": 0, "sigmoid": 1}


class Routing(NamedTuple):
    """The output of `pyops.moe_route` (see its docstring)."""
    weights: Tensor   # [T, k] gate values (logits' dtype), descending per token
    experts: Tensor   # [T, k] int32
    order: Tensor     # [T*k] int64, flat assignment ids t*k+j stably sorted by expert
    offsets: Tensor   # [E+1] int64, offsets[e]:offsets[e+1] is expert e's slice of order
    dropped: Tensor   # [T, k] bool, assignments past the capacity


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _check_k(k: object, E: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if k < 1 or k > E:
        raise ValueError(f"k: expected 1 <= k <= E = {E} (the number of experts, logits.shape[1]), got {k}")
    return k


def check_route_args(logits: object, k: object, score: object, capacity_factor: object, bias: object) -> None:
    logits = V.check_float_tensor(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [T, E] (2 dimensions), got {V.fmt_shape(logits.shape)}")
    T, E = logits.shape
    if E < 1:
        raise ValueError(f"logits: expected at least one expert (E = logits.shape[1] >= 1), got {V.fmt_shape(logits.shape)}")
    _check_k(k, E)
    if score not in SCORE_CODES:
        raise ValueError(f"score: expected 'softmax' or 'sigmoid', got {score!r}")
    if capacity_factor is not None:
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
            raise TypeError(f"capacity_factor: expected None or a positive number, got {type(capacity_factor).__name__}")
        if not (capacity_factor > 0) or math.isinf(capacity_factor):
            raise ValueError(f"capacity_factor: expected a finite number > 0, got {capacity_factor}")
    if bias is not None:
        b = V.check_float_tensor(bias, "bias")
        V.check_shape(b, "bias", (E,), "one value per expert, E = logits.shape[1]")
        V.check_same_device(b, "bias", logits, "logits")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(b).all()):
            raise ValueError("bias: contains NaN/inf; expected finite per-expert offsets")


def check_finite_logits(logits: Tensor) -> None:
    """Eager only (a data-dependent check); the native kernels check too."""
    if torch.compiler.is_compiling() or logits.numel() == 0:
        return
    bad = ~torch.isfinite(logits).all(dim=-1)
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"logits: contains NaN/inf at token {t}")


def _as_routing(routing: object) -> Routing:
    if not isinstance(routing, tuple) or len(routing) != 5:
        raise TypeError("routing: expected the Routing returned by pyops.moe_route "
                        f"(weights, experts, order, offsets, dropped), got {type(routing).__name__}")
    names = Routing._fields
    for n, t in zip(names, routing):
        V.check_tensor(t, f"routing.{n}")
    return Routing(*routing)


def check_experts_args(x: object, routing: object, w1: object, w2: object, w3: object, activation: object) -> Routing:
    x = V.check_float_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [T, d] (2 dimensions), got {V.fmt_shape(x.shape)}")
    T, d = x.shape
    r = _as_routing(routing)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    V.check_float_tensor(r.weights, "routing.weights")
    if r.weights.dim() != 2 or r.weights.shape[0] != T:
        raise ValueError(f"routing.weights: expected shape [T, k] with T = {T} (x.shape[0], the number of tokens), "
                         f"got {V.fmt_shape(r.weights.shape)}")
    k = r.weights.shape[1]
    if r.experts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"routing.experts: expected dtype torch.int32, got {r.experts.dtype}")
    V.check_shape(r.experts, "routing.experts", (T, k), "[T, k] like routing.weights")
    if r.order.dtype != torch.int64:
        raise TypeError(f"routing.order: expected dtype torch.int64, got {r.order.dtype}")
    V.check_shape(r.order, "routing.order", (T * k,), "[T*k]")
    if r.offsets.dtype != torch.int64:
        raise TypeError(f"routing.offsets: expected dtype torch.int64, got {r.offsets.dtype}")
    if r.dropped.dtype != torch.bool:
        raise TypeError(f"routing.dropped: expected dtype torch.bool, got {r.dropped.dtype}")
    V.check_shape(r.dropped, "routing.dropped", (T, k), "[T, k] like routing.weights")
    w1 = V.check_float_tensor(w1, "w1")
    if w1.dim() != 3 or w1.shape[1] != d:
        raise ValueError(f"w1: expected shape [E, d, hidden] with d = {d} (x.shape[1]), got {V.fmt_shape(w1.shape)}")
    E, _, h = w1.shape
    if E < 1 or h < 1:
        raise ValueError(f"w1: expected E >= 1 experts and hidden >= 1, got {V.fmt_shape(w1.shape)}")
    V.check_shape(r.offsets, "routing.offsets", (E + 1,), f"[E+1] with E = {E} experts (w1.shape[0])")
    if k > E:
        raise ValueError(f"routing.weights: k = {k} selections per token exceeds E = {E} experts (w1.shape[0])")
    w2 = V.check_float_tensor(w2, "w2")
    V.check_shape(w2, "w2", (E, h, d), f"[E, hidden, d] with E = {E}, hidden = {h} from w1, d = {d} from x")
    if activation in GLU:
        if w3 is None:
            raise ValueError(f"w3: activation {activation!r} is a GLU and needs w3 [E, d, hidden] (the up projection)")
        w3 = V.check_float_tensor(w3, "w3")
        V.check_shape(w3, "w3", (E, d, h), "[E, d, hidden] like w1")
    elif w3 is not None:
        raise ValueError(f"w3: only the GLU activations {GLU} take w3; activation {activation!r} does not")
    for n, t in (("w1", w1), ("w2", w2), ("w3", w3)):
        if t is not None:
            V.check_same_dtype(t, n, x, "x")
            V.check_same_device(t, n, x, "x")
    for n, t in zip(Routing._fields, r):
        V.check_same_device(t, f"routing.{n}", x, "x")
    return r


# --------------------------------------------------------------------------------------------
# Backends: can_run
# --------------------------------------------------------------------------------------------

def _native_fn_reason(module, missing: Optional[str], fn: str, what: str) -> Optional[str]:
    if module is None:
        return missing
    if not hasattr(module, fn):
        return f"{what} has no {fn} (this build lacks the moe kernels)"
    return None


_CPU_FNS = ("moe_route", "moe_gather", "moe_act_forward", "moe_act_backward", "moe_combine",
            "moe_combine_backward", "moe_scatter_add")


def _cpu_reason(dev: torch.device, fns=_CPU_FNS) -> Optional[str]:
    for fn in fns:
        r = _native_fn_reason(_native.cpu_module, _native.cpu_missing_reason, fn, "pyops._C")
        if r is not None:
            return r
    if dev.type != "cpu":
        return f"tensors are on {dev.type}, the C++ kernels take CPU tensors"
    return None


def _route_can_run(logits: Tensor) -> dict:
    dev = logits.device

    def cpu() -> Optional[str]:
        return _cpu_reason(dev, ("moe_route",)) or _native.native_dtype_reason(logits)

    def cuda() -> Optional[str]:
        r = _native_fn_reason(_native.cuda_module, _native.cuda_missing_reason, "moe_route", "pyops._C_cuda")
        if r is None and dev.type != "cuda":
            r = f"tensors are on {dev.type}, the CUDA kernels take CUDA tensors"
        return r or _native.native_dtype_reason(logits)

    return {"reference": lambda: None, "cpu": cpu, "cuda": cuda}


def _experts_can_run(x: Tensor, weights: Tensor) -> dict:
    dev = x.device
    dtype_reason = _native.native_dtype_reason(x, weights)

    def cpu() -> Optional[str]:
        return _cpu_reason(dev) or dtype_reason

    def triton() -> Optional[str]:
        return triton_family_reason(dev, "moe") or dtype_reason

    return {"reference": lambda: None, "cpu": cpu, "triton": triton}


def choose_route_backend(logits: Tensor, backend: str) -> str:
    return _backend.select(ROUTE_OP, backend, _route_can_run(logits),
                           _backend.default_order(logits.device, ("cuda",)))


def choose_experts_backend(x: Tensor, weights: Tensor, backend: str) -> str:
    return _backend.select(EXPERTS_OP, backend, _experts_can_run(x, weights),
                           _backend.default_order(x.device, ("triton",)))


# --------------------------------------------------------------------------------------------
# Routing ops
# --------------------------------------------------------------------------------------------

def _route_outputs(logits: Tensor, k: int):
    T, E = logits.shape
    dev = logits.device
    return (torch.empty(T, k, dtype=torch.float32, device=dev), torch.empty(T, k, dtype=torch.int32, device=dev),
            torch.empty(T * k, dtype=torch.int64, device=dev), torch.empty(E + 1, dtype=torch.int64, device=dev),
            torch.empty(T, k, dtype=torch.uint8, device=dev))


@torch.library.custom_op("pyops::moe_route", mutates_args=(), device_types=("cpu", "cuda"))
def _route_op(logits: Tensor, k: int, score: int, renormalize: bool, capacity: int,
              bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, E = logits.shape
    z = logits.detach().contiguous()
    w, ex, order, offsets, dropped = _route_outputs(logits, k)
    b = bias.detach().to(torch.float32).contiguous() if bias is not None else None
    args = (z.data_ptr(), _native.dtype_code(z.dtype), T, E, k, score, renormalize,
            b.data_ptr() if b is not None else 0, capacity,
            w.data_ptr(), ex.data_ptr(), order.data_ptr(), offsets.data_ptr(), dropped.data_ptr())
    if T == 0:
        offsets.zero_()
    elif z.device.type == "cpu":
        _native.cpu_module.moe_route(*args, torch.get_num_threads())
    else:
        with torch.cuda.device(z.device):
            _native.cuda_module.moe_route(*args, torch.cuda.current_stream(z.device).cuda_stream)
        # The CUDA kernel cannot raise: non-finite logits come back as offsets[E] = -(t + 1).
        last = int(offsets[E])
        if last < 0:
            raise ValueError(f"logits: contains NaN/inf at token {-last - 1}")
    return w.to(logits.dtype), ex, order, offsets, dropped.view(torch.bool)


@_route_op.register_fake
def _route_fake(logits, k, score, renormalize, capacity, bias):
    w, ex, order, offsets, dropped = _route_outputs(logits, k)
    return w.to(logits.dtype), ex, order, offsets, dropped.view(torch.bool)


@torch.library.custom_op("pyops::moe_route_backward", mutates_args=())
def _route_backward_op(grad_weights: Tensor, logits: Tensor, experts: Tensor, score: int,
                       renormalize: bool) -> Tensor:
    """d(weights)/d(logits) with the selection `experts` held fixed (torch ops, any device)."""
    cd = ref.compute_dtype(logits.dtype)
    s = ref.scores(logits.detach(), "softmax" if score == 0 else "sigmoid")
    idx = experts.long()
    g = grad_weights.to(cd)
    sel = torch.gather(s, 1, idx)
    if renormalize:
        tot = sel.sum(-1, keepdim=True)
        w = sel / tot
        g = (g - (g * w).sum(-1, keepdim=True)) / tot
    ds = torch.zeros_like(s).scatter_add_(1, idx, g)
    if score == 0:
        dz = s * (ds - (ds * s).sum(-1, keepdim=True))
    else:
        dz = ds * s * (1 - s)
    return dz.to(logits.dtype)


@_route_backward_op.register_fake
def _route_backward_fake(grad_weights, logits, experts, score, renormalize):
    return torch.empty_like(logits)


def _route_setup(ctx, inputs, output):
    logits, k, score, renormalize, capacity, bias = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.score = score
    ctx.renormalize = renormalize


def _route_backward(ctx, gw, g_experts, g_order, g_offsets, g_dropped):
    logits, experts = ctx.saved_tensors
    if gw is None:
        gw = torch.zeros(experts.shape, dtype=logits.dtype, device=logits.device)
    return _route_backward_op(gw, logits, experts, ctx.score, ctx.renormalize), None, None, None, None, None


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


# --------------------------------------------------------------------------------------------
# Expert ops: CPU (native helpers around torch.mm)
# --------------------------------------------------------------------------------------------

def _experts_outputs(x: Tensor, order: Tensor, w1: Tensor, glu: bool, with_h: bool = True):
    """(y, a, b, h, ys). with_h=False (the CPU op): h is an empty placeholder, recomputed by the backward."""
    T, d = x.shape
    n = order.shape[0]
    h = w1.shape[2]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (torch.empty(T, d, dtype=x.dtype, device=x.device), torch.empty(n, h, **f32),
            torch.empty(n, h, **f32) if glu else torch.empty(0, **f32),
            torch.empty(n, h, **f32) if with_h else torch.empty(0, **f32),
            torch.empty(n, d, **f32))


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _slices(offsets: Tensor, n: int) -> list:
    """offsets as a Python list, checked (eager, inside the op): starts at 0, ends at n, non-decreasing."""
    offs = offsets.tolist()
    if offs[0] != 0 or offs[-1] != n or any(offs[i] > offs[i + 1] for i in range(len(offs) - 1)):
        raise ValueError(f"routing.offsets: expected a non-decreasing prefix sum from 0 to T*k = {n}, got {offs}")
    return offs


def _check_order(order: Tensor, experts: Tensor, offsets: Tensor) -> None:
    """Every row of expert e's slice of order must be an assignment to e (eager, inside the op)."""
    n = order.shape[0]
    if n == 0:
        return
    if bool(((order < 0) | (order >= n)).any()):
        raise ValueError(f"routing.order: entries must be assignment ids in [0, T*k = {n})")
    E = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:-1]
    slice_expert = torch.repeat_interleave(torch.arange(E, device=order.device), counts, output_size=n)
    if not torch.equal(experts.reshape(-1).long()[order], slice_expert):
        raise ValueError("routing: order/offsets disagree with routing.experts (an assignment sits in another "
                         "expert's slice); pass the Routing returned by pyops.moe_route")


def _nt() -> int:
    return torch.get_num_threads()


class _Workspace(threading.local):
    """Per-thread fp32 scratch buffers of the CPU ops (gathered rows and dys/dxs, [T·k, d] each; one
    expert's h, dh, da, db, [rows of the largest expert, hidden] each), kept
    between calls. A freshly allocated large tensor costs ~1 GB/s in page faults on these machines
    (DESIGN), more than the elementwise work it holds; temporaries that never leave an op are
    therefore reused. Only buffers up to PYOPS_MOE_WORKSPACE_MB (default 1024) in total are kept;
    `release_workspace()` drops them. Nothing returned to the caller or saved for the backward
    lives here."""

    def __init__(self) -> None:
        self.bufs: dict = {}
        self.rows_key: Optional[tuple] = None  # what "rows" holds: see gathered_rows

    def get(self, name: str, rows: int, cols: int) -> Tensor:
        numel = rows * cols
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel:
            self.bufs.pop(name, None)
            buf = torch.empty(numel, dtype=torch.float32)
            limit = int(os.environ.get("PYOPS_MOE_WORKSPACE_MB", "1024")) << 20
            if 4 * (numel + sum(b.numel() for b in self.bufs.values())) <= limit:
                self.bufs[name] = buf
        return buf[:numel].view(rows, cols)

    def gathered_rows(self, x: Tensor, xf: Tensor, order: Tensor, k: int, nt: int, fresh: bool) -> Tensor:
        """x's rows in expert order, [T·k, d] fp32 (xf: x as contiguous fp32), in the "rows" buffer.
        The forward gathers them (fresh=True); its backward finds them still there unless another
        call has gathered since, and then skips the second gather (~1.5 ms per training step at
        the bench shape). The key is the identity and version of x and order: both are saved for
        the backward, so no other tensor can occupy their memory meanwhile, and an in-place change
        bumps the version. An x that needed a converted copy (xf is not x's memory) is gathered
        every time: the copy's address could be reused by another call's copy."""
        T, d = xf.shape
        n = order.shape[0]
        key = (xf.data_ptr(), x._version, order.data_ptr(), order._version, T, d, k)
        rows = self.get("rows", n, d)
        if fresh or self.rows_key != key:
            _native.cpu_module.moe_gather(xf.data_ptr(), order.data_ptr(), k, T, d, rows.data_ptr(), 0, nt)
            kept = self.bufs.get("rows") is not None and xf.data_ptr() == x.data_ptr()
            self.rows_key = key if kept else None
        return rows


_workspace = _Workspace()
_HAS_USE_COUNT = hasattr(torch._C, "_storage_Use_Count")


class _SavedPool(threading.local):
    """Per-thread recycled fp32 buffers for what the CPU forward saves for its backward (a, b, ys).
    Those tensors die when the backward has run; their pages are handed to the next forward instead
    of being freed and faulted in again (~80 MiB per training step at the bench shape, and a lower
    peak RSS). A buffer is handed out only while nothing but the pool references its storage (storage
    use count), so a saved tensor still alive (graph kept, retain_graph, a second layer) is never
    reused: a fresh buffer is taken instead. Bounded by PYOPS_MOE_WORKSPACE_MB with the workspace."""

    def __init__(self) -> None:
        self.bufs: list = []

    def take(self, rows: int, cols: int) -> Tensor:
        numel = rows * cols
        best = None
        for buf in self.bufs:
            # 2 = the pool's tensor + the temporary storage object of this very call
            if buf.numel() >= numel and torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2:
                if best is None or buf.numel() < best.numel():
                    best = buf
        if best is None:
            best = torch.empty(numel, dtype=torch.float32)
            limit = int(os.environ.get("PYOPS_MOE_WORKSPACE_MB", "1024")) << 20
            used = sum(b.numel() for b in self.bufs) + sum(b.numel() for b in _workspace.bufs.values())
            if 4 * (numel + used) <= limit:
                self.bufs.append(best)
        return best[:numel].view(rows, cols)

    def take_out(self, shape, dtype: torch.dtype) -> Tensor:
        """A new-looking tensor for a result the op returns (y, dx, dW): fp32 ones come from the
        pool too, so once the caller has dropped last step's result (the usual training loop) its
        pages are reused instead of faulted in again (~100 MiB per step at the bench shape: dW
        alone is 96 MiB). A result the caller keeps (x.grad, a stored output) keeps its buffer
        out of the pool, exactly as a saved tensor does."""
        if dtype != torch.float32 or not _HAS_USE_COUNT:
            return torch.empty(shape, dtype=dtype)
        numel = math.prod(shape)
        return self.take(numel, 1).view(shape) if numel else torch.empty(shape, dtype=dtype)


_saved_pool = _SavedPool()


def release_workspace() -> None:
    """Free the CPU scratch buffers of this thread (they are reallocated on the next call)."""
    _workspace.bufs.clear()
    _workspace.rows_key = None
    _saved_pool.bufs.clear()


def _cpu_forward(x: Tensor, weights: Tensor, experts: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
                 w1: Tensor, w2: Tensor, w3: Optional[Tensor], activation: str, scratch: bool):
    """The CPU forward, one expert at a time: a = rows·w1, b = rows·w3, h = act(a, b), ys = h·w2 on
    that expert's row slice, so the activation runs on data the GEMMs just left in cache and the
    h of one expert (not of all T·k rows) is all the scratch it needs. h is not saved for the
    backward (which recomputes it from a, b). scratch=True (no backward to feed): a, b and ys live
    in the per-thread workspace too, so an inference call touches no fresh pages but y's."""
    C = _native.cpu_module
    T, d = x.shape
    k = weights.shape[1]
    n = T * k
    glu = activation in GLU
    h_ = w1.shape[2]
    offs = _slices(offsets, n)
    _check_order(order, experts, offsets)
    rmax = max([offs[e + 1] - offs[e] for e in range(len(offs) - 1)] + [0])
    if scratch:
        y = _saved_pool.take_out((T, d), x.dtype)
        ys = _workspace.get("dys", n, d)
        a, b = None, None   # per-expert buffers below
    elif n == 0 or not _HAS_USE_COUNT:
        y, a, b, _, ys = _experts_outputs(x, order, w1, glu, with_h=False)
    else:
        y = _saved_pool.take_out((T, d), x.dtype)
        a = _saved_pool.take(n, h_)
        b = _saved_pool.take(n, h_) if glu else torch.empty(0)
        ys = _saved_pool.take(n, d)
    if n == 0:
        y.zero_()
        return y, a, b, torch.empty(0), ys
    E = w1.shape[0]
    act = ACT_CODES[activation]
    nt = _nt()
    xf, w1f, w2f, w3f = _f32(x), _f32(w1), _f32(w2), _f32(w3)
    order = order.contiguous()
    rows = _workspace.gathered_rows(x, xf, order, k, nt, fresh=True)
    hbuf = _workspace.get("h", rmax, h_)
    if scratch:
        abuf = _workspace.get("da", rmax, h_)
        bbuf = _workspace.get("db", rmax, h_) if glu else None
    for e in range(E):
        s, t = offs[e], offs[e + 1]
        if s == t:
            continue
        m = t - s
        ae = abuf[:m] if scratch else a[s:t]
        be = (bbuf[:m] if scratch else b[s:t]) if glu else None
        he = hbuf[:m]
        torch.mm(rows[s:t], w1f[e], out=ae)
        if glu:
            torch.mm(rows[s:t], w3f[e], out=be)
        # all threads: the native kernels run on torch's OpenMP team (csrc/common/thread_pool.cpp), the
        # very workers the GEMM just used, so a fan-out right after torch.mm finds them awake
        C.moe_act_forward(ae.data_ptr(), be.data_ptr() if glu else 0, he.data_ptr(), m, h_, act, 0, nt)
        torch.mm(he, w2f[e], out=ys[s:t])
    del rows, hbuf
    wf = _f32(weights)
    dr = dropped.contiguous().view(torch.uint8)
    y32 = y if y.dtype == torch.float32 else torch.empty(T, d, dtype=torch.float32)
    C.moe_combine(ys.data_ptr(), order.data_ptr(), wf.data_ptr(), dr.data_ptr(), k, T, d, y32.data_ptr(), 0, nt)
    if y32 is not y:
        y.copy_(y32)
    if scratch:
        return y, torch.empty(0), torch.empty(0), torch.empty(0), ys
    return y, a, b, torch.empty(0), ys


@torch.library.custom_op("pyops::moe_experts_cpu", mutates_args=(), device_types="cpu")
def _cpu_op(x: Tensor, weights: Tensor, experts: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
            w1: Tensor, w2: Tensor, w3: Optional[Tensor],
            activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _cpu_forward(x, weights, experts, order, offsets, dropped, w1, w2, w3, activation, scratch=False)


@torch.library.custom_op("pyops::moe_experts_cpu_inference", mutates_args=(), device_types="cpu")
def _cpu_inference_op(x: Tensor, weights: Tensor, experts: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
                      w1: Tensor, w2: Tensor, w3: Optional[Tensor], activation: str) -> Tensor:
    """y only, for calls that need no gradient (intermediates in the workspace). No autograd."""
    return _cpu_forward(x, weights, experts, order, offsets, dropped, w1, w2, w3, activation, scratch=True)[0]


@_cpu_inference_op.register_fake
def _cpu_inference_fake(x, weights, experts, order, offsets, dropped, w1, w2, w3, activation):
    return torch.empty_like(x)


@torch.library.custom_op("pyops::moe_experts_cpu_backward", mutates_args=(), device_types="cpu")
def _cpu_backward_op(dy: Tensor, x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
                     w1: Tensor, w2: Tensor, w3: Optional[Tensor], a: Tensor, b: Tensor, hh: Tensor, ys: Tensor,
                     activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The mirror image, one expert at a time after the global combine-backward and gather:
    dh = dys·w2ᵀ, (da, db) = act'(dh) and h = act(a, b) in one pass (h recomputed unless given),
    dW2 = hᵀ·dys,
    dxs = da·w1ᵀ + db·w3ᵀ (into dys's rows, consumed by then), dW1 = rowsᵀ·da, dW3 = rowsᵀ·db;
    then one scatter-add. Scratch: two [T·k, d] buffers and four of one expert's rows × hidden."""
    C = _native.cpu_module
    T, d = x.shape
    k = weights.shape[1]
    n = T * k
    E, _, h = w1.shape
    glu = activation in GLU
    act = ACT_CODES[activation]
    take = _saved_pool.take_out
    dx32 = take((T, d), torch.float32)
    dw32 = torch.zeros(T, k, dtype=torch.float32)
    # every expert's slice is written below (by torch.mm, or zeroed for an expert with no rows)
    dw1 = take((E, d, h), torch.float32)
    dw2 = take((E, h, d), torch.float32)
    dw3 = take((E, d, h), torch.float32) if glu else None
    offs = _slices(offsets, n)
    for e in range(E):
        if offs[e] == offs[e + 1]:
            for dw in (dw1, dw2, dw3):
                if dw is not None:
                    dw[e].zero_()
    if n == 0:
        dx32.zero_()
    else:
        nt = _nt()
        rmax = max(offs[e + 1] - offs[e] for e in range(E))
        xf, w1f, w2f, w3f = _f32(x), _f32(w1), _f32(w2), _f32(w3)
        order = order.contiguous()
        dyf = _f32(dy)
        wf = _f32(weights)
        dr = dropped.contiguous().view(torch.uint8)
        dys = _workspace.get("dys", n, d)
        C.moe_combine_backward(dyf.data_ptr(), ys.data_ptr(), order.data_ptr(), wf.data_ptr(), dr.data_ptr(),
                               k, T, d, dys.data_ptr(), dw32.data_ptr(), 0, nt)
        rows = _workspace.gathered_rows(x, xf, order, k, nt, fresh=False)
        recompute = hh.numel() == 0   # the CPU forward saves no h
        hbuf = _workspace.get("h", rmax, h) if recompute else None
        dhbuf = _workspace.get("dh", rmax, h)
        dabuf = _workspace.get("da", rmax, h)
        dbbuf = _workspace.get("db", rmax, h) if glu else None
        for e in range(E):
            s, t = offs[e], offs[e + 1]
            if s == t:
                continue
            m = t - s
            ae, be = a[s:t], (b[s:t] if glu else None)
            he = hbuf[:m] if recompute else hh[s:t]
            dhe, dae = dhbuf[:m], dabuf[:m]
            dbe = dbbuf[:m] if glu else None
            torch.mm(dys[s:t], w2f[e].t(), out=dhe)
            # (da, db) = act'(dh); h = act(a, b) recomputed in the same pass, as dW2 needs it
            C.moe_act_backward(ae.data_ptr(), be.data_ptr() if glu else 0, dhe.data_ptr(), dae.data_ptr(),
                               dbe.data_ptr() if glu else 0, m, h, act, 0, nt, he.data_ptr() if recompute else 0)
            torch.mm(he.t(), dys[s:t], out=dw2[e])
            dxs = dys[s:t]   # this expert's dys rows are consumed: its dxs rows go there
            torch.mm(dae, w1f[e].t(), out=dxs)
            torch.mm(rows[s:t].t(), dae, out=dw1[e])
            if glu:
                dxs.addmm_(dbe, w3f[e].t())
                torch.mm(rows[s:t].t(), dbe, out=dw3[e])
        del rows, hbuf, dhbuf, dabuf, dbbuf
        C.moe_scatter_add(dys.data_ptr(), order.data_ptr(), k, T, d, dx32.data_ptr(), 0, nt)
    return (dx32.to(x.dtype), dw32.to(weights.dtype), dw1.to(w1.dtype), dw2.to(w2.dtype),
            dw3.to(w1.dtype) if glu else torch.empty(0, dtype=w1.dtype))


# --------------------------------------------------------------------------------------------
# Expert ops: Triton (kernels/moe.py)
# --------------------------------------------------------------------------------------------

def _triton_kernels():
    from pyops.kernels import moe as km  # imported lazily: Triton is optional
    return km


@torch.library.triton_op("pyops::moe_experts_triton", mutates_args=())
def _triton_op(x: Tensor, weights: Tensor, experts: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
               w1: Tensor, w2: Tensor, w3: Optional[Tensor],
               activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    glu = activation in GLU
    y, a, b, hh, ys = _experts_outputs(x, order, w1, glu)
    _triton_kernels().experts_forward(x.contiguous(), weights, order, offsets, dropped, w1.contiguous(),
                                      w2.contiguous(), w3.contiguous() if glu else None, ACT_CODES[activation],
                                      y, a, b, hh, ys)
    return y, a, b, hh, ys


@torch.library.triton_op("pyops::moe_experts_triton_backward", mutates_args=())
def _triton_backward_op(dy: Tensor, x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
                        w1: Tensor, w2: Tensor, w3: Optional[Tensor], a: Tensor, b: Tensor, hh: Tensor, ys: Tensor,
                        activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    glu = activation in GLU
    return _triton_kernels().experts_backward(
        dy.contiguous(), x.contiguous(), weights, order, offsets, dropped, w1.contiguous(), w2.contiguous(),
        w3.contiguous() if glu else None, a, b, hh, ys, ACT_CODES[activation])


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd (shared by the CPU and Triton pairs)
# --------------------------------------------------------------------------------------------

def _experts_fake(x, weights, experts, order, offsets, dropped, w1, w2, w3, activation):
    return _experts_outputs(x, order, w1, activation in GLU)


def _experts_backward_fake(dy, x, weights, order, offsets, dropped, w1, w2, w3, a, b, hh, ys, activation):
    glu = activation in GLU
    return (torch.empty_like(x), torch.empty_like(weights), torch.empty_like(w1), torch.empty_like(w2),
            torch.empty_like(w1) if glu else w1.new_empty(0))


def _experts_setup(ctx, inputs, output):
    x, weights, experts, order, offsets, dropped, w1, w2, w3, activation = inputs
    _, a, b, hh, ys = output
    # The saved intermediates are outputs only so that the backward needs no forward GEMM again:
    # they carry no gradient, and no zero gradients are materialised for them (4 × [T·k, ...]).
    ctx.mark_non_differentiable(a, b, hh, ys)
    ctx.set_materialize_grads(False)
    ctx.activation = activation
    ctx.glu = activation in GLU
    ctx.save_for_backward(x, weights, order, offsets, dropped, w1, w2, w3 if ctx.glu else None, a, b, hh, ys)


def _make_experts_backward(backward_op):
    def backward(ctx, dy, *unused):
        x, weights, order, offsets, dropped, w1, w2, w3, a, b, hh, ys = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dx, dw, dw1, dw2, dw3 = backward_op(dy, x, weights, order, offsets, dropped, w1, w2, w3, a, b, hh, ys,
                                            ctx.activation)
        return dx, dw, None, None, None, None, dw1, dw2, (dw3 if ctx.glu else None), None
    return backward


def _cpu_experts_fake(x, weights, experts, order, offsets, dropped, w1, w2, w3, activation):
    return _experts_outputs(x, order, w1, activation in GLU, with_h=False)


for _fwd, _bwd, _fake in ((_cpu_op, _cpu_backward_op, _cpu_experts_fake),
                          (_triton_op, _triton_backward_op, _experts_fake)):
    _fwd.register_fake(_fake)
    _bwd.register_fake(_experts_backward_fake)
    _fwd.register_autograd(_make_experts_backward(_bwd), setup_context=_experts_setup)

_EXPERT_OPS = {"cpu": _cpu_op, "triton": _triton_op}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def moe_route(
    logits: Tensor,
    k: int,
    *,
    score: str = "softmax",
    renormalize: bool = True,
    capacity_factor: Optional[float] = None,
    bias: Optional[Tensor] = None,
    backend: str = "auto",
) -> Routing:
    """Top-k expert routing with the permutation that groups assignments by expert.

    Args:
        logits: router logits `[T, E]`, float32 / float16 / bfloat16 (float64: reference backend).
        k: experts per token, ``1 <= k <= E``.
        score: ``"softmax"`` (over the E experts) or ``"sigmoid"`` (per expert), computed in fp32.
        renormalize: divide each token's k selected scores by their sum.
        capacity_factor: None (no capacity), or cf > 0: each expert keeps the first
            ``C = ceil(cf·k·T/E)`` assignments in token order and drops the rest.
        bias: optional `[E]` added to the scores for the selection only (DeepSeek-V3 aux-loss-free
            balancing); the weights are the scores without it. Not differentiated.
        backend: ``"auto"`` | ``"reference"`` | ``"cpu"`` | ``"cuda"``.

    Returns:
        `Routing(weights [T, k] logits' dtype (descending per token), experts [T, k] int32,
        order [T*k] int64 (assignment ids t*k+j stably sorted by expert), offsets [E+1] int64
        (expert e owns order[offsets[e]:offsets[e+1]]; counts include dropped assignments),
        dropped [T, k] bool)`. Ties in the selection go to the lower expert index. `weights`
        is differentiable w.r.t. `logits` with the selection held fixed.

    Raises:
        ValueError for NaN/inf logits ("logits: contains NaN/inf at token t"), k outside
        [1, E], capacity_factor <= 0, a bias of the wrong shape.
    """
    check_route_args(logits, k, score, capacity_factor, bias)
    T, E = logits.shape
    name = choose_route_backend(logits, backend)
    if name == "reference":
        check_finite_logits(logits)
        return Routing(*ref.route(logits, k, score, renormalize, capacity_factor, bias))
    cap = ref.capacity(capacity_factor, T, E, k)
    return Routing(*_route_op(logits, k, SCORE_CODES[score], bool(renormalize), cap, bias))


def moe_experts(
    x: Tensor,
    routing: Routing,
    w1: Tensor,
    w2: Tensor,
    w3: Optional[Tensor] = None,
    *,
    activation: str = "swiglu",
    backend: str = "auto",
) -> Tensor:
    """The routed expert MLP and the weighted combine: ``y_t = Σ_j w_tj · MLP_{e_tj}(x_t)``.

    Args:
        x: tokens `[T, d]`, float32 / float16 / bfloat16.
        routing: the `Routing` from `pyops.moe_route` for these T tokens.
        w1: `[E, d, hidden]` (the gate projection for GLU activations), `x @ W` layout.
        w2: `[E, hidden, d]` (the down projection).
        w3: `[E, d, hidden]`, the up projection; GLU activations only.
        activation: ``"swiglu"`` (silu(x·w1) ⊙ x·w3), ``"geglu"`` (exact gelu gate), ``"gelu"``,
            ``"silu"``, ``"relu"`` (act(x·w1)).
        backend: ``"auto"`` | ``"reference"`` | ``"cpu"`` | ``"triton"`` (CUDA tensors use Triton).

    Returns:
        `y [T, d]` in x's dtype (fp32 accumulation). Dropped assignments contribute nothing.
        Differentiable w.r.t. x, w1, w2, w3 and routing.weights (hence the router logits).
    """
    r = check_experts_args(x, routing, w1, w2, w3, activation)
    name = choose_experts_backend(x, r.weights, backend)
    if name == "reference":
        return ref.experts(x, r.weights, r.experts, r.dropped, w1, w2, w3, activation)
    if name == "cpu" and not (torch.is_grad_enabled() and
                              any(t is not None and t.requires_grad for t in (x, r.weights, w1, w2, w3))):
        return _cpu_inference_op(x, r.weights, r.experts, r.order, r.offsets, r.dropped, w1, w2, w3, activation)
    return _EXPERT_OPS[name](x, r.weights, r.experts, r.order, r.offsets, r.dropped, w1, w2, w3, activation)[0]
