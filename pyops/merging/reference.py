"""Block-wise task-vector merging, the definitions.

## Task arithmetic

Block-wise task arithmetic, the definition.

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

## Merge methods

τᵢ = deltas[i] (or finetuned[i] − base). The flattened tensor is cut into blocks as in
`pyops.merging.reference` (whole tensor, rows, or fixed-size chunks); selection and ranking
run per block, with n the block's length. wᵢ = coeffs[i, block], ρᵢ = density[i], λ = lam.

* ``task_arithmetic`` (Ilharco et al., ICLR 2023):  θ = base + λ·Σᵢ wᵢ·τᵢ
* ``ties`` (Yadav et al., "TIES-Merging", NeurIPS 2023): trim τᵢ' = τᵢ·[|τᵢ| ≥ tᵢ] with tᵢ the
  k-th largest |τᵢ| of the block, k = max(1, ⌊ρᵢ·n⌋) (exact selection; entries tied with the k-th
  are kept); elect s = sign(Σᵢ wᵢ·τᵢ') (0 counts as +); disjoint weighted mean
  merged = Σᵢ Mᵢ·wᵢ·τᵢ' / Σᵢ Mᵢ·wᵢ with Mᵢ = [sign τᵢ' = s]·[τᵢ' ≠ 0] (a zero divisor counts as
  1; ``normalize=False`` keeps the plain sum); θ = base + λ·merged.
* ``dare`` = ``dare_linear`` (Yu et al., "Language Models are Super Mario", ICML 2024): keep each
  element with probability ρᵢ, θ = base + λ·Σᵢ wᵢ·mᵢ·τᵢ/ρᵢ. The rescale is the paper's 1/ρ;
  mergekit 0.1.5 rescales by an L1-norm ratio instead.
* ``dare_ties``: the DARE-rescaled τᵢ' = mᵢ·τᵢ/ρᵢ, then TIES' election and disjoint mean.
* ``breadcrumbs`` (Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024): per block, rank |τᵢ|
  ascending (ties broken by position), drop the top ⌊γ·n⌋ and the bottom n − ⌊ρᵢ·n⌋ − ⌊γ·n⌋,
  θ = base + λ·Σᵢ wᵢ·keepᵢ·τᵢ (no rescale, as mergekit). ρᵢ = 1 keeps every entry (mergekit's
  `density >= 1`); otherwise ρᵢ + γ ≤ 1.
* ``della`` (Deep et al., "DELLA-Merging", 2024; mergekit's ``rank_magnitude_sampling``): keep
  probability pⱼ = ρᵢ − ε + 2ε·rⱼ/(n − 1) from the ascending magnitude rank rⱼ in the block
  (pⱼ = ρᵢ when n = 1), τᵢ' = keep·τᵢ/pⱼ, then TIES' election and disjoint mean;
  ``della_linear`` stops before the election: θ = base + λ·Σᵢ wᵢ·τᵢ'. ρᵢ = 1 keeps every entry
  unscaled (mergekit's `density >= 1`); otherwise 0 < ρᵢ − ε and ρᵢ + ε ≤ 1.
* ``model_stock`` (Jang et al., "Model Stock", ECCV 2024; mergekit's definition, per tensor,
  needs N ≥ 2): cos = mean over pairs i<j of ⟨τᵢ,τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6), clamped to [−1, 1];
  t = N·cos / (1 + (N − 1)·cos); θ = base + t·mean(τᵢ) (formed as base + Σᵢ (t/N)·τᵢ). Coefficients and λ do not apply.
* ``consensus`` (Wang et al., "Localizing Task Information for Improved Model Merging and
  Compression", ICML 2024 — TALL masks): τ_MTL = Σᵢ wᵢ·τᵢ; mᵢ = [|τᵢ| ≥ tall_lambda·|τ_MTL − τᵢ|];
  keep = [Σᵢ mᵢ ≥ k]; θ = base + λ·keep·τ_MTL.

Randomness (DARE, DELLA) is Philox4x32-10 keyed by the seed, with counter
(⌊j/4⌋ low word, ⌊j/4⌋ high word, task i, FNV-1a hash of `name`) and word j mod 4 for element j
of the flattened tensor; uᵢⱼ = (word >> 8)·2⁻²⁴, kept iff uᵢⱼ < p. The same bits on every
backend, thread count and shard layout (docs/design.md#determinism).

Gradients flow to the coefficients (and base / deltas); every mask — trimming, drops, the
elected sign — is computed without gradient and held fixed in the backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from pyops._philox import philox4x32_10, uniform_from_word
# The method names and the random key, shared with the kernels' callers (a torch-free module).
from pyops.merging.spec import ELECTING, METHODS, RANDOM, RANKED, name_hash, resolve_normalize  # noqa: F401


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


def keep_uniforms(numel: int, task: int, seed: int, name: str, device) -> torch.Tensor:
    """uᵢⱼ ∈ [0, 1) for every element j of task `task` (fp32, `[numel]`)."""
    j = torch.arange(numel, dtype=torch.int64, device=device)
    group = j >> 2
    words = philox4x32_10(group & 0xFFFFFFFF, group >> 32, torch.full_like(j, task),
                          torch.full_like(j, name_hash(name)), seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    word = torch.stack(words, dim=-1).gather(-1, (j & 3)[:, None])[:, 0]
    return uniform_from_word(word)


def _blocked(x: torch.Tensor, block_size: int, fill: float) -> torch.Tensor:
    """[numel] -> [n_blocks, block_size], the last block padded with `fill`."""
    n_blocks = max(1, -(-x.numel() // block_size))
    pad = n_blocks * block_size - x.numel()
    return torch.cat([x, x.new_full((pad,), fill)]).view(n_blocks, block_size)


def _block_lengths(numel: int, block_size: int, device) -> torch.Tensor:
    n_blocks = max(1, -(-numel // block_size))
    lengths = torch.full((n_blocks,), block_size, dtype=torch.int64, device=device)
    lengths[-1] = numel - (n_blocks - 1) * block_size
    return lengths


def ascending_rank(mag: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each |τ| within its block, ascending, ties broken by position (0-based), and each
    element's block length. Both `[numel]`."""
    numel = mag.numel()
    # NaN padding ranks after every real key, NaN included (the sort holds NaNs equal, by position).
    blocks = _blocked(mag, block_size, float("nan"))
    order = torch.sort(blocks, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(block_size, device=mag.device).expand_as(order))
    lengths = _block_lengths(numel, block_size, mag.device)
    per_elem_len = lengths.repeat_interleave(block_size)[:numel]
    return ranks.reshape(-1)[:numel], per_elem_len


