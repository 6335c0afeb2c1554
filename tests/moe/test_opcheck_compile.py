"""Registration checks: `torch.library.opcheck` on every registered moe op and
`torch.compile(fullgraph=True)` of the public functions, compared with eager."""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import CUDA, assert_close, fmt_dtype, randn
from .cases import FP32, BF16, backend_reason, grads_tol, interpreted, make_logits, make_weights, require
from pyops.testing import tolerance_for

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
INTERPRETER_AOT_REASON = (
    "Triton under TRITON_INTERPRET=1: torch.library.wrap_triton returns the raw InterpretedFunction, so AOT "
    "dispatch would run the interpreter on FakeTensors; checked on a GPU")


def route_backend():
    return "cuda" if backend_reason("cuda", "moe_route") is None else "cpu"


def expert_args(dev, act, dtype, rng, requires_grad, cf=0.8):
    T, d, h, E, k = 7, 5, 6, 4, 2
    x = randn((T, d), dtype, rng, dev).requires_grad_(requires_grad)
    r = pyops.moe_route(make_logits(T, E, rng, dev, hot=1), k, capacity_factor=cf, backend="reference")
    w = r.weights.detach().to(dtype).requires_grad_(requires_grad)
    w1, w2, w3 = make_weights(E, d, h, act, dtype, rng, dev, requires_grad=requires_grad)
    return (x, w, r.experts, r.order, r.offsets, r.dropped, w1, w2, w3, act)


def backward_args(op_prefix, fwd_args, rng):
    x, w, experts, order, offsets, dropped, w1, w2, w3, act = fwd_args
    fwd = getattr(torch.ops.pyops, op_prefix).default
    with torch.no_grad():
        y, a, b, hh, ys = fwd(*fwd_args)
    dy = randn(y.shape, y.dtype, rng, y.device)
    return (dy, x.detach(), w.detach(), order, offsets, dropped, w1.detach(), w2.detach(),
            None if w3 is None else w3.detach(), a, b, hh, ys, act)


CASES = []
for _util in OPCHECK_UTILS:
    for _op in ("moe_route", "moe_route_backward"):
        for _cf in (None, 0.5):
            CASES.append(pytest.param(_op, None, FP32, _cf, _util,
                                      id=f"{_op}-{'nocap' if _cf is None else f'cap{_cf}'}-{_util}"))
    for _op in ("moe_experts_cpu", "moe_experts_cpu_backward", "moe_experts_cpu_inference", "moe_experts_triton",
                "moe_experts_triton_backward"):
        for _act, _dt in (("swiglu", FP32), ("relu", BF16)):
            CASES.append(pytest.param(_op, _act, _dt, 0.8, _util, id=f"{_op}-{_act}-{fmt_dtype(_dt)}-{_util}"))


@pytest.mark.parametrize("name,act,dtype,cf,util", CASES)
def test_opcheck(name, act, dtype, cf, util, rng):
    if name.startswith("moe_route"):
        backend = route_backend() if name == "moe_route" else "reference"
        dev = require(backend, "moe_route") if backend != "reference" else torch.device("cuda" if CUDA else "cpu")
        z = make_logits(9, 5, rng, dev).requires_grad_(name == "moe_route")
        cap = -1 if cf is None else 3
        if name == "moe_route":
            args = (z, 2, 0, True, cap, None)
        else:
            r = pyops.moe_route(z.detach(), 2, backend="reference")
            args = (randn((9, 2), FP32, rng, dev), z, r.experts, 0, True)
    else:
        backend = "triton" if "triton" in name else "cpu"
        dev = require(backend)
        if util == "test_aot_dispatch_dynamic" and interpreted(backend):
            pytest.skip(INTERPRETER_AOT_REASON)
        fwd = expert_args(dev, act, dtype, rng, requires_grad=name.endswith(("_cpu", "_triton")), cf=cf)
        args = fwd if not name.endswith("backward") else backward_args(name[:-len("_backward")], fwd, rng)
    torch.library.opcheck(getattr(torch.ops.pyops, name).default, args, test_utils=util)


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def layer_loss(x, z, w1, w2, w3, dy, *, route_backend, backend):
    r = pyops.moe_route(z, 2, capacity_factor=1.0, backend=route_backend)
    y = pyops.moe_experts(x, r, w1, w2, w3, activation="swiglu", backend=backend)
    return y, (y.float() * dy).sum()


@pytest.mark.parametrize("route_b,expert_b,compiler", [
    ("reference", "cpu", "aot_eager"), ("cpu", "cpu", "inductor"), ("cpu", "cpu", "aot_eager"),
    ("reference", "triton", "eager"), ("cuda", "triton", "inductor")], ids=lambda v: str(v))
