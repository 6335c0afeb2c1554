"""What the merging family's backend modules share (backend_cpu.py, backend_cuda.py, backend_triton.py).

* `Prepared`: the validated arguments the op layer (task_arithmetic.py, merge.py) hands a backend.
* The layout of the kernels' arguments: fp32 contiguous coefficients with their (task, block)
  strides, device arrays of task pointers, the seed as the op schema's int64, the allocations of
  a backward and the reduction of its [N, n_blocks] fp32 coefficient gradient.
* The fake kernels of the task arithmetic ops, whose C++ / CUDA and Triton variants share a schema.
* The names of the block sizes the backends declare limits on (`Capability.limits`).
* The interpolating methods of mergekit 0.1.5 (`interp_linear`, `interp_slerp`, `interp_nuslerp`,
  `interp_multislerp`, `interp_karcher`): the scalars between a Gram pass and a combine pass,
  which the C++ and the Triton paths supply; and their vector layouts.
* `define_merge_ops`: the three registered ops of a native merge path, shared by the C++ and the
  CUDA paths, which take the same arguments:

      pyops::<name>            functional (its autograd is registered by merge.py)
      pyops::<name>_out        the same, writing into `out`
      pyops::<name>_backward   grad_base, grad_deltas, grad_coeffs

  The path supplies `forward_into(out, base, deltas, coeffs, *params)` and
  `backward_into(grad, base, deltas, coeffs, *params, grad_base, grad_deltas, grad_coeffs)`, whose
  outputs are None when not wanted (grad_coeffs has coeffs' shape); params are (density,
  block_size, from_models, method, lam, seed, name_hash, k, tall_lambda, normalize, gamma,
  epsilon), as the C++ kernels' MergeProblem holds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from pyops.merging import interp_scalars as S
from pyops.merging.spec import RANKED

_U64 = 1 << 64


@dataclass
class Prepared:
    """Validated arguments of one call: `base` [*shape], N task tensors of base's shape, dtype and
    device, `coeffs` [N] or [N, n_blocks] (any float dtype), the block layout and the output dtype."""
    base: Tensor
    deltas: List[Tensor]
    coeffs: Tensor
    block_size: int
    n_blocks: int
    out_dtype: torch.dtype


# --------------------------------------------------------------------------------------------
# Argument layout
# --------------------------------------------------------------------------------------------

def coeff_layout(coeffs: Tensor) -> tuple[Tensor, int, int]:
    """fp32 contiguous coefficients and their (task, block) strides; a [N] vector broadcasts."""
    c = coeffs.detach().to(torch.float32).contiguous()
    return (c, c.shape[1], 1) if c.dim() == 2 else (c, 1, 0)


def device_pointer_array(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """int64 [N] of the tensors' data pointers on `device` (the CUDA kernels read the task list there)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def seed_to_i64(seed: int) -> int:
    """A seed in [0, 2**64) as the signed int64 the op schema carries (two's complement)."""
    return seed - _U64 if seed >= 1 << 63 else seed


def seed_from_i64(seed: int) -> int:
    """The schema's int64 back to the kernels' uint64 seed."""
    return seed & (_U64 - 1)


def empty_grads(base: Tensor, deltas: List[Tensor], coeffs: Tensor, need_base: bool, need_deltas: bool,
                need_coeffs: bool) -> tuple[Tensor, List[Tensor], Tensor]:
    """Allocations for the backward; outputs that are not needed are empty tensors."""
    gb = torch.empty_like(base, memory_format=torch.contiguous_format) if need_base else base.new_empty(0)
    gd = [torch.empty_like(d, memory_format=torch.contiguous_format) for d in deltas] if need_deltas else []
    gc = coeffs.new_empty(coeffs.shape) if need_coeffs else coeffs.new_empty(0)
    return gb, gd, gc


def coeff_grad_shape(n: int, numel: int, block_size: int) -> tuple[int, int]:
    """[N, n_blocks]: the kernels' fp32 coefficient gradient, one sum per task and block."""
    return n, (numel + block_size - 1) // block_size


def backward_inputs(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                    gc: Tensor):
    """What a native task-arithmetic backward passes its kernel: contiguous grad, base and deltas,
    the coefficient layout (c, stride_n, stride_block) and the fp32 coefficient-gradient buffer
    (None when no coefficient gradient is wanted). None for an empty tensor, after zeroing `gc`."""
    if base.numel() == 0:
        if gc.numel():
            gc.zero_()
        return None
    deltas = [d.contiguous() for d in deltas]
    gc32 = torch.empty(coeff_grad_shape(len(deltas), base.numel(), block_size), dtype=torch.float32,
                       device=base.device) if gc.numel() else None
    return grad.contiguous(), base.contiguous(), deltas, coeff_layout(coeffs), gc32


def finish_coeff_grad(gc32: Tensor, coeffs: Tensor, out: Tensor) -> None:
    """gc32 is [N, n_blocks] fp32; a [N] coefficient vector gets the sum over blocks."""
    out.copy_(gc32.sum(dim=1) if coeffs.dim() == 1 else gc32)


