"""The C++ CPU path of `pyops.na1d/na2d/na3d` (csrc/neighborhood/), kept apart from validation.

`pyops.neighborhood.ops` validates, brings the problem into the 3D form, chooses the backend and
ties the forward op to its backward for autograd; this module declares what the C++ kernels take
(`CPU`), registers the two ops with their fake kernels and makes the calls into `pyops._C`:

    pyops::na_native            `pyops._C.na_forward`  -> (out [B, S0, S1, S2, H, Dv], lse [B, S0, S1, S2, H] fp32)
    pyops::na_native_backward   `pyops._C.na_backward` -> (dq, dk, dv, drpb)

The kernels take contiguous CPU tensors of one dtype (fp32, fp16 or bf16) and the bias in fp32;
they accumulate in fp32, write drpb in fp32 (copied here into rpb's dtype) and split the work over
`torch.get_num_threads()` threads with results independent of the thread count. They declare no
size limit: every extent, kernel, stride and dilation that `ops.prepare` accepts fits them.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from pyops import _native
from pyops._backend import Capability
from pyops.neighborhood import layout

CPU = Capability("cpu", functions=("na_forward", "na_backward"))


def reason(q: Tensor) -> Optional[str]:
    """None if the C++ kernels can take `q` (k and v share its dtype and device; rpb is read as
    fp32 whatever its dtype), else why not."""
    return CPU.reason(q.device, q)


def _sizes(q: Tensor, v: Tensor, kernel_size: List[int], stride: List[int], dilation: List[int],
           is_causal: List[bool], has_rpb: bool, scale: float) -> tuple:
    """The scalar arguments both kernels take after their pointers, in the bindings' order:
    B, S0, S1, S2, H, D, Dv, k0..k2, s0..s2, d0..d2, c0..c2, has_rpb, scale, dtype code, threads."""
    B, S0, S1, S2, H, D = q.shape
    return (B, S0, S1, S2, H, D, v.shape[-1], *kernel_size, *stride, *dilation, *[int(c) for c in is_causal],
            bool(has_rpb), float(scale), _native.dtype_code(q.dtype), torch.get_num_threads())


@torch.library.custom_op("pyops::na_native", mutates_args=(), device_types=("cpu",))
def forward_op(q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor], kernel_size: List[int], stride: List[int],
               dilation: List[int], is_causal: List[bool], scale: float) -> Tuple[Tensor, Tensor]:
    out, lse = layout.new_outputs(q, v)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.zero_()
    if not layout.exact_forward(q, k, v, rpb, kernel_size, scale):
        return layout.reference_forward(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    r = layout.rpb32(rpb)
    _native.cpu_module.na_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                  0 if r is None else r.data_ptr(),
                                  *_sizes(q, v, kernel_size, stride, dilation, is_causal, r is not None, scale))
    return out, lse


@torch.library.custom_op("pyops::na_native_backward", mutates_args=(), device_types=("cpu",))
def backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                rpb: Optional[Tensor], kernel_size: List[int], stride: List[int], dilation: List[int],
                is_causal: List[bool], scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, drpb = layout.new_grads(q, k, v, rpb)
    if q.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), drpb.zero_()
    if not layout.exact_backward(dout, q, k, v, rpb, kernel_size, scale):
        return layout.reference_backward(dout, q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale)
    if q.dtype != torch.float32:
        # The backward's D = dO·O needs O before its rounding to fp16/bf16 (with the rounded O,
        # dS = P(dP - D) loses the definition's value where dP and D cancel). The kernels compute
        # in fp32 whatever the storage dtype, so the call runs in fp32: O recomputed by an fp32
        # forward, the gradients rounded once at the end.
        q32, k32, v32 = (t.to(torch.float32) for t in (q, k, v))
        out32, lse32 = forward_op(q32, k32, v32, rpb, kernel_size, stride, dilation, is_causal, scale)
        g32 = backward_op(dout.to(torch.float32), q32, k32, v32, out32, lse32, rpb, kernel_size, stride,
                          dilation, is_causal, scale)
        return g32[0].to(q.dtype), g32[1].to(k.dtype), g32[2].to(v.dtype), g32[3]
    q, k, v, out, dout = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), dout.contiguous()
    r = layout.rpb32(rpb)
    d32 = None if r is None else torch.empty(r.shape, dtype=torch.float32, device=q.device)
    _native.cpu_module.na_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dout.data_ptr(),
                                   lse.contiguous().data_ptr(), 0 if r is None else r.data_ptr(),
                                   dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), 0 if d32 is None else d32.data_ptr(),
                                   *_sizes(q, v, kernel_size, stride, dilation, is_causal, r is not None, scale))
    if d32 is not None:
        drpb.copy_(d32)
    return dq, dk, dv, drpb


@forward_op.register_fake
def _forward_fake(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale):
    return layout.new_outputs(q, v)


@backward_op.register_fake
def _backward_fake(dout, q, k, v, out, lse, rpb, kernel_size, stride, dilation, is_causal, scale):
    return layout.new_grads(q, k, v, rpb)
