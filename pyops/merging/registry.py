"""Registration of a native merge path's three ops (`define_merge_ops`), shared by the C++
(`merge_native.py`) and the CUDA (`merge_cuda.py`) paths, which take the same arguments:

    pyops::<name>            functional, with autograd (every mask held fixed)
    pyops::<name>_out        the same, writing into `out`
    pyops::<name>_backward   grad_base, grad_deltas, grad_coeffs

The path supplies `forward_into(out, base, deltas, coeffs, *params)` and
`backward_into(grad, base, deltas, coeffs, *params, grad_base, grad_deltas, grad_coeffs)`, whose
outputs are None when not wanted (grad_coeffs has coeffs' shape); params are (density, block_size,
from_models, method, lam, seed, name_hash, k, tall_lambda, normalize, gamma, epsilon), as the C++
kernels' MergeProblem holds them.
"""
from __future__ import annotations

from typing import Callable, List

import torch
from torch import Tensor

from pyops.merging import task_arithmetic as TM


def define_merge_ops(name: str, device_types: str, forward_into: Callable, backward_into: Callable):
    """Registers the three ops of one path; returns (functional, out variant, backward)."""

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
        """Gradients with every mask (trim, drop, rank band, election) held fixed: csrc/cpu/merge.h."""
        gb, gd, gc = TM._empty_grads(base, deltas, coeffs, need_base, need_deltas, need_coeffs)
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
        return TM._empty_grads(base, deltas, coeffs, need_base, need_deltas, need_coeffs)

    def setup(ctx, inputs, output):
        base, deltas, coeffs, *params, _out_dtype = inputs
        ctx.save_for_backward(base, coeffs, *deltas)
        ctx.params = params
        ctx.need = (base.requires_grad, any(d.requires_grad for d in deltas), coeffs.requires_grad)

    def backward(ctx, grad):
        base, coeffs, *deltas = ctx.saved_tensors
        need_base, need_deltas, need_coeffs = ctx.need
        gb, gd, gc = merge_backward_op(grad, base, deltas, coeffs, *ctx.params, need_base, need_deltas, need_coeffs)
        return (gb if need_base else None, list(gd) if need_deltas else [None] * len(deltas),
                gc if need_coeffs else None) + (None,) * (len(ctx.params) + 1)

    merge_op.register_autograd(backward, setup_context=setup)
    return merge_op, merge_out_op, merge_backward_op
