"""Forward parity with NATTEN (the reference library) where it is installed: `natten.na*d(...,
backend="flex-fna")` against pyops' reference and its default backend, fp32, no rpb (NATTEN >= 0.20
has none)."""
from __future__ import annotations

import warnings

import pytest
import torch

import pyops
from .cases import FNS, NACase
from pyops.neighborhood import reference as ref
from pyops.testing import compare, tolerance_for

natten = pytest.importorskip("natten", reason="natten is not installed (pip install --no-build-isolation natten)")

T, F = True, False
CASES = [
    NACase((13,), (5,), dilation=(2,)),
    NACase((12,), (4,), stride=(2,), causal=(T,)),
    NACase((9, 11), (3, 4), dilation=(2, 1)),
    NACase((8, 9), (3, 3), stride=(2, 3), causal=(F, T)),
    NACase((4, 6, 7), (2, 3, 3), dilation=(1, 2, 1), causal=(T, F, F)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_matches_natten_flex(case):
    q, k, v, _ = case.make(torch.float32)
    fn = getattr(natten, f"na{case.n}d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            exp = fn(q, k, v, kernel_size=case.kernel, stride=case.st(), dilation=case.dl(),
                     is_causal=case.ca(), backend="flex-fna")
        except Exception as exc:  # NATTEN refuses some configurations on CPU
            pytest.skip(f"natten flex-fna refused this case: {type(exc).__name__}: {exc}")
    tol = tolerance_for(torch.float32)
    got_ref = ref.neighborhood_attention(q, k, v, case.kernel, case.st(), case.dl(), case.ca())
    assert compare(got_ref, exp, tol).ok, compare(got_ref, exp, tol)
    got = FNS[case.n](q, k, v, case.kernel, **case.kwargs())
    assert compare(got, exp, tol).ok, compare(got, exp, tol)
