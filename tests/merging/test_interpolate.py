"""mergekit 0.1.5's interpolating methods as ops (pyops.merging.interpolate): the reference
against independent formulations written here, the C++ kernels against the reference (odd
shapes, fp32 / bf16 / fp16, non-finite inputs), gradients (gradcheck on the fp64 reference), bad
input, opcheck of the registered ops, torch.compile(fullgraph=True), and `merge_tensors`.
Parity with mergekit's own code: test_interpolate_mergekit.py."""
from __future__ import annotations

import math

import pytest
import torch

from _support import assert_close, assert_close_dtype, fmt_dtype, randn, require_backend
from pyops.merging import backend_cpu
from pyops.merging import interpolate as I
from pyops.merging import reference as ref
from pyops.merging import spec
from pyops.testing import tolerance_for
from .cases import BF16, DTYPES, FP16, FP32, FP64, shape_id
from .cases import fresh_dynamo  # noqa: F401 (a fixture)

SHAPES = [(), (1,), (7,), (3, 17), (5, 1, 9), (64, 33)]


def rand(shape, dtype, gen, n=1, scale=1.0):
    return [randn(shape, dtype, gen, scale=scale) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# The reference against independent formulations (fp64, written from the papers' formulas)
# ------------------------------------------------------------------------------------------------

def slerp64(a, b, t, thr=0.9995, eps=1e-8):
    """Shoemake's slerp with mergekit's guards, on whole flattened fp64 vectors."""
    x, y = a.double().flatten(), b.double().flatten()
    na, nb = x.norm().item(), y.norm().item()
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    c = max(-1.0, min(1.0, (x @ y).item() / (na * nb)))
    if abs(c) > thr:
        return ((1 - t) * x + t * y).view(a.shape)
    th = math.acos(c)
    return ((math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)).view(a.shape)


def test_reference_linear_is_the_weighted_mean(rng):
    xs = rand((4, 6), FP32, rng, 3)
    w = [0.5, 2.0, -0.25]
    expect = sum(wi * x.double() for wi, x in zip(w, xs)) / sum(w)
    assert_close(ref.linear(xs, w).double(), expect, tolerance_for(FP32), "normalized")
    assert_close(ref.linear(xs, w, normalize=False).double(), sum(wi * x.double() for wi, x in zip(w, xs)),
                 tolerance_for(FP32), "unnormalized")


def test_reference_linear_zero_weight_sum_divides_by_zero_as_mergekit(rng):
    x, y = rand((9,), FP32, rng, 2)
    out = ref.linear([x, y], [1.0, -1.0])
    num = x - y
    assert torch.equal(torch.isinf(out), num != 0) and bool((torch.sign(out) == torch.sign(num))[num != 0].all())


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_reference_slerp_matches_the_angle_formula(t, rng):
    a, b = rand((5, 7), FP32, rng, 2)
    assert_close(ref.slerp(a, b, t).double(), slerp64(a, b, t), tolerance_for(FP32))


def test_reference_slerp_ends_are_the_inputs(rng):
    a, b = rand((3, 4), FP32, rng, 2)
    assert_close_dtype(ref.slerp(a, b, 0.0), a, "t=0 is a (the base)")
    assert_close_dtype(ref.slerp(a, b, 1.0), b, "t=1 is b")


@pytest.mark.parametrize("case", ["colinear", "antipodal", "zero"])
def test_reference_slerp_falls_back_to_lerp(case, rng):
    (a,) = rand((11,), FP32, rng)
    b = {"colinear": 3 * a, "antipodal": -2 * a, "zero": torch.zeros_like(a)}[case]
    if case == "zero":  # ‖b‖ ≤ eps counts as 1: d = 0, a quarter turn with b = 0
        th = math.pi / 2
        expect = math.sin(0.7 * th) / math.sin(th) * a.double()
    else:
        expect = 0.7 * a.double() + 0.3 * b.double()
    assert_close(ref.slerp(a, b, 0.3).double(), expect, tolerance_for(FP32))


def test_reference_nearswap_per_element():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    model = torch.tensor([0.1, 1.0, 0.0, 5.0])
    # |Δ| = 0.1 ≤ t: take the model; |Δ| = 1: w = 0.5; equal: w = 1 (clamped); |Δ| = 4: w = 1/8
    expect = torch.tensor([0.1, 0.5, 0.0, 1.0 + 4.0 / 8])
    assert_close_dtype(ref.nearswap(base, model, 0.5), expect)


def test_reference_passthrough_scales(rng):
    (x,) = rand((3, 5), BF16, rng)
    assert torch.equal(ref.passthrough(x), x)
    assert torch.equal(ref.passthrough(x, 0.5), (x.float() * 0.5).to(BF16))


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)],
                         ids=["flatten", "rows", "row_wise"])
