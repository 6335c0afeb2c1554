"""Experts with biases and GPT-OSS's clamped SwiGLU (`activation="swiglu_oai"`), every backend
against the reference; the reference against an independent per-token formulation of
transformers' `GptOssExperts`; weights and biases as interleaved views of one fused gate/up tensor."""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_close, fmt_dtype, randn
from .cases import BF16, FP16, FP32, grads_tol, make_logits, require
from pyops.moe import reference as ref
from pyops.testing import tolerance_for

BACKENDS = ["cpu", "triton"]


def gpt_oss_params(E, d, h, dtype, gen, dev, scale=1.0):
    """GPT-OSS's stored layout: gate_up_proj [E, d, 2h] with gate and up interleaved in the last
    dimension, gate_up_proj_bias [E, 2h], down_proj [E, h, d], down_proj_bias [E, d]."""
    gate_up = randn((E, d, 2 * h), dtype, gen, dev, scale=scale * d ** -0.5).requires_grad_()
    gate_up_bias = randn((E, 2 * h), dtype, gen, dev, scale=scale).requires_grad_()
    down = randn((E, h, d), dtype, gen, dev, scale=h ** -0.5).requires_grad_()
    down_bias = randn((E, d), dtype, gen, dev).requires_grad_()
    return gate_up, gate_up_bias, down, down_bias


def oai_views(gate_up, gate_up_bias, down, down_bias):
    """(w1, w2, w3, b1, b2, b3) for pyops.moe_experts: strided views, no copies."""
    return (gate_up[..., ::2], down, gate_up[..., 1::2], gate_up_bias[:, ::2], down_bias, gate_up_bias[:, 1::2])


def per_token_gpt_oss(x, experts, weights, gate_up, gate_up_bias, down, down_bias, alpha, limit):
    """transformers' GptOssExperts written token by token in fp64 (an independent formulation)."""
    T, k = experts.shape
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(experts[t, j])
            gu = x[t].double() @ gate_up[e].double() + gate_up_bias[e].double()
            gate, up = gu[::2].clamp(max=limit), gu[1::2].clamp(-limit, limit)
            out = ((up + 1) * gate * torch.sigmoid(gate * alpha)) @ down[e].double() + down_bias[e].double()
            y[t] += weights[t, j].double() * out
    return y


def layer(x, logits, params, backend, alpha=None, limit=None, k=2):
    r = pyops.moe_route(logits, k, backend="reference")
    return pyops.moe_experts(x, r, *oai_views(*params)[:3], activation="swiglu_oai", b1=oai_views(*params)[3],
                             b2=params[3], b3=oai_views(*params)[5], alpha=alpha, limit=limit, backend=backend)


