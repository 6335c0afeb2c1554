"""Neighbourhood attention (1D/2D/3D): the public functions, validation, backend choice and autograd.

Public entry points (re-exported as `pyops.na1d`, `pyops.na2d`, `pyops.na3d`); the math is in
`pyops/neighborhood/reference.py`.

Every kernel works on the 3D form: a 1D/2D problem gets leading spatial extents of 1 with kernel 1,
stride 1, dilation 1, non-causal (the window rule then gives exactly the one key there), and its rpb
gets extents of 1 there. Tensors in that form: q/k ``[B, S0, S1, S2, H, D]``, v ``[..., H, Dv]``.

Registered ops (docs/design.md#registration), one module per backend, both imported here so every op is
registered once `import pyops` returns:
    pyops::na_native, pyops::na_native_backward     the C++ kernels: `pyops.neighborhood.backend_cpu`
    pyops::na_triton, pyops::na_triton_backward     the Triton kernels: `pyops.neighborhood.backend_triton`
This module ties each forward op to its backward for autograd. `lse` is returned for `return_lse`
and used by the backward; it is not differentiable (a gradient flowing into it is ignored —
documented on the public functions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from pyops import _backend
from pyops import _validate as V
from pyops.neighborhood import backend_cpu  # the C++ path; importing registers its ops before any tracing
from pyops.neighborhood import backend_triton  # the Triton path (its ops register without importing Triton)
from pyops.neighborhood import reference as ref

GPU_ORDER = ("triton",)
IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


# --------------------------------------------------------------------------------------------
# Validation and normalisation
# --------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    n: int
    q: Tensor
    k: Tensor
    v: Tensor
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    causal: Tuple[bool, ...]
    rpb: Optional[Tensor]
    scale: float

    @property
    def spatial(self) -> Tuple[int, ...]:
        return tuple(self.q.shape[1:1 + self.n])


def _per_dim(value: object, n: int, name: str, kind: type) -> tuple:
    what = "bool" if kind is bool else "int"
    if isinstance(value, (tuple, list)):
        items = tuple(value)
        if len(items) != n:
            raise ValueError(f"{name}: expected a {what} or a tuple of {n} {what}s (one per spatial dimension), "
                             f"got {len(items)} values {items!r}")
    else:
        items = (value,) * n
    for dim, x in enumerate(items):
        ok = isinstance(x, bool) if kind is bool else (isinstance(x, int) and not isinstance(x, bool))
        if not ok:
            raise TypeError(f"{name}: expected {what} values, got {type(x).__name__} {x!r} in dimension {dim}")
    return items


def prepare(n: int, q: object, k: object, v: object, kernel_size: object, stride: object, dilation: object,
            is_causal: object, rpb: object, scale: object) -> Prepared:
    q = V.check_float_tensor(q, "q")
    k = V.check_float_tensor(k, "k")
    v = V.check_float_tensor(v, "v")
    layout = f"[B, {', '.join(f'S{i}' for i in range(n))}, H, D] (heads last, as NATTEN)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != n + 3:
            raise ValueError(f"{name}: expected a {n + 3}-d tensor {layout} for na{n}d, got shape {V.fmt_shape(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        V.check_same_dtype(t, name, q, "q")
        V.check_same_device(t, name, q, "q")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k: expected shape {V.fmt_shape(q.shape)} (q's shape), got {V.fmt_shape(k.shape)}")
    if tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise ValueError(f"v: expected shape [{', '.join(map(str, q.shape[:-1]))}, Dv] (q's [B, *spatial, H], "
                         f"any Dv), got {V.fmt_shape(v.shape)}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"q/v: head dimensions must be >= 1, got D={q.shape[-1]}, Dv={v.shape[-1]}")
    ks = _per_dim(kernel_size, n, "kernel_size", int)
    st = _per_dim(stride, n, "stride", int)
    dl = _per_dim(dilation, n, "dilation", int)
    ca = _per_dim(is_causal, n, "is_causal", bool)
    spatial = tuple(q.shape[1:1 + n])
    for dim in range(n):
        if ks[dim] < 2:
            raise ValueError(f"kernel_size: must be >= 2 in every dimension, got {ks[dim]} in dimension {dim}")
        if dl[dim] < 1:
            raise ValueError(f"dilation: must be >= 1, got {dl[dim]} in dimension {dim}")
        if st[dim] < 1:
            raise ValueError(f"stride: must be >= 1, got {st[dim]} in dimension {dim}")
        if st[dim] > ks[dim]:
            raise ValueError(f"stride: must not exceed kernel_size, got stride {st[dim]} > kernel_size {ks[dim]} "
                             f"in dimension {dim}")
        if ks[dim] * dl[dim] > spatial[dim]:
            raise ValueError(f"kernel_size·dilation must not exceed the input extent: dimension {dim} has "
                             f"kernel_size {ks[dim]} · dilation {dl[dim]} = {ks[dim] * dl[dim]} > extent {spatial[dim]} "
                             f"(q shape {V.fmt_shape(q.shape)})")
    if rpb is not None:
        rpb = V.check_float_tensor(rpb, "rpb")
        V.check_same_device(rpb, "rpb", q, "q")
        if any(ca):
            raise ValueError(f"rpb: relative positional bias is not supported with causal masking "
                             f"(is_causal={ca}), as in NATTEN")
        for dim in range(n):
            if ks[dim] % 2 == 0:
                raise ValueError(f"rpb: relative positional bias needs odd kernel sizes, got kernel_size "
                                 f"{ks[dim]} in dimension {dim}")
        want = (q.shape[-2],) + tuple(2 * x - 1 for x in ks)
        V.check_shape(rpb, "rpb", want, "[H, 2k-1, ...] per spatial dimension")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        scale = float(scale)
    else:
        scale = q.shape[-1] ** -0.5
    return Prepared(n, q, k, v, ks, st, dl, ca, rpb, scale)


# --------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------

def _can_run(p: Prepared) -> dict:
    """Each backend's `can_run` for this call: None or the reason it cannot run it."""
    return {"reference": lambda: None,
            "cpu": lambda: backend_cpu.reason(p.q),
            "triton": lambda: backend_triton.reason(p.q, p.v)}


