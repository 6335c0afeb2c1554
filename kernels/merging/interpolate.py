"""Triton kernels of the per-element passes of mergekit 0.1.5's interpolating merge methods.

The definitions are in pyops/merging/reference.py (linear, slerp, nearswap, passthrough, nuslerp,
multislerp, karcher). pyops.merging.backend_triton computes each method's few scalars (norms,
angles, weights: from a Gram matrix, as the C++ path does) and calls one of these passes; their
arithmetic is the C++ kernels' (csrc/merging/interpolate.h):

    combine_forward:  out[j] = [b[j] +] (Σᵢ c[v, i]·(xᵢ[j] [− b[j]])) [/ d[v]]
                      in fp32, i = 0..N−1 from 0, each product rounded on its own (no FMA),
                      IEEE division, rounded once to out's dtype. v is element j's vector:
                      0 (the whole tensor), j // length (rows of the last dimension) or
                      j mod n_vectors (the vectors along dim 0, mergekit's nuslerp_row_wise).
    nearswap_forward: w = clamp(t / max(|a − b|, 1e-6), 0, 1), out = w·b + (1 − w)·a per
                      element (a the base), fp32; a NaN propagates as torch's clamp does.

Tensors contiguous on one device (CUDA, or CPU under TRITON_INTERPRET=1), inputs fp32 / fp16 /
bf16 of one dtype, out any of those; coefficients and divisors fp32. More than MAX_INPUTS inputs
run as several launches accumulating in an fp32 scratch tensor, in the same order.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from pyops._triton import interpreting

MAX_INPUTS = 8
BLOCK = 1024
_I32_LIMIT = 2**31 - 1
# combine_forward's vector of element j
MODE_WHOLE, MODE_ROWS, MODE_COLUMNS = 0, 1, 2


@triton.jit
def _mul(a, b, RN: tl.constexpr):
    """a·b rounded on its own (the C++ kernels and the reference round the product before the add;
    the GPU build uses libdevice's mul.rn, the interpreter never contracts)."""
    if RN:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def _term(acc, x_ptr, offs, mask, b, c_ptr, c_idx, HAS_BASE: tl.constexpr, MODE: tl.constexpr, RN: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BASE:
        x = x - b
    if MODE == 0:
        c = tl.load(c_ptr + c_idx)
    else:
        c = tl.load(c_ptr + c_idx, mask=mask, other=0.0)
    return acc + _mul(c, x, RN)


@triton.jit
def _combine_kernel(
    out_ptr, acc_ptr, base_ptr, c_ptr, div_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    numel, length, n_vectors, n_total, i0,
    N: tl.constexpr, HAS_BASE: tl.constexpr, HAS_DIV: tl.constexpr, MODE: tl.constexpr,
    ACC_IN: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr, I64: tl.constexpr, RN: tl.constexpr,
):
    pid = tl.program_id(0)
    if I64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if MODE == 0:
        v = 0
    elif MODE == 1:
        v = offs // length
    else:
        v = offs % n_vectors
    c_idx = v * n_total + i0  # c[v, i0]; input k of this launch reads c_idx + k
    b = tl.zeros([BLOCK], tl.float32)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACC_IN:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
    acc = _term(acc, x0, offs, mask, b, c_ptr, c_idx, HAS_BASE, MODE, RN)
    if N > 1:
        acc = _term(acc, x1, offs, mask, b, c_ptr, c_idx + 1, HAS_BASE, MODE, RN)
    if N > 2:
        acc = _term(acc, x2, offs, mask, b, c_ptr, c_idx + 2, HAS_BASE, MODE, RN)
    if N > 3:
        acc = _term(acc, x3, offs, mask, b, c_ptr, c_idx + 3, HAS_BASE, MODE, RN)
    if N > 4:
        acc = _term(acc, x4, offs, mask, b, c_ptr, c_idx + 4, HAS_BASE, MODE, RN)
    if N > 5:
        acc = _term(acc, x5, offs, mask, b, c_ptr, c_idx + 5, HAS_BASE, MODE, RN)
    if N > 6:
        acc = _term(acc, x6, offs, mask, b, c_ptr, c_idx + 6, HAS_BASE, MODE, RN)
    if N > 7:
        acc = _term(acc, x7, offs, mask, b, c_ptr, c_idx + 7, HAS_BASE, MODE, RN)
    if FINAL:
        if HAS_DIV:
            if MODE == 0:
                d = tl.load(div_ptr) + tl.zeros([BLOCK], tl.float32)
            else:
                d = tl.load(div_ptr + v, mask=mask, other=1.0)
            acc = tl.math.div_rn(acc, d)
        if HAS_BASE:
            acc = b + acc
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + offs, acc, mask=mask)


@triton.jit
def _nearswap_kernel(out_ptr, a_ptr, b_ptr, t, numel, BLOCK: tl.constexpr, I64: tl.constexpr, RN: tl.constexpr):
    pid = tl.program_id(0)
    if I64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.abs(a - b)
    d = tl.where(d < 1e-6, 1e-6, d)  # clamp(min=1e-6): a NaN stays NaN
    w = tl.math.div_rn(t + tl.zeros([BLOCK], tl.float32), d)
    w = tl.where(w < 0.0, 0.0, w)  # clamp(0, 1): a NaN stays NaN
    w = tl.where(w > 1.0, 1.0, w)
    acc = _mul(w, b, RN) + _mul(1.0 - w, a, RN)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _pad(xs: Sequence[Tensor], filler: Tensor) -> List[Tensor]:
    return list(xs) + [filler] * (MAX_INPUTS - len(xs))


def combine_forward(out: Tensor, base: Optional[Tensor], inputs: Sequence[Tensor], coeffs: Tensor,
                    divisor: Optional[Tensor], mode: int, n_vectors: int, length: int) -> None:
    """out = [base +] (Σᵢ coeffs[v, i]·(inputs[i] [− base])) [/ divisor[v]] (module docstring).

    inputs N ≥ 1 contiguous tensors of out's numel; coeffs fp32 contiguous [n_vectors, N];
    divisor None or fp32 [n_vectors]; mode MODE_WHOLE / MODE_ROWS (vectors of `length`
    consecutive elements) / MODE_COLUMNS (n_vectors interleaved vectors)."""
    numel = out.numel()
    n = len(inputs)
    if numel == 0:
        return
    grid = (triton.cdiv(numel, BLOCK),)
    i64 = numel + BLOCK > _I32_LIMIT
    chunks = [(i, min(i + MAX_INPUTS, n)) for i in range(0, n, MAX_INPUTS)]
    acc = torch.empty(numel, dtype=torch.float32, device=out.device) if len(chunks) > 1 else coeffs
    filler = inputs[0]
    b = base if base is not None else filler
    d = divisor if divisor is not None else coeffs
    kernel = torch.library.wrap_triton(_combine_kernel)
    for k, (i0, i1) in enumerate(chunks):
        kernel[grid](
            out, acc, b, coeffs, d, *_pad(inputs[i0:i1], filler),
            numel, max(int(length), 1), max(int(n_vectors), 1), n, i0,
            N=i1 - i0, HAS_BASE=base is not None, HAS_DIV=divisor is not None, MODE=int(mode),
            ACC_IN=k > 0, FINAL=k == len(chunks) - 1, BLOCK=BLOCK, I64=i64, RN=not interpreting(), num_warps=4,
        )


def nearswap_forward(out: Tensor, base: Tensor, model: Tensor, t: float) -> None:
    """out = nearswap(base, model, t) per element (module docstring); t rounded to fp32."""
    numel = out.numel()
    if numel == 0:
        return
    grid = (triton.cdiv(numel, BLOCK),)
    torch.library.wrap_triton(_nearswap_kernel)[grid](
        out, base, model, float(t), numel, BLOCK=BLOCK, I64=numel + BLOCK > _I32_LIMIT, RN=not interpreting(),
        num_warps=4)
