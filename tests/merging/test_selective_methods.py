"""mergekit 0.1.5's selective methods as ops (pyops.merging.interpolate: ram, ramplus_tl, sce,
arcee_fusion — C++ and reference; sce and arcee_fusion's C++ kernels in test_fusion_cpu.py): the
reference against independent formulations written here, fp32 arithmetic with one rounding, the
C++ kernels against the reference, gradients, bad input, opcheck / torch.compile and
`merge_tensors`. Parity with mergekit's own functions:
test_interpolate_mergekit.py."""
from __future__ import annotations

import pytest
import torch

from _support import assert_bitwise_equal, assert_close, assert_close_dtype, fmt_dtype, require_backend
from pyops import BackendUnavailableError
from pyops.merging import interpolate as I
from pyops.testing import tolerance_for
from .cases import BF16, DTYPES, FP16, FP32, FP64, shape_id
from .cases import fresh_dynamo  # noqa: F401 (a fixture)


def sparse_models(gen, shape=(6, 10), n=3, keep=0.5, dtype=FP32):
    base = torch.randn(shape, generator=gen)
    models = [base + torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < keep)
              for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def test_ram_is_the_mean_of_the_contributors(rng):
    base, models = sparse_models(rng)
    taus = [m.double() - base.double() for m in models]
    contrib = [t.abs() > 1e-5 for t in taus]
    count = sum(c.double() for c in contrib)
    mean = sum(t * c for t, c in zip(taus, contrib)) / count.clamp(min=1)
    assert_close(I.ram(base, models).double(), base.double() + mean, tolerance_for(FP32))


def test_ram_one_contributor_is_taken_whole():
    base = torch.zeros(3)
    models = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 4.0])]
    assert I.ram(base, models).tolist() == [1.0, 0.0, 3.0]


def test_ram_without_models_returns_base(rng):
    base, _ = sparse_models(rng)
    assert torch.equal(I.ram(base, []), base)


def test_ramplus_tl_scales_unique_entries(rng):
    base, models = sparse_models(rng)
    r, alpha = 0.5, 0.3
    taus = [m.double() - base.double() for m in models]
    nz = [t.abs() > 1e-5 for t in taus]
    count = sum(c.long() for c in nz)
    out = base.double().clone()
    for t, c in zip(taus, nz):
        shared, unique = int((c & (count > 1)).sum()), int((c & (count == 1)).sum())
        lam = 1 + r * min(max(shared / max(unique, 1e-5), 0.0), alpha)
        out = out + torch.where(c & (count == 1), lam * t, torch.where(c & (count > 1), t / count, 0 * t))
    assert_close(I.ramplus_tl(base, models, r=r, alpha=alpha).double(), out, tolerance_for(FP32))


def test_ramplus_tl_with_r_zero_is_ram(rng):
    base, models = sparse_models(rng)
    assert_close_dtype(I.ramplus_tl(base, models, r=0.0), I.ram(base, models))


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce_select_calculate_erase(select_topk, rng):
    base = torch.randn(5, 8, generator=rng, dtype=FP64)
    models = [base + torch.randn(5, 8, generator=rng, dtype=FP64) for _ in range(3)]
    taus = torch.stack([m - base for m in models])
    if select_topk < 1:
        var = taus.var(dim=0, unbiased=False).flatten()
        k = int(int((var != 0).sum()) * select_topk)
        keep = torch.zeros(40, dtype=torch.bool)
        keep[sorted(range(40), key=lambda j: (-float(var[j]), j))[:k]] = True
        taus = taus * keep.view(5, 8)
    w = taus.square().mean(dim=(1, 2))
    w = w / w.sum()
    s = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    e = (torch.sign(taus) == s).double() * w.view(3, 1, 1)
    expect = base + (taus * e).sum(0) / e.sum(0).clamp(min=1e-6)
    assert_close(I.sce(base, models, select_topk=select_topk), expect, tolerance_for(FP64))


def test_sce_zero_task_vectors_take_equal_weights():
    base = torch.ones(4)
    assert torch.equal(I.sce(base, [base.clone(), base.clone()]), base)


def test_arcee_fusion_takes_the_outliers(rng):
    base = torch.randn(8, 16, generator=rng)
    model = base + 0.01 * torch.randn(8, 16, generator=rng)
    model[2, 5] += 4.0   # one large change: its row's KL and its |Δ| make it the outlier
    out = I.arcee_fusion(base, model)
    assert out[2, 5] == model[2, 5]
    assert int((out != base).sum()) < out.numel() // 4  # the upper outliers only


