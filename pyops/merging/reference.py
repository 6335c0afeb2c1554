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
  k-th largest |τᵢ| of the block, k = max(1, ⌊ρᵢ·n⌋) (ρᵢ·n in fp64, as mergekit 0.1.5's
  int(density * n); exact selection; entries tied with the k-th
  are kept); elect s = sign(Σᵢ wᵢ·τᵢ') (0 counts as +); disjoint weighted mean
  merged = Σᵢ Mᵢ·wᵢ·τᵢ' / Σᵢ Mᵢ·wᵢ with Mᵢ = [sign τᵢ' = s]·[τᵢ' ≠ 0] (a zero divisor counts as
  1; ``normalize=False`` keeps the plain sum); θ = base + λ·merged. ``exact_k`` keeps exactly k
  per block instead, the ties at the k-th magnitude by lowest flat index (`topk_keep`).
* ``dare`` = ``dare_linear`` (Yu et al., "Language Models are Super Mario", ICML 2024): keep each
  element with probability ρᵢ, θ = base + λ·Σᵢ wᵢ·mᵢ·τᵢ/ρᵢ. The rescale is the paper's 1/ρ;
  mergekit 0.1.5 rescales by an L1-norm ratio instead.
* ``dare_ties``: the DARE-rescaled τᵢ' = mᵢ·τᵢ/ρᵢ, then TIES' election and disjoint mean.
* ``breadcrumbs`` (Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024): per block, rank |τᵢ|
  ascending (ties broken by position), drop the top ⌊γ·n⌋ and the bottom n − ⌊ρᵢ·n⌋ − ⌊γ·n⌋,
  θ = base + λ·Σᵢ wᵢ·keepᵢ·τᵢ (no rescale, as mergekit). ρᵢ = 1 keeps every entry (mergekit's
  `density >= 1`); otherwise ρᵢ + γ ≤ 1.
* ``breadcrumbs_ties`` (mergekit 0.1.5's registry entry, mergekit/merge_methods/registry.py):
  breadcrumbs' keepᵢ·τᵢ, then TIES' election; ``normalize`` defaults to False (the elected sum),
  mergekit's default for this method.
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
from pyops.merging.spec import EXTRA_METHODS, nuslerp_t


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


def topk_keep(mag: torch.Tensor, density: float, block_size: int, exact_k: bool = False) -> torch.Tensor:
    """[|τ| ≥ k-th largest |τ| of its block], k = max(1, ⌊density·n⌋); ties with the k-th kept.

    density·n in fp64 (a Python float times the block length): mergekit 0.1.5's
    int(density * n) (mergekit/sparsify.py, magnitude()).

    exact_k: exactly k per block, as mergekit's top-k keeps k: with thr the same k-th largest,
    the entries with ¬(|τ| ≤ thr) (larger, or NaN, which the sort ranks first) count first, then
    the entries with |τ| = thr are kept in increasing flat index until k are counted."""
    numel = mag.numel()
    blocks = _blocked(mag, block_size, float("-inf"))
    lengths = _block_lengths(numel, block_size, mag.device)
    k = torch.clamp((density * lengths.to(torch.float64)).floor().to(torch.int64), min=1)
    desc = torch.sort(blocks, dim=1, descending=True).values
    threshold = desc.gather(1, (k - 1)[:, None])
    if not exact_k:
        return (blocks >= threshold).reshape(-1)[:numel]
    greater = (~(blocks <= threshold)).sum(dim=1, keepdim=True)
    tie = blocks == threshold
    ties_before = tie.cumsum(dim=1) - tie.to(torch.int64)
    keep = (blocks > threshold) | (tie & (ties_before < k[:, None] - greater))
    return keep.reshape(-1)[:numel]


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
    exact_k: bool = False,
) -> torch.Tensor:
    """base `[*shape]`, deltas N × `[*shape]`, coeffs `[N]` or `[N, n_blocks]`, density `[N]`.

    Returns the merged tensor `[*shape]` in `out_dtype` (default base's dtype); fp32 accumulation
    (fp64 for fp64 inputs). Parameters as in the module docstring; `normalize` defaults to True
    for the electing methods (ties, dare_ties, della). `exact_k` (ties): keep exactly k entries
    per block, the ties at the k-th magnitude by lowest flat index first (`topk_keep`).
    """
    if method not in METHODS + EXTRA_METHODS:
        raise ValueError(f"method: expected one of {METHODS + EXTRA_METHODS}, got {method!r}")
    acc = accumulation_dtype(base.dtype)
    numel = base.numel()
    flat_base = base.reshape(-1).to(acc)
    taus = torch.stack([d.reshape(-1).to(acc) for d in deltas]) if deltas else flat_base.new_zeros(0, numel)
    if from_models:
        taus = taus - flat_base
    n = taus.shape[0]
    w = _per_element(coeffs.to(acc), numel, block_size)
    rho = density.to(acc)  # keep probabilities (DARE, DELLA): fp32, as mergekit's fp32 Bernoulli draws
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
            # Counts (TIES' k, breadcrumbs' band) and the keep-all test from the density as given,
            # in fp64: mergekit 0.1.5's `density >= 1` and int(density * n) (mergekit/sparsify.py)
            # are Python floats.
            dens64 = [float(x) for x in density.to(torch.float64).tolist()]
            masks = []  # the kept fraction of each task vector, and its rescale
            for i in range(n):
                mag = taus[i].abs()
                if method in RANKED and dens64[i] >= 1:
                    keep = torch.ones_like(mag)
                elif method == "ties":
                    keep = topk_keep(mag, dens64[i], block_size, exact_k).to(acc) if dens64[i] < 1 \
                        else torch.ones_like(mag)
                elif method in ("dare", "dare_linear", "dare_ties"):
                    u = keep_uniforms(numel, i, seed, name, base.device).to(acc)
                    keep = (u < rho[i]).to(acc) / rho[i]
                elif method in ("breadcrumbs", "breadcrumbs_ties"):
                    rank, length = ascending_rank(mag, block_size)
                    n_top = torch.floor(gamma * length.to(torch.float64)).to(torch.int64)
                    n_keep = torch.floor(dens64[i] * length.to(torch.float64)).to(torch.int64)
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