def choose_backend(p: Prepared, backend: str) -> str:
    return _backend.select(f"na{p.n}d", backend, _can_run(p), _backend.default_order(p.q.device, GPU_ORDER))


# --------------------------------------------------------------------------------------------
# The 3D form
# --------------------------------------------------------------------------------------------

def _to3d(p: Prepared):
    """The problem in the 3D form the kernels take (see `pyops.neighborhood.layout`): q, k, v, rpb
    reshaped with leading extents of 1, and per-dimension lists padded with kernel 1, stride 1,
    dilation 1, non-causal (the window rule then gives exactly the one key there)."""
    pad = 3 - p.n
    B, H = p.q.shape[0], p.q.shape[-2]
    sp = (1,) * pad + p.spatial
    q = p.q.contiguous().reshape(B, *sp, H, p.q.shape[-1])
    k = p.k.contiguous().reshape(B, *sp, H, p.k.shape[-1])
    v = p.v.contiguous().reshape(B, *sp, H, p.v.shape[-1])
    rpb = None if p.rpb is None else p.rpb.contiguous().reshape(H, *((1,) * pad), *p.rpb.shape[1:])
    return (q, k, v, rpb, [1] * pad + list(p.kernel), [1] * pad + list(p.stride), [1] * pad + list(p.dilation),
            [False] * pad + list(p.causal))


# --------------------------------------------------------------------------------------------
# Autograd: each backend's forward op differentiates through its own backward op
# --------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rpb)
    ctx.args = (kernel_size, stride, dilation, is_causal, scale)
    ctx.mark_non_differentiable(lse)


def _make_backward(backward_op):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, rpb = ctx.saved_tensors
        dq, dk, dv, drpb = backward_op(dout, q, k, v, out, lse, rpb, *ctx.args)
        return dq, dk, dv, (drpb if rpb is not None else None), None, None, None, None, None
    return backward


