"""Every backend against the reference: routing outputs, the expert MLP forward and every gradient
(x, w1, w2, w3, routing weights → logits), fp32/fp16/bf16, odd sizes, capacity, determinism."""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_bitwise_equal, assert_close, fmt_dtype, randn
from .cases import (BF16, FP16, FP32, GLU, grads_tol, interpreted, make_logits, make_weights, require,
                         run_layer)
from pyops.testing import tolerance_for

EXPERT_BACKENDS = ["cpu", "triton"]
ROUTE_BACKENDS = ["cpu", "cuda"]

# (T, d, hidden, E, k, special)  special: None | "hot" (all tokens on expert 0) | "empty" (experts 1, 2 get none)
SHAPES = [
    (1, 3, 5, 1, 1, None),
    (1, 4, 3, 3, 3, None),          # k = E, T = 1
    (7, 5, 6, 4, 2, None),
    (13, 8, 9, 5, 2, "empty"),
    (10, 6, 7, 3, 3, "hot"),        # k = E
    (9, 3, 4, 6, 1, "hot"),         # all tokens on one expert, k = 1
    (20, 20, 33, 3, 2, "hot"),      # several row tiles for one expert; partial K and N tiles
]


def shape_id(s):
    T, d, h, E, k, sp = s
    return f"T{T}-d{d}-h{h}-E{E}-k{k}" + (f"-{sp}" if sp else "")


def logits_for(shape, gen, dev, dtype=FP32):
    T, d, h, E, k, sp = shape
    return make_logits(T, E, gen, dev, dtype, hot=0 if sp == "hot" else None,
                       skip=(1, 2) if sp == "empty" else ())


# ------------------------------------------------------------------------------------------------
# Routing
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("cf", [None, 0.6], ids=["nocap", "cap0.6"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_route_matches_reference(backend, score, cf, shape, rng):
    dev = require(backend, "moe_route")
    z = logits_for(shape, rng, dev)
    k = shape[4]
    got = pyops.moe_route(z, k, score=score, capacity_factor=cf, backend=backend)
    want = pyops.moe_route(z.cpu(), k, score=score, capacity_factor=cf, backend="reference")
    for name in ("experts", "order", "offsets", "dropped"):
        assert_bitwise_equal(getattr(got, name).cpu(), getattr(want, name), name)
    assert_close(got.weights, want.weights, tolerance_for(FP32), "weights")


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=fmt_dtype)
def test_route_low_precision_logits(backend, dtype, rng):
    dev = require(backend, "moe_route")
    z = make_logits(11, 6, rng, dev, dtype)
    got = pyops.moe_route(z, 2, backend=backend)
    want = pyops.moe_route(z.cpu(), 2, backend="reference")
    assert got.weights.dtype == dtype
    assert_bitwise_equal(got.experts.cpu(), want.experts, "experts")
    assert_close(got.weights, want.weights, tolerance_for(dtype), "weights")


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_route_bias_and_ties(backend):
    dev = require(backend, "moe_route")
    z = torch.tensor([[1.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 2.0, 1.0, 0.0]], device=dev)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.5], device=dev)
    for b in (None, bias):
        got = pyops.moe_route(z, 2, bias=b, backend=backend)
        want = pyops.moe_route(z.cpu(), 2, bias=None if b is None else b.cpu(), backend="reference")
        assert_bitwise_equal(got.experts.cpu(), want.experts, "experts")
        assert_close(got.weights, want.weights, tolerance_for(FP32), "weights")


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_route_weights_gradient_reaches_logits(backend, score, renormalize, rng):
    dev = require(backend, "moe_route")
    z0 = make_logits(9, 5, rng, dev)
    gw = randn((9, 3), FP32, rng, dev)
    grads = []
    for b in (backend, "reference"):
        z = z0.clone().requires_grad_()
        r = pyops.moe_route(z, 3, score=score, renormalize=renormalize, backend=b)
        grads.append(torch.autograd.grad(r.weights, z, gw)[0])
    assert_close(grads[0], grads[1], tolerance_for(FP32), "grad of logits")


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_route_nan_logits_error_names_the_token(backend):
    dev = require(backend, "moe_route")
    z = torch.zeros(6, 4, device=dev)
    z[4, 2] = float("nan")
    with pytest.raises(ValueError, match="logits: contains NaN/inf at token 4"):
        pyops.moe_route(z, 2, backend=backend)
    z[4, 2] = float("inf")
    with pytest.raises(ValueError, match="token 4"):
        pyops.moe_route(z, 2, backend=backend)


# ------------------------------------------------------------------------------------------------
# Expert MLP
# ------------------------------------------------------------------------------------------------

