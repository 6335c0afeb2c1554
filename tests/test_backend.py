"""Backend selection rules (docs/design.md#backend-choice): auto order, PYOPS_BACKEND, reasons, graceful degradation."""
from __future__ import annotations

import logging

import pytest
import torch

import pyops
from pyops import _backend, _native
from _support import backend_reason

OP = "task_arithmetic"


def call(dtype=torch.float32, **kw):
    base = torch.randn(3, 5, dtype=dtype)
    return pyops.task_arithmetic(base, torch.randn(2, 3, 5, dtype=dtype), torch.randn(2), **kw)


def choice():
    c = pyops.last_choice(OP)
    assert c is not None and c.op == OP
    return c


@pytest.fixture
def native_cpu():
    if _native.cpu_module is None:
        pytest.skip(f"backend 'cpu' cannot run: {_native.cpu_missing_reason}")


@pytest.fixture
def no_native_cpu(monkeypatch):
    reason = "pyops._C is not available (ImportError: simulated by the test)"
    monkeypatch.setattr(_native, "cpu_module", None)
    monkeypatch.setattr(_native, "cpu_missing_reason", reason)
    return reason


def test_auto_on_cpu_picks_cpu_when_native_loads(native_cpu):
    call()
    assert choice().backend == "cpu"
    assert choice().passed_over == {}


def test_auto_is_the_default(native_cpu):
    call(backend="auto")
    assert choice().backend == "cpu"


@pytest.mark.parametrize("backend", _backend.BACKENDS)
def test_explicit_backend_is_recorded(backend):
    reason = backend_reason(backend, "cpu")
    if reason is not None:
        pytest.skip(f"backend '{backend}' cannot run on cpu: {reason}")
    call(backend=backend)
    assert choice().backend == backend
    assert choice().passed_over == {}


def test_env_reference_makes_auto_pick_reference(monkeypatch):
    monkeypatch.setenv("PYOPS_BACKEND", "reference")
    call()
    assert choice().backend == "reference"
    assert choice().passed_over == {}


def test_env_empty_means_auto(monkeypatch, native_cpu):
    monkeypatch.setenv("PYOPS_BACKEND", "")
    call()
    assert choice().backend == "cpu"


def test_env_does_not_override_explicit_backend(monkeypatch, native_cpu):
    monkeypatch.setenv("PYOPS_BACKEND", "reference")
    call(backend="cpu")
    assert choice().backend == "cpu"


def test_env_backend_that_cannot_run_falls_through(monkeypatch, native_cpu):
    """PYOPS_BACKEND=cuda on CPU tensors: passed over with its reason, auto's order continues."""
    reason = backend_reason("cuda", "cpu")
    assert reason is not None  # CUDA tensors are never made here, so the CUDA kernels cannot take them
    monkeypatch.setenv("PYOPS_BACKEND", "cuda")
    call()
    assert choice().backend == "cpu"
    assert choice().passed_over == {"cuda": reason}


def test_env_backend_that_cannot_run_falls_through_to_reference(monkeypatch, no_native_cpu):
    monkeypatch.setenv("PYOPS_BACKEND", "cuda")
    call()
    assert choice().backend == "reference"
    assert list(choice().passed_over) == ["cuda", "cpu"]
    assert choice().passed_over["cpu"] == no_native_cpu


def test_env_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("PYOPS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="'gpu'"):
        call()


def test_env_unknown_backend_error_names_the_variable(monkeypatch):
    monkeypatch.setenv("PYOPS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="PYOPS_BACKEND"):
        call()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_float64_runs_on_reference(backend):
    out = call(dtype=torch.float64, backend=backend)
    assert out.dtype == torch.float64
    assert choice().backend == "reference"


def test_float64_auto_records_dtype_reason(native_cpu):
    call(dtype=torch.float64)
    assert choice().backend == "reference"
    assert "float64" in choice().passed_over["cpu"]


def test_float64_out_dtype_auto_falls_back(native_cpu):
    out = call(out_dtype=torch.float64)
    assert out.dtype == torch.float64
    assert choice().backend == "reference"
    assert "float64" in choice().passed_over["cpu"]


def test_missing_native_module_auto_uses_reference(no_native_cpu):
    out = call()
    assert out.shape == (3, 5)
    assert choice().backend == "reference"
    assert choice().passed_over == {"cpu": no_native_cpu}


def test_missing_native_module_explicit_cpu_raises(no_native_cpu):
    with pytest.raises(pyops.BackendUnavailableError, match="simulated by the test") as info:
        call(backend="cpu")
    assert "'cpu'" in str(info.value)


def test_missing_native_module_from_models(no_native_cpu):
    base = torch.randn(4)
    pyops.task_arithmetic_from_models(base, [torch.randn(4)], [0.5])
    assert choice().backend == "reference"


def test_backend_unavailable_error_is_a_runtime_error():
    assert issubclass(pyops.BackendUnavailableError, RuntimeError)


def test_choice_explain_lists_reasons(no_native_cpu):
    call()
    text = choice().explain()
    assert "ran 'reference'" in text and "cpu: " + no_native_cpu in text


def test_choice_is_logged_at_debug(caplog, native_cpu):
    with caplog.at_level(logging.DEBUG, logger="pyops"):
        call(dtype=torch.float64)
    assert any("ran 'reference'" in r.getMessage() and "float64" in r.getMessage() for r in caplog.records)


def test_triton_unavailable_without_interpreter_on_cpu(monkeypatch):
    """Triton kernels on CPU tensors need TRITON_INTERPRET=1; otherwise the reason says so."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backend_reason("triton", "cpu")
    assert reason is not None
    with pytest.raises(pyops.BackendUnavailableError, match="triton"):
        call(backend="triton")


def test_auto_on_cpu_never_picks_gpu_backends(monkeypatch, native_cpu):
    """Auto's CPU order is cpu then reference: Triton, even interpreted, is never chosen on CPU."""
    call()
    assert choice().backend == "cpu"
    assert "triton" not in choice().passed_over and "cuda" not in choice().passed_over


def test_select_unimplemented_backend_for_an_op():
    with pytest.raises(pyops.BackendUnavailableError, match="not implemented for this op"):
        _backend.select("some_op", "triton", {"reference": lambda: None}, ("cpu", "reference"))


def test_select_auto_notes_unimplemented_backends():
    name = _backend.select("some_op", "auto", {"reference": lambda: None}, ("cpu", "reference"))
    assert name == "reference"
    assert pyops.last_choice("some_op").passed_over == {"cpu": "not implemented for this op"}


def test_default_order_cuda():
    assert _backend.default_order(torch.device("cuda"), ("cuda", "triton")) == ("cuda", "triton", "reference")
    assert _backend.default_order(torch.device("cpu"), ("cuda", "triton")) == ("cpu", "reference")
