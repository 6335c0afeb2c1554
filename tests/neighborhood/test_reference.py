"""The reference is the definition: it must agree with an independent brute-force reading of
the window rule (docs/neighborhood.md) (python loops over positions) on small, deliberately awkward shapes, and its
gradients must pass an fp64 gradcheck."""
from __future__ import annotations

import pytest
import torch

from .cases import NACase, brute_force, in_window, keys_seen
from pyops.neighborhood import reference as ref
from pyops.testing import tolerance_for

T, F = True, False
CASES = [
    # 1D
    NACase((7,), (3,)),
    NACase((5,), (5,)),                                   # kernel equal to the input
    NACase((9,), (4,), dilation=(2,)),                    # even kernel, dilation not dividing 9
    NACase((10,), (3,), stride=(2,)),
    NACase((11,), (5,), stride=(3,), dilation=(2,)),
    NACase((8,), (3,), causal=(T,)),
    NACase((9,), (4,), stride=(2,), causal=(T,)),
    NACase((13,), (3,), dilation=(3,), causal=(T,)),
    NACase((7,), (3,), rpb=True),
    NACase((11,), (5,), dilation=(2,), stride=(2,), rpb=True, Dv=5),
    # 2D
    NACase((5, 9), (3, 4), dilation=(1, 2)),
    NACase((6, 5), (3, 3), stride=(1, 2), causal=(T, F)),  # mixed causal
    NACase((4, 4), (4, 4)),                               # kernel equal to the input
    NACase((7, 5), (3, 5), dilation=(2, 1), rpb=True, B=2),
    NACase((5, 7), (2, 3), stride=(2, 3), dilation=(2, 2)),
    # 3D
    NACase((3, 4, 7), (2, 3, 3), stride=(1, 2, 1), dilation=(1, 1, 2), causal=(F, T, F)),
    NACase((3, 5, 4), (3, 3, 3), dilation=(1, 1, 1), rpb=True, H=1),
    NACase((4, 3, 6), (2, 3, 2), causal=(T, T, T), dilation=(2, 1, 3)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_matches_brute_force(case):
    q, k, v, rpb = case.make(torch.float64)
    out, lse = ref.neighborhood_attention(q, k, v, case.kernel, case.st(), case.dl(), case.ca(), rpb, None, True)
    bo, bl = brute_force(case, q, k, v, rpb)
    tol = tolerance_for(torch.float64)
    torch.testing.assert_close(out, bo, atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(lse, bl, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize("case", [c for c in CASES if c.n == 1] + CASES[10:12], ids=lambda c: c.id)
def test_window_indices_match_the_rule(case):
    """`window_indices` (the helper kernels and tests reuse) lists exactly the keys of the rule."""
    for dim in range(case.n):
        L, kk, s, d, c = case.spatial[dim], case.kernel[dim], case.st()[dim], case.dl()[dim], case.ca()[dim]
        idx, valid, rel = ref.window_indices(L, kk, s, d, c)
        for x in range(L):
            got = sorted(int(j) for j, ok in zip(idx[x], valid[x]) if ok)
            assert got == [y for y in range(L) if in_window(x, y, L, kk, s, d, c)]
            for j, ok, r in zip(idx[x], valid[x], rel[x]):
                if ok:
                    assert int(r) == int(j) // d - x // d + kk - 1


WINDOWS = [(7, 3, 1), (9, 4, 2), (5, 5, 1), (13, 3, 4)]


@pytest.mark.parametrize("L,k,d", WINDOWS, ids=[f"L{L}-k{k}-d{d}" for L, k, d in WINDOWS])
def test_non_causal_windows_always_hold_k_keys(L, k, d):
    """Windows shift to stay inside the input: never zero padding, always exactly k keys."""
    for x in range(L):
        assert sum(in_window(x, y, L, k, 1, d, False) for y in range(L)) == k
    idx, valid, _ = ref.window_indices(L, k, 1, d, False)
    assert bool(valid.all())


def test_causal_window_is_shorter_near_the_start():
    case = NACase((8,), (3,), causal=(True,))
    assert [len(keys_seen(case, (x,))) for x in range(8)] == [1, 2, 3, 3, 3, 3, 3, 3]


GRAD_CASES = [
    NACase((6,), (3,), stride=(2,), rpb=True, D=3),
    NACase((5, 4), (3, 2), dilation=(1, 2), causal=(False, True), D=3, H=1),
    NACase((3, 4, 3), (3, 3, 3), rpb=True, D=2, H=1),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_reference_gradcheck_fp64(case):
    q, k, v, rpb = case.make(torch.float64, requires_grad=True)
    inputs = (q, k, v) + ((rpb,) if rpb is not None else ())

    def fn(q, k, v, *r):
        return ref.neighborhood_attention(q, k, v, case.kernel, case.st(), case.dl(), case.ca(),
                                          r[0] if r else None, 0.7)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_lowp_reference_accumulates_in_fp32():
    case = NACase((9,), (5,))
    q, k, v, _ = case.make(torch.float32)
    exp = ref.na1d(q, k, v, 5)
    got = ref.na1d(q.bfloat16(), k.bfloat16(), v.bfloat16(), 5)
    assert got.dtype == torch.bfloat16
    exp_b = ref.na1d(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), 5).bfloat16()
    assert torch.equal(got, exp_b)
    assert (got.float() - exp).abs().max() < 0.05
