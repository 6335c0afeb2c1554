"""The moe native kernels (pyops._C.moe_*, pyops._C_cuda.moe_route), called directly through their
bindings and checked against independent PyTorch formulations of their contract (csrc/moe/).

Routing: top-k (ties: lower expert index first), softmax / sigmoid, bias moving the choice but not
the weights, renormalisation, capacity drops in token order, odd sizes, NaN/inf errors naming the
token, bit-identical results for every thread count and both ISA builds. Expert-MLP helpers:
gather, the five activations forward and backward (fp32/fp16/bf16), combine, its backward and
scatter_add; out-of-range or duplicate order entries raise ValueError, never write out of bounds.
CUDA routing: the CPU kernel's bits, non-finite logits reported through offsets[E].
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from pyops import _native
from pyops.testing import REDUCTION_TOL, compare, tolerance_for
from _support import fmt_dtype, saved_outputs_with_and_without

C = _native.cpu_module
pytestmark = pytest.mark.skipif(C is None or not hasattr(C, "moe_route"),
                                reason=_native.cpu_missing_reason or "pyops._C has no moe kernels")

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (FP32, FP16, BF16)
ACTS = ("swiglu", "geglu", "gelu", "silu", "relu", "swiglu_oai")
ACT_CODE = {a: i for i, a in enumerate(ACTS)}


def _p(t):
    return 0 if t is None else t.data_ptr()


@contextlib.contextmanager
def isa(name):
    assert C.set_isa(name)
    try:
        yield
    finally:
        C.set_isa("auto")


# ---- routing -----------------------------------------------------------------------------------


def route(logits, k, score="softmax", renormalize=True, bias=None, capacity=-1, n_threads=2):
    T, E = logits.shape
    out = dict(weights=torch.empty(T, k), experts=torch.empty(T, k, dtype=torch.int32),
               order=torch.empty(T * k, dtype=torch.int64), offsets=torch.empty(E + 1, dtype=torch.int64),
               dropped=torch.empty(T, k, dtype=torch.uint8))
    C.moe_route(logits=logits.data_ptr(), dtype=_native.dtype_code(logits.dtype), T=T, E=E, k=k,
                score={"softmax": 0, "sigmoid": 1}[score], renormalize=renormalize, bias=_p(bias),
                capacity=capacity, weights=out["weights"].data_ptr(), experts=out["experts"].data_ptr(),
                order=out["order"].data_ptr(), offsets=out["offsets"].data_ptr(),
                dropped=out["dropped"].data_ptr(), n_threads=n_threads)
    return out


def route_torch(logits, k, score="softmax", renormalize=True, bias=None, capacity=-1):
    """Independent formulation: stable descending sort of the keys, argsort/bincount permutation."""
    T, E = logits.shape
    z = logits.float()
    s = torch.softmax(z, -1) if score == "softmax" else torch.sigmoid(z)
    keys = s + bias if bias is not None else s
    experts = torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :k]
    w = s.gather(1, experts)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=E), 0)
    rank = torch.empty(T * k, dtype=torch.int64)
    rank[order] = torch.arange(T * k) - offsets[flat[order]]
    dropped = (rank >= capacity) if capacity >= 0 else torch.zeros(T * k, dtype=torch.bool)
    return dict(weights=w, experts=experts.int(), order=order, offsets=offsets,
                dropped=dropped.view(T, k).to(torch.uint8))


def assert_route_equal(got, want, exact_weights=False):
    for name in ("experts", "order", "offsets", "dropped"):
        assert torch.equal(got[name], want[name]), name
    if exact_weights:
        assert torch.equal(got["weights"], want["weights"])
    else:
        cmp = compare(got["weights"], want["weights"], tolerance_for(FP32))
        assert cmp.ok, cmp


SHAPES = [(1, 1, 1), (1, 8, 8), (2, 3, 1), (37, 5, 2), (300, 64, 4), (1500, 17, 3), (129, 40, 12)]


def route_ids(shapes):
    return [f"T{T}-E{E}-k{k}" for T, E, k in shapes]


@pytest.mark.parametrize("T,E,k", SHAPES, ids=route_ids(SHAPES))
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_matches_torch(T, E, k, score, rng):
    logits = torch.randn(T, E, generator=rng) * 2
    for renormalize in (True, False):
        assert_route_equal(route(logits, k, score, renormalize), route_torch(logits, k, score, renormalize))


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=fmt_dtype)
def test_route_half_logits(dtype, rng):
    logits = (torch.randn(257, 24, generator=rng) * 3).to(dtype)  # many exact ties in half precision
    assert_route_equal(route(logits, 5), route_torch(logits, 5))


@pytest.mark.parametrize("k", [1, 3, 8, 9, 16])  # k <= 8 and k > 8 take different selection code
def test_route_ties_lower_index_wins(k):
    E = 16
    logits = torch.tensor([[0.5] * E, [1.0, 3.0, 3.0, 0.0] * 4, [-1.0] * 7 + [2.0] * 9])
    for score in ("softmax", "sigmoid"):
        got = route(logits, k, score)
        assert_route_equal(got, route_torch(logits, k, score))
    assert got["experts"][0].tolist() == list(range(k))
    assert got["experts"][1, :min(k, 8)].tolist() == [1, 2, 5, 6, 9, 10, 13, 14][:min(k, 8)]


def test_route_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0])
    got = route(logits, 2, renormalize=False, bias=bias)
    s = torch.softmax(logits, -1)[0]
    assert got["experts"].tolist() == [[2, 0]]  # 2 wins through its bias
    assert torch.allclose(got["weights"][0], s[[2, 0]], rtol=1e-6, atol=0)  # unbiased scores
    assert_route_equal(got, route_torch(logits, 2, renormalize=False, bias=bias))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_bias_random(score, rng):
    logits = torch.randn(500, 32, generator=rng)
    bias = torch.randn(32, generator=rng) * 0.1
    for renormalize in (True, False):
        assert_route_equal(route(logits, 4, score, renormalize, bias=bias),
                           route_torch(logits, 4, score, renormalize, bias=bias))


def test_route_renormalized_weights_sum_to_one(rng):
    got = route(torch.randn(100, 12, generator=rng), 3, "sigmoid")
    assert torch.allclose(got["weights"].sum(-1), torch.ones(100), rtol=0, atol=2e-7)
    assert (got["weights"][:, :-1] >= got["weights"][:, 1:]).all()  # descending


def test_route_capacity_drops_in_token_order():
    logits = torch.zeros(6, 3)
    logits[:, 1] = 5.0  # every token picks expert 1 first
    got = route(logits, 1, capacity=4)
    assert got["order"].tolist() == [0, 1, 2, 3, 4, 5]
    assert got["dropped"].view(-1).tolist() == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("capacity", [0, 1, 7, 50])
def test_route_capacity_random(capacity, rng):
    logits = torch.randn(1300, 9, generator=rng)  # two routing tiles
    logits[:, 4] += 1.5  # an overloaded expert
    assert_route_equal(route(logits, 2, capacity=capacity), route_torch(logits, 2, capacity=capacity))


def test_route_empty_experts():
    logits = torch.full((10, 6), -5.0)
    logits[:, 0] = 1.0
    logits[::2, 3] = 2.0
    logits[1::2, 5] = 2.0
    got = route(logits, 2)
    assert got["offsets"].tolist() == [0, 10, 10, 10, 15, 15, 20]
    assert_route_equal(got, route_torch(logits, 2))


def test_route_no_tokens():
    got = route(torch.empty(0, 5), 2)
    assert got["offsets"].tolist() == [0] * 6


def test_route_extreme_logits(rng):
    logits = torch.randn(64, 10, generator=rng) * 60  # exp over/underflow, subnormal probabilities
    for score in ("softmax", "sigmoid"):
        got, want = route(logits, 3, score, renormalize=False), route_torch(logits, 3, score, renormalize=False)
        cmp = compare(got["weights"], want["weights"], tolerance_for(FP32))
        assert cmp.ok, cmp


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_route_nonfinite_logits_name_the_token(bad):
    logits = torch.zeros(2000, 4)
    logits[1500, 2] = bad
    with pytest.raises(ValueError, match="logits: contains NaN/inf at token 1500"):
        route(logits, 2)
    logits[7, 0] = bad  # the first bad token is reported
    with pytest.raises(ValueError, match="at token 7$"):
        route(logits, 2)


def test_route_nonfinite_bias():
    with pytest.raises(ValueError, match="bias: contains NaN/inf at expert 1"):
        route(torch.zeros(3, 4), 2, bias=torch.tensor([0.0, float("nan"), 0.0, 0.0]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k: expected 1 <= k <= E"), (dict(k=5), "k: expected 1 <= k <= E"),
    (dict(k=2, capacity=-2), "capacity"),
], ids=["k0", "k_gt_E", "capacity"])
def test_route_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        route(torch.zeros(3, 4), **kwargs)


def test_route_bad_score_code():
    with pytest.raises(ValueError, match="score"):
        C.moe_route(logits=0, dtype=0, T=0, E=2, k=1, score=2, renormalize=True, bias=0, capacity=-1,
                    weights=0, experts=0, order=0, offsets=torch.empty(3, dtype=torch.int64).data_ptr(),
                    dropped=0, n_threads=1)


def test_route_bit_identical_across_threads_and_isas(rng):
    logits = torch.randn(5000, 64, generator=rng)
    bias = torch.randn(64, generator=rng) * 0.01
    runs = []
    for name in ("base", "auto"):
        with isa(name):
            for n_threads in (1, 2):
                for kw in (dict(k=4), dict(k=4, bias=bias, capacity=300), dict(k=10, score="sigmoid")):
                    runs.append((name, n_threads, repr(kw), route(logits, n_threads=n_threads, **kw)))
    first = {}
    for name, n_threads, kw, got in runs:
        ref = first.setdefault(kw, got)
        assert_route_equal(got, ref, exact_weights=True)
    assert_route_equal(first[repr(dict(k=4))], route_torch(logits, 4))


# ---- gather / activations / combine / scatter --------------------------------------------------


GATHER_SHAPES = [(1, 1, 1), (7, 3, 33), (130, 2, 600)]
COMBINE_SHAPES = [(1, 1, 1), (9, 4, 17), (300, 2, 520)]


def rows_ids(shapes):
    return [f"T{T}-k{k}-d{d}" for T, k, d in shapes]


def perm_order(T, k, rng):
    return torch.randperm(T * k, generator=rng)


def gather(x, order, k, n_threads=2):
    T, d = x.shape
    rows = torch.empty(T * k, d, dtype=x.dtype)
    C.moe_gather(x=x.data_ptr(), order=order.data_ptr(), k=k, T=T, d=d, rows=rows.data_ptr(),
                 dtype=_native.dtype_code(x.dtype), n_threads=n_threads)
    return rows


@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("T,k,d", GATHER_SHAPES, ids=rows_ids(GATHER_SHAPES))
def test_gather(T, k, d, dtype, rng):
    x = torch.randn(T, d, generator=rng).to(dtype)
    order = perm_order(T, k, rng)
    assert torch.equal(gather(x, order, k), x[order // k])


def act_torch(act, a, b):
    a = a.float()
    if act == "swiglu":
        return F.silu(a) * b.float()
    if act == "geglu":
        return F.gelu(a) * b.float()
    if act == "swiglu_oai":   # GPT-OSS, the bindings' default alpha 1.702 and limit 7.0
        g = a.clamp(max=7.0)
        return (b.float().clamp(-7.0, 7.0) + 1) * g * torch.sigmoid(1.702 * g)
    return {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[act](a)


def act_forward(act, a, b):
    h = torch.empty_like(a)
    C.moe_act_forward(a=a.data_ptr(), b=_p(b), h_out=h.data_ptr(), n_rows=a.shape[0], hdim=a.shape[1],
                      act=ACT_CODE[act], dtype=_native.dtype_code(a.dtype), n_threads=2)
    return h


def act_backward(act, a, b, dh):
    da = torch.empty_like(a)
    db = torch.empty_like(a) if b is not None else None
    C.moe_act_backward(a=a.data_ptr(), b=_p(b), dh=dh.data_ptr(), da=da.data_ptr(), db=_p(db),
                       n_rows=a.shape[0], hdim=a.shape[1], act=ACT_CODE[act],
                       dtype=_native.dtype_code(a.dtype), n_threads=2)
    return da, db


def act_inputs(act, dtype, rng, shape=(37, 1029)):
    a = (torch.randn(*shape, generator=rng) * 3).to(dtype)
    a.view(-1)[:5] = torch.tensor([0.0, -0.0, 30.0, -30.0, 1e-4]).to(dtype)
    b = (torch.randn(*shape, generator=rng) * 4).to(dtype) if act in ("swiglu", "geglu", "swiglu_oai") else None
    return a, b


@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("act", ACTS)
def test_act_forward(act, dtype, rng):
    a, b = act_inputs(act, dtype, rng)
    cmp = compare(act_forward(act, a, b), act_torch(act, a, b), tolerance_for(dtype))
    assert cmp.ok, cmp


@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("act", ACTS)
def test_act_backward(act, dtype, rng):
    a, b = act_inputs(act, dtype, rng)
    dh = torch.randn(a.shape, generator=rng).to(dtype)
    a32 = a.float().requires_grad_()
    b32 = b.float().requires_grad_() if b is not None else None
    act_torch(act, a32, b32).backward(dh.float())
    da, db = act_backward(act, a, b, dh)
    cmp = compare(da, a32.grad, tolerance_for(dtype))
    assert cmp.ok, f"da {cmp}"
    if b is not None:
        cmp = compare(db, b32.grad, tolerance_for(dtype))
        assert cmp.ok, f"db {cmp}"


@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("act", ACTS)
def test_act_backward_also_writes_the_forward_h(act, dtype, rng):
    """With h, the backward pass writes the forward's h = act(a, b) too (the CPU backward needs
    it for dW2 and saves none): the forward's bits, and da, db unchanged."""
    a, b = act_inputs(act, dtype, rng)
    dh = torch.randn(a.shape, generator=rng).to(dtype)
    da, db = act_backward(act, a, b, dh)
    da2, db2, h = torch.empty_like(a), (torch.empty_like(a) if b is not None else None), torch.empty_like(a)
    C.moe_act_backward(a=a.data_ptr(), b=_p(b), dh=dh.data_ptr(), da=da2.data_ptr(), db=_p(db2),
                       n_rows=a.shape[0], hdim=a.shape[1], act=ACT_CODE[act],
                       dtype=_native.dtype_code(a.dtype), n_threads=2, h=h.data_ptr())
    assert torch.equal(h, act_forward(act, a, b))
    assert torch.equal(da2, da)
    if b is not None:
        assert torch.equal(db2, db)


