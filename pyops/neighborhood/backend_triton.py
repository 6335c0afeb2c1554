"""The Triton path of `pyops.na1d/na2d/na3d` (kernels/neighborhood.py), kept apart from validation.

`pyops.neighborhood.ops` validates, brings the problem into the 3D form, chooses the backend and
ties the forward op to its backward for autograd; this module declares what the Triton kernels
take (`TRITON`, plus the head-dim bound of their tiles), registers the two ops with their fake
kernels and launches the kernels through `pyops.kernels.neighborhood`:

    pyops::na_triton            forward: (out [B, S0, S1, S2, H, Dv], lse [B, S0, S1, S2, H] fp32)
    pyops::na_triton_backward   its backward: (dq, dk, dv, drpb)

Both are `triton_op`s, so they trace under `torch.compile(fullgraph=True)`. Triton itself is
imported on the first launch only: defining the ops needs no Triton. On CUDA tensors, or on CPU
tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from pyops._backend import Capability
from pyops.neighborhood import layout

TRITON = Capability("triton", kernels="neighborhood")
# A program holds a whole head in one tile (D and Dv padded to a power of two >= 16: a [BQ, D]
# query tile and a [BQ, Dv] accumulator live through the whole key loop, never split over the head
# dim), so the head dims the kernels take are bounded.
MAX_HEAD_DIM = 256


def reason(q: Tensor, v: Tensor) -> Optional[str]:
    """None if the Triton kernels can take `q` and `v` (k shares q's dtype, device and head dim),
    else why not."""
    r = TRITON.reason(q.device, q)
    if r is None and max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        r = f"head dimension {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM} is not supported by the Triton kernels"
    return r


def _kernels():
    from pyops.kernels import neighborhood as kn  # imported lazily: Triton is optional
    return kn


@torch.library.triton_op("pyops::na_triton", mutates_args=())
def forward_op(q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor], kernel_size: List[int], stride: List[int],
               dilation: List[int], is_causal: List[bool], scale: float) -> Tuple[Tensor, Tensor]:
    out, lse = layout.new_outputs(q, v)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.zero_()
    if not layout.exact_forward(q, k, v, rpb, kernel_size, scale):
        return layout.reference_forward(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale)
    _kernels().na_forward(q.contiguous(), k.contiguous(), v.contiguous(), layout.rpb32(rpb), out, lse,
                          kernel_size, stride, dilation, is_causal, scale)
    return out, lse


@torch.library.triton_op("pyops::na_triton_backward", mutates_args=())
def backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                rpb: Optional[Tensor], kernel_size: List[int], stride: List[int], dilation: List[int],
                is_causal: List[bool], scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, drpb = layout.new_grads(q, k, v, rpb)
    if q.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), drpb.zero_()
    if not layout.exact_backward(dout, q, k, v, rpb, kernel_size, scale):
        return layout.reference_backward(dout, q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale)
    d32 = _kernels().na_backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                                 out.contiguous(), lse.contiguous(), layout.rpb32(rpb), dq, dk, dv,
                                 kernel_size, stride, dilation, is_causal, scale)
    if d32 is not None:
        drpb.copy_(d32)
    return dq, dk, dv, drpb


@forward_op.register_fake
def _forward_fake(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale):
    return layout.new_outputs(q, v)


@backward_op.register_fake
def _backward_fake(dout, q, k, v, out, lse, rpb, kernel_size, stride, dilation, is_causal, scale):
    return layout.new_grads(q, k, v, rpb)
