"""Model merging over task vectors: `pyops.merge` / `pyops.merge_from_models`.

Validation, backend choice and autograd; the definitions of every method are in
`pyops/merging/reference.py`, each backend's glue in backend_cpu.py, backend_triton.py and
backend_cuda.py. Backends:

* ``reference`` — every method, forward and gradients (masks held fixed).
* ``cpu`` — the fused C++ kernels (csrc/merging/): one pass per block after an exact per-block
  magnitude selection (TIES) or a stable radix ranking of |τ| (breadcrumbs, DELLA), Philox masks
  generated in the pass (DARE, DELLA), for every method; model_stock is a Gram pass, then task
  arithmetic (composed here). Backward with the masks held fixed for every method but consensus
  (its mask depends on the coefficients: its gradients come from the reference).
* ``triton`` — pyops.kernels.merging.methods for ties, dare / dare_linear, dare_ties, breadcrumbs
  and della / della_linear on CUDA tensors (CPU tensors under TRITON_INTERPRET=1): exact
  per-block radix selection for TIES, Philox masks in the pass, ranks from a stable device sort
  for breadcrumbs / DELLA. Forward only: a call that needs gradients goes to ``cpu`` (CPU
  tensors) or the reference, with that reason.
* ``cuda`` — hand-written CUDA kernels (csrc/merging/) for every method but model_stock: an exact
  three-digit radix select of the per-block TIES threshold, ranks from a stable device sort for
  breadcrumbs / DELLA, then one combine pass with the Philox masks drawn in it; the C++ kernels'
  bits. Backward with the masks held fixed for every method but consensus (deterministic
  coefficient gradients). First in the GPU order.

method="task_arithmetic" is `pyops.task_arithmetic` with λ folded into the coefficients.
method="breadcrumbs_ties" (spec.EXTRA_METHODS) and ties with exact_k=True run on the reference
and the C++ kernels; Triton and CUDA refuse them in can_run.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from pyops import _backend
from pyops import _validate as V
from pyops.merging import backend_cpu, backend_cuda, backend_triton  # importing them registers their ops
from pyops.merging import reference as ref
from pyops.merging import task_arithmetic as TM
from pyops.merging.spec import check_params

OP = "merge"
METHODS = ref.METHODS
ALIASES = {"dare_linear": "dare"}
# Methods that rank |τ| within each block.
RANKED = ref.RANKED
GPU_ORDER = ("cuda", "triton")


def _can_run(p: TM.Prepared, method: str, needs_grad: bool, exact_k: bool = False) -> dict:
    """Each backend's `can_run` for this call: None, or the reason it cannot run it."""
    return {"reference": lambda: None,
            "cpu": lambda: backend_cpu.merge_reason(p, method, needs_grad, exact_k),
            "cuda": lambda: backend_cuda.merge_reason(p, method, needs_grad, exact_k),
            "triton": lambda: backend_triton.merge_reason(p, method, needs_grad, exact_k)}


# --------------------------------------------------------------------------------------------
# Autograd of the native merge ops (C++ and CUDA): every mask held fixed
# --------------------------------------------------------------------------------------------

def _merge_setup(ctx, inputs, output):
    base, deltas, coeffs, *params, _out_dtype = inputs
    ctx.save_for_backward(base, coeffs, *deltas)
    ctx.params = params
    ctx.need = (base.requires_grad, any(d.requires_grad for d in deltas), coeffs.requires_grad)


def _make_merge_backward(backward_op):
    def backward(ctx, grad):
        base, coeffs, *deltas = ctx.saved_tensors
        need_base, need_deltas, need_coeffs = ctx.need
        gb, gd, gc = backward_op(grad, base, deltas, coeffs, *ctx.params, need_base, need_deltas, need_coeffs)
        return (gb if need_base else None, list(gd) if need_deltas else [None] * len(deltas),
                gc if need_coeffs else None) + (None,) * (len(ctx.params) + 1)
    return backward