_LANES_SCRIPT = """
import sys, torch
from pyops import _native
C = _native.cpu_module
g = torch.Generator().manual_seed(3)
a = torch.randn(37, 1029, generator=g) * 9
a.view(-1)[:6] = torch.tensor([0.0, -0.0, 95.0, -110.0, float("nan"), float("inf")])
b, dh = torch.randn(37, 1029, generator=g), torch.randn(37, 1029, generator=g)
h, h2, da, db = (torch.empty_like(a) for _ in range(4))
C.moe_act_forward(a=a.data_ptr(), b=b.data_ptr(), h_out=h.data_ptr(), n_rows=37, hdim=1029, act=0, dtype=0,
                  n_threads=1)
C.moe_act_backward(a=a.data_ptr(), b=b.data_ptr(), dh=dh.data_ptr(), da=da.data_ptr(), db=db.data_ptr(),
                   n_rows=37, hdim=1029, act=0, dtype=0, n_threads=1, h=h2.data_ptr())
torch.save([h, h2, da, db], sys.argv[1])
"""


def test_swiglu_16_lane_path_matches_the_8_lane_loops(tmp_path):
    """On AVX-512 machines SwiGLU runs 16 lanes wide; PYOPS_MOE_NO_AVX512=1 selects the 8-lane loops.
    Both perform exp_f's operations in the same order: the same bits, NaN, inf and clamps included."""
    outs = saved_outputs_with_and_without("PYOPS_MOE_NO_AVX512", _LANES_SCRIPT, tmp_path)
    for name, x, y in zip(("h", "h from the backward", "da", "db"), *outs):
        assert torch.equal(x.isnan(), y.isnan()), name
        assert torch.equal(x[~x.isnan()], y[~y.isnan()]), name


