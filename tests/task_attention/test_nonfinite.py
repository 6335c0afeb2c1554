"""NaN and ±inf in task-masked attention (docs/design.md#non-finite-values).

The definition: a masked-out (query, key) pair takes no part, forward or backward, whatever its
values; over the attended pairs NaN and ±inf propagate as IEEE arithmetic of the formula does
(a NaN score: NaN row and lse; a +inf score: NaN row, lse = +inf; a −inf score takes no part); a
row left with nothing outputs 0 with lse = −inf. The first tests pin the reference to that; the
last compares every fused backend with it, forward and every gradient, in every dtype.

Layout of every case: one batch row, one head, L = 8, D = Dv = 8, ids [0 0 0 0 1 1 1 -1]: rows
0-3 attend keys 0-3, rows 4-6 keys 4-6, row 7 and key 7 are padding.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_close
from .cases import BF16, FP16, FP32, KERNEL_BACKENDS, fmt, require_backend, to_device
from pyops.testing import tolerance_for

IDS = torch.tensor([0, 0, 0, 0, 1, 1, 1, -1], dtype=torch.int32)
NAN, INF = float("nan"), float("inf")


def _inputs(dtype=FP32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(1, 1, 8, 8, generator=gen).to(dtype) for _ in range(4))
    return dict(q=q, k=k, v=v, dout=dout)


def _set(x, name, row, col, value):
    x[name][0, 0, row, col] = value
    return x


# name: how the clean inputs are spoiled. Rows named in the comments are the ones that change.
CASES = {
    "nan-q-row1": lambda x: _set(x, "q", 1, 3, NAN),             # row 1 NaN
    "nan-k-key5": lambda x: _set(x, "k", 5, 0, NAN),             # rows 4-6 NaN
    "nan-v-key2": lambda x: _set(x, "v", 2, 4, NAN),             # rows 0-3 NaN in column 4 ... all columns
    "posinf-score-row2": lambda x: _set(_set(x, "q", 2, 0, 1e30), "k", 1, 0, 1e30),  # score +inf
    "neginf-k-key0": lambda x: _set(x, "k", 0, 0, -INF),         # key 0 leaves rows 0-3 where q[:, 0] > 0
    "inf-v-key6": lambda x: _set(x, "v", 6, 1, INF),             # rows 4-6 column 1 +inf
    "nan-padding-key7": lambda x: _set(_set(x, "k", 7, 2, NAN), "v", 7, 2, NAN),      # nothing changes
    "nan-padding-row7": lambda x: _set(x, "q", 7, 5, NAN),       # nothing changes (row 7 stays 0)
    "garbage-padding": lambda x: _set(_set(_set(x, "q", 7, 0, INF), "k", 7, 1, -INF), "v", 7, 3, NAN),
}


def run(backend, x, **kw):
    q, k, v = (x[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
    out, lse = pyops.task_masked_attention(q, k, v, IDS, return_lse=True, backend=backend, **kw)
    out.backward(x["dout"])
    return {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def test_reference_nan_query_gives_nan_row_and_lse():
    got = run("reference", CASES["nan-q-row1"](_inputs()))
    assert torch.isnan(got["out"][0, 0, 1]).all() and torch.isnan(got["lse"][0, 0, 1])
    assert torch.isfinite(got["out"][0, 0, [0, 2, 3, 4, 5, 6]]).all()


def test_reference_posinf_score_gives_posinf_lse_and_nan_row():
    x = CASES["posinf-score-row2"](_inputs())
    got = run("reference", x, scale=1.0)
    assert got["lse"][0, 0, 2] == INF and torch.isnan(got["out"][0, 0, 2]).all()


def test_reference_neginf_score_takes_no_part():
    x = _inputs()
    x["q"][0, 0, :4, 0] = x["q"][0, 0, :4, 0].abs() + 0.1  # q[:, 0] > 0, so k[0, 0] = -inf gives -inf scores
    spoiled = CASES["neginf-k-key0"]({n: t.clone() for n, t in x.items()})
    got = run("reference", spoiled)["out"][0, 0, :4]
    ids = IDS.clone()
    ids_k = ids.clone()
    ids_k[0] = -1  # key 0 masked out instead
    exp = pyops.task_masked_attention(x["q"], x["k"], x["v"], ids, ids_k, backend="reference")[0, 0, :4]
    assert_close(got, exp, tolerance_for(FP32))


def test_reference_row_whose_scores_are_all_neginf_is_empty():
    x = _inputs()
    x["q"][0, 0, 4] = 1.0
    x["k"][0, 0, 4:7] = -INF
    got = run("reference", x)
    assert (got["out"][0, 0, 4] == 0).all() and got["lse"][0, 0, 4] == -INF


@pytest.mark.parametrize("case", ["nan-padding-key7", "nan-padding-row7", "garbage-padding"])
def test_reference_values_of_unattended_pairs_change_nothing(case):
    clean = run("reference", _inputs())
    got = run("reference", CASES[case](_inputs()))
    for name in ("out", "lse", "dq", "dk", "dv"):
        keep = (slice(None), slice(None), slice(0, 7))  # row / key 7 is the spoiled padding one
        assert_close(got[name][keep], clean[name][keep], tolerance_for(FP32), name)
    assert (got["out"][0, 0, 7] == 0).all() and got["lse"][0, 0, 7] == -INF


def test_reference_nan_value_reaches_only_rows_that_attend_it():
    got = run("reference", CASES["nan-v-key2"](_inputs()))
    assert torch.isnan(got["out"][0, 0, :4, 4]).all()
    assert torch.isfinite(got["out"][0, 0, 4:7]).all()


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=fmt)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_matches_reference_on_nonfinite_inputs(backend, case, dtype):
    dev = require_backend(backend, dtype)
    x = to_device(CASES[case](_inputs(dtype)), dev)
    scale = 1.0 if case.startswith("posinf") else None
    got, exp = run(backend, x, scale=scale), run("reference", x, scale=scale)
    tol = tolerance_for(dtype)
    for name in ("out", "dq", "dk", "dv"):
        assert_close(got[name], exp[name], tol, name)
    assert_close(got["lse"], exp["lse"], tolerance_for(FP32) if dtype == FP32 else tol, "lse")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_matches_reference_when_finite_bf16_scores_overflow(backend):
    dev = require_backend(backend, BF16)
    x = to_device(_inputs(BF16), dev)
    x["q"][0, 0, 3] = 3e38  # finite bf16 values whose scores overflow fp32 to ±inf
    x["k"][0, 0, 2] = 3e38
    got, exp = run(backend, x), run("reference", x)
    assert not torch.isfinite(exp["lse"]).all()
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert_close(got[name], exp[name], tolerance_for(BF16), name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_inputs_are_not_modified_on_the_nonfinite_path(backend):
    dev = require_backend(backend, FP32)
    x = to_device(CASES["nan-k-key5"](_inputs()), dev)
    before = {n: t.clone() for n, t in x.items()}
    run(backend, x)
    for n in x:
        assert torch.equal(x[n].nan_to_num(), before[n].nan_to_num()), n
