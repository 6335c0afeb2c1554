"""What each kernel backend of the merging family declares it can run (`TASK_ARITHMETIC` and `MERGE` in
backend_cpu.py, backend_triton.py, backend_cuda.py) and the refusals those declarations word: the
exact reason an explicit request fails with, the same reason `pyops.last_choice` records when
``auto`` passes the backend over, the declared block-size limits and the boundary that still runs,
and the checks that stay beside a backend (a method it lacks, gradients it does not compute)."""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

import pyops
from _support import assert_bitwise_equal, require_backend
from .cases import FP32, FP64, RANKED, check_close, merge_inputs, merge_reason
from pyops import _native
from pyops.merging import backend_cpu, backend_cuda, backend_triton
from pyops.merging import task_arithmetic as TM
from pyops.merging.registry import RANKED_BLOCK, TIES_BLOCK

KERNELS = {"cpu": "the C++ kernels", "triton": "the Triton kernels", "cuda": "the CUDA kernels"}
DECLARED = {"cpu": backend_cpu, "triton": backend_triton, "cuda": backend_cuda}
CPU = torch.device("cpu")


def refusal(op: str, backend: str, reason: str) -> str:
    return f"{op}: backend '{backend}' cannot run this call: {reason}"


def _require_merge(backend: str) -> torch.device:
    dev = require_backend(backend)  # the task arithmetic kernels
    reason = merge_reason(backend, dev)
    if reason is not None:
        pytest.skip(f"backend '{backend}' cannot run merge on {dev.type}: {reason}")
    return dev


# ------------------------------------------------------------------------------------------------
# The declarations
# ------------------------------------------------------------------------------------------------

def test_declared_limits():
    """The C++ radix sort counts ranks in 32 bits; the GPU paths' ranks are int32; the CUDA TIES
    selection counts a block's elements in 32 bits."""
    assert backend_cpu.MERGE.limits == {RANKED_BLOCK: 2**32 - 1}
    assert backend_triton.MERGE.limits == {RANKED_BLOCK: 2**31 - 1}
    assert backend_cuda.MERGE.limits == {TIES_BLOCK: 2**32 - 1, RANKED_BLOCK: 2**31 - 1}
    for mod in DECLARED.values():
        assert mod.TASK_ARITHMETIC.limits == {}
        assert mod.TASK_ARITHMETIC.dtypes == mod.MERGE.dtypes == _native.NATIVE_DTYPES


@pytest.mark.parametrize("backend,module", [("cpu", "cpu_module"), ("cuda", "cuda_module")])
def test_declared_entry_points_exist(backend, module):
    mod = getattr(_native, module)
    if mod is None:
        pytest.skip(getattr(_native, module.replace("module", "missing_reason")))
    for cap in (DECLARED[backend].TASK_ARITHMETIC, DECLARED[backend].MERGE):
        assert cap.functions and all(hasattr(mod, fn) for fn in cap.functions), cap


def test_triton_declares_its_kernel_modules():
    assert backend_triton.TASK_ARITHMETIC.kernels == "merging.task_arithmetic"
    assert backend_triton.MERGE.kernels == "merging.methods"


@pytest.mark.parametrize("backend,device,reason", [
    ("cpu", "cuda", "tensors are on cuda, the C++ kernels take CPU tensors"),
    ("cuda", "cpu", "tensors are on cpu, the CUDA kernels take CUDA tensors"),
], ids=["cpu-on-cuda", "cuda-on-cpu"])
def test_native_kernels_refuse_tensors_on_another_device(backend, device, reason):
    for cap in (DECLARED[backend].TASK_ARITHMETIC, DECLARED[backend].MERGE):
        assert cap.reason(torch.device(device)) == reason