def test_act_empty_and_bad_code():
    z = torch.empty(0, 4)
    act_forward("silu", z, None)
    with pytest.raises(ValueError, match="act"):
        C.moe_act_forward(a=0, b=0, h_out=0, n_rows=0, hdim=0, act=6, dtype=0, n_threads=1)


def combine_inputs(T, k, d, dtype, rng, drop=True):
    order = perm_order(T, k, rng)
    ys = torch.randn(T * k, d, generator=rng).to(dtype)
    w = torch.rand(T, k, generator=rng)
    dropped = (torch.rand(T, k, generator=rng) < 0.3).to(torch.uint8) if drop else None
    return order, ys, w, dropped


def combine_torch(ys, order, w, dropped, k):
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel())
    T = w.shape[0]
    keep = w if dropped is None else w * (1 - dropped.float())
    return (keep.view(T, k, 1) * ys.float()[pos].view(T, k, -1)).sum(1)


def combine(ys, order, w, dropped, k, n_threads=2):
    T = w.shape[0]
    y = torch.empty(T, ys.shape[1], dtype=ys.dtype)
    C.moe_combine(ys=ys.data_ptr(), order=order.data_ptr(), weights=w.data_ptr(), dropped=_p(dropped),
                  k=k, T=T, d=ys.shape[1], y=y.data_ptr(), dtype=_native.dtype_code(ys.dtype),
                  n_threads=n_threads)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("T,k,d", COMBINE_SHAPES, ids=rows_ids(COMBINE_SHAPES))
