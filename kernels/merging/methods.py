"""Triton kernels for TIES, DARE (dare_linear), DARE-TIES, breadcrumbs and DELLA (della_linear)
merging (`pyops.kernels.merging.methods`).

The math is in `pyops/merging/reference.py`; the registered ops that call `merge_forward` are in
`pyops/merging/backend_triton.py`. With τᵢ = deltas[i] (or deltas[i] − base when `from_models`),
w = coeffs[i, block], ρᵢ = density[i]:

    trim        ties:       tᵢ = [|τᵢ| ≥ thrᵢ(block)]·τᵢ   (thr = k-th largest |τᵢ| of the block)
                dare(_ties): tᵢ = [uᵢⱼ < ρᵢ]·(1/ρᵢ)·τᵢ     (uᵢⱼ from Philox, the reference's key)
    combine     dare:        out = base + λ·Σᵢ wᵢ·tᵢ
                electing:    s = sign(Σᵢ wᵢ·tᵢ) (0 → +), aᵢ = [tᵢ·s > 0],
                             out = base + λ·Σᵢ aᵢ·(wᵢ·tᵢ) / Σᵢ aᵢ·wᵢ   (a zero divisor counts as 1)

Every operation is the reference's, one by one and in its order (fp32; task sums from 0 in task
order), so the kept sets and the Philox masks are the reference's bit for bit.

Design:
* At most `MAX_TASKS` delta pointers per launch (as `kernels/merging/task_arithmetic.py`); more tasks run as
  several launches that accumulate in fp32 scratch tensors.
* DARE / DARE-TIES: one element-wise pass (`_combine_kernel`). A tile of BLOCK elements is laid
  out as [BLOCK/4, 4]: one Philox call per group of four consecutive elements gives the four
  elements' words (counter = (j/4 low, j/4 high, task, name hash), word j mod 4).
* TIES thresholds (exact per-block selection, no sorting). Keys are the fp32 bits of |τ| (the
  sign bit dropped: monotone for non-negative floats), the threshold T of a block is the largest
  key with #(key ≥ T) ≥ k, i.e. the k-th largest key.
  - Blocks of at most `SMALL_MAX` elements (rows, small chunks): `_ties_rows_kernel`, a program
    owns ROWS whole blocks as a [ROWS, COLS] tile and finds each T by a bitwise search (31 steps
    of compare-and-count along the row, in registers); with ≤ 8 tasks it then trims, elects and
    writes the output in the same program (its later reads of the tile hit the cache): one pass
    over memory. With more tasks it writes the thresholds and `_combine_kernel` follows.
  - Larger blocks: a radix select over 7 + 6 + 6 + 6 + 6 bits (five passes): `_hist_kernel`
    counts the current digit of the keys that match the prefix found so far, per (task, block),
    programs over (block, chunk) adding their per-chunk `tl.histogram` into an int32
    [N, n_blocks, bins] buffer with atomics (integer counts: order-independent, deterministic);
    the bin holding the k-th largest and the remaining rank are found with torch ops on the
    small histograms (no host sync). Then `_combine_kernel` trims with the per-block thresholds.
* Breadcrumbs / DELLA: every element's ascending rank of |τ| in its block comes from a stable
  device sort of the blocks (`pyops.kernels.merging.ranks.block_ranks`, NaN padding ranking last, int32
  ranks), then the element-wise pass keeps the rank band (breadcrumbs) or draws the rank-dependent keep
  probability with the same Philox words as DARE (DELLA), in the reference's operations.
* Launchers use only tensor metadata and torch ops (no host syncs), and launch through
  `torch.library.wrap_triton`, so they run inside `triton_op` bodies and under `torch.compile`.
"""
from __future__ import annotations

import math
import struct
from typing import List, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from pyops._triton import interpreting
from pyops.kernels.merging.ranks import block_ranks

MAX_TASKS = 8
SMALL_MAX = 8192  # blocks up to this many elements: one program per block (or per ROWS blocks)
# Small-block TIES: up to this many tasks per launch search their thresholds in one joint loop
# (keys of every task held in registers) when the rows are at most ROWS_JOINT_MAX_COLS wide;
# otherwise one task after the other. The tasks' searches are independent, so the joint loop pays
# each step's reduction latency once for all of them; on wider rows the keys of several tasks no
# longer fit in registers and the spills cost more than that saves.
ROWS_JOINT_MAX_TASKS = 4
ROWS_JOINT_MAX_COLS = 1024
_I32_LIMIT = 2**31 - 1

METHOD_TIES, METHOD_DARE, METHOD_DARE_TIES = 1, 2, 3
METHOD_BREADCRUMBS, METHOD_DELLA, METHOD_DELLA_LINEAR = 4, 5, 6
METHOD_CODES = {"ties": METHOD_TIES, "dare": METHOD_DARE, "dare_linear": METHOD_DARE,
                "dare_ties": METHOD_DARE_TIES, "breadcrumbs": METHOD_BREADCRUMBS, "della": METHOD_DELLA,
                "della_linear": METHOD_DELLA_LINEAR}
ELECTING_CODES = (METHOD_TIES, METHOD_DARE_TIES, METHOD_DELLA)
RANKED_CODES = (METHOD_BREADCRUMBS, METHOD_DELLA, METHOD_DELLA_LINEAR)

# Radix digits of the large-block selection: (shift, bits) from the top of the 31-bit key. Narrow
# digits: `tl.histogram` costs about bins·log2(bins)/32 operations per element on a GPU (a
# warp-level ballot per bin), so 2048 bins would make the pass compute-bound many times over.
_DIGITS = ((24, 7), (18, 6), (12, 6), (6, 6), (0, 6))


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _num_warps(elems: int) -> int:
    return 8 if elems >= 4096 else 4 if elems >= 1024 else 2 if elems >= 256 else 1


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------

