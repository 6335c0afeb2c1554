"""Triton kernels of the routed expert MLP (`pyops.kernels.moe`).

The math is in `pyops/moe/reference.py`; the registered ops that call these launchers are in
`pyops/moe/backend_triton.py`. Rows are assignments in `order` (row r belongs to assignment
order[r], token order[r] // k); expert e owns rows offsets[e]:offsets[e+1].

Forward
    1. grouped GEMM, gather fused: a = x[order // k] @ w1[e] (and b = ... @ w3[e] for GLU, both in
       the same program, sharing the x tile), activation fused in the epilogue: h = gate(a)·b / act(a).
    2. grouped GEMM: ys = h @ w2[e] (+ b2[e]); step 1 adds b1[e] / b3[e] to a / b.
    3. combine (deterministic, no atomics): y[t] = Σ_j [not dropped] w[t, j] · ys[pos(t·k + j)],
       a gather + a fixed-order sum over j (torch ops on the [T, k, d] view).
Backward
    1. combine backward (torch ops): dys[r] = w·dy[token] (0 if dropped), dweights = <dy, ys>.
    2. grouped GEMM with transposed w2, activation backward fused: da, db from dys @ w2[e]ᵀ.
    3. grouped GEMM with transposed w1/w3, two products summed: dxs = da @ w1[e]ᵀ + db @ w3[e]ᵀ;
       dx[t] = Σ_j dxs[pos(t·k + j)] (fixed order).
    4. per-expert weight gradients, one program per (expert, tile of the weight), looping over the
       expert's rows: dw2[e] = hᵀ·dys, dw1[e] = x[order // k]ᵀ·da and dw3[e] = ...ᵀ·db (gather fused,
       both in one program); the bias gradients db2, db1, db3 = column sums of dys, da, db.
The weights are read with their own strides (w1 and w3 share theirs), so views of a model's
stored layout (transposed, fused halves, interleaved columns) need no copy.

Tiles are scheduled from `offsets` on the device (no host sync, no padded copies): each expert
gets ceil(count/BM) row tiles; the grid has the static bound T·k // BM + E tiles and the spare
programs return at once. Intermediates (a, b, h, ys, ...) are fp32; products run on tensor cores
in the input dtype (fp32 inputs: IEEE fp32 dot). Under TRITON_INTERPRET=1 every operand is upcast
to fp32 before tl.dot (bf16 dots are wrong in the interpreter).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks(n_cols: int, k_dim: int):
    if _interpreting():
        return 16, 16, 16
    bn = 128 if n_cols >= 128 else 64 if n_cols >= 64 else 32 if n_cols >= 32 else 16
    bk = 32 if k_dim >= 32 else 16
    return 64, bn, bk


@triton.jit
def _gelu(a):
    return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _grouped_kernel(
    a_ptr, a2_ptr, b_ptr, b2_ptr, c_ptr, c2_ptr, h_ptr, pa_ptr, pb_ptr, bias_ptr, bias2_ptr,
    order_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
    N, KD, TOPK, n_experts,
    s_be, s_bk, s_bn, alpha, limit,
    GATHER: tl.constexpr, DUAL_B: tl.constexpr, DUAL_A: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr,
    DOT_F32: tl.constexpr, OP_DTYPE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """C[r, n] = Σ_kk A[row(r), kk] · B[e, kk, n] (+ bias[e, n]) over the rows r of one tile of expert e.

    A rows: x[order[r] // TOPK] (GATHER) or A[r]. B[e, kk, n] at b_ptr + e·s_be + kk·s_bk + n·s_bn
    (B2 with the same strides). Biases: fp32 [E, N] contiguous (HAS_BIAS: added to C; HAS_BIAS2:
    to C2), in MODE 0 and 1.
    MODE 0: store C.   MODE 1 (forward 1): C = a, C2 = b (DUAL_B: second product with B2), H = act.
    MODE 2 (backward 2): dh = the product; load pre-activations PA (, PB) and store da → C, db → C2.
    DUAL_A: C = A·B + A2·B2 (backward 3). ACT 5 (swiglu_oai) reads alpha and limit.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= n_experts:
        return
    row0 = tl.load(tile_row_ptr + pid_m).to(tl.int64)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    if GATHER:
        src = tl.load(order_ptr + rows, mask=rmask, other=0) // TOPK
    else:
        src = rows
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    b_base = b_ptr + e.to(tl.int64) * s_be
    b2_base = b2_ptr + e.to(tl.int64) * s_be
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, KD, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < KD
        a_t = tl.load(a_ptr + src[:, None] * KD + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        a_t = a_t.to(OP_DTYPE)
        boffs = ks[:, None] * s_bk + cols[None, :] * s_bn
        bmask = kmask[:, None] & cmask[None, :]
        b_t = tl.load(b_base + boffs, mask=bmask, other=0.0).to(OP_DTYPE)
        acc += _dot(a_t, b_t, DOT_F32)
        if DUAL_B:
            b2_t = tl.load(b2_base + boffs, mask=bmask, other=0.0).to(OP_DTYPE)
            acc2 += _dot(a_t, b2_t, DOT_F32)
        if DUAL_A:
            a2_t = tl.load(a2_ptr + src[:, None] * KD + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                           other=0.0).to(OP_DTYPE)
            b2_t = tl.load(b2_base + boffs, mask=bmask, other=0.0).to(OP_DTYPE)
            acc += _dot(a2_t, b2_t, DOT_F32)
    out_offs = rows[:, None] * N + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e.to(tl.int64) * N + cols, mask=cmask, other=0.0)[None, :]
    if HAS_BIAS2:
        acc2 += tl.load(bias2_ptr + e.to(tl.int64) * N + cols, mask=cmask, other=0.0)[None, :]
    if MODE == 0:
        tl.store(c_ptr + out_offs, acc, mask=omask)
    elif MODE == 1:
        tl.store(c_ptr + out_offs, acc, mask=omask)
        if DUAL_B:
            tl.store(c2_ptr + out_offs, acc2, mask=omask)
        if ACT == 0:
            h = acc * tl.sigmoid(acc) * acc2
        elif ACT == 1:
            h = _gelu(acc) * acc2
        elif ACT == 2:
            h = _gelu(acc)
        elif ACT == 3:
            h = acc * tl.sigmoid(acc)
        elif ACT == 5:
            g = tl.where(acc > limit, limit, acc)
            u = tl.where(acc2 < -limit, -limit, tl.where(acc2 > limit, limit, acc2))
            h = (u + 1.0) * (g * tl.sigmoid(alpha * g))
        else:
            h = tl.maximum(acc, 0.0)
        tl.store(h_ptr + out_offs, h, mask=omask)
    elif ACT == 5:
        # gate g = min(a, limit), up u = clamp(b, ±limit): gradients inside the intervals, bounds included
        pa = tl.load(pa_ptr + out_offs, mask=omask, other=0.0)
        pb = tl.load(pb_ptr + out_offs, mask=omask, other=0.0)
        gate_in = pa <= limit
        g = tl.where(gate_in, pa, limit)
        up_in = (pb >= -limit) & (pb <= limit)
        u1 = tl.where(pb < -limit, -limit, tl.where(pb > limit, limit, pb)) + 1.0
        s = tl.sigmoid(alpha * g)
        tl.store(c_ptr + out_offs, tl.where(gate_in, acc * u1 * (s + g * alpha * s * (1.0 - s)), 0.0), mask=omask)
        tl.store(c2_ptr + out_offs, tl.where(up_in, acc * (g * s), 0.0), mask=omask)
    else:
        pa = tl.load(pa_ptr + out_offs, mask=omask, other=0.0)
        if ACT == 0 or ACT == 3:
            s = tl.sigmoid(pa)
            g = pa * s
            dg = s * (1.0 + pa * (1.0 - s))
        elif ACT == 1 or ACT == 2:
            cdf = 0.5 * (1.0 + tl.math.erf(pa * 0.7071067811865476))
            g = pa * cdf
            dg = cdf + pa * 0.3989422804014327 * tl.exp(-0.5 * pa * pa)
        else:
            g = tl.maximum(pa, 0.0)
            dg = tl.where(pa > 0.0, 1.0, 0.0)
        if ACT == 0 or ACT == 1:
            pb = tl.load(pb_ptr + out_offs, mask=omask, other=0.0)
            tl.store(c_ptr + out_offs, acc * pb * dg, mask=omask)
            tl.store(c2_ptr + out_offs, acc * g, mask=omask)
        else:
            tl.store(c_ptr + out_offs, acc * dg, mask=omask)


@triton.jit
def _weight_grad_kernel(
    a_ptr, g_ptr, g2_ptr, dw_ptr, dw2_ptr, order_ptr, offsets_ptr,
    KD, N, TOPK,
    GATHER: tl.constexpr, DUAL_G: tl.constexpr, DOT_F32: tl.constexpr, OP_DTYPE: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):
    """dW[e, i, n] = Σ_{rows r of e} A[row(r), i] · G[r, n] (and dW2 with G2), one program per tile of dW[e]."""
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    ks = pid_k * BK + tl.arange(0, BK)
    kmask = ks < KD
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    acc2 = tl.zeros((BK, BN), dtype=tl.float32)
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < end
        if GATHER:
            src = tl.load(order_ptr + rows, mask=rmask, other=0) // TOPK
        else:
            src = rows
        a_t = tl.load(a_ptr + src[None, :] * KD + ks[:, None], mask=kmask[:, None] & rmask[None, :], other=0.0)
        a_t = a_t.to(OP_DTYPE)
        gmask = rmask[:, None] & cmask[None, :]
        g_t = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=gmask, other=0.0).to(OP_DTYPE)
        acc += _dot(a_t, g_t, DOT_F32)
        if DUAL_G:
            g2_t = tl.load(g2_ptr + rows[:, None] * N + cols[None, :], mask=gmask, other=0.0).to(OP_DTYPE)
            acc2 += _dot(a_t, g2_t, DOT_F32)
    base = e.to(tl.int64) * KD * N
    offs = ks[:, None] * N + cols[None, :]
    omask = kmask[:, None] & cmask[None, :]
    tl.store(dw_ptr + base + offs, acc, mask=omask)
    if DUAL_G:
        tl.store(dw2_ptr + base + offs, acc2, mask=omask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _op_dtype(dtype: torch.dtype):
    """(DOT_F32, operand dtype): fp32 IEEE dots for fp32 inputs and under the interpreter."""
    if dtype == torch.float32 or _interpreting():
        return True, tl.float32
    return False, _TL_DTYPES[dtype]


def _schedule(offsets: Tensor, n_rows: int, BM: int):
    """Per row tile: its expert (E for the spare tiles) and first row; static length n_rows // BM + E."""
    E = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + BM - 1) // BM
    ends = torch.cumsum(tiles, 0)
    n_tiles = n_rows // BM + E
    ids = torch.arange(n_tiles, device=offsets.device)
    expert = torch.searchsorted(ends, ids, right=True)
    e_c = expert.clamp(max=E - 1)
    row = offsets[e_c] + (ids - (ends[e_c] - tiles[e_c])) * BM
    return expert.to(torch.int32).contiguous(), row.to(torch.int64).contiguous(), n_tiles


