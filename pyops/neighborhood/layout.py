"""The tensors every neighbourhood-attention kernel exchanges, shared by the C++ and Triton paths.

Every kernel works on the 3D form (`pyops.neighborhood.ops` brings 1D/2D problems into it): q/k
``[B, S0, S1, S2, H, D]``, v ``[B, S0, S1, S2, H, Dv]``, rpb ``[H, 2k₀−1, 2k₁−1, 2k₂−1]``. The
registered ops of both backends allocate their results here, and their fake kernels return the
same allocations, so a traced graph and an eager call see identical shapes, dtypes and devices:

    forward   out [B, S0, S1, S2, H, Dv] in q's dtype, lse [B, S0, S1, S2, H] fp32
    backward  dq, dk, dv like q, k, v; drpb like rpb (any float dtype), or an empty fp32 tensor
              without rpb (an op's outputs cannot be None)

A call the kernels cannot prove exact (`exact_forward` / `exact_backward`: a non-finite input, or
magnitudes that could overflow fp32, pyops._finite) takes the definition's results instead,
through `reference_forward` / `reference_backward`, in these same layouts.
"""
from __future__ import annotations

import math

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from pyops._finite import maxima, within
from pyops.neighborhood import reference as ref


def new_outputs(q: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """Uninitialised ``(out, lse)`` of a forward call."""
    return q.new_empty(v.shape), torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)


def new_drpb(rpb: Optional[Tensor], q: Tensor) -> Tensor:
    """Uninitialised rpb gradient: rpb's shape, dtype and device; ``[0]`` fp32 without rpb."""
    if rpb is None:
        return q.new_empty(0, dtype=torch.float32)
    return torch.empty(rpb.shape, dtype=rpb.dtype, device=rpb.device)


def new_grads(q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Uninitialised ``(dq, dk, dv, drpb)`` of a backward call."""
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), new_drpb(rpb, q)


def rpb32(rpb: Optional[Tensor]) -> Optional[Tensor]:
    """The bias as the kernels read it: detached, fp32, contiguous (they accumulate logits in fp32)."""
    return None if rpb is None else rpb.detach().to(torch.float32).contiguous()


def exact_forward(q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor], kernel_size: List[int],
                  scale: float) -> bool:
    """True unless an input holds a NaN or ±inf or its magnitudes could overflow the forward's fp32
    intermediates: a logit (|scale|·D·max|q|·max|k| + max|rpb|) or the unnormalised accumulator
    (K·max|v|, K the window size; every weight exp(s − m) <= 1). True when values cannot be read."""
    m = maxima(q, k, v, rpb)
    if m is None:
        return True
    mq, mk, mv, mr = m
    window = math.prod(kernel_size)
    return within(abs(scale) * q.shape[-1] * mq * mk + mr, window * mv)


def exact_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor], kernel_size: List[int],
                   scale: float) -> bool:
    """`exact_forward` for the backward's intermediates as well: dP and dS (2·Dv·max|dO|·max|v|),
    dQ (|scale|·K·max|dS|·max|k|), and dK, dV, drpb, which sum over at most every query of the
    batch (N = B·S0·S1·S2): |scale|·N·max|dS|·max|q|, N·max|dO|, N·max|dS|."""
    m = maxima(dout, q, k, v, rpb)
    if m is None:
        return True
    mo, mq, mk, mv, mr = m
    window, n = math.prod(kernel_size), math.prod(q.shape[:-2])
    ds = 2.0 * v.shape[-1] * mo * mv
    return within(abs(scale) * q.shape[-1] * mq * mk + mr, window * mv, ds, abs(scale) * window * ds * mk,
                  abs(scale) * n * ds * mq, n * mo, n * ds)


def reference_forward(q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor], kernel_size: List[int],
                      stride: List[int], dilation: List[int], is_causal: List[bool],
                      scale: float) -> Tuple[Tensor, Tensor]:
    """The definition's (out, lse) on the 3D form, in the kernels' layout."""
    out, lse = ref.neighborhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, rpb, scale,
                                          return_lse=True)
    return out.contiguous(), lse.to(torch.float32).contiguous()


def reference_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor],
                       kernel_size: List[int], stride: List[int], dilation: List[int], is_causal: List[bool],
                       scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The definition's (dq, dk, dv, drpb) on the 3D form, in the kernels' layout."""
    dq, dk, dv, drpb = ref.neighborhood_attention_backward(dout, q, k, v, kernel_size, stride, dilation,
                                                           is_causal, rpb, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), (new_drpb(None, q).zero_() if drpb is None
                                                               else drpb.contiguous())
