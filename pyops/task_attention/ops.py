"""Task-masked attention: validation, backend choice and autograd.

Public entry point: `pyops.task_masked_attention`; the math is in `pyops/task_attention/reference.py`.

Registered ops (docs/design.md#registration), each defined with its fake kernel in its backend's module and
made differentiable here (forward op -> backward op):
    pyops::task_masked_attention                  C++ CPU (`backend_cpu`, csrc/task_attention/)
    pyops::task_masked_attention_backward         its backward (dq, dk, dv)
    pyops::task_masked_attention_triton           Triton (`backend_triton`, kernels/task_attention.py)
    pyops::task_masked_attention_triton_backward  its backward

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

from pyops import _backend
from pyops import _validate as V
from pyops.task_attention import backend_cpu  # the C++ path; importing registers its ops before any tracing
from pyops.task_attention import backend_triton  # the Triton path (its ops register without importing Triton)
from pyops.task_attention import reference as ref

OP = "task_masked_attention"
GPU_ORDER = ("triton",)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_U64 = (1 << 64) - 1


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
    """The ids as given (type, shape and device checked; still in their own dtype)."""
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
    return g


def _narrow(g: Tensor) -> Tensor:
    """The kernels' int32 ids; only after `check_ids` has checked them in their own dtype."""
    return g.to(torch.int32).contiguous()


def check_ids(g: Tensor, name: str, n_groups: Optional[int], identity_limit: Optional[int] = 1 << 31) -> int:
    """Group ids in [-1, G) with G = n_groups (allow's side); for the identity rule (n_groups None)
    in [-1, identity_limit), by default 2**31 as the kernels take int32 ids (None: no bound).
    Checked in the ids' own dtype, before they are narrowed to int32, so an int64 id of 2**32 is
    refused, never wrapped to group 0; the message names the id and its position. Reads the ids:
    eager calls on real tensors only (the native kernels re-check). Returns the largest id."""
    if g.numel() == 0:
        return -1
    lo, top = (int(x) for x in torch.aminmax(g))  # exact in the ids' own dtype
    hi = n_groups if n_groups is not None else (1 << 64 if identity_limit is None else identity_limit)
    if lo >= -1 and top < hi:
        return top
    idx, val = V.first_out_of_range(g, -1, hi)
    where = f"at {name}{V.fmt_index(idx)}"
    if val < -1:
        raise ValueError(f"{name}: group ids must be >= -1 (-1 = padding), got {val} {where}")
    if n_groups is None:
        raise ValueError(f"{name}: group id {val} {where} is out of range: without allow (the identity rule) "
                         f"ids must be in [-1, {identity_limit - 1}] (the kernels take int32 ids)")
    raise ValueError(f"{name}: group id {val} is out of range for allow of shape [{n_groups}, {n_groups}] "
                     f"(ids must be in [-1, {n_groups - 1}]), {where}")


def _check_seed_int(seed: int) -> int:
    """A 64-bit seed, signed or unsigned: [-2**63, 2**64) (wider ints would silently wrap)."""
    return V.check_int(seed, "seed", V.INT64_MIN, (1 << 64) - 1, " (a 64-bit seed, signed or unsigned)")


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
    s = _check_seed_int(seed) & _U64
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
    # The ids' values are checked in their own dtype first, then narrowed (docs/design.md#errors);
    # meta / fake tensors and traced calls have no values to read (the kernels re-check).
    if V.values_readable(qg, kg, allow):
        n_groups = None if allow is None else allow.shape[0]
        max_id = check_ids(qg, "q_groups", n_groups)
        if kv_groups is not None:
            max_id = max(max_id, check_ids(kg, "kv_groups", n_groups))
    qg = _narrow(qg)
    kg = qg if kv_groups is None else _narrow(kg)
    return Prepared(q, k, v, qg, kg, allow, causal, dropout_p, float(scale), _seed_tensor(seed, dropout_p, q.device),
                    max_id)


# --------------------------------------------------------------------------------------------
# Backends: can_run (declarations and tile bounds: backend_cpu.CPU, backend_triton.TRITON)
# --------------------------------------------------------------------------------------------

def _n_groups(p: Prepared) -> Optional[int]:
    """G, the side of the rule: allow's, or the largest id + 1 for the identity rule (None under
    torch.compile, where the ids are not read; the C++ kernels then check G themselves)."""
    if p.allow is not None:
        return p.allow.shape[0]
    return None if p.max_id is None else p.max_id + 1


def _can_run(p: Prepared) -> dict:
    return {"reference": lambda: None,
            "cpu": lambda: backend_cpu.reason(p.q, _n_groups(p)),
            "triton": lambda: backend_triton.reason(p.q, p.v)}


def choose_backend(p: Prepared, backend: str) -> str:
    return _backend.select(OP, backend, _can_run(p), _backend.default_order(p.q.device, GPU_ORDER))


# --------------------------------------------------------------------------------------------
# Autograd: each backend's forward op differentiated by its backward op
# --------------------------------------------------------------------------------------------

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


backend_cpu.forward_op.register_autograd(_make_backward(backend_cpu.backward_op), setup_context=_setup_context)
backend_triton.forward_op.register_autograd(_make_backward(backend_triton.backward_op), setup_context=_setup_context)

_OPS = {"cpu": backend_cpu.forward_op, "triton": backend_triton.forward_op}


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
    Definition: `pyops.task_attention.reference`. Semantics: those of
    `torch.nn.functional.scaled_dot_product_attention` with the dense boolean mask the rule
    stands for (True = attend, `pyops.masks.dense`), except that a row with no allowed key
    outputs zeros where SDPA gives NaN.

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
