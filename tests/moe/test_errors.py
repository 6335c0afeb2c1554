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


# ------------------------------------------------------------------------------------------------
# Routing indices: checked in their own dtype, on every backend, before any kernel reads them
# ------------------------------------------------------------------------------------------------

def _require(backend):
    from .cases import require
    if backend not in ("auto", "reference"):
        require(backend)


# routing.experts[3, 1] set to: E (one past the last expert), -1 (no sentinel), and int64 ids that
# int32 narrowing would turn into experts 0 and 1
BAD_EXPERT_IDS = [(3, "E"), (-1, "minus-one"), (9, "nine"), (2**32, "2p32"), (2**32 + 1, "2p32+1")]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bad", [b for b, _ in BAD_EXPERT_IDS], ids=[i for _, i in BAD_EXPERT_IDS])
def test_out_of_range_expert_id_is_refused_on_every_backend(backend, bad):
    _require(backend)
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, backend="reference")
    experts = r.experts.long() if abs(bad) >= 2**31 else r.experts.clone()
    experts[3, 1] = bad
    with pytest.raises(ValueError, match=rf"^routing.experts\[3, 1\] = {bad} is out of range for 3 experts "
                                         r"\(w1.shape\[0\]\): expert ids must be in \[0, 2\]$"):
        pyops.moe_experts(x, r._replace(experts=experts), w1, w2, w3, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_dropped_assignment_with_out_of_range_expert_id_is_refused(backend):
    """There is no sentinel id: a dropped assignment keeps a real expert id."""
    _require(backend)
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, capacity_factor=0.5, backend="reference")
    t, j = (int(i) for i in r.dropped.nonzero()[0])
    experts = r.experts.clone()
    experts[t, j] = -1
    with pytest.raises(ValueError, match=rf"routing.experts\[{t}, {j}\] = -1 is out of range"):
        pyops.moe_experts(x, r._replace(experts=experts), w1, w2, w3, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bad", [10, -1, 2**40], ids=["T*k", "minus-one", "2p40"])
def test_order_entry_out_of_range_is_refused_on_every_backend(backend, bad):
    _require(backend)
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, backend="reference")
    order = r.order.clone()
    order[4] = bad
    with pytest.raises(ValueError, match=rf"^routing.order\[4\] = {bad} is out of range: .* \[0, 9\]"):
        pyops.moe_experts(x, r._replace(order=order), w1, w2, w3, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("offsets", [[0, 4, 3, 10], [1, 4, 7, 10], [0, 4, 7, 11]],
                         ids=["decreasing", "not-from-0", "not-to-T*k"])
def test_offsets_not_a_prefix_sum_is_refused_on_every_backend(backend, offsets):
    _require(backend)
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, backend="reference")
    with pytest.raises(ValueError, match=r"^routing.offsets: expected a non-decreasing prefix sum from 0 to T\*k = 10"):
        pyops.moe_experts(x, r._replace(offsets=torch.tensor(offsets)), w1, w2, w3, backend=backend)


def test_the_callers_routing_is_not_modified():
    x, z, w1, w2, w3 = problem()
    r = pyops.moe_route(z, 2, backend="reference")
    before = [t.clone() for t in r]
    pyops.moe_experts(x, r, w1, w2, w3)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(r, before))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("cf", [2.0**62, 1e30, 1e300], ids=["2p62", "1e30", "1e300"])
def test_huge_capacity_factor_drops_nothing(backend, cf):
    """A capacity past int64 is no capacity at all, not a dispatcher error or a wrapped compare."""
    _require(backend)
    _, z, *_ = problem()
    r = pyops.moe_route(z, 2, capacity_factor=cf, backend=backend)
    assert not bool(r.dropped.any())


def test_task_moe_task_id_error_names_the_token():
    m = pyops.nn.TaskMoE(4, 3, 3, 2, n_tasks=2)
    task_ids = torch.tensor([[0, 1, 1], [1, 2**32, 0]])
    with pytest.raises(ValueError, match=r"task_ids: expected values in \[0, n_tasks = 2\), got 4294967296 "
                                         r"\(token 4 of"):
        m(torch.randn(2, 3, 4), task_ids)


# ------------------------------------------------------------------------------------------------
# Meta and fake tensors: shapes only, no data-dependent checks
# ------------------------------------------------------------------------------------------------

def _shapes(result):
    return [(tuple(t.shape), t.dtype, t.device.type) for t in result]


ROUTE_SHAPES = [((5, 2), torch.float32, "meta"), ((5, 2), torch.int32, "meta"), ((10,), torch.int64, "meta"),
                ((4,), torch.int64, "meta"), ((5, 2), torch.bool, "meta")]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("cf", [None, 1.0], ids=["no-capacity", "cf1"])
def test_meta_route_gives_meta_outputs(backend, cf):
    _, z, *_ = problem()
    r = pyops.moe_route(z.to("meta"), 2, capacity_factor=cf, bias=torch.zeros(3, device="meta"), backend=backend)
    assert _shapes(r) == ROUTE_SHAPES


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_meta_experts_give_a_meta_output(backend):
    x, z, w1, w2, w3 = problem()
    r = pyops.Routing(*(t.to("meta") for t in pyops.moe_route(z, 2, backend="reference")))
    xm = x.to("meta").requires_grad_()
    y = pyops.moe_experts(xm, r, w1.to("meta"), w2.to("meta"), w3.to("meta"), backend=backend)
    assert _shapes([y]) == [((5, 4), torch.float32, "meta")]
    y.sum().backward()
    assert _shapes([xm.grad]) == [((5, 4), torch.float32, "meta")]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_meta_experts_on_a_kernel_backend_get_a_clear_error(backend):
    x, z, w1, w2, w3 = problem()
    r = pyops.Routing(*(t.to("meta") for t in pyops.moe_route(z, 2, backend="reference")))
    with pytest.raises(pyops.BackendUnavailableError, match=rf"backend '{backend}' cannot run this call: .*meta"):
        pyops.moe_experts(x.to("meta"), r, w1.to("meta"), w2.to("meta"), w3.to("meta"), backend=backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fake_layer_gives_fake_outputs(backend):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    x, z, w1, w2, w3 = problem()
    mode = FakeTensorMode()
    with mode:
        fx, fz, f1, f2, f3 = (mode.from_tensor(t) for t in (x, z, w1, w2, w3))
        r = pyops.moe_route(fz, 2, capacity_factor=1.0, backend=backend)
        y = pyops.moe_experts(fx, r, f1, f2, f3, backend=backend)
    assert isinstance(y, FakeTensor) and tuple(y.shape) == (5, 4)


def test_meta_task_moe_runs():
    # one task: mutual_information_loss (pyops/moe/losses.py, n_tasks > 1) still reads task ids on meta
    m = pyops.nn.TaskMoE(4, 3, 3, 2).to("meta")
    y, aux = m(torch.randn(2, 3, 4, device="meta"))
    assert _shapes([y, aux["load_balance"]]) == [((2, 3, 4), torch.float32, "meta"), ((), torch.float32, "meta")]
