"""What the registered moe ops exchange with their kernels, shared by every backend module.

* The integer codes of the `score` and `activation` arguments, as the native kernels (csrc/moe/)
  and the Triton kernels (kernels/moe.py) read them.
* The outputs of the ops, which their fake kernels return too:

      moe_route     (weights [T, k] fp32 → logits' dtype, experts [T, k] int32, order [T*k] int64,
                     offsets [E+1] int64, dropped [T, k] bool)
      moe_experts_* (y [T, d] x's dtype, a [T*k, hidden], b [T*k, hidden] or [0] (GLU only),
                     h [T*k, hidden] or [0], ys [T*k, d]; the intermediates fp32, rows in `order`)
      backward      (dx like x, dweights like weights, dw1 like w1, dw2 like w2, dw3 like w1 or [0],
                     db1 like b1 or [0], db2 like b2 or [0], db3 like b3 or [0]), every one contiguous
    The expert ops take, after `activation`, the optional biases b1 [E, hidden], b2 [E, d],
    b3 [E, hidden] and swiglu_oai's alpha and limit (ignored by the other activations).

* `run_native_route`, the body both native routing kernels (C++ and CUDA) share.
* The definition's results in those layouts (`reference_experts`, `reference_experts_backward`),
  which every fused experts op returns for a call with a NaN or ±inf among its inputs
  (`exact_experts`; docs/design.md#non-finite-values): the kernels read every gathered row,
  dropped assignments included, and their activations differ from torch's at ±inf.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from pyops import _native
from pyops._finite import all_finite
from pyops.moe import reference as ref

GLU = ref.GLU_ACTIVATIONS
ACT_CODES = {"swiglu": 0, "geglu": 1, "gelu": 2, "silu": 3, "relu": 4, "swiglu_oai": 5}
ALPHA = ref.OAI_ALPHA
LIMIT = ref.OAI_LIMIT
SCORE_CODES = {"softmax": 0, "sigmoid": 1}


# --------------------------------------------------------------------------------------------
# moe_route
# --------------------------------------------------------------------------------------------

def route_outputs(logits: Tensor, k: int):
    """Uninitialised kernel outputs: weights fp32, experts, order, offsets, dropped as uint8."""
    T, E = logits.shape
    dev = logits.device
    return (torch.empty(T, k, dtype=torch.float32, device=dev), torch.empty(T, k, dtype=torch.int32, device=dev),
            torch.empty(T * k, dtype=torch.int64, device=dev), torch.empty(E + 1, dtype=torch.int64, device=dev),
            torch.empty(T, k, dtype=torch.uint8, device=dev))


def route_result(logits: Tensor, w: Tensor, ex: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor):
    """The kernel outputs as the op returns them: weights in the logits' dtype, dropped as bool."""
    return w.to(logits.dtype), ex, order, offsets, dropped.view(torch.bool)


def route_fake(logits, k, score, renormalize, capacity, bias, n_group=0, topk_group=0, routed_scaling=1.0):
    return route_result(logits, *route_outputs(logits, k))


def run_native_route(logits: Tensor, k: int, score: int, renormalize: bool, capacity: int, bias: Optional[Tensor],
                     kernel: Callable[..., None], n_group: int = 0, topk_group: int = 0,
                     routed_scaling: float = 1.0):
    """Contiguous inputs (bias as fp32), outputs allocated, then `kernel(*args, **groups)` with the
    leading arguments of the bindings' moe_route (logits, dtype code, T, E, k, score, renormalize,
    bias or 0, capacity, the five outputs, all pointers as ints; the caller appends its threads or
    stream) and the keywords n_group, topk_group (0, 0: no groups) and routed_scaling.
    No tokens: no kernel call, every offset 0."""
    T, E = logits.shape
    z = logits.detach().contiguous()
    w, ex, order, offsets, dropped = route_outputs(logits, k)
    b = bias.detach().to(torch.float32).contiguous() if bias is not None else None
    if T == 0:
        offsets.zero_()
    else:
        kernel(z.data_ptr(), _native.dtype_code(z.dtype), T, E, k, score, renormalize,
               b.data_ptr() if b is not None else 0, capacity,
               w.data_ptr(), ex.data_ptr(), order.data_ptr(), offsets.data_ptr(), dropped.data_ptr(),
               n_group=n_group, topk_group=topk_group, routed_scaling=routed_scaling)
    return route_result(logits, w, ex, order, offsets, dropped)


# --------------------------------------------------------------------------------------------
# moe_experts_*
# --------------------------------------------------------------------------------------------

def experts_outputs(x: Tensor, order: Tensor, w1: Tensor, glu: bool, with_h: bool = True):
    """(y, a, b, h, ys). with_h=False (the CPU op): h is an empty placeholder, recomputed by the backward."""
    T, d = x.shape
    n = order.shape[0]
    h = w1.shape[2]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (torch.empty(T, d, dtype=x.dtype, device=x.device), torch.empty(n, h, **f32),
            torch.empty(n, h, **f32) if glu else torch.empty(0, **f32),
            torch.empty(n, h, **f32) if with_h else torch.empty(0, **f32),
            torch.empty(n, d, **f32))


