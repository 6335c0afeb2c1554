"""The CUDA path of `pyops.merge` (csrc/cuda/merge.cu, kernels in csrc/cuda/merge_kernels.cuh):
ties, dare / dare_linear, dare_ties, breadcrumbs, della / della_linear and consensus, forward, and
the backward with every mask held fixed for all of them but consensus.

`pyops.merging.merge` validates and chooses the backend; `run` here makes the inputs contiguous,
lays out the coefficients, allocates the output and the kernels' workspace and calls the
registered ops:

    pyops::merge_cuda            functional, with autograd
    pyops::merge_cuda_out        the same, writing into `out`
    pyops::merge_cuda_backward   grad_base, grad_deltas, grad_coeffs (masks held fixed)

TIES' per-block threshold is an exact three-digit radix select of |τ| on the device (one CTA per
block when there are many blocks, a histogram spread over the GPU when there are few), then one
combine pass; DARE's and DELLA's Philox masks are drawn in the combine; breadcrumbs and DELLA
take their per-block ranks of |τ| from a stable device sort (`merge_ranks.block_ranks`, as the
Triton path). The forward's bits, and the backward's grad_base / grad_deltas, are the C++ CPU
kernels' (csrc/cpu/merge.h); grad_coeffs is reduced in a fixed order (fp32 products summed in
double), so it is deterministic but not the CPU's bits. consensus, whose mask depends on the
coefficients, takes its gradients from the reference.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from pyops import _native
from pyops.merging import task_arithmetic as TM
from pyops.merging.registry import define_merge_ops
from pyops.merging.spec import resolve_normalize
from pyops.kernels.merging.ranks import block_ranks
from pyops.merging import reference as ref

METHODS = ("ties", "dare", "dare_linear", "dare_ties", "breadcrumbs", "della", "della_linear", "consensus")
# Method codes of csrc/cpu/merge.h, which the CUDA kernels share.
METHOD_CODES = {"ties": 1, "dare": 2, "dare_linear": 2, "dare_ties": 3, "breadcrumbs": 4, "della": 5,
                "della_linear": 6, "consensus": 7}
RANKED_CODES = (4, 5, 6)

_U64 = 1 << 64


def _common_args(base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float], block_size: int,
                 from_models: bool, method: int, lam: float, seed: int, name_hash: int, normalize: bool,
                 gamma: float, epsilon: float) -> tuple[dict, list]:
    base = base.detach().contiguous()
    deltas = [d.detach().contiguous() for d in deltas]
    c, s_n, s_b = TM._coeff_layout(coeffs)
    ptrs = TM._device_pointer_array(deltas, base.device)
    dens = torch.tensor([float(x) for x in density], dtype=torch.float32, device=base.device)
    ranks = block_ranks(base, deltas, block_size, from_models) if method in RANKED_CODES else None
    args = dict(base=base.data_ptr(), delta_ptrs=ptrs.data_ptr(), n=len(deltas),
                in_dtype=_native.dtype_code(base.dtype), coeffs=c.data_ptr(), coeff_stride_n=s_n,
                coeff_stride_block=s_b, density=dens.data_ptr(), numel=base.numel(), block_size=int(block_size),
                from_models=bool(from_models), method=int(method), lam=float(lam), seed=int(seed) & (_U64 - 1),
                name_hash=int(name_hash), gamma=float(gamma), epsilon=float(epsilon),
                ranks=0 if ranks is None else ranks.data_ptr(), normalize=bool(normalize))
    return args, [base, *deltas, c, ptrs, dens, ranks]


def kernel_args(out: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int, k: int,
                tall_lambda: float, normalize: bool, gamma: float, epsilon: float) -> tuple[dict, list]:
    """The forward kernel's arguments (pointers as ints; the pointer array, densities and ranks are
    tensors on base's device) and the tensors that must stay alive while it runs. Shared with the
    emulated test of the same kernels (tests/merging/test_methods_cuda_emulated.py)."""
    args, keep = _common_args(base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash,
                              normalize, gamma, epsilon)
    args.update(out=out.data_ptr(), out_dtype=_native.dtype_code(out.dtype), k=int(k), tall_lambda=float(tall_lambda))
    return args, keep


def backward_args(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                  block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int,
                  normalize: bool, gamma: float, epsilon: float, grad_base: Optional[Tensor],
                  grad_deltas: Optional[List[Tensor]], grad_coeffs: Optional[Tensor]) -> tuple[dict, list]:
    """The backward kernel's arguments, as `kernel_args`; grad_coeffs is [N, n_blocks] fp32."""
    args, keep = _common_args(base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash,
                              normalize, gamma, epsilon)
    grad = grad.detach().contiguous()
    gptrs = TM._device_pointer_array(grad_deltas, base.device) if grad_deltas else None
    args.update(grad=grad.data_ptr(), grad_dtype=_native.dtype_code(grad.dtype),
                grad_base=grad_base.data_ptr() if grad_base is not None else 0,
                grad_delta_ptrs=gptrs.data_ptr() if gptrs is not None else 0,
                grad_coeffs=grad_coeffs.data_ptr() if grad_coeffs is not None else 0)
    return args, keep + [grad, gptrs]