for _path in (backend_cpu, backend_cuda):
    _path.merge_op.register_autograd(_make_merge_backward(_path.merge_backward_op), setup_context=_merge_setup)


# --------------------------------------------------------------------------------------------
# model_stock on the C++ kernels: the Gram matrix, then task arithmetic
# --------------------------------------------------------------------------------------------

def _gram_setup(ctx, inputs, output):
    base, deltas, from_models = inputs
    ctx.save_for_backward(base, *deltas)
    ctx.from_models = from_models
    ctx.need_base = from_models and base.requires_grad
    ctx.need = [d.requires_grad for d in deltas]


def _gram_backward(ctx, grad):
    # G = T Tᵀ with T the [N, numel] task vectors: dL/dτ_k = Σ_j (g + gᵀ)[k, j] τ_j.
    base, *deltas = ctx.saved_tensors
    sym = (grad + grad.transpose(0, 1)).to(torch.float32)
    b32 = base.reshape(-1).to(torch.float32)
    taus = [d.reshape(-1).to(torch.float32) - b32 if ctx.from_models else d.reshape(-1).to(torch.float32)
            for d in deltas]
    n = len(taus)
    grad_taus = []
    for k in range(n):
        acc = torch.zeros_like(b32)
        for j in range(n):
            acc = acc + sym[k, j] * taus[j]
        grad_taus.append(acc)
    grad_deltas = [g.view(base.shape).to(base.dtype) if need else None for g, need in zip(grad_taus, ctx.need)]
    grad_base = None
    if ctx.need_base:
        total = torch.zeros_like(b32)
        for g in grad_taus:
            total = total - g
        grad_base = total.view(base.shape).to(base.dtype)
    return grad_base, grad_deltas, None


backend_cpu.gram_op.register_autograd(_gram_backward, setup_context=_gram_setup)


def model_stock_coeffs(gram: Tensor) -> Tensor:
    """t/N per task ([N], fp32) from the Gram matrix, as the reference forms t:
    cos = mean over i<j of clamp(G_ij / max(‖τᵢ‖‖τⱼ‖, 1e-6), −1, 1), t = N·cos / (1 + (N − 1)·cos)."""
    n = gram.shape[0]
    sq = torch.diagonal(gram)
    live = sq > 0
    # ‖τ‖ with the gradient of the reference's norm() at a zero vector (0, not 0·∞ = NaN)
    norms = torch.where(live, torch.sqrt(torch.where(live, sq, torch.ones_like(sq))), torch.zeros_like(sq))
    iu = torch.triu_indices(n, n, offset=1, device=gram.device)
    prods = (norms[:, None] * norms[None, :])[iu[0], iu[1]].clamp_min(1e-6)
    cos = (gram[iu[0], iu[1]] / prods).clamp(-1.0, 1.0).mean()
    t = n * cos / (1 + (n - 1) * cos)
    return (t / n).to(torch.float32).expand(n)


