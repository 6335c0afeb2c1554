"""Fused expert routing: validation, backend choice, autograd and the public functions.

Public entry points (re-exported as `pyops.moe_route`, `pyops.moe_experts`, `pyops.Routing`);
the math is in `pyops/moe/reference.py`. Registered ops (docs/design.md#registration), one module per backend's
glue, each imported here so that every op is registered once `import pyops` returns:

    backend_cpu.py     the C++ path: pyops::moe_route (defined there, with its C++ kernel),
                       pyops::moe_experts_cpu, pyops::moe_experts_cpu_backward,
                       pyops::moe_experts_cpu_inference
    backend_cuda.py    the CUDA kernel of pyops::moe_route
    backend_triton.py  pyops::moe_experts_triton, pyops::moe_experts_triton_backward (kernels/moe.py)
    schema.py          the score / activation codes and the ops' outputs, shared by the three
    pool.py            the CPU ops' per-thread buffer pools (`release_workspace`)

This module registers pyops::moe_route_backward (the gradient of the routing weights w.r.t. the
logits, torch ops on any device) and the autograd of pyops::moe_route and of the two expert
forward ops, whose backward ops are their backends' own.

The expert ops return, besides y, the intermediates the backward needs (pre-activations a, b,
the activation h and the unweighted expert outputs ys, all fp32, rows in `order`), so the
backward runs no forward GEMM again. Shapes are static ([T*k, ...]); the per-expert slicing
by `offsets` happens inside the ops, so the public functions compile with fullgraph=True.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from pyops import _backend
from pyops import _validate as V
from pyops.moe import backend_cpu  # the C++ path; importing registers its ops before any tracing
from pyops.moe import backend_cuda  # the CUDA kernel of pyops::moe_route (registers without a GPU)
from pyops.moe import backend_triton  # the Triton path (its ops register without importing Triton)
from pyops.moe import reference as ref
from pyops.moe.pool import release_workspace  # noqa: F401  (public here: frees this thread's CPU buffers)
from pyops.moe.schema import SCORE_CODES

ROUTE_OP = "moe_route"
EXPERTS_OP = "moe_experts"
ACTIVATIONS = ref.ACTIVATIONS
GLU = ref.GLU_ACTIVATIONS


class Routing(NamedTuple):
    """The output of `pyops.moe_route` (see its docstring)."""
    weights: Tensor   # [T, k] gate values (logits' dtype), descending per token
    experts: Tensor   # [T, k] int32
    order: Tensor     # [T*k] int64, flat assignment ids t*k+j stably sorted by expert
    offsets: Tensor   # [E+1] int64, offsets[e]:offsets[e+1] is expert e's slice of order
    dropped: Tensor   # [T, k] bool, assignments past the capacity


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _check_k(k: object, E: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if k < 1 or k > E:
        raise ValueError(f"k: expected 1 <= k <= E = {E} (the number of experts, logits.shape[1]), got {k}")
    return k


def check_route_args(logits: object, k: object, score: object, capacity_factor: object, bias: object) -> None:
    logits = V.check_float_tensor(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [T, E] (2 dimensions), got {V.fmt_shape(logits.shape)}")
    T, E = logits.shape
    if E < 1:
        raise ValueError(f"logits: expected at least one expert (E = logits.shape[1] >= 1), got {V.fmt_shape(logits.shape)}")
    _check_k(k, E)
    if score not in SCORE_CODES:
        raise ValueError(f"score: expected 'softmax' or 'sigmoid', got {score!r}")
    if capacity_factor is not None:
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
            raise TypeError(f"capacity_factor: expected None or a positive number, got {type(capacity_factor).__name__}")
        if not (capacity_factor > 0) or math.isinf(capacity_factor):
            raise ValueError(f"capacity_factor: expected a finite number > 0, got {capacity_factor}")
    if bias is not None:
        b = V.check_float_tensor(bias, "bias")
        V.check_shape(b, "bias", (E,), "one value per expert, E = logits.shape[1]")
        V.check_same_device(b, "bias", logits, "logits")
        if V.values_readable(b) and not bool(torch.isfinite(b).all()):
            raise ValueError("bias: contains NaN/inf; expected finite per-expert offsets")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_group_args(E: int, k: int, n_group: object, topk_group: object, routed_scaling: object) -> None:
    """DeepSeek-V3 group-limited routing: both or neither of n_group / topk_group, ints, n_group
    dividing E, 1 <= topk_group <= n_group, k <= topk_group·E/n_group; routed_scaling a finite
    number > 0. Every wrong value is a ValueError naming the argument (a non-number
    routed_scaling a TypeError, as for capacity_factor)."""
    if (n_group is None) != (topk_group is None):
        given, missing = ("n_group", "topk_group") if topk_group is None else ("topk_group", "n_group")
        raise ValueError(f"{missing}: expected an int together with {given} = "
                         f"{n_group if topk_group is None else topk_group} (give both or neither), got None")
    if n_group is not None:
        for name, v in (("n_group", n_group), ("topk_group", topk_group)):
            if not _is_int(v):
                raise ValueError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
        if n_group < 1 or E % n_group != 0:
            raise ValueError(f"n_group: expected a positive divisor of E = {E} (logits.shape[1]; the groups have "
                             f"E/n_group experts each), got {n_group}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group: expected 1 <= topk_group <= n_group = {n_group}, got {topk_group}")
        kept = topk_group * (E // n_group)
        if k > kept:
            raise ValueError(f"k: expected k <= topk_group·E/n_group = {topk_group}·{E}/{n_group} = {kept} "
                             f"(the experts of the kept groups), got {k}")
    if isinstance(routed_scaling, bool) or not isinstance(routed_scaling, (int, float)):
        raise TypeError(f"routed_scaling: expected a positive number, got {type(routed_scaling).__name__}")
    if not (routed_scaling > 0) or math.isinf(routed_scaling):
        raise ValueError(f"routed_scaling: expected a finite number > 0, got {routed_scaling}")


def check_finite_logits(logits: Tensor) -> None:
    """Eager only (a data-dependent check; skipped for meta / fake tensors); the native kernels
    check too."""
    if logits.numel() == 0 or not V.values_readable(logits):
        return
    bad = ~torch.isfinite(logits).all(dim=-1)
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"logits: contains NaN/inf at token {t}")


def _as_routing(routing: object) -> Routing:
    if not isinstance(routing, tuple) or len(routing) != 5:
        raise TypeError("routing: expected the Routing returned by pyops.moe_route "
                        f"(weights, experts, order, offsets, dropped), got {type(routing).__name__}")
    names = Routing._fields
    for n, t in zip(names, routing):
        V.check_tensor(t, f"routing.{n}")
    return Routing(*routing)


def check_experts_args(x: object, routing: object, w1: object, w2: object, w3: object, activation: object,
                       b1: object = None, b2: object = None, b3: object = None, alpha: object = None,
                       limit: object = None) -> Routing:
    x = V.check_float_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [T, d] (2 dimensions), got {V.fmt_shape(x.shape)}")
    T, d = x.shape
    r = _as_routing(routing)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    V.check_float_tensor(r.weights, "routing.weights")
    if r.weights.dim() != 2 or r.weights.shape[0] != T:
        raise ValueError(f"routing.weights: expected shape [T, k] with T = {T} (x.shape[0], the number of tokens), "
                         f"got {V.fmt_shape(r.weights.shape)}")
    k = r.weights.shape[1]
    if r.experts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"routing.experts: expected dtype torch.int32, got {r.experts.dtype}")
    V.check_shape(r.experts, "routing.experts", (T, k), "[T, k] like routing.weights")
    if r.order.dtype != torch.int64:
        raise TypeError(f"routing.order: expected dtype torch.int64, got {r.order.dtype}")
    V.check_shape(r.order, "routing.order", (T * k,), "[T*k]")
    if r.offsets.dtype != torch.int64:
        raise TypeError(f"routing.offsets: expected dtype torch.int64, got {r.offsets.dtype}")
    if r.dropped.dtype != torch.bool:
        raise TypeError(f"routing.dropped: expected dtype torch.bool, got {r.dropped.dtype}")
    V.check_shape(r.dropped, "routing.dropped", (T, k), "[T, k] like routing.weights")
    w1 = V.check_float_tensor(w1, "w1")
    if w1.dim() != 3 or w1.shape[1] != d:
        raise ValueError(f"w1: expected shape [E, d, hidden] with d = {d} (x.shape[1]), got {V.fmt_shape(w1.shape)}")
    E, _, h = w1.shape
    if E < 1 or h < 1:
        raise ValueError(f"w1: expected E >= 1 experts and hidden >= 1, got {V.fmt_shape(w1.shape)}")
    V.check_shape(r.offsets, "routing.offsets", (E + 1,), f"[E+1] with E = {E} experts (w1.shape[0])")
    if k > E:
        raise ValueError(f"routing.weights: k = {k} selections per token exceeds E = {E} experts (w1.shape[0])")
    w2 = V.check_float_tensor(w2, "w2")
    V.check_shape(w2, "w2", (E, h, d), f"[E, hidden, d] with E = {E}, hidden = {h} from w1, d = {d} from x")
    if activation in GLU:
        if w3 is None:
            raise ValueError(f"w3: activation {activation!r} is a GLU and needs w3 [E, d, hidden] (the up projection)")
        w3 = V.check_float_tensor(w3, "w3")
        V.check_shape(w3, "w3", (E, d, h), "[E, d, hidden] like w1")
    elif w3 is not None:
        raise ValueError(f"w3: only the GLU activations {GLU} take w3; activation {activation!r} does not")
    for n, t, shape, what in (("b1", b1, (E, h), "[E, hidden], the bias of x·w1"),
                              ("b2", b2, (E, d), "[E, d], the bias of h·w2"),
                              ("b3", b3, (E, h), "[E, hidden], the bias of x·w3")):
        if t is not None:
            V.check_shape(V.check_float_tensor(t, n), n, shape, what)
    if b3 is not None and activation not in GLU:
        raise ValueError(f"b3: only the GLU activations {GLU} have an up projection (w3) to add b3 to; "
                         f"activation {activation!r} does not")
    for n, t in (("w1", w1), ("w2", w2), ("w3", w3), ("b1", b1), ("b2", b2), ("b3", b3)):
        if t is not None:
            V.check_same_dtype(t, n, x, "x")
            V.check_same_device(t, n, x, "x")
    for n, t in zip(Routing._fields, r):
        V.check_same_device(t, f"routing.{n}", x, "x")
    for n, v in (("alpha", alpha), ("limit", limit)):
        if v is None:
            continue
        if activation != "swiglu_oai":
            raise ValueError(f"{n}: only activation 'swiglu_oai' takes alpha and limit; activation {activation!r} "
                             f"does not (got {n}={v!r})")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{n}: expected a number, got {type(v).__name__}")
        if not math.isfinite(v) or (n == "limit" and v <= 0):
            raise ValueError(f"{n}: expected a finite number{' > 0' if n == 'limit' else ''}, got {v}")
    return r


def check_routing_values(r: Routing, E: int) -> None:
    """The indices in a routing, checked in their own dtype before any backend reads them (eager
    calls on real tensors; one host read when they are valid): every expert id in [0, E), every
    entry of `order` an assignment id in [0, T*k), `offsets` a non-decreasing prefix sum from 0 to
    T*k. There is no sentinel id: a dropped assignment keeps its expert id and is flagged in
    `dropped`. The C++ path also checks that order/offsets agree with the expert ids."""
    T, k = r.experts.shape
    n = T * k
    ex, order, offsets = r.experts, r.order, r.offsets
    flags = [((ex < 0) | (ex >= E)).any() if ex.numel() else ex.new_zeros((), dtype=torch.bool),
             ((order < 0) | (order >= n)).any() if order.numel() else order.new_zeros((), dtype=torch.bool),
             (offsets[0] != 0) | (offsets[-1] != n) | (offsets[1:] < offsets[:-1]).any()]
    bad_ex, bad_order, bad_offsets = torch.stack(flags).tolist()
    if bad_ex:
        idx, val = V.first_out_of_range(ex, 0, E)
        raise ValueError(f"routing.experts{V.fmt_index(idx)} = {val} is out of range for {E} experts (w1.shape[0]): "
                         f"expert ids must be in [0, {E - 1}]")
    if bad_order:
        idx, val = V.first_out_of_range(order, 0, n)
        raise ValueError(f"routing.order{V.fmt_index(idx)} = {val} is out of range: entries are assignment ids "
                         f"t*k + j in [0, T*k - 1] = [0, {n - 1}] (T = {T}, k = {k})")
    if bad_offsets:
        raise ValueError(f"routing.offsets: expected a non-decreasing prefix sum from 0 to T*k = {n}, "
                         f"got {offsets.tolist()}")


# --------------------------------------------------------------------------------------------
# Backends: can_run (the declarations are beside each backend's glue)
# --------------------------------------------------------------------------------------------

def _route_can_run(logits: Tensor) -> dict:
    dev = logits.device
    return {"reference": lambda: None,
            "cpu": lambda: backend_cpu.ROUTE.reason(dev, logits),
            "cuda": lambda: backend_cuda.ROUTE.reason(dev, logits)}


def _experts_can_run(x: Tensor, weights: Tensor) -> dict:
    dev = x.device
    return {"reference": lambda: None,
            "cpu": lambda: backend_cpu.EXPERTS.reason(dev, x, weights),
            "triton": lambda: backend_triton.EXPERTS.reason(dev, x, weights)}


def choose_route_backend(logits: Tensor, backend: str) -> str:
    return _backend.select(ROUTE_OP, backend, _route_can_run(logits),
                           _backend.default_order(logits.device, ("cuda",)))


def choose_experts_backend(x: Tensor, weights: Tensor, backend: str) -> str:
    return _backend.select(EXPERTS_OP, backend, _experts_can_run(x, weights),
                           _backend.default_order(x.device, ("triton",)))


# --------------------------------------------------------------------------------------------
# Routing: the backward op and the autograd of pyops::moe_route
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("pyops::moe_route_backward", mutates_args=())
def _route_backward_op(grad_weights: Tensor, logits: Tensor, experts: Tensor, score: int,
                       renormalize: bool, routed_scaling: float = 1.0) -> Tensor:
    """d(weights)/d(logits) with the selection `experts` held fixed (torch ops, any device);
    weights = routed_scaling · (renormalised) selected scores."""
    cd = ref.compute_dtype(logits.dtype)
    s = ref.scores(logits.detach(), "softmax" if score == 0 else "sigmoid")
    idx = experts.long()
    g = grad_weights.to(cd)
    if routed_scaling != 1.0:
        g = g * routed_scaling
    sel = torch.gather(s, 1, idx)
    if renormalize:
        tot = sel.sum(-1, keepdim=True)
        w = sel / tot
        g = (g - (g * w).sum(-1, keepdim=True)) / tot
    ds = torch.zeros_like(s).scatter_add_(1, idx, g)
    if score == 0:
        dz = s * (ds - (ds * s).sum(-1, keepdim=True))
    else:
        dz = ds * s * (1 - s)
    return dz.to(logits.dtype, memory_format=torch.contiguous_format)


@_route_backward_op.register_fake
def _route_backward_fake(grad_weights, logits, experts, score, renormalize, routed_scaling=1.0):
    return logits.new_empty(logits.shape)  # contiguous, as the real op returns whatever the logits' strides


def _route_setup(ctx, inputs, output):
    logits, k, score, renormalize, capacity, bias, n_group, topk_group, routed_scaling = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.score = score
    ctx.renormalize = renormalize
    ctx.routed_scaling = routed_scaling


def _route_backward(ctx, gw, g_experts, g_order, g_offsets, g_dropped):
    logits, experts = ctx.saved_tensors
    if gw is None:
        gw = torch.zeros(experts.shape, dtype=logits.dtype, device=logits.device)
    dz = _route_backward_op(gw, logits, experts, ctx.score, ctx.renormalize, ctx.routed_scaling)
    return dz, None, None, None, None, None, None, None, None


backend_cpu.route_op.register_autograd(_route_backward, setup_context=_route_setup)


# --------------------------------------------------------------------------------------------
# Expert MLP: autograd of the forward ops (each backend's backward op does the work)
# --------------------------------------------------------------------------------------------

def _experts_setup(ctx, inputs, output):
    x, weights, experts, order, offsets, dropped, w1, w2, w3, activation, b1, b2, b3, alpha, limit = inputs
    _, a, b, hh, ys = output
    # The saved intermediates are outputs only so that the backward needs no forward GEMM again:
    # they carry no gradient, and no zero gradients are materialised for them (4 × [T·k, ...]).
    ctx.mark_non_differentiable(a, b, hh, ys)
    ctx.set_materialize_grads(False)
    ctx.activation = activation
    ctx.glu = activation in GLU
    ctx.alpha, ctx.limit = alpha, limit
    ctx.save_for_backward(x, weights, order, offsets, dropped, w1, w2, w3 if ctx.glu else None, a, b, hh, ys,
                          b1, b2, b3 if ctx.glu else None)


def _make_experts_backward(backward_op):
    def backward(ctx, dy, *unused):
        x, weights, order, offsets, dropped, w1, w2, w3, a, b, hh, ys, b1, b2, b3 = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dx, dw, dw1, dw2, dw3, db1, db2, db3 = backward_op(dy, x, weights, order, offsets, dropped, w1, w2, w3, a, b,
                                                           hh, ys, ctx.activation, b1, b2, b3, ctx.alpha, ctx.limit)
        return (dx, dw, None, None, None, None, dw1, dw2, (dw3 if ctx.glu else None), None,
                db1 if b1 is not None else None, db2 if b2 is not None else None, db3 if b3 is not None else None,
                None, None)
    return backward


for _backend_module in (backend_cpu, backend_triton):
    _backend_module.experts_op.register_autograd(_make_experts_backward(_backend_module.backward_op),
                                                 setup_context=_experts_setup)

_EXPERT_OPS = {"cpu": backend_cpu.experts_op, "triton": backend_triton.experts_op}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def moe_route(
    logits: Tensor,
    k: int,
    *,
    score: str = "softmax",
    renormalize: bool = True,
    capacity_factor: Optional[float] = None,
    bias: Optional[Tensor] = None,
    n_group: Optional[int] = None,
    topk_group: Optional[int] = None,
    routed_scaling: float = 1.0,
    backend: str = "auto",
) -> Routing:
    """Top-k expert routing with the permutation that groups assignments by expert.

    Args:
        logits: router logits `[T, E]`, float32 / float16 / bfloat16 (float64: reference backend).
        k: experts per token, ``1 <= k <= E``.
        score: ``"softmax"`` (over the E experts) or ``"sigmoid"`` (per expert), computed in fp32.
        renormalize: divide each token's k selected scores by their sum.
        capacity_factor: None (no capacity), or cf > 0: each expert keeps the first
            ``C = ceil(cf·k·T/E)`` assignments in token order and drops the rest.
        bias: optional `[E]` added to the scores for the selection only (DeepSeek-V3 aux-loss-free
            balancing); the weights are the scores without it. Not differentiated.
        n_group, topk_group: DeepSeek-V3 group-limited routing (both or neither): the E experts
            form ``n_group`` groups of ``E/n_group`` consecutive experts, each group scored by the
            sum of its two largest keys (score + bias; the largest alone for one-expert groups);
            only the experts of the ``topk_group`` best groups (ties: lower group index) can be
            chosen. ``k <= topk_group·E/n_group``.
        routed_scaling: multiplies the weights (after the renormalisation), > 0; DeepSeek-V3's
            ``routed_scaling_factor``. The gradient includes it.
        backend: ``"auto"`` | ``"reference"`` | ``"cpu"`` | ``"cuda"``.

    Returns:
        `Routing(weights [T, k] logits' dtype (descending per token), experts [T, k] int32,
        order [T*k] int64 (assignment ids t*k+j stably sorted by expert), offsets [E+1] int64
        (expert e owns order[offsets[e]:offsets[e+1]]; counts include dropped assignments),
        dropped [T, k] bool)`. Ties in the selection go to the lower expert index. `weights`
        is differentiable w.r.t. `logits` with the selection held fixed.

    Raises:
        ValueError for NaN/inf logits ("logits: contains NaN/inf at token t"), k outside
        [1, E], capacity_factor <= 0, a bias of the wrong shape, n_group without topk_group (or
        the reverse), a non-int n_group / topk_group, n_group not dividing E, topk_group outside
        [1, n_group], k > topk_group·E/n_group, routed_scaling <= 0.
    """
    check_route_args(logits, k, score, capacity_factor, bias)
    T, E = logits.shape
    check_group_args(E, k, n_group, topk_group, routed_scaling)
    scale = float(routed_scaling)
    name = choose_route_backend(logits, backend)
    if name == "reference":
        check_finite_logits(logits)
        return Routing(*ref.route(logits, k, score, renormalize, capacity_factor, bias, n_group, topk_group, scale))
    cap = ref.capacity(capacity_factor, T, E, k)
    return Routing(*backend_cpu.route_op(logits, k, SCORE_CODES[score], bool(renormalize), cap, bias,
                                         n_group or 0, topk_group or 0, scale))


def moe_experts(
    x: Tensor,
    routing: Routing,
    w1: Tensor,
    w2: Tensor,
    w3: Optional[Tensor] = None,
    *,
    activation: str = "swiglu",
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    b3: Optional[Tensor] = None,
    alpha: Optional[float] = None,
    limit: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """The routed expert MLP and the weighted combine: ``y_t = Σ_j w_tj · MLP_{e_tj}(x_t)``.

    Args:
        x: tokens `[T, d]`, float32 / float16 / bfloat16.
        routing: the `Routing` from `pyops.moe_route` for these T tokens.
        w1: `[E, d, hidden]` (the gate projection for GLU activations), `x @ W` layout.
        w2: `[E, hidden, d]` (the down projection).
        w3: `[E, d, hidden]`, the up projection; GLU activations only.
            The weights may have any strides: views of a model's stored layout (Hugging Face's
            `[E, out, in]` transposed, the halves of a fused gate/up tensor, or its interleaved
            columns ``gate_up[..., ::2]`` / ``[..., 1::2]``) are read where they are, without a copy
            per call (fp32; other dtypes are converted once per call on the CPU path).
        activation: ``"swiglu"`` (silu(a) ⊙ b), ``"geglu"`` (exact gelu gate), ``"swiglu_oai"``
            (GPT-OSS: g = min(a, limit), (clamp(b, ±limit) + 1) ⊙ g ⊙ sigmoid(alpha·g); transformers'
            ``GptOssExperts``), ``"gelu"``, ``"silu"``, ``"relu"`` (act(a)); a = x·w1 + b1, b = x·w3 + b3.
        b1, b2, b3: optional biases `[E, hidden]` (of x·w1), `[E, d]` (of h·w2, inside the
            weighted sum), `[E, hidden]` (of x·w3; GLU only), x's dtype; any strides.
        alpha, limit: swiglu_oai's constants, default 1.702 and 7.0 (GPT-OSS's ``swiglu_alpha``,
            ``swiglu_limit``); only that activation takes them.
        backend: ``"auto"`` | ``"reference"`` | ``"cpu"`` | ``"triton"`` (CUDA tensors use Triton).

    Returns:
        `y [T, d]` in x's dtype (fp32 accumulation). Dropped assignments contribute nothing.
        Differentiable w.r.t. x, w1, w2, w3, the biases and routing.weights (hence the router
        logits).

    Raises:
        ValueError, on every backend, for an expert id outside [0, E) (naming it and its position,
        e.g. ``routing.experts[3, 1] = 9 is out of range for 8 experts``), an `order` entry
        outside [0, T*k) or `offsets` that are not a prefix sum from 0 to T*k, a bias of the wrong
        shape, b3 without a GLU activation, alpha/limit with another activation than swiglu_oai.
        There is no sentinel id: dropped assignments keep their expert and are flagged in `dropped`.
    """
    r = check_experts_args(x, routing, w1, w2, w3, activation, b1, b2, b3, alpha, limit)
    al = ref.OAI_ALPHA if alpha is None else float(alpha)
    li = ref.OAI_LIMIT if limit is None else float(limit)
    readable = V.values_readable(x, *r)
    if readable:
        check_routing_values(r, w1.shape[0])
    name = choose_experts_backend(x, r.weights, backend)
    args = (x, r.weights, r.experts, r.order, r.offsets, r.dropped, w1, w2, w3, activation, b1, b2, b3, al, li)
    if name == "reference":
        if not readable and not torch.compiler.is_compiling():
            # meta / fake tensors: the reference's per-expert loop needs the ids' values; the
            # registered op's fake kernel gives y's shape and dtype (and a differentiable graph)
            return backend_cpu.experts_op(*args)[0]
        return ref.experts(x, r.weights, r.experts, r.dropped, w1, w2, w3, activation, b1, b2, b3, al, li)
    if name == "cpu" and not (torch.is_grad_enabled() and
                              any(t is not None and t.requires_grad for t in (x, r.weights, w1, w2, w3, b1, b2, b3))):
        return backend_cpu.inference_op(*args)
    return _EXPERT_OPS[name](*args)[0]
