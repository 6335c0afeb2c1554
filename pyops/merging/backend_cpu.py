"""The C++ CPU path of the merging family (pyops._C, kernels in csrc/merging/), kept apart from validation.

`pyops.merging.task_arithmetic` and `pyops.merging.merge` validate, choose the backend and tie
each functional op to its backward for autograd; this module declares what the C++ kernels take
(`TASK_ARITHMETIC`, `MERGE`), registers the ops of the C++ path with their fake kernels and makes
the calls into `pyops._C`:

    pyops::task_arithmetic              base + Σᵢ coeffs[i, block]·τᵢ (the CUDA kernel of the same
    pyops::task_arithmetic_out          three ops is registered by backend_cuda.py)
    pyops::task_arithmetic_backward
    pyops::merge_native                 ties, dare / dare_linear, dare_ties, breadcrumbs, della,
    pyops::merge_native_out             della_linear, consensus (`registry.define_merge_ops`,
    pyops::merge_native_backward        shared with the CUDA path)
    pyops::task_vector_gram             Gram matrix of the task vectors in fp64 (model_stock)
    pyops::{linear,slerp,nearswap,      mergekit 0.1.5's methods of pyops.merging.interpolate
      nuslerp,multislerp,karcher,       (csrc/merging/interpolate.h): a per-vector Gram pass, the
      ram,ramplus_tl}_cpu               scalars in double, one combine pass; forward only
    pyops::{sce,arcee_fusion}_cpu       mergekit 0.1.5's sce and arcee_fusion (csrc/merging/fusion.h):
                                        exact order statistics by radix select; forward only

The kernels take contiguous fp32 / fp16 / bf16 tensors (`pyops._native.NATIVE_DTYPES`) and
accumulate in fp32. ties (with or without exact_k), dare / dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties and della / della_linear have a native backward with every mask held fixed, as
the reference defines their gradients;
breadcrumbs and DELLA rank |τ| per block with a stable radix sort, the reference's
`ascending_rank` exactly, over blocks of fewer than 2**32 elements (`MERGE.limits`). consensus,
whose mask depends on the coefficients, is forward only: merge.py sends calls that need its
gradients to the reference. model_stock is composed by merge.py from the Gram op and
`pyops.task_arithmetic`.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from pyops import _backend, _native
from pyops._backend import Capability
from pyops.merging import interp_scalars as S
from pyops.merging import registry as R
from pyops.merging import spec

# The native entry points each op calls (a build without them degrades with the reason) and the
# size the ranking methods' radix sort counts in 32 bits.
TASK_ARITHMETIC = Capability("cpu", functions=("task_arithmetic_forward", "task_arithmetic_backward"))
MERGE = Capability("cpu", functions=("merge_forward", "merge_backward", "task_vector_gram"),
                   limits={R.RANKED_BLOCK: 2**32 - 1})

# Method codes of the C++ kernel; task_arithmetic also has its own kernel.
METHOD_CODES = spec.NATIVE_METHOD_CODES


def task_arithmetic_reason(base: Tensor, out_dtype: torch.dtype) -> Optional[str]:
    """None if the C++ kernels can run task arithmetic on `base` (the tasks share its dtype and
    device) producing `out_dtype`, else why not."""
    return TASK_ARITHMETIC.reason(base.device, base, torch.empty(0, dtype=out_dtype))


def merge_reason(p: R.Prepared, method: str, needs_grad: bool, exact_k: bool = False) -> Optional[str]:
    """None if the C++ kernels can run `method` on `p` (with gradients if `needs_grad`), else why not."""
    reason = MERGE.reason(p.base.device, p.base, torch.empty(0, dtype=p.out_dtype),
                          **{R.RANKED_BLOCK: R.ranked_block(p, method)})
    if reason is not None:
        return reason
    if method not in METHOD_CODES and method != "model_stock":
        return f"the C++ kernels do not implement {method!r}"
    if needs_grad and method == "consensus":
        return f"gradients for {method!r} are computed by the reference backend"
    return None


# --------------------------------------------------------------------------------------------
# Task arithmetic
# --------------------------------------------------------------------------------------------

def task_arithmetic_forward_into(out: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                                 from_models: bool) -> None:
    """Writes base + Σᵢ c[i, block]·τᵢ into `out` (contiguous, any kernel dtype) on torch's threads."""
    if out.numel() == 0:
        return
    base = base.contiguous()
    deltas = [d.contiguous() for d in deltas]
    c, s_n, s_b = R.coeff_layout(coeffs)
    _native.cpu_module.task_arithmetic_forward(
        out=out.data_ptr(), out_dtype=_native.dtype_code(out.dtype), base=base.data_ptr(),
        deltas=[d.data_ptr() for d in deltas], in_dtype=_native.dtype_code(base.dtype), coeffs=c.data_ptr(),
        coeff_stride_n=s_n, coeff_stride_block=s_b, numel=base.numel(), block_size=block_size,
        from_models=from_models, n_threads=torch.get_num_threads())


