"""NATTEN 0.17's two-step functional API (``natten.functional``) on pyops' window rule.

transformers' DiNAT imports ``natten2dqkrpb`` and ``natten2dav`` from ``natten.functional``: the
attention scores of every query's window (plus the relative positional bias), then the weighted sum
of the window's values. NATTEN removed both in 0.20. These are the same functions, written with
pyops' neighbourhood window rule (`pyops.neighborhood.reference.window_indices`, NATTEN's rule) as
gathers in plain PyTorch, so autograd gives the backward. They materialise the windows
(``[B, H, N, K, D]``); `pyops.integrations.transformers.patch_model` replaces the module's forward
with the fused `pyops.na2d`, which never does.

Layout, as NATTEN 0.17: query, key, value ``[B, H, *spatial, D]`` (heads first); scores
``[B, H, *spatial, K]`` with K = the product of the kernel sizes, slots in row-major window order;
rpb ``[H, 2k₀−1, ...]``. Windows are non-causal with stride 1.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyops.neighborhood.reference import window_indices

__all__ = ["natten1dqkrpb", "natten1dav", "natten2dqkrpb", "natten2dav", "natten3dqkrpb", "natten3dav",
           "NATTEN_VERSION"]

#: The NATTEN release whose functional API this module reproduces.
NATTEN_VERSION = "0.17.0"


def _windows(spatial: Sequence[int], kernels: Sequence[int], dilations: Sequence[int],
             device) -> Tuple[Tensor, Tensor]:
    """``[N, K]`` flat key index and flat rpb index of every (query, window slot)."""
    n = len(spatial)
    key = torch.zeros([1] * (2 * n), dtype=torch.long, device=device)
    bias = torch.zeros([1] * (2 * n), dtype=torch.long, device=device)
    for dim, (size, k, d) in enumerate(zip(spatial, kernels, dilations)):
        if k < 2 or d < 1 or k * d > size:
            raise ValueError(f"natten (pyops shim): kernel_size {k} with dilation {d} does not fit spatial "
                             f"dimension {dim} of extent {size}")
        idx, _, rel = window_indices(size, k, 1, d, False, device)
        shape = [1] * (2 * n)
        shape[dim], shape[n + dim] = size, k
        key = key * size + idx.view(shape)
        bias = bias * (2 * k - 1) + rel.view(shape)
    full = list(spatial) + list(kernels)
    N, K = math.prod(spatial), math.prod(kernels)
    return key.expand(full).reshape(N, K), bias.expand(full).reshape(N, K)


def _qk(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernels, dilations) -> Tensor:
    B, H, *spatial, D = query.shape
    if key.shape != query.shape:
        raise ValueError(f"natten (pyops shim): key shape {tuple(key.shape)} differs from query shape "
                         f"{tuple(query.shape)}")
    key_idx, bias_idx = _windows(spatial, kernels, dilations, query.device)
    N = key_idx.shape[0]
    keys = key.reshape(B, H, N, D)[:, :, key_idx]                        # [B, H, N, K, D]
    attn = torch.einsum("bhnd,bhnkd->bhnk", query.reshape(B, H, N, D), keys)
    if rpb is not None:
        attn = attn + rpb.reshape(H, -1)[:, bias_idx].to(attn.dtype)     # [H, N, K]
    return attn.reshape(B, H, *spatial, key_idx.shape[1])


def _av(attn: Tensor, value: Tensor, kernels, dilations) -> Tensor:
    B, H, *spatial, D = value.shape
    key_idx, _ = _windows(spatial, kernels, dilations, value.device)
    N, K = key_idx.shape
    if tuple(attn.shape) != (B, H, *spatial, K):
        raise ValueError(f"natten (pyops shim): attention shape {tuple(attn.shape)} does not match value "
                         f"{tuple(value.shape)} with {K} window slots")
    values = value.reshape(B, H, N, D)[:, :, key_idx]                    # [B, H, N, K, D]
    out = torch.einsum("bhnk,bhnkd->bhnd", attn.reshape(B, H, N, K).to(value.dtype), values)
    return out.reshape(B, H, *spatial, D)


def natten1dqkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size: int, dilation: int) -> Tensor:
    return _qk(query, key, rpb, (kernel_size,), (dilation,))


def natten1dav(attn: Tensor, value: Tensor, kernel_size: int, dilation: int) -> Tensor:
    return _av(attn, value, (kernel_size,), (dilation,))


def natten2dqkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size: int, dilation: int) -> Tensor:
    return _qk(query, key, rpb, (kernel_size,) * 2, (dilation,) * 2)


def natten2dav(attn: Tensor, value: Tensor, kernel_size: int, dilation: int) -> Tensor:
    return _av(attn, value, (kernel_size,) * 2, (dilation,) * 2)


def natten3dqkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size_d: int, kernel_size: int,
                  dilation_d: int, dilation: int) -> Tensor:
    return _qk(query, key, rpb, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation))


def natten3dav(attn: Tensor, value: Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
               dilation: int) -> Tensor:
    return _av(attn, value, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation))
