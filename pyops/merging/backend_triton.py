"""The Triton path of the merging family (pyops.kernels.merging), kept apart from validation.

`pyops.merging.task_arithmetic` and `pyops.merging.merge` validate, choose the backend and tie
each functional op to its backward for autograd; this module declares what the Triton kernels
take (`TASK_ARITHMETIC`, `MERGE`), registers the ops with their fake kernels and calls the
launchers (`pyops.kernels.merging.task_arithmetic` and `.methods`, imported on first use: Triton
is optional):

    pyops::task_arithmetic_triton            base + Σᵢ coeffs[i, block]·τᵢ, with its backward
    pyops::task_arithmetic_triton_out
    pyops::task_arithmetic_triton_backward
    pyops::merge_triton                      ties, dare / dare_linear, dare_ties, breadcrumbs,
    pyops::merge_triton_out                  della / della_linear (ranks from a stable device sort)
    pyops::{linear,slerp,nearswap,scale,     mergekit 0.1.5's interpolating methods of
      nuslerp,multislerp,karcher}_triton     pyops.merging.interpolate: a torch Gram matrix, the
                                             scalars in double (registry.interp_*), one Triton
                                             pass (pyops.kernels.merging.interpolate); forward only

Every task-vector op is a `triton_op`, so it traces under `torch.compile(fullgraph=True)`; the
interpolating ones are opaque custom ops (their scalars are computed on the host between the
passes). The merge methods are forward only: their gradients (masks held fixed) are computed by
the reference, and merge.py sends calls that need them there, with that reason. The kernels
take CUDA tensors, or CPU tensors under TRITON_INTERPRET=1, in fp32 / fp16 / bf16; ranks are
int32 (`MERGE.limits`).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from pyops._backend import Capability
from pyops.merging import registry as R
from pyops.merging import spec

TASK_ARITHMETIC = Capability("triton", kernels="merging.task_arithmetic")
MERGE = Capability("triton", kernels="merging.methods", limits={R.RANKED_BLOCK: 2**31 - 1})

METHODS = ("ties", "dare", "dare_linear", "dare_ties", "breadcrumbs", "della", "della_linear")
# Method codes of pyops.kernels.merging.methods (METHOD_TIES ... METHOD_DELLA_LINEAR).
METHOD_CODES = {"ties": 1, "dare": 2, "dare_linear": 2, "dare_ties": 3, "breadcrumbs": 4, "della": 5,
                "della_linear": 6}


def task_arithmetic_reason(base: Tensor, out_dtype: torch.dtype) -> Optional[str]:
    """None if the Triton kernels can run task arithmetic on `base` (the tasks share its dtype and
    device) producing `out_dtype`, else why not."""
    return TASK_ARITHMETIC.reason(base.device, base, torch.empty(0, dtype=out_dtype))


def merge_reason(p: R.Prepared, method: str, needs_grad: bool, exact_k: bool = False) -> Optional[str]:
    """None if the Triton kernels can run `method` on `p` (forward only), else why not."""
    reason = MERGE.reason(p.base.device, p.base, torch.empty(0, dtype=p.out_dtype),
                          **{R.RANKED_BLOCK: R.ranked_block(p, method)})
    if reason is not None:
        return reason
    if method not in METHOD_CODES:
        return f"the Triton kernels implement {', '.join(METHODS)}, not {method!r}"
    if exact_k:
        return "the Triton kernels keep every tie at the k-th magnitude (exact_k: the cpu or reference backend)"
    if needs_grad:
        return "the Triton merge kernels are forward only (gradients: the cpu or reference backend)"
    return None


def _task_arithmetic_kernels():
    from pyops.kernels.merging import task_arithmetic as k  # imported lazily: Triton is optional
    return k


def _methods_kernels():
    from pyops.kernels.merging import methods as k  # imported lazily: Triton is optional
    return k


# --------------------------------------------------------------------------------------------
# Task arithmetic
# --------------------------------------------------------------------------------------------

@torch.library.triton_op("pyops::task_arithmetic_triton", mutates_args=())
def task_arithmetic_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                       from_models: bool, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    _task_arithmetic_kernels().task_arithmetic_forward(out, base.contiguous(), [d.contiguous() for d in deltas],
                                                       *R.coeff_layout(coeffs), block_size, from_models)
    return out


@torch.library.triton_op("pyops::task_arithmetic_triton_out", mutates_args=("out",))
def task_arithmetic_out_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                           from_models: bool, out: Tensor) -> None:
    _task_arithmetic_kernels().task_arithmetic_forward(out, base.contiguous(), [d.contiguous() for d in deltas],
                                                       *R.coeff_layout(coeffs), block_size, from_models)


@torch.library.triton_op("pyops::task_arithmetic_triton_backward", mutates_args=())
def task_arithmetic_backward_op(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                                from_models: bool, need_base: bool, need_deltas: bool,
                                need_coeffs: bool) -> tuple[Tensor, List[Tensor], Tensor]:
    gb, gd, gc = R.empty_grads(base, deltas, coeffs, need_base, need_deltas, need_coeffs)
    numel = base.numel()
    gc32 = torch.zeros(R.coeff_grad_shape(len(deltas), numel, block_size), dtype=torch.float32,
                       device=base.device) if need_coeffs else None
    if numel > 0:
        _task_arithmetic_kernels().task_arithmetic_backward(
            grad.contiguous(), base.contiguous(), [d.contiguous() for d in deltas], *R.coeff_layout(coeffs),
            block_size, from_models, gb if need_base else None, gd if need_deltas else None, gc32)
    if gc32 is not None:
        R.finish_coeff_grad(gc32, coeffs, gc)
    return gb, gd, gc


task_arithmetic_op.register_fake(R.task_arithmetic_fake)
task_arithmetic_out_op.register_fake(R.task_arithmetic_out_fake)
task_arithmetic_backward_op.register_fake(R.task_arithmetic_backward_fake)


# --------------------------------------------------------------------------------------------
# The merge methods
# --------------------------------------------------------------------------------------------

def _merge_forward_into(out: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                        block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int,
                        normalize: bool, gamma: float, epsilon: float) -> None:
    if out.numel() == 0:
        return
    c, s_n, s_b = R.coeff_layout(coeffs)
    _methods_kernels().merge_forward(out, base.detach().contiguous(), [d.detach().contiguous() for d in deltas], c,
                                     s_n, s_b, [float(d) for d in density], block_size, from_models, method, lam,
                                     R.seed_from_i64(seed), name_hash, normalize, gamma=float(gamma),
                                     epsilon=float(epsilon))


@torch.library.triton_op("pyops::merge_triton", mutates_args=())
def merge_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float], block_size: int,
             from_models: bool, method: int, lam: float, seed: int, name_hash: int, normalize: bool, gamma: float,
             epsilon: float, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    _merge_forward_into(out, base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash,
                        normalize, gamma, epsilon)
    return out


@torch.library.triton_op("pyops::merge_triton_out", mutates_args=("out",))
def merge_out_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float], block_size: int,
                 from_models: bool, method: int, lam: float, seed: int, name_hash: int, normalize: bool,
                 gamma: float, epsilon: float, out: Tensor) -> None:
    _merge_forward_into(out, base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash,
                        normalize, gamma, epsilon)


@merge_op.register_fake
def _merge_fake(base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash, normalize,
                gamma, epsilon, out_dtype):
    return torch.empty(base.shape, dtype=out_dtype, device=base.device)


@merge_out_op.register_fake
def _merge_out_fake(base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash,
                    normalize, gamma, epsilon, out):
    return None


def run(p: R.Prepared, method: str, dens: List[float], *, from_models: bool, seed: int, lam: float, name: str,
        normalize: Optional[bool], gamma: float, epsilon: float, out: Optional[Tensor]) -> Tensor:
    """Runs `method` on the Triton kernels; `p`, `dens` and the parameters are validated by the caller."""
    if method not in METHOD_CODES:
        raise ValueError(f"method: the Triton kernels implement {', '.join(METHODS)}, got {method!r}")
    normalize = spec.resolve_normalize(method, normalize)
    args = (p.base, p.deltas, p.coeffs, [float(d) for d in dens], p.block_size, from_models, METHOD_CODES[method],
            float(lam), R.seed_to_i64(seed), spec.name_hash(name), bool(normalize), float(gamma), float(epsilon))
    if out is None:
        return merge_op(*args, p.out_dtype)
    merge_out_op(*args, out)
    return out


# --------------------------------------------------------------------------------------------
# The interpolating methods of mergekit 0.1.5 (linear, slerp, nearswap, passthrough, nuslerp,
# multislerp, karcher): a Gram matrix from torch (fp32 values, fp64 products and sums), the
# scalars in double on the host (`registry.interp_*`, shared with the C++ path), one Triton pass
# --------------------------------------------------------------------------------------------

INTERPOLATE = Capability("triton", kernels="merging.interpolate")
# Elements per input in one fp64 piece of the Gram matrix (bounds its scratch to N·8·GRAM_CHUNK bytes).
GRAM_CHUNK = 1 << 22


def _interpolate_kernels():
    from pyops.kernels.merging import interpolate as k  # imported lazily: Triton is optional
    return k


def interpolate_reason(tensor: Tensor, out_dtype: torch.dtype, needs_grad: bool) -> Optional[str]:
    """Why the Triton kernels cannot run an interpolating method here (None: they can)."""
    return R.forward_only_reason(INTERPOLATE, "Triton", tensor, out_dtype, needs_grad)


def _vectors(x: Tensor, layout: R.Layout) -> Tensor:
    """x's elements as [n_vectors, length] (a strided view of the contiguous tensor)."""
    n_vectors, length, vector_stride, element_stride = layout
    return x.detach().contiguous().reshape(-1).as_strided((n_vectors, length), (vector_stride, element_stride))


