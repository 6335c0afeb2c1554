"""The scalars of mergekit 0.1.5's interpolating methods, torch-free.

linear, slerp, nuslerp, multislerp and karcher run as two passes over the data with a few
scalars in between (csrc/merging/interpolate.h): a per-vector Gram pass, then one combine pass
``out[v] = [base +] Σᵢ c[v][i]·xᵢ[v] [/ divisor[v]]`` whose coefficients these functions compute
from the Gram matrices, in double (Python floats); ramplus_tl's per-model factors come from a
counting pass. Every path that runs the passes (the C++ op of backend_cpu.py, the Triton op of
backend_triton.py through registry.py, and the merge command's torch-free native engine) takes
its coefficients from here, so the engines write the same bytes. The definitions are those of
pyops/merging/reference.py; the formulas follow mergekit/merge_methods/{linear,slerp,nuslerp,
multislerp,karcher,ram}.py.

A Gram matrix is a flat list of N·N doubles (row-major) per vector: G[i·N + j] = Σₖ xᵢ[k]·xⱼ[k].
A layout is (n_vectors, length, vector_stride, element_stride): vector v is the elements
v·vector_stride + k·element_stride, k < length.
"""
from __future__ import annotations

import array
import math
from typing import Dict, List, Optional, Sequence, Tuple

from pyops.merging import spec

Layout = Tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

def whole_layout(shape) -> Layout:
    numel = math.prod(shape)
    return (1, numel, 0, 1) if numel else (0, 0, 0, 1)