def _model_stock_cpu(p: TM.Prepared, from_models: bool, out: Optional[Tensor]) -> Tensor:
    """θ = base + t·mean(τ): a Gram pass (cos and t exactly as the reference forms them), then
    `pyops.task_arithmetic` on the C++ kernels with coefficients t/N. Gradients reach base and the
    models through t as well (the Gram op's backward), as in the reference."""
    direct = out is not None and _backend.direct()  # the streaming merge: no dispatcher (see direct_kernels)
    gram = (backend_cpu.gram if direct else backend_cpu.gram_op)(p.base, p.deltas, from_models)
    coeffs = model_stock_coeffs(gram)
    fn = TM.task_arithmetic_from_models if from_models else TM.task_arithmetic
    return fn(p.base, p.deltas, coeffs, out=out, out_dtype=p.out_dtype if out is None else None, backend="cpu")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _merge(base, deltas, from_models, *, method, coeffs, blocks, density, seed, lam, name, gamma, epsilon, k,
           tall_lambda, normalize, out, out_dtype, backend, exact_k=False) -> Tensor:
    deltas_name = "finetuned" if from_models else "deltas"
    n_guess = len(deltas) if isinstance(deltas, (list, tuple)) else (deltas.shape[0] if isinstance(deltas, Tensor) and deltas.dim() else 0)
    if method == "model_stock" and (coeffs is not None or lam != 1.0):
        raise ValueError("coeffs: model_stock computes its own interpolation weight; pass coeffs=None and lam=1.0")
    if coeffs is None:
        coeffs = [1.0] * max(n_guess, 0)
    p = TM.prepare(base, deltas, coeffs, blocks, TM._output_dtype(out, out_dtype), deltas_name=deltas_name)
    n = len(p.deltas)
    dens = check_params(method, density, lam, seed, name, gamma, epsilon, k, tall_lambda, normalize, n)
    # k reaches the native ops' int64 schema whatever the method (only consensus reads it)
    V.check_int(k, "k", what=" (consensus: the number of tasks that must agree)")
    if not isinstance(exact_k, bool):
        raise TypeError(f"exact_k: expected a bool, got {type(exact_k).__name__}")
    if exact_k and method != "ties":
        raise ValueError(f"exact_k: only ties selects the k largest |τ| (breadcrumbs and DELLA rank with ties "
                         f"broken by position, already exact counts), got method={method!r}")
    if method == "model_stock" and n < 2:
        raise ValueError(f"{deltas_name}: model_stock needs at least 2 fine-tuned models, got {n}")
    if out is not None:
        out = TM.check_out(out, p, out_dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (p.base, p.coeffs, *p.deltas))
    if out is not None and needs_grad:
        raise RuntimeError(f"{OP}(): out= does not support automatic differentiation (an input requires grad)")
    if method == "task_arithmetic":
        # The pilot op already is the fused kernel, with its own backends and backward; λ folds in.
        fn = TM.task_arithmetic_from_models if from_models else TM.task_arithmetic
        return fn(p.base, p.deltas, p.coeffs * lam, blocks=blocks, out=out, out_dtype=out_dtype, backend=backend)
    chosen = _backend.select(OP, backend, _can_run(p, method, needs_grad, exact_k),
                             _backend.default_order(p.base.device, GPU_ORDER))
    if chosen == "reference":
        if method != "model_stock" and not torch.compiler.is_compiling() and \
                not V.values_readable(p.base, p.coeffs, *p.deltas, out):
            # meta / fake tensors carry shapes only and the reference reads values (per-block
            # thresholds, ranks): the native op's fake kernel gives the result's shape and dtype
            return backend_cpu.run(p, method, dens, from_models=from_models, seed=seed, lam=lam, name=name, k=k,
                                   tall_lambda=tall_lambda, normalize=normalize, gamma=gamma, epsilon=epsilon,
                                   out=out, exact_k=exact_k)
        result = ref.merge(p.base, p.deltas, p.coeffs, method=method, block_size=p.block_size,
                           density=torch.tensor(dens, dtype=torch.float64), lam=lam, seed=seed, name=name,
                           gamma=gamma, epsilon=epsilon, k=k, tall_lambda=tall_lambda, normalize=normalize,
                           from_models=from_models, out_dtype=p.out_dtype if out is None else out.dtype,
                           exact_k=exact_k)
        if out is None:
            return result
        with torch.no_grad():
            return out.copy_(result)
    if chosen == "cuda":
        return backend_cuda.run(p, method, dens, from_models=from_models, seed=seed, lam=lam, name=name, k=k,
                                tall_lambda=tall_lambda, normalize=normalize, gamma=gamma, epsilon=epsilon, out=out)
    if chosen == "triton":
        return backend_triton.run(p, method, dens, from_models=from_models, seed=seed, lam=lam, name=name,
                                  normalize=normalize, gamma=gamma, epsilon=epsilon, out=out)
    if method == "model_stock":
        return _model_stock_cpu(p, from_models, out)
    return backend_cpu.run(p, method, dens, from_models=from_models, seed=seed, lam=lam, name=name, k=k,
                           tall_lambda=tall_lambda, normalize=normalize, gamma=gamma, epsilon=epsilon, out=out,
                           exact_k=exact_k)


