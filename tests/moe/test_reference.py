"""The reference (the definition) against literal, hand-written formulations of the routing rules
and the expert MLP; fp64 gradcheck through routing weights and every weight."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pyops
from .cases import FP64, make_weights
from pyops.moe import reference as ref


def literal_route(z, k, score="softmax", renormalize=True, cf=None, bias=None):
    """Token by token, written out with Python lists."""
    T, E = z.shape
    s = torch.softmax(z.double(), -1) if score == "softmax" else torch.sigmoid(z.double())
    experts, weights = [], []
    for t in range(T):
        key = [float(s[t, e]) + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        chosen = sorted(range(E), key=lambda e: (-key[e], e))[:k]   # ties: lower index first
        w = [float(s[t, e]) for e in chosen]
        if renormalize:
            tot = sum(w)
            w = [v / tot for v in w]
        experts.append(chosen)
        weights.append(w)
    order = sorted(range(T * k), key=lambda a: (experts[a // k][a % k], a))
    counts = [sum(1 for a in range(T * k) if experts[a // k][a % k] == e) for e in range(E)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    dropped = [[False] * k for _ in range(T)]
    if cf is not None:
        C = math.ceil(cf * k * T / E)
        for e in range(E):
            for rank, a in enumerate(order[offsets[e]:offsets[e + 1]]):
                if rank >= C:
                    dropped[a // k][a % k] = True
    return weights, experts, order, offsets, dropped


def check_route(z, k, **kw):
    r = pyops.moe_route(z, k, backend="reference", score=kw.get("score", "softmax"),
                        renormalize=kw.get("renormalize", True), capacity_factor=kw.get("cf"), bias=kw.get("bias"))
    w, e, o, off, dr = literal_route(z, k, **kw)
    assert r.experts.tolist() == e
    assert r.experts.dtype == torch.int32 and r.order.dtype == torch.int64 and r.offsets.dtype == torch.int64
    assert r.order.tolist() == o
    assert r.offsets.tolist() == off
    assert r.dropped.tolist() == dr
    torch.testing.assert_close(r.weights.double(), torch.tensor(w, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    return r


@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (7, 5, 2), (9, 4, 4), (13, 6, 3)],
                         ids=["T1-E1-k1", "T7-E5-k2", "T9-E4-k4", "T13-E6-k3"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_route_matches_literal_rules(T, E, k, score, renormalize, rng):
    z = torch.randn(T, E, generator=rng)
    check_route(z, k, score=score, renormalize=renormalize)


def test_ties_go_to_the_lower_expert_index():
    z = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    r = check_route(z, 2)
    assert r.experts.tolist() == [[1, 2]]


def test_bias_changes_the_choice_not_the_weights():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    r = check_route(z, 2, bias=bias, renormalize=False)
    assert r.experts.tolist() == [[3, 0]]
    s = torch.softmax(z, -1)
    assert torch.equal(r.weights, s[:, [3, 0]])


@pytest.mark.parametrize("cf", [0.25, 0.5, 1.0, 1.7], ids=lambda c: f"cf{c}")
def test_capacity_drops_in_token_order(cf, rng):
    z = torch.randn(11, 3, generator=rng)
    z[:, 0] += 3.0   # overload expert 0
    check_route(z, 2, cf=cf)


def test_capacity_keeps_first_tokens_of_an_overloaded_expert():
    z = torch.zeros(5, 2)
    z[:, 1] = 5.0   # every token prefers expert 1
    r = pyops.moe_route(z, 1, capacity_factor=0.8, backend="reference")   # C = ceil(0.8*5/2) = 2
    assert r.dropped[:, 0].tolist() == [False, False, True, True, True]


def literal_mlp(x, w, experts, dropped, w1, w2, w3, act):
    y = torch.zeros_like(x, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            if dropped[t, j]:
                continue
            e = int(experts[t, j])
            a = x[t].double() @ w1[e].double()
            if act in ("swiglu", "geglu"):
                g = F.silu(a) if act == "swiglu" else 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
                h = g * (x[t].double() @ w3[e].double())
            else:
                h = {"gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))), "silu": F.silu,
                     "relu": torch.relu}[act](a)
            y[t] += float(w[t, j]) * (h @ w2[e].double())
    return y


@pytest.mark.parametrize("act", ["swiglu", "geglu", "gelu", "silu", "relu"])
def test_experts_match_literal_per_token_formula(act, rng):
    T, d, h, E, k = 9, 5, 7, 4, 2
    x = torch.randn(T, d, generator=rng)
    z = torch.randn(T, E, generator=rng)
    w1, w2, w3 = make_weights(E, d, h, act, torch.float32, rng, "cpu")
    r = pyops.moe_route(z, k, capacity_factor=0.6, backend="reference")
    assert r.dropped.any()
    y = pyops.moe_experts(x, r, w1, w2, w3, activation=act, backend="reference")
    want = literal_mlp(x, r.weights, r.experts, r.dropped, w1, w2, w3, act)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["swiglu", "relu"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_reference_gradcheck_fp64(act, score, rng):
    T, d, h, E, k = 5, 3, 4, 3, 2
    x = torch.randn(T, d, generator=rng, dtype=FP64, requires_grad=True)
    z = torch.randn(T, E, generator=rng, dtype=FP64, requires_grad=True)
    w1, w2, w3 = make_weights(E, d, h, act, FP64, rng, "cpu", requires_grad=True)
    ws = [w for w in (w1, w2, w3) if w is not None]

    def f(x, z, *ws):
        r = pyops.moe_route(z, k, score=score, backend="reference")
        return pyops.moe_experts(x, r, *ws[:2], ws[2] if len(ws) == 3 else None, activation=act, backend="reference")

    assert torch.autograd.gradcheck(f, (x, z, *ws))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_route_backward_op_matches_reference_autograd(score, renormalize, rng):
    """pyops::moe_route_backward (used by the native backends) is the reference's gradient."""
    z = torch.randn(6, 5, generator=rng, dtype=FP64, requires_grad=True)
    r = pyops.moe_route(z, 3, score=score, renormalize=renormalize, backend="reference")
    gw = torch.randn(6, 3, generator=rng, dtype=FP64)
    (want,) = torch.autograd.grad(r.weights, z, gw)
    got = torch.ops.pyops.moe_route_backward(gw, z.detach(), r.experts, 0 if score == "softmax" else 1, renormalize)
    torch.testing.assert_close(got, want)