@pytest.mark.parametrize("with_base", [False, True], ids=["nobase", "base"])
def test_reference_nuslerp_is_slerp_per_vector(flatten, row_wise, with_base, rng):
    a, b, base = rand((4, 6), FP32, rng, 3)
    w = [1.0, 3.0]
    t = 0.75
    v0, v1 = (a - base, b - base) if with_base else (a, b)
    if flatten:
        expect = slerp64(v0, v1, t, thr=2.0)
    elif row_wise:  # vectors along dim 0: the columns
        expect = torch.stack([slerp64(v0[:, j], v1[:, j], t, thr=2.0) for j in range(6)], dim=1)
    else:
        expect = torch.stack([slerp64(v0[i], v1[i], t, thr=2.0) for i in range(4)])
    if with_base:
        expect = expect + base.double()
    out = ref.nuslerp(a, b, w, base=base if with_base else None, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    assert_close(out.double(), expect, tolerance_for(FP32))


def test_reference_nuslerp_weight_sum_zero_takes_the_midpoint(rng):
    a, b = rand((8,), FP32, rng, 2)
    assert_close_dtype(ref.nuslerp(a, b, [1.0, -1.0]), ref.nuslerp(a, b, [1.0, 1.0]))


def multislerp64(xs, w, base=None, normalize=True, eps=1e-8):
    """Buss & Fillmore's tangent-space barycentre, one step from the Euclidean mean (mergekit's)."""
    v = [(x.double() - (base.double() if base is not None else 0)).flatten() for x in xs]
    w = torch.tensor(w, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    norms = [x.norm() for x in v]
    u = [x / (n + eps) for x, n in zip(v, norms)]
    m = sum(wi * ui for wi, ui in zip(w, u))
    m = m / m.norm()
    log = sum(wi * (ui - (ui @ m) * m) for wi, ui in zip(w, u))
    r = log.norm() + eps
    out = (m * math.cos(r) + log * math.sin(r) / r) * sum(wi * n for wi, n in zip(w, norms))
    out = out.view(xs[0].shape)
    return out + base.double() if base is not None else out


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("with_base", [False, True], ids=["nobase", "base"])
def test_reference_multislerp_matches_the_tangent_formula(n, with_base, rng):
    xs = rand((6, 5), FP32, rng, n)
    (base,) = rand((6, 5), FP32, rng)
    w = [0.5 + i for i in range(n)]
    out = ref.multislerp(xs, w, base=base if with_base else None)
    assert_close(out.double(), multislerp64(xs, w, base if with_base else None), tolerance_for(FP32))


def test_reference_multislerp_one_model_is_returned_unchanged(rng):
    x, base = rand((4,), FP32, rng, 2)
    assert torch.equal(ref.multislerp([x], [3.0], base=base), x)


def test_reference_multislerp_cancelling_pair_is_linear(rng):
    (x,) = rand((7,), FP32, rng)
    assert_close_dtype(ref.multislerp([x, -x], [1.0, 1.0]), 0.5 * x + 0.5 * -x)


def test_reference_multislerp_cancelling_triple_is_an_error(rng):
    (x,) = rand((7,), FP32, rng)
    with pytest.raises(ValueError, match="models"):
        ref.multislerp([x, -x, x - x], [1.0, 1.0, 1.0])


def karcher64(xs, max_iter=50):
    """Riemannian gradient descent on the sphere with log / exp maps, fp64 (equal weights)."""
    v = [x.double().flatten() for x in xs]
    norms = [x.norm() for x in v]
    u = [x / n for x, n in zip(v, norms)]
    m = sum(u) / len(u)
    m = m / m.norm()
    for _ in range(max_iter):
        logs = []
        for ui in u:
            th = torch.arccos((m @ ui).clamp(-1, 1))
            logs.append(th / torch.sin(th) * (ui - torch.cos(th) * m) if th > 1e-12 else torch.zeros_like(m))
        g = sum(logs) / len(u)
        gn = g.norm()
        if gn < 1e-14:
            break
        m = torch.cos(gn) * m + torch.sin(gn) * g / gn
        m = m / m.norm()
    return (sum(norms) / len(norms) * m).view(xs[0].shape)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_reference_karcher_is_the_spherical_mean(n, rng):
    xs = rand((5, 6), FP32, rng, n)
    out = ref.karcher(xs, max_iter=100, tol=1e-7)
    assert_close(out.double(), karcher64(xs), tolerance_for(FP32))


def test_reference_karcher_all_zero_inputs_give_zeros():
    z = torch.zeros(3, 4)
    assert torch.equal(ref.karcher([z, z]), z)


def test_reference_karcher_two_inputs_is_the_slerp_midpoint_scaled(rng):
    a, b = rand((10,), FP32, rng, 2)
    ua, ub = a.double() / a.double().norm(), b.double() / b.double().norm()
    mid = slerp64(ua, ub, 0.5, thr=2.0)
    expect = (a.double().norm() + b.double().norm()) / 2 * mid / mid.norm()
    assert_close(ref.karcher([a, b], max_iter=50, tol=1e-7).double(), expect, tolerance_for(FP32))


# ------------------------------------------------------------------------------------------------
# The C++ kernels against the reference
# ------------------------------------------------------------------------------------------------

def call(method, xs, base, backend, out_dtype=None, **kw):
    if method == "linear":
        return I.linear(xs, kw.get("weight", [0.25 * (i + 1) for i in range(len(xs))]),
                        normalize=kw.get("normalize", True), out_dtype=out_dtype, backend=backend)
    if method == "slerp":
        return I.slerp(base, xs[0], kw.get("t", 0.35), out_dtype=out_dtype, backend=backend)
    if method == "nearswap":
        return I.nearswap(base, xs[0], kw.get("t", 0.4), out_dtype=out_dtype, backend=backend)
    if method == "passthrough":
        return I.passthrough(xs[0], kw.get("scale", 1.5), out_dtype=out_dtype, backend=backend)
    if method.startswith("nuslerp"):
        flatten, row_wise = {"nuslerp": (True, False), "nuslerp_rows": (False, False),
                             "nuslerp_row_wise": (False, True)}[method]
        return I.nuslerp(xs[:2], [0.3, 0.9], base=base, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise,
                         out_dtype=out_dtype, backend=backend)
    if method == "multislerp":
        return I.multislerp(xs, [0.2 + 0.3 * i for i in range(len(xs))], base=base, out_dtype=out_dtype,
                            backend=backend)
    return I.karcher(xs, out_dtype=out_dtype, backend=backend)


# (method, number of models, whether the base is passed)
NATIVE_CASES = [("linear", 3, False), ("slerp", 1, True), ("nearswap", 1, True), ("passthrough", 1, False),
                ("nuslerp", 2, False), ("nuslerp", 2, True), ("nuslerp_rows", 2, True),
                ("nuslerp_row_wise", 2, True), ("multislerp", 3, False), ("multislerp", 3, True),
                ("multislerp", 2, True), ("karcher", 3, False), ("karcher", 2, False)]


def case_id(c):
    return f"{c[0]}-N{c[1]}-{'base' if c[2] else 'nobase'}"


@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_cpu_matches_reference(case, shape, dtype, rng):
    require_backend("cpu")
    method, n, with_base = case
    xs = rand(shape, dtype, rng, n)
    (base,) = rand(shape, dtype, rng) if with_base else (None,)
    got = call(method, xs, base, "cpu")
    want = call(method, xs, base, "reference")
    assert got.dtype == dtype
    assert_close_dtype(got, want, f"{method} {dtype}")


@pytest.mark.parametrize("out_dtype", [FP32, BF16, FP16], ids=fmt_dtype)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_cpu_rounds_once_to_out_dtype(case, out_dtype, rng):
    require_backend("cpu")
    method, n, with_base = case
    xs = rand((6, 70), BF16, rng, n)
    (base,) = rand((6, 70), BF16, rng) if with_base else (None,)
    got = call(method, xs, base, "cpu", out_dtype=out_dtype)
    assert got.dtype == out_dtype
    assert_close_dtype(got, call(method, xs, base, "reference", out_dtype=out_dtype))


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_cpu_long_tensor_spans_several_work_items(case, rng):
    """More than one 65536-element chunk per vector: the chunked Gram sums and the combine."""
    require_backend("cpu")
    method, n, with_base = case
    shape = (70001, 3) if method == "nuslerp_row_wise" else (3, 70001)  # vectors of 70001 elements
    xs = rand(shape, FP32, rng, n)
    (base,) = rand(shape, FP32, rng) if with_base else (None,)
    assert_close_dtype(call(method, xs, base, "cpu"), call(method, xs, base, "reference"))


@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
def test_cpu_nuslerp_row_wise_spans_several_column_blocks(dtype, rng):
    """The vectors along dim 0 are swept in blocks of 256 adjacent columns: 700 columns, 3 blocks."""
    require_backend("cpu")
    a, b, base = rand((50, 700), dtype, rng, 3)
    kw = dict(base=base, nuslerp_flatten=False, nuslerp_row_wise=True)
    assert_close_dtype(I.nuslerp([a, b], [0.3, 0.8], backend="cpu", **kw),
                       I.nuslerp([a, b], [0.3, 0.8], backend="reference", **kw))


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_cpu_same_bits_for_every_thread_count(case, rng):
    require_backend("cpu")
    method, n, with_base = case
    xs = rand((2, 140000), FP32, rng, n)
    (base,) = rand((2, 140000), FP32, rng) if with_base else (None,)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call(method, xs, base, "cpu")
        torch.set_num_threads(max(2, threads))
        many = call(method, xs, base, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("special", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_cpu_non_finite_inputs_match_reference(case, special, rng):
    require_backend("cpu")
    method, n, with_base = case
    xs = rand((4, 9), FP32, rng, n)
    xs[0][1, 2] = float(special)
    (base,) = rand((4, 9), FP32, rng) if with_base else (None,)
    assert_close_dtype(call(method, xs, base, "cpu"), call(method, xs, base, "reference"), f"{method} {special}")


def test_cpu_linear_zero_weight_sum_matches_reference(rng):
    xs = rand((5, 3), FP32, rng, 2)
    assert_close_dtype(I.linear(xs, [2.0, -2.0], backend="cpu"), I.linear(xs, [2.0, -2.0], backend="reference"))


@pytest.mark.parametrize("b_of_a", ["colinear", "antipodal"])
def test_cpu_slerp_colinear_is_linear(b_of_a, rng):
    (a,) = rand((33,), FP32, rng)
    b = 2 * a if b_of_a == "colinear" else -a
    assert_close_dtype(I.slerp(a, b, 0.25, backend="cpu"), 0.75 * a + 0.25 * b)


def test_cpu_nuslerp_colinear_rows_are_linear(rng):
    a, base = rand((3, 8), FP32, rng, 2)
    b = base + 2 * (a - base)  # task vectors colinear row by row
    got = I.nuslerp([a, b], [1.0, 1.0], base=base, nuslerp_flatten=False, backend="cpu")
    assert_close_dtype(got, base + 0.5 * (a - base) + 0.5 * (b - base))


def test_cpu_multislerp_cancelling_triple_is_an_error(rng):
    (x,) = rand((7,), FP32, rng)
    with pytest.raises(ValueError, match="models"):
        I.multislerp([x, -x, x - x], [1.0, 1.0, 1.0], backend="cpu")


def test_cpu_karcher_all_zero_inputs_give_zeros():
    z = torch.zeros(3, 4)
    assert torch.equal(I.karcher([z, z], backend="cpu"), z)


def test_cpu_karcher_with_a_zero_input_matches_reference(rng):
    a, b = rand((4, 5), FP32, rng, 2)
    z = torch.zeros_like(a)
    assert_close_dtype(I.karcher([a, z, b], backend="cpu"), I.karcher([a, z, b], backend="reference"))


@pytest.mark.parametrize("max_iter", [0, 1, 3, 30])
def test_cpu_karcher_iteration_count_matches_reference(max_iter, rng):
    xs = rand((6, 6), FP32, rng, 4)
    assert_close_dtype(I.karcher(xs, max_iter=max_iter, backend="cpu"),
                       I.karcher(xs, max_iter=max_iter, backend="reference"))


# ------------------------------------------------------------------------------------------------
# Gradients: the reference's autograd (the C++ path refuses needs_grad)
# ------------------------------------------------------------------------------------------------

GRAD_CASES = [c for c in NATIVE_CASES if c[0] != "nearswap"] + [("nearswap", 1, True)]


@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_gradcheck_fp64(case, rng):
    method, n, with_base = case
    xs = [x.double().requires_grad_() for x in rand((3, 4), FP32, rng, n)]
    base = randn((3, 4), FP32, rng).double().requires_grad_() if with_base else None
    if method == "nearswap":  # keep |Δ| away from t, where the clamp's kink sits
        xs = [(base.detach() + torch.linspace(-3, 3, 12).view(3, 4).double() * 0.9 + 0.05).requires_grad_()]
    inputs = xs + ([base] if with_base else [])

    def f(*ts):
        return call(method, list(ts[:n]), ts[n] if with_base else None, "auto")
    assert torch.autograd.gradcheck(f, inputs)


def test_needs_grad_goes_to_the_reference(rng):
    a, b = rand((3, 4), FP32, rng, 2)
    a.requires_grad_()
    assert "forward only" in backend_cpu.interpolate_reason(a, FP32, True)
    out = I.slerp(a, b, 0.3)
    out.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_tensor_t_is_differentiable(rng):
    a, b = rand((5,), FP64, rng, 2)
    t = torch.tensor(0.3, dtype=FP64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: I.slerp(a, b, t), (t,))


def test_tensor_weight_is_differentiable(rng):
    xs = rand((4,), FP64, rng, 3)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=FP64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: I.linear(xs, w), (w,))
    assert torch.autograd.gradcheck(lambda w: I.multislerp(xs, w), (w,))


def test_explicit_cpu_backend_refuses_gradients(rng):
    a, b = rand((3,), FP32, rng, 2)
    a.requires_grad_()
    with pytest.raises(RuntimeError, match="forward only"):
        I.slerp(a, b, 0.5, backend="cpu")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

BAD = [
    ("linear-weight-count", lambda x: I.linear([x, x], [1.0]), ValueError, "weight"),
    ("linear-weight-scalar", lambda x: I.linear([x, x], 1.0), TypeError, "weight"),
    ("linear-no-models", lambda x: I.linear([], []), ValueError, "models"),
    ("linear-shape", lambda x: I.linear([x, x[:1]], [1.0, 1.0]), ValueError, r"models\[1\]"),
    ("linear-dtype", lambda x: I.linear([x, x.half()], [1.0, 1.0]), ValueError, r"models\[1\]"),
    ("linear-int", lambda x: I.linear([x.int()], [1.0]), TypeError, r"models\[0\]"),
    ("linear-normalize", lambda x: I.linear([x], [1.0], normalize=1), TypeError, "normalize"),
    ("slerp-t", lambda x: I.slerp(x, x, "0.5"), TypeError, "t"),
    ("slerp-t-shape", lambda x: I.slerp(x, x, torch.ones(2)), ValueError, "t"),
    ("slerp-b", lambda x: I.slerp(x, x[0], 0.5), ValueError, "b"),
    ("nearswap-model", lambda x: I.nearswap(x, x.double(), 0.5), ValueError, "model"),
    ("passthrough-scale", lambda x: I.passthrough(x, [2.0]), TypeError, "scale"),
    ("nuslerp-count", lambda x: I.nuslerp([x, x, x], [1.0, 1.0, 1.0]), ValueError, "models"),
    ("nuslerp-base", lambda x: I.nuslerp([x, x], [1.0, 1.0], base=x[0]), ValueError, "base"),
    ("nuslerp-flatten", lambda x: I.nuslerp([x, x], [1.0, 1.0], nuslerp_flatten="yes"), TypeError, "nuslerp_flatten"),
    ("multislerp-weight", lambda x: I.multislerp([x, x], [1.0, 2.0, 3.0]), ValueError, "weight"),
    ("karcher-max_iter", lambda x: I.karcher([x, x], max_iter=-1), ValueError, "max_iter"),
    ("karcher-tol", lambda x: I.karcher([x, x], tol=-1.0), ValueError, "tol"),
    ("out_dtype", lambda x: I.linear([x], [1.0], out_dtype=torch.int32), ValueError, "out_dtype"),
    ("backend", lambda x: I.linear([x], [1.0], backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("name,fn,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn(torch.ones(2, 3))


# ------------------------------------------------------------------------------------------------
# Registration: opcheck of the C++ ops, torch.compile(fullgraph=True) of the public functions
# ------------------------------------------------------------------------------------------------

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def op_cases(gen):
    a, b, c, base = rand((3, 5), FP32, gen, 4)
    h = [x.to(BF16) for x in (a, b, c)]
    return {
        "linear_cpu": [([a, b, c], [0.2, 0.3, 0.5], True, FP32), (h, [1.0, 2.0, 3.0], False, FP16)],
        "slerp_cpu": [(a, b, 0.3, 0.9995, 1e-8, FP32), (h[0], h[1], 0.7, 0.9995, 1e-8, BF16)],
        "nearswap_cpu": [(a, b, 0.5, FP32), (h[0], h[1], 0.1, FP32)],
        "nuslerp_cpu": [(a, b, base, 0.25, False, True, 1e-8, FP32), (a, b, None, 0.5, True, False, 1e-8, BF16)],
        "multislerp_cpu": [([a, b, c], [0.2, 0.3, 0.5], base, True, 1e-8, FP32),
                           ([a, b], [1.0, 1.0], None, False, 1e-8, BF16)],
        "karcher_cpu": [([a, b, c], 10, 1e-5, FP32), (h, 3, 1e-5, BF16)],
    }


OPCHECK_PARAMS = [pytest.param(name, i, util, id=f"{name}-{i}-{util}")
                  for name in ("linear_cpu", "slerp_cpu", "nearswap_cpu", "nuslerp_cpu", "multislerp_cpu",
                               "karcher_cpu") for i in range(2) for util in OPCHECK_UTILS]


@pytest.mark.parametrize("name,index,util", OPCHECK_PARAMS)
def test_opcheck(name, index, util, rng):
    require_backend("cpu")
    args = op_cases(rng)[name][index]
    torch.library.opcheck(getattr(torch.ops.pyops, name).default, args, test_utils=util)


def all_methods(a, b, c, base):
    return (I.linear([a, b, c], [0.2, 0.3, 0.5], backend="cpu"),
            I.slerp(base, a, 0.3, backend="cpu"),
            I.nearswap(base, a, 0.5, backend="cpu"),
            I.passthrough(a, 2.0, backend="cpu"),
            I.nuslerp([a, b], [1.0, 2.0], base=base, nuslerp_flatten=False, backend="cpu"),
            I.multislerp([a, b, c], [1.0, 2.0, 3.0], base=base, backend="cpu"),
            I.karcher([a, b, c], backend="cpu"))


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compiler, rng, fresh_dynamo):
    require_backend("cpu")
    a, b, c, base = rand((4, 9), FP32, rng, 4)
    eager = all_methods(a, b, c, base)
    compiled = torch.compile(all_methods, fullgraph=True, backend=compiler)(a, b, c, base)
    for e, g in zip(eager, compiled):
        assert torch.equal(e, g)


def test_compile_auto_backend_fullgraph(rng, fresh_dynamo):
    a, b = rand((4, 5), FP32, rng, 2)
    f = torch.compile(lambda x, y: I.slerp(x, y, 0.4), fullgraph=True, backend="eager")
    assert_close_dtype(f(a, b), I.slerp(a, b, 0.4))


# ------------------------------------------------------------------------------------------------
# merge_tensors: the per-tensor entry of the checkpoint runner
# ------------------------------------------------------------------------------------------------

def test_spec_table_has_mergekit_defaults():
    assert spec.MERGEKIT_METHODS["slerp"] == {"t": spec.REQUIRED}
    assert spec.MERGEKIT_METHODS["nuslerp"] == {"weight": spec.REQUIRED, "nuslerp_row_wise": False,
                                                "nuslerp_flatten": True}
    assert spec.MERGEKIT_METHODS["karcher"] == {"max_iter": 10, "tol": 1e-5}
    assert not set(spec.MERGEKIT_METHODS) & set(spec.METHODS)


INTERPOLATING = ["linear", "slerp", "nearswap", "passthrough", "nuslerp", "multislerp", "karcher"]


def test_spec_table_lists_every_method_beyond_task_arithmetic():
    """The 12 methods mergekit 0.1.5 has and METHODS lacks (linear maps onto task_arithmetic in the
    YAML today, and is an op here)."""
    assert set(spec.MERGEKIT_METHODS) == set(INTERPOLATING) | {"breadcrumbs_ties", "ram", "ramplus_tl", "sce",
                                                              "arcee_fusion"}
    for table in (spec.MERGEKIT_BASE, spec.MERGEKIT_MODEL_COUNT):
        assert set(table) == set(spec.MERGEKIT_METHODS)


@pytest.mark.parametrize("method", INTERPOLATING)
def test_merge_tensors_matches_the_op(method, rng):
    xs = rand((3, 7), FP32, rng, 3)
    base = xs[0]
    params = {"linear": {"weight": [1.0, 2.0, 3.0]}, "slerp": {"t": 0.4}, "nearswap": {"t": 0.2},
              "passthrough": {"scale": [0.5]}, "nuslerp": {"weight": [1.0, 3.0], "nuslerp_flatten": False},
              "multislerp": {"weight": [1.0, 2.0]}, "karcher": {"max_iter": 5}}[method]
    policy = spec.MERGEKIT_BASE[method]
    if policy == "ignored":
        models = xs if method in ("linear", "karcher") else xs[:1]
        got = I.merge_tensors(method, None, models, params)
    else:
        models = xs[1:2] if method in ("slerp", "nearswap") else xs[1:]
        got = I.merge_tensors(method, base, models, params)
    want = {"linear": lambda: I.linear(xs, [1.0, 2.0, 3.0]), "slerp": lambda: I.slerp(base, xs[1], 0.4),
            "nearswap": lambda: I.nearswap(base, xs[1], 0.2), "passthrough": lambda: I.passthrough(xs[0], 0.5),
            "nuslerp": lambda: I.nuslerp(xs[1:], [1.0, 3.0], base=base, nuslerp_flatten=False),
            "multislerp": lambda: I.multislerp(xs[1:], [1.0, 2.0], base=base),
            "karcher": lambda: I.karcher(xs, max_iter=5)}[method]()
    assert torch.equal(got, want)


def test_merge_tensors_promotes_mixed_dtypes_as_mergekit(rng):
    base, x = rand((4, 4), FP32, rng, 2)
    out = I.merge_tensors("slerp", base.to(BF16), [x], {"t": 0.5})
    assert out.dtype == FP32
    assert torch.equal(out, I.slerp(base.to(BF16).float(), x, 0.5))


@pytest.mark.parametrize("method,base,n,params,match", [
    ("ties", False, 1, {}, "method"),
    ("slerp", False, 1, {"t": 0.5}, "base"),
    ("slerp", True, 1, {}, "requires 't'"),
    ("slerp", True, 1, {"t": 0.5, "weight": 1.0}, "unknown parameter"),
    ("slerp", True, 2, {"t": 0.5}, "models"),
    ("linear", True, 2, {"weight": [1.0, 1.0]}, "base"),
    ("nuslerp", True, 1, {"weight": [1.0]}, "models"),
    ("passthrough", False, 1, {"scale": [1.0, 2.0]}, "scale"),
], ids=["unknown-method", "slerp-no-base", "slerp-no-t", "slerp-unknown", "slerp-two-models", "linear-base",
        "nuslerp-one", "passthrough-scales"])
def test_merge_tensors_bad_input(method, base, n, params, match):
    x = torch.ones(2, 2)
    with pytest.raises(ValueError, match=match):
        I.merge_tensors(method, x if base else None, [x] * n, params)
