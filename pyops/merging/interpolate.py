"""mergekit 0.1.5's methods beyond task arithmetic as ops: the interpolating `linear`, `slerp`,
`nearswap`, `passthrough`, `nuslerp`, `multislerp`, `karcher`; the selective `ram`,
`ramplus_tl`, `sce`, `arcee_fusion` (C++ and reference); and `merge_tensors`, the
per-tensor entry the checkpoint runner calls (which also runs `breadcrumbs_ties` through
`pyops.merge_from_models`).

Each op takes the tensors the way its mergekit method takes the models' copies of one weight,
with mergekit's parameter names and defaults (`pyops.merging.spec.MERGEKIT_METHODS`), computes
in fp32 (fp64 for fp64 inputs) and rounds once to the output dtype (default: the inputs'
dtype). The definitions are in `pyops/merging/reference.py`. Backends:

* ``cpu`` — the interpolating methods on the C++ kernels (csrc/merging/interpolate.cpp): a
  Gram pass per vector (fp32 values, products summed in double over fixed chunks), the method's
  few scalars (norms, angles, the Karcher iteration) in double from the Gram matrix, then one
  combine pass [base +] Σᵢ cᵢ·xᵢ [/ d] in fp32; nearswap is one per-element pass. Forward only,
  CPU tensors in fp32 / fp16 / bf16. ram and ramplus_tl: per-element passes (ramplus_tl's
  per-task counts first). sce and arcee_fusion: whole-tensor passes with exact order statistics
  (csrc/merging/fusion.cpp). Registered ops
  ``pyops::{linear,slerp,nearswap,nuslerp,multislerp,karcher,ram,ramplus_tl,sce,arcee_fusion}_cpu``.
* ``triton`` — the interpolating methods on CUDA tensors (CPU tensors under TRITON_INTERPRET=1):
  the Gram matrix from torch (fp32 values, fp64 products and sums), the same scalars in double
  as the C++ path (`registry.interp_*`), one Triton combine pass in the C++ kernels' fp32
  arithmetic (pyops.kernels.merging.interpolate); nearswap is one per-element pass. Forward
  only, fp32 / fp16 / bf16. Registered ops
  ``pyops::{linear,slerp,nearswap,scale,nuslerp,multislerp,karcher}_triton``. First for CUDA
  tensors; ram and ramplus_tl have no Triton kernels.
* ``reference`` — every case, including fp64, CUDA tensors and gradients: a call that needs
  gradients (an input requires grad, or a tensor-valued `t` / `weight`) is refused by the C++
  path's `can_run` and taken by the reference, whose torch ops carry autograd (the branches —
  colinear fallbacks, the Karcher iteration count — are taken on the values, as mergekit does).

The C++ path reaches the reference's values to fp32 rounding; where a branch is decided on a
value within rounding of its threshold (slerp's dot_threshold, nuslerp's colinear test), the two
may take different branches, whose results then differ by that rounding's effect. Between nearly
antipodal vectors slerp itself is ill-conditioned (sin θ → 0 divides): there the C++ path's
double-precision angle is the more accurate, and the fp32 reference may differ from it beyond
fp32 rounding.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from pyops import _backend
from pyops.merging import backend_cpu, backend_triton
from pyops.merging import reference as ref
from pyops.merging import spec
from pyops.merging import interp_scalars as S
from pyops.merging.interp_scalars import check_inputs, resolve_params

Weights = Union[Sequence[float], Tensor]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _check_tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float16, bfloat16 or float64, got {x.dtype}")
    return x


def _check_like(x: Tensor, first: Tensor, name: str, first_name: str) -> None:
    if x.shape != first.shape:
        raise ValueError(f"{name}: expected shape {list(first.shape)} ({first_name}'s), got {list(x.shape)}")
    if x.dtype != first.dtype:
        raise ValueError(f"{name}: expected dtype {first.dtype} ({first_name}'s), got {x.dtype}")
    if x.device != first.device:
        raise ValueError(f"{name}: expected device {first.device} ({first_name}'s), got {x.device}")


def _check_models(models, lo: int, hi: Optional[int], method: str) -> List[Tensor]:
    if isinstance(models, Tensor):
        models = list(models.unbind(0)) if models.dim() > 0 else [models]
    if not isinstance(models, (list, tuple)):
        raise TypeError(f"models: expected a list of tensors, got {type(models).__name__}")
    count = f"{lo}" if hi == lo else f"at least {lo}" if hi is None else f"{lo} to {hi}"
    if len(models) < lo or (hi is not None and len(models) > hi):
        raise ValueError(f"models: {method} takes {count} tensors, got {len(models)}")
    models = [_check_tensor(m, f"models[{i}]") for i, m in enumerate(models)]
    for i, m in enumerate(models[1:], 1):
        _check_like(m, models[0], f"models[{i}]", "models[0]")
    return models


_check_real, _check_bool = S.check_real, S.check_bool


def _check_scalar(value, name: str):
    """A float, or a 0-d floating tensor (kept: it may carry gradients)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"{name}: expected a float or a 0-d floating tensor, got shape {list(value.shape)} "
                             f"{value.dtype}")
        return value
    return _check_real(value, name)


