"""Triton kernels for task-masked attention (`pyops.kernels.task_attention`).

The math is in `pyops/task_attention/reference.py`; the registered ops that call `forward` and
`backward` are in `pyops/task_attention/backend_triton.py`.

Design (flash-attention style, online softmax, fp32 accumulation):
* forward: one program per (BM query rows, batch·query head); it walks the key tiles, keeping
  the running max / sum / output in registers, and writes out and lse (−inf for empty rows).
* backward: delta = rowsum(dout·out) with torch, then two kernels without atomics (bit-for-bit
  deterministic): dk/dv per (BN key rows, batch·kv head), looping over the query heads that
  share the kv head and over query tiles; dq per (BM query rows, batch·query head).
* tile skipping: the ids are summarised per chunk of 16 tokens into 64-bit words, computed with
  torch ops (no host sync, so it traces under torch.compile): a key chunk's word has bit g for
  every group g present (groups >= 63 share bit 63, which also marks padding); a query chunk has
  `reach` (the key groups any of its groups may attend) and `full` (the key groups all of its
  groups may attend; 0 when the chunk has padding). A (query tile, key tile) pair is skipped when
  OR(reach) & OR(kbits) == 0, and is "full" (no per-element test) when OR(kbits) ⊆ AND(full)
  (and, causal, the key tile lies below the diagonal). Causal tiles above the diagonal are not
  visited. Everything else gets the per-element test allow[q_groups[i], kv_groups[j]].
* the summary granularity (16) is independent of BM/BN (multiples of 16), so block sizes can
  be autotuned on a GPU; the interpreter uses fixed 32×32 tiles.
* dropout: Philox4x32-10 (the same bits as `pyops._philox`), regenerated in backward.
* under TRITON_INTERPRET=1 operands are upcast to fp32 before `tl.dot` (bf16 dot is wrong there).
  fp32 dots use input_precision="ieee" (no TF32), so fp32 matches the reference.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from pyops._triton import interpreting

CHUNK = 16
OVERFLOW_BIT = 63
_NO_GROUP_LIMIT = 2**31 - 1
_INTERPRET = interpreting()


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _and(a, b):
    return a & b


@triton.jit
def _philox_keep(i, j, bh, k0, k1, dropout_p):
    """Keep mask [BM, BN] of the interface: Philox4x32-10 at counter (j, i, bh, 'TASK')."""
    zero = ((i + j) * 0).to(tl.uint32)
    c0 = zero + j.to(tl.uint32)
    c1 = zero + i.to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    c3 = tl.full(zero.shape, 0x5441534B, tl.uint32)
    m0 = tl.full(zero.shape, 0xD2511F53, tl.uint32)
    m1 = tl.full(zero.shape, 0xCD9E8D57, tl.uint32)
    key0 = zero + k0.to(tl.uint32)
    key1 = zero + k1.to(tl.uint32)
    w0 = tl.full(zero.shape, 0x9E3779B9, tl.uint32)
    w1 = tl.full(zero.shape, 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
        key0 = key0 + w0
        key1 = key1 + w1
    u = (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= dropout_p


@triton.jit
def _tile_mask(qg, kg, offs_m, offs_n, ALLOW, G, IDENTITY: tl.constexpr, CAUSAL: tl.constexpr):
    ok = (qg[:, None] >= 0) & (kg[None, :] >= 0) & (qg[:, None] < G) & (kg[None, :] < G)
    if IDENTITY:
        ok = ok & (qg[:, None] == kg[None, :])
    else:
        a = tl.load(ALLOW + qg[:, None] * G + kg[None, :], mask=ok, other=0)
        ok = ok & (a != 0)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    return ok


@triton.jit
def _q_summary(QSUM, qs_base, pid_m, n_qc, BM: tl.constexpr):
    qc = pid_m * (BM // 16) + tl.arange(0, BM // 16)
    reach = tl.load(QSUM + qs_base + qc * 2, mask=qc < n_qc, other=0)
    full = tl.load(QSUM + qs_base + qc * 2 + 1, mask=qc < n_qc, other=0)
    return tl.reduce(reach, 0, _or), tl.reduce(full, 0, _and)


@triton.jit
def _k_summary(KSUM, ks_base, kt, n_kc, BN: tl.constexpr):
    kc = kt * (BN // 16) + tl.arange(0, BN // 16)
    kb = tl.load(KSUM + ks_base + kc, mask=kc < n_kc, other=0)
    return tl.reduce(kb, 0, _or)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")  # no TF32: fp32 must match the reference
    return tl.dot(a, b)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, QG, KG, ALLOW, QSUM, KSUM, SEED,
                Hq, Hkv, Lq, Lk, G, qg_bstride, kg_bstride, qs_bstride, ks_bstride, n_qc, n_kc,
                scale, dropout_p,
                D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, IDENTITY: tl.constexpr,
                DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // (Hq // Hkv)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    m_ok = offs_m < Lq
    q_base = bh.to(tl.int64) * Lq * D
    kv_base = (b * Hkv + hk).to(tl.int64) * Lk
    q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & (offs_d[None, :] < D),
                other=0.0)
    qg = tl.load(QG + b * qg_bstride + offs_m, mask=m_ok, other=-1)
    reach, full_q = _q_summary(QSUM, b * qs_bstride, pid_m, n_qc, BM)
    if DROPOUT:
        seed = tl.load(SEED)
        k0 = seed & 0xFFFFFFFF
        k1 = (seed >> 32) & 0xFFFFFFFF
        inv_keep = 1.0 / (1.0 - dropout_p)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BM)
    for kt in range(0, tl.cdiv(hi, BN)):
        kb = _k_summary(KSUM, b * ks_bstride, kt, n_kc, BN)
        if (reach & kb) != 0:
            offs_n = kt * BN + tl.arange(0, BN)
            n_ok = offs_n < Lk
            kT = tl.load(K + (kv_base + offs_n[None, :]) * D + offs_d[:, None],
                         mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            v = tl.load(V + (kv_base + offs_n[:, None]) * DV + offs_dv[None, :],
                        mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            s = _dot(q, kT, UPCAST) * scale
            partial = (kb & ~full_q) != 0
            if CAUSAL:
                partial = partial | (kt * BN + BN - 1 > pid_m * BM)
            if partial:
                kg = tl.load(KG + b * kg_bstride + offs_n, mask=n_ok, other=-1)
                ok = _tile_mask(qg, kg, offs_m, offs_n, ALLOW, G, IDENTITY, CAUSAL)
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                keep = _philox_keep(offs_m[:, None], offs_n[None, :], bh, k0, k1, dropout_p)
                p = tl.where(keep, p * inv_keep, 0.0)
            if UPCAST:
                acc = acc * alpha[:, None] + _dot(p, v, UPCAST)
            else:
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
            m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(O + bh.to(tl.int64) * Lq * DV + offs_m[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, QG, KG, ALLOW, QSUM, KSUM, SEED,
                     Hq, Hkv, Lq, Lk, G, qg_bstride, kg_bstride, qs_bstride, ks_bstride, n_qc, n_kc,
                     scale, dropout_p,
                     D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, IDENTITY: tl.constexpr,
                     DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    rep = Hq // Hkv
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    n_ok = offs_n < Lk
    kv_base = bhk.to(tl.int64) * Lk
    k = tl.load(K + (kv_base + offs_n[:, None]) * D + offs_d[None, :], mask=n_ok[:, None] & (offs_d[None, :] < D),
                other=0.0)
    v = tl.load(V + (kv_base + offs_n[:, None]) * DV + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    kg = tl.load(KG + b * kg_bstride + offs_n, mask=n_ok, other=-1)
    kb = _k_summary(KSUM, b * ks_bstride, pid_n, n_kc, BN)
    if DROPOUT:
        seed = tl.load(SEED)
        k0 = seed & 0xFFFFFFFF
        k1 = (seed >> 32) & 0xFFFFFFFF
        inv_keep = 1.0 / (1.0 - dropout_p)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BN) // BM
    for h in range(hk * rep, hk * rep + rep):
        bh = b * Hq + h
        q_base = bh.to(tl.int64) * Lq
        for qt in range(lo, tl.cdiv(Lq, BM)):
            reach, full_q = _q_summary(QSUM, b * qs_bstride, qt, n_qc, BM)
            if (reach & kb) != 0:
                offs_m = qt * BM + tl.arange(0, BM)
                m_ok = offs_m < Lq
                q = tl.load(Q + (q_base + offs_m[:, None]) * D + offs_d[None, :],
                            mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                do = tl.load(DO + (q_base + offs_m[:, None]) * DV + offs_dv[None, :],
                             mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
                lse = tl.load(LSE + q_base + offs_m, mask=m_ok, other=float("inf"))
                lse = tl.where(lse == float("-inf"), float("inf"), lse)
                delta = tl.load(DELTA + q_base + offs_m, mask=m_ok, other=0.0)
                s = _dot(q, tl.trans(k), UPCAST) * scale
                partial = (kb & ~full_q) != 0
                if CAUSAL:
                    partial = partial | (pid_n * BN + BN - 1 > qt * BM)
                if partial:
                    qg = tl.load(QG + b * qg_bstride + offs_m, mask=m_ok, other=-1)
                    ok = _tile_mask(qg, kg, offs_m, offs_n, ALLOW, G, IDENTITY, CAUSAL)
                    s = tl.where(ok, s, float("-inf"))
                p = tl.exp(s - lse[:, None])
                dp = _dot(do, tl.trans(v), UPCAST)
                if DROPOUT:
                    keep = _philox_keep(offs_m[:, None], offs_n[None, :], bh, k0, k1, dropout_p)
                    pd = tl.where(keep, p * inv_keep, 0.0)
                    dp = tl.where(keep, dp * inv_keep, 0.0)
                else:
                    pd = p
                ds = p * (dp - delta[:, None])
                if UPCAST:
                    dv += _dot(tl.trans(pd), do, UPCAST)
                    dk += _dot(tl.trans(ds), q, UPCAST)
                else:
                    dv += _dot(tl.trans(pd.to(do.dtype)), do, UPCAST)
                    dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST)
    tl.store(DK + (kv_base + offs_n[:, None]) * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + (kv_base + offs_n[:, None]) * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, QG, KG, ALLOW, QSUM, KSUM, SEED,
                   Hq, Hkv, Lq, Lk, G, qg_bstride, kg_bstride, qs_bstride, ks_bstride, n_qc, n_kc,
                   scale, dropout_p,
                   D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, IDENTITY: tl.constexpr,
                   DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // (Hq // Hkv)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    m_ok = offs_m < Lq
    q_base = bh.to(tl.int64) * Lq
    kv_base = (b * Hkv + hk).to(tl.int64) * Lk
    q = tl.load(Q + (q_base + offs_m[:, None]) * D + offs_d[None, :], mask=m_ok[:, None] & (offs_d[None, :] < D),
                other=0.0)
    do = tl.load(DO + (q_base + offs_m[:, None]) * DV + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + q_base + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + q_base + offs_m, mask=m_ok, other=0.0)
    qg = tl.load(QG + b * qg_bstride + offs_m, mask=m_ok, other=-1)
    reach, full_q = _q_summary(QSUM, b * qs_bstride, pid_m, n_qc, BM)
    if DROPOUT:
        seed = tl.load(SEED)
        k0 = seed & 0xFFFFFFFF
        k1 = (seed >> 32) & 0xFFFFFFFF
        inv_keep = 1.0 / (1.0 - dropout_p)
    dq = tl.zeros([BM, BD], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BM)
    for kt in range(0, tl.cdiv(hi, BN)):
        kb = _k_summary(KSUM, b * ks_bstride, kt, n_kc, BN)
        if (reach & kb) != 0:
            offs_n = kt * BN + tl.arange(0, BN)
            n_ok = offs_n < Lk
            k = tl.load(K + (kv_base + offs_n[:, None]) * D + offs_d[None, :],
                        mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            vT = tl.load(V + (kv_base + offs_n[None, :]) * DV + offs_dv[:, None],
                         mask=n_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
            s = _dot(q, tl.trans(k), UPCAST) * scale
            partial = (kb & ~full_q) != 0
            if CAUSAL:
                partial = partial | (kt * BN + BN - 1 > pid_m * BM)
            if partial:
                kg = tl.load(KG + b * kg_bstride + offs_n, mask=n_ok, other=-1)
                ok = _tile_mask(qg, kg, offs_m, offs_n, ALLOW, G, IDENTITY, CAUSAL)
                s = tl.where(ok, s, float("-inf"))
            p = tl.exp(s - lse[:, None])
            dp = _dot(do, vT, UPCAST)
            if DROPOUT:
                keep = _philox_keep(offs_m[:, None], offs_n[None, :], bh, k0, k1, dropout_p)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            ds = p * (dp - delta[:, None])
            if UPCAST:
                dq += _dot(ds, k, UPCAST)
            else:
                dq += _dot(ds.to(k.dtype), k, UPCAST)
    tl.store(DQ + (q_base + offs_m[:, None]) * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d[None, :] < D))


# --------------------------------------------------------------------------------------------
# Autotuning (GPU only; the interpreter uses fixed small tiles)
# --------------------------------------------------------------------------------------------

_KEYS = ["Lq", "Lk", "D", "DV", "CAUSAL", "DROPOUT"]


def _configs(bms, bns):
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
            for bm in bms for bn in bns for w, s in ((4, 2), (8, 3)) if not (bm == 128 and w == 4 and bn == 128)]


if _INTERPRET or os.environ.get("PYOPS_TRITON_AUTOTUNE", "1") == "0":
    # Interpreter: fixed small tiles. PYOPS_TRITON_AUTOTUNE=0 (e.g. quick GPU test runs): fixed 64x64.
    _FWD, _DKDV, _DQ = _fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel
    _FIXED = {"BM": 32, "BN": 32} if _INTERPRET else {"BM": 64, "BN": 64, "num_warps": 4}
else:
    _FWD = triton.autotune(_configs((32, 64, 128), (32, 64)), key=_KEYS)(_fwd_kernel)
    _DKDV = triton.autotune(_configs((32, 64), (32, 64, 128)), key=_KEYS)(_bwd_dkdv_kernel)
    _DQ = triton.autotune(_configs((32, 64, 128), (32, 64)), key=_KEYS)(_bwd_dq_kernel)
    _FIXED = {}


# --------------------------------------------------------------------------------------------
# Host side: group summaries and launchers (torch ops only, no host sync)
# --------------------------------------------------------------------------------------------

def _bit_weights(device) -> Tensor:
    w = [1 << i for i in range(OVERFLOW_BIT)] + [-(1 << 63)]
    return torch.tensor(w, dtype=torch.int64, device=device)


def _chunk_classes(groups: Tensor, n_chunks: int, G: Optional[int]):
    """[Bg, n_chunks, 64] presence of each group class per 16-token chunk, and the padding flag."""
    g = groups.to(torch.int64)
    if g.dim() == 1:
        g = g[None]
    pad_len = n_chunks * CHUNK - g.shape[1]
    g = torch.nn.functional.pad(g, (0, pad_len), value=-1).view(g.shape[0], n_chunks, CHUNK)
    invalid = g < 0
    if G is not None:
        invalid = invalid | (g >= G)
    cls = torch.where(invalid, torch.zeros_like(g), torch.clamp(g, max=OVERFLOW_BIT) + 1)
    presence = torch.nn.functional.one_hot(cls, OVERFLOW_BIT + 2)[..., 1:].amax(dim=2).bool()
    return presence, invalid.any(dim=2)


def summaries(q_groups: Tensor, kv_groups: Tensor, allow: Optional[Tensor], Lq: int, Lk: int):
    """(qsum int64 [Bg, n_qc, 2] = (reach, full), ksum int64 [Bg, n_kc]) as described above."""
    dev = q_groups.device
    G = None if allow is None else allow.shape[0]
    n_qc, n_kc = triton.cdiv(max(Lq, 1), CHUNK), triton.cdiv(max(Lk, 1), CHUNK)
    wts = _bit_weights(dev)
    C = OVERFLOW_BIT
    if allow is None:
        a = torch.eye(C, dtype=torch.bool, device=dev)
    else:
        a = torch.zeros(C, C, dtype=torch.bool, device=dev)
        n = min(G, C)
        a[:n, :n] = allow[:n, :n]
    reach_rule = torch.ones(C + 1, C + 1, dtype=torch.bool, device=dev)   # overflow rows/cols: maybe
    reach_rule[:C, :C] = a
    full_rule = torch.zeros(C + 1, C + 1, dtype=torch.bool, device=dev)   # overflow: never full
    full_rule[:C, :C] = a
    pq, padq = _chunk_classes(q_groups, n_qc, G)
    pk, padk = _chunk_classes(kv_groups, n_kc, G)
    pqf = pq.to(torch.float32)
    reach = (pqf @ reach_rule.to(torch.float32)) > 0
    full = ((pqf @ (~full_rule).to(torch.float32)) == 0) & ~padq[..., None]
    qsum = torch.stack([(reach.long() * wts).sum(-1), (full.long() * wts).sum(-1)], dim=-1).contiguous()
    kbits = pk.clone()
    kbits[..., C] = kbits[..., C] | padk
    ksum = (kbits.long() * wts).sum(-1).contiguous()
    return qsum, ksum


def _common(q, k, v, q_groups, kv_groups, allow, Lq, Lk):
    B, Hq, _, D = q.shape
    Hkv, DV = k.shape[1], v.shape[3]
    qsum, ksum = summaries(q_groups, kv_groups, allow, Lq, Lk)
    identity = allow is None
    allow_arg = q_groups if identity else allow.to(torch.uint8).contiguous()
    G = _NO_GROUP_LIMIT if identity else allow.shape[0]
    args = (Hq, Hkv, Lq, Lk, G, Lq if q_groups.dim() == 2 else 0, Lk if kv_groups.dim() == 2 else 0,
            qsum.shape[1] * 2 if qsum.shape[0] > 1 else 0, ksum.shape[1] if ksum.shape[0] > 1 else 0,
            qsum.shape[1], ksum.shape[1])
    meta = dict(D=D, DV=DV, BD=max(16, _next_pow2(D)), BDV=max(16, _next_pow2(DV)), IDENTITY=identity,
                UPCAST=_INTERPRET, **_FIXED)
    return allow_arg, qsum, ksum, args, meta


def forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_groups: Tensor, kv_groups: Tensor,
            allow: Optional[Tensor], causal: bool, scale: float, dropout_p: float, seed: Tensor) -> None:
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    if B * Hq * Lq == 0:
        return
    allow_arg, qsum, ksum, args, meta = _common(q, k, v, q_groups, kv_groups, allow, Lq, Lk)
    grid = lambda m: (triton.cdiv(Lq, m["BM"]), B * Hq)  # noqa: E731
    torch.library.wrap_triton(_FWD)[grid](
        q, k, v, out, lse, q_groups, kv_groups, allow_arg, qsum, ksum, seed, *args, scale, dropout_p,
        CAUSAL=causal, DROPOUT=dropout_p > 0.0, **meta)


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dq: Tensor, dk: Tensor,
             dv: Tensor, q_groups: Tensor, kv_groups: Tensor, allow: Optional[Tensor], causal: bool, scale: float,
             dropout_p: float, seed: Tensor) -> None:
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if B * Hq * Lq == 0 or Lk == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return
    delta = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1).contiguous()
    allow_arg, qsum, ksum, args, meta = _common(q, k, v, q_groups, kv_groups, allow, Lq, Lk)
    common = (q_groups, kv_groups, allow_arg, qsum, ksum, seed, *args, scale, dropout_p)
    kw = dict(CAUSAL=causal, DROPOUT=dropout_p > 0.0, **meta)
    grid_kv = lambda m: (triton.cdiv(Lk, m["BN"]), B * Hkv)  # noqa: E731
    torch.library.wrap_triton(_DKDV)[grid_kv](q, k, v, dout, lse, delta, dk, dv, *common, **kw)
    grid_q = lambda m: (triton.cdiv(Lq, m["BM"]), B * Hq)  # noqa: E731
    torch.library.wrap_triton(_DQ)[grid_q](q, k, v, dout, lse, delta, dq, *common, **kw)