def test_arcee_fusion_mostly_unchanged_takes_every_change():
    """With most importances 0 the quartiles are 0, the threshold 0, and every entry passes."""
    base = torch.zeros(2, 8)
    model = base.clone()
    model[0, 3] = 5.0
    model[1] = 1e-3
    assert torch.equal(I.arcee_fusion(base, model), model)


def test_arcee_fusion_threshold_is_median_plus_iqr(rng):
    base = torch.randn(16, 9, generator=rng, dtype=FP64)
    model = base + torch.randn(16, 9, generator=rng, dtype=FP64) * 0.5
    p = torch.softmax(model, -1) + 1e-8
    q = torch.softmax(base, -1) + 1e-8
    imp = (model - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    srt = imp.flatten().sort().values
    q1, med, q3 = (srt[int(f * (imp.numel() - 1))] for f in (0.25, 0.5, 0.75))
    expect = base + (model - base) * (imp >= med + 1.5 * (q3 - q1))
    assert_close(I.arcee_fusion(base, model), expect, tolerance_for(FP64))


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=fmt_dtype)
@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "sce", "arcee_fusion"])
def test_half_inputs_compute_in_fp32_and_round_once(method, dtype, rng):
    base, models = sparse_models(rng, dtype=dtype)
    fn = {"ram": lambda b, ms: I.ram(b, ms), "ramplus_tl": lambda b, ms: I.ramplus_tl(b, ms),
          "sce": lambda b, ms: I.sce(b, ms, select_topk=0.5), "arcee_fusion": lambda b, ms: I.arcee_fusion(b, ms[0])}
    got = fn[method](base, models)
    want = fn[method](base.float(), [m.float() for m in models]).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "sce", "arcee_fusion"])
def test_gradcheck_fp64(method, rng):
    base = torch.randn(3, 5, generator=rng, dtype=FP64).requires_grad_()
    models = [(base.detach() + torch.randn(3, 5, generator=rng, dtype=FP64)).requires_grad_() for _ in range(2)]
    fn = {"ram": lambda b, *ms: I.ram(b, list(ms)), "ramplus_tl": lambda b, *ms: I.ramplus_tl(b, list(ms)),
          "sce": lambda b, *ms: I.sce(b, list(ms), select_topk=0.6),
          "arcee_fusion": lambda b, *ms: I.arcee_fusion(b, ms[0])}[method]
    assert torch.autograd.gradcheck(fn, (base, *models))


@pytest.mark.parametrize("case", ["fp64", "grad"])
@pytest.mark.parametrize("method", ["sce", "arcee_fusion"])
def test_cpu_backend_refuses_fp64_and_gradients(method, case):
    """sce and arcee_fusion have C++ kernels (tests/merging/test_fusion_cpu.py), forward only, fp32 /
    fp16 / bf16: fp64 and calls that need gradients are the reference's."""
    require_backend("cpu")
    x = torch.ones(2, 3, dtype=FP64 if case == "fp64" else FP32, requires_grad=case == "grad")
    fn = {"sce": lambda: I.sce(x, [x], backend="cpu"), "arcee_fusion": lambda: I.arcee_fusion(x, x, backend="cpu")}
    with pytest.raises(BackendUnavailableError, match="float64" if case == "fp64" else "reference"):
        fn[method]()


# ------------------------------------------------------------------------------------------------
# ram / ramplus_tl on the C++ kernels: the reference's bits
# ------------------------------------------------------------------------------------------------

RAM_CALLS = {"ram": lambda b, ms, be: I.ram(b, ms, backend=be),
             "ram-eps": lambda b, ms, be: I.ram(b, ms, epsilon=0.3, backend=be),
             "ramplus_tl": lambda b, ms, be: I.ramplus_tl(b, ms, backend=be),
             "ramplus_tl-params": lambda b, ms, be: I.ramplus_tl(b, ms, r=0.7, alpha=1.5, epsilon=0.1, backend=be)}
RAM_SHAPES = [(), (1,), (7,), (3, 17), (5, 1, 9), (3, 70001)]


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("shape", RAM_SHAPES, ids=shape_id)
@pytest.mark.parametrize("call", list(RAM_CALLS))
def test_cpu_ram_matches_reference_bitwise(call, shape, dtype, n, rng):
    require_backend("cpu")
    base, models = sparse_models(rng, shape=shape, n=n, dtype=dtype)
    assert_bitwise_equal(RAM_CALLS[call](base, models, "cpu"), RAM_CALLS[call](base, models, "reference"))


