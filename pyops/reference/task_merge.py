"""Block-wise task arithmetic, the definition.

Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023) adds scaled
task vectors τᵢ = θᵢ − θ_base to a base model. aTLAS (Zhang et al., "Knowledge Composition using
Task Vectors with Learned Anisotropic Scaling", NeurIPS 2024) and AdaMerging (Yang et al., ICLR
2024) learn one coefficient per task and *block* of parameters. With the flattened tensor cut
into blocks of `block_size` elements (the last may be shorter), element j in block b = j // block_size:

    out[j] = base[j] + Σᵢ coeffs[i, b] · τᵢ[j]

where τᵢ = deltas[i], or τᵢ = finetuned[i] − base when `from_models` is set.
Gradients (what every backend must reproduce):
    ∂/∂base[j]      = g[j]                         (from_models: g[j] · (1 − Σᵢ coeffs[i, b]))
    ∂/∂deltas[i][j] = coeffs[i, b] · g[j]
    ∂/∂coeffs[i, b] = Σ_{j in block b} g[j] · τᵢ[j]
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs; fp64 stays fp64 (used by gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def task_arithmetic(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    *,
    block_size: int,
    from_models: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """base `[*shape]`, deltas N tensors `[*shape]`, coeffs `[N]` or `[N, n_blocks]`.

    Returns `[*shape]` in `out_dtype` (default: base's dtype). Differentiable in every input.
    """
    acc = accumulation_dtype(base.dtype)
    flat_base = base.reshape(-1).to(acc)
    c = coeffs.to(acc)
    if c.dim() == 1:
        c = c[:, None]  # one coefficient per task, shared by every block
    block_of = torch.arange(flat_base.numel(), device=base.device) // block_size
    per_element = c[:, block_of] if c.shape[1] > 1 else c  # [N, numel] or [N, 1]
    merged = flat_base
    for i, delta in enumerate(deltas):
        tau = delta.reshape(-1).to(acc)
        if from_models:
            tau = tau - flat_base
        merged = merged + per_element[i] * tau
    return merged.reshape(base.shape).to(out_dtype or base.dtype)