def topk_keep(mag: torch.Tensor, density: float, block_size: int) -> torch.Tensor:
    """[|τ| ≥ k-th largest |τ| of its block], k = max(1, ⌊density·n⌋); ties with the k-th kept."""
    numel = mag.numel()
    blocks = _blocked(mag, block_size, float("-inf"))
    lengths = _block_lengths(numel, block_size, mag.device)
    k = torch.clamp((density * lengths.to(torch.float64)).floor().to(torch.int64), min=1)
    desc = torch.sort(blocks, dim=1, descending=True).values
    threshold = desc.gather(1, (k - 1)[:, None])
    return (blocks >= threshold).reshape(-1)[:numel]


def _per_element(coeffs: torch.Tensor, numel: int, block_size: int) -> torch.Tensor:
    """coeffs [N] or [N, n_blocks] -> [N, numel] (or [N, 1], broadcasting)."""
    c = coeffs if coeffs.dim() == 2 else coeffs[:, None]
    if c.shape[1] == 1:
        return c
    block_of = torch.arange(numel, device=coeffs.device) // block_size
    return c[:, block_of]


def _elect_and_mean(taus: torch.Tensor, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    """TIES' sign election and (weighted) disjoint mean over tasks; masks without gradient."""
    weighted = w * taus
    with torch.no_grad():
        sign = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(taus.dtype)
        agree = (torch.sign(taus) == sign) & (taus != 0)
    agree = agree.to(taus.dtype)
    total = (agree * weighted).sum(dim=0)
    if not normalize:
        return total
    divisor = (agree * w).sum(dim=0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return total / divisor


def merge(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    *,
    method: str,
    block_size: int,
    density: torch.Tensor,
    lam: float = 1.0,
    seed: int = 0,
    name: str = "",
    gamma: float = 0.01,
    epsilon: float = 0.1,
    k: int = 2,
    tall_lambda: float = 0.6,
    normalize: Optional[bool] = None,
    from_models: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """base `[*shape]`, deltas N × `[*shape]`, coeffs `[N]` or `[N, n_blocks]`, density `[N]`.

    Returns the merged tensor `[*shape]` in `out_dtype` (default base's dtype); fp32 accumulation
    (fp64 for fp64 inputs). Parameters as in the module docstring; `normalize` defaults to True
    for the electing methods (ties, dare_ties, della).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    acc = accumulation_dtype(base.dtype)
    numel = base.numel()
    flat_base = base.reshape(-1).to(acc)
    taus = torch.stack([d.reshape(-1).to(acc) for d in deltas]) if deltas else flat_base.new_zeros(0, numel)
    if from_models:
        taus = taus - flat_base
    n = taus.shape[0]
    w = _per_element(coeffs.to(acc), numel, block_size)
    rho = density.to(acc)
    normalize = resolve_normalize(method, normalize)

    if method == "model_stock":
        if n < 2:
            raise ValueError(f"deltas: model_stock needs at least 2 fine-tuned models, got {n}")
        # ‖τᵢ‖ = √Gᵢᵢ from the same Gram entries as ⟨τᵢ,τⱼ⟩ (gradient 0 at a zero vector, as
        # torch's norm gives), and θ = base + Σᵢ (t/N)·τᵢ accumulated task by task: the order every
        # kernel uses, so the backends agree even where cos ≈ −1/(N − 1) makes t huge or infinite.
        gram = [[(taus[i] * taus[j]).sum() for j in range(n)] for i in range(n)]
        norm = []
        for i in range(n):
            live = gram[i][i] > 0
            norm.append(torch.where(live, torch.sqrt(torch.where(live, gram[i][i], torch.ones_like(gram[i][i]))),
                                    torch.zeros_like(gram[i][i])))
        cos = [(gram[i][j] / (norm[i] * norm[j]).clamp_min(1e-6)).clamp(-1.0, 1.0)
               for i in range(n) for j in range(i + 1, n)]
        c = torch.stack(cos).mean()
        t = n * c / (1 + (n - 1) * c)
        merged = flat_base
        for i in range(n):
            merged = merged + (t / n) * taus[i]
        return merged.reshape(base.shape).to(out_dtype or base.dtype)

    if method == "task_arithmetic":
        delta = (w * taus).sum(dim=0)
    elif method == "consensus":
        mtl = (w * taus).sum(dim=0)
        with torch.no_grad():
            active = (taus.abs() >= tall_lambda * (mtl - taus).abs()).sum(dim=0)
            keep = (active >= k).to(acc)
        delta = keep * mtl
    else:
        with torch.no_grad():
            masks = []  # the kept fraction of each task vector, and its rescale
            for i in range(n):
                mag = taus[i].abs()
                if method in RANKED and rho[i] >= 1:
                    keep = torch.ones_like(mag)
                elif method == "ties":
                    keep = topk_keep(mag, float(rho[i]), block_size).to(acc) if rho[i] < 1 else torch.ones_like(mag)
                elif method in ("dare", "dare_linear", "dare_ties"):
                    u = keep_uniforms(numel, i, seed, name, base.device).to(acc)
                    keep = (u < rho[i]).to(acc) / rho[i]
                elif method == "breadcrumbs":
                    rank, length = ascending_rank(mag, block_size)
                    n_top = torch.floor(gamma * length.to(torch.float64)).to(torch.int64)
                    n_keep = torch.floor(float(rho[i]) * length.to(torch.float64)).to(torch.int64)
                    n_bottom = length - n_keep - n_top
                    keep = ((rank >= n_bottom) & (rank < length - n_top)).to(acc)
                else:  # della, della_linear
                    rank, length = ascending_rank(mag, block_size)
                    frac = torch.where(length > 1, rank.to(acc) / (length - 1).clamp_min(1).to(acc),
                                       torch.full_like(mag, 0.5))
                    p = rho[i] - epsilon + 2 * epsilon * frac
                    u = keep_uniforms(numel, i, seed, name, base.device).to(acc)
                    keep = (u < p).to(acc) / p
                masks.append(keep)
            masks = torch.stack(masks)
        trimmed = masks * taus
        if method in ELECTING:
            delta = _elect_and_mean(trimmed, w, normalize)
        else:
            delta = (w * trimmed).sum(dim=0)
    merged = flat_base + lam * delta
    return merged.reshape(base.shape).to(out_dtype or base.dtype)