# --------------------------------------------------------------------------------------------
# Fake kernels of the task arithmetic ops (the C++ / CUDA ops and the Triton ops share a schema)
# --------------------------------------------------------------------------------------------

def task_arithmetic_fake(base, deltas, coeffs, block_size, from_models, out_dtype):
    return torch.empty(base.shape, dtype=out_dtype, device=base.device)


def task_arithmetic_out_fake(base, deltas, coeffs, block_size, from_models, out):
    return None


def task_arithmetic_backward_fake(grad, base, deltas, coeffs, block_size, from_models, need_base, need_deltas,
                                  need_coeffs):
    return empty_grads(base, deltas, coeffs, need_base, need_deltas, need_coeffs)


# --------------------------------------------------------------------------------------------
# Sizes the backends declare limits on
# --------------------------------------------------------------------------------------------

# Elements of the longest block of a method that ranks |τ| within each block (breadcrumbs, DELLA).
RANKED_BLOCK = "elements per ranked block"
# Elements of the longest block whose TIES threshold is selected.
TIES_BLOCK = "elements per TIES block"


def longest_block(p: Prepared) -> int:
    """Elements of the longest block (the whole tensor when it is shorter than one block)."""
    return min(p.block_size, p.base.numel())


def ranked_block(p: Prepared, method: str) -> Optional[int]:
    """The size `RANKED_BLOCK` names for this call, or None when the method ranks nothing."""
    return longest_block(p) if method in RANKED else None


# --------------------------------------------------------------------------------------------
# The ops of a native merge path
# --------------------------------------------------------------------------------------------

def define_merge_ops(name: str, device_types: str, forward_into: Callable, backward_into: Callable):
    """Registers the three ops of one path with their fake kernels; returns (functional, out
    variant, backward). merge.py ties the functional op to the backward op for autograd."""

    @torch.library.custom_op(f"pyops::{name}", mutates_args=(), device_types=device_types)
    def merge_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float], block_size: int,
                 from_models: bool, method: int, lam: float, seed: int, name_hash: int, k: int, tall_lambda: float,
                 normalize: bool, gamma: float, epsilon: float, out_dtype: torch.dtype) -> Tensor:
        out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
        forward_into(out, base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash, k,
                     tall_lambda, normalize, gamma, epsilon)
        return out

    @torch.library.custom_op(f"pyops::{name}_out", mutates_args=("out",), device_types=device_types)
    def merge_out_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float], block_size: int,
                     from_models: bool, method: int, lam: float, seed: int, name_hash: int, k: int,
                     tall_lambda: float, normalize: bool, gamma: float, epsilon: float, out: Tensor) -> None:
        forward_into(out, base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash, k,
                     tall_lambda, normalize, gamma, epsilon)

    @torch.library.custom_op(f"pyops::{name}_backward", mutates_args=(), device_types=device_types)
    def merge_backward_op(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                          block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int,
                          k: int, tall_lambda: float, normalize: bool, gamma: float, epsilon: float,
                          need_base: bool, need_deltas: bool,
                          need_coeffs: bool) -> tuple[Tensor, List[Tensor], Tensor]:
        """Gradients with every mask (trim, drop, rank band, election) held fixed, as the C++
        kernels define them (csrc/merging/)."""
        gb, gd, gc = empty_grads(base, deltas, coeffs, need_base, need_deltas, need_coeffs)
        if base.numel() == 0:
            if gc.numel():
                gc.zero_()
            return gb, gd, gc
        backward_into(grad, base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash, k,
                      tall_lambda, normalize, gamma, epsilon, gb if need_base else None, gd if need_deltas else None,
                      gc if need_coeffs else None)
        return gb, gd, gc

    @merge_op.register_fake
    def _merge_fake(base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash, k,
                    tall_lambda, normalize, gamma, epsilon, out_dtype):
        return torch.empty(base.shape, dtype=out_dtype, device=base.device)

    @merge_out_op.register_fake
    def _merge_out_fake(base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash, k,
                        tall_lambda, normalize, gamma, epsilon, out):
        return None

    @merge_backward_op.register_fake
    def _merge_backward_fake(grad, base, deltas, coeffs, density, block_size, from_models, method, lam, seed,
                             name_hash, k, tall_lambda, normalize, gamma, epsilon, need_base, need_deltas,
                             need_coeffs):
        return empty_grads(base, deltas, coeffs, need_base, need_deltas, need_coeffs)

    return merge_op, merge_out_op, merge_backward_op


# --------------------------------------------------------------------------------------------
# The interpolating methods of mergekit 0.1.5 (linear, slerp, nuslerp, multislerp, karcher),
# shared by the C++ and the Triton paths: a per-vector Gram pass, the few scalars in double (on
# the host), one combine pass. Each path supplies the two passes:
#   gram(base, inputs, layout) -> [n_vectors, N, N] fp64 CPU tensor: Σₖ xᵢ[v,k]·xⱼ[v,k] of the
#       fp32 values (minus base when given), the products summed in double;
#   combine(base, inputs, layout, coeffs [n_vectors, N], divisor [n_vectors] | None, out_dtype):
#       [base +] (Σᵢ coeffs[v, i]·(xᵢ [− base])) [/ divisor[v]] in fp32 (coefficients rounded
#       to fp32), one rounding to out_dtype.
# --------------------------------------------------------------------------------------------

