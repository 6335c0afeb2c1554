"""The tensors every neighbourhood-attention kernel exchanges, shared by the C++ and Triton paths.

Every kernel works on the 3D form (`pyops.neighborhood.ops` brings 1D/2D problems into it): q/k
``[B, S0, S1, S2, H, D]``, v ``[B, S0, S1, S2, H, Dv]``, rpb ``[H, 2k₀−1, 2k₁−1, 2k₂−1]``. The
registered ops of both backends allocate their results here, and their fake kernels return the
same allocations, so a traced graph and an eager call see identical shapes, dtypes and devices:

    forward   out [B, S0, S1, S2, H, Dv] in q's dtype, lse [B, S0, S1, S2, H] fp32
    backward  dq, dk, dv like q, k, v; drpb like rpb (any float dtype), or an empty fp32 tensor
              without rpb (an op's outputs cannot be None)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


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
