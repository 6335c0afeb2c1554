"""breadcrumbs and breadcrumbs_ties on long blocks (>= 65536 elements): the CPU forward keeps an
element iff its (|tau| key, position) entry lies between the entries of ranks lo and hi of its
block's band (mergekit 0.1.5, mergekit/sparsify.py `magnitude_outliers`: drop the top
floor(gamma * n), keep the next floor(density * n)) instead of ranking every element. The
reference (pyops/merging/reference.py) is the definition: the CPU output is compared with it bit
for bit on long blocks with many ties in |tau|, bands that keep nothing, bands open at the top,
tasks keeping everything, NaN, several blocks per tensor (the last one short), 1 to 4 tasks, every
input dtype, and one thread against two."""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_bitwise_equal, fmt_dtype, require_backend
from .cases import DTYPES

METHODS = ["breadcrumbs", "breadcrumbs_ties"]
SHAPE = (25, 7865)  # 3 * 65536 + 17 elements
# None: one block of the whole tensor; 65539: three long blocks and one of 8 elements;
# 196624: one long block and one of a single element.
BLOCKS = [None, 65539, 196624]


def quantised_models(n, dtype, gen, shape=SHAPE):
    """Base and n models whose tau = model - base takes only a few magnitudes (0, 1/8, ..., 3/8):
    exact in every dtype, so nearly every rank is decided by position."""
    base = (torch.randint(-8, 9, shape, generator=gen).float() * 0.25).to(dtype)
    models = [(base.float() + torch.randint(-3, 4, shape, generator=gen).float() * 0.125).to(dtype)
              for _ in range(n)]
    return base, models


def both(base, models, **kw):
    """(cpu, reference) outputs of merge_from_models."""
    return (pyops.merge_from_models(base, models, backend="cpu", **kw),
            pyops.merge_from_models(base, models, backend="reference", **kw))


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"blocks={b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("method", METHODS)
def test_ties_in_magnitude_match_reference_bitwise(method, dtype, blocks, rng):
    require_backend("cpu")
    base, models = quantised_models(3, dtype, rng)
    cpu, ref = both(base, models, method=method, coeffs=[0.5, 0.3, 0.7], density=[0.3, 0.5, 0.1],
                    gamma=0.01, blocks=blocks)
    assert_bitwise_equal(cpu, ref)


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"blocks={b}")
@pytest.mark.parametrize("method", METHODS)
def test_distinct_magnitudes_match_reference_bitwise(method, blocks, rng):
    require_backend("cpu")
    base = torch.randn(SHAPE, generator=rng)
    models = [base + 0.01 * torch.randn(SHAPE, generator=rng) for _ in range(3)]
    cpu, ref = both(base, models, method=method, coeffs=[0.5, 0.3, 0.7], density=0.3, gamma=0.01, blocks=blocks)
    assert_bitwise_equal(cpu, ref)


# (density per task, gamma): the band [n - n_keep - n_top, n - n_top) of each task
BANDS = {
    "keep_none": ([1e-7, 1e-7, 0.4], 0.01),        # floor(density * n) = 0 for two tasks
    "top_open": ([0.3, 0.6, 0.05], 0.0),           # n_top = 0: the band runs to the largest
    "one_keeps_all": ([0.3, 1.0, 0.2], 0.02),       # density 1: task 1 is not ranked
    "from_bottom": ([0.8, 0.75, 0.5], 0.2),        # density + gamma = 1: the band starts at rank 0 or 1
    "top_heavy": ([0.001, 0.0005, 1e-7], 0.999),    # a thin band just below a dropped top of 99.9%
    "all_but_top": ([0.99, 0.999, 0.5], 0.001),
}


@pytest.mark.parametrize("blocks", [None, 65539], ids=lambda b: f"blocks={b}")
@pytest.mark.parametrize("band", sorted(BANDS))
@pytest.mark.parametrize("method", METHODS)
def test_band_edges_match_reference_bitwise(method, band, blocks, rng):
    require_backend("cpu")
    density, gamma = BANDS[band]
    base, models = quantised_models(3, torch.bfloat16, rng)
    cpu, ref = both(base, models, method=method, coeffs=[0.5, -0.3, 0.7], density=density, gamma=gamma,
                    blocks=blocks)
    assert_bitwise_equal(cpu, ref)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("method", METHODS)
def test_task_counts_match_reference_bitwise(method, n, rng):
    require_backend("cpu")
    base, models = quantised_models(n, torch.float16, rng)
    density = [0.15 * (i + 1) for i in range(n)]
    cpu, ref = both(base, models, method=method, coeffs=[0.4 + 0.2 * i for i in range(n)], density=density,
                    gamma=0.03, blocks=65539)
    assert_bitwise_equal(cpu, ref)


@pytest.mark.parametrize("blocks", [None, 65539], ids=lambda b: f"blocks={b}")
@pytest.mark.parametrize("method", METHODS)
def test_nan_in_one_task_matches_reference_bitwise(method, blocks, rng):
    require_backend("cpu")
    base, models = quantised_models(3, torch.float32, rng)
    flat = models[1].view(-1)
    flat[torch.randint(0, flat.numel(), (500,), generator=rng)] = float("nan")
    flat[-3:] = float("nan")  # NaN in the short last block too
    cpu, ref = both(base, models, method=method, coeffs=[0.5, 0.3, 0.7], density=[0.3, 0.2, 0.4], gamma=0.01,
                    blocks=blocks)
    assert_bitwise_equal(cpu, ref)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("blocks", [None, 65539], ids=lambda b: f"blocks={b}")
@pytest.mark.parametrize("method", METHODS)
def test_one_and_two_threads_bit_identical(method, blocks, rng, restore_threads):
    require_backend("cpu")
    base, models = quantised_models(3, torch.bfloat16, rng)
    kw = dict(method=method, coeffs=[0.5, 0.3, 0.7], density=[0.3, 0.5, 0.1], gamma=0.01, blocks=blocks,
              backend="cpu")
    torch.set_num_threads(1)
    one = pyops.merge_from_models(base, models, **kw)
    torch.set_num_threads(2)
    two = pyops.merge_from_models(base, models, **kw)
    assert_bitwise_equal(two, one, "2 threads vs 1")
