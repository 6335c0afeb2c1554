"""NaN and ±inf in neighbourhood attention (docs/design.md#non-finite-values).

The definition: a key outside a query's window takes no part, whatever its values; inside the
window NaN and ±inf propagate as IEEE arithmetic of the formula does (a NaN logit: NaN row and
lse; a +inf logit: NaN row, lse = +inf; a −inf logit takes no part; a row whose logits are all
−inf outputs 0 with lse = −inf). The first tests pin the reference to that; the last compares
every fused backend with it, forward and every gradient (rpb's included), in every dtype.

Layout of every case: na1d, B = 1, L = 12, H = 2, D = Dv = 8, kernel 3 with dilation 2 (query i
sees three keys of its parity), rpb [2, 5].
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops.testing import tolerance_for
from _support import assert_close
from .cases import fmt_dtype, require_backend

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAN, INF = float("nan"), float("inf")
KERNEL, DILATION, L = 3, 2, 12


def _inputs(dtype=FP32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(1, L, 2, 8, generator=gen).to(dtype) for _ in range(4))
    rpb = torch.randn(2, 2 * KERNEL - 1, generator=gen).to(dtype)
    return dict(q=q, k=k, v=v, dout=dout, rpb=rpb)


def _set(x, name, index, value):
    x[name][index] = value
    return x


CASES = {
    "nan-q-token5": lambda x: _set(x, "q", (0, 5, 0, 3), NAN),
    "nan-k-token4": lambda x: _set(x, "k", (0, 4, 1, 0), NAN),
    "nan-v-token7": lambda x: _set(x, "v", (0, 7, 0, 2), NAN),
    "inf-v-token2": lambda x: _set(x, "v", (0, 2, 1, 5), INF),
    "neginf-k-token6": lambda x: _set(x, "k", (0, 6, 0, 1), -INF),
    "posinf-rpb": lambda x: _set(x, "rpb", (1, 2), INF),
    "nan-rpb": lambda x: _set(x, "rpb", (0, 4), NAN),
    "posinf-score": lambda x: _set(_set(x, "q", (0, 3, 0, 0), 1e30), "k", (0, 5, 0, 0), 1e30),
}


def run(backend, x):
    leaves = {n: x[n].clone().requires_grad_(True) for n in ("q", "k", "v", "rpb")}
    out, lse = pyops.na1d(leaves["q"], leaves["k"], leaves["v"], KERNEL, dilation=DILATION, rpb=leaves["rpb"],
                          return_lse=True, backend=backend)
    out.backward(x["dout"])
    return {"out": out.detach(), "lse": lse.detach(), **{"d" + n: t.grad for n, t in leaves.items()}}


def windows_containing(token):
    """The query tokens whose window holds key `token` (NATTEN's window rule, from the reference)."""
    from pyops.neighborhood.reference import window_indices
    idx, valid, _ = window_indices(L, KERNEL, 1, DILATION)
    return sorted({i for i in range(L) for s in range(KERNEL) if valid[i, s] and idx[i, s] == token})


def test_reference_nan_key_reaches_exactly_the_windows_that_hold_it():
    got = run("reference", CASES["nan-k-token4"](_inputs()))
    rows = windows_containing(4)
    bad = torch.isnan(got["out"][0, :, 1]).any(-1)
    assert bad.nonzero().flatten().tolist() == rows
    assert torch.isfinite(got["out"][0, :, 0]).all()  # the other head never sees it


def test_reference_posinf_logit_gives_posinf_lse_and_nan_row():
    got = run("reference", CASES["posinf-score"](_inputs()))
    assert got["lse"][0, 3, 0] == INF and torch.isnan(got["out"][0, 3, 0]).all()


def test_reference_neginf_logit_takes_no_part_and_all_neginf_row_is_empty():
    x = _inputs()
    x["q"][0, 0, 0] = 1.0
    for j in windows_of(0):
        x["k"][0, j, 0] = -INF
    got = run("reference", x)
    assert (got["out"][0, 0, 0] == 0).all() and got["lse"][0, 0, 0] == -INF


def windows_of(query):
    from pyops.neighborhood.reference import window_indices
    idx, valid, _ = window_indices(L, KERNEL, 1, DILATION)
    return [int(idx[query, s]) for s in range(KERNEL) if valid[query, s]]


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=fmt_dtype)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backend_matches_reference_on_nonfinite_inputs(backend, case, dtype):
    dev = require_backend(backend, 1, dtype)
    x = {n: t.to(dev) for n, t in CASES[case](_inputs(dtype)).items()}
    got, exp = run(backend, x), run("reference", x)
    tol = tolerance_for(dtype)
    for name in ("out", "dq", "dk", "dv", "drpb"):
        assert_close(got[name], exp[name], tol, name)
    assert_close(got["lse"], exp["lse"], tolerance_for(FP32) if dtype == FP32 else tol, "lse")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backend_matches_reference_when_finite_bf16_logits_overflow(backend):
    dev = require_backend(backend, 1, BF16)
    x = {n: t.to(dev) for n, t in _inputs(BF16).items()}
    x["q"][0, 5] = 3e38  # finite bf16 values whose logits overflow fp32 to ±inf
    x["k"][0, 5] = 3e38
    got, exp = run(backend, x), run("reference", x)
    assert not torch.isfinite(exp["lse"]).all()
    for name in ("out", "lse", "dq", "dk", "dv", "drpb"):
        assert_close(got[name], exp[name], tolerance_for(BF16), name)
