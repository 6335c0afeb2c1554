"""Per-block ascending ranks of |τ| on any device, for the GPU paths of breadcrumbs and DELLA
(the Triton kernels in `pyops.kernels.merging.methods` and the CUDA kernels in csrc/merging/ take
them as an input).

The rank of an element is its position in its block sorted by |τ| ascending, ties broken by
position: the reference's `ascending_rank` (pyops/merging/reference.py), here by a stable device
sort of every block, the last block padded with NaN (which sorts last and is cut off).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def block_ranks(base: Tensor, deltas: Sequence[Tensor], block_size: int, from_models: bool) -> Tensor:
    """[N, numel] int32 ranks of each |τᵢ| within its block (τᵢ = deltas[i], or deltas[i] − base
    in fp32 when `from_models`); blocks of `block_size` elements (the whole tensor if larger)."""
    numel = base.numel()
    bs = min(block_size, numel)
    n_blocks = -(-numel // bs)
    pad = n_blocks * bs - numel
    ranks = torch.empty((len(deltas), numel), dtype=torch.int32, device=base.device)
    pos = torch.arange(bs, dtype=torch.int32, device=base.device).expand(n_blocks, bs)
    for i, d in enumerate(deltas):
        tau = d.reshape(-1).float() - base.reshape(-1).float() if from_models else d.reshape(-1).float()
        mag = torch.nn.functional.pad(tau.abs(), (0, pad), value=float("nan")).view(n_blocks, bs)
        order = torch.sort(mag, dim=1, stable=True).indices
        r = torch.empty((n_blocks, bs), dtype=torch.int32, device=base.device)
        r.scatter_(1, order, pos)
        ranks[i] = r.view(-1)[:numel]
    return ranks