def _grouped(a, b, c, *, order, offsets, n_rows, k_topk, N, KD, b_strides, a2=None, b2=None, c2=None, h=None,
             pa=None, pb=None, bias=None, bias2=None, gather=False, mode=0, act=0, alpha=1.702, limit=7.0,
             dtype=torch.float32):
    BM, BN, BK = _blocks(N, KD)
    te, tr, n_tiles = _schedule(offsets, n_rows, BM)
    dot_f32, op_dtype = _op_dtype(dtype)
    dummy = c
    kernel = torch.library.wrap_triton(_grouped_kernel)
    kernel[(n_tiles, triton.cdiv(N, BN))](
        a, a2 if a2 is not None else a, b, b2 if b2 is not None else b, c, c2 if c2 is not None else dummy,
        h if h is not None else dummy, pa if pa is not None else dummy, pb if pb is not None else dummy,
        bias if bias is not None else dummy, bias2 if bias2 is not None else dummy,
        order, te, tr, offsets, N, KD, k_topk, offsets.shape[0] - 1, *b_strides, float(alpha), float(limit),
        GATHER=gather, DUAL_B=(mode == 1 and b2 is not None), DUAL_A=a2 is not None, MODE=mode, ACT=act,
        HAS_BIAS=bias is not None, HAS_BIAS2=bias2 is not None,
        DOT_F32=dot_f32, OP_DTYPE=op_dtype, BM=BM, BN=BN, BK=BK)