@triton.jit
def _load_tau(d_ptr, b, offs, mask, FROM_MODELS: tl.constexpr):
    x = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FROM_MODELS:
        x = x - b
    return x


@triton.jit
def _uniform(task, grp, col, seed, name_hash):
    """u ∈ [0, 1) from Philox(counter (grp lo, grp hi, task, name_hash), key seed), word col."""
    c0 = (grp & 0xFFFFFFFF).to(tl.uint32)
    c1 = (grp >> 32).to(tl.uint32)
    c2 = (grp * 0 + task).to(tl.uint32)
    c3 = (grp * 0 + name_hash).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    word = tl.where(col == 0, w0, tl.where(col == 1, w1, tl.where(col == 2, w2, w3)))
    return (word >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _dare_trim(x, task, grp, col, fp_ptr, seed, name_hash):
    """[u < ρ]·(1/ρ)·x."""
    rho = tl.load(fp_ptr + 2 * task)
    inv = tl.load(fp_ptr + 2 * task + 1)
    u = _uniform(task, grp, col, seed, name_hash)
    return tl.where(u < rho, inv, 0.0) * x


@triton.jit
def _ranked_trim(x, task, offs, mask, blk, numel, block_size, rank_ptr, fp_ptr, ip_ptr, grp, col, seed, name_hash,
                 METHOD: tl.constexpr, RN: tl.constexpr):
    """Breadcrumbs: [lo ≤ r < hi]·x with the band of the element's block (the last block may be
    shorter: its own band). DELLA: ([u < p]/p)·x, p = (ρ − ε) + (2ε)·r/(n − 1) (0.5 for n = 1).
    r: the element's ascending rank of |τ| in its block (ranks [N, numel] int32)."""
    row = offs.to(tl.int64) * 0 + task  # int64 whatever task and numel specialise to
    r = tl.load(rank_ptr + (row * numel + offs), mask=mask, other=0)
    last = blk == (numel - 1) // block_size
    if METHOD == 4:
        lo = tl.where(last, tl.load(ip_ptr + 2 + 4 * task + 2), tl.load(ip_ptr + 2 + 4 * task))
        hi = tl.where(last, tl.load(ip_ptr + 2 + 4 * task + 3), tl.load(ip_ptr + 2 + 4 * task + 1))
        return tl.where((r >= lo) & (r < hi), 1.0, 0.0) * x
    else:
        plo = tl.load(fp_ptr + 4 * task)
        span = tl.load(fp_ptr + 4 * task + 1)
        denom = tl.where(last, tl.load(fp_ptr + 4 * task + 3), tl.load(fp_ptr + 4 * task + 2))
        frac = tl.where(denom > 0.0, tl.math.div_rn(r.to(tl.float32), tl.where(denom > 0.0, denom, 1.0)), 0.5)
        p = plo + _mul(span, frac, RN)
        u = _uniform(task, grp, col, seed, name_hash)
        return tl.math.div_rn(tl.where(u < p, 1.0, 0.0), p) * x


@triton.jit
def _mul(a, b, RN: tl.constexpr):
    """a·b rounded on its own: a product that feeds an add must not be contracted into an FMA
    (the reference rounds both), or a sum that cancels can change the elected sign. The GPU
    build uses libdevice's mul.rn; the interpreter never contracts."""
    if RN:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def _elect_term(tot, div, t, w, s, RN: tl.constexpr):
    a = tl.where(t * s > 0.0, 1.0, 0.0)
    return tot + a * _mul(w, t, RN), div + a * w  # a ∈ {0, 1}: a·x is exact


@triton.jit
def _finish(tot, div, NORMALIZE: tl.constexpr):
    if NORMALIZE:
        return tl.math.div_rn(tot, tl.where(div == 0.0, 1.0, div))  # IEEE division, as the reference
    else:
        return tot


# --------------------------------------------------------------------------------------------
# Element-wise combine (DARE, DARE-TIES, and TIES with a threshold table)
# --------------------------------------------------------------------------------------------

@triton.jit
def _trim_term(d_ptr, b, offs, mask, slot, task_off, c_ptr, c_idx, c_stride_n, thr_ptr, thr_idx, thr_stride_n,
               fp_ptr, ip_ptr, grp, col, seed, name_hash, blk, numel, block_size,
               FROM_MODELS: tl.constexpr, METHOD: tl.constexpr, UNIFORM: tl.constexpr, RN: tl.constexpr):
    """(tᵢ, wᵢ) of task `task_off + slot` over the tile."""
    x = _load_tau(d_ptr, b, offs, mask, FROM_MODELS)
    if UNIFORM:
        w = tl.load(c_ptr + c_idx + slot * c_stride_n)
    else:
        w = tl.load(c_ptr + c_idx + slot * c_stride_n, mask=mask, other=0.0)
    if METHOD == 1:
        if UNIFORM:
            th = tl.load(thr_ptr + thr_idx + slot * thr_stride_n)
        else:
            th = tl.load(thr_ptr + thr_idx + slot * thr_stride_n, mask=mask, other=0.0)
        t = tl.where(tl.abs(x) >= th, 1.0, 0.0) * x
    elif METHOD >= 4:
        t = _ranked_trim(x, task_off + slot, offs, mask, blk, numel, block_size, thr_ptr, fp_ptr, ip_ptr, grp, col,
                         seed, name_hash, METHOD, RN)
    else:
        t = _dare_trim(x, task_off + slot, grp, col, fp_ptr, seed, name_hash)
    return t, w


@triton.jit
def _combine_kernel(
    out_ptr, base_ptr, acc_ptr, tot_ptr, div_ptr, c_ptr, thr_ptr, fp_ptr, ip_ptr,
    d0, d1, d2, d3, d4, d5, d6, d7,
    numel, block_size, c_stride_n, c_stride_block, c_off, thr_stride_n, task_off, lam,
    N_TASKS: tl.constexpr, METHOD: tl.constexpr, FROM_MODELS: tl.constexpr, UNIFORM: tl.constexpr,
    PHASE: tl.constexpr, ACC_IN: tl.constexpr, FINAL: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr, I64: tl.constexpr, RN: tl.constexpr,
):
    # PHASE 0: acc (+)= Σ w·t over this launch's tasks (written out when FINAL, non-electing).
    # PHASE 1: election with acc read from scratch; tot/div (+)= ...; FINAL writes the output.
    # PHASE 2: both, all tasks in this launch.
    G: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0)
    if I64:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    grp = (start // 4 + tl.arange(0, G))[:, None].to(tl.int64)  # [G, 1] Philox counters
    col = tl.arange(0, 4)[None, :]
    offs = start + tl.arange(0, G)[:, None] * 4 + col
    mask = offs < numel
    seed = tl.load(ip_ptr)
    name_hash = tl.load(ip_ptr + 1)
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if UNIFORM:
        blk = start // block_size
    else:
        blk = offs // block_size
    c_idx = c_off + blk * c_stride_block
    thr_idx = task_off * thr_stride_n + blk
    ELECT: tl.constexpr = METHOD == 1 or METHOD == 3 or METHOD == 5
    zero = tl.zeros([G, 4], tl.float32)
    t0 = zero
    t1 = zero
    t2 = zero
    t3 = zero
    t4 = zero
    t5 = zero
    t6 = zero
    t7 = zero
    w0 = zero
    w1 = zero
    w2 = zero
    w3 = zero
    w4 = zero
    w5 = zero
    w6 = zero
    w7 = zero
    if N_TASKS > 0:
        t0, w0 = _trim_term(d0, b, offs, mask, 0, task_off, c_ptr, c_idx, c_stride_n, thr_ptr, thr_idx,
                            thr_stride_n, fp_ptr, ip_ptr, grp, col, seed, name_hash, blk, numel,
                            block_size, FROM_MODELS, METHOD, UNIFORM, RN)
    if N_TASKS > 1:
        t1, w1 = _trim_term(d1, b, offs, mask, 1, task_off, c_ptr, c_idx, c_stride_n, thr_ptr, thr_idx,
                            thr_stride_n, fp_ptr, ip_ptr, grp, col, seed, name_hash, blk, numel,
                            block_size, FROM_MODELS, METHOD, UNIFORM, RN)
    if N_TASKS > 2:
        t2, w2 = _trim_term(d2, b, offs, mask, 2, task_off, c_ptr, c_idx, c_stride_n, thr_ptr, thr_idx,
                            thr_stride_n, fp_ptr, ip_ptr, grp, col, seed, name_hash, blk, numel,
                            block_size, FROM_MODELS, METHOD, UNIFORM, RN)
    if N_TASKS > 3:
        t3, w3 = _trim_term(d3, b, offs, mask, 3, task_off, c_ptr, c_idx, c_stride_n, thr_ptr, thr_idx,
                            thr_stride_n, fp_ptr, ip_ptr, grp, col, seed, name_hash, blk, numel,
                            block_size, FROM_MODELS, METHOD, UNIFORM, RN)
    if N_TASKS > 4:
        t4, w4 = _trim_term(d4, b, offs, mask, 4, task_off, c_ptr, c_idx, c_stride_n, thr_ptr, thr_idx,
                            thr_stride_n, fp_ptr, ip_ptr, grp, col, seed, name_hash, blk, numel,
                            block_size, FROM_MODELS, METHOD, UNIFORM, RN)
    if N_TASKS > 5:
        t5, w5 = _trim_term(d5, b, offs, mask, 5, task_off, c_ptr, c_idx, c_stride_n, thr_ptr, thr_idx,
                            thr_stride_n, fp_ptr, ip_ptr, grp, col, seed, name_hash, blk, numel,
                            block_size, FROM_MODELS, METHOD, UNIFORM, RN)
    if N_TASKS > 6:
        t6, w6 = _trim_term(d6, b, offs, mask, 6, task_off, c_ptr, c_idx, c_stride_n, thr_ptr, thr_idx,
                            thr_stride_n, fp_ptr, ip_ptr, grp, col, seed, name_hash, blk, numel,
                            block_size, FROM_MODELS, METHOD, UNIFORM, RN)
    if N_TASKS > 7:
        t7, w7 = _trim_term(d7, b, offs, mask, 7, task_off, c_ptr, c_idx, c_stride_n, thr_ptr, thr_idx,
                            thr_stride_n, fp_ptr, ip_ptr, grp, col, seed, name_hash, blk, numel,
                            block_size, FROM_MODELS, METHOD, UNIFORM, RN)

    if PHASE == 1:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    else:
        if ACC_IN:
            acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
        else:
            acc = zero
        if N_TASKS > 0:
            acc = acc + _mul(w0, t0, RN)
        if N_TASKS > 1:
            acc = acc + _mul(w1, t1, RN)
        if N_TASKS > 2:
            acc = acc + _mul(w2, t2, RN)
        if N_TASKS > 3:
            acc = acc + _mul(w3, t3, RN)
        if N_TASKS > 4:
            acc = acc + _mul(w4, t4, RN)
        if N_TASKS > 5:
            acc = acc + _mul(w5, t5, RN)
        if N_TASKS > 6:
            acc = acc + _mul(w6, t6, RN)
        if N_TASKS > 7:
            acc = acc + _mul(w7, t7, RN)

    if PHASE == 0:
        if FINAL and not ELECT:
            tl.store(out_ptr + offs, (b + _mul(lam, acc, RN)).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(acc_ptr + offs, acc, mask=mask)
    else:
        if ELECT:
            s = tl.where(acc >= 0.0, 1.0, -1.0)
            if PHASE == 1 and ACC_IN:  # tot/div of the earlier task chunks
                tot = tl.load(tot_ptr + offs, mask=mask, other=0.0)
                div = tl.load(div_ptr + offs, mask=mask, other=0.0)
            else:
                tot = zero
                div = zero
            if N_TASKS > 0:
                tot, div = _elect_term(tot, div, t0, w0, s, RN)
            if N_TASKS > 1:
                tot, div = _elect_term(tot, div, t1, w1, s, RN)
            if N_TASKS > 2:
                tot, div = _elect_term(tot, div, t2, w2, s, RN)
            if N_TASKS > 3:
                tot, div = _elect_term(tot, div, t3, w3, s, RN)
            if N_TASKS > 4:
                tot, div = _elect_term(tot, div, t4, w4, s, RN)
            if N_TASKS > 5:
                tot, div = _elect_term(tot, div, t5, w5, s, RN)
            if N_TASKS > 6:
                tot, div = _elect_term(tot, div, t6, w6, s, RN)
            if N_TASKS > 7:
                tot, div = _elect_term(tot, div, t7, w7, s, RN)
            if FINAL:
                merged = _finish(tot, div, NORMALIZE)
                tl.store(out_ptr + offs, (b + _mul(lam, merged, RN)).to(out_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(tot_ptr + offs, tot, mask=mask)
                tl.store(div_ptr + offs, div, mask=mask)
        else:
            tl.store(out_ptr + offs, (b + _mul(lam, acc, RN)).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# TIES, small blocks: selection (and, with ≤ 8 tasks, the whole merge) per program
# --------------------------------------------------------------------------------------------

@triton.jit
def _row_tau(d_ptr, base_ptr, offs, mask, FROM_MODELS: tl.constexpr):
    x = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FROM_MODELS:
        x = x - tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _row_k(rho_ptr, task, rows, block_size, numel):
    """k = max(1, ⌊ρ·n⌋) per row (block), ρ and the product in fp64: mergekit 0.1.5's int(ρ·n)."""
    rho = tl.load(rho_ptr + task)  # fp64
    length = tl.minimum(numel - rows.to(tl.int64) * block_size, block_size)
    return tl.maximum((rho * length.to(tl.float64)).to(tl.int32), 1)  # truncation = floor (>= 0)


@triton.jit
def _row_select(d_ptr, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task, FROM_MODELS: tl.constexpr):
    """Per row: the k-th largest |τ|."""
    x = _row_tau(d_ptr, base_ptr, offs, mask, FROM_MODELS)
    key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    key = tl.where(mask, key, -1)  # padding never counts
    k = _row_k(rho_ptr, task, rows, block_size, numel)
    thr = tl.zeros_like(rows)
    for step in range(31):  # the largest T with #(key >= T) >= k, one bit at a time
        cand = thr | (1 << (30 - step))
        cnt = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
        thr = tl.where(cnt >= k, cand, thr)
    return thr.to(tl.float32, bitcast=True)


@triton.jit
def _row_keys(d_ptr, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task, FROM_MODELS: tl.constexpr):
    """Keys (|τ| bits, padding −1) and per-row k of one task, for the joint search."""
    x = _row_tau(d_ptr, base_ptr, offs, mask, FROM_MODELS)
    key = tl.where(mask, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, -1)
    return key, _row_k(rho_ptr, task, rows, block_size, numel)


@triton.jit
def _row_step(thr, key, k, bit):
    cand = thr | bit
    return tl.where(tl.sum((key >= cand[:, None]).to(tl.int32), axis=1) >= k, cand, thr)


@triton.jit
def _row_trim(d_ptr, base_ptr, offs, mask, thr, FROM_MODELS: tl.constexpr):
    x = _row_tau(d_ptr, base_ptr, offs, mask, FROM_MODELS)
    return tl.where(tl.abs(x) >= thr[:, None], 1.0, 0.0) * x


@triton.jit
def _ties_rows_kernel(
    out_ptr, base_ptr, thr_out_ptr, c_ptr, rho_ptr,
    d0, d1, d2, d3, d4, d5, d6, d7,
    numel, block_size, n_blocks, c_stride_n, c_stride_block, c_off, task_off, lam,
    N_TASKS: tl.constexpr, FROM_MODELS: tl.constexpr, FUSED: tl.constexpr, NORMALIZE: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, I64: tl.constexpr, RN: tl.constexpr, JOINT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_blocks
    cols = tl.arange(0, COLS)
    if I64:
        row_start = rows.to(tl.int64) * block_size
    else:
        row_start = rows * block_size
    offs = row_start[:, None] + cols[None, :]
    mask = row_ok[:, None] & (cols < block_size)[None, :] & (offs < numel)
    zr = tl.zeros([ROWS], tl.float32)
    th0 = zr
    th1 = zr
    th2 = zr
    th3 = zr
    th4 = zr
    th5 = zr
    th6 = zr
    th7 = zr
    if JOINT:
        # Every task's search in one loop: the tasks' reductions are independent, so one step's
        # latency is paid once for all of them (the keys of all tasks stay in registers).
        key0, k0 = _row_keys(d0, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 0, FROM_MODELS)
        key1, k1 = key0, k0
        key2, k2 = key0, k0
        key3, k3 = key0, k0
        if N_TASKS > 1:
            key1, k1 = _row_keys(d1, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 1, FROM_MODELS)
        if N_TASKS > 2:
            key2, k2 = _row_keys(d2, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 2, FROM_MODELS)
        if N_TASKS > 3:
            key3, k3 = _row_keys(d3, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 3, FROM_MODELS)
        zi = tl.zeros_like(rows)
        u0 = zi
        u1 = zi
        u2 = zi
        u3 = zi
        for step in range(31):
            bit = 1 << (30 - step)
            u0 = _row_step(u0, key0, k0, bit)
            if N_TASKS > 1:
                u1 = _row_step(u1, key1, k1, bit)
            if N_TASKS > 2:
                u2 = _row_step(u2, key2, k2, bit)
            if N_TASKS > 3:
                u3 = _row_step(u3, key3, k3, bit)
        th0 = u0.to(tl.float32, bitcast=True)
        th1 = u1.to(tl.float32, bitcast=True)
        th2 = u2.to(tl.float32, bitcast=True)
        th3 = u3.to(tl.float32, bitcast=True)
    else:
        if N_TASKS > 0:
            th0 = _row_select(d0, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 0, FROM_MODELS)
        if N_TASKS > 1:
            th1 = _row_select(d1, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 1, FROM_MODELS)
        if N_TASKS > 2:
            th2 = _row_select(d2, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 2, FROM_MODELS)
        if N_TASKS > 3:
            th3 = _row_select(d3, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 3, FROM_MODELS)
        if N_TASKS > 4:
            th4 = _row_select(d4, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 4, FROM_MODELS)
        if N_TASKS > 5:
            th5 = _row_select(d5, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 5, FROM_MODELS)
        if N_TASKS > 6:
            th6 = _row_select(d6, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 6, FROM_MODELS)
        if N_TASKS > 7:
            th7 = _row_select(d7, base_ptr, offs, mask, rows, block_size, numel, rho_ptr, task_off + 7, FROM_MODELS)
    if not FUSED:
        # Thresholds table [N, n_blocks] for the element-wise combine.
        tp = thr_out_ptr + task_off * n_blocks + rows
        if N_TASKS > 0:
            tl.store(tp, th0, mask=row_ok)
        if N_TASKS > 1:
            tl.store(tp + n_blocks, th1, mask=row_ok)
        if N_TASKS > 2:
            tl.store(tp + 2 * n_blocks, th2, mask=row_ok)
        if N_TASKS > 3:
            tl.store(tp + 3 * n_blocks, th3, mask=row_ok)
        if N_TASKS > 4:
            tl.store(tp + 4 * n_blocks, th4, mask=row_ok)
        if N_TASKS > 5:
            tl.store(tp + 5 * n_blocks, th5, mask=row_ok)
        if N_TASKS > 6:
            tl.store(tp + 6 * n_blocks, th6, mask=row_ok)
        if N_TASKS > 7:
            tl.store(tp + 7 * n_blocks, th7, mask=row_ok)
    else:
        # All tasks are in this launch: trim (the tile is re-read from cache), elect, write.
        c_idx = c_off + rows * c_stride_block
        z = tl.zeros([ROWS, COLS], tl.float32)
        t0 = z
        t1 = z
        t2 = z
        t3 = z
        t4 = z
        t5 = z
        t6 = z
        t7 = z
        w0 = zr
        w1 = zr
        w2 = zr
        w3 = zr
        w4 = zr
        w5 = zr
        w6 = zr
        w7 = zr
        acc = z
        if N_TASKS > 0:
            t0 = _row_trim(d0, base_ptr, offs, mask, th0, FROM_MODELS)
            w0 = tl.load(c_ptr + c_idx, mask=row_ok, other=0.0)
            acc = acc + _mul(w0[:, None], t0, RN)
        if N_TASKS > 1:
            t1 = _row_trim(d1, base_ptr, offs, mask, th1, FROM_MODELS)
            w1 = tl.load(c_ptr + c_idx + c_stride_n, mask=row_ok, other=0.0)
            acc = acc + _mul(w1[:, None], t1, RN)
        if N_TASKS > 2:
            t2 = _row_trim(d2, base_ptr, offs, mask, th2, FROM_MODELS)
            w2 = tl.load(c_ptr + c_idx + 2 * c_stride_n, mask=row_ok, other=0.0)
            acc = acc + _mul(w2[:, None], t2, RN)
        if N_TASKS > 3:
            t3 = _row_trim(d3, base_ptr, offs, mask, th3, FROM_MODELS)
            w3 = tl.load(c_ptr + c_idx + 3 * c_stride_n, mask=row_ok, other=0.0)
            acc = acc + _mul(w3[:, None], t3, RN)
        if N_TASKS > 4:
            t4 = _row_trim(d4, base_ptr, offs, mask, th4, FROM_MODELS)
            w4 = tl.load(c_ptr + c_idx + 4 * c_stride_n, mask=row_ok, other=0.0)
            acc = acc + _mul(w4[:, None], t4, RN)
        if N_TASKS > 5:
            t5 = _row_trim(d5, base_ptr, offs, mask, th5, FROM_MODELS)
            w5 = tl.load(c_ptr + c_idx + 5 * c_stride_n, mask=row_ok, other=0.0)
            acc = acc + _mul(w5[:, None], t5, RN)
        if N_TASKS > 6:
            t6 = _row_trim(d6, base_ptr, offs, mask, th6, FROM_MODELS)
            w6 = tl.load(c_ptr + c_idx + 6 * c_stride_n, mask=row_ok, other=0.0)
            acc = acc + _mul(w6[:, None], t6, RN)
        if N_TASKS > 7:
            t7 = _row_trim(d7, base_ptr, offs, mask, th7, FROM_MODELS)
            w7 = tl.load(c_ptr + c_idx + 7 * c_stride_n, mask=row_ok, other=0.0)
            acc = acc + _mul(w7[:, None], t7, RN)
        s = tl.where(acc >= 0.0, 1.0, -1.0)
        tot = z
        div = z
        if N_TASKS > 0:
            tot, div = _elect_term(tot, div, t0, w0[:, None], s, RN)
        if N_TASKS > 1:
            tot, div = _elect_term(tot, div, t1, w1[:, None], s, RN)
        if N_TASKS > 2:
            tot, div = _elect_term(tot, div, t2, w2[:, None], s, RN)
        if N_TASKS > 3:
            tot, div = _elect_term(tot, div, t3, w3[:, None], s, RN)
        if N_TASKS > 4:
            tot, div = _elect_term(tot, div, t4, w4[:, None], s, RN)
        if N_TASKS > 5:
            tot, div = _elect_term(tot, div, t5, w5[:, None], s, RN)
        if N_TASKS > 6:
            tot, div = _elect_term(tot, div, t6, w6[:, None], s, RN)
        if N_TASKS > 7:
            tot, div = _elect_term(tot, div, t7, w7[:, None], s, RN)
        merged = _finish(tot, div, NORMALIZE)
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (b + _mul(lam, merged, RN)).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# TIES, large blocks: radix-select histograms
# --------------------------------------------------------------------------------------------

@triton.jit
def _hist_task(d_ptr, b, offs, mask, pre_ptr, task, blk, n_blocks, BINS: tl.constexpr,
               SHIFT: tl.constexpr, BITS: tl.constexpr, MATCH: tl.constexpr, FROM_MODELS: tl.constexpr):
    x = _load_tau(d_ptr, b, offs, mask, FROM_MODELS)
    key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    ok = mask
    if MATCH:  # only keys whose higher bits equal the prefix found so far
        pre = tl.load(pre_ptr + task * n_blocks + blk)
        ok = ok & ((key >> (SHIFT + BITS)) == pre)
    # Excluded keys and padding are counted in bin 0; the launcher subtracts them (it knows how
    # many lanes ran and how many keys match).
    digit = tl.where(ok, (key >> SHIFT) & ((1 << BITS) - 1), 0)
    return tl.histogram(digit, BINS)


@triton.jit
def _hist_kernel(
    hist_ptr, pre_ptr, base_ptr,
    d0, d1, d2, d3, d4, d5, d6, d7,
    numel, block_size, n_blocks, chunks_per_block, task_off,
    N_TASKS: tl.constexpr, FROM_MODELS: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
    MATCH: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr, BINS: tl.constexpr, I64: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = pid // chunks_per_block
    chunk = pid % chunks_per_block
    if I64:
        blk_start = blk.to(tl.int64) * block_size
    else:
        blk_start = blk * block_size
    blk_end = tl.minimum(blk_start + block_size, numel)
    h0 = tl.zeros([BINS], tl.int32)
    h1 = h0
    h2 = h0
    h3 = h0
    h4 = h0
    h5 = h0
    h6 = h0
    h7 = h0
    for tt in range(TILES):
        offs = blk_start + (chunk * TILES + tt) * TILE + tl.arange(0, TILE)
        mask = offs < blk_end
        if FROM_MODELS:
            b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            b = 0.0
        if N_TASKS > 0:
            h0 += _hist_task(d0, b, offs, mask, pre_ptr, task_off + 0, blk, n_blocks, BINS, SHIFT,
                             BITS, MATCH, FROM_MODELS)
        if N_TASKS > 1:
            h1 += _hist_task(d1, b, offs, mask, pre_ptr, task_off + 1, blk, n_blocks, BINS, SHIFT,
                             BITS, MATCH, FROM_MODELS)
        if N_TASKS > 2:
            h2 += _hist_task(d2, b, offs, mask, pre_ptr, task_off + 2, blk, n_blocks, BINS, SHIFT,
                             BITS, MATCH, FROM_MODELS)
        if N_TASKS > 3:
            h3 += _hist_task(d3, b, offs, mask, pre_ptr, task_off + 3, blk, n_blocks, BINS, SHIFT,
                             BITS, MATCH, FROM_MODELS)
        if N_TASKS > 4:
            h4 += _hist_task(d4, b, offs, mask, pre_ptr, task_off + 4, blk, n_blocks, BINS, SHIFT,
                             BITS, MATCH, FROM_MODELS)
        if N_TASKS > 5:
            h5 += _hist_task(d5, b, offs, mask, pre_ptr, task_off + 5, blk, n_blocks, BINS, SHIFT,
                             BITS, MATCH, FROM_MODELS)
        if N_TASKS > 6:
            h6 += _hist_task(d6, b, offs, mask, pre_ptr, task_off + 6, blk, n_blocks, BINS, SHIFT,
                             BITS, MATCH, FROM_MODELS)
        if N_TASKS > 7:
            h7 += _hist_task(d7, b, offs, mask, pre_ptr, task_off + 7, blk, n_blocks, BINS, SHIFT,
                             BITS, MATCH, FROM_MODELS)
    bins = tl.arange(0, BINS)
    hp = hist_ptr + (task_off * n_blocks + blk) * BINS + bins
    row = n_blocks * BINS
    if N_TASKS > 0:
        tl.atomic_add(hp, h0)
    if N_TASKS > 1:
        tl.atomic_add(hp + row, h1)
    if N_TASKS > 2:
        tl.atomic_add(hp + 2 * row, h2)
    if N_TASKS > 3:
        tl.atomic_add(hp + 3 * row, h3)
    if N_TASKS > 4:
        tl.atomic_add(hp + 4 * row, h4)
    if N_TASKS > 5:
        tl.atomic_add(hp + 5 * row, h5)
    if N_TASKS > 6:
        tl.atomic_add(hp + 6 * row, h6)
    if N_TASKS > 7:
        tl.atomic_add(hp + 7 * row, h7)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _chunks(n: int) -> List[tuple[int, int]]:
    return [(i, min(i + MAX_TASKS, n)) for i in range(0, n, MAX_TASKS)] or [(0, 0)]


def _pad(ptrs: Sequence[Tensor], filler: Tensor) -> List[Tensor]:
    return list(ptrs) + [filler] * (MAX_TASKS - len(ptrs))


def _flat_block(numel: int, block_size: int, coeff_stride_block: int, per_block_thr: bool) -> tuple[int, bool]:
    """(elements per program, whether each program lies inside one block)."""
    if block_size % 1024 == 0 and block_size < numel:
        return min(2048, block_size & -block_size), True
    blk = min(2048, max(16, _next_pow2(numel)))
    uniform = block_size >= numel or block_size % blk == 0 or (coeff_stride_block == 0 and not per_block_thr)
    return blk, uniform


def _fp32(x: float) -> float:
    """x rounded to fp32 (on the host: no tensor, so it is also a constant under tracing)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _combine(out, base, deltas, coeffs, s_n, s_b, block_size, from_models, method, lam, thr, fparams, iparams,
             normalize):
    numel = base.numel()
    n = len(deltas)
    # Ranked methods: the last block has its own band, so a program must not straddle blocks.
    per_block = (method == METHOD_TIES and thr.dim() == 2 and thr.shape[1] > 1) or method in RANKED_CODES
    block, uniform = _flat_block(numel, block_size, s_b, per_block)
    i64 = numel + block > _I32_LIMIT
    grid = (triton.cdiv(numel, block),)
    kernel = torch.library.wrap_triton(_combine_kernel)
    chunks = _chunks(n)
    electing = method in ELECTING_CODES
    single = len(chunks) == 1
    f32 = dict(dtype=torch.float32, device=base.device)
    # Scratch only with several launches; otherwise a small read-only tensor stands in (never
    # `out` itself: aliased arguments would confuse the mutation analysis of wrap_triton).
    acc = fparams if single else torch.empty(numel, **f32)
    tot = div = fparams
    if electing and not single:
        tot, div = torch.empty(numel, **f32), torch.empty(numel, **f32)
    thr_stride = thr.shape[1] if thr.dim() == 2 and method not in RANKED_CODES else 0

    def launch(i0, i1, phase, acc_in, final):
        kernel[grid](
            out, base, acc, tot, div, coeffs, thr, fparams, iparams,
            *_pad(deltas[i0:i1], base),
            numel, block_size, s_n, s_b, i0 * s_n, thr_stride, i0, float(lam),
            N_TASKS=i1 - i0, METHOD=method, FROM_MODELS=bool(from_models), UNIFORM=uniform,
            PHASE=phase, ACC_IN=acc_in, FINAL=final, NORMALIZE=bool(normalize),
            BLOCK=block, I64=i64, RN=not interpreting(), num_warps=_num_warps(block),
        )

    if single:
        launch(0, n, 2, False, True)
        return
    for k, (i0, i1) in enumerate(chunks):  # acc = Σ w·t over every chunk
        launch(i0, i1, 0, k > 0, k == len(chunks) - 1)
    if electing:
        for k, (i0, i1) in enumerate(chunks):
            launch(i0, i1, 1, k > 0, k == len(chunks) - 1)


def _rows_tiling(numel: int, block_size: int, n_blocks: int) -> tuple[int, int]:
    cols = _next_pow2(min(block_size, numel))
    rows = max(1, min(max(1, 2048 // cols), _next_pow2(n_blocks)))
    return rows, cols


def _large_thresholds(base, deltas, block_size, from_models, rho: Tensor) -> Tensor:
    """thr [N, n_blocks] fp32: the k-th largest |τᵢ| of every block (radix select, 5 digits)."""
    numel = base.numel()
    n = len(deltas)
    n_blocks = triton.cdiv(numel, block_size)
    dev = base.device
    tile = 2048
    span = min(block_size, numel)
    tiles = max(1, min(16, triton.cdiv(span, tile)))
    chunks_per_block = triton.cdiv(span, tile * tiles)
    i64 = numel + tile * tiles * chunks_per_block > _I32_LIMIT
    grid = (n_blocks * chunks_per_block,)
    kernel = torch.library.wrap_triton(_hist_kernel)
    # need[i, b]: the rank (from the top) of the threshold among the keys still matching.
    lengths = torch.full((n_blocks,), block_size, dtype=torch.int64, device=dev)
    lengths[n_blocks - 1] = numel - (n_blocks - 1) * block_size
    # k = max(1, ⌊ρ·n⌋) with ρ (fp64, as given) and the product in fp64: mergekit 0.1.5's int(ρ·n).
    need = (rho.to(torch.float64)[:, None] * lengths.to(torch.float64)[None, :]).floor().to(torch.int64).clamp_min(1)
    matched = lengths.expand(n, n_blocks)  # keys still in the running, per (task, block)
    lanes = chunks_per_block * tiles * tile  # lanes counted per block (padding included)
    prefix = torch.zeros((n, n_blocks), dtype=torch.int64, device=dev)
    for p, (shift, bits) in enumerate(_DIGITS):
        bins = 1 << bits
        hist = torch.zeros((n, n_blocks, bins), dtype=torch.int32, device=dev)
        pre32 = prefix.to(torch.int32)
        for i0, i1 in _chunks(n):
            kernel[grid](
                hist, pre32, base, *_pad(deltas[i0:i1], base),
                numel, block_size, n_blocks, chunks_per_block, i0,
                N_TASKS=i1 - i0, FROM_MODELS=bool(from_models), SHIFT=shift, BITS=bits,
                MATCH=p > 0, TILE=tile, TILES=tiles, BINS=bins, I64=i64, num_warps=8,
            )
        h = hist.to(torch.int64)
        h[..., 0] -= lanes - matched  # the excluded keys and the padding lanes
        ge = h.flip(-1).cumsum(-1).flip(-1)  # ge[..., d] = #(digit >= d) among the matching keys
        dstar = ((ge >= need[..., None]).sum(-1) - 1).clamp_min(0)
        hd = h.gather(-1, dstar[..., None])[..., 0]
        need = need - (ge.gather(-1, dstar[..., None])[..., 0] - hd)
        matched = hd
        prefix = (prefix << bits) | dstar
    return prefix.to(torch.int32).view(torch.float32)


def _ranked_params(density: Sequence[float], numel: int, block_size: int, gamma: float,
                   epsilon: float) -> tuple[list, list]:
    """Per task: the breadcrumbs rank bands [lo, hi) of a full block and of the last block (ints),
    and DELLA's ρ − ε, 2ε and n − 1 of both block lengths (fp32 values; n − 1 = 0 means n = 1)."""
    bs = min(block_size, numel)
    lengths = (bs, numel - (triton.cdiv(numel, bs) - 1) * bs)
    ints, floats = [], []
    for d in density:
        # counts from the fp64 density (mergekit's int(density * n)); DELLA's ρ − ε from fp32(ρ)
        rho = _fp32(d)
        if d >= 1.0:  # density 1 keeps every entry, unscaled: the band is every rank, p = 1
            ints += [0, lengths[0], 0, lengths[1]]
            floats += [1.0, 0.0, float(lengths[0] - 1), float(lengths[1] - 1)]
            continue
        for length in lengths:
            n_top = math.floor(gamma * length)
            n_keep = math.floor(d * length)
            ints += [length - n_keep - n_top, length - n_top]
        floats += [_fp32(rho - _fp32(epsilon)), _fp32(2.0 * epsilon), float(lengths[0] - 1), float(lengths[1] - 1)]
    return ints, floats


def merge_forward(out: Tensor, base: Tensor, deltas: Sequence[Tensor], coeffs: Tensor, coeff_stride_n: int,
                  coeff_stride_block: int, density: Sequence[float], block_size: int, from_models: bool,
                  method: int, lam: float, seed: int, name_hash: int, normalize: bool, gamma: float = 0.01,
                  epsilon: float = 0.1) -> None:
    """out = the merge of `method` (METHOD_TIES / METHOD_DARE / METHOD_DARE_TIES / METHOD_BREADCRUMBS /
    METHOD_DELLA / METHOD_DELLA_LINEAR).

    All tensors contiguous on one device, base.numel() > 0, len(deltas) >= 1; `coeffs` fp32 with
    c[i, b] at i·coeff_stride_n + b·coeff_stride_block; `seed` in [0, 2⁶⁴) (its bits as int64 are
    the Philox key), `name_hash` the 32-bit FNV-1a of the tensor's name.
    """
    numel = base.numel()
    n = len(deltas)
    dev = base.device
    n_blocks = triton.cdiv(numel, block_size)
    seed_i64 = seed - (1 << 64) if seed >= 1 << 63 else seed
    ints: list = []  # int parameters after (seed, name hash): the breadcrumbs rank bands
    if method in RANKED_CODES:
        ints, floats = _ranked_params(density, numel, block_size, gamma, epsilon)
        fparams = torch.tensor(floats, dtype=torch.float32, device=dev)
        thr = block_ranks(base, deltas, block_size, from_models)  # the ranks, [N, numel] int32
    elif method == METHOD_TIES:
        rho = torch.tensor([float(d) for d in density], dtype=torch.float64, device=dev)  # counts in fp64
        if min(block_size, numel) <= SMALL_MAX:
            rows, cols = _rows_tiling(numel, block_size, n_blocks)
            grid = (triton.cdiv(n_blocks, rows),)
            i64 = n_blocks * block_size + rows * block_size + cols > _I32_LIMIT
            kernel = torch.library.wrap_triton(_ties_rows_kernel)
            fused = n <= MAX_TASKS
            # fused: no threshold table (a tensor the kernel never writes stands in for it)
            thr = rho if fused else torch.empty((n, n_blocks), dtype=torch.float32, device=dev)
            for i0, i1 in _chunks(n):
                kernel[grid](
                    out, base, thr, coeffs, rho, *_pad(deltas[i0:i1], base),
                    numel, block_size, n_blocks, coeff_stride_n, coeff_stride_block, i0 * coeff_stride_n, i0,
                    float(lam),
                    N_TASKS=i1 - i0, FROM_MODELS=bool(from_models), FUSED=fused, NORMALIZE=bool(normalize),
                    ROWS=rows, COLS=cols, I64=i64, RN=not interpreting(),
                    JOINT=0 < i1 - i0 <= ROWS_JOINT_MAX_TASKS and cols <= ROWS_JOINT_MAX_COLS, num_warps=_num_warps(rows * cols),
                )
            if fused:
                return
        else:
            thr = _large_thresholds(base, deltas, block_size, from_models, rho)
        fparams = thr  # unused by TIES
    else:
        # ρ in fp32 and the reference's keep value 1/ρ computed in fp32 (fp64 division then one
        # rounding to fp32 is the correctly rounded fp32 quotient).
        vals = []
        for d in density:
            vals += [_fp32(d), _fp32(1.0 / _fp32(d))]
        fparams = torch.tensor(vals, dtype=torch.float32, device=dev)
        thr = fparams  # unused by DARE
    iparams = torch.tensor([seed_i64, name_hash] + ints, dtype=torch.int64, device=dev)
    _combine(out, base, deltas, coeffs, coeff_stride_n, coeff_stride_block, block_size, from_models, method, lam,
             thr, fparams, iparams, normalize)
