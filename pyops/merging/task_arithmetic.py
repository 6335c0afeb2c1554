"""Block-wise task arithmetic: validation, backend choice, registered ops and autograd.

Public entry points (re-exported as `pyops.task_arithmetic` and
`pyops.task_arithmetic_from_models`); the math is in `pyops/merging/reference.py`.

Registered ops (DESIGN rule 2):
    pyops::task_arithmetic               functional, C++ CPU (`pyops._C`) or CUDA (`pyops._C_cuda`)
    pyops::task_arithmetic_backward      its backward, same devices
    pyops::task_arithmetic_out           writes into `out` (no autograd, like torch's out= ops)
    pyops::task_arithmetic_triton        Triton (`torch.library.triton_op`)
    pyops::task_arithmetic_triton_backward
    pyops::task_arithmetic_triton_out
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from pyops import _backend, _native
from pyops._triton import triton_family_reason
from pyops import _validate as V
from pyops.merging.spec import Blocks, resolve_blocks  # noqa: F401 (part of this module's API)
from pyops.merging import reference as ref

OP = "task_arithmetic"
GPU_ORDER = ("cuda", "triton")



# --------------------------------------------------------------------------------------------
# Validation and normalisation
# --------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    base: Tensor
    deltas: List[Tensor]
    coeffs: Tensor
    block_size: int
    n_blocks: int
    out_dtype: torch.dtype


def _as_delta_list(deltas: object, base: Tensor, name: str) -> List[Tensor]:
    if isinstance(deltas, torch.Tensor):
        if deltas.dim() != base.dim() + 1 or tuple(deltas.shape[1:]) != tuple(base.shape):
            raise ValueError(
                f"{name}: expected a stacked tensor of shape [N, {', '.join(map(str, base.shape))}] "
                f"(N task tensors of base's shape {V.fmt_shape(base.shape)}), got {V.fmt_shape(deltas.shape)}")
        items = list(deltas.unbind(0))
        V.check_float_tensor(deltas, name)
    elif isinstance(deltas, (list, tuple)):
        items = list(deltas)
        for i, d in enumerate(items):
            V.check_float_tensor(d, f"{name}[{i}]")
            V.check_shape(d, f"{name}[{i}]", base.shape, "base's shape")
    else:
        raise TypeError(f"{name}: expected a stacked tensor [N, *shape] or a list of tensors, got {type(deltas).__name__}")
    if len(items) == 0:
        raise ValueError(f"{name}: expected at least one task tensor, got 0")
    for i, d in enumerate(items):
        V.check_same_dtype(d, f"{name}[{i}]", base, "base")
        V.check_same_device(d, f"{name}[{i}]", base, "base")
    return items


def _as_coeffs(coeffs: object, n: int, n_blocks: int, base: Tensor, blocks: Blocks) -> Tensor:
    if not isinstance(coeffs, torch.Tensor):
        if isinstance(coeffs, (list, tuple)) and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coeffs):
            coeffs = torch.tensor(coeffs, dtype=torch.float32, device=base.device)
        else:
            raise TypeError(f"coeffs: expected a tensor [N] or [N, n_blocks] or a list of floats, got {type(coeffs).__name__}")
    V.check_float_tensor(coeffs, "coeffs")
    V.check_same_device(coeffs, "coeffs", base, "base")
    if coeffs.dim() == 1 and coeffs.shape[0] == n:
        return coeffs
    if coeffs.dim() == 2 and tuple(coeffs.shape) == (n, n_blocks):
        return coeffs
    raise ValueError(
        f"coeffs: expected shape [{n}] or [{n}, {n_blocks}] (N={n} tasks, {n_blocks} blocks for blocks={blocks!r}), "
        f"got {V.fmt_shape(coeffs.shape)}")


def prepare(base: object, deltas: object, coeffs: object, blocks: Blocks, out_dtype: object,
            deltas_name: str = "deltas") -> Prepared:
    base = V.check_float_tensor(base, "base")
    items = _as_delta_list(deltas, base, deltas_name)
    block_size, n_blocks = resolve_blocks(blocks, base.shape)
    c = _as_coeffs(coeffs, len(items), n_blocks, base, blocks)
    od = base.dtype if out_dtype is None else V.check_float_dtype(out_dtype, "out_dtype")
    return Prepared(base, items, c, block_size, n_blocks, od)


def check_out(out: object, p: Prepared, out_dtype: object) -> Tensor:
    out = V.check_tensor(out, "out")
    V.check_shape(out, "out", p.base.shape, "base's shape")
    V.check_same_device(out, "out", p.base, "base")
    if out_dtype is not None and out.dtype != out_dtype:
        raise TypeError(f"out: expected dtype {out_dtype} (out_dtype), got {out.dtype}")
    V.check_float_dtype(out.dtype, "out.dtype")
    if not out.is_contiguous():
        raise ValueError("out: expected a contiguous tensor, got a non-contiguous one")
    if not torch.compiler.is_compiling():
        V.check_no_partial_overlap(out, [*p.deltas, p.coeffs, p.base], allow_alias=p.base)
    return out


# --------------------------------------------------------------------------------------------
# Backends: can_run
# --------------------------------------------------------------------------------------------

def _can_run(p: Prepared, out_dtype: torch.dtype) -> dict:
    dev = p.base.device
    dtype_reason = _native.native_dtype_reason(p.base, torch.empty(0, dtype=out_dtype))

    def cpu() -> Optional[str]:
        if _native.cpu_module is None:
            return _native.cpu_missing_reason
        if dev.type != "cpu":
            return f"tensors are on {dev.type}, the C++ kernels take CPU tensors"
        return dtype_reason

    def cuda() -> Optional[str]:
        if _native.cuda_module is None:
            return _native.cuda_missing_reason
        if dev.type != "cuda":
            return f"tensors are on {dev.type}, the CUDA kernels take CUDA tensors"
        return dtype_reason

    def triton() -> Optional[str]:
        return triton_family_reason(dev, "merging.task_arithmetic") or dtype_reason

    return {"reference": lambda: None, "cpu": cpu, "cuda": cuda, "triton": triton}


def choose_backend(p: Prepared, backend: str) -> str:
    return _backend.select(OP, backend, _can_run(p, p.out_dtype),
                           _backend.default_order(p.base.device, GPU_ORDER))


# --------------------------------------------------------------------------------------------
# Native (C++ CPU / CUDA) ops
# --------------------------------------------------------------------------------------------

def _coeff_layout(coeffs: Tensor) -> tuple[Tensor, int, int]:
    """fp32 contiguous coefficients and their (task, block) strides; a [N] vector broadcasts."""
    c = coeffs.detach().to(torch.float32).contiguous()
    return (c, c.shape[1], 1) if c.dim() == 2 else (c, 1, 0)


def _device_pointer_array(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def _native_forward_into(out: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor,
                         block_size: int, from_models: bool) -> None:
    if out.numel() == 0:
        return
    base = base.contiguous()
    deltas = [d.contiguous() for d in deltas]
    c, s_n, s_b = _coeff_layout(coeffs)
    args = dict(out_dtype=_native.dtype_code(out.dtype), base=base.data_ptr(),
                in_dtype=_native.dtype_code(base.dtype), coeffs=c.data_ptr(), coeff_stride_n=s_n,
                coeff_stride_block=s_b, numel=base.numel(), block_size=block_size, from_models=from_models)
    if out.device.type == "cpu":
        _native.cpu_module.task_arithmetic_forward(
            out=out.data_ptr(), deltas=[d.data_ptr() for d in deltas], n_threads=torch.get_num_threads(), **args)
    else:
        ptrs = _device_pointer_array(deltas, out.device)
        with torch.cuda.device(out.device):  # the kernels run on the current device
            _native.cuda_module.task_arithmetic_forward(
                out.data_ptr(), args["out_dtype"], args["base"], ptrs.data_ptr(), len(deltas), args["in_dtype"],
                args["coeffs"], s_n, s_b, args["numel"], block_size, from_models,
                torch.cuda.current_stream(out.device).cuda_stream)


@torch.library.custom_op("pyops::task_arithmetic", mutates_args=(), device_types=("cpu", "cuda"))
def _native_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
               from_models: bool, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    _native_forward_into(out, base, deltas, coeffs, block_size, from_models)
    return out


@torch.library.custom_op("pyops::task_arithmetic_out", mutates_args=("out",), device_types=("cpu", "cuda"))
def _native_out_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                   from_models: bool, out: Tensor) -> None:
    _native_forward_into(out, base, deltas, coeffs, block_size, from_models)


def _empty_grads(base: Tensor, deltas: List[Tensor], coeffs: Tensor, need_base: bool, need_deltas: bool,
                 need_coeffs: bool) -> tuple[Tensor, List[Tensor], Tensor]:
    """Allocations for the backward; outputs that are not needed are empty tensors."""
    gb = torch.empty_like(base, memory_format=torch.contiguous_format) if need_base else base.new_empty(0)
    gd = [torch.empty_like(d, memory_format=torch.contiguous_format) for d in deltas] if need_deltas else []
    gc = coeffs.new_empty(coeffs.shape) if need_coeffs else coeffs.new_empty(0)
    return gb, gd, gc


def _coeff_grad_shape(n: int, numel: int, block_size: int) -> tuple[int, int]:
    return n, (numel + block_size - 1) // block_size


def _finish_coeff_grad(gc32: Tensor, coeffs: Tensor, out: Tensor) -> None:
    """gc32 is [N, n_blocks] fp32; a [N] coefficient vector gets the sum over blocks."""
    out.copy_(gc32.sum(dim=1) if coeffs.dim() == 1 else gc32)


def _native_backward_into(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor,
                          block_size: int, from_models: bool, gb: Tensor, gd: List[Tensor], gc: Tensor) -> None:
    numel = base.numel()
    if numel == 0:
        if gc.numel():
            gc.zero_()
        return
    grad = grad.contiguous()
    base = base.contiguous()
    deltas = [d.contiguous() for d in deltas]
    c, s_n, s_b = _coeff_layout(coeffs)
    gc32 = torch.empty(_coeff_grad_shape(len(deltas), numel, block_size), dtype=torch.float32,
                       device=base.device) if gc.numel() else None
    common = (_native.dtype_code(grad.dtype), base.data_ptr())
    if base.device.type == "cpu":
        _native.cpu_module.task_arithmetic_backward(
            grad.data_ptr(), *common, [d.data_ptr() for d in deltas], _native.dtype_code(base.dtype),
            c.data_ptr(), s_n, s_b, numel, block_size, from_models,
            gb.data_ptr() if gb.numel() else 0, [t.data_ptr() for t in gd],
            gc32.data_ptr() if gc32 is not None else 0, torch.get_num_threads())
    else:
        mod = _native.cuda_module
        ptrs = _device_pointer_array(deltas, base.device)
        gptrs = _device_pointer_array(gd, base.device) if gd else None
        ws_bytes = mod.task_arithmetic_backward_workspace_bytes(numel, block_size, len(deltas)) if gc32 is not None else 0
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=base.device)
        with torch.cuda.device(base.device):
            mod.task_arithmetic_backward(
                grad.data_ptr(), *common, ptrs.data_ptr(), len(deltas), _native.dtype_code(base.dtype),
                c.data_ptr(), s_n, s_b, numel, block_size, from_models,
                gb.data_ptr() if gb.numel() else 0, gptrs.data_ptr() if gptrs is not None else 0,
                gc32.data_ptr() if gc32 is not None else 0, ws.data_ptr(), ws_bytes,
                torch.cuda.current_stream(base.device).cuda_stream)
    if gc32 is not None:
        _finish_coeff_grad(gc32, coeffs, gc)


@torch.library.custom_op("pyops::task_arithmetic_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _native_backward_op(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                        from_models: bool, need_base: bool, need_deltas: bool,
                        need_coeffs: bool) -> tuple[Tensor, List[Tensor], Tensor]:
    gb, gd, gc = _empty_grads(base, deltas, coeffs, need_base, need_deltas, need_coeffs)
    _native_backward_into(grad, base, deltas, coeffs, block_size, from_models, gb, gd, gc)
    return gb, gd, gc


# --------------------------------------------------------------------------------------------
# Triton ops (kernels/merging/task_arithmetic.py)
# --------------------------------------------------------------------------------------------

def _triton_kernels():
    from pyops.kernels.merging import task_arithmetic as k  # imported lazily: Triton is optional
    return k


@torch.library.triton_op("pyops::task_arithmetic_triton", mutates_args=())
def _triton_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
               from_models: bool, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    _triton_kernels().task_arithmetic_forward(out, base.contiguous(), [d.contiguous() for d in deltas],
                                              *_coeff_layout(coeffs), block_size, from_models)
    return out


@torch.library.triton_op("pyops::task_arithmetic_triton_out", mutates_args=("out",))
def _triton_out_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                   from_models: bool, out: Tensor) -> None:
    _triton_kernels().task_arithmetic_forward(out, base.contiguous(), [d.contiguous() for d in deltas],
                                              *_coeff_layout(coeffs), block_size, from_models)


@torch.library.triton_op("pyops::task_arithmetic_triton_backward", mutates_args=())
def _triton_backward_op(grad: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, block_size: int,
                        from_models: bool, need_base: bool, need_deltas: bool,
                        need_coeffs: bool) -> tuple[Tensor, List[Tensor], Tensor]:
    gb, gd, gc = _empty_grads(base, deltas, coeffs, need_base, need_deltas, need_coeffs)
    numel = base.numel()
    gc32 = torch.zeros(_coeff_grad_shape(len(deltas), numel, block_size), dtype=torch.float32,
                       device=base.device) if need_coeffs else None
    if numel > 0:
        _triton_kernels().task_arithmetic_backward(
            grad.contiguous(), base.contiguous(), [d.contiguous() for d in deltas], *_coeff_layout(coeffs),
            block_size, from_models, gb if need_base else None, gd if need_deltas else None, gc32)
    if gc32 is not None:
        _finish_coeff_grad(gc32, coeffs, gc)
    return gb, gd, gc


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd (shared by the native and Triton pairs)
# --------------------------------------------------------------------------------------------

def _fake_forward(base, deltas, coeffs, block_size, from_models, out_dtype):
    return torch.empty(base.shape, dtype=out_dtype, device=base.device)


def _fake_out(base, deltas, coeffs, block_size, from_models, out):
    return None


def _fake_backward(grad, base, deltas, coeffs, block_size, from_models, need_base, need_deltas, need_coeffs):
    return _empty_grads(base, deltas, coeffs, need_base, need_deltas, need_coeffs)


def _setup_context(ctx, inputs, output):
    base, deltas, coeffs, block_size, from_models, _ = inputs
    ctx.save_for_backward(base, coeffs, *deltas)
    ctx.block_size = block_size
    ctx.from_models = from_models
    ctx.need = (base.requires_grad, any(d.requires_grad for d in deltas), coeffs.requires_grad)


def _make_backward(backward_op):
    def backward(ctx, grad):
        base, coeffs, *deltas = ctx.saved_tensors
        need_base, need_deltas, need_coeffs = ctx.need
        gb, gd, gc = backward_op(grad, base, deltas, coeffs, ctx.block_size, ctx.from_models,
                                 need_base, need_deltas, need_coeffs)
        return (gb if need_base else None, list(gd) if need_deltas else [None] * len(deltas),
                gc if need_coeffs else None, None, None, None)
    return backward


for _fwd, _out, _bwd in ((_native_op, _native_out_op, _native_backward_op),
                         (_triton_op, _triton_out_op, _triton_backward_op)):
    _fwd.register_fake(_fake_forward)
    _out.register_fake(_fake_out)
    _bwd.register_fake(_fake_backward)
    _fwd.register_autograd(_make_backward(_bwd), setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

_FUNCTIONAL = {"cpu": _native_op, "cuda": _native_op, "triton": _triton_op}
_OUT = {"cpu": _native_out_op, "cuda": _native_out_op, "triton": _triton_out_op}


def _output_dtype(out: object, out_dtype: object) -> object:
    """The dtype to produce: out_dtype, else out's dtype (checked under the name `out`)."""
    if out is None or out_dtype is not None:
        return out_dtype
    return V.check_float_dtype(V.check_tensor(out, "out").dtype, "out.dtype")


