"""The C++ CPU path of the moe ops (pyops._C, kernels in csrc/moe/), kept apart from validation.

`pyops.moe.ops` validates, chooses the backend and registers the autograd; this module holds the
registered ops of the C++ path, their fake kernels and the calls into pyops._C:

    pyops::moe_route                   top-k routing, one native pass (`pyops._C.moe_route`); the
                                       CUDA kernel of the same op is registered by backend_cuda.py
    pyops::moe_experts_cpu             gather → per-expert torch.mm on contiguous row slices → fused
                                       activation → torch.mm → combine (native gather/act/combine)
    pyops::moe_experts_cpu_backward    the mirror image
    pyops::moe_experts_cpu_inference   y only, when no gradient is needed (intermediates in scratch)

The GEMMs are torch.mm on fp32 copies; the native helpers do what torch would do in several passes
(gather, activation forward/backward, weighted combine, scatter-add), on torch's thread team.
Large fp32 buffers come from the per-thread pools of pyops/moe/pool.py. The forward ops check the
routing before any native call: `offsets` a prefix sum from 0 to T·k, every row of expert e's slice
of `order` an assignment to e.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyops import _native
from pyops._backend import Capability
from pyops.moe import schema as S
from pyops.moe.pool import HAS_USE_COUNT, saved_pool, workspace

GLU = S.GLU

# The native entry points each op needs (a build without them degrades with the reason).
ROUTE = Capability("cpu", functions=("moe_route",))
EXPERTS = Capability("cpu", functions=("moe_route", "moe_gather", "moe_act_forward", "moe_act_backward",
                                       "moe_combine", "moe_combine_backward", "moe_scatter_add"))


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("pyops::moe_route", mutates_args=(), device_types="cpu")
def route_op(logits: Tensor, k: int, score: int, renormalize: bool, capacity: int, bias: Optional[Tensor],
             n_group: int = 0, topk_group: int = 0,
             routed_scaling: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """n_group, topk_group: DeepSeek-V3 group-limited routing (0, 0: none); routed_scaling multiplies
    the weights (docs/moe.md#definition)."""
    return S.run_native_route(logits, k, score, renormalize, capacity, bias,
                              lambda *args, **kw: _native.cpu_module.moe_route(*args, torch.get_num_threads(), **kw),
                              n_group, topk_group, routed_scaling)


route_op.register_fake(S.route_fake)


# --------------------------------------------------------------------------------------------
# Expert MLP
# --------------------------------------------------------------------------------------------

def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _f32_mm(t: Optional[Tensor]) -> Optional[Tensor]:
    """An expert weight as the fp32 operand of torch.mm: the weights feed only torch.mm, which takes
    any strides (BLAS transposes a column-major slice), so a view of a model's stored layout (e.g.
    Hugging Face's [E, out, in] transposed) is used as it is — no per-call copy of fp32 weights."""
    return None if t is None else t.detach().to(torch.float32)


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


def _cpu_forward(x: Tensor, weights: Tensor, experts: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
                 w1: Tensor, w2: Tensor, w3: Optional[Tensor], activation: str, scratch: bool,
                 b1: Optional[Tensor], b2: Optional[Tensor], b3: Optional[Tensor], alpha: float, limit: float):
    """The CPU forward, one expert at a time: a = rows·w1 + b1, b = rows·w3 + b3, h = act(a, b),
    ys = h·w2 + b2 (biases optional) on
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
        y = saved_pool.take_out((T, d), x.dtype)
        ys = workspace.get("dys", n, d)
        a, b = None, None   # per-expert buffers below
    elif n == 0 or not HAS_USE_COUNT:
        y, a, b, _, ys = S.experts_outputs(x, order, w1, glu, with_h=False)
    else:
        y = saved_pool.take_out((T, d), x.dtype)
        a = saved_pool.take(n, h_)
        b = saved_pool.take(n, h_) if glu else torch.empty(0)
        ys = saved_pool.take(n, d)
    if n == 0:
        y.zero_()
        return y, a, b, torch.empty(0), ys
    E = w1.shape[0]
    act = S.ACT_CODES[activation]
    nt = _nt()
    xf, w1f, w2f, w3f = _f32(x), _f32_mm(w1), _f32_mm(w2), _f32_mm(w3)
    b1f, b2f, b3f = _f32(b1), _f32(b2), _f32(b3)
    order = order.contiguous()
    rows = workspace.gathered_rows(x, xf, order, k, nt, fresh=True)
    hbuf = workspace.get("h", rmax, h_)
    if scratch:
        abuf = workspace.get("da", rmax, h_)
        bbuf = workspace.get("db", rmax, h_) if glu else None
    for e in range(E):
        s, t = offs[e], offs[e + 1]
        if s == t:
            continue
        m = t - s
        ae = abuf[:m] if scratch else a[s:t]
        be = (bbuf[:m] if scratch else b[s:t]) if glu else None
        he = hbuf[:m]
        _mm_bias(rows[s:t], w1f[e], b1f, e, ae)
        if glu:
            _mm_bias(rows[s:t], w3f[e], b3f, e, be)
        # all threads: the native kernels run on torch's OpenMP team (the thread pool of csrc/common/),
        # the very workers the GEMM just used, so a fan-out right after torch.mm finds them awake
        C.moe_act_forward(ae.data_ptr(), be.data_ptr() if glu else 0, he.data_ptr(), m, h_, act, 0, nt, alpha, limit)
        _mm_bias(he, w2f[e], b2f, e, ys[s:t])
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
def experts_op(x: Tensor, weights: Tensor, experts: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
               w1: Tensor, w2: Tensor, w3: Optional[Tensor], activation: str, b1: Optional[Tensor] = None,
               b2: Optional[Tensor] = None, b3: Optional[Tensor] = None, alpha: float = S.ALPHA,
               limit: float = S.LIMIT) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if not S.exact_experts(x, weights, w1, w2, w3, b1, b2, b3):
        return S.reference_experts_outputs(x, weights, order, offsets, dropped, w1, w2, w3, activation, False,
                                           b1, b2, b3, alpha, limit)
    return _cpu_forward(x, weights, experts, order, offsets, dropped, w1, w2, w3, activation, False,
                        b1, b2, b3, alpha, limit)


@torch.library.custom_op("pyops::moe_experts_cpu_inference", mutates_args=(), device_types="cpu")
def inference_op(x: Tensor, weights: Tensor, experts: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
                 w1: Tensor, w2: Tensor, w3: Optional[Tensor], activation: str, b1: Optional[Tensor] = None,
                 b2: Optional[Tensor] = None, b3: Optional[Tensor] = None, alpha: float = S.ALPHA,
                 limit: float = S.LIMIT) -> Tensor:
    """y only, for calls that need no gradient (intermediates in the workspace). No autograd."""
    if not S.exact_experts(x, weights, w1, w2, w3, b1, b2, b3):
        return S.reference_experts(x, weights, order, offsets, dropped, w1, w2, w3, activation, b1, b2, b3, alpha,
                                   limit)
    return _cpu_forward(x, weights, experts, order, offsets, dropped, w1, w2, w3, activation, True,
                        b1, b2, b3, alpha, limit)[0]


@inference_op.register_fake
def _cpu_inference_fake(x, weights, experts, order, offsets, dropped, w1, w2, w3, activation, b1=None, b2=None,
                        b3=None, alpha=S.ALPHA, limit=S.LIMIT):
    return x.new_empty(x.shape)  # y is allocated contiguous whatever x's strides


def _mm_bias(rows: Tensor, w: Tensor, bias: Optional[Tensor], e: int, out: Tensor) -> None:
    """out = rows·w (+ bias[e], broadcast over the rows)."""
    if bias is None:
        torch.mm(rows, w, out=out)
    else:
        torch.addmm(bias[e], rows, w, out=out)


@torch.library.custom_op("pyops::moe_experts_cpu_backward", mutates_args=(), device_types="cpu")
def backward_op(dy: Tensor, x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
                w1: Tensor, w2: Tensor, w3: Optional[Tensor], a: Tensor, b: Tensor, hh: Tensor, ys: Tensor,
                activation: str, b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
                b3: Optional[Tensor] = None, alpha: float = S.ALPHA,
                limit: float = S.LIMIT) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The mirror image, one expert at a time after the global combine-backward and gather:
    dh = dys·w2ᵀ, (da, db) = act'(dh) and h = act(a, b) in one pass (h recomputed unless given),
    dW2 = hᵀ·dys, db2 = Σ_rows dys,
    dxs = da·w1ᵀ + db·w3ᵀ (into dys's rows, consumed by then), dW1 = rowsᵀ·da, dW3 = rowsᵀ·db,
    db1 = Σ_rows da, db3 = Σ_rows db; then one scatter-add. Scratch: two [T·k, d] buffers and four
    of one expert's rows × hidden."""
    if not S.exact_experts(dy, x, weights, w1, w2, w3, b1, b2, b3):
        return S.reference_experts_backward(dy, x, weights, order, offsets, dropped, w1, w2, w3, activation,
                                            b1, b2, b3, alpha, limit)
    C = _native.cpu_module
    T, d = x.shape
    k = weights.shape[1]
    n = T * k
    E, _, h = w1.shape
    glu = activation in GLU
    act = S.ACT_CODES[activation]
    take = saved_pool.take_out
    dx32 = take((T, d), torch.float32)
    dw32 = torch.zeros(T, k, dtype=torch.float32)
    # every expert's slice is written below (by torch.mm, or zeroed for an expert with no rows)
    dw1 = take((E, d, h), torch.float32)
    dw2 = take((E, h, d), torch.float32)
    dw3 = take((E, d, h), torch.float32) if glu else None
    db1 = torch.empty(E, h, dtype=torch.float32) if b1 is not None else None
    db2 = torch.empty(E, d, dtype=torch.float32) if b2 is not None else None
    db3 = torch.empty(E, h, dtype=torch.float32) if b3 is not None and glu else None
    offs = _slices(offsets, n)
    for e in range(E):
        if offs[e] == offs[e + 1]:
            for dw in (dw1, dw2, dw3, db1, db2, db3):
                if dw is not None:
                    dw[e].zero_()
    if n == 0:
        dx32.zero_()
    else:
        nt = _nt()
        rmax = max(offs[e + 1] - offs[e] for e in range(E))
        xf, w1f, w2f, w3f = _f32(x), _f32_mm(w1), _f32_mm(w2), _f32_mm(w3)
        order = order.contiguous()
        dyf = _f32(dy)
        wf = _f32(weights)
        dr = dropped.contiguous().view(torch.uint8)
        dys = workspace.get("dys", n, d)
        C.moe_combine_backward(dyf.data_ptr(), ys.data_ptr(), order.data_ptr(), wf.data_ptr(), dr.data_ptr(),
                               k, T, d, dys.data_ptr(), dw32.data_ptr(), 0, nt)
        rows = workspace.gathered_rows(x, xf, order, k, nt, fresh=False)
        recompute = hh.numel() == 0   # the CPU forward saves no h
        hbuf = workspace.get("h", rmax, h) if recompute else None
        dhbuf = workspace.get("dh", rmax, h)
        dabuf = workspace.get("da", rmax, h)
        dbbuf = workspace.get("db", rmax, h) if glu else None
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
                               dbe.data_ptr() if glu else 0, m, h, act, 0, nt, he.data_ptr() if recompute else 0,
                               alpha, limit)
            torch.mm(he.t(), dys[s:t], out=dw2[e])
            if db2 is not None:
                torch.sum(dys[s:t], 0, out=db2[e])
            if db1 is not None:
                torch.sum(dae, 0, out=db1[e])
            if db3 is not None:
                torch.sum(dbe, 0, out=db3[e])
            dxs = dys[s:t]   # this expert's dys rows are consumed: its dxs rows go there
            torch.mm(dae, w1f[e].t(), out=dxs)
            torch.mm(rows[s:t].t(), dae, out=dw1[e])
            if glu:
                dxs.addmm_(dbe, w3f[e].t())
                torch.mm(rows[s:t].t(), dbe, out=dw3[e])
        del rows, hbuf, dhbuf, dabuf, dbbuf
        C.moe_scatter_add(dys.data_ptr(), order.data_ptr(), k, T, d, dx32.data_ptr(), 0, nt)
    def cast(g: Optional[Tensor], like: Optional[Tensor]) -> Tensor:
        return torch.empty(0, dtype=x.dtype) if g is None else g.to(like.dtype)

    return (dx32.to(x.dtype), dw32.to(weights.dtype), dw1.to(w1.dtype), dw2.to(w2.dtype),
            dw3.to(w1.dtype) if glu else torch.empty(0, dtype=w1.dtype), cast(db1, b1), cast(db2, b2), cast(db3, b3))


def _cpu_experts_fake(x, weights, experts, order, offsets, dropped, w1, w2, w3, activation, b1=None, b2=None,
                      b3=None, alpha=S.ALPHA, limit=S.LIMIT):
    return S.experts_outputs(x, order, w1, activation in GLU, with_h=False)


experts_op.register_fake(_cpu_experts_fake)
backward_op.register_fake(S.experts_backward_fake)
