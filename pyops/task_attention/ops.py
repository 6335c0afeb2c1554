"""Task-masked attention: validation, backend choice, registered ops and autograd.

Public entry point: `pyops.task_masked_attention`; the math is in
`pyops/reference/task_attention.py`.

Registered ops (DESIGN rule 2):
    pyops::task_masked_attention                  C++ CPU (`pyops._C.task_attention_forward`)
    pyops::task_masked_attention_backward         its backward (dq, dk, dv)
    pyops::task_masked_attention_triton           Triton (`kernels/task_attention.py`)
    pyops::task_masked_attention_triton_backward

Each forward op returns ``(out, lse)``; lse is not differentiable (its gradient is not
propagated: use the reference backend to differentiate through lse). The dropout seed travels
as an int64 tensor of one element, so a seed drawn from torch's generator never breaks a
`torch.compile` graph, and the backward regenerates the forward's mask from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from pyops import _backend, _native
from pyops._triton import triton_family_reason
from pyops import _validate as V
from pyops.task_attention import reference as ref

OP = "task_masked_attention"
GPU_ORDER = ("triton",)
MAX_HEAD_DIM_TRITON = 256
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_U64 = (1 << 64) - 1
# The C++ kernels' group limit, read once at import (a pybind call cannot be traced by Dynamo).
_CPU_HAS_KERNELS = _native.cpu_module is not None and hasattr(_native.cpu_module, "task_attention_forward")
_CPU_MAX_GROUPS = int(_native.cpu_module.task_attention_max_groups()) if _CPU_HAS_KERNELS else 0


# --------------------------------------------------------------------------------------------
# Validation and normalisation
# --------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    q: Tensor
    k: Tensor
    v: Tensor
    q_groups: Tensor            # int32, [Lq] or [B, Lq]
    kv_groups: Tensor           # int32, [Lk] or [B, Lk]
    allow: Optional[Tensor]     # bool [G, G] or None (identity)
    causal: bool
    dropout_p: float
    scale: float
    seed: Tensor                # int64 [1] on q's device
    max_id: Optional[int] = None  # the largest group id (eager calls only; None under compile)


def _check_groups(g: object, name: str, batch: int, length: int, len_name: str, q: Tensor) -> Tensor:
    g = V.check_tensor(g, name)
    if g.dtype not in INT_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor (int8/16/32/64 or uint8) of group ids, got {g.dtype}")
    if g.dim() == 1:
        if g.shape[0] != length:
            raise ValueError(f"{name}: expected shape [{length}] or [{batch}, {length}] ({len_name} = {length}), "
                             f"got {V.fmt_shape(g.shape)}")
    elif g.dim() == 2:
        if tuple(g.shape) != (batch, length):
            raise ValueError(f"{name}: expected shape [{length}] or [{batch}, {length}] (batch {batch}, "
                             f"{len_name} = {length}), got {V.fmt_shape(g.shape)}")
    else:
        raise ValueError(f"{name}: expected shape [{length}] or [{batch}, {length}], got {V.fmt_shape(g.shape)}")
    V.check_same_device(g, name, q, "q")
    return g.to(torch.int32).contiguous()


def _check_ids(g: Tensor, name: str, n_groups: Optional[int]) -> int:
    """Group ids in [-1, G) (eager only: it reads the data; the native kernels re-check).
    Returns the largest id."""
    if g.numel() == 0:
        return -1
    lo, hi = (int(x) for x in torch.aminmax(g))
    if lo < -1:
        raise ValueError(f"{name}: group ids must be >= -1 (-1 = padding), got {lo}")
    if n_groups is not None and hi >= n_groups:
        raise ValueError(f"{name}: group id {hi} is out of range for allow of shape [{n_groups}, {n_groups}] "
                         f"(ids must be in [-1, {n_groups - 1}])")
    return hi


def _seed_tensor(seed: object, dropout_p: float, device: torch.device) -> Tensor:
    if dropout_p == 0.0:
        return torch.zeros(1, dtype=torch.int64, device=device)
    if seed is None:  # drawn from torch's (CPU) generator: torch.manual_seed makes it reproducible
        return torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64).to(device)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in INT_DTYPES:
            raise TypeError(f"seed: expected an int or an integer tensor of one element, got {seed.dtype} "
                            f"tensor of shape {V.fmt_shape(seed.shape)}")
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected None, an int or an integer tensor, got {type(seed).__name__}")
    s = seed & _U64
    return torch.tensor([s - (1 << 64) if s >= (1 << 63) else s], dtype=torch.int64, device=device)


def prepare(q: object, k: object, v: object, q_groups: object, kv_groups: object, allow: object,
            causal: object, dropout_p: object, scale: object, seed: object) -> Prepared:
    q = V.check_float_tensor(q, "q")
    k = V.check_float_tensor(k, "k")
    v = V.check_float_tensor(v, "v")
    for t, name, layout in ((q, "q", "[B, Hq, Lq, D]"), (k, "k", "[B, Hkv, Lk, D]"), (v, "v", "[B, Hkv, Lk, Dv]")):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor {layout}, got {V.fmt_shape(t.shape)}")
    for t, name in ((k, "k"), (v, "v")):
        V.check_same_dtype(t, name, q, "q")
        V.check_same_device(t, name, q, "q")
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        bad, t = ("k", k) if k.shape[0] != B else ("v", v)
        raise ValueError(f"{bad}: expected batch size {B} (q's), got {t.shape[0]} (shape {V.fmt_shape(t.shape)})")
    Hkv, Lk = k.shape[1], k.shape[2]
    if k.shape[3] != D:
        raise ValueError(f"k: expected head dim {D} (q's last dim), got {k.shape[3]} (shape {V.fmt_shape(k.shape)})")
    if v.shape[1] != Hkv or v.shape[2] != Lk:
        raise ValueError(f"v: expected shape [{B}, {Hkv}, {Lk}, Dv] (k's heads and length), got {V.fmt_shape(v.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: the number of kv heads ({Hkv}) must divide the number of query heads ({Hq}) "
                         "(grouped-query attention)")
    qg = _check_groups(q_groups, "q_groups", B, Lq, "Lq", q)
    if kv_groups is None:
        if Lk != Lq:
            raise ValueError(f"kv_groups: required when the key length ({Lk}) differs from the query length ({Lq})")
        kg = qg
    else:
        kg = _check_groups(kv_groups, "kv_groups", B, Lk, "Lk", q)
    if allow is not None:
        allow = V.check_tensor(allow, "allow")
        if allow.dtype != torch.bool:
            raise TypeError(f"allow: expected a bool tensor [G, G] (True = may attend), got {allow.dtype}")
        if allow.dim() != 2 or allow.shape[0] != allow.shape[1] or allow.shape[0] == 0:
            raise ValueError(f"allow: expected a square [G, G] tensor with G >= 1, got {V.fmt_shape(allow.shape)}")
        V.check_same_device(allow, "allow", q, "q")
        allow = allow.contiguous()
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    if scale is None:
        scale = D ** -0.5 if D > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale: expected None or a finite float, got {scale!r}")
    max_id = None
    if not torch.compiler.is_compiling():
        n_groups = None if allow is None else allow.shape[0]
        max_id = _check_ids(qg, "q_groups", n_groups)
        if kv_groups is not None:
            max_id = max(max_id, _check_ids(kg, "kv_groups", n_groups))
    return Prepared(q, k, v, qg, kg, allow, causal, dropout_p, float(scale), _seed_tensor(seed, dropout_p, q.device),
                    max_id)


# --------------------------------------------------------------------------------------------
# Backends: can_run
# --------------------------------------------------------------------------------------------

def _can_run(p: Prepared) -> dict:
    dev = p.q.device
    dtype_reason = _native.native_dtype_reason(p.q)

    def cpu() -> Optional[str]:
        if _native.cpu_module is None:
            return _native.cpu_missing_reason
        if not _CPU_HAS_KERNELS:
            return "pyops._C has no task_attention_forward (built without the task-attention kernels)"
        if dev.type != "cpu":
            return f"tensors are on {dev.type}, the C++ kernels take CPU tensors"
        limit = _CPU_MAX_GROUPS
        n_groups = p.allow.shape[0] if p.allow is not None else (None if p.max_id is None else p.max_id + 1)
        if n_groups is not None and n_groups > limit:
            return f"the C++ kernels take up to {limit} groups, got {n_groups}"
        return dtype_reason

    def triton() -> Optional[str]:
        reason = triton_family_reason(dev, "task_attention") or dtype_reason
        if reason is None and max(p.q.shape[3], p.v.shape[3]) > MAX_HEAD_DIM_TRITON:
            reason = f"head dims up to {MAX_HEAD_DIM_TRITON} (got D={p.q.shape[3]}, Dv={p.v.shape[3]})"
        return reason

    return {"reference": lambda: None, "cpu": cpu, "triton": triton}


def choose_backend(p: Prepared, backend: str) -> str:
    return _backend.select(OP, backend, _can_run(p), _backend.default_order(p.q.device, GPU_ORDER))


# --------------------------------------------------------------------------------------------
# Native (C++ CPU) ops
# --------------------------------------------------------------------------------------------

def _native_allow(q_groups: Tensor, kv_groups: Tensor, allow: Optional[Tensor]) -> Tensor:
    """uint8 [G, G]; None (identity rule) becomes eye(max id + 1)."""
    if allow is None:
        hi = max(int(q_groups.max()) if q_groups.numel() else -1, int(kv_groups.max()) if kv_groups.numel() else -1)
        return torch.eye(max(hi + 1, 1), dtype=torch.uint8)
    return allow.to(torch.uint8).contiguous()


def _seed_u64(seed: Tensor) -> int:
    return int(seed.reshape(-1)[0]) & _U64


def _native_common(q, k, v, q_groups, kv_groups, allow):
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    al = _native_allow(q_groups, kv_groups, allow)
    qg = q_groups.to(torch.int32).contiguous()
    kg = kv_groups.to(torch.int32).contiguous()
    return (B, Hq, Hkv, Lq, Lk, D, Dv, al.shape[0], Lq if qg.dim() == 2 else 0, Lk if kg.dim() == 2 else 0), al, qg, kg


@torch.library.custom_op("pyops::task_masked_attention", mutates_args=(), device_types=("cpu",))
def _native_op(q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor, kv_groups: Tensor, allow: Optional[Tensor],
               causal: bool, dropout_p: float, scale: float, seed: Tensor) -> Tuple[Tensor, Tensor]:
    B, Hq, Lq, _ = q.shape
    out = torch.empty((B, Hq, Lq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    sizes, al, qg, kg = _native_common(q, k, v, q_groups, kv_groups, allow)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _native.cpu_module.task_attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), qg.data_ptr(), kg.data_ptr(),
        al.data_ptr(), *sizes, causal, scale, dropout_p, _seed_u64(seed), _native.dtype_code(q.dtype),
        torch.get_num_threads())
    return out, lse


@torch.library.custom_op("pyops::task_masked_attention_backward", mutates_args=(), device_types=("cpu",))
def _native_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_groups: Tensor,
                        kv_groups: Tensor, allow: Optional[Tensor], causal: bool, dropout_p: float, scale: float,
                        seed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] == 0 or q.shape[1] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    sizes, al, qg, kg = _native_common(q, k, v, q_groups, kv_groups, allow)
    q, k, v, out, dout, lse = (t.contiguous() for t in (q, k, v, out, dout, lse))
    _native.cpu_module.task_attention_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dout.data_ptr(), lse.data_ptr(),
        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), qg.data_ptr(), kg.data_ptr(), al.data_ptr(), *sizes,
        causal, scale, dropout_p, _seed_u64(seed), _native.dtype_code(q.dtype), torch.get_num_threads())
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Triton ops (kernels/task_attention.py)
# --------------------------------------------------------------------------------------------

def _triton_kernels():
    from pyops.kernels import task_attention as kern  # imported lazily: Triton is optional
    return kern


@torch.library.triton_op("pyops::task_masked_attention_triton", mutates_args=())
def _triton_op(q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor, kv_groups: Tensor, allow: Optional[Tensor],
               causal: bool, dropout_p: float, scale: float, seed: Tensor) -> Tuple[Tensor, Tensor]:
    B, Hq, Lq, _ = q.shape
    out = torch.empty((B, Hq, Lq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    _triton_kernels().forward(q.contiguous(), k.contiguous(), v.contiguous(), out, lse, q_groups.contiguous(),
                              kv_groups.contiguous(), allow, causal, scale, dropout_p, seed)
    return out, lse


@torch.library.triton_op("pyops::task_masked_attention_triton_backward", mutates_args=())
def _triton_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_groups: Tensor,
                        kv_groups: Tensor, allow: Optional[Tensor], causal: bool, dropout_p: float, scale: float,
                        seed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _triton_kernels().backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
                               lse.contiguous(), dq, dk, dv, q_groups.contiguous(), kv_groups.contiguous(), allow,
                               causal, scale, dropout_p, seed)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd (shared by the native and Triton pairs)
# --------------------------------------------------------------------------------------------

def _fake_forward(q, k, v, q_groups, kv_groups, allow, causal, dropout_p, scale, seed):
    B, Hq, Lq, _ = q.shape
    return (q.new_empty((B, Hq, Lq, v.shape[3])), q.new_empty((B, Hq, Lq), dtype=torch.float32))


def _fake_backward(dout, q, k, v, out, lse, q_groups, kv_groups, allow, causal, dropout_p, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, q_groups, kv_groups, allow, causal, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_groups, kv_groups, allow, seed)
    ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled [B, Hq, Lq] gradient for lse on every backward


def _make_backward(backward_op):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, q_groups, kv_groups, allow, seed = ctx.saved_tensors
        if dout is None:  # out took no part in the loss (grads are not materialized)
            return None, None, None, None, None, None, None, None, None, None
        dq, dk, dv = backward_op(dout.contiguous(), q, k, v, out, lse, q_groups, kv_groups, allow,
                                 ctx.causal, ctx.dropout_p, ctx.scale, seed)
        return dq, dk, dv, None, None, None, None, None, None, None
    return backward


for _fwd, _bwd in ((_native_op, _native_backward_op), (_triton_op, _triton_backward_op)):
    _fwd.register_fake(_fake_forward)
    _bwd.register_fake(_fake_backward)
    _fwd.register_autograd(_make_backward(_bwd), setup_context=_setup_context)

_OPS = {"cpu": _native_op, "triton": _triton_op}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def run_prepared(p: Prepared, backend: str) -> Tuple[Tensor, Tensor]:
    name = choose_backend(p, backend)
    if name == "reference":
        kv = None if p.kv_groups is p.q_groups else p.kv_groups
        return ref.task_masked_attention(p.q, p.k, p.v, p.q_groups, kv, p.allow, causal=p.causal,
                                         dropout_p=p.dropout_p, scale=p.scale, seed=p.seed, return_lse=True)
    return _OPS[name](p.q, p.k, p.v, p.q_groups, p.kv_groups, p.allow, p.causal, p.dropout_p, p.scale, p.seed)


def task_masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_groups: Tensor,
    kv_groups: Optional[Tensor] = None,
    allow: Optional[Tensor] = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    seed: Union[None, int, Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention where each token carries a group id and a G×G rule says which groups see which.

    ``out = softmax(scale·q·kᵀ + mask)·v`` with query i allowed to attend key j iff
    ``allow[q_groups[i], kv_groups[j]]`` (and ``j <= i`` when causal); the mask is computed on the
    fly from the ids, never materialised, and fully masked tiles are skipped by the kernels.
    Definition: `pyops.task_attention.reference`.

    Args:
        q: `[B, Hq, Lq, D]`; k: `[B, Hkv, Lk, D]`; v: `[B, Hkv, Lk, Dv]`. float32/float16/bfloat16
            (float64: reference backend only), one dtype and device. Hkv must divide Hq
            (grouped-query attention: query head h uses kv head ``h // (Hq // Hkv)``).
        q_groups: integer ids `[Lq]` (shared by the batch) or `[B, Lq]`; −1 marks padding.
        kv_groups: `[Lk]` or `[B, Lk]`; default `q_groups` (then Lk must equal Lq).
        allow: bool `[G, G]`, True where group a may attend group b; ids must lie in [−1, G).
            Default None: the identity (block-diagonal attention by group).
        causal: also require ``j <= i``.
        dropout_p: attention dropout probability in [0, 1); the mask is Philox4x32-10 keyed by
            `seed` and the element index (the same bits on every backend; backward regenerates it).
        scale: default ``D**-0.5``.
        seed: int (64-bit) or int tensor of one element; None draws one from torch's CPU
            generator (so `torch.manual_seed` makes runs reproducible). Ignored when dropout_p = 0.
        return_lse: also return the fp32 log-sum-exp `[B, Hq, Lq]` of the (un-dropped) scores
            (−inf for rows with no allowed key). lse is not differentiable here.
        backend: ``"auto"`` (CPU: cpu → reference; CUDA: triton → reference), ``"reference"``,
            ``"cpu"`` or ``"triton"``; ``PYOPS_BACKEND`` in the environment is tried first.

    Returns:
        out `[B, Hq, Lq, Dv]` in q's dtype (rows with no allowed key are zeros, gradients zero),
        or ``(out, lse)``. Differentiable with respect to q, k and v.
    """
    p = prepare(q, k, v, q_groups, kv_groups, allow, causal, dropout_p, scale, seed)
    out, lse = run_prepared(p, backend)
    return (out, lse) if return_lse else out
