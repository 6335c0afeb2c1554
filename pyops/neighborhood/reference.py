"""Neighbourhood attention (NATTEN semantics), the definition: gather-based, readable, fp32 accumulation.

Layout (heads last, as NATTEN): q, k ``[B, *spatial, H, D]``, v ``[B, *spatial, H, Dv]``,
``n = len(spatial)`` in 1, 2, 3.

Semantics of NATTEN (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023; dilation as
in DiNAT, Hassani & Shi 2022), written out in docs/neighborhood.md. Window rule, per spatial
dimension of extent S, independently; a key counts only if it passes in every dimension:

* dilation d splits positions into d groups by ``x mod d``; a query sees only keys of its own
  group, and the rules below run on in-group indices ``i = x // d`` with the group's length
  ``L = ceil((S - g) / d)`` (g = x mod d);
* ``left = k // 2``; non-causal: ``leader = min((i // s)·s + s // 2, L − 1)`` (stride s),
  ``start = clamp(leader − left, 0, L − k)``, window ``[start, start + k)`` (always k keys: the
  window shifts to stay inside the input);
* causal: ``leader = min((i // s)·s + s − 1, L − 1)``, window ``[max(leader − k + 1, 0), i]``
  (fewer than k keys near the start; slots past i are masked).

With the window W(x) (the product of the per-dimension windows):

    out[x]  = Σ_{y ∈ W(x)} softmax_y( scale · q[x]·k[y] + rpb[h, (j − i) + k − 1] ) · v[y]
    lse[x]  = log Σ_{y ∈ W(x)} exp( scale · q[x]·k[y] + bias )

``scale`` defaults to ``D ** -0.5``; the relative positional bias ``rpb`` (odd kernels, non-causal,
NATTEN ≤ 0.17) is indexed per dimension with in-group coordinates (j, i), shape
``[H, 2k₀−1, …]``. Every query sees at least itself, so no row is empty.

A key outside W(x) takes no part in row x, whatever its values (docs/design.md#non-finite-values).
Inside the window NaN and ±inf propagate as IEEE arithmetic of the formulas does; a −inf logit
weighs 0, and a row whose logits are all −inf outputs 0 with lse = −inf.

The computation: per dimension, `window_indices` gives the k key positions of every query (and
which slots are inside a causal window); their product gathers ``[B, N, K, H, D]`` keys and values
(N queries, K = Πk window slots); logits, masked softmax and the weighted sum follow in fp32
(fp64 for fp64 inputs, for gradcheck).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyops._finite import all_finite
from pyops._philox import philox4x32_10, uniform_from_word

__all__ = ["window_rule", "window_indices", "rel_indices", "neighborhood_attention", "na1d", "na2d", "na3d"]


def window_rule(L: int, k: int, s: int, causal: bool, i: int) -> Tuple[int, int]:
    """In-group window of in-group query index i in a group of length L: (first, last) inclusive."""
    if causal:
        leader = min((i // s) * s + s - 1, L - 1)
        return max(leader - k + 1, 0), i
    leader = min((i // s) * s + s // 2, L - 1)
    start = min(max(leader - k // 2, 0), L - k)
    return start, start + k - 1


def window_indices(L: int, k: int, s: int = 1, d: int = 1, causal: bool = False,
                   device=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Key positions of every query along one dimension of extent L.

    Returns ``(idx, valid, rel)``, each ``[L, k]``: ``idx[x, t]`` the global position of the t-th
    window slot of query x (clamped to a real position when the slot is masked), ``valid[x, t]``
    whether the slot is in the window (False only for causal windows shorter than k), and
    ``rel[x, t] = (j − i) + k − 1`` the relative-bias index in in-group coordinates.
    """
    x = torch.arange(L, device=device)
    g, i = x % d, x // d
    Lg = (L - g + d - 1) // d                       # length of x's dilation group
    if causal:
        leader = torch.minimum((i // s) * s + s - 1, Lg - 1)
        first = (leader - k + 1).clamp(min=0)
        last = i
    else:
        leader = torch.minimum((i // s) * s + s // 2, Lg - 1)
        first = torch.minimum((leader - k // 2).clamp(min=0), Lg - k)
        last = first + k - 1
    j = first[:, None] + torch.arange(k, device=device)[None, :]   # in-group key index of each slot
    valid = j <= last[:, None]
    j = torch.where(valid, j, last[:, None])
    return j * d + g[:, None], valid, (j - i[:, None]) + k - 1


def rel_indices(L: int, k: int, s: int = 1, d: int = 1, causal: bool = False, device=None) -> Tensor:
    """``[L, k]`` relative-bias index (j − i) + k − 1 of every window slot (in-group coordinates)."""
    return window_indices(L, k, s, d, causal, device)[2]


def _flat_windows(spatial: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                  dilation: Sequence[int], causal: Sequence[bool], rpb_extents: Optional[Sequence[int]],
                  device) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Combine the per-dimension windows into ``[N, K]`` flat key indices, validity and rpb indices."""
    n = len(spatial)
    key = torch.zeros([1] * (2 * n), dtype=torch.long, device=device)
    ok = torch.ones([1] * (2 * n), dtype=torch.bool, device=device)
    bias = torch.zeros([1] * (2 * n), dtype=torch.long, device=device) if rpb_extents is not None else None
    for dim in range(n):
        idx, valid, rel = window_indices(spatial[dim], kernel[dim], stride[dim], dilation[dim], causal[dim], device)
        shape = [1] * (2 * n)
        shape[dim], shape[n + dim] = spatial[dim], kernel[dim]
        key = key * spatial[dim] + idx.view(shape)
        ok = ok & valid.view(shape)
        if bias is not None:
            bias = bias * rpb_extents[dim] + rel.view(shape)
    full = list(spatial) + list(kernel)
    N, K = math.prod(spatial), math.prod(kernel)
    key = key.expand(full).reshape(N, K)
    ok = ok.expand(full).reshape(N, K)
    if bias is not None:
        bias = bias.expand(full).reshape(N, K)
    return key, ok, bias


def dropout_keep(shape: Sequence[int], p: float, seed: int, device) -> Tensor:
    """Philox keep mask (docs/design.md#determinism) of the attention probabilities ``[B, N, H, K]``: element
    index j (row-major) is kept iff uniform(philox(c0 = j low, c1 = j high, c2 = 0,
    c3 = 0x4E41 "NA"; key = seed)[word 0]) >= p."""
    j = torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    word = philox4x32_10(j & 0xFFFFFFFF, j >> 32, torch.zeros_like(j), torch.full_like(j, 0x4E41),
                         seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)[0]
    return (uniform_from_word(word) >= p).view(*shape)


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, kernel_size: Sequence[int],
                           stride: Sequence[int], dilation: Sequence[int], is_causal: Sequence[bool],
                           rpb: Optional[Tensor] = None, scale: Optional[float] = None,
                           return_lse: bool = False, dropout_p: float = 0.0, seed: int = 0):
    """Neighbourhood attention over ``n = len(kernel_size)`` spatial dimensions (per-dim tuples).

    q/k ``[B, *spatial, H, D]``, v ``[B, *spatial, H, Dv]``; returns out ``[B, *spatial, H, Dv]``
    in q's dtype (and lse ``[B, *spatial, H]`` fp32 — fp64 for fp64 inputs — with `return_lse`).
    ``dropout_p`` drops attention probabilities (NATTEN 0.17's ``attn_drop``, applied after the
    softmax) with the Philox mask of `dropout_keep`, kept ones scaled by 1 / (1 − p); lse is that of
    the un-dropped softmax.
    """
    n = len(kernel_size)
    B, spatial, H, D = q.shape[0], tuple(q.shape[1:1 + n]), q.shape[-2], q.shape[-1]
    Dv = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if scale is None else scale
    rpb_ext = [2 * kk - 1 for kk in kernel_size] if rpb is not None else None
    key, ok, bias = _flat_windows(spatial, kernel_size, stride, dilation, is_causal, rpb_ext, q.device)
    N, K = key.shape
    qf = q.reshape(B, N, H, D).to(acc)
    kf = k.reshape(B, N, H, D).to(acc)[:, key]                 # [B, N, K, H, D]
    vf = v.reshape(B, N, H, Dv).to(acc)[:, key]                # [B, N, K, H, Dv]
    if not all_finite(q, k, v):
        # A window slot outside the neighbourhood takes no part, whatever its key's values: zeroed
        # before the products, so 0·NaN cannot reach the row forward or backward
        # (docs/design.md#non-finite-values).
        slot = ok.view(1, N, K, 1, 1)
        kf = torch.where(slot, kf, torch.zeros((), dtype=acc, device=q.device))
        vf = torch.where(slot, vf, torch.zeros((), dtype=acc, device=q.device))
    logits = torch.einsum("bnhd,bnkhd->bnhk", qf, kf) * scale  # [B, N, H, K]
    if rpb is not None:
        table = rpb.to(acc).reshape(H, -1)                     # [H, Π(2k−1)]
        logits = logits + table[:, bias].permute(1, 0, 2).unsqueeze(0)  # [1, N, H, K]
    logits = logits.masked_fill(~ok.view(1, N, 1, K), float("-inf"))
    # A score of −inf takes no part, like a slot outside the window; a row left with none outputs
    # 0 with lse = −inf. NaN and +inf propagate (NaN, and lse = +inf with NaN outputs).
    row_max = logits.detach().amax(dim=-1, keepdim=True) if K else logits.new_zeros((B, N, H, 1))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(logits - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (row_max + torch.log(denom)).squeeze(-1)             # [B, N, H]
    if dropout_p > 0:
        p = p * dropout_keep(p.shape, dropout_p, seed, p.device) / (1.0 - dropout_p)
    out = torch.einsum("bnhk,bnkhd->bnhd", p, vf)
    out = out.to(q.dtype).reshape(B, *spatial, H, Dv)
    if return_lse:
        return out, lse.reshape(B, *spatial, H)
    return out


def _tup(x, n):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


def _nd(n):
    def fn(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None, return_lse=False):
        return neighborhood_attention(q, k, v, _tup(kernel_size, n), _tup(stride, n), _tup(dilation, n),
                                      tuple(bool(c) for c in _tup(is_causal, n)), rpb, scale, return_lse)
    fn.__name__ = f"na{n}d"
    fn.__doc__ = f"{n}D neighbourhood attention (reference); ints or per-dimension tuples."
    return fn


na1d, na2d, na3d = _nd(1), _nd(2), _nd(3)


def neighborhood_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, kernel_size: Sequence[int],
                                    stride: Sequence[int], dilation: Sequence[int], is_causal: Sequence[bool],
                                    rpb: Optional[Tensor] = None, scale: Optional[float] = None
                                    ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(dq, dk, dv, drpb) of `neighborhood_attention` for the upstream gradient `dout` (out's
    shape): the vector-Jacobian product of the definition, each in its input's dtype (drpb None without
    rpb). The fused backends hand a call whose inputs are not finite to this and to
    `neighborhood_attention` (pyops._finite)."""
    def forward(q_, k_, v_, *r_):
        return neighborhood_attention(q_, k_, v_, kernel_size, stride, dilation, is_causal, r_[0] if r_ else None,
                                      scale)

    # torch.func.vjp rather than autograd.grad: it differentiates inside a custom op's kernel too,
    # where the dispatcher has excluded the autograd keys.
    primals = [t.detach() for t in (q, k, v)] + ([] if rpb is None else [rpb.detach()])
    _, vjp = torch.func.vjp(forward, *primals)
    grads = vjp(dout.to(q.dtype))
    return grads[0], grads[1], grads[2], (grads[3] if rpb is not None else None)
