"""Triton kernels for neighbourhood attention (`pyops.kernels.neighborhood`).

The math is in `pyops/neighborhood/reference.py`; the registered ops that call these launchers are
in `pyops/neighborhood/backend_triton.py`. Every problem arrives in the 3D form q/k
``[B, S0, S1, S2, H, D]``, v/out ``[B, S0, S1, S2, H, Dv]`` (1D/2D problems have leading extents 1
with kernel 1), contiguous; rpb (when given) ``[H, 2k₀−1, 2k₁−1, 2k₂−1]`` fp32, lse fp32.

Design:
* Window tables. Per dimension the window rule is evaluated once on the host (a few int32 vectors
  of the extent's length, built with torch ops, no host sync): ``lo[x], hi[x]`` the in-group key
  range of query x (inclusive; causal windows end at the query), and the inverse
  ``qlo[y], qhi[y]``, the in-group range of the queries that see key y. Windows are monotone in the
  query index, so each inverse set is one contiguous range.
* Forward / dq: a program owns a tile of BQ consecutive in-group queries along the last
  dimension (one dilation group, fixed coordinates in the first two dimensions) for one (b, h).
  The union of the tile's windows along the last dimension is the contiguous in-group range
  [lo[first], hi[last]], visited in key tiles of BK; the first two dimensions loop over their
  (scalar) windows. Dilation is index remapping: in-group index j of group g is position j·d + g,
  nothing is copied. Each (query, key) element is tested against the query's window in-kernel;
  the relative positional bias is gathered in-kernel; online softmax in fp32; the lse is stored.
* Backward: delta = rowsum(dout·out) (torch; for fp16/bf16 the dq kernel recomputes it in fp32
  from the window, since the stored output is rounded); the dq kernel recomputes p = exp(s − lse) and
  writes, when there is an rpb, the logit gradient ds of every window slot into a
  [B, S, H, K0, K1, K2] buffer, from which drpb is a chain of one-hot contractions (matmuls, no
  atomics). The dk/dv kernel is key-centric: a program owns a tile of keys and visits the queries
  of the inverse neighbourhood, so dk/dv are written once, race-free and deterministic.
* Under TRITON_INTERPRET=1 operands are upcast to fp32 before tl.dot (bf16 tl.dot is wrong in the
  interpreter) and blocks are 16; on a GPU fp32 dots use IEEE precision (no TF32).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from pyops._triton import interpreting


# --------------------------------------------------------------------------------------------
# Window tables
# --------------------------------------------------------------------------------------------

def window_tables(S: int, k: int, s: int, d: int, causal: bool, device) -> Tensor:
    """int32 [4, S]: rows lo, hi (in-group key range of query x), qlo, qhi (in-group query range of key y)."""
    x = torch.arange(S, device=device)
    g, i = x % d, x // d
    Lg = (S - g + d - 1) // d
    if causal:
        leader = torch.minimum((i // s) * s + s - 1, Lg - 1)
        lo = (leader - k + 1).clamp(min=0)
        hi = i
    else:
        leader = torch.minimum((i // s) * s + s // 2, Lg - 1)
        lo = torch.minimum((leader - k // 2).clamp(min=0), Lg - k)
        hi = lo + k - 1
    # Per group, lo and hi are non-decreasing in the in-group query index: the queries seeing key j
    # are those with hi >= j (from the first such) and lo <= j (up to the last such).
    Lmax = (S + d - 1) // d
    big = S + 1
    lo_g = torch.full((d, Lmax), big, dtype=torch.long, device=device)
    hi_g = torch.full((d, Lmax), big, dtype=torch.long, device=device)
    lo_g[g, i] = lo
    hi_g[g, i] = hi
    jj = torch.full((d, Lmax), 0, dtype=torch.long, device=device)
    jj[g, i] = i
    qlo_g = torch.searchsorted(hi_g, jj, side="left")
    qhi_g = torch.searchsorted(lo_g, jj, side="right") - 1
    qlo, qhi = qlo_g[g, i], qhi_g[g, i]
    return torch.stack([lo, hi, qlo, qhi]).to(torch.int32).contiguous()


def rel_onehot(S: int, k: int, d: int, lo: Tensor) -> Tensor:
    """fp32 [S, k, 2k−1]: slot t of query x has relative-bias index (lo[x] + t) − x//d + k − 1."""
    x = torch.arange(S, device=lo.device)
    rel = lo.long()[:, None] + torch.arange(k, device=lo.device)[None, :] - (x // d)[:, None] + k - 1
    return torch.nn.functional.one_hot(rel.clamp(0, 2 * k - 2), 2 * k - 1).to(torch.float32)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _na_fwd_kernel(Q, K, V, O, LSE, RPB, T0, T1, T2,
                   S0, S1, S2, H, D, DV, NT2,
                   K0, K1, K2, D0, D1, D2, R0, R1, R2, scale,
                   HAS_RPB: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_bh = tl.program_id(2)
    g2 = pid_t // NT2
    tile = pid_t % NT2
    x0 = pid_p // S1
    x1 = pid_p % S1
    b = pid_bh // H
    h = pid_bh % H
    Lg2 = (S2 - g2 + D2 - 1) // D2
    iq = tile * BQ + tl.arange(0, BQ)
    qmask = iq < Lg2
    x2 = iq * D2 + g2
    lo2 = tl.load(T2 + x2, mask=qmask, other=0)
    hi2 = tl.load(T2 + S2 + x2, mask=qmask, other=-1)
    kstart = tl.min(tl.where(qmask, lo2, S2 + 1), axis=0)
    kend = tl.max(tl.where(qmask, hi2, -1), axis=0)
    lo0 = tl.load(T0 + x0)
    hi0 = tl.load(T0 + S0 + x0)
    lo1 = tl.load(T1 + x1)
    hi1 = tl.load(T1 + S1 + x1)
    g0 = x0 % D0
    g1 = x1 % D1
    i0 = x0 // D0
    i1 = x1 // D1

    npos = S0 * S1 * S2
    row0 = b.to(tl.int64) * npos
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    dmask = offs_d < D
    dvmask = offs_dv < DV
    qrow = (row0 + (x0 * S1 + x1) * S2 + x2) * H + h
    q = tl.load(Q + qrow[:, None] * D + offs_d[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BQ], float("-inf"), tl.float32)
    l_i = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, BDV], tl.float32)
    for j0 in range(lo0, hi0 + 1):
        y0 = j0 * D0 + g0
        for j1 in range(lo1, hi1 + 1):
            y1 = j1 * D1 + g1
            if HAS_RPB:
                rbase = h * R0 * R1 * R2 + ((j0 - i0 + K0 - 1) * R1 + (j1 - i1 + K1 - 1)) * R2
            for kb in range(kstart, kend + 1, BK):
                jk = kb + tl.arange(0, BK)
                kmask = jk <= kend
                y2 = jk * D2 + g2
                krow = (row0 + (y0 * S1 + y1) * S2 + y2) * H + h
                kt = tl.load(K + krow[:, None] * D + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
                vt = tl.load(V + krow[:, None] * DV + offs_dv[None, :], mask=kmask[:, None] & dvmask[None, :], other=0.0)
                if UPCAST:
                    kt = kt.to(tl.float32)
                    vt = vt.to(tl.float32)
                s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
                valid = (jk[None, :] >= lo2[:, None]) & (jk[None, :] <= hi2[:, None]) & qmask[:, None] & kmask[None, :]
                if HAS_RPB:
                    ridx = rbase + (jk[None, :] - iq[:, None] + K2 - 1)
                    s += tl.load(RPB + ridx, mask=valid, other=0.0)
                s = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
                m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + qrow[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty), mask=qmask[:, None] & dvmask[None, :])
    tl.store(LSE + qrow, m_i + tl.log(l_safe), mask=qmask)