def _weight_grad(a, g, dw, *, order, offsets, k_topk, KD, N, g2=None, dw2=None, gather=False,
                 dtype=torch.float32):
    E = offsets.shape[0] - 1
    if _interpreting():
        BM, BK, BN = 16, 16, 16
    else:
        BM, BK, BN = 32, 64, 64
    dot_f32, op_dtype = _op_dtype(dtype)
    kernel = torch.library.wrap_triton(_weight_grad_kernel)
    kernel[(E, triton.cdiv(KD, BK), triton.cdiv(N, BN))](
        a, g, g2 if g2 is not None else g, dw, dw2 if dw2 is not None else dw, order, offsets, KD, N, k_topk,
        GATHER=gather, DUAL_G=g2 is not None, DOT_F32=dot_f32, OP_DTYPE=op_dtype, BM=BM, BK=BK, BN=BN)


def _inverse(order: Tensor) -> Tensor:
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.shape[0], device=order.device)
    return pos


def _kept_weights(weights: Tensor, dropped: Tensor) -> Tensor:
    return torch.where(dropped, torch.zeros((), dtype=torch.float32, device=weights.device), weights.float())


def _strides(w: Tensor, transpose: bool = False) -> tuple:
    """(s_be, s_bk, s_bn) of B[e, kk, n] = w[e, kk, n], or w[e, n, kk] when transposed: the kernels
    read the weights where they are (views of a model's layout need no copy)."""
    s0, s1, s2 = w.stride()
    return (s0, s2, s1) if transpose else (s0, s1, s2)