def _run(p: Prepared, from_models: bool, out: Optional[Tensor], backend: str) -> Tensor:
    name = choose_backend(p, backend)
    if out is None:
        if name == "reference":
            return ref.task_arithmetic(p.base, p.deltas, p.coeffs, block_size=p.block_size,
                                       from_models=from_models, out_dtype=p.out_dtype)
        return _FUNCTIONAL[name](p.base, p.deltas, p.coeffs, p.block_size, from_models, p.out_dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (p.base, p.coeffs, *p.deltas)):
        raise RuntimeError(
            f"{OP}(): out= does not support automatic differentiation (an input requires grad); "
            "call it without out= to get gradients")
    if name == "reference":
        with torch.no_grad():
            out.copy_(ref.task_arithmetic(p.base, p.deltas, p.coeffs, block_size=p.block_size,
                                          from_models=from_models, out_dtype=out.dtype))
    elif name == "cpu" and _backend.direct():  # the streaming merge: no dispatcher (see direct_kernels)
        _native_forward_into(out, p.base, p.deltas, p.coeffs, p.block_size, from_models)
    else:
        _OUT[name](p.base, p.deltas, p.coeffs, p.block_size, from_models, out)
    return out


def task_arithmetic(
    base: Tensor,
    deltas: Union[Tensor, Sequence[Tensor]],
    coeffs: Union[Tensor, Sequence[float]],
    *,
    blocks: Blocks = None,
    out: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> Tensor:
    """Fused block-wise task arithmetic: ``base + Σᵢ coeffs[i, block] · deltas[i]`` in one pass.

    Follows task arithmetic (Ilharco et al., ICLR 2023) with aTLAS-style block coefficients
    (Zhang et al., NeurIPS 2024); see `pyops.merging.reference` for the definition.

    Args:
        base: `[*shape]`, float32 / float16 / bfloat16 (float64: reference backend only).
        deltas: task vectors, a stacked `[N, *shape]` tensor or a list of N `[*shape]` tensors,
            same dtype and device as `base`. A list is never stacked (no copy).
        coeffs: `[N]` (one weight per task, every block) or `[N, n_blocks]`; any float dtype,
            or a list of N floats. The global scale λ is folded in by the caller.
        blocks: ``None`` (default) one block = the whole tensor (aTLAS); ``"rows"`` one block per
            index of the first dimension; an int ``b``: chunks of ``b`` elements of the flattened
            tensor, the last possibly shorter.
        out: optional preallocated contiguous output of base's shape. May be ``base`` itself
            (an in-place update); must not partially overlap any input. No autograd with `out=`.
        out_dtype: output dtype; default ``out.dtype`` if `out` is given, else base's dtype.
        backend: ``"auto"`` | ``"reference"`` | ``"cpu"`` | ``"triton"`` | ``"cuda"``.

    Returns:
        `[*shape]` tensor. Accumulation is fp32 whatever the input dtype. Differentiable with
        respect to `base`, every delta and `coeffs` (the gradient of ``coeffs[i, b]`` is the sum
        over block b of ``grad · deltas[i]``).
    """
    p = prepare(base, deltas, coeffs, blocks, _output_dtype(out, out_dtype))
    if out is not None:
        out = check_out(out, p, out_dtype)
    return _run(p, False, out, backend)


def task_arithmetic_from_models(
    base: Tensor,
    finetuned: Union[Tensor, Sequence[Tensor]],
    coeffs: Union[Tensor, Sequence[float]],
    *,
    blocks: Blocks = None,
    out: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> Tensor:
    """Task arithmetic from fine-tuned weights: ``base + Σᵢ coeffs[i, block] · (finetuned[i] − base)``.

    The task vectors are formed on the fly inside the kernel and never materialised. Arguments
    as in `task_arithmetic`, with `finetuned` (`[N, *shape]` or a list of N `[*shape]`) in place
    of `deltas`. Gradients: ``base`` gets ``grad · (1 − Σᵢ coeffs[i, block])``, ``finetuned[i]``
    gets ``coeffs[i, block] · grad``, ``coeffs[i, b]`` gets ``Σ_block grad · (finetuned[i] − base)``.
    """
    p = prepare(base, finetuned, coeffs, blocks, _output_dtype(out, out_dtype), deltas_name="finetuned")
    if out is not None:
        out = check_out(out, p, out_dtype)
    return _run(p, True, out, backend)
