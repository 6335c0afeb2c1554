"""The tensors every task-attention kernel returns, shared by the C++ and Triton paths.

Both backends' registered ops return these shapes, dtypes and devices, and both register the fake
kernels below, so a traced graph and an eager call agree:

    forward   out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] fp32
    backward  dq, dk, dv shaped like q, k, v (contiguous)
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def forward_fake(q, k, v, q_groups, kv_groups, allow, causal, dropout_p, scale, seed) -> Tuple[Tensor, Tensor]:
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq, v.shape[3])), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def backward_fake(dout, q, k, v, out, lse, q_groups, kv_groups, allow, causal, dropout_p, scale,
                  seed) -> Tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
