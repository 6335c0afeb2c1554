"""Registration checks: `torch.library.opcheck` on every registered neighbourhood op, and
`torch.compile(fullgraph=True)` of the public functions compared with eager.

Under TRITON_INTERPRET=1, `wrap_triton` hands back the raw InterpretedFunction, so AOT dispatch of
a Triton op would run the interpreter on FakeTensors: those checks skip on CPU and run on a GPU."""
from __future__ import annotations

import pytest
import torch

import pyops
from .cases import NACase, fmt_dtype, interpreted, require_backend
from pyops.neighborhood import ops as ops_na
from pyops.neighborhood import reference as ref
from pyops.testing import compare, tolerance_for

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
INTERPRETER_AOT_REASON = ("Triton under TRITON_INTERPRET=1: wrap_triton returns the raw InterpretedFunction, "
                          "so AOT dispatch would run the interpreter on FakeTensors; checked on a GPU")
OPS = {"na_native": ("cpu", "forward"), "na_native_backward": ("cpu", "backward"),
       "na_triton": ("triton", "forward"), "na_triton_backward": ("triton", "backward")}
ARGS = [
    (NACase((5, 7), (3, 3), dilation=(1, 2), rpb=True), torch.float32),
    (NACase((9,), (4,), stride=(2,), causal=(True,)), torch.bfloat16),
    (NACase((3, 4, 5), (2, 3, 3), H=1), torch.float16),
]


def op_args(kind, case, dtype, dev):
    q, k, v, rpb = case.make(dtype, dev, requires_grad=(kind == "forward"))
    p = ops_na.prepare(case.n, q, k, v, case.kernel, case.st(), case.dl(), case.ca(), rpb, None)
    q3, k3, v3, r3, ks, st, dl, ca = ops_na._to3d(p)
    if kind == "forward":
        return (q3, k3, v3, r3, ks, st, dl, ca, p.scale)
    with torch.no_grad():
        out, lse = ref.neighborhood_attention(q3, k3, v3, ks, st, dl, ca, r3, p.scale, True)
    dout = torch.randn_like(out)
    return (dout, q3, k3, v3, out, lse.float(), r3, ks, st, dl, ca, p.scale)


@pytest.mark.parametrize("util", OPCHECK_UTILS)
@pytest.mark.parametrize("case,dtype", ARGS, ids=[f"{c.id}-{fmt_dtype(d)}" for c, d in ARGS])
@pytest.mark.parametrize("name", list(OPS))
def test_opcheck(name, case, dtype, util):
    backend, kind = OPS[name]
    dev = require_backend(backend, case.n, dtype)
    if util == "test_aot_dispatch_dynamic" and interpreted(backend):
        pytest.skip(INTERPRETER_AOT_REASON)
    torch.library.opcheck(getattr(torch.ops.pyops, name).default, op_args(kind, case, dtype, dev), test_utils=util)


COMPILE = [("reference", "aot_eager"), ("cpu", "inductor"), ("triton", "eager"), ("triton", "inductor")]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend,compiler", COMPILE, ids=[f"{b}-{c}" for b, c in COMPILE])
def test_compile_fullgraph_matches_eager(backend, compiler, fresh_dynamo):
    dev = require_backend(backend, 2)
    if compiler != "eager" and interpreted(backend):
        pytest.skip(INTERPRETER_AOT_REASON)
    case = NACase((6, 7), (3, 3), dilation=(2, 1), rpb=True)
    q, k, v, rpb = case.make(torch.float32, dev)

    def f(q, k, v, rpb):
        out, lse = pyops.na2d(q, k, v, (3, 3), dilation=(2, 1), rpb=rpb, return_lse=True, backend=backend)
        y = pyops.na1d(q[:, 0], k[:, 0], v[:, 0], 3, is_causal=True, backend=backend)
        return out, lse, y

    def loss(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb)]
        out, lse, y = fn(*leaves)
        (out.square().sum() + y.sum()).backward()
        return [out.detach(), lse, y.detach()] + [t.grad for t in leaves]

    eager = loss(f)
    compiled = loss(torch.compile(f, fullgraph=True, backend=compiler))
    for a, e in zip(compiled, eager):
        assert compare(a, e, tolerance_for(torch.float32)).ok
