"""Registration checks (docs/design.md#registration, #testing): `torch.library.opcheck` on every registered
task-attention op and `torch.compile(fullgraph=True)` of `pyops.task_masked_attention`.

Under TRITON_INTERPRET=1 `wrap_triton` hands back the raw InterpretedFunction, so AOT dispatch of
a Triton op would run the interpreter on FakeTensors: those cases skip on CPU and run on a GPU.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_close, interpreted
from .cases import BF16, FP32, fmt, randn, require_backend
from pyops import masks
from pyops.testing import tolerance_for

UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
INTERPRETER_AOT_REASON = (
    "Triton under TRITON_INTERPRET=1: torch.library.wrap_triton returns the raw InterpretedFunction, so AOT "
    "dispatch would run the interpreter on FakeTensors; checked on a GPU")

OPS = {  # op name: (backend, kind)
    "task_masked_attention": ("cpu", "forward"),
    "task_masked_attention_backward": ("cpu", "backward"),
    "task_masked_attention_triton": ("triton", "forward"),
    "task_masked_attention_triton_backward": ("triton", "backward"),
}

# (B, Hq, Hkv, Lq, Lk, D, Dv, dtype, dropout_p, causal, allow)
ARGSETS = [
    (2, 2, 1, 7, 7, 8, 4, FP32, 0.0, False, True),
    (1, 2, 2, 5, 9, 4, 4, BF16, 0.3, True, True),
    (2, 1, 1, 6, 6, 4, 8, FP32, 0.0, False, False),
]


def argset_id(a):
    B, Hq, Hkv, Lq, Lk, D, Dv, dt, p, c, al = a
    return f"B{B}-H{Hq}/{Hkv}-L{Lq}x{Lk}-D{D}-Dv{Dv}-{fmt(dt)}-p{p}{'-causal' if c else ''}{'' if al else '-identity'}"


def op_args(kind, argset, gen, dev):
    B, Hq, Hkv, Lq, Lk, D, Dv, dt, p, causal, with_allow = argset
    rg = kind == "forward"
    q, k, v = randn((B, Hq, Lq, D), dt, gen, requires_grad=rg), randn((B, Hkv, Lk, D), dt, gen, requires_grad=rg), \
        randn((B, Hkv, Lk, Dv), dt, gen, requires_grad=rg)
    qg = torch.randint(-1, 3, (B, Lq), generator=gen, dtype=torch.int32)
    kg = torch.randint(0, 3, (Lk,), generator=gen, dtype=torch.int32)
    allow = (torch.rand(3, 3, generator=gen) < 0.7) if with_allow else None
    seed = torch.tensor([12345], dtype=torch.int64)
    scale = D ** -0.5
    mv = lambda t: t if t is None else t.detach().to(dev).requires_grad_(t.requires_grad)  # noqa: E731
    q, k, v, qg, kg, allow, seed = (mv(t) for t in (q, k, v, qg, kg, allow, seed))
    if kind == "forward":
        return (q, k, v, qg, kg, allow, causal, p, scale, seed)
    from pyops.task_attention.reference import task_masked_attention as ref
    out, lse = ref(q, k, v, qg, kg, allow, causal=causal, dropout_p=p, scale=scale, seed=seed, return_lse=True)
    dout = randn(out.shape, dt, gen).to(dev)
    return (dout, q, k, v, out, lse, qg, kg, allow, causal, p, scale, seed)


PARAMS = [pytest.param(n, b, kind, a, u, id=f"{n}-{argset_id(a)}-{u}")
          for n, (b, kind) in OPS.items() for a in ARGSETS for u in UTILS]


@pytest.mark.parametrize("name,backend,kind,argset,util", PARAMS)
def test_opcheck(name, backend, kind, argset, util, rng):
    dev = require_backend(backend, argset[7])
    if util == "test_aot_dispatch_dynamic" and interpreted(backend):
        pytest.skip(INTERPRETER_AOT_REASON)
    op = getattr(torch.ops.pyops, name).default
    torch.library.opcheck(op, op_args(kind, argset, rng, dev), test_utils=util)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def attention_loss(q, k, v, groups, allow, w, *, backend, dropout_p=0.0):
    out = pyops.task_masked_attention(q, k, v, groups, allow=allow, dropout_p=dropout_p, seed=99, backend=backend)
    return out, (out.float() * w).sum()


@pytest.mark.parametrize("backend,compiler", [("reference", "aot_eager"),
                                              ("cpu", "inductor"), ("triton", "eager"), ("triton", "inductor")])
def test_compile_fullgraph_matches_eager(backend, compiler, rng, fresh_dynamo):
    dev = require_backend(backend)
    if compiler != "eager" and interpreted(backend):
        pytest.skip(INTERPRETER_AOT_REASON)
    groups, allow = (t.to(dev) for t in masks.multitab(3, 8, "TxT"))
    q0, k0, v0 = (randn((2, 2, 11, 8), FP32, rng).to(dev) for _ in range(3))
    w = randn((2, 2, 11, 8), FP32, rng).to(dev)
    for dropout_p in (0.0, 0.2):
        grads = []
        for fn in (attention_loss, torch.compile(attention_loss, fullgraph=True, backend=compiler)):
            q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
            out, loss = fn(q, k, v, groups, allow, w, backend=backend, dropout_p=dropout_p)
            loss.backward()
            grads.append((out, q.grad, k.grad, v.grad))
        for name, c, e in zip(("out", "dq", "dk", "dv"), grads[1], grads[0]):
            assert_close(c, e, tolerance_for(FP32), name)


def test_compile_auto_backend_and_seed_none_fullgraph(rng, fresh_dynamo):
    """backend='auto', allow=None and a seed drawn from torch's generator trace without a break."""
    q = randn((1, 2, 6, 4), FP32, rng)
    g = torch.tensor([0, 0, 1, 1, 1, -1])
    f = torch.compile(lambda q, g: pyops.task_masked_attention(q, q, q, g, dropout_p=0.1), fullgraph=True,
                      backend="eager")
    assert f(q, g).shape == (1, 2, 6, 4)
