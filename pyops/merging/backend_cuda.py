"""The CUDA path of the merging family (pyops._C_cuda, kernels in csrc/merging/), kept apart from validation.

`pyops.merging.task_arithmetic` and `pyops.merging.merge` validate, choose the backend and tie
each functional op to its backward for autograd; this module declares what the CUDA kernels take
(`TASK_ARITHMETIC`, `MERGE`), registers the ops' CUDA kernels and launches `pyops._C_cuda` on the
current stream of the tensors' device:

    pyops::task_arithmetic{,_out,_backward}   one registered op for CPU and CUDA tensors:
                                              backend_cpu.py defines it (schema, fake kernel, C++
                                              kernel) and this module registers its CUDA kernel
    pyops::merge_cuda            ties, dare / dare_linear, dare_ties, breadcrumbs, della /
    pyops::merge_cuda_out        della_linear and consensus (`registry.define_merge_ops`, shared
    pyops::merge_cuda_backward   with the C++ path); the backward holds every mask fixed

TIES' per-block threshold is an exact three-digit radix select of |τ| on the device (one CTA per
block when there are many blocks, a histogram spread over the GPU when there are few), then one
combine pass; DARE's and DELLA's Philox masks are drawn in the combine; breadcrumbs and DELLA
take their per-block ranks of |τ| from a stable device sort (`pyops.kernels.merging.ranks`, as the
Triton path), int32 ranks. The forward's bits, and the backward's grad_base / grad_deltas, are the
C++ CPU kernels'; grad_coeffs is reduced in a fixed order (fp32 products summed in double), so it
is deterministic but not the CPU's bits. consensus, whose mask depends on the coefficients, takes
its gradients from the reference.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from pyops import _native
from pyops._backend import Capability
from pyops.kernels.merging.ranks import block_ranks
from pyops.merging import backend_cpu
from pyops.merging import registry as R
from pyops.merging import spec

# The native entry points each op calls; TIES counts the elements of a block in 32 bits, the
# ranks of breadcrumbs / DELLA are int32.
TASK_ARITHMETIC = Capability("cuda", functions=("task_arithmetic_forward", "task_arithmetic_backward",
                                                "task_arithmetic_backward_workspace_bytes"))
MERGE = Capability("cuda", functions=("merge_forward", "merge_backward", "merge_workspace_bytes"),
                   limits={R.TIES_BLOCK: 2**32 - 1, R.RANKED_BLOCK: 2**31 - 1})

METHODS = ("ties", "dare", "dare_linear", "dare_ties", "breadcrumbs", "della", "della_linear", "consensus")
# Method codes of the C++ kernels, which the CUDA kernels share.
METHOD_CODES = {"ties": 1, "dare": 2, "dare_linear": 2, "dare_ties": 3, "breadcrumbs": 4, "della": 5,
                "della_linear": 6, "consensus": 7}
RANKED_CODES = (4, 5, 6)


def task_arithmetic_reason(base: Tensor, out_dtype: torch.dtype) -> Optional[str]:
    """None if the CUDA kernels can run task arithmetic on `base` (the tasks share its dtype and
    device) producing `out_dtype`, else why not."""
    return TASK_ARITHMETIC.reason(base.device, base, torch.empty(0, dtype=out_dtype))


def merge_reason(p: R.Prepared, method: str, needs_grad: bool, exact_k: bool = False) -> Optional[str]:
    """None if the CUDA kernels can run `method` on `p` (with gradients if `needs_grad`), else why not."""
    reason = MERGE.reason(p.base.device, p.base, torch.empty(0, dtype=p.out_dtype),
                          **{R.TIES_BLOCK: R.longest_block(p) if method == "ties" else None,
                             R.RANKED_BLOCK: R.ranked_block(p, method)})
    if reason is not None:
        return reason
    if method not in METHOD_CODES:
        return f"the CUDA kernels implement {', '.join(METHODS)}, not {method!r}"
    if exact_k:
        return "the CUDA kernels keep every tie at the k-th magnitude (exact_k: the cpu or reference backend)"
    if needs_grad and method == "consensus":
        return f"gradients for {method!r} are computed by the reference backend"
    return None


# --------------------------------------------------------------------------------------------
# Task arithmetic: the CUDA kernels of backend_cpu's ops
# --------------------------------------------------------------------------------------------

def _task_arithmetic_forward_into(out: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor,
                                  block_size: int, from_models: bool) -> None:
    if out.numel() == 0:
        return
    base = base.contiguous()
    deltas = [d.contiguous() for d in deltas]
    c, s_n, s_b = R.coeff_layout(coeffs)
    ptrs = R.device_pointer_array(deltas, out.device)
    with torch.cuda.device(out.device):  # the kernels run on the current device
        _native.cuda_module.task_arithmetic_forward(
            out.data_ptr(), _native.dtype_code(out.dtype), base.data_ptr(), ptrs.data_ptr(), len(deltas),
            _native.dtype_code(base.dtype), c.data_ptr(), s_n, s_b, base.numel(), block_size, from_models,
            torch.cuda.current_stream(out.device).cuda_stream)


def _task_arithmetic_backward_into(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor,
                                   block_size: int, from_models: bool, gb: Tensor, gd: List[Tensor],
                                   gc: Tensor) -> None:
    prepared = R.backward_inputs(grad, base, deltas, coeffs, block_size, gc)
    if prepared is None:
        return
    grad, base, deltas, (c, s_n, s_b), gc32 = prepared
    numel = base.numel()
    mod = _native.cuda_module
    ptrs = R.device_pointer_array(deltas, base.device)
    gptrs = R.device_pointer_array(gd, base.device) if gd else None
    ws_bytes = mod.task_arithmetic_backward_workspace_bytes(numel, block_size, len(deltas)) if gc32 is not None else 0
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=base.device)
    with torch.cuda.device(base.device):
        mod.task_arithmetic_backward(
            grad.data_ptr(), _native.dtype_code(grad.dtype), base.data_ptr(), ptrs.data_ptr(), len(deltas),
            _native.dtype_code(base.dtype), c.data_ptr(), s_n, s_b, numel, block_size, from_models,
            gb.data_ptr() if gb.numel() else 0, gptrs.data_ptr() if gptrs is not None else 0,
            gc32.data_ptr() if gc32 is not None else 0, ws.data_ptr(), ws_bytes,
            torch.cuda.current_stream(base.device).cuda_stream)
    if gc32 is not None:
        R.finish_coeff_grad(gc32, coeffs, gc)


@backend_cpu.task_arithmetic_op.register_kernel("cuda")
def task_arithmetic_cuda(base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                         from_models: bool, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    _task_arithmetic_forward_into(out, base, deltas, coeffs, block_size, from_models)
    return out


@backend_cpu.task_arithmetic_out_op.register_kernel("cuda")
def task_arithmetic_out_cuda(base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                             from_models: bool, out: Tensor) -> None:
    _task_arithmetic_forward_into(out, base, deltas, coeffs, block_size, from_models)


@backend_cpu.task_arithmetic_backward_op.register_kernel("cuda")
def task_arithmetic_backward_cuda(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor,
                                  block_size: int, from_models: bool, need_base: bool, need_deltas: bool,
                                  need_coeffs: bool) -> tuple[Tensor, List[Tensor], Tensor]:
    gb, gd, gc = R.empty_grads(base, deltas, coeffs, need_base, need_deltas, need_coeffs)
    _task_arithmetic_backward_into(grad, base, deltas, coeffs, block_size, from_models, gb, gd, gc)
    return gb, gd, gc


# --------------------------------------------------------------------------------------------
# The merge methods
# --------------------------------------------------------------------------------------------

def _common_args(base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float], block_size: int,
                 from_models: bool, method: int, lam: float, seed: int, name_hash: int, normalize: bool,
                 gamma: float, epsilon: float) -> tuple[dict, list]:
    base = base.detach().contiguous()
    deltas = [d.detach().contiguous() for d in deltas]
    c, s_n, s_b = R.coeff_layout(coeffs)
    ptrs = R.device_pointer_array(deltas, base.device)
    # fp64, as given: the kernels count k = floor(density·n) in fp64 (mergekit's int(density * n))
    dens = torch.tensor([float(x) for x in density], dtype=torch.float64, device=base.device)
    ranks = block_ranks(base, deltas, block_size, from_models) if method in RANKED_CODES else None
    args = dict(base=base.data_ptr(), delta_ptrs=ptrs.data_ptr(), n=len(deltas),
                in_dtype=_native.dtype_code(base.dtype), coeffs=c.data_ptr(), coeff_stride_n=s_n,
                coeff_stride_block=s_b, density=dens.data_ptr(), numel=base.numel(), block_size=int(block_size),
                from_models=bool(from_models), method=int(method), lam=float(lam),
                seed=R.seed_from_i64(int(seed)), name_hash=int(name_hash), gamma=float(gamma),
                epsilon=float(epsilon), ranks=0 if ranks is None else ranks.data_ptr(), normalize=bool(normalize))
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
    gptrs = R.device_pointer_array(grad_deltas, base.device) if grad_deltas else None
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


def _merge_forward_into(out: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                        block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int,
                        k: int, tall_lambda: float, normalize: bool, gamma: float, epsilon: float) -> None:
    if out.numel() == 0:
        return
    args, keep = kernel_args(out, base, deltas, coeffs, density, block_size, from_models, method, lam, seed,
                             name_hash, k, tall_lambda, normalize, gamma, epsilon)
    _launch("merge_forward", args, out.device, False)


def _merge_backward_into(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                         block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int,
                         k: int, tall_lambda: float, normalize: bool, gamma: float, epsilon: float,
                         gb: Optional[Tensor], gd: Optional[List[Tensor]], gc: Optional[Tensor]) -> None:
    gc32 = None if gc is None else torch.empty(R.coeff_grad_shape(len(deltas), base.numel(), block_size),
                                                dtype=torch.float32, device=base.device)
    args, keep = backward_args(grad, base, deltas, coeffs, density, block_size, from_models, method, lam, seed,
                               name_hash, normalize, gamma, epsilon, gb, gd, gc32)
    _launch("merge_backward", args, base.device, gc is not None)
    if gc32 is not None:
        R.finish_coeff_grad(gc32, coeffs, gc)


merge_op, merge_out_op, merge_backward_op = R.define_merge_ops("merge_cuda", "cuda", _merge_forward_into,
                                                               _merge_backward_into)


def run(p: R.Prepared, method: str, dens: List[float], *, from_models: bool, seed: int, lam: float, name: str,
        k: int, tall_lambda: float, normalize: Optional[bool], gamma: float, epsilon: float,
        out: Optional[Tensor]) -> Tensor:
    """Runs `method` on the CUDA kernels; `p`, `dens` and the parameters are validated by the caller."""
    if method not in METHOD_CODES:
        raise ValueError(f"method: the CUDA kernels implement {', '.join(METHODS)}, got {method!r}")
    normalize = spec.resolve_normalize(method, normalize)
    args = (p.base, p.deltas, p.coeffs, [float(d) for d in dens], p.block_size, from_models, METHOD_CODES[method],
            float(lam), R.seed_to_i64(seed), spec.name_hash(name), int(k), float(tall_lambda), bool(normalize),
            float(gamma), float(epsilon))
    if out is None:
        return merge_op(*args, p.out_dtype)
    merge_out_op(*args, out)
    return out