def test_cuda_refusal_of_cpu_tensors_is_the_public_reason(rng):
    base, deltas = merge_inputs((4, 5), 2, FP32, rng)
    reason = "tensors are on cpu, the CUDA kernels take CUDA tensors"
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.merge(base, deltas, method="ties", density=0.5, backend="cuda")
    assert str(info.value) == refusal("merge", "cuda", reason)
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.task_arithmetic(base, deltas, [1.0, 1.0], backend="cuda")
    assert str(info.value) == refusal("task_arithmetic", "cuda", reason)


# ------------------------------------------------------------------------------------------------
# dtypes outside the declarations
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["inputs", "out_dtype"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dtype_outside_the_declaration_is_refused_with_its_reason(backend, where, rng):
    dev = _require_merge(backend)
    reason = f"dtype {FP64} is not supported by {KERNELS[backend]} (float32, float16, bfloat16)"
    for cap in (DECLARED[backend].TASK_ARITHMETIC, DECLARED[backend].MERGE):
        assert FP64 not in cap.dtypes
        assert cap.reason(dev, torch.zeros(1, dtype=FP64, device=dev)) == reason
    base, deltas = merge_inputs((4, 5), 2, FP64 if where == "inputs" else FP32, rng, device=dev)
    kw = dict(out_dtype=FP64) if where == "out_dtype" else {}
    calls = {"task_arithmetic": lambda b: pyops.task_arithmetic(base, deltas, [0.5, 0.7], backend=b, **kw),
             "merge": lambda b: pyops.merge(base, deltas, method="ties", density=0.5, backend=b, **kw)}
    for op, call in calls.items():
        with pytest.raises(pyops.BackendUnavailableError) as info:
            call(backend)
        assert str(info.value) == refusal(op, backend, reason)
        if backend == "cpu":  # auto passes the C++ kernels over with the same reason
            want = call("reference")
            assert_bitwise_equal(call("auto"), want, f"{op} auto")
            choice = pyops.last_choice(op)
            assert choice.backend == "reference" and choice.passed_over == {"cpu": reason}


# ------------------------------------------------------------------------------------------------
# A build without a declared entry point
# ------------------------------------------------------------------------------------------------

def test_missing_entry_point_refuses_only_the_ops_that_call_it(monkeypatch, rng):
    """pyops._C without merge_backward: the merge ops degrade to the reference with the declared
    reason; task arithmetic, which does not call it, still runs on the C++ kernels."""
    real = _native.cpu_module
    if real is None:
        pytest.skip(_native.cpu_missing_reason)
    stub = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real)
                                    if not k.startswith("_") and k != "merge_backward"})
    monkeypatch.setattr(_native, "cpu_module", stub)
    reason = "pyops._C has no merge_backward (built without these kernels)"
    base, deltas = merge_inputs((4, 5), 2, FP32, rng)
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.merge(base, deltas, method="ties", density=0.5, backend="cpu")
    assert str(info.value) == refusal("merge", "cpu", reason)
    got = pyops.merge(base, deltas, method="ties", density=0.5)
    choice = pyops.last_choice("merge")
    assert choice.backend == "reference" and choice.passed_over == {"cpu": reason}
    assert_bitwise_equal(got, pyops.merge(base, deltas, method="ties", density=0.5, backend="reference"))
    pyops.task_arithmetic(base, deltas, [0.5, 0.7])
    assert pyops.last_choice("task_arithmetic").backend == "cpu"


# ------------------------------------------------------------------------------------------------
# Declared limits: refused above, run at the limit, checked only for the methods they concern
# ------------------------------------------------------------------------------------------------

def test_cpu_reason_above_the_declared_limit():
    if _native.cpu_module is None:
        pytest.skip(_native.cpu_missing_reason)
    assert backend_cpu.MERGE.reason(CPU, **{RANKED_BLOCK: 2**32 - 1}) is None
    assert (backend_cpu.MERGE.reason(CPU, **{RANKED_BLOCK: 2**32})
            == "the C++ kernels take up to 4294967295 elements per ranked block, got 4294967296")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("method", RANKED)