def empty_or(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A contiguous uninitialised tensor of t's shape and dtype, or `like.new_empty(0)` for None."""
    return like.new_empty(0) if t is None else t.new_empty(t.shape)


def experts_backward_fake(dy, x, weights, order, offsets, dropped, w1, w2, w3, a, b, hh, ys, activation,
                          b1=None, b2=None, b3=None, alpha=ALPHA, limit=LIMIT):
    """Contiguous gradients whatever the inputs' strides (views, transposes, interleaved halves),
    as every backend's backward allocates them: `empty_like` would copy a view's strides and make
    compiled code assert on the real results."""
    glu = activation in GLU
    return (x.new_empty(x.shape), weights.new_empty(weights.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape),
            w1.new_empty(w1.shape) if glu else w1.new_empty(0), empty_or(b1, x), empty_or(b2, x), empty_or(b3, x))


# --------------------------------------------------------------------------------------------
# The definition's results, for calls the kernels cannot do exactly
# --------------------------------------------------------------------------------------------

def exact_experts(*tensors: Optional[Tensor]) -> bool:
    """True unless one of the experts op's floating inputs holds a NaN or ±inf (or the values
    cannot be read now, pyops._finite)."""
    return all_finite(*tensors)


def expert_ids(order: Tensor, offsets: Tensor, T: int, k: int) -> Tensor:
    """`[T, k]` int64 expert ids from the routing's order and offsets (assignment order[i] belongs
    to expert e for offsets[e] <= i < offsets[e + 1])."""
    n = order.shape[0]
    counts = offsets[1:] - offsets[:-1]
    per_row = torch.repeat_interleave(torch.arange(counts.shape[0], device=order.device), counts, output_size=n)
    ids = torch.empty(n, dtype=torch.int64, device=order.device)
    ids[order.long()] = per_row
    return ids.view(T, k)


def reference_experts(x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor, w1: Tensor,
                      w2: Tensor, w3: Optional[Tensor], activation: str, b1: Optional[Tensor] = None,
                      b2: Optional[Tensor] = None, b3: Optional[Tensor] = None, alpha: float = ALPHA,
                      limit: float = LIMIT) -> Tensor:
    """y `[T, d]` of the definition (`pyops.moe.reference.experts`)."""
    ids = expert_ids(order, offsets, x.shape[0], weights.shape[1])
    glu = activation in GLU
    return ref.experts(x, weights, ids, dropped, w1, w2, w3 if glu else None, activation, b1, b2,
                       b3 if glu else None, alpha, limit)


def reference_experts_backward(dy: Tensor, x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor,
                               dropped: Tensor, w1: Tensor, w2: Tensor, w3: Optional[Tensor], activation: str,
                               b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
                               b3: Optional[Tensor] = None, alpha: float = ALPHA, limit: float = LIMIT):
    """(dx, dweights, dw1, dw2, dw3, db1, db2, db3; empty tensors for absent inputs) of the
    definition: its vector-Jacobian product (torch.func.vjp works inside a custom op's kernel,
    where autograd keys are excluded)."""
    glu = activation in GLU
    ids = expert_ids(order, offsets, x.shape[0], weights.shape[1])
    optional = [w3 if glu else None, b1, b2, b3 if glu else None]
    present = [i for i, t in enumerate(optional) if t is not None]

    def forward(x_, w_, w1_, w2_, *rest):
        opt = [None] * 4
        for i, t in zip(present, rest):
            opt[i] = t
        return ref.experts(x_, w_, ids, dropped, w1_, w2_, opt[0], activation, opt[1], opt[2], opt[3], alpha, limit)

    primals = [t.detach() for t in (x, weights, w1, w2)] + [optional[i].detach() for i in present]
    _, vjp = torch.func.vjp(forward, *primals)
    grads = vjp(dy.to(x.dtype))
    rest = [w1.new_empty(0) for _ in range(4)]   # distinct tensors: op outputs may not alias
    for i, g in zip(present, grads[4:]):
        rest[i] = g.contiguous()
    return (grads[0].contiguous(), grads[1].contiguous(), grads[2].contiguous(), grads[3].contiguous(), *rest)


def reference_experts_outputs(x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor, dropped: Tensor,
                              w1: Tensor, w2: Tensor, w3: Optional[Tensor], activation: str, with_h: bool = True,
                              b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
                              b3: Optional[Tensor] = None, alpha: float = ALPHA, limit: float = LIMIT):
    """`experts_outputs` holding the definition's y; the intermediates are zeros (a backward on
    this call's inputs takes `reference_experts_backward` too, which does not read them)."""
    y, a, b, h, ys = experts_outputs(x, order, w1, activation in GLU, with_h)
    y.copy_(reference_experts(x, weights, order, offsets, dropped, w1, w2, w3, activation, b1, b2, b3, alpha, limit))
    return y, a.zero_(), b.zero_(), h.zero_(), ys.zero_()