def test_route_is_static_shaped_and_counts_dropped_in_offsets():
    z = torch.zeros(4, 2)
    z[:, 0] = 1.0
    r = pyops.moe_route(z, 1, capacity_factor=0.5, backend="reference")   # C = 1
    assert r.offsets.tolist() == [0, 4, 4]
    assert r.dropped[:, 0].tolist() == [False, True, True, True]
    assert ref.capacity(0.5, 4, 2, 1) == 1


@pytest.mark.parametrize("bad", [3, -1, 2**32], ids=["E", "minus-one", "2p32"])
def test_experts_refuse_an_expert_id_outside_0_to_E(bad, rng):
    """The per-expert loop visits experts 0..E-1 only: an id outside would silently contribute
    nothing, so the definition refuses it (there is no sentinel id; `dropped` flags drops)."""
    T, d, h, E = 4, 3, 5, 3
    x = torch.randn(T, d, generator=rng)
    w1, w2, w3 = make_weights(E, d, h, "swiglu", torch.float32, rng, "cpu")
    experts = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])
    experts[2, 1] = bad
    with pytest.raises(ValueError, match=rf"expert_ids\[2, 1\] = {bad} is out of range for 3 experts"):
        ref.experts(x, torch.full((T, 2), 0.5), experts, torch.zeros(T, 2, dtype=torch.bool), w1, w2, w3)


@pytest.mark.parametrize("cf,T,E,k,want", [(0.5, 4, 2, 1, 1), (1.0, 7, 3, 2, 5), (8.0, 7, 3, 2, 7),
                                           (2.0**62, 7, 3, 2, 7), (1e300, 1, 1, 1, 1)],
                         ids=["cf0.5", "cf1", "cf8-clamped", "cf2p62-clamped", "cf1e300-clamped"])
def test_capacity_is_ceil_cf_k_T_over_E_at_most_T(cf, T, E, k, want):
    """An expert gets at most one assignment per token, so C >= T drops nothing: C = min(ceil(cf·k·T/E), T)."""
    assert ref.capacity(cf, T, E, k) == want


def test_huge_capacity_factor_drops_nothing(rng):
    z = torch.randn(7, 3, generator=rng)
    z[:, 0] += 20.0  # every token's first choice is expert 0
    r = ref.route(z, 2, capacity_factor=2.0**62)
    assert not bool(r.dropped.any())
