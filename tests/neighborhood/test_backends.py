"""Every backend against the reference: forward, lse and every gradient (q, k, v, rpb) in fp32, fp16
and bf16, with the project's tolerance table. A backend that cannot run here skips with the
library's own reason."""
from __future__ import annotations

import zlib

import pytest
import torch

from .cases import FNS, NACase, fmt_dtype, interpreted, require_backend
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
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
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
    import pyops
    case = NACase((9,), (3,))
    q, k, v, _ = case.make(torch.float32)
    pyops.na1d(q, k, v, 3)
    choice = pyops.last_choice("na1d")
    assert choice.backend in ("cpu", "reference")
    if choice.backend == "reference":
        assert "cpu" in choice.passed_over


def test_fp64_runs_on_the_reference():
    import pyops
    case = NACase((9,), (3,))
    q, k, v, _ = case.make(torch.float64)
    out = pyops.na1d(q, k, v, 3)
    assert out.dtype == torch.float64
    assert pyops.last_choice("na1d").backend == "reference"