def _check_weights(weight, n: int, name: str = "weight"):
    """n floats, or a [n] floating tensor (kept: it may carry gradients)."""
    if isinstance(weight, Tensor):
        if tuple(weight.shape) != (n,) or not weight.is_floating_point():
            raise ValueError(f"{name}: expected {n} values (one per model), got shape {list(weight.shape)} "
                             f"{weight.dtype}")
        return weight
    return S.check_weights(weight, n, name)


def _check_out_dtype(out_dtype, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected None or a floating dtype, got {out_dtype!r}")
    return out_dtype


def _choose(op: str, backend: str, tensors: Sequence[Tensor], out_dtype: torch.dtype, scalars=(),
            triton: bool = True) -> str:
    """The backend for one call: the C++ kernels (CPU tensors) or the Triton kernels (CUDA
    tensors; `triton` says whether the op has them) when they can take it, else the reference."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    tensor_params = any(isinstance(s, Tensor) for s in scalars)

    def native(reason_fn):
        def reason():
            why = reason_fn(tensors[0], out_dtype, needs_grad)
            if why is None and tensor_params:
                return "a tensor-valued parameter (t / weight / scale) is taken by the reference backend"
            return why
        return reason

    can_run = {"reference": lambda: None, "cpu": native(backend_cpu.interpolate_reason)}
    if triton:
        can_run["triton"] = native(backend_triton.interpolate_reason)
    return _backend.select(op, backend, can_run, _backend.default_order(tensors[0].device, ("triton",)))


def _floats(w) -> List[float]:
    return [float(x) for x in w]


def _path(chosen: str):
    """The module holding the registered ops of the chosen native backend."""
    return backend_triton if chosen == "triton" else backend_cpu


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------

def linear(models: Union[Sequence[Tensor], Tensor], weight: Weights, *, normalize: bool = True,
           out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """mergekit's ``linear`` (a weighted average, Wortsman et al., "Model soups", ICML 2022):
    Σᵢ wᵢ·θᵢ, divided by Σᵢ wᵢ when `normalize` (mergekit's default True; a zero sum divides by
    zero, as mergekit does: ±inf / NaN).

    Args:
        models: N ≥ 1 tensors `[*shape]` (a list, or one `[N, *shape]` tensor) of one dtype
            (fp32 / fp16 / bf16 / fp64) and device.
        weight: N floats, or a `[N]` tensor (then differentiable, on the reference backend).
        normalize, out_dtype (default the models' dtype), backend ("auto", "cpu", "triton", "reference").

    Returns `[*shape]` in out_dtype, fp32 accumulation, one rounding. Differentiable in every
    tensor (the reference backend takes calls that need gradients)."""
    models = _check_models(models, 1, None, "linear")
    weight = _check_weights(weight, len(models))
    normalize = _check_bool(normalize, "normalize")
    od = _check_out_dtype(out_dtype, models[0].dtype)
    tensors = models + ([weight] if isinstance(weight, Tensor) else [])
    chosen = _choose("linear", backend, tensors, od, [weight])
    if chosen != "reference":
        return _path(chosen).linear_op(models, _floats(weight), normalize, od)
    return ref.linear(models, weight, normalize=normalize, out_dtype=od)


def slerp(a: Tensor, b: Tensor, t, *, dot_threshold: float = 0.9995, eps: float = 1e-8,
          out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """mergekit's ``slerp``: spherical interpolation over the whole flattened tensor from `a`
    (the base, t = 0) to `b` (t = 1), linear when |cos| > dot_threshold (colinear or antipodal).

    Args:
        a, b: `[*shape]`, one dtype (fp32 / fp16 / bf16 / fp64) and device.
        t: the interpolation parameter for this tensor (mergekit's per-tensor `t`): a float, or a
            0-d tensor (then differentiable, on the reference backend).
        dot_threshold, eps: mergekit's slerp() constants (norms ≤ eps count as 1).
        out_dtype (default a's dtype), backend ("auto", "cpu", "triton", "reference").

    Returns `[*shape]` in out_dtype, fp32 arithmetic, one rounding (see reference.slerp)."""
    a = _check_tensor(a, "a")
    b = _check_tensor(b, "b")
    _check_like(b, a, "b", "a")
    t = _check_scalar(t, "t")
    dot_threshold = _check_real(dot_threshold, "dot_threshold")
    eps = _check_real(eps, "eps")
    od = _check_out_dtype(out_dtype, a.dtype)
    tensors = [a, b] + ([t] if isinstance(t, Tensor) else [])
    chosen = _choose("slerp", backend, tensors, od, [t])
    if chosen != "reference":
        return _path(chosen).slerp_op(a, b, float(t), dot_threshold, eps, od)
    return ref.slerp(a, b, t, dot_threshold=dot_threshold, eps=eps, out_dtype=od)


def nearswap(base: Tensor, model: Tensor, t, *, out_dtype: Optional[torch.dtype] = None,
             backend: str = "auto") -> Tensor:
    """mergekit's ``nearswap``: per element, w = clamp(t / max(|base − model|, 1e-6), 0, 1),
    out = w·model + (1 − w)·base.

    Args:
        base, model: `[*shape]`, one dtype and device. t: a float (or a 0-d tensor: reference).
        out_dtype (default base's dtype), backend ("auto", "cpu", "triton", "reference").

    Returns `[*shape]` in out_dtype, fp32 arithmetic, one rounding."""
    base = _check_tensor(base, "base")
    model = _check_tensor(model, "model")
    _check_like(model, base, "model", "base")
    t = _check_scalar(t, "t")
    od = _check_out_dtype(out_dtype, base.dtype)
    tensors = [base, model] + ([t] if isinstance(t, Tensor) else [])
    chosen = _choose("nearswap", backend, tensors, od, [t])
    if chosen != "reference":
        return _path(chosen).nearswap_op(base, model, float(t), od)
    return ref.nearswap(base, model, t, out_dtype=od)


def passthrough(x: Tensor, scale=None, *, out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """mergekit's ``passthrough``: the tensor, times `scale` when one is given (default None).

    x `[*shape]`; scale None, a float or a 0-d tensor (reference). Returns a new `[*shape]`
    tensor in out_dtype (default x's dtype), fp32 arithmetic, one rounding."""
    x = _check_tensor(x, "x")
    if scale is not None:
        scale = _check_scalar(scale, "scale")
    od = _check_out_dtype(out_dtype, x.dtype)
    tensors = [x] + ([scale] if isinstance(scale, Tensor) else [])
    chosen = _choose("passthrough", backend, tensors, od, [scale])
    if chosen == "cpu" and scale is not None:
        return backend_cpu.linear_op([x], [float(scale)], False, od)
    if chosen == "triton" and scale is not None:
        return backend_triton.scale_op(x, float(scale), od)
    if chosen != "reference":  # a copy, rounded once: no kernel needed
        return x.to(od, copy=True)
    return ref.passthrough(x, scale, out_dtype=od)


def nuslerp(models: Union[Sequence[Tensor], Tensor], weight: Weights, *, base: Optional[Tensor] = None,
            nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False, eps: float = 1e-8,
            out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """mergekit's ``nuslerp``: slerp of two models with t = w₁/(w₀ + w₁) (0.5 when
    |w₀ + w₁| < 1e-6), of their task vectors from `base` when one is given (the result then
    added to base), over the whole tensor (nuslerp_flatten, default True), each row of the last
    dimension, or each vector along dim 0 (nuslerp_row_wise, default False).

    Args:
        models: 2 tensors `[*shape]`. weight: their 2 weights (floats; mergekit's per-model
            `weight`). base: None or `[*shape]`. eps: mergekit's nuslerp() colinear threshold.
        out_dtype (default the models' dtype), backend ("auto", "cpu", "triton", "reference").

    Returns `[*shape]` in out_dtype, fp32 arithmetic, one rounding (mergekit 0.1.5 computes in
    the input dtype)."""
    models = _check_models(models, 2, 2, "nuslerp")
    weight = _check_weights(weight, 2)
    if isinstance(weight, Tensor):
        raise TypeError("weight: nuslerp takes 2 floats (t = w₁/(w₀ + w₁) is not differentiated)")
    if base is not None:
        _check_tensor(base, "base")
        _check_like(base, models[0], "base", "models[0]")
    nuslerp_flatten = _check_bool(nuslerp_flatten, "nuslerp_flatten")
    nuslerp_row_wise = _check_bool(nuslerp_row_wise, "nuslerp_row_wise")
    eps = _check_real(eps, "eps")
    od = _check_out_dtype(out_dtype, models[0].dtype)
    tensors = models + ([base] if base is not None else [])
    chosen = _choose("nuslerp", backend, tensors, od)
    if chosen != "reference":
        return _path(chosen).nuslerp_op(models[0], models[1], base, spec.nuslerp_t(weight), nuslerp_flatten,
                                        nuslerp_row_wise, eps, od)
    return ref.nuslerp(models[0], models[1], weight, base=base, nuslerp_flatten=nuslerp_flatten,
                       nuslerp_row_wise=nuslerp_row_wise, eps=eps, out_dtype=od)


def multislerp(models: Union[Sequence[Tensor], Tensor], weight: Weights, *, base: Optional[Tensor] = None,
               normalize_weights: bool = True, eps: float = 1e-8, out_dtype: Optional[torch.dtype] = None,
               backend: str = "auto") -> Tensor:
    """mergekit's ``multislerp``: barycentric interpolation of N ≥ 1 models on the hypersphere
    (of their task vectors from `base` when given), see reference.multislerp.

    Args:
        models: N tensors `[*shape]`. weight: N floats or a `[N]` tensor (reference).
        base: None or `[*shape]`. normalize_weights (default True), eps (default 1e-8).
        out_dtype (default the models' dtype), backend ("auto", "cpu", "triton", "reference").

    Returns `[*shape]` in out_dtype. N = 1 returns a copy of the model (mergekit ignores base and
    weight then). Raises ValueError (models) when the weighted unit vectors cancel and N > 2."""
    models = _check_models(models, 1, None, "multislerp")
    weight = _check_weights(weight, len(models))
    if base is not None:
        _check_tensor(base, "base")
        _check_like(base, models[0], "base", "models[0]")
    normalize_weights = _check_bool(normalize_weights, "normalize_weights")
    eps = _check_real(eps, "eps")
    od = _check_out_dtype(out_dtype, models[0].dtype)
    tensors = models + ([base] if base is not None else []) + ([weight] if isinstance(weight, Tensor) else [])
    chosen = _choose("multislerp", backend, tensors, od, [weight])
    if chosen != "reference":
        return _path(chosen).multislerp_op(models, _floats(weight), base, normalize_weights, eps, od)
    return ref.multislerp(models, weight, base=base, normalize_weights=normalize_weights, eps=eps, out_dtype=od)


def karcher(models: Union[Sequence[Tensor], Tensor], *, max_iter: int = 10, tol: float = 1e-5,
            out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """mergekit's ``karcher``: the equal-weight Karcher mean of N ≥ 1 tensors on the unit sphere,
    scaled by their mean norm (see reference.karcher).

    Args:
        models: N tensors `[*shape]` (every input alike; mergekit ignores base_model here).
        max_iter: iterations (default 10, ≥ 0). tol: convergence / zero-norm tolerance (1e-5, ≥ 0).
        out_dtype (default the models' dtype), backend ("auto", "cpu", "triton", "reference").

    Returns `[*shape]` in out_dtype."""
    models = _check_models(models, 1, None, "karcher")
    S.check_max_iter(max_iter)
    tol = S.check_nonnegative(tol, "tol")
    od = _check_out_dtype(out_dtype, models[0].dtype)
    chosen = _choose("karcher", backend, models, od)
    if chosen != "reference":
        return _path(chosen).karcher_op(models, max_iter, tol, od)
    return ref.karcher(models, max_iter=max_iter, tol=tol, out_dtype=od)


# --------------------------------------------------------------------------------------------
# The selective methods (ram, ramplus_tl, sce, arcee_fusion): the C++ kernels and the reference
# --------------------------------------------------------------------------------------------

def _check_backend(backend: str) -> None:
    """No models: the result is base (rounded to out_dtype) on any backend."""
    _backend.check_backend_name(backend)


def _check_base_and_models(base, models, lo: int, hi: Optional[int], method: str) -> tuple[Tensor, List[Tensor]]:
    base = _check_tensor(base, "base")
    if isinstance(models, Tensor) or not isinstance(models, (list, tuple)):
        raise TypeError(f"models: expected a list of tensors, got {type(models).__name__}")
    if len(models) < lo or (hi is not None and len(models) > hi):
        raise ValueError(f"models: {method} takes {'at least ' if hi is None else ''}{lo} tensors, got {len(models)}")
    models = [_check_tensor(m, f"models[{i}]") for i, m in enumerate(models)]
    for i, m in enumerate(models):
        _check_like(m, base, f"models[{i}]", "base")
    return base, models


def ram(base: Tensor, models: Sequence[Tensor], *, epsilon: float = 1e-5, out_dtype: Optional[torch.dtype] = None,
        backend: str = "auto") -> Tensor:
    """mergekit's ``ram`` (Reinforced Agent Merging): per element, the mean of the task vectors
    with |τᵢ| > epsilon (one contributor is taken whole); see reference.ram.

    base `[*shape]`, models N ≥ 0 × `[*shape]` (one dtype and device); epsilon (1e-5, ≥ 0).
    Returns `[*shape]` in out_dtype (default base's dtype), fp32 arithmetic, one rounding.
    Backends: cpu (one per-element pass, forward only), reference (differentiable, masks held
    fixed)."""
    base, models = _check_base_and_models(base, models, 0, None, "ram")
    epsilon = S.check_nonnegative(epsilon, "epsilon")
    od = _check_out_dtype(out_dtype, base.dtype)
    if models and _choose("ram", backend, [base, *models], od, triton=False) == "cpu":
        return backend_cpu.ram_op(base, models, epsilon, od)
    if not models:
        _check_backend(backend)
    return ref.ram(base, models, epsilon=epsilon, out_dtype=od)


def ramplus_tl(base: Tensor, models: Sequence[Tensor], *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """mergekit's ``ramplus_tl`` (tensor-local RAM+): ``ram`` with each model's unique entries
    scaled by 1 + r·clamp(shared/unique, 0, alpha); see reference.ramplus_tl.

    base `[*shape]`, models N ≥ 0 × `[*shape]`; r (0.1), alpha (0.2), epsilon (1e-5, ≥ 0).
    Returns `[*shape]` in out_dtype (default base's dtype). Backends: cpu (a counting pass, then
    one per-element pass; forward only), reference (differentiable)."""
    base, models = _check_base_and_models(base, models, 0, None, "ramplus_tl")
    r = _check_real(r, "r")
    alpha = _check_real(alpha, "alpha")
    epsilon = S.check_nonnegative(epsilon, "epsilon")
    od = _check_out_dtype(out_dtype, base.dtype)
    if models and _choose("ramplus_tl", backend, [base, *models], od, triton=False) == "cpu":
        return backend_cpu.ramplus_tl_op(base, models, r, alpha, epsilon, od)
    if not models:
        _check_backend(backend)
    return ref.ramplus_tl(base, models, r=r, alpha=alpha, epsilon=epsilon, out_dtype=od)


def sce(base: Tensor, models: Sequence[Tensor], *, select_topk: float = 1.0, out_dtype: Optional[torch.dtype] = None,
        backend: str = "auto") -> Tensor:
    """mergekit's ``sce`` (FuseChat's Select–Calculate–Erase): keep the select_topk fraction of
    the highest-variance elements, weight each task by its mean square, erase the minority signs;
    see reference.sce.

    base `[*shape]`, models N ≥ 0 × `[*shape]`; select_topk (1.0: keep all). Returns `[*shape]`
    in out_dtype (default base's dtype). Backends: cpu (csrc/merging/fusion.cpp: a variance pass
    with an exact radix select of the top k, a pass for the weights, one combine pass; forward
    only, fp32 / fp16 / bf16), reference (fp64, other devices, gradients)."""
    base, models = _check_base_and_models(base, models, 0, None, "sce")
    select_topk = _check_real(select_topk, "select_topk")
    od = _check_out_dtype(out_dtype, base.dtype)
    if models and _choose("sce", backend, [base, *models], od, triton=False) == "cpu":
        return backend_cpu.sce_op(base, models, select_topk, od)
    if not models:
        _check_backend(backend)
    return ref.sce(base, models, select_topk=select_topk, out_dtype=od)


def arcee_fusion(base: Tensor, model: Tensor, *, out_dtype: Optional[torch.dtype] = None,
                 backend: str = "auto") -> Tensor:
    """mergekit's ``arcee_fusion``: the model's change where its KL-weighted importance is an
    upper outlier (≥ median + 1.5·IQR, exact order statistics); see reference.arcee_fusion.

    base, model `[*shape]` (at least 1-d; an empty tensor gives an empty result). Returns
    `[*shape]` in out_dtype (default base's dtype). Backends: cpu (csrc/merging/fusion.cpp: an
    importance pass per row, exact quartiles by radix select, one combine pass; forward only,
    fp32 / fp16 / bf16), reference (fp64, other devices, gradients)."""
    base, (model,) = _check_base_and_models(base, [model], 1, 1, "arcee_fusion")
    if base.dim() == 0:
        raise ValueError("base: arcee_fusion takes softmaxes over the last dimension, got a 0-d tensor")
    od = _check_out_dtype(out_dtype, base.dtype)
    if base.numel() == 0:  # no order statistics to take (mergekit's indexing fails): the empty result
        _check_backend(backend)
        return base.to(od, copy=True)
    if _choose("arcee_fusion", backend, [base, model], od, triton=False) == "cpu":
        return backend_cpu.arcee_fusion_op(base, model, od)
    return ref.arcee_fusion(base, model, out_dtype=od)


def _per_model(value, n: int, name: str) -> List[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"params: {name}: expected {n} values (one per model), got {len(value)}")
        return [_check_real(v, f"params: {name}[{i}]") for i, v in enumerate(value)]
    return [_check_real(value, f"params: {name}")] * n


def _breadcrumbs_ties(base: Tensor, models: List[Tensor], p: Dict[str, object], out_dtype: torch.dtype,
                      backend: str) -> Tensor:
    """mergekit's breadcrumbs_ties through `pyops.merge_from_models` (method "breadcrumbs_ties")."""
    from pyops.merging.merge import merge_from_models  # the task-vector family's op

    n = len(models)
    gammas = _per_model(p["gamma"], n, "gamma")
    if len(set(gammas)) > 1:
        raise ValueError(f"params: gamma: pyops applies one gamma per tensor, got different values per model {gammas}")
    if p["rescale"]:
        raise ValueError("params: rescale: breadcrumbs_ties keeps entries unscaled in pyops (mergekit's rescale: true "
                         "rescales by an L1-norm ratio)")
    _check_bool(p["normalize"], "params: normalize")
    return merge_from_models(base, models, method="breadcrumbs_ties", coeffs=_per_model(p["weight"], n, "weight"),
                             density=_per_model(p["density"], n, "density"), gamma=gammas[0],
                             lam=_check_real(p["lambda"], "params: lambda"), normalize=p["normalize"],
                             out_dtype=out_dtype, backend=backend)


# --------------------------------------------------------------------------------------------
# The checkpoint runner's entry: one tensor, parameters resolved
# --------------------------------------------------------------------------------------------

def merge_tensors(method: str, base: Optional[Tensor], models: Sequence[Tensor], params: Dict[str, object],
                  out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """One tensor of a checkpoint merge with one of mergekit 0.1.5's methods beyond task arithmetic.

    Args:
        method: a key of `spec.MERGEKIT_METHODS` (linear, slerp, nearswap, passthrough, nuslerp,
            multislerp, karcher, breadcrumbs_ties — through `pyops.merge_from_models`, int8_mask
            accepted and ignored: it changes no value —, ram, ramplus_tl, sce, arcee_fusion).
        base: the base model's tensor, or None. By `spec.MERGEKIT_BASE[method]`: "required"
            (slerp, nearswap: the t = 0 end), "optional" (nuslerp, multislerp: task vectors from
            it when given), "ignored" (linear, passthrough, karcher: must be None — every input
            is in `models`, in mergekit's order).
        models: the other inputs' tensors `[*shape]`, counts per `spec.MERGEKIT_MODEL_COUNT`.
        params: the method's parameters for this tensor, already resolved (gradients, filters):
            names and defaults of `spec.MERGEKIT_METHODS[method]`; the per-model ones
            (`spec.MERGEKIT_PER_MODEL`) as one value per entry of `models` (passthrough's
            `scale`: one value or a 1-list).
        out_dtype: the output dtype (default: the inputs' promoted dtype).
        backend: "auto", "cpu" or "reference".

    Inputs of different dtypes are promoted to a common dtype first, as mergekit promotes a
    group (e.g. a bf16 base with fp32 models computes and returns fp32).
    """
    p = resolve_params(method, dict(params))
    if not isinstance(models, (list, tuple)):
        raise TypeError(f"models: expected a list of tensors, got {type(models).__name__}")
    check_inputs(method, base is not None, len(models))
    tensors = ([base] if base is not None else []) + list(models)
    for i, x in enumerate(tensors):
        _check_tensor(x, "base" if base is not None and i == 0 else f"models[{i - (base is not None)}]")
    dtype = tensors[0].dtype
    for x in tensors[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    tensors = [x.to(dtype) for x in tensors]
    base = tensors[0] if base is not None else None
    models = tensors[1:] if base is not None else tensors
    od = out_dtype or dtype
    if method == "linear":
        return linear(models, p["weight"], normalize=p["normalize"], out_dtype=od, backend=backend)
    if method == "slerp":
        return slerp(base, models[0], p["t"], out_dtype=od, backend=backend)
    if method == "nearswap":
        return nearswap(base, models[0], p["t"], out_dtype=od, backend=backend)
    if method == "passthrough":
        scale = p["scale"]
        if isinstance(scale, (list, tuple)):
            if len(scale) != 1:
                raise ValueError(f"params: passthrough's scale: expected one value, got {scale!r}")
            scale = scale[0]
        return passthrough(models[0], scale, out_dtype=od, backend=backend)
    if method == "nuslerp":
        return nuslerp(models, p["weight"], base=base, nuslerp_flatten=p["nuslerp_flatten"],
                       nuslerp_row_wise=p["nuslerp_row_wise"], out_dtype=od, backend=backend)
    if method == "multislerp":
        return multislerp(models, p["weight"], base=base, normalize_weights=p["normalize_weights"], eps=p["eps"],
                          out_dtype=od, backend=backend)
    if method == "breadcrumbs_ties":
        return _breadcrumbs_ties(base, models, p, od, backend)
    if method == "ram":
        return ram(base, models, epsilon=p["epsilon"], out_dtype=od, backend=backend)
    if method == "ramplus_tl":
        return ramplus_tl(base, models, r=p["r"], alpha=p["alpha"], epsilon=p["epsilon"], out_dtype=od,
                          backend=backend)
    if method == "sce":
        _check_bool(p["int8_mask"], "params: int8_mask")
        return sce(base, models, select_topk=p["select_topk"], out_dtype=od, backend=backend)
    if method == "arcee_fusion":
        return arcee_fusion(base, models[0], out_dtype=od, backend=backend)
    return karcher(models, max_iter=p["max_iter"], tol=p["tol"], out_dtype=od, backend=backend)


__all__ = ["arcee_fusion", "karcher", "linear", "merge_tensors", "multislerp", "nearswap", "nuslerp", "passthrough",
           "ram", "ramplus_tl", "resolve_params", "sce", "slerp"]
