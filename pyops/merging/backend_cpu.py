"""The C++ CPU path of `pyops.merge` (csrc/cpu/merge_kernels.cpp), kept apart from validation.

`pyops.merging.merge` validates and chooses the backend; `run` here makes the inputs contiguous,
lays out the coefficients, allocates the output and calls the registered ops (functional, out and
backward: `merge_registry.define_merge_ops`, shared with the CUDA path):

    pyops::merge_native        functional: ties, dare / dare_linear, dare_ties, breadcrumbs, della,
                               della_linear, consensus
    pyops::merge_native_out    the same, writing into `out`
    pyops::task_vector_gram    Gram matrix of the task vectors in fp64 (model_stock), with autograd

model_stock is a Gram pass (cos and t exactly as the reference forms them) followed by
`pyops.task_arithmetic` with coefficients t/N: θ = base + t·mean(τ). Gradients reach base and
the models through t as well (the Gram op's backward), as in the reference. ties, dare /
dare_linear, dare_ties, breadcrumbs and della / della_linear have a native backward
(`pyops::merge_native_backward`) with every mask held fixed, as the reference defines their
gradients; breadcrumbs and DELLA rank |τ| per block with a stable radix sort
(csrc/cpu/block_rank.h), the reference's `ascending_rank` exactly. consensus, whose mask depends
on the coefficients, is forward only and the op layer sends calls that need its gradients to the
reference.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from pyops import _backend, _native
from pyops.merging import task_arithmetic as TM
from pyops.merging.spec import NATIVE_METHOD_CODES, resolve_normalize
from pyops.merging.registry import define_merge_ops
from pyops.merging import reference as ref

# Method codes of the C++ kernel (csrc/cpu/merge.h).
METHOD_CODES = NATIVE_METHOD_CODES

_U64 = 1 << 64


def _seed_to_i64(seed: int) -> int:
    """A seed in [0, 2**64) as the signed int64 the op schema carries (two's complement)."""
    return seed - _U64 if seed >= 1 << 63 else seed


def _seed_from_i64(seed: int) -> int:
    return seed & (_U64 - 1)


def _forward_into(out: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                  block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int, k: int,
                  tall_lambda: float, normalize: bool, gamma: float, epsilon: float) -> None:
    if out.numel() == 0:
        return
    base = base.detach().contiguous()
    deltas = [d.detach().contiguous() for d in deltas]
    c, s_n, s_b = TM._coeff_layout(coeffs)
    _native.cpu_module.merge_forward(
        out=out.data_ptr(), out_dtype=_native.dtype_code(out.dtype), base=base.data_ptr(),
        deltas=[d.data_ptr() for d in deltas], in_dtype=_native.dtype_code(base.dtype), coeffs=c.data_ptr(),
        coeff_stride_n=s_n, coeff_stride_block=s_b, density=[float(x) for x in density], numel=base.numel(),
        block_size=block_size, from_models=from_models, method=method, lam=float(lam),
        seed=_seed_from_i64(seed), name_hash=name_hash, k=k, tall_lambda=float(tall_lambda),
        normalize=normalize, gamma=float(gamma), epsilon=float(epsilon), n_threads=torch.get_num_threads())


def _backward_into(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                   block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int, k: int,
                   tall_lambda: float, normalize: bool, gamma: float, epsilon: float, gb: Optional[Tensor],
                   gd: Optional[List[Tensor]], gc: Optional[Tensor]) -> None:
    grad = grad.detach().contiguous()
    b = base.detach().contiguous()
    ds = [d.detach().contiguous() for d in deltas]
    c, s_n, s_b = TM._coeff_layout(coeffs)
    gc32 = None if gc is None else torch.empty(TM._coeff_grad_shape(len(ds), base.numel(), block_size),
                                                dtype=torch.float32)
    _native.cpu_module.merge_backward(
        grad=grad.data_ptr(), grad_dtype=_native.dtype_code(grad.dtype), base=b.data_ptr(),
        deltas=[d.data_ptr() for d in ds], in_dtype=_native.dtype_code(b.dtype), coeffs=c.data_ptr(),
        coeff_stride_n=s_n, coeff_stride_block=s_b, density=[float(x) for x in density], numel=base.numel(),
        block_size=block_size, from_models=from_models, method=method, lam=float(lam), seed=_seed_from_i64(seed),
        name_hash=name_hash, k=k, tall_lambda=float(tall_lambda), normalize=normalize, gamma=float(gamma),
        epsilon=float(epsilon), grad_base=gb.data_ptr() if gb is not None else 0,
        grad_deltas=[t.data_ptr() for t in gd] if gd is not None else [],
        grad_coeffs=gc32.data_ptr() if gc32 is not None else 0, n_threads=torch.get_num_threads())
    if gc32 is not None:
        TM._finish_coeff_grad(gc32, coeffs, gc)


_merge_op, _merge_out_op, _merge_backward_op = define_merge_ops("merge_native", "cpu", _forward_into, _backward_into)


# --------------------------------------------------------------------------------------------
# model_stock: the Gram matrix of the task vectors
# --------------------------------------------------------------------------------------------

def _gram(base: Tensor, deltas: List[Tensor], from_models: bool) -> Tensor:
    n = len(deltas)
    if base.numel() == 0 or n == 0:
        return torch.zeros((n, n), dtype=torch.float64, device=base.device)
    b = base.detach().contiguous()
    ds = [d.detach().contiguous() for d in deltas]
    g = _native.cpu_module.task_vector_gram(b.data_ptr(), [d.data_ptr() for d in ds], _native.dtype_code(b.dtype),
                                            b.numel(), from_models, torch.get_num_threads())
    return torch.tensor(g, dtype=torch.float64, device=base.device).view(n, n)


@torch.library.custom_op("pyops::task_vector_gram", mutates_args=(), device_types="cpu")
def _gram_op(base: Tensor, deltas: List[Tensor], from_models: bool) -> Tensor:
    return _gram(base, deltas, from_models)


@_gram_op.register_fake
def _gram_fake(base, deltas, from_models):
    n = len(deltas)
    return base.new_empty((n, n), dtype=torch.float64)


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


_gram_op.register_autograd(_gram_backward, setup_context=_gram_setup)


def model_stock_coeffs(gram: Tensor) -> Tensor:
    """t/N per task ([N], fp32) from the Gram matrix, as the reference forms t:
    cos = mean over i<j of clamp(G_ij / max(‖τᵢ‖‖τⱼ‖, 1e-6), −1, 1), t = N·cos / (1 + (N − 1)·cos)."""
    n = gram.shape[0]
    norms = torch.sqrt(torch.diagonal(gram))
    iu = torch.triu_indices(n, n, offset=1, device=gram.device)
    prods = (norms[:, None] * norms[None, :])[iu[0], iu[1]].clamp_min(1e-6)
    cos = (gram[iu[0], iu[1]] / prods).clamp(-1.0, 1.0).mean()
    t = n * cos / (1 + (n - 1) * cos)
    return (t / n).to(torch.float32).expand(n)


# --------------------------------------------------------------------------------------------
# Entry point from pyops.merging.merge
# --------------------------------------------------------------------------------------------

def run(p: TM.Prepared, method: str, dens: List[float], *, from_models: bool, seed: int, lam: float, name: str,
        k: int, tall_lambda: float, normalize: Optional[bool], gamma: float, epsilon: float,
        out: Optional[Tensor]) -> Tensor:
    """Runs `method` on the C++ CPU kernels; `p`, `dens` and the parameters are validated by the caller."""
    direct = out is not None and _backend.direct()  # the streaming merge: no dispatcher (see direct_kernels)
    if method == "model_stock":
        gram = (_gram if direct else _gram_op)(p.base, p.deltas, from_models)
        coeffs = model_stock_coeffs(gram)
        fn = TM.task_arithmetic_from_models if from_models else TM.task_arithmetic
        return fn(p.base, p.deltas, coeffs, out=out, out_dtype=p.out_dtype if out is None else None, backend="cpu")
    if method not in METHOD_CODES:
        raise ValueError(f"method: the C++ kernels implement {', '.join(METHOD_CODES)} and model_stock, got {method!r}")
    normalize = resolve_normalize(method, normalize)
    args = (p.base, p.deltas, p.coeffs, [float(d) for d in dens], p.block_size, from_models, METHOD_CODES[method],
            float(lam), _seed_to_i64(seed), ref.name_hash(name), k, float(tall_lambda), bool(normalize), float(gamma),
            float(epsilon))
    if out is None:
        return _merge_op(*args, p.out_dtype)
    if direct:
        _forward_into(out, *args)
    else:
        _merge_out_op(*args, out)
    return out
