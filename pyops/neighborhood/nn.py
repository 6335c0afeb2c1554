"""Neighbourhood attention modules: `NeighborhoodAttention1D/2D/3D`, drop-in for NATTEN 0.17 / DiNAT.

The parameters and their `state_dict` keys are those of NATTEN 0.17's modules (which DiNAT, NAT and
OneFormer checkpoints were saved from): ``qkv.weight [3C, C]``, ``qkv.bias [3C]`` (with
`qkv_bias`), ``proj.weight [C, C]``, ``proj.bias [C]`` and, with `rel_pos_bias`, ``rpb
[H, 2k₀−1, …]`` — so such checkpoints load with `load_state_dict` unchanged.

Input and output ``[B, *spatial, C]`` (channels last, as NATTEN). The attention itself is
`pyops.na1d/na2d/na3d`: fused forward and backward on CPU (C++) and GPU (Triton).

Differences from NATTEN 0.17: no automatic zero padding of inputs smaller than
kernel_size·dilation (an error says so instead). Attention dropout (`attn_drop > 0`, on the
probabilities after the softmax, as NATTEN 0.17) has no fused kernel: in training mode it runs the
gather-based reference with a Philox mask (slow; DiNAT/NAT configs use attn_drop = 0); evaluation
uses the fused kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

import pyops
from pyops.neighborhood import reference as ref

IntOrTuple = Union[int, Sequence[int]]


def _tup(x, n, name):
    if isinstance(x, (tuple, list)):
        if len(x) != n:
            raise ValueError(f"{name}: expected an int or {n} values, got {tuple(x)!r}")
        return tuple(x)
    return (x,) * n


class _NeighborhoodAttention(nn.Module):
    n: int = 0

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
                 stride: IntOrTuple = 1, is_causal: Union[bool, Sequence[bool]] = False, rel_pos_bias: bool = False,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim: must be divisible by num_heads, got {embed_dim} and {num_heads}")
        n = self.n
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.kernel_size = _tup(kernel_size, n, "kernel_size")
        self.dilation = _tup(dilation, n, "dilation")
        self.stride = _tup(stride, n, "stride")
        self.is_causal = _tup(is_causal, n, "is_causal")
        self.backend = backend
        if rel_pos_bias:
            if any(self.is_causal):
                raise ValueError("rel_pos_bias: relative positional bias is not supported with causal masking")
            if any(k % 2 == 0 for k in self.kernel_size):
                raise ValueError(f"rel_pos_bias: needs odd kernel sizes, got kernel_size={self.kernel_size}")
            self.rpb = nn.Parameter(torch.zeros(num_heads, *[2 * k - 1 for k in self.kernel_size]))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.attn_drop_rate = attn_drop
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, stride={self.stride}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}")

    def forward(self, x: Tensor) -> Tensor:
        n = self.n
        if x.dim() != n + 2:
            raise ValueError(f"x: expected a {n + 2}-d tensor [B, {', '.join(f'S{i}' for i in range(n))}, C], "
                             f"got shape {list(x.shape)}")
        B, spatial, C = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
        qkv = self.qkv(x).reshape(B, *spatial, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=-3)
        if self.training and self.attn_drop_rate > 0:
            # The fused kernels have no attention dropout: training with it runs the gather-based
            # reference (slow), with a Philox mask keyed by a seed from torch's generator.
            seed = int(torch.randint(0, 2**62, (), device="cpu"))
            out = ref.neighborhood_attention(q, k, v, self.kernel_size, self.stride, self.dilation,
                                             tuple(bool(c) for c in self.is_causal), self.rpb, self.scale,
                                             dropout_p=self.attn_drop_rate, seed=seed)
        else:
            fn = (pyops.na1d, pyops.na2d, pyops.na3d)[n - 1]
            out = fn(q, k, v, self.kernel_size, stride=self.stride, dilation=self.dilation,
                     is_causal=self.is_causal, rpb=self.rpb, scale=self.scale, backend=self.backend)
        return self.proj_drop(self.proj(out.reshape(B, *spatial, C)))


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1D neighbourhood attention layer, input ``[B, L, C]``; NATTEN 0.17 parameter names."""
    n = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2D neighbourhood attention layer, input ``[B, H, W, C]``; NATTEN 0.17 / DiNAT parameter names."""
    n = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3D neighbourhood attention layer, input ``[B, T, H, W, C]``; NATTEN 0.17 parameter names."""
    n = 3
