"""What each moe kernel backend declares it can run (`backend_cpu.ROUTE` / `EXPERTS`,
`backend_cuda.ROUTE`, `backend_triton.EXPERTS`) and the refusals those declarations word: the
exact reason an explicit request fails with, the same reason `pyops.last_choice` records when
``auto`` passes the backend over, and a build that lacks a declared entry point."""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_close
from .cases import FP32, FP64, backend_reason, make_logits, make_weights, require
from pyops import _native
from pyops.moe import backend_cpu, backend_cuda, backend_triton
from pyops.testing import tolerance_for

KERNELS = {"cpu": "the C++ kernels", "cuda": "the CUDA kernels", "triton": "the Triton kernels"}
NATIVE_DTYPES = "(float32, float16, bfloat16)"


def refusal(op: str, backend: str, reason: str) -> str:
    return f"{op}: backend '{backend}' cannot run this call: {reason}"


def test_declarations():
    """Routing needs one native entry point, the expert MLP all seven helpers; no size limits."""
    assert backend_cpu.ROUTE.functions == ("moe_route",)
    assert set(backend_cpu.ROUTE.functions) <= set(backend_cpu.EXPERTS.functions)
    assert backend_cuda.ROUTE.functions == ("moe_route",) and backend_cuda.ROUTE.devices == ("cuda",)
    assert backend_triton.EXPERTS.kernels == "moe"
    for cap in (backend_cpu.ROUTE, backend_cpu.EXPERTS, backend_cuda.ROUTE, backend_triton.EXPERTS):
        assert cap.limits == {} and cap.dtypes == (torch.float32, torch.float16, torch.bfloat16)


def test_cpu_declaration_matches_the_native_module():
    C = _native.cpu_module
    if C is None:
        pytest.skip(_native.cpu_missing_reason)
    assert [fn for fn in backend_cpu.EXPERTS.functions if not hasattr(C, fn)] == []


def test_devices_outside_the_declaration_are_refused():
    assert backend_cpu.EXPERTS.reason(torch.device("cuda")) == "tensors are on cuda, the C++ kernels take CPU tensors"
    assert backend_cuda.ROUTE.reason(torch.device("cpu")) == "tensors are on cpu, the CUDA kernels take CUDA tensors"
    z = torch.zeros(3, 4)
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.moe_route(z, 2, backend="cuda")
    assert str(info.value) == refusal("moe_route", "cuda", "tensors are on cpu, the CUDA kernels take CUDA tensors")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fp64_experts_are_refused_with_the_declared_reason(backend, rng):
    dev = require(backend)
    reason = f"dtype torch.float64 is not supported by {KERNELS[backend]} {NATIVE_DTYPES}"
    assert FP64 not in (backend_cpu.EXPERTS if backend == "cpu" else backend_triton.EXPERTS).dtypes
    x = torch.randn(5, 4, generator=rng, dtype=FP64).to(dev)
    r = pyops.moe_route(make_logits(5, 3, rng, dev, FP64), 2, backend="reference")
    w1, w2, w3 = make_weights(3, 4, 6, "swiglu", FP64, rng, dev)
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.moe_experts(x, r, w1, w2, w3, backend=backend)
    assert str(info.value) == refusal("moe_experts", backend, reason)


def test_routing_weights_are_part_of_the_declaration(rng):
    """fp32 tokens with fp64 routing weights: the C++ kernels refuse (the weights' dtype is checked
    too), `auto` passes them over with that reason and the reference runs the call."""
    require("cpu")
    x = torch.randn(5, 4, generator=rng)
    r = pyops.moe_route(make_logits(5, 3, rng, "cpu", FP64), 2, backend="reference")
    w1, w2, w3 = make_weights(3, 4, 6, "swiglu", FP32, rng, "cpu")
    reason = f"dtype torch.float64 is not supported by the C++ kernels {NATIVE_DTYPES}"
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.moe_experts(x, r, w1, w2, w3, backend="cpu")
    assert str(info.value) == refusal("moe_experts", "cpu", reason)
    y = pyops.moe_experts(x, r, w1, w2, w3)
    choice = pyops.last_choice("moe_experts")
    assert choice.backend == "reference" and choice.passed_over["cpu"] == reason
    assert_close(y, pyops.moe_experts(x, r, w1, w2, w3, backend="reference"), tolerance_for(FP32))


def test_fp64_logits_route_on_the_reference(rng):
    require("cpu", "moe_route")
    z = make_logits(6, 4, rng, "cpu", FP64)
    reason = f"dtype torch.float64 is not supported by the C++ kernels {NATIVE_DTYPES}"
    assert backend_reason("cpu", "moe_route") is None
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.moe_route(z, 2, backend="cpu")
    assert str(info.value) == refusal("moe_route", "cpu", reason)
    pyops.moe_route(z, 2)
    choice = pyops.last_choice("moe_route")
    assert choice.backend == "reference" and choice.passed_over["cpu"] == reason


class _Without:
    """pyops._C as a build without one entry point."""

    def __init__(self, real, missing: str):
        self.real, self.missing = real, missing

    def __getattr__(self, name):
        if name == self.missing:
            raise AttributeError(name)
        return getattr(self.real, name)


def test_a_build_without_a_declared_function_degrades_with_the_reason(rng, monkeypatch):
    """pyops._C without moe_scatter_add: the expert MLP passes the C++ kernels over with the reason
    the declaration words; routing, which does not declare it, still runs on them."""
    require("cpu")
    monkeypatch.setattr(_native, "cpu_module", _Without(_native.cpu_module, "moe_scatter_add"))
    reason = "pyops._C has no moe_scatter_add (built without these kernels)"
    x = torch.randn(5, 4, generator=rng)
    z = make_logits(5, 3, rng, "cpu")
    w1, w2, w3 = make_weights(3, 4, 6, "swiglu", FP32, rng, "cpu")
    r = pyops.moe_route(z, 2)
    assert pyops.last_choice("moe_route").backend == "cpu"
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.moe_experts(x, r, w1, w2, w3, backend="cpu")
    assert str(info.value) == refusal("moe_experts", "cpu", reason)
    pyops.moe_experts(x, r, w1, w2, w3)
    choice = pyops.last_choice("moe_experts")
    assert choice.backend == "reference" and choice.passed_over["cpu"] == reason


def test_a_missing_native_module_is_the_reason(monkeypatch):
    monkeypatch.setattr(_native, "cpu_module", None)
    monkeypatch.setattr(_native, "cpu_missing_reason", "pyops._C is not available (ImportError: test)")
    z = torch.zeros(3, 4)
    assert backend_cpu.ROUTE.reason(z.device, z) == "pyops._C is not available (ImportError: test)"
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.moe_route(z, 2, backend="cpu")
    assert str(info.value) == refusal("moe_route", "cpu", "pyops._C is not available (ImportError: test)")


def test_no_size_limit_many_experts_and_k(rng):
    """No declared limit: E = 300, k = 64 routes on the C++ kernels, as the reference does."""
    require("cpu", "moe_route")
    z = make_logits(40, 300, rng, "cpu")
    got = pyops.moe_route(z, 64)
    assert pyops.last_choice("moe_route").backend == "cpu"
    want = pyops.moe_route(z, 64, backend="reference")
    assert torch.equal(got.experts, want.experts) and torch.equal(got.order, want.order)
