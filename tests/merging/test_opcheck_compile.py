"""Registration checks (docs/design.md#registration, #testing): `torch.library.opcheck` on every registered op and
`torch.compile(fullgraph=True)` of the public functions, compared with eager.

Under TRITON_INTERPRET=1, torch's `wrap_triton` hands back the raw InterpretedFunction
(torch/_library/triton.py), so a Triton op cannot be traced by AOT dispatch (its body would
launch the interpreter on FakeTensors). Those cases skip on CPU with that reason and run on a GPU;
Dynamo alone (`backend="eager"`) still checks that the Python glue has no graph break.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import (REDUCTION_TOL, assert_close, assert_close_dtype, backend_reason, device_for, fmt_dtype,
                      interpreted, randn, require_backend)
from .cases import BF16, FP16, FP32, INTERPRETER_AOT_REASON, block_size_for, shape_id
from .cases import fresh_dynamo  # noqa: F401 (a fixture)

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

# (shape, n, blocks, coeff kind, dtype, out dtype)
ARGSETS = [
    ((3, 17), 2, 7, "block", FP32, FP32),
    ((5, 1, 9), 3, None, "vec", BF16, FP32),
    ((4, 6), 1, "rows", "block", FP16, FP16),
]


def argset_id(a):
    shape, n, blocks, ck, dt, od = a
    return f"{shape_id(shape)}-N{n}-{blocks}-c{ck}-{fmt_dtype(dt)}-to-{fmt_dtype(od)}"


def make_args(argset, gen, dev, requires_grad=False):
    shape, n, blocks, ck, dt, od = argset
    bs = block_size_for(blocks, shape)
    nb = -(-max(1, torch.Size(shape).numel()) // bs)
    base = randn(shape, dt, gen, dev).requires_grad_(requires_grad)
    deltas = [randn(shape, dt, gen, dev).requires_grad_(requires_grad) for _ in range(n)]
    coeffs = randn((n,) if ck == "vec" else (n, nb), FP32, gen, dev).requires_grad_(requires_grad)
    return base, deltas, coeffs, bs, od


OPS = {
    # op name: (backend whose ops they are, kind)
    "task_arithmetic": ("cpu", "forward"),
    "task_arithmetic_backward": ("cpu", "backward"),
    "task_arithmetic_out": ("cpu", "out"),
    "task_arithmetic_triton": ("triton", "forward"),
    "task_arithmetic_triton_backward": ("triton", "backward"),
    "task_arithmetic_triton_out": ("triton", "out"),
}


def native_backend():
    """The C++ ops run on CPU tensors with pyops._C, or CUDA tensors with pyops._C_cuda."""
    return "cuda" if backend_reason("cuda") is None else "cpu"


def op_args(kind, argset, from_models, gen, dev, need):
    base, deltas, coeffs, bs, od = make_args(argset, gen, dev, requires_grad=(kind == "forward"))
    if kind == "forward":
        return (base, deltas, coeffs, bs, from_models, od)
    if kind == "out":
        return (base, deltas, coeffs, bs, from_models, torch.empty(base.shape, dtype=od, device=dev))
    grad = randn(base.shape, od, gen, dev)
    return (grad, base, deltas, coeffs, bs, from_models, *need)


OPCHECK_PARAMS = []
for _name, (_owner, _kind) in OPS.items():
    for _a in ARGSETS:
        for _fm in (False, True):
            needs = [(True, True, True)] if _kind != "backward" else [(True, True, True), (False, True, False),
                                                                      (True, False, True)]
            for _need in needs:
                for _util in OPCHECK_UTILS:
                    _nid = "" if _kind != "backward" else "-need" + "".join("bdc"[i] if v else "_" for i, v in enumerate(_need))
                    OPCHECK_PARAMS.append(pytest.param(
                        _name, _owner, _kind, _a, _fm, _need, _util,
                        id=f"{_name}-{argset_id(_a)}-{'from_models' if _fm else 'deltas'}{_nid}-{_util}"))


@pytest.mark.parametrize("name,owner,kind,argset,from_models,need,util", OPCHECK_PARAMS)
def test_opcheck(name, owner, kind, argset, from_models, need, util, rng):
    backend = native_backend() if owner == "cpu" else owner
    dev = require_backend(backend)
    if util == "test_aot_dispatch_dynamic" and interpreted(backend):
        pytest.skip(INTERPRETER_AOT_REASON)
    op = getattr(torch.ops.pyops, name).default
    args = op_args(kind, argset, from_models, rng, dev, need)
    torch.library.opcheck(op, args, test_utils=util)


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the public functions
# ------------------------------------------------------------------------------------------------

def _compile_case(backend, compiler):
    return pytest.param(backend, compiler, id=f"{backend}-{compiler}")


COMPILE_CASES = [
    # (pyops backend, torch.compile backend)
    _compile_case("cpu", "inductor"),
    _compile_case("reference", "aot_eager"),
    _compile_case("triton", "eager"),
    _compile_case("triton", "inductor"),
    _compile_case("cuda", "inductor"),
]


def merged_loss(base, deltas, coeffs, wy, wz, *, backend):
    """Both public functions, stacked and list deltas, blocks and whole-tensor coefficients.

    The loss is linear in the outputs (fixed fp32 weights), so the gradient reaching the ops is
    the same bits eagerly and compiled, whatever the compiler fuses around them."""
    y = pyops.task_arithmetic(base, deltas, coeffs, blocks=7, backend=backend)
    z = pyops.task_arithmetic_from_models(base, list(deltas.unbind(0)), coeffs.sum(dim=1), backend=backend)
    return y, z, (y.float() * wy).sum() + (z.float() * wz).sum()


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=fmt_dtype)
@pytest.mark.parametrize("backend,compiler", COMPILE_CASES)
def test_compile_fullgraph_matches_eager(backend, compiler, dtype, rng, fresh_dynamo):
    dev = require_backend(backend)
    if compiler != "eager" and interpreted(backend):
        pytest.skip(INTERPRETER_AOT_REASON)
    if dtype != FP32 and compiler == "inductor" and dev.type == "cpu" and backend != "cpu":
        pytest.skip("one dtype is enough for this compiler/backend pair on CPU")
    base = randn((3, 17), dtype, rng, dev)
    deltas = randn((2, 3, 17), dtype, rng, dev)
    coeffs0 = randn((2, 8), FP32, rng, dev)
    wy, wz = randn((3, 17), dtype, rng, dev).float(), randn((3, 17), dtype, rng, dev).float()

    c_eager = coeffs0.clone().requires_grad_()
    y_e, z_e, loss_e = merged_loss(base, deltas, c_eager, wy, wz, backend=backend)
    loss_e.backward()

    compiled = torch.compile(merged_loss, fullgraph=True, backend=compiler)
    c_comp = coeffs0.clone().requires_grad_()
    y_c, z_c, loss_c = compiled(base, deltas, c_comp, wy, wz, backend=backend)
    loss_c.backward()

    assert_close_dtype(y_c, y_e, "task_arithmetic")
    assert_close_dtype(z_c, z_e, "task_arithmetic_from_models")
    assert_close(c_comp.grad, c_eager.grad, REDUCTION_TOL, "grad of coeffs")


@pytest.mark.parametrize("backend,compiler", [_compile_case("cpu", "aot_eager"), _compile_case("triton", "eager"),
                                              _compile_case("triton", "aot_eager"), _compile_case("cuda", "aot_eager")])
def test_compile_out_matches_eager(backend, compiler, rng, fresh_dynamo):
    """out= (the mutating ops) under fullgraph compile, including the in-place out=base."""
    dev = require_backend(backend)
    if compiler != "eager" and interpreted(backend):
        pytest.skip(INTERPRETER_AOT_REASON)

    def f(base, deltas, coeffs, out):
        pyops.task_arithmetic(base, deltas, coeffs, blocks="rows", out=out, backend=backend)
        pyops.task_arithmetic_from_models(base, deltas, coeffs, blocks="rows", out=base, backend=backend)
        return out, base

    base = randn((5, 9), FP32, rng, dev)
    deltas = randn((3, 5, 9), FP32, rng, dev)
    coeffs = randn((3, 5), FP32, rng, dev)
    out_e, base_e = f(base.clone(), deltas, coeffs, torch.empty_like(base))
    out_c, base_c = torch.compile(f, fullgraph=True, backend=compiler)(base.clone(), deltas, coeffs,
                                                                         torch.empty_like(base))
    assert_close_dtype(out_c, out_e, "out")
    assert_close_dtype(base_c, base_e, "out=base")


def test_compile_auto_backend_fullgraph(rng, fresh_dynamo):
    """backend='auto' (reading PYOPS_BACKEND, checking can_run) must trace without a graph break."""
    dev = device_for("cpu")
    base, deltas, coeffs = randn((4, 5), FP32, rng, dev), randn((2, 4, 5), FP32, rng, dev), randn((2,), FP32, rng, dev)
    f = torch.compile(lambda b, d, c: pyops.task_arithmetic(b, d, c), fullgraph=True, backend="eager")
    assert_close_dtype(f(base, deltas, coeffs), pyops.task_arithmetic(base, deltas, coeffs))
