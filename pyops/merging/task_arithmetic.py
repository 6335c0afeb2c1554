"""Block-wise task arithmetic: validation, backend choice and autograd.

Public entry points (re-exported as `pyops.task_arithmetic` and
`pyops.task_arithmetic_from_models`); the math is in `pyops/merging/reference.py`. `prepare` and
`check_out` also validate the tensors of `pyops.merge`.

Registered ops (docs/design.md#registration), each with its backward op as its gradient (registered here):
    pyops::task_arithmetic               functional: C++ CPU (backend_cpu.py) or CUDA (backend_cuda.py)
    pyops::task_arithmetic_backward      its backward, same devices
    pyops::task_arithmetic_out           writes into `out` (no autograd, like torch's out= ops)
    pyops::task_arithmetic_triton        Triton (backend_triton.py, `torch.library.triton_op`)
    pyops::task_arithmetic_triton_backward
    pyops::task_arithmetic_triton_out
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from pyops import _backend
from pyops import _validate as V
from pyops.merging import backend_cpu, backend_cuda, backend_triton  # importing them registers their ops
from pyops.merging import reference as ref
from pyops.merging.registry import Prepared
from pyops.merging.spec import Blocks, resolve_blocks  # noqa: F401 (part of this module's API)

OP = "task_arithmetic"
GPU_ORDER = ("cuda", "triton")


# --------------------------------------------------------------------------------------------
# Validation and normalisation
# --------------------------------------------------------------------------------------------

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


def check_blocks(blocks: object, shape) -> tuple[int, int]:
    """(block_size, n_blocks) for a `blocks` argument (`spec.resolve_blocks`), with an int block
    size also bounded by the int64 the ops' schemas carry, and clamped to the tensor's size: a
    block of at least numel elements is the one block of the whole tensor, so the kernels and the
    reference never size anything by a block longer than the tensor (no 2**62-element padding)."""
    if isinstance(blocks, int) and not isinstance(blocks, bool) and blocks > V.INT64_MAX:
        raise ValueError(f"blocks: block size must be <= 2**63 - 1 (the int64 of the ops' schemas), got {blocks}")
    block_size, n_blocks = resolve_blocks(blocks, shape)
    numel = 1
    for s in shape:
        numel *= int(s)
    return min(block_size, max(numel, 1)), n_blocks


def prepare(base: object, deltas: object, coeffs: object, blocks: Blocks, out_dtype: object,
            deltas_name: str = "deltas") -> Prepared:
    base = V.check_float_tensor(base, "base")
    items = _as_delta_list(deltas, base, deltas_name)
    block_size, n_blocks = check_blocks(blocks, base.shape)
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
    if V.values_readable(out):  # meta / fake tensors own no memory to overlap
        V.check_no_partial_overlap(out, [*p.deltas, p.coeffs, p.base], allow_alias=p.base)
    return out


# --------------------------------------------------------------------------------------------
# Backend choice and autograd
# --------------------------------------------------------------------------------------------

def _can_run(p: Prepared, out_dtype: torch.dtype) -> dict:
    """Each backend's `can_run` for this call: None, or the reason it cannot run it."""
    return {"reference": lambda: None,
            "cpu": lambda: backend_cpu.task_arithmetic_reason(p.base, out_dtype),
            "cuda": lambda: backend_cuda.task_arithmetic_reason(p.base, out_dtype),
            "triton": lambda: backend_triton.task_arithmetic_reason(p.base, out_dtype)}


def choose_backend(p: Prepared, backend: str) -> str:
    return _backend.select(OP, backend, _can_run(p, p.out_dtype),
                           _backend.default_order(p.base.device, GPU_ORDER))


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


# The C++ / CUDA ops (one op for both devices) and the Triton ops: each functional op's gradient
# is its backward op.
for _path in (backend_cpu, backend_triton):
    _path.task_arithmetic_op.register_autograd(_make_backward(_path.task_arithmetic_backward_op),
                                               setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

_FUNCTIONAL = {"cpu": backend_cpu.task_arithmetic_op, "cuda": backend_cpu.task_arithmetic_op,
               "triton": backend_triton.task_arithmetic_op}
_OUT = {"cpu": backend_cpu.task_arithmetic_out_op, "cuda": backend_cpu.task_arithmetic_out_op,
        "triton": backend_triton.task_arithmetic_out_op}


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
        backend_cpu.task_arithmetic_forward_into(out, p.base, p.deltas, p.coeffs, p.block_size, from_models)
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