def _task_arithmetic_backward_into(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor,
                                   block_size: int, from_models: bool, gb: Tensor, gd: List[Tensor],
                                   gc: Tensor) -> None:
    prepared = R.backward_inputs(grad, base, deltas, coeffs, block_size, gc)
    if prepared is None:
        return
    grad, base, deltas, (c, s_n, s_b), gc32 = prepared
    numel = base.numel()
    _native.cpu_module.task_arithmetic_backward(
        grad.data_ptr(), _native.dtype_code(grad.dtype), base.data_ptr(), [d.data_ptr() for d in deltas],
        _native.dtype_code(base.dtype), c.data_ptr(), s_n, s_b, numel, block_size, from_models,
        gb.data_ptr() if gb.numel() else 0, [t.data_ptr() for t in gd],
        gc32.data_ptr() if gc32 is not None else 0, torch.get_num_threads())
    if gc32 is not None:
        R.finish_coeff_grad(gc32, coeffs, gc)


@torch.library.custom_op("pyops::task_arithmetic", mutates_args=(), device_types="cpu")
def task_arithmetic_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                       from_models: bool, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    task_arithmetic_forward_into(out, base, deltas, coeffs, block_size, from_models)
    return out


@torch.library.custom_op("pyops::task_arithmetic_out", mutates_args=("out",), device_types="cpu")
def task_arithmetic_out_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                           from_models: bool, out: Tensor) -> None:
    task_arithmetic_forward_into(out, base, deltas, coeffs, block_size, from_models)


@torch.library.custom_op("pyops::task_arithmetic_backward", mutates_args=(), device_types="cpu")
def task_arithmetic_backward_op(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                                from_models: bool, need_base: bool, need_deltas: bool,
                                need_coeffs: bool) -> tuple[Tensor, List[Tensor], Tensor]:
    gb, gd, gc = R.empty_grads(base, deltas, coeffs, need_base, need_deltas, need_coeffs)
    _task_arithmetic_backward_into(grad, base, deltas, coeffs, block_size, from_models, gb, gd, gc)
    return gb, gd, gc


task_arithmetic_op.register_fake(R.task_arithmetic_fake)
task_arithmetic_out_op.register_fake(R.task_arithmetic_out_fake)
task_arithmetic_backward_op.register_fake(R.task_arithmetic_backward_fake)


# --------------------------------------------------------------------------------------------
# The merge methods
# --------------------------------------------------------------------------------------------

