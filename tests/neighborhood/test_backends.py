"""Every backend against the reference: forward, lse and every gradient (q, k, v, rpb) in fp32, fp16
and bf16, with the project's tolerance table. A backend that cannot run here skips with the
library's own reason.

Backend choice: what each backend declares it takes (`backend_cpu.CPU`, `backend_triton.TRITON`,
plus the Triton tiles' head-dim bound) decides, with the exact reason, which backend runs a call;
`auto` falls back to the reference and records why (`pyops.last_choice`, the ``pyops`` DEBUG log).
"""
from __future__ import annotations

import logging

import pytest
import torch

import pyops
from .cases import FNS, NACase, fmt_dtype, interpreted, require_backend
from pyops import _native
from pyops.neighborhood import backend_cpu, backend_triton
from pyops.neighborhood import reference as ref
from pyops.testing import compare, tolerance_for

T, F = True, False
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [
    NACase((9,), (4,), dilation=(2,), B=2),                       # even kernel, 9 not divisible by 2
    NACase((11,), (5,), stride=(2,), rpb=True, Dv=5),
    NACase((10,), (3,), stride=(2,), causal=(T,), D=16),
    NACase((5, 9), (3, 4), dilation=(1, 2)),
    NACase((7, 5), (3, 5), dilation=(2, 1), rpb=True),               # kernel equal to extent in dim 1
    NACase((6, 7), (3, 3), stride=(1, 2), causal=(T, F), H=1, D=12),  # mixed causal
    NACase((3, 4, 7), (2, 3, 3), stride=(1, 2, 1), dilation=(1, 1, 2), causal=(F, T, F), H=1),
    NACase((3, 5, 4), (3, 3, 3), rpb=True, H=1, D=4),
]
BACKENDS = ["cpu", "triton"]


def _check(name, actual, expected, tol):
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    cmp = compare(actual, expected, tol)
    assert cmp.ok, f"{name}: {cmp} (atol={tol.atol}, rtol={tol.rtol})"