def merge(
    base: Tensor,
    deltas: Union[Tensor, Sequence[Tensor]],
    *,
    method: str,
    coeffs: Union[None, Tensor, Sequence[float]] = None,
    blocks: TM.Blocks = None,
    density: Union[float, Sequence[float], Tensor] = 1.0,
    seed: int = 0,
    lam: float = 1.0,
    name: str = "",
    gamma: float = 0.01,
    epsilon: float = 0.1,
    k: int = 2,
    tall_lambda: float = 0.6,
    normalize: Optional[bool] = None,
    out: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    exact_k: bool = False,
) -> Tensor:
    """Merge N task vectors into `base` with one of the methods of `pyops.merging.reference`.

    Args:
        base: `[*shape]` float32 / float16 / bfloat16 (float64 on the reference backend).
        deltas: task vectors τᵢ, `[N, *shape]` or a list of N `[*shape]` tensors.
        method: task_arithmetic | ties | dare | dare_linear | dare_ties | breadcrumbs | della |
            della_linear | model_stock | consensus | breadcrumbs_ties (breadcrumbs' mask, then
            TIES' election; spec.EXTRA_METHODS).
        coeffs: weights wᵢ, `[N]` or `[N, n_blocks]` (default: all ones); not for model_stock.
        blocks: None (whole tensor) | "rows" | int chunk size — the unit of TIES trimming,
            breadcrumbs/DELLA ranking and of `[N, n_blocks]` coefficients.
        density: ρ in (0, 1], one float or one per task (mergekit's per-model `density`).
        seed, name: the Philox key of DARE/DELLA drops: the same (seed, name) gives the same
            masks on every backend, thread count and shard layout.
        lam: global scale λ. gamma: breadcrumbs' dropped top fraction. epsilon: DELLA's spread.
        k, tall_lambda: consensus (TALL masks). normalize: TIES-style disjoint mean (default:
            True for ties, dare_ties, della).
        out, out_dtype, backend: as in `pyops.task_arithmetic`.
        exact_k: ties only. False (default): every entry tied with the k-th largest |τ| of a
            block is kept (deterministic, may keep more than k). True: exactly k, the ties at the
            k-th magnitude taken by lowest flat index first (mergekit's top-k keeps exactly k, in
            an unspecified tie order). Backends: reference and cpu (Triton and CUDA refuse it).

    Gradients reach coeffs (and base, deltas) with every mask held fixed.
    """
    return _merge(base, deltas, False, method=method, coeffs=coeffs, blocks=blocks, density=density, seed=seed,
                  lam=lam, name=name, gamma=gamma, epsilon=epsilon, k=k, tall_lambda=tall_lambda,
                  normalize=normalize, out=out, out_dtype=out_dtype, backend=backend, exact_k=exact_k)


def merge_from_models(
    base: Tensor,
    finetuned: Union[Tensor, Sequence[Tensor]],
    *,
    method: str,
    coeffs: Union[None, Tensor, Sequence[float]] = None,
    blocks: TM.Blocks = None,
    density: Union[float, Sequence[float], Tensor] = 1.0,
    seed: int = 0,
    lam: float = 1.0,
    name: str = "",
    gamma: float = 0.01,
    epsilon: float = 0.1,
    k: int = 2,
    tall_lambda: float = 0.6,
    normalize: Optional[bool] = None,
    out: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    exact_k: bool = False,
) -> Tensor:
    """`merge` taking fine-tuned weights θᵢ; τᵢ = θᵢ − base is formed on the fly, never stored."""
    return _merge(base, finetuned, True, method=method, coeffs=coeffs, blocks=blocks, density=density, seed=seed,
                  lam=lam, name=name, gamma=gamma, epsilon=epsilon, k=k, tall_lambda=tall_lambda,
                  normalize=normalize, out=out, out_dtype=out_dtype, backend=backend, exact_k=exact_k)
