"""sce and arcee_fusion on the C++ CPU kernels (csrc/merging/fusion.cpp, `pyops::{sce,arcee_fusion}_cpu`)
against the reference (pyops/merging/reference.py, the definition; mergekit 0.1.5's
mergekit/merge_methods/{sce,arcee_fusion}.py): dtypes, shapes, the top-k selection (its ties and
torch's fp32 k), non-finite inputs, thread-count invariance, opcheck, torch.compile and the
bindings' argument checks.

sce: the kernels compute the variances as the reference does to the fp32 bit (mean and squared
deviations in double) and select the same elements; the weights' sums run in another order, so the
outputs are compared at the output dtype's tolerance.

arcee_fusion: the KL of each row is a sum of signed terms, which two fp32 evaluations (torch's
vectorised exp / sum, the kernels' expf / double sum) give a few fp32 ulps apart *absolutely*; an
importance within that distance of the threshold may be kept by one and dropped by the other. The
tests bound the distance from the inputs (`_kl_bound`), check the kernels' threshold within it,
require the reference's mask wherever the importance is farther from the threshold than the bound,
and only "one of the two values" in that band (which the data keeps to a few elements)."""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from _support import assert_bitwise_equal, assert_close, assert_close_dtype, fmt_dtype, require_backend
from pyops import BackendUnavailableError, _native
from pyops.merging import interpolate as I
from pyops.merging import reference as ref
from pyops.testing import tolerance_for
from .cases import BF16, DTYPES, FP16, FP32, FP64, shape_id
from .cases import fresh_dynamo  # noqa: F401 (a fixture)

EPS32 = torch.finfo(FP32).eps


@pytest.fixture(autouse=True)
def _cpu():
    require_backend("cpu")


def task_models(gen, shape, n, dtype=FP32, scale=1.0):
    base = torch.randn(shape, generator=gen)
    models = [base + scale * torch.randn(shape, generator=gen) for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def _threads(n):
    class _Set:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)
    return _Set()


# ------------------------------------------------------------------------------------------------
# sce
# ------------------------------------------------------------------------------------------------

SCE_SHAPES = [(1,), (7,), (3, 17), (5, 1, 9), (3, 70001)]


