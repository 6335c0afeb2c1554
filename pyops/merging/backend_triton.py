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

Every op is a `triton_op`, so it traces under `torch.compile(fullgraph=True)`. The merge methods
are forward only: their gradients (masks held fixed) are computed by the reference, and merge.py
sends calls that need them there, with that reason. The kernels take CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1, in fp32 / fp16 / bf16; ranks are int32 (`MERGE.limits`).
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
