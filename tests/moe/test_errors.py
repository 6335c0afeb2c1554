"""Bad input gets a clear error naming the argument (docs/design.md#errors), on every backend's path."""
from __future__ import annotations

import pytest
import torch

import pyops
from .cases import make_weights


def problem(T=5, d=4, h=3, E=3, k=2, act="swiglu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g)
    z = torch.randn(T, E, generator=g)
    w1, w2, w3 = make_weights(E, d, h, act, torch.float32, g, "cpu")
    return x, z, w1, w2, w3


@pytest.mark.parametrize("k", [0, -1, 4])
def test_k_out_of_range(k):
    _, z, *_ = problem()
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= E = 3"):
        pyops.moe_route(z, k)


def test_k_not_int():
    _, z, *_ = problem()
    with pytest.raises(TypeError, match="k: expected an int"):
        pyops.moe_route(z, 1.0)


@pytest.mark.parametrize("cf", [0.0, -1.0, float("nan"), float("inf")], ids=str)
def test_capacity_factor_must_be_positive(cf):
    _, z, *_ = problem()
    with pytest.raises(ValueError, match="capacity_factor"):
        pyops.moe_route(z, 2, capacity_factor=cf)


def test_logits_must_be_2d_float():
    with pytest.raises(ValueError, match=r"logits: expected shape \[T, E\]"):
        pyops.moe_route(torch.zeros(2, 3, 4), 1)
    with pytest.raises(TypeError, match="logits: expected a floating-point tensor"):
        pyops.moe_route(torch.zeros(2, 3, dtype=torch.int64), 1)


def test_bad_score_and_bias():
    _, z, *_ = problem()
    with pytest.raises(ValueError, match="score"):
        pyops.moe_route(z, 1, score="tanh")
    with pytest.raises(ValueError, match=r"bias: expected shape \[3\]"):
        pyops.moe_route(z, 1, bias=torch.zeros(4))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nan_inf_logits_reference(bad):
    _, z, *_ = problem()
    z[3, 1] = float(bad)
    with pytest.raises(ValueError, match="logits: contains NaN/inf at token 3"):
        pyops.moe_route(z, 2, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_token_count_mismatch(backend):
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, backend="reference")
    with pytest.raises(ValueError, match=r"routing.weights: expected shape \[T, k\] with T = 4"):
        pyops.moe_experts(x[:4], r, w1, w2, w3, backend=backend)


@pytest.mark.parametrize("which,shape,msg", [
    ("w1", (3, 5, 3), r"w1: expected shape \[E, d, hidden\] with d = 4"),
    ("w1", (2, 4, 3), r"routing.offsets: expected shape \[3\]"),
    ("w2", (3, 4, 4), r"w2: expected shape \[3, 3, 4\]"),
    ("w3", (3, 4, 5), r"w3: expected shape \[3, 4, 3\]"),
], ids=["w1-3x5x3", "w1-2x4x3", "w2-3x4x4", "w3-3x4x5"])
def test_weight_shapes_disagree(which, shape, msg):
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, backend="reference")
    ws = {"w1": w1, "w2": w2, "w3": w3}
    ws[which] = torch.zeros(shape)
    with pytest.raises(ValueError, match=msg):
        pyops.moe_experts(x, r, **ws)


def test_glu_needs_w3_and_plain_refuses_it():
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, backend="reference")
    with pytest.raises(ValueError, match="w3: activation 'swiglu' is a GLU and needs w3"):
        pyops.moe_experts(x, r, w1, w2)
    with pytest.raises(ValueError, match="w3: only the GLU activations"):
        pyops.moe_experts(x, r, w1, w2, w3, activation="relu")


def test_unknown_activation():
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, backend="reference")
    with pytest.raises(ValueError, match="activation: expected one of"):
        pyops.moe_experts(x, r, w1, w2, w3, activation="tanh")


def test_weight_dtype_must_match_x():
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, backend="reference")
    with pytest.raises(TypeError, match="w2: expected dtype torch.float32"):
        pyops.moe_experts(x, r, w1, w2.half(), w3)


def test_routing_must_be_a_routing():
    x, z, w1, w2, w3 = problem()
    with pytest.raises(TypeError, match="routing: expected the Routing"):
        pyops.moe_experts(x, z, w1, w2, w3)


def test_routing_index_dtypes():
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, backend="reference")
    with pytest.raises(TypeError, match="routing.order: expected dtype torch.int64"):
        pyops.moe_experts(x, r._replace(order=r.order.int()), w1, w2, w3)
    with pytest.raises(TypeError, match="routing.dropped: expected dtype torch.bool"):
        pyops.moe_experts(x, r._replace(dropped=r.dropped.int()), w1, w2, w3)


def test_cpu_rejects_inconsistent_routing():
    """Native kernels never trust order/offsets: a routing that disagrees is an error, not an OOB write."""
    from .cases import require
    require("cpu")
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, backend="reference")
    bad_order = r.order.clone()
    bad_order[0] = 10_000
    with pytest.raises(ValueError, match="routing.order"):
        pyops.moe_experts(x, r._replace(order=bad_order), w1, w2, w3, backend="cpu")
    bad_offsets = r.offsets.clone()
    bad_offsets[-1] = 99
    with pytest.raises(ValueError, match="routing.offsets"):
        pyops.moe_experts(x, r._replace(offsets=bad_offsets), w1, w2, w3, backend="cpu")
    swapped = r.order.flip(0)
    with pytest.raises(ValueError, match="routing"):
        pyops.moe_experts(x, r._replace(order=swapped), w1, w2, w3, backend="cpu")


def test_unknown_backend():
    _, z, *_ = problem()
    with pytest.raises(ValueError, match="backend"):
        pyops.moe_route(z, 1, backend="fast")
    with pytest.raises(pyops.BackendUnavailableError, match="triton"):
        pyops.moe_route(z, 1, backend="triton")


def test_bias_must_be_finite():
    _, z, *_ = problem()
    with pytest.raises(ValueError, match="bias: contains NaN/inf"):
        pyops.moe_route(z, 1, bias=torch.tensor([0.0, float("nan"), 0.0]))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_tokens(backend):
    from .cases import require
    if backend != "reference":
        require(backend)
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z[:0], 2, backend=backend)
    assert r.offsets.tolist() == [0, 0, 0, 0] and r.order.numel() == 0
    y = pyops.moe_experts(x[:0], r, w1, w2, w3, backend=backend)
    assert y.shape == (0, 4)