# --------------------------------------------------------------------------------------------
# Methods beyond task arithmetic: mergekit 0.1.5's interpolating methods
# --------------------------------------------------------------------------------------------
#
# Each takes the tensors as mergekit's method takes the models' copies of one weight: inputs of
# one shape and dtype, computed in fp32 (fp64 for fp64 inputs) and rounded once to `out_dtype`
# (default: the first input's dtype). Where mergekit 0.1.5 computes in the input dtype (nuslerp,
# multislerp, karcher, nearswap, passthrough for bf16 / fp16 inputs) pyops computes in fp32 and
# rounds once. Differentiable in every tensor through torch's autograd (branches and the
# iteration count are taken on the values, without gradient, as mergekit takes them).


def linear(models: Sequence[torch.Tensor], weight, *, normalize: bool = True,
           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit 0.1.5's ``linear`` (mergekit/merge_methods/linear.py; Wortsman et al., "Model
    soups", ICML 2022): N tensors `[*shape]`, weight `[N]` (floats or a tensor).

        out = Σᵢ wᵢ·xᵢ  (then / Σᵢ wᵢ when normalize)

    The sum runs i = 0..N−1 from zero, then one division by Σᵢ wᵢ (fp32): a zero sum divides by
    zero (±inf / NaN), as mergekit does. `[*shape]` in out_dtype (default: the inputs' dtype).
    """
    acc = accumulation_dtype(models[0].dtype)
    w = torch.as_tensor(weight, dtype=acc, device=models[0].device) if not isinstance(weight, torch.Tensor) \
        else weight.to(device=models[0].device, dtype=acc)
    result = torch.zeros(models[0].shape, dtype=acc, device=models[0].device)
    for i, x in enumerate(models):
        result = result + x.to(acc) * w[i]
    if normalize:
        result = result / w.sum()
    return result.to(out_dtype or models[0].dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t, *, dot_threshold: float = 0.9995, eps: float = 1e-8,
          out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit 0.1.5's ``slerp`` (mergekit/merge_methods/slerp.py; Shoemake, "Animating rotation
    with quaternion curves", SIGGRAPH 1985): spherical interpolation of the whole flattened tensor,
    `a` the base (t = 0), `b` the other model (t = 1); a, b `[*shape]`, t a float (or 0-d tensor).

        ‖·‖ below eps counts as 1;  d = clamp(Σ (a/‖a‖)·(b/‖b‖), −1, 1)
        |d| > dot_threshold (colinear or antipodal):  out = (1 − t)·a + t·b
        else θ = acos d:  out = sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b

    The magnitudes are not normalised: the coefficients multiply the raw a and b. An empty tensor
    gives (1 − t)·a + t·b. `[*shape]` in out_dtype (default a's dtype).
    """
    acc = accumulation_dtype(a.dtype)
    x = a.reshape(-1).to(acc)
    y = b.reshape(-1).to(acc)
    t = torch.as_tensor(t, dtype=acc, device=a.device)
    if x.numel() == 0:
        return ((1 - t) * x + t * y).reshape(a.shape).to(out_dtype or a.dtype)
    na = torch.linalg.vector_norm(x)
    nb = torch.linalg.vector_norm(y)
    na = torch.where(na > eps, na, torch.ones_like(na))
    nb = torch.where(nb > eps, nb, torch.ones_like(nb))
    dot = ((x / na) * (y / nb)).sum().clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    # the unselected branch stays finite (and so does its gradient) for colinear inputs
    theta = torch.acos(torch.where(lin, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(lin, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(lin, t, torch.sin(t * theta) / sin_theta)
    return (ca * x + cb * y).reshape(a.shape).to(out_dtype or a.dtype)


def nearswap(base: torch.Tensor, model: torch.Tensor, t, *, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit 0.1.5's ``nearswap`` (mergekit/merge_methods/nearswap.py; alchemonaut,
    QuartetAnemoi-70B): per element, take `model` where it is within t of `base`:

        w = clamp(t / max(|base − model|, 1e-6), 0, 1);  out = w·model + (1 − w)·base

    base, model `[*shape]`; `[*shape]` in out_dtype (default base's dtype)."""
    acc = accumulation_dtype(base.dtype)
    a = base.to(acc)
    b = model.to(acc)
    w = (torch.as_tensor(t, dtype=acc, device=a.device) / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return (w * b + (1 - w) * a).to(out_dtype or base.dtype)


def passthrough(x: torch.Tensor, scale=None, *, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit 0.1.5's ``passthrough`` (mergekit/merge_methods/passthrough.py): x, or x·scale when
    a scale is given. `[*shape]` in out_dtype (default x's dtype)."""
    if scale is None:
        return x.to(out_dtype or x.dtype)
    acc = accumulation_dtype(x.dtype)
    return (x.to(acc) * torch.as_tensor(scale, dtype=acc, device=x.device)).to(out_dtype or x.dtype)


def nuslerp(a: torch.Tensor, b: torch.Tensor, weight: Sequence[float], *, base: Optional[torch.Tensor] = None,
            nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False, eps: float = 1e-8,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit 0.1.5's ``nuslerp`` (mergekit/merge_methods/nuslerp.py): slerp of the two models
    (of their task vectors a − base, b − base when a base is given, the result then added to
    base) with t = `spec.nuslerp_t(weight)` (w₁/(w₀ + w₁), 0.5 when |w₀ + w₁| < 1e-6), over the
    whole flattened tensor (nuslerp_flatten, the default), over each row of the last dimension,
    or over the vectors along dim 0 (nuslerp_row_wise, when not flattened):

        u = v / max(‖v‖, 1e-7);  c = clamp(Σ u₀·u₁, −1, 1)
        1 − c² ≤ eps² (colinear):  (1 − t)·v₀ + t·v₁
        else θ = acos c:  (sin((1 − t)θ)·v₀ + sin(tθ)·v₁) / sin θ

    a, b, base `[*shape]`; `[*shape]` in out_dtype (default a's dtype)."""
    acc = accumulation_dtype(a.dtype)
    t = nuslerp_t(weight)
    shape = a.shape
    v0 = a.to(acc)
    v1 = b.to(acc)
    if base is not None:
        v0 = v0 - base.to(acc)
        v1 = v1 - base.to(acc)
    if nuslerp_flatten or v0.dim() == 0:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif nuslerp_row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if not nuslerp_flatten and nuslerp_row_wise and result.dim() > 0:
        result = result.transpose(0, -1)
    result = result.reshape(shape)
    if base is not None:
        result = base.to(acc) + result
    return result.to(out_dtype or a.dtype)


def multislerp(models: Sequence[torch.Tensor], weight, *, base: Optional[torch.Tensor] = None,
               normalize_weights: bool = True, eps: float = 1e-8,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit 0.1.5's ``multislerp`` (mergekit/merge_methods/multislerp.py; Goddard, "Multi-SLERP"):
    barycentric interpolation on the hypersphere of N ≥ 1 tensors (of their task vectors
    xᵢ − base with a base, the result then added to base), over the whole flattened tensor:

        w /= Σ w (normalize_weights);  uᵢ = xᵢ / (‖xᵢ‖ + eps);  m = Σ wᵢ·uᵢ
        ‖m‖ < eps: N = 2 gives w₀·x₀ + w₁·x₁; N > 2 is a ValueError (antipodal inputs)
        m̂ = m/‖m‖;  r = Σ wᵢ·(uᵢ − (uᵢ·m̂)·m̂);  ρ = ‖r‖ + eps
        out = (m̂·cos ρ + r·sin ρ / ρ) · Σ wᵢ‖xᵢ‖

    N = 1 returns the one tensor unchanged (no base, no weight), as mergekit does. models N ×
    `[*shape]`, weight `[N]`; `[*shape]` in out_dtype (default the inputs' dtype)."""
    first = models[0]
    if len(models) == 1:
        return first.to(out_dtype or first.dtype)
    acc = accumulation_dtype(first.dtype)
    x = torch.stack([m.to(acc) for m in models])
    if base is not None:
        x = x - base.to(acc)
    flat = x.reshape(x.shape[0], -1)
    w = torch.as_tensor(weight, dtype=acc, device=first.device) if not isinstance(weight, torch.Tensor) \
        else weight.to(device=first.device, dtype=acc)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if bool(mean_norm.detach() < eps):
        if x.shape[0] != 2:
            raise ValueError("models: the weighted sum of the unit vectors is zero (antipodal inputs whose weights "
                             "cancel); multislerp needs other weights for more than two inputs")
        res = x[0] * w[0] + x[1] * w[1]
    else:
        mean = mean / mean_norm
        dots = (unit * mean).sum(-1, keepdim=True)
        tangent = ((unit - dots * mean) * w.view(-1, 1)).sum(0)
        rho = torch.linalg.vector_norm(tangent) + eps
        res = (mean * torch.cos(rho) + tangent * (torch.sin(rho) / rho)) * (norms.squeeze(-1) * w).sum()
        res = res.view(x.shape[1:])
    if base is not None:
        res = res + base.to(acc)
    return res.to(out_dtype or first.dtype)


def karcher(models: Sequence[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit 0.1.5's ``karcher`` (mergekit/merge_methods/karcher.py; the Riemannian (Karcher /
    Fréchet) mean on the unit sphere, Karcher, Comm. Pure Appl. Math. 1977): N tensors `[*shape]`,
    equal weights αᵢ = 1/N, every input alike (no base).

        uᵢ = xᵢ/‖xᵢ‖ (0 for a zero tensor); V = {i : ‖xᵢ‖ > tol} (none: zeros)
        m = normalise(Σ_{i∈V} α̂ᵢuᵢ), α̂ = α/Σ_V α (u of the first valid input if ‖Σ‖ < tol)
        up to max_iter times: g = Σ_{i∈V, θᵢ ≥ tol} α̂ᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·m), θᵢ = acos clamp(m·uᵢ);
            stop if ‖g‖ < tol; m = cos‖g‖·m + sin‖g‖·g/‖g‖, renormalised when ‖m‖ > tol
        out = (Σᵢ αᵢ‖xᵢ‖) · m

    N = 1 returns the tensor unchanged. `[*shape]` in out_dtype (default the inputs' dtype)."""
    first = models[0]
    if len(models) == 1:
        return first.to(out_dtype or first.dtype)
    acc = accumulation_dtype(first.dtype)
    n = len(models)
    alphas = [1.0 / n] * n
    xs = [m.to(acc).reshape(-1) for m in models]
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if float(nm.detach()) == 0.0 else x / nm for x, nm in zip(xs, norms)]
    valid = [i for i, nm in enumerate(norms) if float(nm.detach()) > tol]
    if not valid:
        return sum(x * 0 for x in xs).reshape(first.shape).to(out_dtype or first.dtype)
    a_sum = sum(alphas[i] for i in valid)
    a_hat = [alphas[i] / a_sum for i in valid]
    vu = [units[i] for i in valid]
    mean = torch.zeros_like(vu[0])
    for a, u in zip(a_hat, vu):
        mean = mean + a * u
    mn = torch.linalg.vector_norm(mean)
    mean = vu[0].clone() if float(mn.detach()) < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(a_hat, vu):
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta.detach()) < tol:
                continue
            tangent = tangent + a * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn.detach()) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un.detach()) > tol:
            mean = mean / un
    scale = sum(a * nm for a, nm in zip(alphas, norms))
    return (scale * mean).reshape(first.shape).to(out_dtype or first.dtype)


# --------------------------------------------------------------------------------------------
# mergekit 0.1.5's selective methods: ram, ramplus_tl, sce, arcee_fusion
# --------------------------------------------------------------------------------------------

def _ram_parts(base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float):
    acc = accumulation_dtype(base.dtype)
    b = base.to(acc)
    taus = torch.stack([m.to(acc) - b for m in models]).reshape(len(models), -1)
    nonzero = taus.abs() > epsilon
    count = nonzero.sum(dim=0, keepdim=True)
    return b, taus, nonzero, count, count > 1, count == 1


def ram(base: torch.Tensor, models: Sequence[torch.Tensor], *, epsilon: float = 1e-5,
        out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit 0.1.5's ``ram`` (mergekit/merge_methods/ram.py; "Reinforced Agent Merging",
    arXiv:2601.13572): per element, the task vectors τᵢ = xᵢ − base with |τᵢ| > epsilon
    contribute; one contributor is taken whole, c > 1 contributors each add τᵢ/c:

        out = base + Σᵢ [|τᵢ| > ε]·τᵢ·([c = 1] + [c > 1]/c),  c = Σᵢ [|τᵢ| > ε]

    (the masks multiply τ, so a NaN τ stays NaN). base, models N × `[*shape]`; `[*shape]` in
    out_dtype (default base's dtype); no models returns base."""
    if not models:
        return base.to(out_dtype or base.dtype)
    b, taus, nz, count, overlap, unique = _ram_parts(base, models, epsilon)
    tz = taus * nz
    merged = (tz * unique + tz * overlap / count.clamp(min=1)).sum(dim=0)
    return (b + merged.reshape(base.shape)).to(out_dtype or base.dtype)


def ramplus_tl(base: torch.Tensor, models: Sequence[torch.Tensor], *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit 0.1.5's ``ramplus_tl`` (mergekit/merge_methods/ram.py, tensor-local RAM+): ``ram``
    with each model's unique entries scaled by λᵢ = 1 + r·clamp(ρᵢ, 0, α), where
    ρᵢ = #{shared entries of i} / max(#{unique entries of i}, ε) over the whole tensor (shared:
    c > 1, unique: c = 1, both among i's |τᵢ| > ε). base, models N × `[*shape]`; `[*shape]` in
    out_dtype (default base's dtype); no models returns base."""
    if not models:
        return base.to(out_dtype or base.dtype)
    b, taus, nz, count, overlap, unique = _ram_parts(base, models, epsilon)
    acc = b.dtype
    shared_n = (nz & overlap).sum(dim=1).to(acc)
    unique_n = (nz & unique).sum(dim=1).to(acc)
    rho = shared_n / unique_n.clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    tz = taus * nz
    merged = (tz * unique * lam[:, None] + tz * overlap / count.clamp(min=1)).sum(dim=0)
    return (b + merged.reshape(base.shape)).to(out_dtype or base.dtype)


def sce_topk_mask(var: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest |var| (flat), ties at the k-th by lowest flat index (mergekit's torch.topk
    leaves that order unspecified)."""
    flat = var.abs().reshape(-1)
    order = torch.sort(-flat, stable=True).indices[:k]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order] = True
    return mask.view(var.shape)


def sce(base: torch.Tensor, models: Sequence[torch.Tensor], *, select_topk: float = 1.0,
        out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit 0.1.5's ``sce`` (mergekit/merge_methods/sce.py; Wan et al., "FuseChat:
    Knowledge Fusion of Chat Models", arXiv:2408.07990 — Select, Calculate, Erase):

        select:    select_topk < 1 keeps the k = ⌊select_topk·#{var ≠ 0}⌋ elements of largest
                   variance across the models (var over models, biased; ties at the k-th by
                   lowest flat index); select_topk ≤ 0 keeps none
        calculate: wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) over the kept τ (1/N when |Σ| < 1e-6)
        erase:     s = sign(Σᵢ τᵢ) (0 counts as +), eᵢ = [sign τᵢ = s]
        out = base + Σᵢ τᵢ·wᵢ·eᵢ / max(Σᵢ wᵢ·eᵢ, 1e-6)

    base, models N × `[*shape]`; `[*shape]` in out_dtype (default base's dtype); no models
    returns base."""
    if not models:
        return base.to(out_dtype or base.dtype)
    acc = accumulation_dtype(base.dtype)
    b = base.to(acc)
    taus = torch.stack([m.to(acc) - b for m in models])
    if select_topk < 1:
        if select_topk <= 0:
            mask = torch.zeros(base.shape, dtype=torch.bool, device=base.device)
        else:
            with torch.no_grad():
                var = torch.var(taus, dim=0, unbiased=False)
                k = int(torch.count_nonzero(var) * select_topk)  # mergekit's fp32 product, floored
                mask = sce_topk_mask(var, k) if k > 0 else torch.zeros_like(var, dtype=torch.bool)
        taus = taus * mask.unsqueeze(0)
    with torch.no_grad():
        majority = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0).to(acc)
        erase = (torch.sign(taus) == majority).to(acc)
    weights = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = weights.sum()
    if abs(float(total.detach())) < 1e-6:
        weights = torch.ones_like(weights) / weights.shape[0]
    else:
        weights = weights / total
    ew = weights.view(-1, *([1] * (taus.dim() - 1))) * erase
    merged = (taus * ew).sum(dim=0) / ew.sum(dim=0).clamp(min=1e-6)
    return (b + merged).to(out_dtype or base.dtype)


def arcee_fusion(base: torch.Tensor, model: torch.Tensor, *, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit 0.1.5's ``arcee_fusion`` (mergekit/merge_methods/arcee_fusion.py): take the model's
    change where its importance is an upper outlier:

        importance = |x − base| · KL(softmax(x) ‖ softmax(base)) per row of the last dimension
                     (softmaxes + 1e-8, the KL broadcast over the row)
        thr = q₂ + 1.5·(q₃ − q₁), qⱼ the sorted importance at index ⌊(j/4)·(n − 1)⌋
        out = base + (x − base)·[importance ≥ thr]

    The order statistics are exact over the whole tensor; mergekit 0.1.5 takes them from a
    random sample of 10⁶ elements (with replacement) when the tensor is larger, so there its
    mask varies from run to run. base, model `[*shape]` (at least 1-d); `[*shape]` in
    out_dtype (default base's dtype)."""
    acc = accumulation_dtype(base.dtype)
    b = base.to(acc)
    x = model.to(acc)
    with torch.no_grad():
        p = torch.softmax(x, dim=-1) + 1e-8
        q = torch.softmax(b, dim=-1) + 1e-8
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        importance = (x - b).abs() * kl
        flat = torch.sort(importance.reshape(-1)).values
        idx = (torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32) * (flat.numel() - 1)).long()
        q1, med, q3 = flat[idx.to(flat.device)]
        mask = (importance >= med + 1.5 * (q3 - q1)).to(acc)
    return (b + (x - b) * mask).to(out_dtype or base.dtype)