def test_combine(T, k, d, dtype, rng):
    order, ys, w, dropped = combine_inputs(T, k, d, dtype, rng)
    for dr in (dropped, None):
        cmp = compare(combine(ys, order, w, dr, k), combine_torch(ys, order, w, dr, k), tolerance_for(dtype))
        assert cmp.ok, cmp


def test_combine_all_dropped_is_zero(rng):
    order, ys, w, _ = combine_inputs(5, 2, 8, FP32, rng)
    y = combine(ys, order, w, torch.ones(5, 2, dtype=torch.uint8), 2)
    assert torch.equal(y, torch.zeros(5, 8))


@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("T,k,d", COMBINE_SHAPES, ids=rows_ids(COMBINE_SHAPES))
def test_combine_backward(T, k, d, dtype, rng):
    order, ys, w, dropped = combine_inputs(T, k, d, dtype, rng)
    dy = torch.randn(T, d, generator=rng).to(dtype)
    ys32 = ys.float().requires_grad_()
    w32 = w.clone().requires_grad_()
    combine_torch(ys32, order, w32, dropped, k).backward(dy.float())
    dys = torch.full_like(ys, float("nan"))
    dw = torch.full_like(w, float("nan"))
    C.moe_combine_backward(dy=dy.data_ptr(), ys=ys.data_ptr(), order=order.data_ptr(), weights=w.data_ptr(),
                           dropped=dropped.data_ptr(), k=k, T=T, d=d, dys=dys.data_ptr(),
                           dweights=dw.data_ptr(), dtype=_native.dtype_code(dtype), n_threads=2)
    cmp = compare(dys, ys32.grad, tolerance_for(dtype))
    assert cmp.ok, f"dys {cmp}"
    cmp = compare(dw, w32.grad, REDUCTION_TOL)  # fp32 dot products over d
    assert cmp.ok, f"dweights {cmp}"
    assert (dw[dropped.bool()] == 0).all()