def compare_layer(backend, shape, act, dtype, cf, rng, route_backend="reference"):
    dev = require(backend)
    T, d, h, E, k, sp = shape
    x = randn((T, d), dtype, rng, dev).requires_grad_()
    z = logits_for(shape, rng, dev).requires_grad_()
    w1, w2, w3 = make_weights(E, d, h, act, dtype, rng, dev, requires_grad=True)
    dy = randn((T, d), dtype, rng, dev)
    y, g = run_layer(x, z, k, w1, w2, w3, act, backend, cf, route_backend, dy)
    y_ref, g_ref = run_layer(x, z, k, w1, w2, w3, act, "reference", cf, route_backend, dy)
    assert y.dtype == dtype
    assert_close(y, y_ref, tolerance_for(dtype), "y")
    assert set(g) == set(g_ref)
    for n in g:
        assert_close(g[n], g_ref[n], grads_tol(n, dtype), f"grad of {n}")


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_experts_fp32_every_shape(backend, shape, rng):
    compare_layer(backend, shape, "swiglu", FP32, None, rng)


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
@pytest.mark.parametrize("act", ["swiglu", "geglu", "gelu", "silu", "relu", "swiglu_oai"])
def test_experts_every_activation(backend, act, rng):
    compare_layer(backend, (7, 5, 6, 4, 2, None), act, FP32, None, rng)


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=fmt_dtype)
@pytest.mark.parametrize("act", ["swiglu", "relu"])
def test_experts_low_precision(backend, dtype, act, rng):
    compare_layer(backend, (7, 5, 6, 4, 2, None), act, dtype, None, rng)


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
@pytest.mark.parametrize("cf", [0.3, 0.75], ids=lambda c: f"cf{c}")
def test_experts_with_capacity_drops(backend, cf, rng):
    compare_layer(backend, (10, 4, 5, 3, 2, "hot"), "swiglu", FP32, cf, rng)


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
def test_experts_with_native_routing(backend, rng):
    """The whole layer on the fast path: native routing (when it can run) then the experts."""
    from .cases import backend_reason
    rb = "cpu" if backend_reason("cpu", "moe_route") is None else "reference"
    compare_layer(backend, (7, 5, 6, 4, 2, None), "swiglu", FP32, 0.75, rng, route_backend=rb)


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
def test_dropped_assignments_contribute_nothing(backend, rng):
    dev = require(backend)
    x = randn((6, 4), FP32, rng, dev)
    z = make_logits(6, 3, rng, dev)
    w1, w2, w3 = make_weights(3, 4, 5, "swiglu", FP32, rng, dev)
    r = pyops.moe_route(z, 2, backend="reference")
    everything = pyops.Routing(r.weights, r.experts, r.order, r.offsets, torch.ones_like(r.dropped))
    y = pyops.moe_experts(x, everything, w1, w2, w3, backend=backend)
    assert bool((y == 0).all())


def _layer_runs(backend, rng, threads):
    """One training step of the same layer per entry of `threads`: [y, *gradients] each."""
    dev = require(backend)
    T, d, h, E, k = (37, 16, 24, 5, 2) if not interpreted(backend) else (9, 4, 5, 3, 2)
    x = randn((T, d), FP32, rng, dev).requires_grad_()
    z = make_logits(T, E, rng, dev).requires_grad_()
    w1, w2, w3 = make_weights(E, d, h, "swiglu", FP32, rng, dev, requires_grad=True)
    dy = randn((T, d), FP32, rng, dev)
    # rows per expert as the layer's GEMMs see them (offsets count the kept assignments)
    counts = torch.diff(pyops.moe_route(z.detach(), k, capacity_factor=0.8, backend="reference").offsets)
    outs = []
    n0 = torch.get_num_threads()
    try:
        for nt in threads:
            torch.set_num_threads(nt)
            y, g = run_layer(x, z, k, w1, w2, w3, "swiglu", backend, 0.8, "reference", dy)
            outs.append([y, *g.values()])
    finally:
        torch.set_num_threads(n0)
    return outs, [int(c) for c in counts], (d, h)


