"""NaN, ±inf and degenerate divisors in merging (docs/merging.md#non-finite-values).

The reference is the definition; every backend that runs here matches it, forward and every
gradient. The NaN behaviour of the ranking methods is pinned first (what docs/merging.md states),
then the backends are compared with the reference on the same inputs.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_close, available_backends
from pyops.testing import REDUCTION_TOL, tolerance_for

NAN, INF = float("nan"), float("inf")
FP32 = torch.float32
RANKED = ["ties", "breadcrumbs", "dare_ties", "della"]


def _models(seed=0, n=2, numel=16):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen)
    return base, [base + torch.randn(numel, generator=gen) for _ in range(n)]


def _merge(backend, base, models, method, coeffs, **kw):
    b = base.clone().requires_grad_(True)
    ms = [m.clone().requires_grad_(True) for m in models]
    c = None if coeffs is None else torch.tensor(coeffs, dtype=FP32, requires_grad=True)
    out = pyops.merge_from_models(b, ms, method=method, coeffs=c, backend=backend, **kw)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    grads = {"out": out.detach(), "dbase": b.grad, **{f"dm{i}": m.grad for i, m in enumerate(ms)}}
    return grads if c is None else {**grads, "dcoeffs": c.grad}


def _kernel_backends():
    return [b for b in available_backends() if b != "reference"]


def test_reference_nan_element_stays_nan_and_other_elements_stay_finite():
    base, models = _models()
    models[0][3] = NAN
    out = pyops.merge_from_models(base, models, method="ties", coeffs=[1.0, 1.0], density=0.5, backend="reference")
    assert torch.isnan(out[3]) and torch.isfinite(out[torch.arange(16) != 3]).all()


def test_reference_nan_ranks_as_the_largest_magnitude_in_its_block():
    base = torch.zeros(4)
    tau = torch.tensor([NAN, 3.0, 2.0, 1.0])
    # density 0.5 keeps k = 2 of 4: the NaN and 3.0; 2.0 is trimmed although it is the second finite one
    out = pyops.merge(base, [tau], method="ties", coeffs=[1.0], density=0.5, backend="reference")
    assert torch.isnan(out[0]) and out[1] == 3.0 and out[2] == 0.0 and out[3] == 0.0


@pytest.mark.parametrize("method", RANKED)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "posinf", "neginf"])
def test_backend_matches_reference_with_a_nonfinite_task_element(method, value):
    base, models = _models()
    models[0][5] = value
    models[1][9] = -value if value == value else 1.0
    exp = _merge("reference", base, models, method, [0.7, 0.6], density=0.5)
    for backend in _kernel_backends():
        try:
            got = _merge(backend, base, models, method, [0.7, 0.6], density=0.5)
        except pyops.BackendUnavailableError:
            continue
        for name in exp:
            tol = REDUCTION_TOL if name == "dcoeffs" else tolerance_for(FP32)
            assert_close(got[name], exp[name], tol, f"{backend} {name}")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_backend_coefficient_gradient_where_the_elected_weights_sum_to_zero(method):
    """Σ aᵢwᵢ = 0 is replaced by the constant 1, so no gradient flows through it."""
    base = torch.zeros(1)
    models = [torch.tensor([-2.0]), torch.tensor([-1.0])]
    exp = _merge("reference", base, models, method, [0.5, -0.5], density=1.0)
    for backend in _kernel_backends():
        try:
            got = _merge(backend, base, models, method, [0.5, -0.5], density=1.0)
        except pyops.BackendUnavailableError:
            continue
        for name in exp:
            assert_close(got[name], exp[name], REDUCTION_TOL, f"{backend} {name}")


def test_model_stock_gradient_with_a_zero_task_vector_is_finite_and_matches():
    base = torch.zeros(4)
    models = [torch.zeros(4), torch.tensor([1.0, -2.0, 0.5, 3.0])]
    exp = _merge("reference", base, models, "model_stock", None)
    assert all(torch.isfinite(g).all() for g in exp.values())
    for backend in _kernel_backends():
        try:
            got = _merge(backend, base, models, "model_stock", None)
        except pyops.BackendUnavailableError:
            continue
        for name in exp:
            assert_close(got[name], exp[name], REDUCTION_TOL, f"{backend} {name}")


def test_model_stock_with_opposite_task_vectors_matches_the_reference():
    """cos = −1 with N = 2 makes t = −inf (mergekit's formula): every backend gives the reference's
    non-finite values. The norms here are exact (5), so every backend forms cos = −1 exactly; near
    the singularity t depends on the last bit of cos and no two summation orders agree."""
    base = torch.zeros(2)
    models = [torch.tensor([3.0, 4.0]), torch.tensor([-3.0, -4.0])]
    exp = pyops.merge_from_models(base, models, method="model_stock", backend="reference")
    assert torch.isnan(exp).all()
    for backend in _kernel_backends():
        try:
            got = pyops.merge_from_models(base, models, method="model_stock", backend=backend)
        except pyops.BackendUnavailableError:
            continue
        assert_close(got, exp, tolerance_for(FP32), backend)