def _run(fn, case, backend, q, k, v, rpb, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    r = rpb.detach().clone().requires_grad_(True) if rpb is not None else None
    out, lse = fn(*leaves, case.kernel, **case.kwargs(), rpb=r, return_lse=True, backend=backend)
    out.backward(dout)
    grads = {"dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    if r is not None:
        grads["drpb"] = r.grad
    return out.detach(), lse.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, case, dtype):
    dev = require_backend(backend, case.n, dtype)
    if interpreted(backend) and dtype != torch.float32 and case.n == 3:
        pytest.skip("Triton interpreter time budget: 3D fp16/bf16 runs on a GPU (3D fp32 and 1D/2D fp16/bf16 run here)")
    gen = torch.Generator().manual_seed(case.seed)
    q, k, v, rpb = case.make(dtype, dev, gen)
    dout = torch.randn(v.shape, generator=gen).to(dtype=dtype, device=dev)
    fn = FNS[case.n]
    out, lse, grads = _run(fn, case, backend, q, k, v, rpb, dout)
    e_out, e_lse, e_grads = _run(fn, case, "reference", q.cpu(), k.cpu(), v.cpu(),
                                 None if rpb is None else rpb.cpu(), dout.cpu())
    tol = tolerance_for(dtype)
    _check("out", out.cpu(), e_out, tol)
    _check("lse", lse.cpu(), e_lse, tol)
    for name in e_grads:
        _check(name, grads[name].cpu(), e_grads[name], tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    case = NACase((5, 6), (3, 3), B=0)
    dev = require_backend(backend, 2)
    q, k, v, _ = case.make(torch.float32, dev, requires_grad=True)
    out = FNS[2](q, k, v, 3, backend=backend)
    assert out.shape == (0, 5, 6, 2, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_argument(backend):
    case = NACase((9,), (3,))
    dev = require_backend(backend, 1)
    q, k, v, _ = case.make(torch.float32, dev)
    got = FNS[1](q, k, v, 3, scale=0.3, backend=backend).cpu()
    exp = ref.na1d(q.cpu(), k.cpu(), v.cpu(), 3, scale=0.3)
    _check("out", got, exp, tolerance_for(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    case = NACase((6, 7), (3, 3), H=2, D=8)
    dev = require_backend(backend, 2)
    q, k, v, _ = case.make(torch.float32, dev)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)   # same values, other strides
    got = FNS[2](qt, k, v, 3, backend=backend).cpu()
    _check("out", got, ref.na2d(q.cpu(), k.cpu(), v.cpu(), 3), tolerance_for(torch.float32))


def test_auto_on_cpu_runs_cpu_or_says_why():
    case = NACase((9,), (3,))
    q, k, v, _ = case.make(torch.float32)
    pyops.na1d(q, k, v, 3)
    choice = pyops.last_choice("na1d")
    assert choice.backend in ("cpu", "reference")
    if choice.backend == "reference":
        assert "cpu" in choice.passed_over


def test_fp64_runs_on_the_reference():
    case = NACase((9,), (3,))
    q, k, v, _ = case.make(torch.float64)
    out = pyops.na1d(q, k, v, 3)
    assert out.dtype == torch.float64
    assert pyops.last_choice("na1d").backend == "reference"


# ------------------------------------------------------------------------------------------------
# What each backend declares
# ------------------------------------------------------------------------------------------------

CPU_FP64 = "dtype torch.float64 is not supported by the C++ kernels (float32, float16, bfloat16)"
TRITON_FP64 = "dtype torch.float64 is not supported by the Triton kernels (float32, float16, bfloat16)"


def test_cpu_declaration_is_the_native_entry_points_it_calls():
    """`CPU` names the two bindings the ops call; CPU tensors only; no size limit (the kernels take
    every problem `ops.prepare` accepts)."""
    assert backend_cpu.CPU.functions == ("na_forward", "na_backward")
    assert backend_cpu.CPU.devices == ("cpu",)
    assert backend_cpu.CPU.dtypes == (torch.float32, torch.float16, torch.bfloat16)
    assert dict(backend_cpu.CPU.limits) == {}
    assert backend_triton.TRITON.kernels == "neighborhood"


def test_cpu_refuses_a_dtype_outside_its_declaration():
    require_backend("cpu", 1)
    q, k, v, _ = NACase((9,), (3,)).make(torch.float64)
    assert backend_cpu.reason(q) == CPU_FP64
    with pytest.raises(pyops.BackendUnavailableError) as err:
        pyops.na1d(q, k, v, 3, backend="cpu")
    assert str(err.value) == f"na1d: backend 'cpu' cannot run this call: {CPU_FP64}"


def test_cpu_refuses_a_device_outside_its_declaration():
    q, k, v = (torch.empty(1, 9, 2, 8, device="meta") for _ in range(3))
    with pytest.raises(pyops.BackendUnavailableError) as err:
        pyops.na1d(q, k, v, 3, backend="cpu")
    assert str(err.value) == ("na1d: backend 'cpu' cannot run this call: "
                              "tensors are on meta, the C++ kernels take CPU tensors")


def test_a_build_without_the_kernels_runs_the_reference_and_says_why(monkeypatch, caplog):
    """A `pyops._C` lacking a declared entry point degrades to the reference, with the reason in
    `last_choice` and in the ``pyops`` DEBUG log, instead of failing with an AttributeError."""
    monkeypatch.setattr(_native, "cpu_module", type("PartialBuild", (), {"na_forward": None})())
    case = NACase((9,), (3,))
    q, k, v, _ = case.make(torch.float32)
    with caplog.at_level(logging.DEBUG, logger="pyops"):
        out = pyops.na1d(q, k, v, 3)
    reason = "pyops._C has no na_backward (built without these kernels)"
    assert pyops.last_choice("na1d").passed_over == {"cpu": reason}
    assert f"na1d: ran 'reference' (passed over: cpu: {reason})" in [r.getMessage() for r in caplog.records]
    assert torch.equal(out, ref.na1d(q, k, v, 3))


def test_auto_records_the_declared_dtype_reason():
    require_backend("cpu", 1)
    q, k, v, _ = NACase((9,), (3,)).make(torch.float64)
    pyops.na1d(q, k, v, 3)
    assert pyops.last_choice("na1d").passed_over == {"cpu": CPU_FP64}


def test_triton_refuses_a_dtype_outside_its_declaration():
    dev = require_backend("triton", 1)
    q, k, v, _ = NACase((9,), (3,)).make(torch.float64, dev)
    assert backend_triton.reason(q, v) == TRITON_FP64
    with pytest.raises(pyops.BackendUnavailableError) as err:
        pyops.na1d(q, k, v, 3, backend="triton")
    assert str(err.value) == f"na1d: backend 'triton' cannot run this call: {TRITON_FP64}"


HEAD_DIMS = [(256, 256), (264, 8), (8, 300)]


@pytest.mark.parametrize("D,Dv", HEAD_DIMS, ids=[f"D{d}-Dv{dv}" for d, dv in HEAD_DIMS])
def test_triton_head_dims_fit_one_tile(D, Dv):
    """The head-dim bound of the Triton tiles is checked beside the backend, after its declaration."""
    dev = require_backend("triton", 1)
    q, v = torch.empty(1, 9, 2, D, device=dev), torch.empty(1, 9, 2, Dv, device=dev)
    got = backend_triton.reason(q, v)
    if max(D, Dv) <= backend_triton.MAX_HEAD_DIM:
        assert got is None
    else:
        assert got == f"head dimension {max(D, Dv)} > 256 is not supported by the Triton kernels"