def test_compile_fullgraph_matches_eager(route_b, expert_b, compiler, rng, fresh_dynamo):
    dev = require(expert_b)
    if route_b != "reference":
        require(route_b, "moe_route")
    if compiler != "eager" and interpreted(expert_b):
        pytest.skip(INTERPRETER_AOT_REASON)
    T, d, h, E = 11, 6, 7, 4
    x0 = randn((T, d), FP32, rng, dev)
    z0 = make_logits(T, E, rng, dev)
    ws0 = make_weights(E, d, h, "swiglu", FP32, rng, dev)
    dy = randn((T, d), FP32, rng, dev)
    results = []
    for fn in (layer_loss, torch.compile(layer_loss, fullgraph=True, backend=compiler)):
        leaves = [t.clone().requires_grad_() for t in (x0, z0, *ws0)]
        y, loss = fn(*leaves, dy, route_backend=route_b, backend=expert_b)
        loss.backward()
        results.append((y, [t.grad for t in leaves]))
    (y_e, g_e), (y_c, g_c) = results
    assert_close(y_c, y_e, tolerance_for(FP32), "y")
    for n, a, b in zip(("x", "logits", "w1", "w2", "w3"), g_c, g_e):
        assert_close(a, b, grads_tol(n, FP32), f"grad of {n}")


def layer_loss_views(x, zt, w1_hf, w2_hf, w3_hf, dy, *, backend):
    """The weights as transposed views of Hugging Face's [E, out, in] storage and the logits as a
    transposed view: the layouts a model hands over without copying."""
    r = pyops.moe_route(zt.t(), 2, capacity_factor=1.0, backend="cpu")
    y = pyops.moe_experts(x.t(), r, w1_hf.transpose(1, 2), w2_hf.transpose(1, 2), w3_hf.transpose(1, 2),
                          activation="swiglu", backend=backend)
    return y, (y.float() * dy).sum()


@pytest.mark.parametrize("expert_b,compiler", [("cpu", "inductor"), ("cpu", "aot_eager"), ("triton", "inductor")],
                         ids=lambda v: str(v))
def test_compile_fullgraph_with_view_inputs_matches_eager(expert_b, compiler, rng, fresh_dynamo):
    dev = require(expert_b)
    require("cpu", "moe_route")
    if interpreted(expert_b):
        pytest.skip(INTERPRETER_AOT_REASON)
    T, d, h, E = 11, 6, 7, 4
    x0 = randn((d, T), FP32, rng, dev)
    z0 = make_logits(T, E, rng, dev).t().contiguous()
    w1, w2, w3 = (t.transpose(1, 2).contiguous() for t in make_weights(E, d, h, "swiglu", FP32, rng, dev))
    dy = randn((T, d), FP32, rng, dev)
    results = []
    for fn in (layer_loss_views, torch.compile(layer_loss_views, fullgraph=True, backend=compiler)):
        leaves = [t.clone().requires_grad_() for t in (x0, z0, w1, w2, w3)]
        y, loss = fn(*leaves, dy, backend=expert_b)
        loss.backward()
        results.append((y, [t.grad for t in leaves]))
    (y_e, g_e), (y_c, g_c) = results
    assert_close(y_c, y_e, tolerance_for(FP32), "y")
    for n, a, b in zip(("x", "logits", "w1", "w2", "w3"), g_c, g_e):
        assert_close(a, b, grads_tol(n, FP32), f"grad of {n}")


def test_compile_auto_backend_route_fullgraph(rng, fresh_dynamo):
    z = make_logits(6, 4, rng, "cpu")
    f = torch.compile(lambda z: tuple(pyops.moe_route(z, 2)), fullgraph=True, backend="eager")
    for a, b in zip(f(z), pyops.moe_route(z, 2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("act", ["swiglu", "relu"])
def test_cpu_forward_saves_no_hidden_and_backward_recomputes_it(act, rng):
    """The CPU forward returns an empty h (the backward recomputes act(a, b)); the backward gives the
    same gradients from the empty placeholder as from the full h (what the Triton forward saves)."""
    dev = require("cpu")
    args = expert_args(dev, act, FP32, rng, requires_grad=False)
    y, a, b, hh, ys = torch.ops.pyops.moe_experts_cpu.default(*args)
    assert hh.numel() == 0 and a.shape == (args[3].numel(), args[6].shape[2])
    h_ref = (torch.nn.functional.silu(a) * b) if act == "swiglu" else torch.relu(a)
    bargs = list(backward_args("moe_experts_cpu", args, rng))
    got = torch.ops.pyops.moe_experts_cpu_backward.default(*bargs)
    bargs[11] = h_ref.contiguous()
    want = torch.ops.pyops.moe_experts_cpu_backward.default(*bargs)
    for g, w in zip(got, want):
        assert_close(g, w, tolerance_for(torch.float32))