def _merge_forward_into(out: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                        block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int,
                        k: int, tall_lambda: float, normalize: bool, gamma: float, epsilon: float) -> None:
    if out.numel() == 0:
        return
    base = base.detach().contiguous()
    deltas = [d.detach().contiguous() for d in deltas]
    c, s_n, s_b = R.coeff_layout(coeffs)
    _native.cpu_module.merge_forward(
        out=out.data_ptr(), out_dtype=_native.dtype_code(out.dtype), base=base.data_ptr(),
        deltas=[d.data_ptr() for d in deltas], in_dtype=_native.dtype_code(base.dtype), coeffs=c.data_ptr(),
        coeff_stride_n=s_n, coeff_stride_block=s_b, density=[float(x) for x in density], numel=base.numel(),
        block_size=block_size, from_models=from_models, method=method, lam=float(lam),
        seed=R.seed_from_i64(seed), name_hash=name_hash, k=k, tall_lambda=float(tall_lambda),
        normalize=normalize, gamma=float(gamma), epsilon=float(epsilon), n_threads=torch.get_num_threads())


def _merge_backward_into(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                         block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int,
                         k: int, tall_lambda: float, normalize: bool, gamma: float, epsilon: float,
                         gb: Optional[Tensor], gd: Optional[List[Tensor]], gc: Optional[Tensor]) -> None:
    grad = grad.detach().contiguous()
    b = base.detach().contiguous()
    ds = [d.detach().contiguous() for d in deltas]
    c, s_n, s_b = R.coeff_layout(coeffs)
    gc32 = None if gc is None else torch.empty(R.coeff_grad_shape(len(ds), base.numel(), block_size),
                                                dtype=torch.float32)
    _native.cpu_module.merge_backward(
        grad=grad.data_ptr(), grad_dtype=_native.dtype_code(grad.dtype), base=b.data_ptr(),
        deltas=[d.data_ptr() for d in ds], in_dtype=_native.dtype_code(b.dtype), coeffs=c.data_ptr(),
        coeff_stride_n=s_n, coeff_stride_block=s_b, density=[float(x) for x in density], numel=base.numel(),
        block_size=block_size, from_models=from_models, method=method, lam=float(lam), seed=R.seed_from_i64(seed),
        name_hash=name_hash, k=k, tall_lambda=float(tall_lambda), normalize=normalize, gamma=float(gamma),
        epsilon=float(epsilon), grad_base=gb.data_ptr() if gb is not None else 0,
        grad_deltas=[t.data_ptr() for t in gd] if gd is not None else [],
        grad_coeffs=gc32.data_ptr() if gc32 is not None else 0, n_threads=torch.get_num_threads())
    if gc32 is not None:
        R.finish_coeff_grad(gc32, coeffs, gc)


merge_op, merge_out_op, merge_backward_op = R.define_merge_ops("merge_native", "cpu", _merge_forward_into,
                                                               _merge_backward_into)


def run(p: R.Prepared, method: str, dens: List[float], *, from_models: bool, seed: int, lam: float, name: str,
        k: int, tall_lambda: float, normalize: Optional[bool], gamma: float, epsilon: float,
        out: Optional[Tensor], exact_k: bool = False) -> Tensor:
    """Runs `method` (not model_stock: merge.py composes it) on the C++ CPU kernels; `p`, `dens`
    and the parameters are validated by the caller. exact_k (ties): exactly k kept per block."""
    if method not in METHOD_CODES:
        raise ValueError(f"method: the C++ kernels implement {', '.join(METHOD_CODES)} and model_stock, got {method!r}")
    normalize = spec.resolve_normalize(method, normalize)
    code = spec.TIES_EXACT_K_CODE if exact_k and method == "ties" else METHOD_CODES[method]
    args = (p.base, p.deltas, p.coeffs, [float(d) for d in dens], p.block_size, from_models, code,
            float(lam), R.seed_to_i64(seed), spec.name_hash(name), k, float(tall_lambda), bool(normalize), float(gamma),
            float(epsilon))
    if out is None:
        return merge_op(*args, p.out_dtype)
    if _backend.direct():  # the streaming merge: no dispatcher (see direct_kernels)
        _merge_forward_into(out, *args)
    else:
        merge_out_op(*args, out)
    return out