# (n_vectors, length, vector_stride, element_stride): vector v is the elements
# v·vector_stride + k·element_stride, k < length (csrc/merging/interpolate.h). The scalars between
# the passes come from interp_scalars (torch-free, shared with the merge command's native engine).
Layout = tuple
GramFn = Callable[[Optional[Tensor], List[Tensor], Layout], Tensor]
CombineFn = Callable[[Optional[Tensor], List[Tensor], Layout, Tensor, Optional[Tensor], torch.dtype], Tensor]
whole_layout, rows_layout, dim0_layout = S.whole_layout, S.rows_layout, S.dim0_layout


def _coeffs(values: Sequence[float], n_vectors: int) -> Tensor:
    return torch.tensor(values, dtype=torch.float64).view(n_vectors, -1)


def _empty(x: Tensor, out_dtype: torch.dtype) -> Tensor:
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


def interp_linear(models: List[Tensor], weight: List[float], normalize: bool, out_dtype: torch.dtype,
                  combine: CombineFn) -> Tensor:
    """linear: Σᵢ wᵢ·xᵢ [/ Σᵢ wᵢ] (the weights and their sum in fp32)."""
    w, div = S.linear_coeffs(weight, normalize)
    return combine(None, models, whole_layout(models[0].shape), _coeffs(w, 1),
                   torch.tensor(div, dtype=torch.float64) if div is not None else None, out_dtype)


def interp_slerp(a: Tensor, b: Tensor, t: float, dot_threshold: float, eps: float, out_dtype: torch.dtype,
                 gram: GramFn, combine: CombineFn) -> Tensor:
    """slerp: the angle from the Gram matrix in double, then ca·a + cb·b."""
    layout = whole_layout(a.shape)
    if layout[0] == 0:
        return _empty(a, out_dtype)
    g = gram(None, [a, b], layout).reshape(-1).tolist()
    return combine(None, [a, b], layout, _coeffs(S.slerp_coeffs(g, t, dot_threshold, eps), 1), None, out_dtype)


def interp_nuslerp(a: Tensor, b: Tensor, base: Optional[Tensor], t: float, flatten: bool, row_wise: bool,
                   eps: float, out_dtype: torch.dtype, gram: GramFn, combine: CombineFn) -> Tensor:
    """nuslerp: per vector of the layout, the angle in double, then [base +] (c0·v0 + c1·v1) / div."""
    layout = S.nuslerp_layout(a.shape, flatten, row_wise)
    if layout[0] == 0:
        return _empty(a, out_dtype)
    g = gram(base, [a, b], layout).reshape(-1).tolist()
    coeffs, div = S.nuslerp_coeffs(g, layout[0], t, eps)
    return combine(base, [a, b], layout, _coeffs(coeffs, layout[0]), torch.tensor(div, dtype=torch.float64),
                   out_dtype)


def interp_multislerp(models: List[Tensor], weight: List[float], base: Optional[Tensor], normalize_weights: bool,
                      eps: float, out_dtype: torch.dtype, gram: GramFn, combine: CombineFn) -> Tensor:
    """multislerp: every vector of the reference expressed in the basis of the inputs' units, in double."""
    if len(models) == 1:
        return models[0].detach().to(out_dtype, copy=True)
    layout = whole_layout(models[0].shape)
    if layout[0] == 0:
        return _empty(models[0], out_dtype)
    g = gram(base, models, layout).reshape(-1).tolist()
    return combine(base, models, layout, _coeffs(S.multislerp_coeffs(g, weight, normalize_weights, eps), 1), None,
                   out_dtype)


def interp_karcher(models: List[Tensor], max_iter: int, tol: float, out_dtype: torch.dtype, gram: GramFn,
                   combine: CombineFn) -> Tensor:
    """karcher: the iteration on coefficient vectors over the valid units, in double."""
    n = len(models)
    if n == 1:
        return models[0].detach().to(out_dtype, copy=True)
    layout = whole_layout(models[0].shape)
    if layout[0] == 0:
        return _empty(models[0], out_dtype)
    g = gram(None, models, layout).reshape(-1).tolist()
    return combine(None, models, layout, _coeffs(S.karcher_coeffs(g, n, max_iter, tol), 1), None, out_dtype)


def forward_only_reason(capability, kernels: str, tensor: Tensor, out_dtype: torch.dtype,
                        needs_grad: bool) -> Optional[str]:
    """None if `capability` (a backend's interpolating kernels) can run a method on inputs like
    `tensor` producing `out_dtype`, else why not. Forward only: gradients come from the reference."""
    reason = capability.reason(tensor.device, tensor, torch.empty(0, dtype=out_dtype))
    if reason is not None:
        return reason
    if needs_grad:
        return f"the {kernels} kernels of the interpolating methods are forward only (gradients: the reference backend)"
    return None
