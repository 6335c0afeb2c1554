"""The merge methods' reference, checked against independent, literal formulations of the papers
and of mergekit (per-tensor PyTorch with topk / sort / bernoulli-style masks), plus the
properties the definitions promise: exact selection with ties kept, Philox determinism, masks held
fixed in the backward, parameter validation."""
from __future__ import annotations

import math

import pytest
import torch

import pyops
from pyops.merging import reference as R
from pyops._philox import philox4x32_10
from pyops.testing import REDUCTION_TOL, compare, tolerance_for

FP32 = torch.float32


def _inputs(shape, n, rng, dtype=FP32):
    base = torch.randn(shape, generator=rng).to(dtype)
    deltas = [torch.randn(shape, generator=rng).to(dtype) for _ in range(n)]
    return base, deltas


def _close(actual, expected, dtype=FP32):
    res = compare(actual, expected, tolerance_for(dtype))
    assert res.ok, res


# --- literal per-tensor formulations (one block = the whole tensor) ---------------------------------

def _ties_literal(base, deltas, w, density, lam=1.0):
    taus = []
    for d in deltas:
        t = d.flatten().double()
        k = max(1, int(math.floor(density * t.numel())))
        thr = torch.sort(t.abs(), descending=True).values[k - 1]
        taus.append(torch.where(t.abs() >= thr, t, torch.zeros_like(t)))
    taus = torch.stack(taus)
    wv = torch.tensor(w, dtype=torch.float64)[:, None]
    sign = torch.where((wv * taus).sum(0) >= 0, 1.0, -1.0).double()
    agree = ((taus.sign() == sign) & (taus != 0)).double()
    div = (agree * wv).sum(0)
    div[div == 0] = 1
    merged = (agree * wv * taus).sum(0) / div
    return (base.flatten().double() + lam * merged).view(base.shape)