@pytest.mark.parametrize("limit", [None, 0.5], ids=["limit-default", "limit0.5-clamps-active"])
def test_reference_matches_gpt_oss_per_token(limit, rng):
    T, d, h, E, k = 9, 6, 5, 4, 2
    x = randn((T, d), FP32, rng)
    logits = make_logits(T, E, rng, "cpu")
    params = gpt_oss_params(E, d, h, FP32, rng, "cpu", scale=4.0)
    r = pyops.moe_route(logits, k, backend="reference")
    y = layer(x, logits, params, "reference", limit=limit)
    expected = per_token_gpt_oss(x, r.experts, r.weights, *[p.detach() for p in params], 1.702,
                                 7.0 if limit is None else limit)
    assert_close(y.double(), expected, tolerance_for(FP32), "y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=fmt_dtype)
@pytest.mark.parametrize("shape", [(7, 5, 6, 4, 2), (13, 8, 9, 5, 3), (1, 3, 4, 2, 1)],
                         ids=lambda s: "T{}-d{}-h{}-E{}-k{}".format(*s))
def test_swiglu_oai_with_biases_matches_reference(backend, dtype, shape, rng):
    """Forward and the gradients of x, the fused gate/up storage, its bias, down, its bias and the
    logits; inputs scaled so that both clamps cut (limit 0.5)."""
    dev = require(backend)
    T, d, h, E, k = shape
    x = randn((T, d), dtype, rng, dev, scale=3.0).requires_grad_()
    logits = make_logits(T, E, rng, dev).requires_grad_()
    params = gpt_oss_params(E, d, h, dtype, rng, dev, scale=3.0)
    dy = randn((T, d), dtype, rng, dev)
    ins = (x, logits) + params
    names = ("x", "logits", "w1", "b1", "w2", "b2")
    y = layer(x, logits, params, backend, alpha=1.3, limit=0.5, k=k)
    g = torch.autograd.grad(y, ins, dy)
    y_ref = layer(x, logits, params, "reference", alpha=1.3, limit=0.5, k=k)
    g_ref = torch.autograd.grad(y_ref, ins, dy)
    assert y.dtype == dtype
    assert_close(y, y_ref, tolerance_for(dtype), "y")
    for n, a, b in zip(names, g, g_ref):
        assert_close(a, b, grads_tol(n, dtype), f"grad of {n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act,biases", [("swiglu", "b1"), ("swiglu", "b2"), ("swiglu", "b3"), ("relu", "b1,b2"),
                                        ("gelu", "b2"), ("geglu", "b1,b2,b3")])
def test_any_subset_of_biases_on_any_activation(backend, act, biases, rng):
    dev = require(backend)
    T, d, h, E, k = 11, 6, 7, 4, 2
    glu = act in ref.GLU_ACTIVATIONS
    x = randn((T, d), FP32, rng, dev).requires_grad_()
    r = pyops.moe_route(make_logits(T, E, rng, dev), k, capacity_factor=0.7, backend="reference")
    w = {"w1": randn((E, d, h), FP32, rng, dev, scale=d ** -0.5).requires_grad_(),
         "w2": randn((E, h, d), FP32, rng, dev, scale=h ** -0.5).requires_grad_()}
    if glu:
        w["w3"] = randn((E, d, h), FP32, rng, dev, scale=d ** -0.5).requires_grad_()
    sizes = {"b1": h, "b2": d, "b3": h}
    for b in biases.split(","):
        w[b] = randn((E, sizes[b]), FP32, rng, dev).requires_grad_()
    dy = randn((T, d), FP32, rng, dev)
    outs = {}
    for be in (backend, "reference"):
        y = pyops.moe_experts(x, r, activation=act, backend=be, **w)
        outs[be] = (y, torch.autograd.grad(y, [x] + list(w.values()), dy))
    assert_close(outs[backend][0], outs["reference"][0], tolerance_for(FP32), "y")
    for n, a, b in zip(["x"] + list(w), outs[backend][1], outs["reference"][1]):
        assert_close(a, b, grads_tol(n if n[0] == "w" else "x", FP32) if n[0] != "b" else grads_tol("w1", FP32),
                     f"grad of {n}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_of_an_expert_without_tokens_gets_zero_gradient(backend, rng):
    dev = require(backend)
    T, d, h, E, k = 8, 4, 5, 4, 1
    x = randn((T, d), FP32, rng, dev)
    r = pyops.moe_route(make_logits(T, E, rng, dev, skip=(2,)), k, backend="reference")
    assert int(r.offsets[3] - r.offsets[2]) == 0
    params = gpt_oss_params(E, d, h, FP32, rng, dev)
    w1, w2, w3, b1, b2, b3 = oai_views(*params)
    y = pyops.moe_experts(x, r, w1, w2, w3, activation="swiglu_oai", b1=b1, b2=b2, b3=b3, backend=backend)
    g_bias, g_down_bias = torch.autograd.grad(y.sum(), (params[1], params[3]))
    assert bool((g_bias[2] == 0).all()) and bool((g_down_bias[2] == 0).all())
    assert bool((g_down_bias[r.experts[:, 0].long()] != 0).any())


def test_reference_gradcheck_fp64(rng):
    """The reference's gradients (clamps included) against finite differences; the values are kept
    away from the clamp bounds, where the derivative jumps."""
    T, d, h, E, k = 5, 3, 4, 3, 2
    x = randn((T, d), torch.float64, rng).requires_grad_()
    logits = make_logits(T, E, rng, "cpu", dtype=torch.float64)
    r = pyops.moe_route(logits, k, backend="reference")
    w1, w3 = (randn((E, d, h), torch.float64, rng).requires_grad_() for _ in range(2))
    w2 = randn((E, h, d), torch.float64, rng).requires_grad_()
    b1, b3 = (randn((E, h), torch.float64, rng).requires_grad_() for _ in range(2))
    b2 = randn((E, d), torch.float64, rng).requires_grad_()
    a = torch.cat([x[r.experts[:, j].long().tolist()] for j in range(k)])
    assert a.numel() > 0

    def f(*args):
        return ref.experts(args[0], r.weights, r.experts, r.dropped, args[1], args[2], args[3], "swiglu_oai",
                           args[4], args[5], args[6], 1.702, 1.5)

    torch.autograd.gradcheck(f, (x, w1, w2, w3, b1, b2, b3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_bias_gives_the_definitions_result(backend, rng):
    dev = require(backend)
    T, d, h, E, k = 6, 4, 3, 3, 2
    x = randn((T, d), FP32, rng, dev)
    logits = make_logits(T, E, rng, dev)
    params = [p.detach().clone() for p in gpt_oss_params(E, d, h, FP32, rng, dev)]
    params[3][1, 2] = float("nan")
    params[1][0, 1] = float("inf")
    y = layer(x, logits, params, backend)
    y_ref = layer(x, logits, params, "reference")
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert_close(torch.nan_to_num(y), torch.nan_to_num(y_ref), tolerance_for(FP32), "y")


def test_native_activation_matches_the_reference_at_and_beyond_the_bounds():
    """The C++ activation kernel and its gradient at values on, inside and outside ±limit."""
    from pyops import _native
    if _native.cpu_module is None:
        pytest.skip("no native module")
    C = _native.cpu_module
    limit, alpha = 2.0, 1.702
    vals = torch.tensor([-9.0, -2.0, -1.999, -0.3, 0.0, 0.7, 1.999, 2.0, 2.001, 30.0])
    a = vals.repeat(len(vals)).contiguous()
    b = vals.repeat_interleave(len(vals)).contiguous()
    dh = torch.linspace(-1, 1, a.numel())
    h = torch.empty_like(a)
    C.moe_act_forward(a.data_ptr(), b.data_ptr(), h.data_ptr(), 1, a.numel(), 5, 0, 1, alpha, limit)
    aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
    h_ref = ref.activation(aa, bb, "swiglu_oai", alpha, limit)
    assert_close(h, h_ref.detach(), tolerance_for(FP32), "h")
    da, db, h2 = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    C.moe_act_backward(a.data_ptr(), b.data_ptr(), dh.data_ptr(), da.data_ptr(), db.data_ptr(), 1, a.numel(), 5, 0,
                       1, h2.data_ptr(), alpha, limit)
    ga, gb = torch.autograd.grad(h_ref, (aa, bb), dh)
    assert_close(da, ga, tolerance_for(FP32), "da")
    assert_close(db, gb, tolerance_for(FP32), "db")
    assert_close(h2, h_ref.detach(), tolerance_for(FP32), "h from the backward pass")


@pytest.mark.parametrize("kwargs,match", [
    (dict(b1=torch.zeros(4, 7)), r"b1: expected shape \[4, 6\]"),
    (dict(b2=torch.zeros(4, 6)), r"b2: expected shape \[4, 5\]"),
    (dict(b1=torch.zeros(4, 6, dtype=torch.float64)), "b1"),
    (dict(alpha=1.0, activation="swiglu"), "alpha: only activation 'swiglu_oai'"),
    (dict(limit=-1.0), "limit: expected a finite number > 0"),
    (dict(limit=float("inf")), "limit: expected a finite number > 0"),
    (dict(alpha="x"), "alpha: expected a number"),
], ids=["b1-shape", "b2-shape", "b1-dtype", "alpha-other-act", "limit-negative", "limit-inf", "alpha-type"])
def test_bad_bias_or_constants_name_the_argument(kwargs, match, rng):
    T, d, h, E, k = 5, 5, 6, 4, 2
    x = randn((T, d), FP32, rng)
    r = pyops.moe_route(make_logits(T, E, rng, "cpu"), k)
    w1, w3 = randn((E, d, h), FP32, rng), randn((E, d, h), FP32, rng)
    w2 = randn((E, h, d), FP32, rng)
    kw = dict(activation="swiglu_oai")
    kw.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        pyops.moe_experts(x, r, w1, w2, w3, **kw)


def test_b3_needs_a_glu_activation(rng):
    T, d, h, E, k = 5, 5, 6, 4, 2
    r = pyops.moe_route(make_logits(T, E, rng, "cpu"), k)
    with pytest.raises(ValueError, match="b3: only the GLU activations"):
        pyops.moe_experts(randn((T, d), FP32, rng), r, randn((E, d, h), FP32, rng), randn((E, h, d), FP32, rng),
                          activation="relu", b3=torch.zeros(E, h))


def test_compile_fullgraph_forward_backward_with_interleaved_views(rng):
    """Compiled forward+backward on the fused, interleaved GPT-OSS storage equals eager (the fake
    kernels give the real kernels' contiguous gradient layouts)."""
    T, d, h, E, k = 10, 6, 5, 4, 2
    x = randn((T, d), FP32, rng).requires_grad_()
    logits = make_logits(T, E, rng, "cpu").requires_grad_()
    params = gpt_oss_params(E, d, h, FP32, rng, "cpu", scale=3.0)

    def loss(x, logits, gate_up, gate_up_bias, down, down_bias):
        r = pyops.moe_route(logits, k)
        y = pyops.moe_experts(x, r, gate_up[..., ::2], down, gate_up[..., 1::2], activation="swiglu_oai",
                              b1=gate_up_bias[:, ::2], b2=down_bias, b3=gate_up_bias[:, 1::2], limit=1.0)
        return y.square().sum()

    torch._dynamo.reset()
    ins = (x, logits) + params
    eager = torch.autograd.grad(loss(*ins), ins)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*ins), ins)
    for n, a, b in zip(("x", "logits", "w1", "b1", "w2", "b2"), compiled, eager):
        assert_close(a, b, grads_tol(n, FP32) if n != "b1" and n != "b2" else grads_tol("w1", FP32), f"grad of {n}")


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("util", OPCHECK_UTILS)
@pytest.mark.parametrize("name", ["moe_experts_cpu", "moe_experts_cpu_inference", "moe_experts_cpu_backward",
                                  "moe_experts_triton", "moe_experts_triton_backward"])
def test_opcheck_with_biases_and_interleaved_views(name, util, rng):
    backend = "triton" if "triton" in name else "cpu"
    dev = require(backend)
    if backend == "triton" and util == "test_aot_dispatch_dynamic" and not torch.cuda.is_available():
        pytest.skip("Triton under TRITON_INTERPRET=1: AOT dispatch would run the interpreter on FakeTensors; "
                    "checked on a GPU")
    T, d, h, E, k = 7, 5, 6, 4, 2
    grad = name.endswith(("_cpu", "_triton"))
    x = randn((T, d), FP32, rng, dev).requires_grad_(grad)
    r = pyops.moe_route(make_logits(T, E, rng, dev), k, capacity_factor=0.8, backend="reference")
    w = r.weights.detach().requires_grad_(grad)
    params = [p.detach().requires_grad_(grad) for p in gpt_oss_params(E, d, h, FP32, rng, dev, scale=3.0)]
    w1, w2, w3, b1, b2, b3 = oai_views(*params)
    fwd = (x, w, r.experts, r.order, r.offsets, r.dropped, w1, w2, w3, "swiglu_oai", b1, b2, b3, 1.702, 1.0)
    if name.endswith("backward"):
        with torch.no_grad():
            y, a, b, hh, ys = getattr(torch.ops.pyops, name[:-len("_backward")]).default(*fwd)
        args = (randn((T, d), FP32, rng, dev), x.detach(), w.detach(), r.order, r.offsets, r.dropped,
                w1.detach(), w2.detach(), w3.detach(), a, b, hh, ys, "swiglu_oai", b1.detach(), b2.detach(),
                b3.detach(), 1.702, 1.0)
    else:
        args = fwd
    torch.library.opcheck(getattr(torch.ops.pyops, name).default, args, test_utils=util)