def test_ranked_block_limit(backend, method, monkeypatch, rng):
    """With the declared limit lowered to 100 elements: blocks of 101 are refused with the
    declaration's words (and auto passes the backend over with them), blocks of 100 run, and
    ties, which ranks nothing, runs on blocks of 101."""
    dev = _require_merge(backend)
    mod = DECLARED[backend]
    monkeypatch.setattr(mod, "MERGE", dataclasses.replace(mod.MERGE, limits={RANKED_BLOCK: 100}))
    base, deltas = merge_inputs((3, 101), 2, FP32, rng, device=dev)
    kw = dict(density=0.5, gamma=0.1, seed=1, name="w")
    reason = f"{KERNELS[backend]} take up to 100 elements per ranked block, got 101"
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.merge(base, deltas, method=method, blocks="rows", backend=backend, **kw)
    assert str(info.value) == refusal("merge", backend, reason)
    if backend == "cpu":
        pyops.merge(base, deltas, method=method, blocks="rows", **kw)
        choice = pyops.last_choice("merge")
        assert choice.backend == "reference" and choice.passed_over == {"cpu": reason}
    want = pyops.merge(base.cpu(), [d.cpu() for d in deltas], method=method, blocks=100, backend="reference", **kw)
    check_close(pyops.merge(base, deltas, method=method, blocks=100, backend=backend, **kw), want,
                f"{method} on blocks of 100")
    pyops.merge(base, deltas, method="ties", blocks="rows", density=0.5, backend=backend)
    assert pyops.last_choice("merge").backend == backend


def test_cuda_limits_apply_to_their_methods(monkeypatch):
    """With both CUDA limits lowered to 3 elements, on one block of 4: TIES_BLOCK refuses ties
    alone, RANKED_BLOCK the ranking methods alone."""
    dev = _require_merge("cuda")
    monkeypatch.setattr(backend_cuda, "MERGE",
                        dataclasses.replace(backend_cuda.MERGE, limits={TIES_BLOCK: 3, RANKED_BLOCK: 3}))
    base = torch.zeros(4, device=dev)
    p = TM.prepare(base, [base, base], [1.0, 1.0], None, None)
    assert backend_cuda.merge_reason(p, "ties", False) == "the CUDA kernels take up to 3 elements per TIES block, got 4"
    for method in RANKED:
        assert backend_cuda.merge_reason(p, method, False) == \
            "the CUDA kernels take up to 3 elements per ranked block, got 4"
    for method in ("dare", "dare_ties", "consensus"):
        assert backend_cuda.merge_reason(p, method, False) is None


# ------------------------------------------------------------------------------------------------
# The checks that stay beside a backend
# ------------------------------------------------------------------------------------------------

def test_triton_refuses_a_method_it_lacks_and_gradients(rng):
    dev = _require_merge("triton")
    base, deltas = merge_inputs((4, 5), 2, FP32, rng, device=dev)
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.merge(base, deltas, method="consensus", backend="triton")
    assert str(info.value) == refusal(
        "merge", "triton",
        "the Triton kernels implement ties, dare, dare_linear, dare_ties, breadcrumbs, della, della_linear, not "
        "'consensus'")
    c = torch.ones(2, device=dev, requires_grad=True)
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.merge(base, deltas, coeffs=c, method="ties", density=0.5, backend="triton")
    assert str(info.value) == refusal(
        "merge", "triton", "the Triton merge kernels are forward only (gradients: the cpu or reference backend)")


def test_cpu_leaves_consensus_gradients_to_the_reference(rng):
    _require_merge("cpu")
    base, deltas = merge_inputs((4, 5), 2, FP32, rng)
    c = torch.ones(2, requires_grad=True)
    with pytest.raises(pyops.BackendUnavailableError) as info:
        pyops.merge(base, deltas, coeffs=c, method="consensus", backend="cpu")
    assert str(info.value) == refusal("merge", "cpu", "gradients for 'consensus' are computed by the reference backend")