@pytest.mark.parametrize("out_dtype", [FP32, BF16, FP16], ids=fmt_dtype)
@pytest.mark.parametrize("call", ["ram", "ramplus_tl"])
def test_cpu_ram_rounds_once_to_out_dtype(call, out_dtype, rng):
    require_backend("cpu")
    base, models = sparse_models(rng, shape=(9, 40), dtype=BF16)
    fn = I.ram if call == "ram" else I.ramplus_tl
    assert_bitwise_equal(fn(base, models, out_dtype=out_dtype, backend="cpu"),
                         fn(base, models, out_dtype=out_dtype, backend="reference"))


@pytest.mark.parametrize("special", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("call", list(RAM_CALLS))
def test_cpu_ram_non_finite_inputs_match_reference(call, special, rng):
    require_backend("cpu")
    base, models = sparse_models(rng, shape=(4, 9))
    models[0][1, 2] = float(special)
    base[3, 3] = float(special)
    assert_close(RAM_CALLS[call](base, models, "cpu"), RAM_CALLS[call](base, models, "reference"),
                 tolerance_for(FP32))


@pytest.mark.parametrize("call", list(RAM_CALLS))
def test_cpu_ram_same_bits_for_every_thread_count(call, rng):
    require_backend("cpu")
    base, models = sparse_models(rng, shape=(2, 140000))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = RAM_CALLS[call](base, models, "cpu")
        torch.set_num_threads(max(2, threads))
        many = RAM_CALLS[call](base, models, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert_bitwise_equal(one, many)


def test_ram_gradients_go_to_the_reference(rng):
    from pyops import last_choice

    base, models = sparse_models(rng)
    base.requires_grad_()
    I.ram(base, models).sum().backward()
    choice = last_choice("ram")
    assert choice.backend == "reference" and "forward only" in choice.passed_over["cpu"]
    assert base.grad is not None and bool(torch.isfinite(base.grad).all())


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("util", OPCHECK_UTILS)
@pytest.mark.parametrize("name", ["ram_cpu", "ramplus_tl_cpu"])
def test_opcheck(name, util, rng):
    require_backend("cpu")
    base, models = sparse_models(rng, shape=(3, 5))
    args = (base, models, 1e-5, BF16) if name == "ram_cpu" else (base, models, 0.1, 0.2, 1e-5, FP32)
    torch.library.opcheck(getattr(torch.ops.pyops, name).default, args, test_utils=util)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compiler, rng, fresh_dynamo):
    require_backend("cpu")
    base, models = sparse_models(rng, shape=(4, 9))

    def f(b, m0, m1):
        return I.ram(b, [m0, m1], backend="cpu"), I.ramplus_tl(b, [m0, m1], r=0.3, backend="cpu")

    eager = f(base, *models[:2])
    compiled = torch.compile(f, fullgraph=True, backend=compiler)(base, *models[:2])
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


BAD = [
    ("ram-models", lambda x: I.ram(x, x), TypeError, "models"),
    ("ram-shape", lambda x: I.ram(x, [x[0]]), ValueError, r"models\[0\]"),
    ("ram-epsilon", lambda x: I.ram(x, [x], epsilon=-1.0), ValueError, "epsilon"),
    ("ramplus-r", lambda x: I.ramplus_tl(x, [x], r="a"), TypeError, "r"),
    ("sce-select", lambda x: I.sce(x, [x], select_topk=None), TypeError, "select_topk"),
    ("arcee-0d", lambda x: I.arcee_fusion(x[0, 0], x[0, 0]), ValueError, "base"),
    ("arcee-dtype", lambda x: I.arcee_fusion(x, x.double()), ValueError, r"models\[0\]"),
    ("merge_tensors-arcee-two", lambda x: I.merge_tensors("arcee_fusion", x, [x, x], {}), ValueError, "models"),
    ("merge_tensors-ram-base", lambda x: I.merge_tensors("ram", None, [x], {}), ValueError, "base"),
    ("merge_tensors-sce-param", lambda x: I.merge_tensors("sce", x, [x], {"density": 0.5}), ValueError,
     "unknown parameter"),
]


@pytest.mark.parametrize("name,fn,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn(torch.ones(2, 3))


@pytest.mark.parametrize("method,params", [("ram", {}), ("ramplus_tl", {"r": 0.3}), ("sce", {"select_topk": 0.5}),
                                           ("arcee_fusion", {})])
def test_merge_tensors_matches_the_op(method, params, rng):
    base, models = sparse_models(rng)
    models = models[:1] if method == "arcee_fusion" else models
    want = {"ram": lambda: I.ram(base, models), "ramplus_tl": lambda: I.ramplus_tl(base, models, r=0.3),
            "sce": lambda: I.sce(base, models, select_topk=0.5),
            "arcee_fusion": lambda: I.arcee_fusion(base, models[0])}[method]()
    assert torch.equal(I.merge_tensors(method, base, models, params), want)
