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

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

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
# v·vector_stride + k·element_stride, k < length (csrc/merging/interpolate.h).
Layout = tuple
GramFn = Callable[[Optional[Tensor], List[Tensor], Layout], Tensor]
CombineFn = Callable[[Optional[Tensor], List[Tensor], Layout, Tensor, Optional[Tensor], torch.dtype], Tensor]


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


def interp_linear(models: List[Tensor], weight: List[float], normalize: bool, out_dtype: torch.dtype,
                  combine: CombineFn) -> Tensor:
    """linear: Σᵢ wᵢ·xᵢ [/ Σᵢ wᵢ] (the weights and their sum in fp32)."""
    w = torch.tensor(weight, dtype=torch.float32)
    return combine(None, models, whole_layout(models[0].shape), w[None, :],
                   w.sum().reshape(1) if normalize else None, out_dtype)


def interp_slerp(a: Tensor, b: Tensor, t: float, dot_threshold: float, eps: float, out_dtype: torch.dtype,
                 gram: GramFn, combine: CombineFn) -> Tensor:
    """slerp: the angle from the Gram matrix in double, then ca·a + cb·b."""
    layout = whole_layout(a.shape)
    if layout[0] == 0:
        return torch.empty(a.shape, dtype=out_dtype, device=a.device)
    g = gram(None, [a, b], layout)[0].tolist()
    na, nb = math.sqrt(g[0][0]), math.sqrt(g[1][1])
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    ratio = g[0][1] / (na * nb)
    dot = ratio if math.isnan(ratio) else min(max(ratio, -1.0), 1.0)
    if abs(dot) > dot_threshold:
        ca, cb = 1.0 - t, t
    else:  # a NaN dot (non-finite inputs) lands here and gives NaN coefficients, as the reference
        theta = math.acos(dot)
        s = math.sin(theta)
        ca = math.sin((1.0 - t) * theta) / s if s != 0 else math.nan
        cb = math.sin(t * theta) / s if s != 0 else math.nan
    return combine(None, [a, b], layout, torch.tensor([[ca, cb]], dtype=torch.float64), None, out_dtype)


def interp_nuslerp(a: Tensor, b: Tensor, base: Optional[Tensor], t: float, flatten: bool, row_wise: bool,
                   eps: float, out_dtype: torch.dtype, gram: GramFn, combine: CombineFn) -> Tensor:
    """nuslerp: per vector of the layout, the angle in double, then [base +] (c0·v0 + c1·v1) / div."""
    layout = (whole_layout if flatten else dim0_layout if row_wise else rows_layout)(a.shape)
    if layout[0] == 0:
        return torch.empty(a.shape, dtype=out_dtype, device=a.device)
    g = gram(base, [a, b], layout)
    n0 = g[:, 0, 0].sqrt().clamp(min=1e-7)
    n1 = g[:, 1, 1].sqrt().clamp(min=1e-7)
    cos = (g[:, 0, 1] / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta))
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta))
    div = torch.where(colinear, torch.ones_like(cos), torch.sin(theta))
    return combine(base, [a, b], layout, torch.stack([c0, c1], dim=1), div, out_dtype)


def interp_multislerp(models: List[Tensor], weight: List[float], base: Optional[Tensor], normalize_weights: bool,
                      eps: float, out_dtype: torch.dtype, gram: GramFn, combine: CombineFn) -> Tensor:
    """multislerp: every vector of the reference expressed in the basis of the inputs' units, in double."""
    n = len(models)
    layout = whole_layout(models[0].shape)
    if n == 1:
        return models[0].detach().to(out_dtype, copy=True)
    w = torch.tensor(weight, dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    if layout[0] == 0:
        return torch.empty(models[0].shape, dtype=out_dtype, device=models[0].device)
    g = gram(base, models, layout)[0]
    norms = torch.diagonal(g).clamp(min=0).sqrt()
    s = 1.0 / (norms + eps)                      # uᵢ = sᵢ·xᵢ
    gu = g * s[:, None] * s[None, :]             # the Gram matrix of the uᵢ
    mean_norm = math.sqrt(max(float(w @ gu @ w), 0.0))
    if mean_norm < eps:
        if n != 2:
            raise ValueError("models: the weighted sum of the unit vectors is zero (antipodal inputs whose weights "
                             "cancel); multislerp needs other weights for more than two inputs")
        coeffs = w
    else:
        mu = w / mean_norm                       # m̂ = Σ μᵢ·uᵢ
        dots = gu @ mu                           # uᵢ·m̂
        r = w - (w * dots).sum() * mu            # the tangent Σ wᵢ(uᵢ − (uᵢ·m̂)·m̂) = Σ rᵢ·uᵢ
        rho = math.sqrt(max(float(r @ gu @ r), 0.0)) + eps
        avg = float((norms * w).sum())
        coeffs = (mu * math.cos(rho) + r * (math.sin(rho) / rho)) * avg * s
    return combine(base, models, layout, coeffs[None, :], None, out_dtype)


def interp_karcher(models: List[Tensor], max_iter: int, tol: float, out_dtype: torch.dtype, gram: GramFn,
                   combine: CombineFn) -> Tensor:
    """karcher: the iteration on coefficient vectors over the valid units, in double."""
    n = len(models)
    layout = whole_layout(models[0].shape)
    if n == 1:
        return models[0].detach().to(out_dtype, copy=True)
    if layout[0] == 0:
        return torch.empty(models[0].shape, dtype=out_dtype, device=models[0].device)
    g = gram(None, models, layout)[0]
    norms = torch.diagonal(g).clamp(min=0).sqrt().tolist()
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return combine(None, models, layout, torch.zeros(1, n, dtype=torch.float64), None, out_dtype)
    m = len(valid)
    inv = torch.tensor([1.0 / norms[i] for i in valid], dtype=torch.float64)
    gu = g[valid][:, valid] * inv[:, None] * inv[None, :]   # the Gram matrix of the valid units

    def norm_of(c: Tensor) -> float:
        return math.sqrt(max(float(c @ gu @ c), 0.0))

    a_hat = torch.full((m,), 1.0 / m, dtype=torch.float64)   # equal weights over the valid inputs
    mn = norm_of(a_hat)
    c = torch.nn.functional.one_hot(torch.tensor(0), m).to(torch.float64) if mn < tol else a_hat / mn
    for _ in range(max_iter):
        tangent = torch.zeros(m, dtype=torch.float64)
        dots = (gu @ c).clamp(-1.0, 1.0)
        for i in range(m):
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            e = torch.zeros(m, dtype=torch.float64)
            e[i] = 1.0
            tangent = tangent + a_hat[i] * (theta / math.sin(theta)) * (e - dots[i] * c)
        tn = norm_of(tangent)
        if tn < tol:
            break
        c = math.cos(tn) * c + math.sin(tn) * (tangent / tn)
        un = norm_of(c)
        if un > tol:
            c = c / un
    scale = sum(norms) / n
    coeffs = torch.zeros(n, dtype=torch.float64)
    coeffs[valid] = scale * c * inv
    return combine(None, models, layout, coeffs[None, :], None, out_dtype)


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
