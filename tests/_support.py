"""Helpers shared by the test suite (imported by conftest.py and the test modules).

Backend availability is asked of the package itself (the `can_run` checks in
`pyops.merging.task_arithmetic`), so a test skips with exactly the reason the library would give.
Numerical comparisons use the one tolerance table in `pyops.testing` (docs/design.md#numerics): tests never
carry their own looser numbers.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from typing import List, Optional, Union

import pytest
import torch

from pyops import _backend
from pyops.testing import REDUCTION_TOL, Tol, compare, tolerance_for

BACKENDS = _backend.BACKENDS
CUDA = torch.cuda.is_available()

# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------


def device_for(backend: str) -> torch.device:
    """The device a backend's tests run on: CUDA for the GPU backends when there is a GPU, else CPU
    (Triton then runs under TRITON_INTERPRET=1). The reference always runs on the CPU here; it is
    the oracle and is tested on the device of every other backend through the comparisons."""
    if backend in ("cuda",) or (backend == "triton" and CUDA):
        return torch.device("cuda") if CUDA else torch.device("cpu")
    return torch.device("cpu")


def _triton_kernels_reason() -> Optional[str]:
    try:
        importlib.import_module("pyops.kernels.merging.task_arithmetic")
    except Exception as exc:  # the Triton kernels are optional and may not be written/shipped yet
        return f"pyops.kernels.merging.task_arithmetic cannot be imported ({type(exc).__name__}: {exc})"
    return None


def backend_reason(backend: str, device: Union[str, torch.device, None] = None) -> Optional[str]:
    """None if `backend` can run task_arithmetic on `device` (fp32), else the library's reason."""
    from pyops.merging import task_arithmetic as tm

    dev = torch.device(device) if device is not None else device_for(backend)
    if dev.type == "cuda" and not CUDA:
        return "CUDA is not available"
    base = torch.zeros(2, device=dev)
    p = tm.prepare(base, [base], torch.ones(1, device=dev), None, None)
    reason = tm._can_run(p, torch.float32)[backend]()
    if reason is None and backend == "triton":
        # can_run only checks that triton imports; the kernels themselves live in pyops.kernels.
        reason = _triton_kernels_reason()
    return reason


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """The backends that can run here (on `device`, default: each backend's own device)."""
    return [b for b in BACKENDS if backend_reason(b, device) is None]


def require_backend(backend: str, device: Union[str, torch.device, None] = None) -> torch.device:
    """Skip the calling test, with the backend's own reason, if `backend` cannot run here."""
    dev = torch.device(device) if device is not None else device_for(backend)
    reason = backend_reason(backend, dev)
    if reason is not None:
        pytest.skip(f"backend '{backend}' cannot run on {dev.type}: {reason}")
    return dev


def interpreted(backend: str) -> bool:
    """True for the Triton backend under the (slow) CPU interpreter."""
    return backend == "triton" and not CUDA


# ------------------------------------------------------------------------------------------------
# Layouts and inputs
# ------------------------------------------------------------------------------------------------


def fmt_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}[dtype]


