"""The merge methods' names, parameter checks, block layout and random key, without torch.

`pyops.merge` (pyops/merging/merge.py), the reference (pyops/merging/reference.py), the backend
modules and the checkpoint command's engines (pyops/merging/runner.py, native_engine.py) all take
these from here. The module imports nothing heavy, so that `python -m pyops merge` can plan and
run a CPU merge on the C++ kernels without importing torch, whose import would otherwise be a
large share of a whole-model merge.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Union

METHODS = ("task_arithmetic", "ties", "dare", "dare_linear", "dare_ties", "breadcrumbs", "della",
           "della_linear", "model_stock", "consensus")
# Task-vector methods of mergekit 0.1.5 that `pyops.merge` also takes beyond METHODS (the
# checkpoint command's YAML lists them, and the MERGEKIT_METHODS below, in config.SUPPORTED).
EXTRA_METHODS = ("breadcrumbs_ties",)
# Methods that end with TIES' sign election and disjoint mean, and their default `normalize`.
ELECTING = {"ties", "dare_ties", "della", "breadcrumbs_ties"}
RANDOM = {"dare", "dare_linear", "dare_ties", "della", "della_linear"}
# Methods whose masks come from each |τ|'s rank within its block.
RANKED = ("breadcrumbs", "della", "della_linear", "breadcrumbs_ties")
# Method codes of the C++ kernels (csrc/merging/); task_arithmetic also has its own kernel.
NATIVE_METHOD_CODES = {"task_arithmetic": 0, "ties": 1, "dare": 2, "dare_linear": 2, "dare_ties": 3,
                       "breadcrumbs": 4, "della": 5, "della_linear": 6, "consensus": 7, "breadcrumbs_ties": 9}
# The C++ kernels' code of ties with exact_k=True (exactly k kept per block, ties by lowest index).
TIES_EXACT_K_CODE = 8

# The `backend=` values the checkpoint command accepts (pyops._backend.BACKENDS and "auto").
BACKEND_CHOICES = ("auto", "reference", "cpu", "triton", "cuda")

Blocks = Union[None, str, int]
# The defaults of `pyops.merge` / `merge_from_models` (their signatures spell them out; a test
# checks that they agree), for callers that fill in absent parameters without torch.
MERGE_DEFAULTS = {"density": 1.0, "seed": 0, "lam": 1.0, "name": "", "gamma": 0.01, "epsilon": 0.1, "k": 2,
                  "tall_lambda": 0.6, "normalize": None, "coeffs": None, "blocks": None, "exact_k": False}


def resolve_normalize(method: str, normalize) -> bool:
    """`normalize=None` means the method's default, mergekit 0.1.5's (mergekit/merge_methods/registry.py):
    the disjoint mean for ties, dare_ties and della; the plain sum for breadcrumbs_ties and the rest."""
    return (method in ELECTING and method != "breadcrumbs_ties") if normalize is None else bool(normalize)


def name_hash(name: str) -> int:
    """32-bit FNV-1a of the UTF-8 bytes of `name` (the tensor's name in a checkpoint)."""
    h = 0x811C9DC5
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def resolve_blocks(blocks: Blocks, shape: Sequence[int]) -> tuple[int, int]:
    """(block_size, n_blocks) of the flattened tensor for a `blocks` argument."""
    numel = math.prod(shape)
    if blocks is None:
        return max(numel, 1), 1
    if isinstance(blocks, str):
        if blocks != "rows":
            raise ValueError(f"blocks: expected None, 'rows' or a positive int, got {blocks!r}")
        if len(shape) == 0:
            raise ValueError("blocks: 'rows' needs a tensor with at least one dimension, got a 0-d tensor")
        n_rows = int(shape[0])
        return max(numel // n_rows, 1) if n_rows > 0 else 1, n_rows
    if isinstance(blocks, bool) or not isinstance(blocks, int):
        raise TypeError(f"blocks: expected None, 'rows' or a positive int, got {type(blocks).__name__}")
    if blocks <= 0:
        raise ValueError(f"blocks: block size must be > 0, got {blocks}")
    return blocks, (numel + blocks - 1) // blocks


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_params(method, density, lam, seed, name, gamma, epsilon, k, tall_lambda, normalize, n: int) -> List[float]:
    """Validates the method and its parameters for n tasks; returns the per-task densities.
    `density` is a float, a sequence of n floats, or a tensor (0-d or [n])."""
    if not isinstance(method, str) or method not in METHODS + EXTRA_METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS + EXTRA_METHODS)}, got {method!r}")
    if _is_real(density):
        dens = [float(density)] * n
    elif hasattr(density, "tolist") and hasattr(density, "dim"):  # a tensor (no torch import here)
        if density.dim() == 0:
            dens = [float(density)] * n
        elif tuple(density.shape) == (n,):
            dens = [float(x) for x in density.tolist()]
        else:
            raise ValueError(f"density: expected a float or shape [{n}] (one per task), got {list(density.shape)}")
    elif isinstance(density, (list, tuple)) and len(density) == n and all(_is_real(x) for x in density):
        dens = [float(x) for x in density]
    else:
        raise TypeError(f"density: expected a float or a sequence of {n} floats, got {density!r}")
    for i, d in enumerate(dens):
        if not (0.0 < d <= 1.0):
            raise ValueError(f"density: expected values in (0, 1], got {d} (task {i})")
    if not _is_real(lam):
        raise TypeError(f"lam: expected a float, got {type(lam).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not (0 <= seed < 2**64):
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed!r}")
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str (the tensor's name, part of the random key), got {type(name).__name__}")
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        if not (0.0 <= gamma < 1.0):
            raise ValueError(f"gamma: expected a value in [0, 1), got {gamma}")
        for i, d in enumerate(dens):
            if d < 1.0 and d + gamma > 1.0 + 1e-12:  # density 1 keeps everything (as mergekit)
                raise ValueError(f"gamma: density + gamma must be <= 1 for breadcrumbs, got {d} + {gamma} (task {i})")
    if method in ("della", "della_linear"):
        if not epsilon >= 0.0:
            raise ValueError(f"epsilon: expected a value >= 0, got {epsilon}")
        for i, d in enumerate(dens):
            if d < 1.0 and not (d - epsilon > 0.0 and d + epsilon <= 1.0):  # density 1 keeps everything
                raise ValueError(f"epsilon: della needs 0 < density - epsilon and density + epsilon <= 1, "
                                 f"got density={d}, epsilon={epsilon} (task {i})")
    if method == "consensus":
        if not isinstance(k, int) or isinstance(k, bool) or not (1 <= k <= n):
            raise ValueError(f"k: expected an int in [1, {n}] (tasks that must agree), got {k!r}")
        if tall_lambda < 0:
            raise ValueError(f"tall_lambda: expected >= 0, got {tall_lambda}")
    if normalize is not None and not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected None or a bool, got {normalize!r}")
    return dens


# --------------------------------------------------------------------------------------------
# Methods beyond task arithmetic (mergekit 0.1.5), run per tensor by
# `pyops.merging.interpolate.merge_tensors`. Not in METHODS: the checkpoint command's YAML
# derives its supported set from METHODS.
# --------------------------------------------------------------------------------------------

class _Required:
    """The default of a parameter mergekit requires (no default)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()

# name -> {parameter: default}, mergekit 0.1.5's names and defaults (mergekit/merge_methods/<name>.py).
MERGEKIT_METHODS = {
    "linear": {"weight": REQUIRED, "normalize": True},
    "slerp": {"t": REQUIRED},
    "nearswap": {"t": REQUIRED},
    "passthrough": {"scale": None},
    "nuslerp": {"weight": REQUIRED, "nuslerp_row_wise": False, "nuslerp_flatten": True},
    "multislerp": {"weight": REQUIRED, "normalize_weights": True, "eps": 1e-8},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    # mergekit/merge_methods/registry.py + generalized_task_arithmetic.py: breadcrumbs' mask, TIES' election
    "breadcrumbs_ties": {"weight": REQUIRED, "density": 1.0, "gamma": 0.01, "normalize": False, "lambda": 1.0,
                         "rescale": False, "int8_mask": False},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    "sce": {"int8_mask": False, "select_topk": 1.0},
    "arcee_fusion": {},
}
# The parameters given per model (one value per input; the others are one value per tensor).
MERGEKIT_PER_MODEL = {"linear": ("weight",), "passthrough": ("scale",), "nuslerp": ("weight",),
                      "multislerp": ("weight",), "breadcrumbs_ties": ("weight", "density", "gamma")}
# mergekit's base policy per method: "ignored" (every input alike: `base` must be None, the
# inputs go in `models`), "required" (slerp, nearswap: `base` and exactly one model) or
# "optional" (nuslerp, multislerp: task vectors from `base` when given).
MERGEKIT_BASE = {"linear": "ignored", "slerp": "required", "nearswap": "required", "passthrough": "ignored",
                 "nuslerp": "optional", "multislerp": "optional", "karcher": "ignored", "breadcrumbs_ties": "required",
                 "ram": "required", "ramplus_tl": "required", "sce": "required", "arcee_fusion": "required"}
# (minimum, maximum) of `models` (the non-base inputs); None: no maximum.
MERGEKIT_MODEL_COUNT = {"linear": (1, None), "slerp": (1, 1), "nearswap": (1, 1), "passthrough": (1, 1),
                        "nuslerp": (2, 2), "multislerp": (1, None), "karcher": (1, None),
                        "breadcrumbs_ties": (1, None), "ram": (0, None), "ramplus_tl": (0, None), "sce": (0, None),
                        "arcee_fusion": (1, 1)}


def nuslerp_t(weight) -> float:
    """nuslerp's interpolation parameter from its two models' weights: w₁ / (w₀ + w₁), or 0.5 when
    |w₀ + w₁| < 1e-6 (mergekit 0.1.5, mergekit/merge_methods/nuslerp.py)."""
    total = float(weight[0]) + float(weight[1])
    return 0.5 if abs(total) < 1e-6 else float(weight[1]) / total
