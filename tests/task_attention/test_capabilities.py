"""What each kernel backend declares it can run (`backend_cpu.CPU`, `backend_triton.TRITON` and the
Triton head-dim bound) and the refusals those declarations word: the exact reason an explicit
request fails with, the same reason `pyops.last_choice` records when ``auto`` passes the backend
over, and the boundary values that still run."""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_close
from .cases import FP32, FP64, backend_reason, device_for, randn, require_backend
from pyops import _native
from pyops.task_attention import backend_cpu, backend_triton
from pyops.testing import tolerance_for

OP = "task_masked_attention"
KERNELS = {"cpu": "the C++ kernels", "triton": "the Triton kernels"}


def refusal(backend: str, reason: str) -> str:
    return f"{OP}: backend '{backend}' cannot run this call: {reason}"


def test_cpu_declaration_matches_the_native_module():
    """The declared group limit is the one the C++ kernels enforce, and every declared entry point exists."""
    C = _native.cpu_module
    if C is None:
        pytest.skip(_native.cpu_missing_reason)
    assert backend_cpu.CPU.limits == {"groups": 64}
    assert C.task_attention_max_groups() == backend_cpu.CPU.limits["groups"]
    assert all(hasattr(C, fn) for fn in backend_cpu.CPU.functions)


def test_cpu_refuses_tensors_on_another_device():
    assert backend_cpu.CPU.reason(torch.device("cuda")) == "tensors are on cuda, the C++ kernels take CPU tensors"


def _groups_problem(G: int, rule: str, rng):
    """L = 70 tokens with every id in [0, G) present; rule "allow": a random [G, G] rule with its
    diagonal set, "identity": allow=None (then G is the largest id + 1)."""
    L = 70
    g = torch.cat([torch.arange(G), torch.randint(0, G, (L - G,), generator=rng)])
    allow = None
    if rule == "allow":
        allow = (torch.rand(G, G, generator=rng) < 0.3) | torch.eye(G, dtype=torch.bool)
    q, k, v = (randn((1, 2, L, 8), FP32, rng) for _ in range(3))
    return q, k, v, g, allow


@pytest.mark.parametrize("rule", ["allow", "identity"])
def test_cpu_refuses_more_groups_than_declared(rule, rng):
    require_backend("cpu")
    q, k, v, g, allow = _groups_problem(65, rule, rng)
    reason = "the C++ kernels take up to 64 groups, got 65"
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.task_masked_attention(q, k, v, g, allow=allow, backend="cpu")
    assert str(info.value) == refusal("cpu", reason)
    got = pyops.task_masked_attention(q, k, v, g, allow=allow)  # auto: passed over, with that reason
    choice = pyops.last_choice(OP)
    assert choice.backend == "reference" and choice.passed_over == {"cpu": reason}
    assert_close(got, pyops.task_masked_attention(q, k, v, g, allow=allow, backend="reference"), tolerance_for(FP32))


@pytest.mark.parametrize("rule", ["allow", "identity"])
def test_cpu_runs_the_declared_limit(rule, rng):
    require_backend("cpu")
    q, k, v, g, allow = _groups_problem(64, rule, rng)
    got = pyops.task_masked_attention(q, k, v, g, allow=allow)
    assert pyops.last_choice(OP).backend == "cpu"
    assert_close(got, pyops.task_masked_attention(q, k, v, g, allow=allow, backend="reference"), tolerance_for(FP32))


@pytest.mark.parametrize("dtype", [FP64, torch.complex64], ids=["fp64", "complex64"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dtype_outside_the_declaration_is_refused_with_its_reason(backend, dtype):
    require_backend(backend)
    reason = f"dtype {dtype} is not supported by {KERNELS[backend]} (float32, float16, bfloat16)"
    declared = backend_cpu.CPU if backend == "cpu" else backend_triton.TRITON
    assert dtype not in declared.dtypes
    x = torch.zeros(1, dtype=dtype, device=device_for(backend))
    assert declared.reason(x.device, x) == reason
    if dtype == FP64:  # the public call (complex inputs are refused by validation first)
        assert backend_reason(backend, FP64) == reason
        q = torch.zeros(1, 1, 3, 4, dtype=dtype, device=x.device)
        with pytest.raises(pyops.BackendUnavailableError) as info:
            pyops.task_masked_attention(q, q, q, torch.zeros(3, dtype=torch.int64, device=x.device), backend=backend)
        assert str(info.value) == refusal(backend, reason)


def test_triton_head_dim_bound():
    """A family-specific check after the declaration: whole heads in one tile, up to MAX_HEAD_DIM."""
    require_backend("triton")
    assert backend_triton.MAX_HEAD_DIM == 256
    assert backend_reason("triton", head_dim=256) is None
    assert backend_reason("triton", head_dim=264) == "head dims up to 256 (got D=264, Dv=264)"