@pytest.mark.parametrize("select_topk", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SCE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
def test_sce_matches_reference(dtype, shape, n, select_topk, rng):
    base, models = task_models(rng, shape, n, dtype)
    got = I.sce(base, models, select_topk=select_topk, backend="cpu")
    want = I.sce(base, models, select_topk=select_topk, backend="reference")
    assert_close_dtype(got, want, f"sce {list(shape)} n={n} topk={select_topk}")


@pytest.mark.parametrize("out_dtype", [FP32, FP16, BF16], ids=fmt_dtype)
def test_sce_rounds_once_to_out_dtype(out_dtype, rng):
    base, models = task_models(rng, (9, 40), 3, BF16)
    got = I.sce(base, models, select_topk=0.5, out_dtype=out_dtype, backend="cpu")
    want = I.sce(base, models, select_topk=0.5, out_dtype=out_dtype, backend="reference")
    assert_close_dtype(got, want)


@pytest.mark.parametrize("select_topk", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("numel", [40, 200003], ids=lambda n: f"numel{n}")
def test_sce_ties_at_the_kth_variance_keep_the_lowest_indices(numel, select_topk, rng):
    """Integer task vectors in {-2..2}: a handful of distinct variances, each shared by many
    elements (across the kernels' work items for the larger size); the kept ties are the
    lowest flat indices, as the reference's stable sort keeps them."""
    base = torch.zeros(numel)
    models = [torch.randint(-2, 3, (numel,), generator=rng).to(FP32) for _ in range(3)]
    got = I.sce(base, models, select_topk=select_topk, backend="cpu")
    want = I.sce(base, models, select_topk=select_topk, backend="reference")
    assert_close(got, want, tolerance_for(FP32))
    # The selection itself: which elements survived (the erase step keeps the majority sign of
    # the kept tau, so kept elements with any nonzero tau are nonzero after the merge).
    var = torch.stack(models).var(dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * select_topk)
    keep = ref.sce_topk_mask(var, k)
    assert bool((got[~keep] == 0).all())


@pytest.mark.parametrize("count,select_topk", [(100, 0.29), (180, 0.65)])
def test_sce_k_is_torch_fp32_product(count, select_topk, rng):
    """int(count_nonzero(var) * select_topk) is an fp32 product in torch: 100 * 0.29 gives 29
    (28 in double), 180 * 0.65 gives 116 (117 in double)."""
    k32 = int(torch.tensor(count) * select_topk)
    assert k32 != int(count * select_topk)
    base = torch.zeros(count)
    models = [base + torch.randn(count, generator=rng) for _ in range(2)]
    got = I.sce(base, models, select_topk=select_topk, backend="cpu")
    assert_close(got, I.sce(base, models, select_topk=select_topk, backend="reference"), tolerance_for(FP32))
    assert int((got != 0).sum()) <= k32 and int((got != 0).sum()) >= k32 - 2  # erased ties: rare


@pytest.mark.parametrize("select_topk", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("where", ["model-nan", "model-inf", "base-ninf"])
def test_sce_non_finite_inputs_match_reference(where, select_topk, rng):
    """An inf / NaN task vector element gives a NaN variance (ranked last) and a NaN weight sum:
    NaN spreads as in the reference (a dropped inf / NaN tau times 0 is NaN)."""
    base, models = task_models(rng, (4, 9), 3)
    if where == "model-nan":
        models[1][2, 3] = float("nan")
    elif where == "model-inf":
        models[0][0, 0] = float("inf")
    else:
        base[3, 8] = float("-inf")
    got = I.sce(base, models, select_topk=select_topk, backend="cpu")
    want = I.sce(base, models, select_topk=select_topk, backend="reference")
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert_close(got, want, tolerance_for(FP32))


def test_sce_zero_task_vectors_take_equal_weights():
    base = torch.ones(4)
    assert torch.equal(I.sce(base, [base.clone(), base.clone()], backend="cpu"), base)


@pytest.mark.parametrize("select_topk", [0.4, 1.0])
def test_sce_same_bits_for_every_thread_count(select_topk, rng):
    base, models = task_models(rng, (3, 140001), 3)
    models[2][0, :1000] = models[1][0, :1000]  # some equal variances
    with _threads(1):
        one = I.sce(base, models, select_topk=select_topk, backend="cpu")
    with _threads(2):
        two = I.sce(base, models, select_topk=select_topk, backend="cpu")
    assert_bitwise_equal(one, two)


@pytest.mark.parametrize("shape", [(0,), (3, 0)], ids=shape_id)
def test_sce_empty(shape):
    x = torch.zeros(shape)
    out = I.sce(x, [x, x], select_topk=0.5, backend="cpu")
    assert out.shape == x.shape and out.dtype == FP32


# ------------------------------------------------------------------------------------------------
# arcee_fusion
# ------------------------------------------------------------------------------------------------

def _kl_bound(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per row, a bound on |KL| differences between two fp32 evaluations of the reference's
    expression: each p, q is within (|v|max + 4) ulps relative (x − max, exp, the sum, the
    reciprocal), so log(p/q) within (|x|max + |b|max + 8) ulps absolute and p·log(p/q) within that
    times p plus |p·log(p/q)| times p's error; summed over the row, doubled for two evaluations
    and again for the sums' rounding."""
    x64, b64 = x.double(), b.double()
    p = torch.softmax(x64, -1) + 1e-8
    q = torch.softmax(b64, -1) + 1e-8
    vmax = torch.maximum(x64.abs().amax(-1, keepdim=True), b64.abs().amax(-1, keepdim=True))
    term = (p * (p / q).log()).abs().sum(-1, keepdim=True)
    if x.shape[-1] == 1:  # p = q = 1 + 1e-8 exactly: KL exactly 0 in any evaluation
        return torch.zeros_like(term)
    return 4 * EPS32 * (2 * vmax + 8) * (1 + term) + 4 * EPS32 * term


def check_arcee(base: torch.Tensor, model: torch.Tensor, out: torch.Tensor, threshold: Optional[float] = None,
                max_band: float = 0.01) -> None:
    """`out` and the kernels' `threshold` (when given) against the reference: the threshold within
    the importance's error bound, the reference's mask wherever the importance is farther than the
    bound from it, one of the two values in that band (at most max_band of the elements)."""
    b, x = base.float(), model.float()
    p = torch.softmax(x, -1) + 1e-8
    q = torch.softmax(b, -1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), -1, keepdim=True)
    d = (x - b).abs()
    imp = d * kl
    flat = torch.sort(imp.reshape(-1)).values
    idx = (torch.tensor([0.25, 0.5, 0.75], dtype=FP32) * (flat.numel() - 1)).long()
    q1, med, q3 = flat[idx]
    thr = float(med + 1.5 * (q3 - q1))
    err = d.double() * _kl_bound(b, x) + 2 * EPS32 * imp.double().abs()  # per element
    big = float(err[torch.isfinite(err)].max()) if bool(torch.isfinite(err).any()) else 0.0
    thr_err = 4 * big + 4 * EPS32 * abs(thr)
    if threshold is None:
        pass
    elif math.isnan(thr):
        assert math.isnan(threshold), f"threshold {threshold}, reference NaN"
    else:
        assert abs(threshold - thr) <= thr_err, f"threshold {threshold} vs reference {thr} (bound {thr_err})"
    kept = (b + (x - b) * 1.0).to(out.dtype)
    dropped = (b + (x - b) * 0.0).to(out.dtype)
    want_mask = imp >= thr
    band = ((imp.double() - thr).abs() <= thr_err + err) & (thr_err + err > 0)
    band &= ~torch.isnan(imp)
    if not math.isnan(thr):
        assert int(band.sum()) <= max(2, max_band * imp.numel()), f"{int(band.sum())} elements near the threshold"
    want = torch.where(want_mask, kept, dropped)
    same = (out == want) | (torch.isnan(out) & torch.isnan(want))
    either = (out == kept) | (out == dropped) | (torch.isnan(out) & torch.isnan(dropped))
    assert bool(torch.where(band, either, same).all()), \
        f"{int((~torch.where(band, either, same)).sum())} elements differ from the reference's mask"


ARCEE_SHAPES = [(1,), (7,), (300,), (9, 1), (33, 65), (4, 3, 50), (3, 70001), (2, 1, 131)]


def _arcee_direct(base, model, out_dtype=None):
    """The kernels' output and threshold through the binding."""
    out = torch.empty(base.shape, dtype=out_dtype or base.dtype)
    from pyops.merging import backend_cpu

    return out, backend_cpu.arcee_fusion_into(out, base, model)


@pytest.mark.parametrize("shape", ARCEE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
def test_arcee_fusion_matches_reference(dtype, shape, rng):
    base, (model,) = task_models(rng, shape, 1, dtype, scale=0.5)
    out, thr = _arcee_direct(base, model)
    check_arcee(base, model, out, thr)
    assert torch.equal(I.arcee_fusion(base, model, backend="cpu"), out)


@pytest.mark.parametrize("out_dtype", [FP32, FP16, BF16], ids=fmt_dtype)
def test_arcee_fusion_rounds_once_to_out_dtype(out_dtype, rng):
    base, (model,) = task_models(rng, (12, 40), 1, BF16, scale=0.5)
    out, thr = _arcee_direct(base, model, out_dtype)
    check_arcee(base, model, out, thr)
    assert torch.equal(I.arcee_fusion(base, model, out_dtype=out_dtype, backend="cpu"), out)


def test_arcee_fusion_row_len_one_keeps_every_change(rng):
    """A one-element softmax is 1 for both: KL 0, every importance 0, threshold 0, all kept."""
    base, (model,) = task_models(rng, (17, 1), 1)
    out, thr = _arcee_direct(base, model)
    assert thr == 0.0 and torch.equal(out, model)


def test_arcee_fusion_mostly_unchanged_takes_every_change():
    base = torch.zeros(2, 8)
    model = base.clone()
    model[0, 3] = 5.0
    model[1] = 1e-3
    assert torch.equal(I.arcee_fusion(base, model, backend="cpu"), model)


def test_arcee_fusion_quartile_indices_are_torch_fp32_products(rng):
    """n − 1 = 2**24 + 3 is not an fp32 value: torch's q·(n − 1) rounds it to 2**24 + 4, so the
    quartile indices are 4194305, 8388610, 12582915 where exact arithmetic floors to one less.
    Identical rows of 20 give 20 importances, each 838861 times (n = 20·838861 = 2**24 + 4):
    those indices are the first of sorted groups 5, 10, 15 and one less the last of groups 4, 9,
    14, so the two choices give different thresholds."""
    row_len, n_rows = 20, 838861
    assert row_len * n_rows == 2**24 + 4
    b_row = torch.randn(row_len, generator=rng)
    x_row = b_row + 0.5 * torch.randn(row_len, generator=rng)
    p = torch.softmax(x_row, -1) + 1e-8
    q = torch.softmax(b_row, -1) + 1e-8
    v = torch.sort((x_row - b_row).abs() * torch.sum(p * torch.log(p / q))).values
    torch_thr = float(v[10] + 1.5 * (v[15] - v[5]))
    exact_thr = float(v[9] + 1.5 * (v[14] - v[4]))
    bound = float(((x_row - b_row).abs().double() * _kl_bound(b_row, x_row)).max()) * 4 + 4 * EPS32 * abs(torch_thr)
    assert abs(torch_thr - exact_thr) > 2 * bound
    out, thr = _arcee_direct(b_row.repeat(n_rows, 1), x_row.repeat(n_rows, 1))
    assert abs(thr - torch_thr) <= bound, (thr, torch_thr, exact_thr)
    imp = (x_row - b_row).abs() * torch.sum(p * torch.log(p / q))
    clear = (imp.double() - torch_thr).abs() > bound
    assert torch.equal(out[-1][clear], torch.where(imp >= torch_thr, x_row, b_row)[clear])


@pytest.mark.parametrize("where", ["model-nan-row", "base-inf", "most-rows-nan"])
def test_arcee_fusion_non_finite_inputs_match_reference(where, rng):
    """A NaN / inf in a row makes its softmax, KL and importances NaN (never kept: a NaN change
    times 0 stays NaN); when NaNs reach the quartiles the threshold is NaN and nothing is kept."""
    base, (model,) = task_models(rng, (16, 12), 1, scale=0.5)
    if where == "model-nan-row":
        model[3, 4] = float("nan")
    elif where == "base-inf":
        base[5, 0] = float("inf")
    else:
        model[:12, 0] = float("nan")
    out, thr = _arcee_direct(base, model)
    check_arcee(base, model, out, thr)
    want = I.arcee_fusion(base, model, backend="reference")
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    if where == "most-rows-nan":
        assert math.isnan(thr) and torch.equal(out[12:], base[12:])


def test_arcee_fusion_same_bits_for_every_thread_count(rng):
    base, (model,) = task_models(rng, (300, 1000), 1, scale=0.5)
    with _threads(1):
        one = _arcee_direct(base, model)
    with _threads(2):
        two = _arcee_direct(base, model)
    assert one[1] == two[1]
    assert_bitwise_equal(one[0], two[0])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5)], ids=shape_id)
def test_arcee_fusion_empty_gives_empty(shape, backend):
    x = torch.zeros(shape)
    out = I.arcee_fusion(x, x, out_dtype=BF16, backend=backend)
    assert out.shape == x.shape and out.dtype == BF16


# ------------------------------------------------------------------------------------------------
# Backend choice, op registration, compile
# ------------------------------------------------------------------------------------------------

CALLS = {"sce": lambda b, m, be: I.sce(b, [m, m * 2], select_topk=0.5, backend=be),
         "arcee_fusion": lambda b, m, be: I.arcee_fusion(b, m, backend=be)}


@pytest.mark.parametrize("method", list(CALLS))
def test_auto_runs_fp32_on_the_kernels(method, rng):
    from pyops import last_choice

    base, (model,) = task_models(rng, (4, 6), 1)
    CALLS[method](base, model, "auto")
    assert last_choice(method).backend == "cpu"


@pytest.mark.parametrize("method", list(CALLS))
def test_gradients_go_to_the_reference(method, rng):
    from pyops import last_choice

    base, (model,) = task_models(rng, (4, 6), 1)
    model.requires_grad_()
    CALLS[method](base, model, "auto").sum().backward()
    choice = last_choice(method)
    assert choice.backend == "reference" and "forward only" in choice.passed_over["cpu"]
    assert model.grad is not None and bool(torch.isfinite(model.grad).all())


@pytest.mark.parametrize("method", list(CALLS))
def test_fp64_is_refused_by_the_kernels(method, rng):
    base, (model,) = task_models(rng, (4, 6), 1, FP64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        CALLS[method](base, model, "cpu")


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("util", OPCHECK_UTILS)
@pytest.mark.parametrize("name", ["sce_cpu", "arcee_fusion_cpu"])
def test_opcheck(name, util, rng):
    base, models = task_models(rng, (3, 5), 2)
    args = (base, models, 0.5, BF16) if name == "sce_cpu" else (base, models[0], FP32)
    torch.library.opcheck(getattr(torch.ops.pyops, name).default, args, test_utils=util)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compiler, rng, fresh_dynamo):
    base, models = task_models(rng, (4, 9), 2)

    def f(b, m0, m1):
        return I.sce(b, [m0, m1], select_topk=0.4, backend="cpu"), I.arcee_fusion(b, m0, backend="cpu")

    eager = f(base, *models)
    compiled = torch.compile(f, fullgraph=True, backend=compiler)(base, *models)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


# ------------------------------------------------------------------------------------------------
# The bindings' argument checks
# ------------------------------------------------------------------------------------------------

def _sce_args(x, dst, **over):
    args = dict(out=dst.data_ptr(), out_dtype=0, base=x.data_ptr(), inputs=[x.data_ptr(), x.data_ptr()], in_dtype=0,
                numel=x.numel(), select_topk=0.5, n_threads=1)
    args.update(over)
    return args


def _arcee_args(x, dst, **over):
    args = dict(out=dst.data_ptr(), out_dtype=0, base=x.data_ptr(), model=x.data_ptr(), in_dtype=0, n_rows=2,
                row_len=3, n_threads=1)
    args.update(over)
    return args


BAD_BINDING = [
    ("sce-out_dtype", "sce", {"out_dtype": 7}, "out_dtype"),
    ("sce-in_dtype", "sce", {"in_dtype": -1}, "in_dtype"),
    ("sce-no-inputs", "sce", {"inputs": []}, "inputs"),
    ("sce-null-input", "sce", {"inputs": [1, 0]}, r"inputs\[1\]"),
    ("sce-numel", "sce", {"numel": -1}, "numel"),
    ("sce-threads", "sce", {"n_threads": 0}, "n_threads"),
    ("sce-null-out", "sce", {"out": 0}, "out"),
    ("sce-null-base", "sce", {"base": 0}, "base"),
    ("arcee-out_dtype", "arcee", {"out_dtype": 3}, "out_dtype"),
    ("arcee-in_dtype", "arcee", {"in_dtype": 5}, "in_dtype"),
    ("arcee-n_rows", "arcee", {"n_rows": -2}, "n_rows"),
    ("arcee-row_len", "arcee", {"row_len": -1}, "row_len"),
    ("arcee-threads", "arcee", {"n_threads": -1}, "n_threads"),
    ("arcee-null-out", "arcee", {"out": 0}, "out"),
    ("arcee-null-model", "arcee", {"model": 0}, "model"),
    ("arcee-overflow", "arcee", {"n_rows": 2**62, "row_len": 8}, "overflows"),
]


@pytest.mark.parametrize("case", BAD_BINDING, ids=[c[0] for c in BAD_BINDING])
def test_bindings_reject_bad_arguments(case):
    _, which, over, match = case
    x = torch.ones(2, 3)
    out = torch.empty(2, 3)
    with pytest.raises(ValueError, match=match):
        if which == "sce":
            _native.cpu_module.sce_forward(**_sce_args(x, out, **over))
        else:
            _native.cpu_module.arcee_fusion_forward(**_arcee_args(x, out, **over))
    assert torch.equal(x, torch.ones(2, 3))