for _mod in (backend_cpu, backend_triton):
    _mod.forward_op.register_autograd(_make_backward(_mod.backward_op), setup_context=_setup_context)

_FUNCTIONAL = {"cpu": backend_cpu.forward_op, "triton": backend_triton.forward_op}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _run(n: int, q, k, v, kernel_size, stride, dilation, is_causal, rpb, scale, return_lse, backend):
    p = prepare(n, q, k, v, kernel_size, stride, dilation, is_causal, rpb, scale)
    name = choose_backend(p, backend)
    if name == "reference":
        return ref.neighborhood_attention(p.q, p.k, p.v, p.kernel, p.stride, p.dilation, p.causal, p.rpb,
                                          p.scale, return_lse)
    q3, k3, v3, r3, ks, st, dl, ca = _to3d(p)
    out, lse = _FUNCTIONAL[name](q3, k3, v3, r3, ks, st, dl, ca, p.scale)
    out = out.reshape(*p.v.shape)
    if return_lse:
        return out, lse.reshape(p.q.shape[:-1])
    return out


_DOC = """{n}D neighbourhood attention with NATTEN's semantics (Hassani et al., "Neighborhood Attention
    Transformer", CVPR 2023; dilation as in DiNAT, Hassani & Shi 2022; docs/neighborhood.md).

    Each query attends to the keys of its window (the product over the {n} spatial dimensions of
    the per-dimension windows: dilation groups, windows shifted to stay inside the input, stride
    leaders, per-dimension causal); ``out = softmax(scale·q·kᵀ + rpb)·v`` over the window. See
    `pyops.neighborhood.reference` for the definition.

    Args:
        q, k: ``[B, {dims}, H, D]`` (heads last, as NATTEN); v: ``[B, {dims}, H, Dv]``. float32,
            float16 or bfloat16 (float64: reference backend only), same dtype and device.
        kernel_size: int or {n}-tuple, each >= 2 with kernel_size·dilation <= the extent.
        stride: int or {n}-tuple, 1 <= stride <= kernel_size (queries of a stride group share
            their leader's window).
        dilation: int or {n}-tuple, >= 1.
        is_causal: bool or {n}-tuple of bools.
        rpb: optional relative positional bias ``[H, {rpb}]`` (odd kernels, non-causal only),
            NATTEN <= 0.17 / DiNAT semantics; any float dtype, gets a gradient.
        scale: logit scale, default ``D ** -0.5``.
        return_lse: also return the logsumexp ``[B, {dims}, H]`` (fp32; not differentiable on
            the fused backends: a gradient flowing into it is ignored there).
        backend: ``"auto"`` | ``"reference"`` | ``"cpu"`` | ``"triton"``.

    Returns:
        ``out [B, {dims}, H, Dv]`` in q's dtype, or ``(out, lse)``. Differentiable with respect to
        q, k, v and rpb.
    """


def na1d(q: Tensor, k: Tensor, v: Tensor, kernel_size: IntOrTuple, *, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[Tensor] = None,
         scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto"):
    return _run(1, q, k, v, kernel_size, stride, dilation, is_causal, rpb, scale, return_lse, backend)


def na2d(q: Tensor, k: Tensor, v: Tensor, kernel_size: IntOrTuple, *, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[Tensor] = None,
         scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto"):
    return _run(2, q, k, v, kernel_size, stride, dilation, is_causal, rpb, scale, return_lse, backend)


def na3d(q: Tensor, k: Tensor, v: Tensor, kernel_size: IntOrTuple, *, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[Tensor] = None,
         scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto"):
    return _run(3, q, k, v, kernel_size, stride, dilation, is_causal, rpb, scale, return_lse, backend)


na1d.__doc__ = _DOC.format(n=1, dims="L", rpb="2k-1")
na2d.__doc__ = _DOC.format(n=2, dims="S0, S1", rpb="2k0-1, 2k1-1")
na3d.__doc__ = _DOC.format(n=3, dims="S0, S1, S2", rpb="2k0-1, 2k1-1, 2k2-1")
