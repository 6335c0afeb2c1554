"""breadcrumbs_ties (mergekit 0.1.5's registry entry): breadcrumbs' rank band, then TIES' sign
election and disjoint mean. The reference against an independent formulation, the C++ kernels
(method code 9) against the reference, gradients, the GPU backends' refusals and `merge_tensors`'
mergekit parameters. Parity with mergekit's own function: test_interpolate_mergekit.py."""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_bitwise_equal, assert_close, fmt_dtype, require_backend
from pyops.merging import backend_triton
from pyops.merging import interpolate as I
from pyops.merging import task_arithmetic as TM
from pyops.testing import REDUCTION_TOL, tolerance_for
from .cases import DTYPES, shape_id


def band_mask(tau, density, gamma):
    """Independent: sort |τ| descending (ties by position, reversed), drop the top ⌊γn⌋, keep the
    next ⌊ρn⌋ (the whole tensor is one block)."""
    mag = tau.abs().reshape(-1)
    n = mag.numel()
    order = sorted(range(n), key=lambda j: (float(mag[j]), j))  # ascending, ties by position
    n_top, n_keep = int(gamma * n), int(density * n)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n - n_top - n_keep:n - n_top]] = True
    return keep.view(tau.shape)


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_is_band_then_election(normalize, rng):
    base = torch.randn(6, 11, generator=rng, dtype=torch.float64)
    taus = [torch.randn(6, 11, generator=rng, dtype=torch.float64) for _ in range(3)]
    w = [0.5, 1.0, 2.0]
    dens, gamma = [0.5, 0.6, 0.3], 0.1
    trimmed = [t * band_mask(t, d, gamma) for t, d in zip(taus, dens)]
    s = torch.where(sum(wi * t for wi, t in zip(w, trimmed)) >= 0, 1.0, -1.0)
    agree = [((torch.sign(t) == s) & (t != 0)).double() for t in trimmed]
    total = sum(a * wi * t for a, wi, t in zip(agree, w, trimmed))
    div = sum(a * wi for a, wi in zip(agree, w))
    merged = total / torch.where(div == 0, torch.ones_like(div), div) if normalize else total
    got = pyops.merge(base, taus, method="breadcrumbs_ties", coeffs=w, density=dens, gamma=gamma, lam=0.8,
                      normalize=normalize, backend="reference")
    assert_close(got, base + 0.8 * merged, tolerance_for(torch.float64))


CASES = [((7, 33), None), ((5, 40), "rows"), ((100, 50), 7), ((3, 70000), None), ((2, 90001), 65537)]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("from_models", [False, True], ids=["deltas", "from_models"])
@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("shape,blocks", CASES, ids=[f"{shape_id(s)}-{b}" for s, b in CASES])
def test_cpu_matches_reference_bitwise(shape, blocks, dtype, from_models, normalize, rng):
    require_backend("cpu")
    base = torch.randn(shape, generator=rng).to(dtype)
    deltas = [torch.randn(shape, generator=rng).to(dtype) for _ in range(3)]
    fn = pyops.merge_from_models if from_models else pyops.merge
    kw = dict(method="breadcrumbs_ties", density=[0.3, 0.55, 0.8], gamma=0.05, blocks=blocks,
              coeffs=[0.5, 1.0, 2.0], normalize=normalize)
    assert_bitwise_equal(fn(base, deltas, backend="cpu", **kw), fn(base, deltas, backend="reference", **kw))


def test_cpu_gradients_match_reference(rng):
    require_backend("cpu")
    base0 = torch.randn(6, 20, generator=rng)
    deltas0 = [torch.randn(6, 20, generator=rng) for _ in range(3)]
    grads = []
    for backend in ("cpu", "reference"):
        base = base0.clone().requires_grad_()
        deltas = [d.clone().requires_grad_() for d in deltas0]
        coeffs = torch.tensor([0.5, 1.0, 1.5], requires_grad=True)
        out = pyops.merge(base, deltas, method="breadcrumbs_ties", density=0.4, gamma=0.1, coeffs=coeffs,
                          blocks="rows", backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append([base.grad, *[d.grad for d in deltas], coeffs.grad])
    for g_cpu, g_ref in zip(*grads):
        assert_close(g_cpu, g_ref, REDUCTION_TOL, "gradient")


def test_density_one_keeps_everything_then_elects(rng):
    base = torch.randn(4, 9, generator=rng)
    deltas = [torch.randn(4, 9, generator=rng) for _ in range(2)]
    assert_bitwise_equal(pyops.merge(base, deltas, method="breadcrumbs_ties", density=1.0, backend="cpu"),
                         pyops.merge(base, deltas, method="ties", density=1.0, normalize=False, backend="cpu"))


def test_normalize_defaults_to_mergekits_false(rng):
    """mergekit 0.1.5 registers breadcrumbs_ties with default_normalize=False (the elected sum)."""
    base = torch.randn(4, 9, generator=rng)
    deltas = [torch.randn(4, 9, generator=rng) for _ in range(3)]
    kw = dict(method="breadcrumbs_ties", density=0.6, gamma=0.1, backend="cpu")
    assert_bitwise_equal(pyops.merge(base, deltas, **kw), pyops.merge(base, deltas, normalize=False, **kw))
    assert not torch.equal(pyops.merge(base, deltas, **kw), pyops.merge(base, deltas, normalize=True, **kw))


def test_triton_refuses():
    reason = backend_triton.MERGE.reason(torch.device("cpu"), torch.zeros(1))
    if reason is not None:
        pytest.skip(reason)
    p = TM.prepare(torch.zeros(4), [torch.ones(4)], [1.0], None, None)
    assert "'breadcrumbs_ties'" in backend_triton.merge_reason(p, "breadcrumbs_ties", False)


def test_gamma_checked():
    x = torch.ones(8)
    with pytest.raises(ValueError, match="gamma"):
        pyops.merge(x, [x], method="breadcrumbs_ties", density=0.5, gamma=0.6)


def test_merge_tensors_uses_mergekit_defaults(rng):
    base, a, b = (torch.randn(5, 8, generator=rng) for _ in range(3))
    got = I.merge_tensors("breadcrumbs_ties", base, [a, b], {"weight": [1.0, 0.5], "density": [0.5, 0.7]})
    want = pyops.merge_from_models(base, [a, b], method="breadcrumbs_ties", coeffs=[1.0, 0.5], density=[0.5, 0.7],
                                   gamma=0.01, normalize=False)
    assert_bitwise_equal(got, want)


@pytest.mark.parametrize("params,match", [
    ({"weight": [1.0, 1.0], "gamma": [0.01, 0.02]}, "gamma"),
    ({"weight": [1.0, 1.0], "rescale": True}, "rescale"),
    ({"weight": [1.0]}, "weight"),
    ({"density": 0.5}, "weight"),
], ids=["gamma-per-model", "rescale", "weight-count", "weight-missing"])
def test_merge_tensors_bad_params(params, match):
    x = torch.ones(2, 2)
    with pytest.raises(ValueError, match=match):
        I.merge_tensors("breadcrumbs_ties", x, [x, x], params)