@pytest.mark.parametrize("density", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("shape", [(7,), (13, 11)], ids=lambda s: "x".join(map(str, s)))
def test_ties_matches_literal_formulation(shape, density, rng):
    base, deltas = _inputs(shape, 3, rng)
    w = [0.5, 1.0, 0.7]
    got = pyops.merge(base, deltas, method="ties", coeffs=w, density=density, lam=0.9, backend="reference")
    _close(got, _ties_literal(base, deltas, w, density, lam=0.9))


def test_ties_keeps_every_entry_tied_with_the_kth():
    base = torch.zeros(8)
    delta = torch.tensor([3.0, -2.0, 2.0, 2.0, 1.0, -1.0, 0.5, 2.0])
    # k = floor(0.25 * 8) = 2: the 2nd largest |τ| is 2.0, and all four entries equal to it stay.
    got = pyops.merge(base, [delta], method="ties", density=0.25, backend="reference")
    assert torch.equal(got, torch.tensor([3.0, -2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 2.0]))


def test_ties_zero_divisor_counts_as_one():
    base = torch.zeros(3)
    got = pyops.merge(base, [torch.zeros(3), torch.zeros(3)], method="ties", density=1.0, backend="reference")
    assert torch.equal(got, torch.zeros(3))


def test_ties_per_block_trimming_uses_each_rows_length():
    base = torch.zeros(2, 4)
    delta = torch.tensor([[4.0, 3.0, 2.0, 1.0], [-1.0, -2.0, -8.0, -4.0]])
    got = pyops.merge(base, [delta], method="ties", density=0.5, blocks="rows", backend="reference")
    assert torch.equal(got, torch.tensor([[4.0, 3.0, 0.0, 0.0], [0.0, 0.0, -8.0, -4.0]]))


def test_ties_without_normalize_is_the_agreeing_sum():
    base = torch.zeros(2)
    d = [torch.tensor([1.0, -1.0]), torch.tensor([2.0, 3.0])]
    got = pyops.merge(base, d, method="ties", density=1.0, normalize=False, backend="reference")
    assert torch.equal(got, torch.tensor([3.0, 3.0]))
    got = pyops.merge(base, d, method="ties", density=1.0, backend="reference")
    assert torch.equal(got, torch.tensor([1.5, 3.0]))


# --- DARE ----------------------------------------------------------------------------------------

def test_philox_known_answer_vectors():
    z = torch.tensor(0)
    assert [int(x) for x in philox4x32_10(z, z, z, z, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.tensor(0xFFFFFFFF)
    assert [int(x) for x in philox4x32_10(f, f, f, f, 0xFFFFFFFF, 0xFFFFFFFF)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_dare_rescales_kept_entries_by_one_over_density(rng):
    base, deltas = _inputs((10_000,), 1, rng)
    got = pyops.merge(base, deltas, method="dare", density=0.25, seed=5, backend="reference")
    delta = got - base
    kept = delta != 0
    _close(delta[kept], deltas[0][kept] / 0.25)
    assert abs(kept.double().mean().item() - 0.25) < 0.02


def test_dare_masks_depend_on_seed_name_and_task_only(rng):
    base, deltas = _inputs((4096,), 2, rng)
    a = pyops.merge(base, deltas, method="dare", density=0.5, seed=1, name="w", backend="reference")
    b = pyops.merge(base, deltas, method="dare", density=0.5, seed=1, name="w", backend="reference")
    c = pyops.merge(base, deltas, method="dare", density=0.5, seed=2, name="w", backend="reference")
    d = pyops.merge(base, deltas, method="dare", density=0.5, seed=1, name="v", backend="reference")
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_dare_masks_do_not_depend_on_the_shard_layout(rng):
    # Element j's draw depends on j alone: merging a prefix gives the prefix of the full merge.
    u_full = R.keep_uniforms(1003, task=1, seed=9, name="x", device="cpu")
    u_prefix = R.keep_uniforms(517, task=1, seed=9, name="x", device="cpu")
    assert torch.equal(u_full[:517], u_prefix)


def test_dare_linear_is_dare(rng):
    base, deltas = _inputs((333,), 3, rng)
    a = pyops.merge(base, deltas, method="dare", density=0.4, seed=3, backend="reference")
    b = pyops.merge(base, deltas, method="dare_linear", density=0.4, seed=3, backend="reference")
    assert torch.equal(a, b)


# --- breadcrumbs, DELLA, model_stock, consensus ---------------------------------------------------

def test_breadcrumbs_drops_the_top_gamma_and_the_bottom(rng):
    base = torch.zeros(100)
    delta = torch.randperm(100, generator=rng).to(FP32) + 1.0  # magnitudes 1..100, all distinct
    got = pyops.merge(base, [delta], method="breadcrumbs", density=0.5, gamma=0.1, backend="reference")
    kept = delta[got != 0]
    # the top 10 (91..100) and the bottom 100 - 50 - 10 = 40 (1..40) are dropped
    assert sorted(kept.tolist()) == [float(v) for v in range(41, 91)]


def test_della_keep_probability_tracks_the_magnitude_rank():
    base = torch.zeros(20_000)
    delta = torch.arange(1, 20_001, dtype=FP32)
    got = pyops.merge(base, [delta], method="della_linear", density=0.5, epsilon=0.2, seed=4, backend="reference")
    kept = (got != 0).double()
    low, high = kept[:2000].mean().item(), kept[-2000:].mean().item()
    assert abs(low - 0.32) < 0.03 and abs(high - 0.68) < 0.03  # p runs from 0.3 to 0.7
    # kept entries are rescaled by 1/p
    p = 0.3 + 0.4 * torch.arange(20_000, dtype=torch.float64) / 19_999
    idx = got != 0
    _close(got[idx].double(), (delta.double() / p)[idx])


@pytest.mark.parametrize("method", ["breadcrumbs", "della", "della_linear"])
def test_density_one_keeps_every_entry_of_the_ranked_methods(method, rng):
    """As mergekit (`density >= 1` returns the task vector unchanged): no drop, no rescale, whatever
    gamma / epsilon; the defaults (density 1, gamma 0.01, epsilon 0.1) are a valid call."""
    base, deltas = _inputs((7, 30), 3, rng)
    got = pyops.merge(base, deltas, method=method, coeffs=[0.5, 0.2, 0.9], backend="reference")
    want_method = "ties" if method == "della" else "task_arithmetic"
    want = pyops.merge(base, deltas, method=want_method, coeffs=[0.5, 0.2, 0.9], density=1.0, backend="reference")
    _close(got, want)


def test_model_stock_matches_mergekit_formula(rng):
    base, fts = _inputs((9, 5), 3, rng)
    got = pyops.merge_from_models(base, fts, method="model_stock", backend="reference")
    taus = [(f - base).flatten().double() for f in fts]
    cos = [torch.dot(taus[i], taus[j]) / (taus[i].norm() * taus[j].norm())
           for i in range(3) for j in range(i + 1, 3)]
    c = torch.stack(cos).mean()
    t = 3 * c / (1 + 2 * c)
    expected = t * (sum(fts) / 3).double() + (1 - t) * base.double()
    _close(got, expected.float())


def test_consensus_keeps_entries_active_in_at_least_k_tasks():
    base = torch.zeros(4)
    d = [torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0.9, 0.0, 1.0, 0.0])]
    got = pyops.merge(base, d, method="consensus", k=2, tall_lambda=0.4, backend="reference")
    # τ_MTL = [2.9, 1, 1, 2]. Task i is active where |τᵢ| >= 0.4·|τ_MTL − τᵢ|:
    #   element 0: 3 tasks active -> kept; 1 and 2: one task each -> dropped; 3: two tasks -> kept.
    _close(got, torch.tensor([2.9, 0.0, 0.0, 2.0]))


# --- gradients: masks held fixed -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ties", "dare", "dare_ties", "breadcrumbs", "della", "consensus"])
def test_coeff_gradient_holds_masks_fixed(method, rng):
    base, deltas = _inputs((40,), 3, rng, torch.float64)
    coeffs = torch.tensor([0.5, 0.8, 1.1], dtype=torch.float64, requires_grad=True)
    kw = dict(method=method, density=0.6, seed=3, backend="reference")
    fn = lambda c: pyops.merge(base, deltas, coeffs=c, **kw)  # noqa: E731
    # With the masks a function of the data only, the merge is piecewise smooth in the coeffs; at
    # a generic point gradcheck must hold.
    assert torch.autograd.gradcheck(fn, (coeffs,))


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(method="average"), ValueError, "method"),
    (dict(method="ties", density=0.0), ValueError, "density"),
    (dict(method="ties", density=1.5), ValueError, "density"),
    (dict(method="ties", density=[0.5]), TypeError, "density"),
    (dict(method="breadcrumbs", density=0.95, gamma=0.1), ValueError, "gamma"),
    (dict(method="della", density=0.05, epsilon=0.1), ValueError, "epsilon"),
    (dict(method="della", density=1.0, epsilon=-0.1), ValueError, "epsilon"),
    (dict(method="consensus", k=4), ValueError, "k"),
    (dict(method="model_stock", coeffs=[1.0, 1.0]), ValueError, "coeffs"),
    (dict(method="dare", seed=-1), ValueError, "seed"),
], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else v.__name__ if isinstance(v, type)
   else None)
def test_bad_parameters_are_named(kwargs, exc, match, rng):
    base, deltas = _inputs((6,), 2, rng)
    with pytest.raises(exc, match=match):
        pyops.merge(base, deltas, **kwargs)


def test_model_stock_needs_two_models(rng):
    base, fts = _inputs((6,), 1, rng)
    with pytest.raises(ValueError, match="at least 2"):
        pyops.merge_from_models(base, fts, method="model_stock")


def test_merge_does_not_modify_inputs(rng):
    base, deltas = _inputs((50,), 3, rng)
    saved = [base.clone()] + [d.clone() for d in deltas]
    for method in R.METHODS:
        kw = {} if method == "model_stock" else dict(density=0.5)
        pyops.merge(base, deltas, method=method, **kw)
    assert all(torch.equal(a, b) for a, b in zip(saved, [base, *deltas]))