def _mm_varies_with_threads(rows: list, d: int, h: int) -> bool:
    """Whether torch.mm itself gives other bits on 1 and 2 threads for the layer's per-expert GEMM
    shapes (forward and backward). Some BLAS builds split small GEMMs by thread count (MKL on AMD
    EPYC with AVX-512 for 5–9 rows); there the layer inherits it, since its GEMMs are torch.mm's."""
    g = torch.Generator().manual_seed(0)
    shapes = [s for n in set(rows) if n > 0 for s in ((n, d, h), (n, h, d), (h, n, d), (d, n, h))]
    n0 = torch.get_num_threads()
    try:
        for m, kk, n in shapes:
            a, b = torch.randn(m, kk, generator=g), torch.randn(kk, n, generator=g)
            res = []
            for nt in (1, 2):
                torch.set_num_threads(nt)
                res.append(torch.mm(a, b))
            if not torch.equal(res[0], res[1]):
                return True
    finally:
        torch.set_num_threads(n0)
    return False


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
def test_experts_deterministic_across_runs(backend, rng):
    outs, _, _ = _layer_runs(backend, rng, (1, 1, 2, 2))
    for a, b in zip(outs[0], outs[1]):
        assert_bitwise_equal(a, b, "1 thread, second run")
    for a, b in zip(outs[2], outs[3]):
        assert_bitwise_equal(a, b, "2 threads, second run")


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
def test_experts_identical_on_any_thread_count(backend, rng):
    """pyops' own passes (gather, activation, combine, the reductions) split work by size only; the
    GEMMs are torch.mm's, so the layer is thread-count invariant wherever torch.mm is."""
    outs, rows, (d, h) = _layer_runs(backend, rng, (1, 2))
    if backend == "cpu" and _mm_varies_with_threads(rows, d, h):
        pytest.skip("torch.mm gives other bits on 1 and 2 threads for these GEMM shapes on this CPU's BLAS")
    for a, b in zip(outs[0], outs[1]):
        assert_bitwise_equal(a, b, "1 vs 2 threads")


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_route_deterministic_across_threads(backend, rng):
    dev = require(backend, "moe_route")
    z = make_logits(301, 7, rng, dev)
    n0 = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(pyops.moe_route(z, 3, capacity_factor=0.9, backend=backend))
    finally:
        torch.set_num_threads(n0)
    for a, b in zip(*outs):
        assert_bitwise_equal(a, b)


def test_auto_backend_falls_back_with_a_reason(rng):
    x = randn((3, 4), FP32, rng)
    r = pyops.moe_route(make_logits(3, 2, rng, "cpu"), 1)
    w1, w2, w3 = make_weights(2, 4, 3, "swiglu", FP32, rng, "cpu")
    pyops.moe_experts(x, r, w1, w2, w3)
    choice = pyops.last_choice("moe_experts")
    assert choice.backend in ("cpu", "reference")
    if choice.backend == "reference":
        assert "cpu" in choice.passed_over


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
def test_no_grad_path_matches_training_path(backend, rng):
    """Without autograd the CPU backend runs its inference op (intermediates in scratch): same bits."""
    dev = require(backend)
    x = randn((9, 6), FP32, rng, dev)
    r = pyops.moe_route(make_logits(9, 4, rng, dev), 2, capacity_factor=0.9, backend="reference")
    w1, w2, w3 = make_weights(4, 6, 7, "swiglu", FP32, rng, dev, requires_grad=True)
    y_train = pyops.moe_experts(x, r, w1, w2, w3, backend=backend)
    with torch.no_grad():
        y_infer = pyops.moe_experts(x, r, w1, w2, w3, backend=backend)
        y_again = pyops.moe_experts(x, r, w1, w2, w3, backend=backend)
    assert_bitwise_equal(y_infer, y_train.detach(), "no-grad y")
    assert_bitwise_equal(y_again, y_infer, "second no-grad call (reused scratch)")


@pytest.mark.parametrize("backend", ["cpu"])
def test_transposed_view_weights_match_contiguous_weights(backend, rng):
    """Weights as views of a [E, out, in] storage (Hugging Face's layout, gate and up fused) give
    the contiguous weights' output and gradients; the storage receives the gradients."""
    require(backend)
    T, d, h, E, k = 13, 6, 5, 4, 2
    x = randn((T, d), FP32, rng).requires_grad_()
    r = pyops.moe_route(make_logits(T, E, rng, "cpu"), k, backend="reference")
    gate_up = randn((E, 2 * h, d), FP32, rng).requires_grad_()
    down = randn((E, d, h), FP32, rng).requires_grad_()
    dy = randn((T, d), FP32, rng)
    views = (gate_up[:, :h].transpose(1, 2), down.transpose(1, 2), gate_up[:, h:].transpose(1, 2))
    y = pyops.moe_experts(x, r, *views, backend=backend)
    gx, gg, gd = torch.autograd.grad(y, (x, gate_up, down), dy)
    copies = [v.detach().contiguous().requires_grad_() for v in views]
    y_c = pyops.moe_experts(x, r, *copies, backend=backend)
    gx_c, g1, g2, g3 = torch.autograd.grad(y_c, [x] + copies, dy)
    assert_close(y, y_c, tolerance_for(FP32), "y")
    assert_close(gx, gx_c, grads_tol("x", FP32), "grad of x")
    assert_close(gg, torch.cat([g1, g3], 2).transpose(1, 2), grads_tol("w1", FP32), "grad of gate_up_proj")
    assert_close(gd, g2.transpose(1, 2), grads_tol("w2", FP32), "grad of down_proj")