def randn(shape, dtype, gen: torch.Generator, device=None, scale: float = 1.0) -> torch.Tensor:
    """Random normal values drawn in fp32 on the CPU (same values for every dtype/device)."""
    t = torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * scale
    return t.to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Tol, what: str = "output",
                 check_dtype: bool = True) -> None:
    """`actual` within the project tolerance `tol` of `expected` (shape and dtype must agree)."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{what}: shape {list(actual.shape)} != expected {list(expected.shape)}"
    if check_dtype:
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != expected {expected.dtype}"
    cmp = compare(actual, expected, tol)
    assert cmp.ok, f"{what}: {cmp} (tolerance atol={tol.atol}, rtol={tol.rtol})"


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, what: str = "output") -> None:
    assert_close(actual, expected, tolerance_for(expected.dtype), what)


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    return t.detach().cpu().view(ints[t.element_size()])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    diff = (_bits(actual) != _bits(expected))
    assert not bool(diff.any()), f"{what}: {int(diff.sum())} of {diff.numel()} elements differ bitwise"


def fuzz_examples(default: int) -> int:
    """The example count of a property-based suite: `default` (sized so CI stays within its time),
    or the `PYOPS_FUZZ_EXAMPLES` environment variable for a longer run on demand."""
    raw = os.environ.get("PYOPS_FUZZ_EXAMPLES")
    if raw is None or raw == "":
        return default
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"PYOPS_FUZZ_EXAMPLES: expected a positive integer, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"PYOPS_FUZZ_EXAMPLES: expected a positive integer, got {n}")
    return n


def fuzz_settings(default: int, **overrides):
    """hypothesis settings shared by the property suites: `fuzz_examples(default)` examples,
    derandomized (the same examples on every run, so CI failures reproduce), no deadline (the
    Triton interpreter is slow), no example database on disk."""
    from hypothesis import HealthCheck, settings

    kw = dict(max_examples=fuzz_examples(default), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    kw.update(overrides)
    return settings(**kw)


def fuzz(examples: int, check, **strategies) -> None:
    """Run `check(**drawn)` on `examples` hypothesis examples drawn from the keyword `strategies`,
    with `fuzz_settings` (derandomized: the same examples on every run). The property suites'
    against-the-reference tests are this, parametrized by backend, forward/gradients and
    finite/non-finite values."""
    from hypothesis import given

    @fuzz_settings(examples)
    @given(**strategies)
    def prop(**drawn):
        check(**drawn)

    prop()


def layout_base_shape(shape, layout: str, dims):
    """The shape a property suite draws values in for `layout`: an `expanded` tensor has extent 1
    on the first of `dims` of extent > 1 (then expanded); without one it is drawn contiguous.
    Returns (shape, layout actually used)."""
    if layout == "expanded":
        for d in dims:
            if shape[d] > 1:
                return tuple(1 if i == d else s for i, s in enumerate(shape)), layout
        layout = "contiguous"
    return tuple(shape), layout


def realize_layout(values: torch.Tensor, shape, layout: str, swap, dtype, device) -> torch.Tensor:
    """`values` (drawn in `layout_base_shape`) as a tensor of `shape` in `layout`: contiguous,
    transposed (dims `swap` swapped in storage), expanded, or an offset view whose padding is NaN
    (a kernel that reads past the view shows it). Same values in every layout."""
    x = values.to(dtype=dtype, device=device)
    if layout == "transposed":
        return x.transpose(*swap).contiguous().transpose(*swap)
    if layout == "expanded":
        return x.expand(shape)
    if layout == "offset":
        big = torch.full((*x.shape[:-1], x.shape[-1] + 3), float("nan"), dtype=dtype, device=device)
        big[..., 1:1 + x.shape[-1]] = x
        return big[..., 1:1 + x.shape[-1]]
    return x.clone()


def saved_outputs_with_and_without(env_var: str, script: str, tmp_path) -> List[list]:
    """Runs `script` (which `torch.save`s a list of tensors to sys.argv[1]) in a fresh process
    without `env_var` and with `env_var=1`; returns the two lists, in that order. For switches read
    once at load time (the ISA paths of the C++ kernels)."""
    outs = []
    for flag in ("", "1"):
        path = tmp_path / f"out{flag or 0}.pt"
        env = {k: v for k, v in os.environ.items() if k != env_var}
        if flag:
            env[env_var] = flag
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, timeout=300)
        outs.append(torch.load(path))
    return outs


__all__ = [
    "BACKENDS", "CUDA", "REDUCTION_TOL", "assert_bitwise_equal", "assert_close", "assert_close_dtype",
    "available_backends", "backend_reason", "device_for", "fmt_dtype", "fuzz_examples", "fuzz_settings", "layout_base_shape", "realize_layout", "interpreted", "randn", "require_backend",
    "saved_outputs_with_and_without", "tolerance_for",
]

