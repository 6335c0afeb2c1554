"""Triton kernels for block-wise task arithmetic (`pyops.kernels.merging.task_arithmetic`).

The math is in `pyops/merging/reference.py`; the registered ops that call these launchers are
in `pyops/merging/backend_triton.py`. With the flattened tensor cut into blocks of `block_size` elements
and c[i, b] = coeffs[i * coeff_stride_n + b * coeff_stride_block]:

    forward     out[j]          = base[j] + Σᵢ c[i, j // block_size] · τᵢ[j]
    backward    grad_base[j]    = g[j]                        (from_models: g[j] · (1 − Σᵢ c[i, b]))
                grad_deltas[i]  = c[i, b] · g
                grad_coeffs[i,b]= Σ_{j in block b} g[j] · τᵢ[j]

τᵢ = deltas[i], or deltas[i] − base when `from_models`. Everything accumulates in fp32.

Design:
* A kernel takes at most `MAX_TASKS` delta pointers as separate arguments (Triton has no
  variable-length pointer lists) and a constexpr count. More tasks run as several launches that
  accumulate in an fp32 scratch tensor, never in a low-precision output.
* Forward: a flat, element-wise pass in tiles of `BLOCK` elements. When every tile lies inside
  one coefficient block (one block, broadcast coefficients, or `block_size` a multiple of the
  tile) the coefficients are scalars per program; otherwise each element gathers its own from the
  tiny (cached) coefficient tensor.
* Backward: tiles of shape [ROWS, COLS] aligned to coefficient blocks. Large blocks: ROWS = 1,
  each program covers COLS elements of one block (a block spans `tiles_per_block` programs).
  Small blocks: COLS = next power of two ≥ block_size, each program owns ROWS whole blocks.
  Each program reduces its tile with `tl.sum` and writes one partial per (task, block, tile) —
  directly into `grad_coeffs` when a block is one tile, else into a scratch tensor that is summed
  with `torch.sum` afterwards. No atomics: the coefficient gradient is bit-for-bit deterministic.
* Launchers use only tensor metadata and torch ops (no host syncs), and launch through
  `torch.library.wrap_triton`, so they can run inside `triton_op` bodies and `torch.compile`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_TASKS = 8  # delta pointers per launch; the kernels below unroll exactly this many slots

_I32_LIMIT = 2**31 - 1


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _num_warps(elems: int) -> int:
    return 8 if elems >= 4096 else 4 if elems >= 1024 else 2 if elems >= 256 else 1


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_term(acc, b, d_ptr, c_ptr, c_idx, offs, mask, FROM_MODELS: tl.constexpr, UNIFORM: tl.constexpr):
    x = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FROM_MODELS:
        x = x - b
    if UNIFORM:
        c = tl.load(c_ptr + c_idx)  # one coefficient for the whole tile
    else:
        c = tl.load(c_ptr + c_idx, mask=mask, other=0.0)  # per element, from the cached coeffs
    return acc + c * x


@triton.jit
def _forward_kernel(
    out_ptr, base_ptr, acc_ptr, c_ptr,
    d0, d1, d2, d3, d4, d5, d6, d7,
    numel, block_size, c_stride_n, c_stride_block, c_off,
    N_TASKS: tl.constexpr, FROM_MODELS: tl.constexpr, ACC_IN: tl.constexpr, ACC_OUT: tl.constexpr,
    UNIFORM: tl.constexpr, BLOCK: tl.constexpr, I64: tl.constexpr,
):
    pid = tl.program_id(0)
    if I64:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    if FROM_MODELS or not ACC_IN:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = 0.0
    if ACC_IN:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    else:
        acc = b
    if UNIFORM:
        blk = start // block_size
    else:
        blk = offs // block_size
    c_idx = c_off + blk * c_stride_block
    if N_TASKS > 0:
        acc = _fwd_term(acc, b, d0, c_ptr, c_idx, offs, mask, FROM_MODELS, UNIFORM)
    if N_TASKS > 1:
        acc = _fwd_term(acc, b, d1, c_ptr, c_idx + c_stride_n, offs, mask, FROM_MODELS, UNIFORM)
    if N_TASKS > 2:
        acc = _fwd_term(acc, b, d2, c_ptr, c_idx + 2 * c_stride_n, offs, mask, FROM_MODELS, UNIFORM)
    if N_TASKS > 3:
        acc = _fwd_term(acc, b, d3, c_ptr, c_idx + 3 * c_stride_n, offs, mask, FROM_MODELS, UNIFORM)
    if N_TASKS > 4:
        acc = _fwd_term(acc, b, d4, c_ptr, c_idx + 4 * c_stride_n, offs, mask, FROM_MODELS, UNIFORM)
    if N_TASKS > 5:
        acc = _fwd_term(acc, b, d5, c_ptr, c_idx + 5 * c_stride_n, offs, mask, FROM_MODELS, UNIFORM)
    if N_TASKS > 6:
        acc = _fwd_term(acc, b, d6, c_ptr, c_idx + 6 * c_stride_n, offs, mask, FROM_MODELS, UNIFORM)
    if N_TASKS > 7:
        acc = _fwd_term(acc, b, d7, c_ptr, c_idx + 7 * c_stride_n, offs, mask, FROM_MODELS, UNIFORM)
    if ACC_OUT:
        tl.store(acc_ptr + offs, acc, mask=mask)
    else:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _forward_block(numel: int, block_size: int, coeff_stride_block: int) -> tuple[int, bool]:
    """(elements per program, whether each program sees a single coefficient per task)."""
    if block_size % 1024 == 0 and block_size < numel:
        # Largest power of two ≤ 4096 dividing block_size: every tile lies inside one block.
        blk = min(4096, block_size & -block_size)
        return blk, True
    blk = min(4096, max(16, _next_pow2(numel)))
    uniform = coeff_stride_block == 0 or block_size >= numel or block_size % blk == 0
    return blk, uniform


def _chunks(n: int) -> List[tuple[int, int]]:
    """[start, stop) task ranges of at most MAX_TASKS; one empty range when there are no tasks."""
    return [(i, min(i + MAX_TASKS, n)) for i in range(0, n, MAX_TASKS)] or [(0, 0)]


def _pad(ptrs: Sequence[Tensor], filler: Tensor) -> List[Tensor]:
    return list(ptrs) + [filler] * (MAX_TASKS - len(ptrs))


def task_arithmetic_forward(out: Tensor, base: Tensor, deltas: Sequence[Tensor], coeffs: Tensor,
                            coeff_stride_n: int, coeff_stride_block: int, block_size: int,
                            from_models: bool) -> None:
    """out = base + Σᵢ c[i, block] · τᵢ (fp32 accumulation). `out` may be `base` itself.

    All tensors contiguous, base.numel() > 0; `coeffs` fp32 with c[i, b] at
    i * coeff_stride_n + b * coeff_stride_block.
    """
    numel = base.numel()
    n = len(deltas)
    block, uniform = _forward_block(numel, block_size, coeff_stride_block)
    i64 = numel + block > _I32_LIMIT
    grid = (triton.cdiv(numel, block),)
    kernel = torch.library.wrap_triton(_forward_kernel)
    chunks = _chunks(n)
    acc = torch.empty(numel, dtype=torch.float32, device=base.device) if len(chunks) > 1 else out
    for k, (i0, i1) in enumerate(chunks):
        first, last = k == 0, k == len(chunks) - 1
        kernel[grid](
            out, base, acc, coeffs,
            *_pad(deltas[i0:i1], base),
            numel, block_size, coeff_stride_n, coeff_stride_block, i0 * coeff_stride_n,
            N_TASKS=i1 - i0, FROM_MODELS=bool(from_models), ACC_IN=not first, ACC_OUT=not last,
            UNIFORM=uniform, BLOCK=block, I64=i64, num_warps=_num_warps(block),
        )


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@triton.jit
def _bwd_term(g, bb, offs, mask, d_ptr, gd_ptr, c, part_ptr, part_idx, part_mask,
              FROM_MODELS: tl.constexpr, NEED_DELTAS: tl.constexpr, NEED_COEFFS: tl.constexpr):
    if NEED_DELTAS:
        tl.store(gd_ptr + offs, (c * g).to(gd_ptr.dtype.element_ty), mask=mask)
    if NEED_COEFFS:
        x = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if FROM_MODELS:
            x = x - bb
        tl.store(part_ptr + part_idx, tl.sum(g * x, axis=1), mask=part_mask)


@triton.jit
def _backward_kernel(
    grad_ptr, base_ptr, c_ptr, csum_ptr, gbase_ptr, part_ptr,
    d0, d1, d2, d3, d4, d5, d6, d7,
    gd0, gd1, gd2, gd3, gd4, gd5, gd6, gd7,
    numel, block_size, n_blocks, tiles_per_block,
    c_stride_n, c_stride_block, c_off, csum_stride, part_stride_n, part_off,
    N_TASKS: tl.constexpr, FROM_MODELS: tl.constexpr, BASE_MODE: tl.constexpr,
    NEED_DELTAS: tl.constexpr, NEED_COEFFS: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, I64: tl.constexpr,
):
    # BASE_MODE: 0 no grad_base; 1 grad_base = g; 2 g·(1 − Σ c) over this launch's tasks;
    #            3 g·(1 − csum[block]) with csum precomputed over all tasks.
    pid = tl.program_id(0)
    t = pid % tiles_per_block
    blocks = (pid // tiles_per_block) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_ok = blocks < n_blocks
    cols = t * COLS + tl.arange(0, COLS)  # [COLS], position inside the block
    if I64:
        row_start = blocks.to(tl.int64) * block_size
    else:
        row_start = blocks * block_size
    offs = row_start[:, None] + cols[None, :]
    mask = (cols < block_size)[None, :] & (offs < numel)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FROM_MODELS and NEED_COEFFS:
        bb = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        bb = 0.0
    part_idx = part_off + blocks * tiles_per_block + t
    c_idx = c_off + blocks * c_stride_block
    csum = 0.0
    if N_TASKS > 0:
        c0 = tl.load(c_ptr + c_idx, mask=row_ok, other=0.0)[:, None]
        csum += c0
        _bwd_term(g, bb, offs, mask, d0, gd0, c0, part_ptr, part_idx, row_ok,
                  FROM_MODELS, NEED_DELTAS, NEED_COEFFS)
    if N_TASKS > 1:
        c = tl.load(c_ptr + c_idx + c_stride_n, mask=row_ok, other=0.0)[:, None]
        csum += c
        _bwd_term(g, bb, offs, mask, d1, gd1, c, part_ptr, part_idx + part_stride_n, row_ok,
                  FROM_MODELS, NEED_DELTAS, NEED_COEFFS)
    if N_TASKS > 2:
        c = tl.load(c_ptr + c_idx + 2 * c_stride_n, mask=row_ok, other=0.0)[:, None]
        csum += c
        _bwd_term(g, bb, offs, mask, d2, gd2, c, part_ptr, part_idx + 2 * part_stride_n, row_ok,
                  FROM_MODELS, NEED_DELTAS, NEED_COEFFS)
    if N_TASKS > 3:
        c = tl.load(c_ptr + c_idx + 3 * c_stride_n, mask=row_ok, other=0.0)[:, None]
        csum += c
        _bwd_term(g, bb, offs, mask, d3, gd3, c, part_ptr, part_idx + 3 * part_stride_n, row_ok,
                  FROM_MODELS, NEED_DELTAS, NEED_COEFFS)
    if N_TASKS > 4:
        c = tl.load(c_ptr + c_idx + 4 * c_stride_n, mask=row_ok, other=0.0)[:, None]
        csum += c
        _bwd_term(g, bb, offs, mask, d4, gd4, c, part_ptr, part_idx + 4 * part_stride_n, row_ok,
                  FROM_MODELS, NEED_DELTAS, NEED_COEFFS)
    if N_TASKS > 5:
        c = tl.load(c_ptr + c_idx + 5 * c_stride_n, mask=row_ok, other=0.0)[:, None]
        csum += c
        _bwd_term(g, bb, offs, mask, d5, gd5, c, part_ptr, part_idx + 5 * part_stride_n, row_ok,
                  FROM_MODELS, NEED_DELTAS, NEED_COEFFS)
    if N_TASKS > 6:
        c = tl.load(c_ptr + c_idx + 6 * c_stride_n, mask=row_ok, other=0.0)[:, None]
        csum += c
        _bwd_term(g, bb, offs, mask, d6, gd6, c, part_ptr, part_idx + 6 * part_stride_n, row_ok,
                  FROM_MODELS, NEED_DELTAS, NEED_COEFFS)
    if N_TASKS > 7:
        c = tl.load(c_ptr + c_idx + 7 * c_stride_n, mask=row_ok, other=0.0)[:, None]
        csum += c
        _bwd_term(g, bb, offs, mask, d7, gd7, c, part_ptr, part_idx + 7 * part_stride_n, row_ok,
                  FROM_MODELS, NEED_DELTAS, NEED_COEFFS)
    if BASE_MODE == 1:
        tl.store(gbase_ptr + offs, g.to(gbase_ptr.dtype.element_ty), mask=mask)
    if BASE_MODE == 2:
        tl.store(gbase_ptr + offs, (g * (1.0 - csum)).to(gbase_ptr.dtype.element_ty), mask=mask)
    if BASE_MODE == 3:
        cs = tl.load(csum_ptr + blocks * csum_stride, mask=row_ok, other=0.0)[:, None]
        tl.store(gbase_ptr + offs, (g * (1.0 - cs)).to(gbase_ptr.dtype.element_ty), mask=mask)


# Per-program overhead, in element-equivalents, used to pick the tile width of large blocks:
# narrower tiles waste fewer masked lanes at the end of a block, wider ones launch fewer programs.
_PROGRAM_OVERHEAD = 384
_SMALL_BLOCK = 256  # blocks shorter than this are grouped several to a program


def _backward_tiling(numel: int, block_size: int) -> tuple[int, int, int]:
    """(ROWS, COLS, tiles_per_block) for the backward kernel."""
    span = min(block_size, numel)  # elements of the longest block
    if span < _SMALL_BLOCK:
        cols = _next_pow2(span)
        n_blocks = triton.cdiv(numel, block_size)
        target = min(4096, max(_next_pow2(numel), cols))
        rows = max(1, min(target // cols, _next_pow2(n_blocks)))
        return rows, cols, 1
    best = None
    for cols in (256, 512, 1024, 2048, 4096):
        if cols > 256 and cols > _next_pow2(span):
            break
        tiles = triton.cdiv(span, cols)
        cost = tiles * (cols + _PROGRAM_OVERHEAD)
        if best is None or cost < best[0]:
            best = (cost, cols, tiles)
    return 1, best[1], best[2]


def task_arithmetic_backward(grad: Tensor, base: Tensor, deltas: Sequence[Tensor], coeffs: Tensor,
                             coeff_stride_n: int, coeff_stride_block: int, block_size: int,
                             from_models: bool, grad_base: Optional[Tensor],
                             grad_deltas: Optional[Sequence[Tensor]], grad_coeffs: Optional[Tensor]) -> None:
    """Fills whichever of grad_base, grad_deltas (N tensors), grad_coeffs (fp32 [N, n_blocks]) is given.

    grad_base = g (from_models: g·(1 − Σᵢ c[i, block])); grad_deltas[i] = c[i, block]·g;
    grad_coeffs[i, b] = Σ_{block b} g·τᵢ, reduced deterministically (per-tile partials, no atomics).
    """
    numel = base.numel()
    n = len(deltas)
    n_blocks = triton.cdiv(numel, block_size)
    need_deltas = grad_deltas is not None and n > 0
    need_coeffs = grad_coeffs is not None and n > 0
    need_base = grad_base is not None
    if not (need_base or need_deltas or need_coeffs):
        return
    rows, cols, tiles = _backward_tiling(numel, block_size)
    grid = (triton.cdiv(n_blocks, rows) * tiles,)
    i64 = numel + rows * cols * tiles > _I32_LIMIT
    chunks = _chunks(n)

    # Coefficient-gradient partials: straight into grad_coeffs when a block is one tile.
    part = None
    if need_coeffs:
        part = grad_coeffs if tiles == 1 else torch.empty((n, n_blocks * tiles), dtype=torch.float32,
                                                          device=base.device)
    part_stride_n = n_blocks * tiles

    csum, csum_stride = coeffs, 0
    base_mode = 0
    if need_base:
        base_mode = 1
        if from_models:
            if len(chunks) == 1:
                base_mode = 2
            else:
                nb_c = n_blocks if coeff_stride_block != 0 else 1
                csum = torch.as_strided(coeffs, (n, nb_c), (coeff_stride_n, coeff_stride_block)).sum(dim=0)
                csum_stride = 1 if coeff_stride_block != 0 else 0
                base_mode = 3

    dummy = part if part is not None else (grad_base if grad_base is not None else grad_deltas[0])
    kernel = torch.library.wrap_triton(_backward_kernel)
    for k, (i0, i1) in enumerate(chunks):
        mode = base_mode if k == 0 else 0
        if not (mode or need_deltas or need_coeffs):
            continue
        gds = list(grad_deltas[i0:i1]) if need_deltas else []
        kernel[grid](
            grad, base, coeffs, csum,
            grad_base if mode else dummy,
            part if need_coeffs else dummy,
            *_pad(deltas[i0:i1], base),
            *_pad(gds, gds[0] if gds else dummy),
            numel, block_size, n_blocks, tiles,
            coeff_stride_n, coeff_stride_block, i0 * coeff_stride_n, csum_stride,
            part_stride_n, i0 * part_stride_n,
            N_TASKS=i1 - i0, FROM_MODELS=bool(from_models), BASE_MODE=mode,
            NEED_DELTAS=need_deltas, NEED_COEFFS=need_coeffs,
            ROWS=rows, COLS=cols, I64=i64, num_warps=_num_warps(rows * cols),
        )
    if need_coeffs and tiles > 1:
        grad_coeffs.copy_(part.view(n, n_blocks, tiles).sum(dim=2))