# --------------------------------------------------------------------------------------------
# model_stock: the Gram matrix of the task vectors
# --------------------------------------------------------------------------------------------

def gram(base: Tensor, deltas: List[Tensor], from_models: bool) -> Tensor:
    """[N, N] fp64: Gᵢⱼ = Σ τᵢ·τⱼ with τ formed in fp32 and its products summed in fp64."""
    n = len(deltas)
    if base.numel() == 0 or n == 0:
        return torch.zeros((n, n), dtype=torch.float64, device=base.device)
    b = base.detach().contiguous()
    ds = [d.detach().contiguous() for d in deltas]
    g = _native.cpu_module.task_vector_gram(b.data_ptr(), [d.data_ptr() for d in ds], _native.dtype_code(b.dtype),
                                            b.numel(), from_models, torch.get_num_threads())
    return torch.tensor(g, dtype=torch.float64, device=base.device).view(n, n)


@torch.library.custom_op("pyops::task_vector_gram", mutates_args=(), device_types="cpu")
def gram_op(base: Tensor, deltas: List[Tensor], from_models: bool) -> Tensor:
    return gram(base, deltas, from_models)


@gram_op.register_fake
def _gram_fake(base, deltas, from_models):
    n = len(deltas)
    return base.new_empty((n, n), dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# The interpolating methods of mergekit 0.1.5 (linear, slerp, nearswap, passthrough, nuslerp,
# multislerp, karcher): a per-vector Gram pass, the few scalars in double, one combine pass
# --------------------------------------------------------------------------------------------

INTERPOLATE = Capability("cpu", functions=("vector_gram", "vector_combine", "nearswap_forward", "ram_counts",
                                           "ram_forward", "sce_forward", "arcee_fusion_forward"))


def interpolate_reason(tensor: Tensor, out_dtype: torch.dtype, needs_grad: bool) -> Optional[str]:
    """Why the C++ kernels cannot run an interpolating method here (None: they can)."""
    return R.forward_only_reason(INTERPOLATE, "C++", tensor, out_dtype, needs_grad)


def vector_gram(base: Optional[Tensor], inputs: List[Tensor], layout: R.Layout) -> Tensor:
    """[n_vectors, N, N] fp64: the Gram matrix of each vector's inputs (minus base when given)."""
    n = len(inputs)
    ins = [x.detach().contiguous() for x in inputs]
    b = base.detach().contiguous() if base is not None else None
    g = _native.cpu_module.vector_gram(b.data_ptr() if b is not None else 0, [x.data_ptr() for x in ins],
                                       _native.dtype_code(ins[0].dtype), *layout, torch.get_num_threads())
    return torch.tensor(g, dtype=torch.float64).view(layout[0], n, n)


def vector_combine(base: Optional[Tensor], inputs: List[Tensor], layout: R.Layout, coeffs: Tensor,
                   divisor: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """[base +] (Σᵢ coeffs[v, i]·(xᵢ [− base])) [/ divisor[v]] per vector v; coeffs [n_vectors, N]
    and divisor [n_vectors] are rounded to fp32, the kernels' arithmetic."""
    out = torch.empty(inputs[0].shape, dtype=out_dtype)
    if out.numel() == 0:
        return out
    ins = [x.detach().contiguous() for x in inputs]
    b = base.detach().contiguous() if base is not None else None
    c = coeffs.to(torch.float32).contiguous()
    d = divisor.to(torch.float32).contiguous() if divisor is not None else None
    _native.cpu_module.vector_combine(
        out.data_ptr(), _native.dtype_code(out_dtype), b.data_ptr() if b is not None else 0,
        [x.data_ptr() for x in ins], _native.dtype_code(ins[0].dtype), *layout, c.data_ptr(),
        d.data_ptr() if d is not None else 0, torch.get_num_threads())
    return out


def _new_like(x: Tensor, out_dtype: torch.dtype) -> Tensor:
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


@torch.library.custom_op("pyops::linear_cpu", mutates_args=(), device_types="cpu")
def linear_op(models: List[Tensor], weight: List[float], normalize: bool, out_dtype: torch.dtype) -> Tensor:
    return R.interp_linear(models, weight, normalize, out_dtype, vector_combine)


@torch.library.custom_op("pyops::slerp_cpu", mutates_args=(), device_types="cpu")
def slerp_op(a: Tensor, b: Tensor, t: float, dot_threshold: float, eps: float, out_dtype: torch.dtype) -> Tensor:
    return R.interp_slerp(a, b, t, dot_threshold, eps, out_dtype, vector_gram, vector_combine)


@torch.library.custom_op("pyops::nearswap_cpu", mutates_args=(), device_types="cpu")
def nearswap_op(base: Tensor, model: Tensor, t: float, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype)
    if out.numel():
        b, m = base.detach().contiguous(), model.detach().contiguous()
        _native.cpu_module.nearswap_forward(out.data_ptr(), _native.dtype_code(out_dtype), b.data_ptr(), m.data_ptr(),
                                            _native.dtype_code(b.dtype), b.numel(), float(t), torch.get_num_threads())
    return out


@torch.library.custom_op("pyops::nuslerp_cpu", mutates_args=(), device_types="cpu")
def nuslerp_op(a: Tensor, b: Tensor, base: Optional[Tensor], t: float, nuslerp_flatten: bool,
               nuslerp_row_wise: bool, eps: float, out_dtype: torch.dtype) -> Tensor:
    return R.interp_nuslerp(a, b, base, t, nuslerp_flatten, nuslerp_row_wise, eps, out_dtype, vector_gram,
                            vector_combine)


@torch.library.custom_op("pyops::multislerp_cpu", mutates_args=(), device_types="cpu")
def multislerp_op(models: List[Tensor], weight: List[float], base: Optional[Tensor], normalize_weights: bool,
                  eps: float, out_dtype: torch.dtype) -> Tensor:
    return R.interp_multislerp(models, weight, base, normalize_weights, eps, out_dtype, vector_gram,
                               vector_combine)


@torch.library.custom_op("pyops::karcher_cpu", mutates_args=(), device_types="cpu")
def karcher_op(models: List[Tensor], max_iter: int, tol: float, out_dtype: torch.dtype) -> Tensor:
    return R.interp_karcher(models, max_iter, tol, out_dtype, vector_gram, vector_combine)


def _ram(base: Tensor, models: List[Tensor], epsilon: float, lam: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype)
    if out.numel() == 0:
        return out
    b = base.detach().contiguous()
    ms = [m.detach().contiguous() for m in models]
    lam32 = lam.to(torch.float32).contiguous() if lam is not None else None
    _native.cpu_module.ram_forward(out.data_ptr(), _native.dtype_code(out_dtype), b.data_ptr(),
                                   [m.data_ptr() for m in ms], _native.dtype_code(b.dtype), b.numel(), float(epsilon),
                                   lam32.data_ptr() if lam32 is not None else 0, torch.get_num_threads())
    return out


def _ramplus_tl(base: Tensor, models: List[Tensor], r: float, alpha: float, epsilon: float,
                out_dtype: torch.dtype) -> Tensor:
    if base.numel() == 0:
        return torch.empty(base.shape, dtype=out_dtype)
    n = len(models)
    b = base.detach().contiguous()
    ms = [m.detach().contiguous() for m in models]
    counts = _native.cpu_module.ram_counts(b.data_ptr(), [m.data_ptr() for m in ms], _native.dtype_code(b.dtype),
                                           b.numel(), float(epsilon), torch.get_num_threads())
    lam = torch.tensor(S.ramplus_lambda(counts[:n], counts[n:], r, alpha, epsilon), dtype=torch.float32)
    return _ram(b, ms, epsilon, lam, out_dtype)


@torch.library.custom_op("pyops::ram_cpu", mutates_args=(), device_types="cpu")
def ram_op(base: Tensor, models: List[Tensor], epsilon: float, out_dtype: torch.dtype) -> Tensor:
    return _ram(base, models, epsilon, None, out_dtype)


@torch.library.custom_op("pyops::ramplus_tl_cpu", mutates_args=(), device_types="cpu")
def ramplus_tl_op(base: Tensor, models: List[Tensor], r: float, alpha: float, epsilon: float,
                  out_dtype: torch.dtype) -> Tensor:
    return _ramplus_tl(base, models, r, alpha, epsilon, out_dtype)


ram_op.register_fake(lambda base, models, epsilon, out_dtype: _new_like(base, out_dtype))
ramplus_tl_op.register_fake(lambda base, models, r, alpha, epsilon, out_dtype: _new_like(base, out_dtype))
linear_op.register_fake(lambda models, weight, normalize, out_dtype: _new_like(models[0], out_dtype))
slerp_op.register_fake(lambda a, b, t, dot_threshold, eps, out_dtype: _new_like(a, out_dtype))
nearswap_op.register_fake(lambda base, model, t, out_dtype: _new_like(base, out_dtype))
nuslerp_op.register_fake(lambda a, b, base, t, nuslerp_flatten, nuslerp_row_wise, eps, out_dtype:
                         _new_like(a, out_dtype))
multislerp_op.register_fake(lambda models, weight, base, normalize_weights, eps, out_dtype:
                            _new_like(models[0], out_dtype))
karcher_op.register_fake(lambda models, max_iter, tol, out_dtype: _new_like(models[0], out_dtype))


# --------------------------------------------------------------------------------------------
# sce and arcee_fusion (csrc/merging/fusion.h): whole-tensor selections, forward only
# --------------------------------------------------------------------------------------------

def _sce(base: Tensor, models: List[Tensor], select_topk: float, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype)
    if out.numel() == 0:
        return out
    b = base.detach().contiguous()
    ms = [m.detach().contiguous() for m in models]
    _native.cpu_module.sce_forward(out.data_ptr(), _native.dtype_code(out_dtype), b.data_ptr(),
                                   [m.data_ptr() for m in ms], _native.dtype_code(b.dtype), b.numel(),
                                   float(select_topk), torch.get_num_threads())
    return out


def arcee_fusion_into(out: Tensor, base: Tensor, model: Tensor) -> float:
    """Writes arcee_fusion(base, model) into `out` (contiguous, base's shape); returns the fp32
    threshold median + 1.5·IQR of the importance (NaN for an empty tensor)."""
    if out.numel() == 0:
        return float("nan")
    b, m = base.detach().contiguous(), model.detach().contiguous()
    row_len = b.shape[-1]
    return _native.cpu_module.arcee_fusion_forward(out.data_ptr(), _native.dtype_code(out.dtype), b.data_ptr(),
                                                   m.data_ptr(), _native.dtype_code(b.dtype), b.numel() // row_len,
                                                   row_len, torch.get_num_threads())


@torch.library.custom_op("pyops::sce_cpu", mutates_args=(), device_types="cpu")
def sce_op(base: Tensor, models: List[Tensor], select_topk: float, out_dtype: torch.dtype) -> Tensor:
    return _sce(base, models, select_topk, out_dtype)


@torch.library.custom_op("pyops::arcee_fusion_cpu", mutates_args=(), device_types="cpu")
def arcee_fusion_op(base: Tensor, model: Tensor, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype)
    arcee_fusion_into(out, base, model)
    return out


sce_op.register_fake(lambda base, models, select_topk, out_dtype: _new_like(base, out_dtype))
arcee_fusion_op.register_fake(lambda base, model, out_dtype: _new_like(base, out_dtype))