def vector_gram(base: Optional[Tensor], inputs: List[Tensor], layout: R.Layout) -> Tensor:
    """[n_vectors, N, N] fp64 (CPU): Σₖ xᵢ[v,k]·xⱼ[v,k] with xᵢ the fp32 values (minus base in
    fp32 when given); the products of fp32 values are exact in fp64 and summed in fp64, in pieces
    of the vectors' columns (the C++ kernels' definition, another summation order)."""
    n_vectors, length = layout[0], layout[1]
    n = len(inputs)
    views = [_vectors(x, layout) for x in inputs]
    bview = _vectors(base, layout) if base is not None else None
    g = torch.zeros((n_vectors, n, n), dtype=torch.float64, device=inputs[0].device)
    step = max(1, GRAM_CHUNK // max(n_vectors, 1))
    for k0 in range(0, length, step):
        k1 = min(length, k0 + step)
        b = bview[:, k0:k1].to(torch.float32) if bview is not None else None
        xs = [v[:, k0:k1].to(torch.float32) for v in views]
        x = torch.stack([xi - b if b is not None else xi for xi in xs], dim=1).to(torch.float64)  # [V, N, K]
        g += torch.bmm(x, x.transpose(1, 2))
    return g.cpu()


def vector_combine(base: Optional[Tensor], inputs: List[Tensor], layout: R.Layout, coeffs: Tensor,
                   divisor: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """[base +] (Σᵢ coeffs[v, i]·(xᵢ [− base])) [/ divisor[v]] per vector v, one Triton pass;
    coeffs [n_vectors, N] and divisor [n_vectors] rounded to fp32, the kernels' arithmetic."""
    k = _interpolate_kernels()
    dev = inputs[0].device
    out = torch.empty(inputs[0].shape, dtype=out_dtype, device=dev)
    if out.numel() == 0:
        return out
    n_vectors, length, _, element_stride = layout
    mode = k.MODE_WHOLE if n_vectors == 1 else k.MODE_ROWS if element_stride == 1 else k.MODE_COLUMNS
    c = coeffs.to(device=dev, dtype=torch.float32).contiguous()
    d = divisor.to(device=dev, dtype=torch.float32).contiguous() if divisor is not None else None
    k.combine_forward(out, base.detach().contiguous() if base is not None else None,
                      [x.detach().contiguous() for x in inputs], c, d, mode, n_vectors, length)
    return out


def _interp_fake(x: Tensor, out_dtype: torch.dtype) -> Tensor:
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


_TYPES = ("cuda", "cpu")  # CPU tensors only under TRITON_INTERPRET=1 (interpolate_reason)


@torch.library.custom_op("pyops::linear_triton", mutates_args=(), device_types=_TYPES)
def linear_op(models: List[Tensor], weight: List[float], normalize: bool, out_dtype: torch.dtype) -> Tensor:
    return R.interp_linear(models, weight, normalize, out_dtype, vector_combine)


@torch.library.custom_op("pyops::slerp_triton", mutates_args=(), device_types=_TYPES)
def slerp_op(a: Tensor, b: Tensor, t: float, dot_threshold: float, eps: float, out_dtype: torch.dtype) -> Tensor:
    return R.interp_slerp(a, b, t, dot_threshold, eps, out_dtype, vector_gram, vector_combine)


@torch.library.custom_op("pyops::nearswap_triton", mutates_args=(), device_types=_TYPES)
def nearswap_op(base: Tensor, model: Tensor, t: float, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    _interpolate_kernels().nearswap_forward(out, base.detach().contiguous(), model.detach().contiguous(), float(t))
    return out


@torch.library.custom_op("pyops::scale_triton", mutates_args=(), device_types=_TYPES)
def scale_op(x: Tensor, scale: float, out_dtype: torch.dtype) -> Tensor:
    """passthrough with a scale: x·scale in fp32 (scale rounded to fp32), one rounding."""
    return vector_combine(None, [x], R.whole_layout(x.shape), torch.tensor([[scale]], dtype=torch.float64), None,
                          out_dtype)


@torch.library.custom_op("pyops::nuslerp_triton", mutates_args=(), device_types=_TYPES)
def nuslerp_op(a: Tensor, b: Tensor, base: Optional[Tensor], t: float, nuslerp_flatten: bool,
               nuslerp_row_wise: bool, eps: float, out_dtype: torch.dtype) -> Tensor:
    return R.interp_nuslerp(a, b, base, t, nuslerp_flatten, nuslerp_row_wise, eps, out_dtype, vector_gram,
                            vector_combine)


@torch.library.custom_op("pyops::multislerp_triton", mutates_args=(), device_types=_TYPES)
def multislerp_op(models: List[Tensor], weight: List[float], base: Optional[Tensor], normalize_weights: bool,
                  eps: float, out_dtype: torch.dtype) -> Tensor:
    return R.interp_multislerp(models, weight, base, normalize_weights, eps, out_dtype, vector_gram, vector_combine)


@torch.library.custom_op("pyops::karcher_triton", mutates_args=(), device_types=_TYPES)
def karcher_op(models: List[Tensor], max_iter: int, tol: float, out_dtype: torch.dtype) -> Tensor:
    return R.interp_karcher(models, max_iter, tol, out_dtype, vector_gram, vector_combine)


linear_op.register_fake(lambda models, weight, normalize, out_dtype: _interp_fake(models[0], out_dtype))
slerp_op.register_fake(lambda a, b, t, dot_threshold, eps, out_dtype: _interp_fake(a, out_dtype))
nearswap_op.register_fake(lambda base, model, t, out_dtype: _interp_fake(base, out_dtype))
scale_op.register_fake(lambda x, scale, out_dtype: _interp_fake(x, out_dtype))
nuslerp_op.register_fake(lambda a, b, base, t, nuslerp_flatten, nuslerp_row_wise, eps, out_dtype:
                         _interp_fake(a, out_dtype))
multislerp_op.register_fake(lambda models, weight, base, normalize_weights, eps, out_dtype:
                            _interp_fake(models[0], out_dtype))
karcher_op.register_fake(lambda models, max_iter, tol, out_dtype: _interp_fake(models[0], out_dtype))
