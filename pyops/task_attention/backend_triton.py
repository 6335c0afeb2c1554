"""The Triton path of `pyops.task_masked_attention` (kernels/task_attention.py), kept apart from validation.

`pyops.task_attention.ops` validates, chooses the backend and ties each forward op to its
backward for autograd; this module declares what the Triton kernels take (`TRITON`, plus the
head-dim bound of their tiles), registers the two ops with their fake kernels and launches the
kernels through `pyops.kernels.task_attention`:

    pyops::task_masked_attention_triton            forward: (out [B, Hq, Lq, Dv], lse [B, Hq, Lq] fp32)
    pyops::task_masked_attention_triton_backward   its backward: (dq, dk, dv)

Both are `triton_op`s, so they trace under `torch.compile(fullgraph=True)`. Triton itself is
imported on the first launch only: defining the ops needs no Triton. Any number of groups: ids
outside [0, G) are treated as padding by the kernels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from pyops._backend import Capability
from pyops.task_attention import layout

TRITON = Capability("triton", kernels="task_attention")
# The kernels hold whole heads in one tile (D and Dv padded to a power of two >= 16: a [BM, D] query
# tile and a [BM, Dv] accumulator live through the whole key loop, never split over the head dim),
# so the head dims they take are bounded.
MAX_HEAD_DIM = 256


def reason(q: Tensor, v: Tensor) -> Optional[str]:
    """None if the Triton kernels can take `q` and `v` (k shares q's dtype, device and head dim),
    else why not."""
    r = TRITON.reason(q.device, q)
    if r is None and max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        r = f"head dims up to {MAX_HEAD_DIM} (got D={q.shape[3]}, Dv={v.shape[3]})"
    return r


def _kernels():
    from pyops.kernels import task_attention as kern  # imported lazily: Triton is optional
    return kern


@torch.library.triton_op("pyops::task_masked_attention_triton", mutates_args=())
def forward_op(q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor, kv_groups: Tensor, allow: Optional[Tensor],
               causal: bool, dropout_p: float, scale: float, seed: Tensor) -> Tuple[Tensor, Tensor]:
    B, Hq, Lq, _ = q.shape
    out = torch.empty((B, Hq, Lq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if not layout.exact_forward(q, k, v, scale, dropout_p):
        return layout.reference_forward(q, k, v, q_groups, kv_groups, allow, causal, dropout_p, scale, seed)
    _kernels().forward(q.contiguous(), k.contiguous(), v.contiguous(), out, lse, q_groups.contiguous(),
                       kv_groups.contiguous(), allow, causal, scale, dropout_p, seed)
    return out, lse


@torch.library.triton_op("pyops::task_masked_attention_triton_backward", mutates_args=())
def backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_groups: Tensor,
                kv_groups: Tensor, allow: Optional[Tensor], causal: bool, dropout_p: float, scale: float,
                seed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if not layout.exact_backward(dout, q, k, v, scale, dropout_p):
        return layout.reference_backward(dout, q, k, v, q_groups, kv_groups, allow, causal, dropout_p, scale, seed)
    _kernels().backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
                        lse.contiguous(), dq, dk, dv, q_groups.contiguous(), kv_groups.contiguous(), allow,
                        causal, scale, dropout_p, seed)
    return dq, dk, dv


forward_op.register_fake(layout.forward_fake)
backward_op.register_fake(layout.backward_fake)
