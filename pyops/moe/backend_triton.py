"""The Triton path of `pyops.moe_experts` (kernels/moe.py, shipped as pyops.kernels.moe).

`pyops.moe.ops` validates, chooses the backend and registers the autograd; this module holds the
two registered ops of the Triton path, their fake kernels and the launcher calls:

    pyops::moe_experts_triton            grouped GEMMs, gather and activation fused (y, a, b, h, ys)
    pyops::moe_experts_triton_backward   dx, dweights, dw1, dw2, dw3

The forward saves h too (the CPU path recomputes it), so its outputs are `schema.experts_outputs`
with every intermediate filled. Triton itself is imported lazily (by the capability check or the
first call): registering the ops needs no Triton, and a process without it keeps the other backends.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyops._backend import Capability
from pyops.moe import schema as S

GLU = S.GLU

EXPERTS = Capability("triton", kernels="moe")


def _kernels():
    from pyops.kernels import moe as km  # imported lazily: Triton is optional
    return km


def _shared_strides(w1: Tensor, w3: Optional[Tensor]) -> tuple:
    """w1 and w3 as the kernels read them: any strides, the same for both (else contiguous copies)."""
    if w3 is None or w3.stride() == w1.stride():
        return w1, w3
    return w1.contiguous(), w3.contiguous()


@torch.library.triton_op("pyops::moe_experts_triton", mutates_args=())
def experts_op(x: Tensor, weights: Tensor, experts: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
               w1: Tensor, w2: Tensor, w3: Optional[Tensor], activation: str, b1: Optional[Tensor] = None,
               b2: Optional[Tensor] = None, b3: Optional[Tensor] = None, alpha: float = S.ALPHA,
               limit: float = S.LIMIT) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    glu = activation in GLU
    if not S.exact_experts(x, weights, w1, w2, w3, b1, b2, b3):
        return S.reference_experts_outputs(x, weights, order, offsets, dropped, w1, w2, w3, activation, True,
                                           b1, b2, b3, alpha, limit)
    y, a, b, hh, ys = S.experts_outputs(x, order, w1, glu)
    w1_, w3_ = _shared_strides(w1, w3 if glu else None)
    _kernels().experts_forward(x.contiguous(), weights, order, offsets, dropped, w1_, w2, w3_,
                               S.ACT_CODES[activation], y, a, b, hh, ys, b1, b2, b3 if glu else None, alpha, limit)
    return y, a, b, hh, ys


@torch.library.triton_op("pyops::moe_experts_triton_backward", mutates_args=())
def backward_op(dy: Tensor, x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
                w1: Tensor, w2: Tensor, w3: Optional[Tensor], a: Tensor, b: Tensor, hh: Tensor, ys: Tensor,
                activation: str, b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
                b3: Optional[Tensor] = None, alpha: float = S.ALPHA,
                limit: float = S.LIMIT) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    glu = activation in GLU
    if not S.exact_experts(dy, x, weights, w1, w2, w3, b1, b2, b3):
        return S.reference_experts_backward(dy, x, weights, order, offsets, dropped, w1, w2, w3, activation,
                                            b1, b2, b3, alpha, limit)
    w1_, w3_ = _shared_strides(w1, w3 if glu else None)
    return _kernels().experts_backward(
        dy.contiguous(), x.contiguous(), weights, order, offsets, dropped, w1_, w2, w3_, a, b, hh, ys,
        S.ACT_CODES[activation], b1, b2, b3 if glu else None, alpha, limit)


def _experts_fake(x, weights, experts, order, offsets, dropped, w1, w2, w3, activation, b1=None, b2=None, b3=None,
                  alpha=S.ALPHA, limit=S.LIMIT):
    return S.experts_outputs(x, order, w1, activation in GLU)


experts_op.register_fake(_experts_fake)
backward_op.register_fake(S.experts_backward_fake)
