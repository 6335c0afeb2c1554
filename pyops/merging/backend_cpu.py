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

The kernels take contiguous fp32 / fp16 / bf16 tensors (`pyops._native.NATIVE_DTYPES`) and
accumulate in fp32. ties, dare / dare_linear, dare_ties, breadcrumbs and della / della_linear have
a native backward with every mask held fixed, as the reference defines their gradients;
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


def merge_reason(p: R.Prepared, method: str, needs_grad: bool) -> Optional[str]:
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
        out: Optional[Tensor]) -> Tensor:
    """Runs `method` (not model_stock: merge.py composes it) on the C++ CPU kernels; `p`, `dens`
    and the parameters are validated by the caller."""
    if method not in METHOD_CODES:
        raise ValueError(f"method: the C++ kernels implement {', '.join(METHOD_CODES)} and model_stock, got {method!r}")
    normalize = spec.resolve_normalize(method, normalize)
    args = (p.base, p.deltas, p.coeffs, [float(d) for d in dens], p.block_size, from_models, METHOD_CODES[method],
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