@triton.jit
def _na_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, RPB, DQ, DS, T0, T1, T2,
                      S0, S1, S2, H, D, DV, NT2,
                      K0, K1, K2, D0, D1, D2, R0, R1, R2, scale,
                      HAS_RPB: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                      EXACT_DELTA: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_bh = tl.program_id(2)
    g2 = pid_t // NT2
    tile = pid_t % NT2
    x0 = pid_p // S1
    x1 = pid_p % S1
    b = pid_bh // H
    h = pid_bh % H
    Lg2 = (S2 - g2 + D2 - 1) // D2
    iq = tile * BQ + tl.arange(0, BQ)
    qmask = iq < Lg2
    x2 = iq * D2 + g2
    lo2 = tl.load(T2 + x2, mask=qmask, other=0)
    hi2 = tl.load(T2 + S2 + x2, mask=qmask, other=-1)
    kstart = tl.min(tl.where(qmask, lo2, S2 + 1), axis=0)
    kend = tl.max(tl.where(qmask, hi2, -1), axis=0)
    lo0 = tl.load(T0 + x0)
    hi0 = tl.load(T0 + S0 + x0)
    lo1 = tl.load(T1 + x1)
    hi1 = tl.load(T1 + S1 + x1)
    g0 = x0 % D0
    g1 = x1 % D1
    i0 = x0 // D0
    i1 = x1 // D1

    npos = S0 * S1 * S2
    row0 = b.to(tl.int64) * npos
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    dmask = offs_d < D
    dvmask = offs_dv < DV
    qrow = (row0 + (x0 * S1 + x1) * S2 + x2) * H + h
    q = tl.load(Q + qrow[:, None] * D + offs_d[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
    do = tl.load(DO + qrow[:, None] * DV + offs_dv[None, :], mask=qmask[:, None] & dvmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + qrow, mask=qmask, other=0.0)
    if EXACT_DELTA:
        # delta = Σ_j p_ij (dout_i · v_j), recomputed in fp32: rowsum(dout · out) would use the
        # output rounded to fp16/bf16. Stored for the dk/dv kernel.
        delta = tl.zeros([BQ], tl.float32)
        for j0 in range(lo0, hi0 + 1):
            y0 = j0 * D0 + g0
            for j1 in range(lo1, hi1 + 1):
                y1 = j1 * D1 + g1
                if HAS_RPB:
                    rbase = h * R0 * R1 * R2 + ((j0 - i0 + K0 - 1) * R1 + (j1 - i1 + K1 - 1)) * R2
                for kb in range(kstart, kend + 1, BK):
                    jk = kb + tl.arange(0, BK)
                    kmask = jk <= kend
                    y2 = jk * D2 + g2
                    krow = (row0 + (y0 * S1 + y1) * S2 + y2) * H + h
                    kt = tl.load(K + krow[:, None] * D + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
                    vt = tl.load(V + krow[:, None] * DV + offs_dv[None, :], mask=kmask[:, None] & dvmask[None, :], other=0.0)
                    if UPCAST:
                        kt = kt.to(tl.float32)
                        vt = vt.to(tl.float32)
                    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
                    valid = (jk[None, :] >= lo2[:, None]) & (jk[None, :] <= hi2[:, None]) & qmask[:, None] & kmask[None, :]
                    if HAS_RPB:
                        ridx = rbase + (jk[None, :] - iq[:, None] + K2 - 1)
                        s += tl.load(RPB + ridx, mask=valid, other=0.0)
                    p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
                    dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
                    delta += tl.sum(p * dp, axis=1)
        tl.store(DELTA + qrow, delta, mask=qmask)
    else:
        delta = tl.load(DELTA + qrow, mask=qmask, other=0.0)
    dq = tl.zeros([BQ, BD], tl.float32)
    for j0 in range(lo0, hi0 + 1):
        y0 = j0 * D0 + g0
        for j1 in range(lo1, hi1 + 1):
            y1 = j1 * D1 + g1
            if HAS_RPB:
                rbase = h * R0 * R1 * R2 + ((j0 - i0 + K0 - 1) * R1 + (j1 - i1 + K1 - 1)) * R2
                sbase = (qrow * K0 + (j0 - lo0)) * K1 + (j1 - lo1)
            for kb in range(kstart, kend + 1, BK):
                jk = kb + tl.arange(0, BK)
                kmask = jk <= kend
                y2 = jk * D2 + g2
                krow = (row0 + (y0 * S1 + y1) * S2 + y2) * H + h
                kt = tl.load(K + krow[:, None] * D + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
                vt = tl.load(V + krow[:, None] * DV + offs_dv[None, :], mask=kmask[:, None] & dvmask[None, :], other=0.0)
                if UPCAST:
                    kt = kt.to(tl.float32)
                    vt = vt.to(tl.float32)
                s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
                valid = (jk[None, :] >= lo2[:, None]) & (jk[None, :] <= hi2[:, None]) & qmask[:, None] & kmask[None, :]
                if HAS_RPB:
                    ridx = rbase + (jk[None, :] - iq[:, None] + K2 - 1)
                    s += tl.load(RPB + ridx, mask=valid, other=0.0)
                p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
                if HAS_RPB:
                    slot = sbase[:, None] * K2 + (jk[None, :] - lo2[:, None])
                    tl.store(DS + slot, ds, mask=valid)
    dq = dq * scale
    tl.store(DQ + qrow[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


@triton.jit
def _na_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, RPB, DK, DV_, T0, T1, T2,
                        S0, S1, S2, H, D, DV, NT2,
                        K0, K1, K2, D0, D1, D2, R0, R1, R2, scale,
                        HAS_RPB: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                        BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_bh = tl.program_id(2)
    g2 = pid_t // NT2
    tile = pid_t % NT2
    y0 = pid_p // S1
    y1 = pid_p % S1
    b = pid_bh // H
    h = pid_bh % H
    Lg2 = (S2 - g2 + D2 - 1) // D2
    jk = tile * BK + tl.arange(0, BK)
    kmask = jk < Lg2
    y2 = jk * D2 + g2
    qlo2 = tl.load(T2 + 2 * S2 + y2, mask=kmask, other=S2 + 1)
    qhi2 = tl.load(T2 + 3 * S2 + y2, mask=kmask, other=-1)
    qstart = tl.min(qlo2, axis=0)
    qend = tl.max(qhi2, axis=0)
    qlo0 = tl.load(T0 + 2 * S0 + y0)
    qhi0 = tl.load(T0 + 3 * S0 + y0)
    qlo1 = tl.load(T1 + 2 * S1 + y1)
    qhi1 = tl.load(T1 + 3 * S1 + y1)
    g0 = y0 % D0
    g1 = y1 % D1
    j0 = y0 // D0
    j1 = y1 // D1

    npos = S0 * S1 * S2
    row0 = b.to(tl.int64) * npos
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    dmask = offs_d < D
    dvmask = offs_dv < DV
    krow = (row0 + (y0 * S1 + y1) * S2 + y2) * H + h
    kt = tl.load(K + krow[:, None] * D + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
    vt = tl.load(V + krow[:, None] * DV + offs_dv[None, :], mask=kmask[:, None] & dvmask[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    dk = tl.zeros([BK, BD], tl.float32)
    dv = tl.zeros([BK, BDV], tl.float32)
    for i0 in range(qlo0, qhi0 + 1):
        x0 = i0 * D0 + g0
        for i1 in range(qlo1, qhi1 + 1):
            x1 = i1 * D1 + g1
            if HAS_RPB:
                rbase = h * R0 * R1 * R2 + ((j0 - i0 + K0 - 1) * R1 + (j1 - i1 + K1 - 1)) * R2
            for qb in range(qstart, qend + 1, BQ):
                iq = qb + tl.arange(0, BQ)
                qm = iq <= qend
                x2 = iq * D2 + g2
                lo2 = tl.load(T2 + x2, mask=qm, other=0)
                hi2 = tl.load(T2 + S2 + x2, mask=qm, other=-1)
                qrow = (row0 + (x0 * S1 + x1) * S2 + x2) * H + h
                q = tl.load(Q + qrow[:, None] * D + offs_d[None, :], mask=qm[:, None] & dmask[None, :], other=0.0)
                do = tl.load(DO + qrow[:, None] * DV + offs_dv[None, :], mask=qm[:, None] & dvmask[None, :], other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(LSE + qrow, mask=qm, other=0.0)
                delta = tl.load(DELTA + qrow, mask=qm, other=0.0)
                s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
                valid = (jk[None, :] >= lo2[:, None]) & (jk[None, :] <= hi2[:, None]) & qm[:, None] & kmask[None, :]
                if HAS_RPB:
                    ridx = rbase + (jk[None, :] - iq[:, None] + K2 - 1)
                    s += tl.load(RPB + ridx, mask=valid, other=0.0)
                p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = dk * scale
    tl.store(DK + krow[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kmask[:, None] & dmask[None, :])
    tl.store(DV_ + krow[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty), mask=kmask[:, None] & dvmask[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _blocks(S2: int, d2: int, D: int, Dv: int):
    interp = interpreting()
    Lg = -(-S2 // d2)
    if interp:
        bq = 16
    else:
        bq = max(16, min(64, triton.next_power_of_2(Lg)))
    bd = max(16, triton.next_power_of_2(D))
    bdv = max(16, triton.next_power_of_2(Dv))
    return bq, bq, bd, bdv, interp


def _common(q: Tensor, v: Tensor, kernel_size, stride, dilation, is_causal):
    B, S0, S1, S2, H, D = q.shape
    Dv = v.shape[-1]
    tabs = [window_tables(S, k, s, d, bool(c), q.device)
            for S, k, s, d, c in zip((S0, S1, S2), kernel_size, stride, dilation, is_causal)]
    return B, S0, S1, S2, H, D, Dv, tabs


def _prec(q: Tensor, interp: bool) -> str:
    """fp32 operands: IEEE dots (TF32 would miss the fp32 tolerance); fp16/bf16: the default."""
    return "ieee" if (interp or q.dtype == torch.float32) else "tf32"


def na_forward(q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor], out: Tensor, lse: Tensor,
               kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
               is_causal: Sequence[bool], scale: float) -> None:
    B, S0, S1, S2, H, D, Dv, tabs = _common(q, v, kernel_size, stride, dilation, is_causal)
    bq, bk, bd, bdv, interp = _blocks(S2, dilation[2], D, Dv)
    nt2 = triton.cdiv(triton.cdiv(S2, dilation[2]), bq)
    R = [2 * kk - 1 for kk in kernel_size]
    grid = (dilation[2] * nt2, S0 * S1, B * H)
    has_rpb = rpb is not None
    torch.library.wrap_triton(_na_fwd_kernel)[grid](
        q, k, v, out, lse, rpb if has_rpb else q, tabs[0], tabs[1], tabs[2],
        S0, S1, S2, H, D, Dv, nt2, *kernel_size, *dilation, *R, float(scale),
        HAS_RPB=has_rpb, UPCAST=interp, PREC=_prec(q, interp), BQ=bq, BK=bk, BD=bd, BDV=bdv)


def na_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, rpb: Optional[Tensor],
                dq: Tensor, dk: Tensor, dv: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                dilation: Sequence[int], is_causal: Sequence[bool], scale: float) -> Optional[Tensor]:
    """Writes dq, dk, dv; returns drpb (fp32, rpb's shape) when there is an rpb, else None."""
    B, S0, S1, S2, H, D, Dv, tabs = _common(q, v, kernel_size, stride, dilation, is_causal)
    bq, bk, bd, bdv, interp = _blocks(S2, dilation[2], D, Dv)
    nt2 = triton.cdiv(triton.cdiv(S2, dilation[2]), bq)
    R = [2 * kk - 1 for kk in kernel_size]
    has_rpb = rpb is not None
    exact_delta = out.dtype != torch.float32
    if exact_delta:   # recomputed in fp32 by the dq kernel from the window
        delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    else:
        delta = (dout * out).sum(-1).contiguous()
    K0, K1, K2 = kernel_size
    ds = torch.empty((B, S0, S1, S2, H, K0, K1, K2), dtype=torch.float32, device=q.device) if has_rpb else lse
    grid = (dilation[2] * nt2, S0 * S1, B * H)
    meta = dict(HAS_RPB=has_rpb, UPCAST=interp, PREC=_prec(q, interp), BQ=bq, BK=bk, BD=bd, BDV=bdv)
    sizes = (S0, S1, S2, H, D, Dv, nt2, *kernel_size, *dilation, *R, float(scale))
    r = rpb if has_rpb else q
    torch.library.wrap_triton(_na_bwd_dq_kernel)[grid](
        q, k, v, dout, lse, delta, r, dq, ds, tabs[0], tabs[1], tabs[2], *sizes, **meta, EXACT_DELTA=exact_delta)
    torch.library.wrap_triton(_na_bwd_dkdv_kernel)[grid](
        q, k, v, dout, lse, delta, r, dk, dv, tabs[0], tabs[1], tabs[2], *sizes, **meta)
    if not has_rpb:
        return None
    # drpb[h, r0, r1, r2] = Σ ds[b, x, h, t] over slots whose relative index is r (one-hot contractions).
    E = [rel_onehot(S, kk, d, t[0]) for S, kk, d, t in zip((S0, S1, S2), kernel_size, dilation, tabs)]
    a = ds.sum(0)                                                  # [S0, S1, S2, H, K0, K1, K2]
    a = torch.einsum("xyzhabc,zcr->xyhabr", a, E[2])
    a = torch.einsum("xyhabr,ybs->xhasr", a, E[1])
    return torch.einsum("xhasr,xat->htsr", a, E[0]).contiguous()