def rows_layout(shape) -> Layout:
    """The rows of the last dimension (a 0-d tensor is one vector)."""
    if len(shape) == 0:
        return whole_layout(shape)
    numel, last = math.prod(shape), shape[-1]
    return (numel // last, last, last, 1) if numel else (0, 0, 0, 1)


def dim0_layout(shape) -> Layout:
    """The vectors along dim 0 (mergekit's nuslerp_row_wise; a 0-d tensor is one vector)."""
    if len(shape) == 0:
        return whole_layout(shape)
    numel, d0 = math.prod(shape), shape[0]
    return (numel // d0, d0, 1, numel // d0) if numel else (0, 0, 0, 1)


def nuslerp_layout(shape, flatten: bool, row_wise: bool) -> Layout:
    return (whole_layout if flatten else dim0_layout if row_wise else rows_layout)(shape)


# --------------------------------------------------------------------------------------------
# Scalar helpers (torch's semantics for NaN: clamps and maxima keep it)
# --------------------------------------------------------------------------------------------

def fp32(x: float) -> float:
    """x rounded to the nearest float32 (as a Python float)."""
    return array.array("f", [x])[0]


def _clamp(x: float, lo: Optional[float] = None, hi: Optional[float] = None) -> float:
    if x != x:
        return x
    if lo is not None and x < lo:
        x = lo
    if hi is not None and x > hi:
        x = hi
    return x


def _sqrt0(x: float) -> float:
    """sqrt(max(x, 0)), NaN kept."""
    return math.sqrt(_clamp(x, 0.0))


def _quad(u: Sequence[float], g: Sequence[float], v: Sequence[float], n: int) -> float:
    """uᵀ·G·v."""
    return sum(u[i] * sum(g[i * n + j] * v[j] for j in range(n)) for i in range(n))


def _matvec(g: Sequence[float], v: Sequence[float], n: int) -> List[float]:
    return [sum(g[i * n + j] * v[j] for j in range(n)) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Coefficients
# --------------------------------------------------------------------------------------------

def linear_coeffs(weight: Sequence[float], normalize: bool) -> Tuple[List[float], Optional[List[float]]]:
    """linear: Σᵢ wᵢ·xᵢ [/ Σᵢ wᵢ]; the weights and their (sequential) sum in fp32."""
    w = [fp32(float(x)) for x in weight]
    if not normalize:
        return w, None
    total = 0.0
    for x in w:
        total = fp32(total + x)  # one fp32 addition (exact in double, then rounded)
    return w, [total]


def slerp_coeffs(g: Sequence[float], t: float, dot_threshold: float, eps: float) -> List[float]:
    """slerp over the whole tensor from the 2×2 Gram matrix of (a, b): [c_a, c_b]."""
    na, nb = math.sqrt(g[0]), math.sqrt(g[3])
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = _clamp(g[1] / (na * nb), -1.0, 1.0)
    if abs(dot) > dot_threshold:
        return [1.0 - t, t]
    # a NaN dot (non-finite inputs) lands here and gives NaN coefficients, as the reference
    theta = math.acos(dot) if dot == dot else math.nan
    s = math.sin(theta)
    if s == 0:
        return [math.nan, math.nan]
    return [math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s]


def nuslerp_coeffs(g: Sequence[float], n_vectors: int, t: float, eps: float) -> Tuple[List[float], List[float]]:
    """nuslerp per vector from its 2×2 Gram matrix: (coefficients [c0, c1] per vector, flat;
    divisors, one per vector). Colinear vectors (1 − cos² ≤ eps²) interpolate linearly."""
    coeffs: List[float] = []
    div: List[float] = []
    for v in range(n_vectors):
        g00, g01, g11 = g[4 * v], g[4 * v + 1], g[4 * v + 3]
        n0 = _clamp(_sqrt0(g00), 1e-7)
        n1 = _clamp(_sqrt0(g11), 1e-7)
        cos = _clamp(g01 / (n0 * n1), -1.0, 1.0)
        if (1.0 - cos * cos) <= eps * eps:
            coeffs += (1.0 - t, t)
            div.append(1.0)
        else:
            theta = math.acos(cos) if cos == cos else math.nan
            coeffs += (math.sin((1.0 - t) * theta), math.sin(t * theta))
            div.append(math.sin(theta))
    return coeffs, div


def multislerp_coeffs(g: Sequence[float], weight: Sequence[float], normalize_weights: bool,
                      eps: float) -> List[float]:
    """multislerp: every vector of the reference (the tangent-space mean mapped back to the sphere,
    scaled by the weighted mean norm) in the basis of the N ≥ 2 inputs. ValueError (models) when the
    weighted unit vectors cancel and N > 2."""
    n = len(weight)
    w = [float(x) for x in weight]
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]
    norms = [_sqrt0(g[i * n + i]) for i in range(n)]
    s = [1.0 / (nm + eps) for nm in norms]  # uᵢ = sᵢ·xᵢ
    gu = [g[i * n + j] * s[i] * s[j] for i in range(n) for j in range(n)]  # the Gram matrix of the uᵢ
    mean_norm = _sqrt0(_quad(w, gu, w, n))
    if mean_norm < eps:
        if n != 2:
            raise ValueError("models: the weighted sum of the unit vectors is zero (antipodal inputs whose weights "
                             "cancel); multislerp needs other weights for more than two inputs")
        return w
    mu = [x / mean_norm for x in w]  # m̂ = Σ μᵢ·uᵢ
    dots = _matvec(gu, mu, n)  # uᵢ·m̂
    wd = sum(w[i] * dots[i] for i in range(n))
    r = [w[i] - wd * mu[i] for i in range(n)]  # the tangent Σ wᵢ(uᵢ − (uᵢ·m̂)·m̂) = Σ rᵢ·uᵢ
    rho = _sqrt0(_quad(r, gu, r, n)) + eps
    avg = sum(norms[i] * w[i] for i in range(n))
    c, sr = math.cos(rho), math.sin(rho) / rho
    return [(mu[i] * c + r[i] * sr) * avg * s[i] for i in range(n)]


def karcher_coeffs(g: Sequence[float], n: int, max_iter: int, tol: float) -> List[float]:
    """karcher: the equal-weight Karcher mean of the N ≥ 2 inputs' units (inputs with norm ≤ tol
    left out), scaled by the mean norm of all N, as coefficients of the inputs."""
    norms = [_sqrt0(g[i * n + i]) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    m = len(valid)
    inv = [1.0 / norms[i] for i in valid]
    gu = [g[valid[a] * n + valid[b]] * inv[a] * inv[b] for a in range(m) for b in range(m)]

    def norm_of(c: Sequence[float]) -> float:
        return _sqrt0(_quad(c, gu, c, m))

    a_hat = [1.0 / m] * m  # equal weights over the valid inputs
    mn = norm_of(a_hat)
    c = ([1.0] + [0.0] * (m - 1)) if mn < tol else [x / mn for x in a_hat]
    for _ in range(max_iter):
        tangent = [0.0] * m
        dots = [_clamp(x, -1.0, 1.0) for x in _matvec(gu, c, m)]
        for i in range(m):
            theta = math.acos(dots[i]) if dots[i] == dots[i] else math.nan
            if theta < tol:
                continue
            f = a_hat[i] * (theta / math.sin(theta))
            tangent = [tangent[j] + f * ((1.0 if j == i else 0.0) - dots[i] * c[j]) for j in range(m)]
        tn = norm_of(tangent)
        if tn < tol:
            break
        c = [math.cos(tn) * c[j] + math.sin(tn) * (tangent[j] / tn) for j in range(m)]
        un = norm_of(c)
        if un > tol:
            c = [x / un for x in c]
    scale = sum(norms) / n
    coeffs = [0.0] * n
    for a, i in enumerate(valid):
        coeffs[i] = scale * c[a] * inv[a]
    return coeffs


def ramplus_lambda(shared: Sequence[int], unique: Sequence[int], r: float, alpha: float,
                   epsilon: float) -> List[float]:
    """ramplus_tl's factors λᵢ = 1 + r·clamp(sharedᵢ / max(uniqueᵢ, ε), 0, α), every operation in
    fp32 as mergekit's torch expression on fp32 tensors forms it (its scalars rounded to fp32)."""
    r32, a32, e32 = fp32(r), fp32(alpha), fp32(epsilon)
    out = []
    for s, u in zip(shared, unique):
        rho = fp32(fp32(float(s)) / _clamp(fp32(float(u)), e32))
        out.append(fp32(1.0 + fp32(r32 * _clamp(rho, 0.0, a32))))
    return out


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

def resolve_params(method: str, params: Dict[str, object]) -> Dict[str, object]:
    """`params` with mergekit's defaults filled in (spec.MERGEKIT_METHODS); unknown or missing
    required parameters are a ValueError naming them."""
    if method not in spec.MERGEKIT_METHODS:
        raise ValueError(f"method: expected one of {', '.join(spec.MERGEKIT_METHODS)}, got {method!r}")
    table = spec.MERGEKIT_METHODS[method]
    unknown = sorted(set(params) - set(table))
    if unknown:
        raise ValueError(f"params: unknown parameter(s) for {method}: {', '.join(unknown)} "
                         f"(expected {', '.join(table)})")
    resolved = {}
    for key, default in table.items():
        if key in params:
            resolved[key] = params[key]
        elif default is spec.REQUIRED:
            raise ValueError(f"params: {method} requires {key!r}")
        else:
            resolved[key] = default
    return resolved


def check_real(value, name: str, what: str = "a float") -> float:
    """A Python int or float (not a bool) as a float; TypeError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__}")
    return float(value)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_nonnegative(value, name: str) -> float:
    v = check_real(value, name)
    if not v >= 0:
        raise ValueError(f"{name}: expected a value >= 0, got {v}")
    return v


def check_max_iter(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_iter: expected an int >= 0, got {value!r}")
    return value


def check_weights(value, n: int, name: str = "weight") -> List[float]:
    """n floats, one per model, as a list."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise TypeError(f"{name}: expected a sequence of {n} floats (one per model), got a single number")
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{name}: expected {n} values (one per model), got {value!r}")
    return [check_real(w, f"{name}[{i}]") for i, w in enumerate(value)]


def check_inputs(method: str, has_base: bool, n_models: int) -> None:
    """The base policy and the model count of a mergekit method (as interpolate.merge_tensors checks them)."""
    policy = spec.MERGEKIT_BASE[method]
    if policy == "ignored" and has_base:
        raise ValueError(f"base: {method} treats every input alike (mergekit ignores base_model); pass base=None "
                         "and every input in models")
    if policy == "required" and not has_base:
        raise ValueError(f"base: {method} requires the base model's tensor (the t = 0 end)")
    lo, hi = spec.MERGEKIT_MODEL_COUNT[method]
    if n_models < lo or (hi is not None and n_models > hi):
        count = f"{lo}" if hi == lo else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        raise ValueError(f"models: {method} takes {count} model tensors besides the base, got {n_models}")


def check_params(method: str, p: Dict[str, object], n_models: int) -> None:
    """The scalar parameters of one tensor's merge (resolved: `resolve_params`), with the errors the
    ops of pyops.merging.interpolate raise for them: TypeError / ValueError naming the parameter.
    `n_models`: the inputs besides the base."""
    if method in ("slerp", "nearswap"):
        check_real(p["t"], "t")
    elif method == "nuslerp":
        check_weights(p["weight"], 2)
        check_bool(p["nuslerp_flatten"], "nuslerp_flatten")
        check_bool(p["nuslerp_row_wise"], "nuslerp_row_wise")
    elif method == "multislerp":
        check_weights(p["weight"], n_models)
        check_bool(p["normalize_weights"], "normalize_weights")
        check_real(p["eps"], "eps")
    elif method == "karcher":
        check_max_iter(p["max_iter"])
        check_nonnegative(p["tol"], "tol")
    elif method == "ram":
        check_nonnegative(p["epsilon"], "epsilon")
    elif method == "ramplus_tl":
        check_real(p["r"], "r")
        check_real(p["alpha"], "alpha")
        check_nonnegative(p["epsilon"], "epsilon")
    elif method == "sce":
        check_bool(p["int8_mask"], "params: int8_mask")
        check_real(p["select_topk"], "select_topk")


__all__ = ["check_bool", "check_inputs", "check_max_iter", "check_nonnegative", "check_params", "check_real",
           "check_weights", "dim0_layout", "fp32", "karcher_coeffs", "linear_coeffs", "multislerp_coeffs", "nuslerp_coeffs",
           "nuslerp_layout", "ramplus_lambda", "resolve_params", "rows_layout", "slerp_coeffs", "whole_layout"]