def _f32_bias(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.to(torch.float32).contiguous()


def experts_forward(x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor, w1: Tensor,
                    w2: Tensor, w3: Optional[Tensor], act: int, y: Tensor, a: Tensor, b: Tensor, h: Tensor,
                    ys: Tensor, b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
                    b3: Optional[Tensor] = None, alpha: float = 1.702, limit: float = 7.0) -> None:
    """Fill y [T, d] (x's dtype) and the fp32 intermediates a, b, h [T*k, hidden], ys [T*k, d].
    w1 and w3 share their strides (any); biases [E, N] of any layout (converted to fp32)."""
    T, d = x.shape
    k = weights.shape[1]
    n = T * k
    hid = w1.shape[2]
    if n == 0:
        y.zero_()
        return
    order = order.contiguous()
    offsets = offsets.contiguous()
    glu = w3 is not None
    _grouped(x, w1, a, b2=w3 if glu else None, c2=b if glu else None, h=h, order=order, offsets=offsets,
             n_rows=n, k_topk=k, N=hid, KD=d, b_strides=_strides(w1), bias=_f32_bias(b1),
             bias2=_f32_bias(b3) if glu else None, gather=True, mode=1, act=act, alpha=alpha, limit=limit,
             dtype=x.dtype)
    _grouped(h, w2, ys, order=order, offsets=offsets, n_rows=n, k_topk=k, N=d, KD=hid,
             b_strides=_strides(w2), bias=_f32_bias(b2), mode=0, dtype=x.dtype)
    w = _kept_weights(weights, dropped)
    y.copy_((ys[_inverse(order)].view(T, k, d) * w[:, :, None]).sum(1))


def experts_backward(dy: Tensor, x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
                     w1: Tensor, w2: Tensor, w3: Optional[Tensor], a: Tensor, b: Tensor, h: Tensor, ys: Tensor,
                     act: int, b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
                     b3: Optional[Tensor] = None, alpha: float = 1.702, limit: float = 7.0):
    """(dx, dweights, dw1, dw2, dw3, db1, db2, db3) — empty tensors for the absent ones (dw3 for
    non-GLU activations, the gradients of absent biases). The bias gradients are the per-expert
    column sums of da, dys, db: the weight-gradient kernel with a column of ones, in fp32 (fixed
    order, no atomics)."""
    T, d = x.shape
    k = weights.shape[1]
    n = T * k
    E, _, hid = w1.shape
    glu = w3 is not None
    f32 = dict(dtype=torch.float32, device=x.device)
    dw1 = torch.zeros(E, d, hid, **f32)
    dw2 = torch.zeros(E, hid, d, **f32)
    dw3 = torch.zeros(E, d, hid, **f32) if glu else None
    db1 = torch.zeros(E, 1, hid, **f32) if b1 is not None else None
    db2 = torch.zeros(E, 1, d, **f32) if b2 is not None else None
    db3 = torch.zeros(E, 1, hid, **f32) if b3 is not None and glu else None

    def out(g: Optional[Tensor], like: Optional[Tensor]) -> Tensor:
        return x.new_empty(0) if g is None else g.view(like.shape).to(like.dtype)

    if n == 0:
        return (x.new_zeros(x.shape), weights.new_zeros(weights.shape), dw1.to(w1.dtype), dw2.to(w2.dtype),
                dw3.to(w1.dtype) if glu else w1.new_empty(0), out(db1, b1), out(db2, b2), out(db3, b3))
    order = order.contiguous()
    offsets = offsets.contiguous()
    pos = _inverse(order)
    keep_w = _kept_weights(weights, dropped)
    dyf = dy.float()
    # combine backward
    dweights = (ys[pos].view(T, k, d) * dyf[:, None, :]).sum(-1)
    dweights = torch.where(dropped, torch.zeros_like(dweights), dweights)
    dys = (dyf[order // k] * keep_w.reshape(-1)[order][:, None]).contiguous()
    # dh = dys @ w2[e]^T, activation backward fused
    da = torch.empty(n, hid, **f32)
    db = torch.empty(n, hid, **f32) if glu else None
    _grouped(dys, w2, da, c2=db, pa=a, pb=b if glu else None, order=order, offsets=offsets, n_rows=n, k_topk=k,
             N=hid, KD=d, b_strides=_strides(w2, transpose=True), mode=2, act=act, alpha=alpha, limit=limit,
             dtype=x.dtype)
    _weight_grad(h, dys, dw2, order=order, offsets=offsets, k_topk=k, KD=hid, N=d, dtype=x.dtype)
    # dxs = da @ w1[e]^T + db @ w3[e]^T
    dxs = torch.empty(n, d, **f32)
    _grouped(da, w1, dxs, a2=db, b2=w3 if glu else None, order=order, offsets=offsets, n_rows=n, k_topk=k, N=d,
             KD=hid, b_strides=_strides(w1, transpose=True), mode=0, dtype=x.dtype)
    _weight_grad(x, da, dw1, g2=db, dw2=dw3, order=order, offsets=offsets, k_topk=k, KD=d, N=hid, gather=True,
                 dtype=x.dtype)
    if db1 is not None or db2 is not None or db3 is not None:
        ones = torch.ones(n, 1, **f32)
        if db2 is not None:
            _weight_grad(ones, dys, db2, order=order, offsets=offsets, k_topk=k, KD=1, N=d)
        if db1 is not None or db3 is not None:
            _weight_grad(ones, da if db1 is not None else db, db1 if db1 is not None else db3,
                         g2=db if db1 is not None and db3 is not None else None,
                         dw2=db3 if db1 is not None else None, order=order, offsets=offsets, k_topk=k, KD=1, N=hid)
    dx = dxs[pos].view(T, k, d).sum(1)
    return (dx.to(x.dtype), dweights.to(weights.dtype), dw1.to(w1.dtype), dw2.to(w2.dtype),
            dw3.to(w1.dtype) if glu else w1.new_empty(0), out(db1, b1), out(db2, b2), out(db3, b3))