def _launch(kernel: str, args: dict, device: torch.device, grad_coeffs: bool) -> None:
    """Calls `pyops._C_cuda.<kernel>` on the current stream of `device` with its workspace. The
    caching allocator keeps the workspace (and the caller's argument tensors, dropped after this
    returns) for the stream's later work, so freeing them before the kernel ends is safe."""
    mod = _native.cuda_module
    nbytes = mod.merge_workspace_bytes(args["numel"], args["block_size"], args["n"], args["method"], grad_coeffs)
    ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    with torch.cuda.device(device):  # the kernels run on the current device
        getattr(mod, kernel)(**args, workspace=ws.data_ptr(), workspace_bytes=nbytes,
                             stream=torch.cuda.current_stream(device).cuda_stream)


def _forward_into(out: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                  block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int, k: int,
                  tall_lambda: float, normalize: bool, gamma: float, epsilon: float) -> None:
    if out.numel() == 0:
        return
    args, keep = kernel_args(out, base, deltas, coeffs, density, block_size, from_models, method, lam, seed,
                             name_hash, k, tall_lambda, normalize, gamma, epsilon)
    _launch("merge_forward", args, out.device, False)


def _backward_into(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                   block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int, k: int,
                   tall_lambda: float, normalize: bool, gamma: float, epsilon: float, gb: Optional[Tensor],
                   gd: Optional[List[Tensor]], gc: Optional[Tensor]) -> None:
    gc32 = None if gc is None else torch.empty(TM._coeff_grad_shape(len(deltas), base.numel(), block_size),
                                                dtype=torch.float32, device=base.device)
    args, keep = backward_args(grad, base, deltas, coeffs, density, block_size, from_models, method, lam, seed,
                               name_hash, normalize, gamma, epsilon, gb, gd, gc32)
    _launch("merge_backward", args, base.device, gc is not None)
    if gc32 is not None:
        TM._finish_coeff_grad(gc32, coeffs, gc)


_merge_op, _merge_out_op, _merge_backward_op = define_merge_ops("merge_cuda", "cuda", _forward_into, _backward_into)


def run(p: TM.Prepared, method: str, dens: List[float], *, from_models: bool, seed: int, lam: float, name: str,
        k: int, tall_lambda: float, normalize: Optional[bool], gamma: float, epsilon: float,
        out: Optional[Tensor]) -> Tensor:
    """Runs `method` on the CUDA kernels; `p`, `dens` and the parameters are validated by the caller."""
    if method not in METHOD_CODES:
        raise ValueError(f"method: the CUDA kernels implement {', '.join(METHODS)}, got {method!r}")
    normalize = resolve_normalize(method, normalize)
    seed_i64 = seed - _U64 if seed >= 1 << 63 else seed  # the op schema's int is int64
    args = (p.base, p.deltas, p.coeffs, [float(d) for d in dens], p.block_size, from_models, METHOD_CODES[method],
            float(lam), seed_i64, ref.name_hash(name), int(k), float(tall_lambda), bool(normalize), float(gamma),
            float(epsilon))
    if out is None:
        return _merge_op(*args, p.out_dtype)
    _merge_out_op(*args, out)
    return out
