"""pyops._finite: the magnitude guard the fused attention and experts ops consult before their
kernels (docs/design.md#non-finite-values)."""
from __future__ import annotations

import pytest
import torch

from pyops import _finite

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_maxima_are_the_largest_magnitudes(dtype):
    a = torch.tensor([0.5, -3.0, 2.0], dtype=dtype)
    b = torch.tensor([[1.0], [7.0]], dtype=dtype).t()  # a non-contiguous view
    assert _finite.maxima(a, b) == [3.0, 7.0]


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "posinf", "neginf"])
def test_a_nonfinite_element_reads_as_infinite(value):
    t = torch.ones(5)
    t[3] = value
    assert _finite.maxima(torch.ones(2), t) == [1.0, INF]
    assert not _finite.all_finite(t)
    assert not _finite.within(_finite.maxima(t)[0])


def test_none_and_empty_tensors_read_as_zero():
    assert _finite.maxima(None, torch.empty(0, 3)) == [0.0, 0.0]
    assert _finite.all_finite(None, torch.empty(0))


def test_bounds_at_or_above_the_limit_are_not_within():
    assert _finite.within(1.0, _finite.LIMIT / 2)
    assert not _finite.within(1.0, _finite.LIMIT)
    assert not _finite.within(NAN)


def test_meta_tensors_are_not_read():
    assert _finite.maxima(torch.empty(3, device="meta")) is None
    assert _finite.all_finite(torch.empty(3, device="meta"))


def test_inputs_are_not_modified():
    t = torch.tensor([1.0, NAN, -INF])
    before = t.clone()
    _finite.maxima(t)
    assert torch.equal(t.nan_to_num(), before.nan_to_num()) and torch.isnan(t[1])


@pytest.mark.parametrize("value", [float("nan"), float("-inf")], ids=["nan", "-inf"])
def test_strided_views_read_like_their_copies(value):
    """A half of a fused [E, 2h, d] tensor, transposed (a model's weights passed as views)."""
    fused = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
    view = fused[:, :4].transpose(1, 2)
    assert _finite.maxima(view) == _finite.maxima(view.contiguous())
    fused[1, 2, 3] = value
    assert _finite.maxima(view) == [float("inf")]
