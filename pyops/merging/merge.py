"""Model merging over task vectors: `pyops.merge` / `pyops.merge_from_models`.

The definitions of every method are in `pyops/reference/merge.py`. Backends:
* ``reference`` — every method, forward and gradients (masks held fixed).
* ``cpu`` — the fused C++ kernels (`csrc/cpu/merge_kernels.cpp`): one pass per block after an
  exact per-block magnitude selection (TIES) or a stable radix ranking of |τ| (breadcrumbs,
  DELLA; `csrc/cpu/block_rank.h`), Philox masks generated in the pass (DARE, DELLA), for every
  method (model_stock: a Gram pass, then task arithmetic). Backward with the masks held fixed
  for every method but consensus (its mask depends on the coefficients: its gradients come from
  the reference).
* ``triton`` — kernels/merge.py (`pyops/ops/merge_triton.py`) for ties, dare / dare_linear,
  dare_ties, breadcrumbs and della / della_linear on CUDA tensors (CPU tensors under
  TRITON_INTERPRET=1): exact per-block radix selection for TIES, Philox masks in the pass,
  ranks from a stable device sort for breadcrumbs / DELLA. Forward only: a call that needs
  gradients goes to ``cpu`` (CPU tensors) or the reference, with that reason.
* ``cuda`` — hand-written CUDA kernels (`csrc/cuda/merge_kernels.cuh`, `pyops/ops/merge_cuda.py`)
  for every method but model_stock: an exact three-digit radix select of the per-block TIES
  threshold, ranks from a stable device sort for breadcrumbs / DELLA, then one combine pass with
  the Philox masks drawn in it; the C++ kernels' bits. Backward with the masks held fixed for every
  method but consensus (deterministic coefficient gradients). First in the GPU order.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from pyops import _backend, _native
from pyops._triton import triton_family_reason
from pyops.merging import backend_cuda as merge_cuda  # the CUDA path (its ops register without a GPU)
from pyops.merging import backend_cpu as merge_native  # the C++ path; importing registers its ops before any tracing
from pyops.merging import backend_triton as merge_triton  # the Triton path (its ops register without importing Triton)
from pyops.merging import task_arithmetic as TM
from pyops.merging.spec import check_params
from pyops.merging import reference as ref

OP = "merge"
METHODS = ref.METHODS
ALIASES = {"dare_linear": "dare"}
# Methods that rank |τ| within each block (the C++ kernels sort; see csrc/cpu/block_rank.h).
RANKED = ref.RANKED
# Method codes of the C++ kernel (csrc/cpu/merge.h).
NATIVE_METHODS = merge_native.METHOD_CODES


def _can_run(p: TM.Prepared, method: str, needs_grad: bool) -> dict:
    dev = p.base.device
    dtype_reason = _native.native_dtype_reason(p.base, torch.empty(0, dtype=p.out_dtype))

    def cpu() -> Optional[str]:
        if _native.cpu_module is None:
            return _native.cpu_missing_reason
        if not hasattr(_native.cpu_module, "merge_forward"):
            return "pyops._C was built without the merge kernels"
        if dev.type != "cpu":
            return f"tensors are on {dev.type}, the C++ kernels take CPU tensors"
        if method not in NATIVE_METHODS and method != "model_stock":
            return f"the C++ kernels do not implement {method!r}"
        if method in RANKED and min(p.block_size, p.base.numel()) >= 2**32:
            return f"the C++ kernels rank blocks of fewer than 2**32 elements ({method!r})"
        if needs_grad and method == "consensus":
            return f"gradients for {method!r} are computed by the reference backend"
        return dtype_reason

    def triton() -> Optional[str]:
        reason = triton_family_reason(dev, "merging.methods")
        if reason is not None:
            return reason
        if method not in merge_triton.METHOD_CODES:
            return (f"the Triton kernels implement {', '.join(merge_triton.METHODS)}, not {method!r}")
        if needs_grad:
            return "the Triton merge kernels are forward only (gradients: the cpu or reference backend)"
        if method in RANKED and min(p.block_size, p.base.numel()) >= 2**31:
            return f"the Triton kernels rank blocks of fewer than 2**31 elements (int32 ranks; {method!r})"
        return dtype_reason

    def cuda() -> Optional[str]:
        if _native.cuda_module is None:
            return _native.cuda_missing_reason
        if not hasattr(_native.cuda_module, "merge_forward"):
            return "pyops._C_cuda was built without the merge kernels"
        if dev.type != "cuda":
            return f"tensors are on {dev.type}, the CUDA kernels take CUDA tensors"
        if method not in merge_cuda.METHOD_CODES:
            return f"the CUDA kernels implement {', '.join(merge_cuda.METHODS)}, not {method!r}"
        if needs_grad and method == "consensus":
            return f"gradients for {method!r} are computed by the reference backend"
        if method == "ties" and min(p.block_size, p.base.numel()) >= 2**32:
            return "the CUDA TIES selection counts blocks of fewer than 2**32 elements"
        if method in RANKED and min(p.block_size, p.base.numel()) >= 2**31:
            return f"the CUDA kernels rank blocks of fewer than 2**31 elements (int32 ranks; {method!r})"
        return dtype_reason

    return {"reference": lambda: None, "cpu": cpu, "cuda": cuda, "triton": triton}


def _merge(base, deltas, from_models, *, method, coeffs, blocks, density, seed, lam, name, gamma, epsilon, k,
           tall_lambda, normalize, out, out_dtype, backend) -> Tensor:
    deltas_name = "finetuned" if from_models else "deltas"
    n_guess = len(deltas) if isinstance(deltas, (list, tuple)) else (deltas.shape[0] if isinstance(deltas, Tensor) and deltas.dim() else 0)
    if method == "model_stock" and (coeffs is not None or lam != 1.0):
        raise ValueError("coeffs: model_stock computes its own interpolation weight; pass coeffs=None and lam=1.0")
    if coeffs is None:
        coeffs = [1.0] * max(n_guess, 0)
    p = TM.prepare(base, deltas, coeffs, blocks, TM._output_dtype(out, out_dtype), deltas_name=deltas_name)
    n = len(p.deltas)
    dens = check_params(method, density, lam, seed, name, gamma, epsilon, k, tall_lambda, normalize, n)
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
    chosen = _backend.select(OP, backend, _can_run(p, method, needs_grad),
                             _backend.default_order(p.base.device, ("cuda", "triton")))
    if chosen == "reference":
        result = ref.merge(p.base, p.deltas, p.coeffs, method=method, block_size=p.block_size,
                           density=torch.tensor(dens, dtype=torch.float64), lam=lam, seed=seed, name=name,
                           gamma=gamma, epsilon=epsilon, k=k, tall_lambda=tall_lambda, normalize=normalize,
                           from_models=from_models, out_dtype=p.out_dtype if out is None else out.dtype)
        if out is None:
            return result
        with torch.no_grad():
            return out.copy_(result)
    if chosen == "cuda":
        return merge_cuda.run(p, method, dens, from_models=from_models, seed=seed, lam=lam, name=name, k=k,
                              tall_lambda=tall_lambda, normalize=normalize, gamma=gamma, epsilon=epsilon, out=out)
    if chosen == "triton":
        return merge_triton.run(p, method, dens, from_models=from_models, seed=seed, lam=lam, name=name,
                                normalize=normalize, gamma=gamma, epsilon=epsilon, out=out)
    return merge_native.run(p, method, dens, from_models=from_models, seed=seed, lam=lam, name=name, k=k,
                            tall_lambda=tall_lambda, normalize=normalize, gamma=gamma, epsilon=epsilon, out=out)


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
) -> Tensor:
    """Merge N task vectors into `base` with one of the methods of `pyops.merging.reference`.

    Args:
        base: `[*shape]` float32 / float16 / bfloat16 (float64 on the reference backend).
        deltas: task vectors τᵢ, `[N, *shape]` or a list of N `[*shape]` tensors.
        method: task_arithmetic | ties | dare | dare_linear | dare_ties | breadcrumbs | della |
            della_linear | model_stock | consensus.
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

    Gradients reach coeffs (and base, deltas) with every mask held fixed.
    """
    return _merge(base, deltas, False, method=method, coeffs=coeffs, blocks=blocks, density=density, seed=seed,
                  lam=lam, name=name, gamma=gamma, epsilon=epsilon, k=k, tall_lambda=tall_lambda,
                  normalize=normalize, out=out, out_dtype=out_dtype, backend=backend)


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
) -> Tensor:
    """`merge` taking fine-tuned weights θᵢ; τᵢ = θᵢ − base is formed on the fly, never stored."""
    return _merge(base, finetuned, True, method=method, coeffs=coeffs, blocks=blocks, density=density, seed=seed,
                  lam=lam, name=name, gamma=gamma, epsilon=epsilon, k=k, tall_lambda=tall_lambda,
                  normalize=normalize, out=out, out_dtype=out_dtype, backend=backend)