def scatter_add(dxs, order, k, T, n_threads=2):
    dx = torch.full((T, dxs.shape[1]), float("nan"), dtype=dxs.dtype)
    C.moe_scatter_add(dxs=dxs.data_ptr(), order=order.data_ptr(), k=k, T=T, d=dxs.shape[1], dx=dx.data_ptr(),
                      dtype=_native.dtype_code(dxs.dtype), n_threads=n_threads)
    return dx


@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("T,k,d", COMBINE_SHAPES, ids=rows_ids(COMBINE_SHAPES))
def test_scatter_add(T, k, d, dtype, rng):
    order, dxs, _, _ = combine_inputs(T, k, d, dtype, rng, drop=False)
    want = torch.zeros(T, d).index_add_(0, order // k, dxs.float())
    cmp = compare(scatter_add(dxs, order, k, T), want, tolerance_for(dtype))
    assert cmp.ok, cmp


def test_combine_and_scatter_bit_identical_across_threads(rng):
    T, k, d = 3000, 3, 40
    order, ys, w, dropped = combine_inputs(T, k, d, FP32, rng)
    assert torch.equal(combine(ys, order, w, dropped, k, 1), combine(ys, order, w, dropped, k, 2))
    assert torch.equal(scatter_add(ys, order, k, T, 1), scatter_add(ys, order, k, T, 2))


@pytest.mark.parametrize("entry", [-1, 12, 1 << 40], ids=["-1", "12", "2^40"])
@pytest.mark.parametrize("op", ["gather", "combine", "combine_backward", "scatter_add"])
def test_out_of_range_order_entry(op, entry, rng):
    T, k, d = 4, 3, 5
    order, ys, w, dropped = combine_inputs(T, k, d, FP32, rng)
    order[7] = entry
    with pytest.raises(ValueError, match=f"order: entry 7 is {entry}, expected a value in \\[0, 12\\)"):
        if op == "gather":
            gather(torch.randn(T, d), order, k)
        elif op == "combine":
            combine(ys, order, w, dropped, k)
        elif op == "scatter_add":
            scatter_add(ys, order, k, T)
        else:
            C.moe_combine_backward(dy=torch.zeros(T, d).data_ptr(), ys=ys.data_ptr(), order=order.data_ptr(),
                                   weights=w.data_ptr(), dropped=dropped.data_ptr(), k=k, T=T, d=d,
                                   dys=torch.empty_like(ys).data_ptr(), dweights=torch.empty_like(w).data_ptr(),
                                   dtype=0, n_threads=2)


@pytest.mark.parametrize("op", ["combine", "scatter_add"])
def test_duplicate_order_entry(op, rng):
    T, k, d = 4, 3, 5
    order, ys, w, dropped = combine_inputs(T, k, d, FP32, rng)
    order[order == 3] = int(order[order == 5])  # 5 twice, 3 missing
    with pytest.raises(ValueError, match="order: is not a permutation .* assignment 3 is missing"):
        combine(ys, order, w, dropped, k) if op == "combine" else scatter_add(ys, order, k, T)


def test_bad_dtype_code():
    with pytest.raises(ValueError, match="dtype: unknown dtype code 7"):
        C.moe_gather(x=0, order=0, k=1, T=0, d=0, rows=0, dtype=7, n_threads=1)


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=fmt_dtype)
def test_expert_helpers_base_isa(dtype, rng):
    """The baseline (non-AVX2) build of gather, activations, combine and scatter_add."""
    T, k, d = 50, 3, 70
    order, ys, w, dropped = combine_inputs(T, k, d, dtype, rng)
    x = torch.randn(T, d, generator=rng).to(dtype)
    dy = torch.randn(T, d, generator=rng).to(dtype)
    tol = tolerance_for(dtype)
    with isa("base"):
        assert C.active_isa() == "base"
        assert torch.equal(gather(x, order, k), x[order // k])
        for act in ACTS:
            a, b = act_inputs(act, dtype, rng, shape=(9, 130))
            cmp = compare(act_forward(act, a, b), act_torch(act, a, b), tol)
            assert cmp.ok, f"{act} {cmp}"
            a32 = a.float().requires_grad_()
            b32 = b.float().requires_grad_() if b is not None else None
            g = torch.randn(a.shape, generator=rng).to(dtype)
            act_torch(act, a32, b32).backward(g.float())
            da, db = act_backward(act, a, b, g)
            assert compare(da, a32.grad, tol).ok, act
            if b is not None:
                assert compare(db, b32.grad, tol).ok, act
        cmp = compare(combine(ys, order, w, dropped, k), combine_torch(ys, order, w, dropped, k), tol)
        assert cmp.ok, cmp
        want = torch.zeros(T, d).index_add_(0, order // k, ys.float())
        assert compare(scatter_add(ys, order, k, T), want, tol).ok
        dys = torch.empty_like(ys)
        dw = torch.empty_like(w)
        C.moe_combine_backward(dy=dy.data_ptr(), ys=ys.data_ptr(), order=order.data_ptr(), weights=w.data_ptr(),
                               dropped=dropped.data_ptr(), k=k, T=T, d=d, dys=dys.data_ptr(),
                               dweights=dw.data_ptr(), dtype=_native.dtype_code(dtype), n_threads=2)
    ys32 = ys.float().requires_grad_()
    w32 = w.clone().requires_grad_()
    combine_torch(ys32, order, w32, dropped, k).backward(dy.float())
    assert compare(dys, ys32.grad, tol).ok
    assert compare(dw, w32.grad, REDUCTION_TOL).ok


# ---- CUDA routing (pyops._C_cuda.moe_route): bit-identical to the CPU kernel -------------------

G = _native.cuda_module
CUDA_SHAPES = [(4096, 256, 8), (300, 64, 64)]
needs_cuda_route = pytest.mark.skipif(
    G is None or not hasattr(G, "moe_route") or not torch.cuda.is_available(),
    reason=_native.cuda_missing_reason or "CUDA is not available (or pyops._C_cuda has no moe_route)")


def route_cuda(logits, k, score="softmax", renormalize=True, bias=None, capacity=-1):
    T, E = logits.shape
    dev = torch.device("cuda")
    out = dict(weights=torch.empty(T, k, device=dev), experts=torch.empty(T, k, dtype=torch.int32, device=dev),
               order=torch.empty(T * k, dtype=torch.int64, device=dev),
               offsets=torch.empty(E + 1, dtype=torch.int64, device=dev),
               dropped=torch.empty(T, k, dtype=torch.uint8, device=dev))
    x = logits.to(dev)
    b = None if bias is None else bias.to(dev)
    G.moe_route(logits=x.data_ptr(), dtype=_native.dtype_code(x.dtype), T=T, E=E, k=k,
                score={"softmax": 0, "sigmoid": 1}[score], renormalize=renormalize, bias=_p(b),
                capacity=capacity, weights=out["weights"].data_ptr(), experts=out["experts"].data_ptr(),
                order=out["order"].data_ptr(), offsets=out["offsets"].data_ptr(),
                dropped=out["dropped"].data_ptr(), stream=torch.cuda.current_stream().cuda_stream)
    return {n: t.cpu() for n, t in out.items()}


@needs_cuda_route
@pytest.mark.parametrize("T,E,k", SHAPES + CUDA_SHAPES, ids=route_ids(SHAPES + CUDA_SHAPES))
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_cuda_route_bit_identical_to_cpu(T, E, k, score, rng):
    logits = torch.randn(T, E, generator=rng) * 2
    bias = torch.randn(E, generator=rng) * 0.1
    for kw in (dict(), dict(renormalize=False, capacity=max(0, T * k // E - 1)), dict(bias=bias, capacity=0)):
        assert_route_equal(route_cuda(logits, k, score, **kw), route(logits, k, score, **kw), exact_weights=True)


@needs_cuda_route
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=fmt_dtype)
def test_cuda_route_half_logits(dtype, rng):
    logits = (torch.randn(3000, 24, generator=rng) * 3).to(dtype)
    assert_route_equal(route_cuda(logits, 5), route(logits, 5), exact_weights=True)


@needs_cuda_route
def test_cuda_route_reports_nonfinite_through_offsets():
    logits = torch.zeros(9000, 8)
    logits[7000, 1] = float("inf")
    logits[1500, 2] = float("nan")
    assert int(route_cuda(logits, 2)["offsets"][-1]) == -(1500 + 1)
