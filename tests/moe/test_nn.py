"""pyops.nn.TaskMoE: per-task routers, aux losses and statistics, noisy gating, compile."""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_close
from .cases import FP32, grads_tol, require
from pyops.moe import reference as ref
from pyops.testing import tolerance_for


def literal_layer(m: pyops.nn.TaskMoE, x, task_ids):
    """Each token through its own task's router, then the reference layer."""
    xt = x.reshape(-1, m.d_model)
    z = torch.stack([xt[t] @ m.router[int(task_ids[t])] for t in range(xt.shape[0])])
    y = ref.moe(xt, z, m.k, m.w1, m.w2, m.w3, activation_name=m.activation, capacity_factor=m.capacity_factor)
    return y.reshape(x.shape), z


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_per_token_task_routers(backend, rng):
    if backend != "reference":
        require(backend)
    torch.manual_seed(0)
    m = pyops.nn.TaskMoE(6, 8, 4, 2, n_tasks=3, capacity_factor=1.5, backend=backend)
    x = torch.randn(2, 5, 6, generator=rng)
    tasks = torch.randint(0, 3, (2, 5), generator=rng)
    y, aux = m(x, tasks)
    want, z = literal_layer(m, x, tasks.reshape(-1))
    assert_close(y, want, tolerance_for(FP32), "y")
    assert set(aux) == {"load_balance", "z_loss", "mutual_information", "tokens_per_expert", "dropped_fraction",
                        "task_expert_usage"}
    r = pyops.moe_route(z, 2, capacity_factor=1.5, backend="reference")
    assert aux["tokens_per_expert"].tolist() == (r.offsets[1:] - r.offsets[:-1]).tolist()
    assert aux["dropped_fraction"].item() == pytest.approx(r.dropped.float().mean().item())
    usage = torch.zeros(3, 4, dtype=torch.int64)
    for t in range(10):
        for j in range(2):
            usage[int(tasks.reshape(-1)[t]), int(r.experts[t, j])] += 1
    assert torch.equal(aux["task_expert_usage"], usage)
    assert aux["load_balance"].item() == pytest.approx(pyops.moe_losses.load_balance_loss(z, r.experts).item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_group_limited_routing(backend, rng):
    """n_group / topk_group / routed_scaling reach moe_route: the layer equals the functional ops
    with the same options, and the selection stays inside the kept groups."""
    if backend != "reference":
        require(backend)
    torch.manual_seed(0)
    m = pyops.nn.TaskMoE(6, 8, 8, 2, score="sigmoid", n_group=4, topk_group=2, routed_scaling=2.5, backend=backend)
    x = torch.randn(11, 6, generator=rng)
    y, aux = m(x)
    z = x @ m.router[0]
    r = pyops.moe_route(z, 2, score="sigmoid", n_group=4, topk_group=2, routed_scaling=2.5, backend="reference")
    want = pyops.moe_experts(x, r, m.w1, m.w2, m.w3, backend="reference")
    assert_close(y, want, tolerance_for(FP32), "y")
    assert torch.equal(aux["tokens_per_expert"], r.offsets[1:] - r.offsets[:-1])
    groups = (r.experts.long() // 2)
    assert int(torch.stack([(groups == g).any(-1) for g in range(4)], -1).sum(-1).max()) <= 2
    assert "n_group=4, topk_group=2" in repr(m) and "routed_scaling=2.5" in repr(m)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_group=4), "topk_group: expected an int together with n_group"),
    (dict(n_group=3, topk_group=1), "n_group: expected a positive divisor of E = 8"),
    (dict(n_group=4, topk_group=1, k=3), r"k: expected k <= topk_group·E/n_group"),
    (dict(routed_scaling=0.0), "routed_scaling: expected a finite number > 0"),
], ids=["n_group-alone", "n_group-not-divisor", "k-beyond-kept-experts", "scaling-zero"])
def test_group_arguments_are_checked_at_construction(kwargs, match):
    k = kwargs.pop("k", 2)
    with pytest.raises(ValueError, match=match):
        pyops.nn.TaskMoE(6, 8, 8, k, **kwargs)


def test_task_ids_per_batch_row_and_int(rng):
    m = pyops.nn.TaskMoE(4, 5, 3, 1, n_tasks=2, activation="relu", backend="reference")
    x = torch.randn(2, 3, 4, generator=rng)
    y_rows, _ = m(x, torch.tensor([1, 0]))
    y_full, _ = m(x, torch.tensor([[1, 1, 1], [0, 0, 0]]))
    assert torch.equal(y_rows, y_full)
    y_int, _ = m(x, 1)
    y_ones, _ = m(x, torch.ones(2, 3, dtype=torch.int64))
    assert torch.equal(y_int, y_ones)


def test_gradients_reach_every_parameter(rng):
    m = pyops.nn.TaskMoE(4, 6, 3, 2, n_tasks=2, noisy_gating=True)
    x = torch.randn(7, 4, generator=rng)
    y, aux = m(x, torch.tensor([0, 1, 0, 1, 1, 0, 0]))
    (y.square().sum() + aux["load_balance"] + aux["z_loss"] + aux["mutual_information"]).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert m.router.grad.abs().sum() > 0


def test_noisy_gating_only_in_training(rng):
    m = pyops.nn.TaskMoE(4, 6, 3, 1, noisy_gating=True, backend="reference")
    with torch.no_grad():
        m.w_noise.fill_(1.0)
    x = torch.randn(16, 4, generator=rng)
    m.eval()
    a, _ = m(x)
    b, _ = m(x)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(1)
    c, _ = m(x)
    torch.manual_seed(2)
    d, _ = m(x)
    assert not torch.equal(c, d)


def test_bad_inputs():
    m = pyops.nn.TaskMoE(4, 6, 3, 2, n_tasks=2)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="task_ids: this TaskMoE has n_tasks = 2"):
        m(x)
    with pytest.raises(ValueError, match=r"task_ids: expected values in \[0, n_tasks = 2\)"):
        m(x, torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="task_ids: expected shape"):
        m(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="x: expected a tensor"):
        m(torch.randn(5, 3), 0)
    with pytest.raises(ValueError, match="k: expected an int with 1 <= k <= n_experts = 3"):
        pyops.nn.TaskMoE(4, 6, 3, 4)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_no_graph_break(compiler, rng):
    require("cpu")
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        m = pyops.nn.TaskMoE(8, 12, 4, 2, n_tasks=2, capacity_factor=1.25, backend="cpu")
        x = torch.randn(3, 5, 8, generator=rng)
        tasks = torch.randint(0, 2, (3, 5), generator=rng)

        def step(x, tasks):
            y, aux = m(x, tasks)
            return y, aux["load_balance"] + aux["z_loss"] + aux["mutual_information"], aux["task_expert_usage"]

        outs = []
        for fn in (step, torch.compile(step, fullgraph=True, backend=compiler)):
            m.zero_grad()
            y, loss, usage = fn(x, tasks)
            (y.square().sum() + loss).backward()
            outs.append((y, loss, usage, {n: p.grad.clone() for n, p in m.named_parameters()}))
        (y_e, l_e, u_e, g_e), (y_c, l_c, u_c, g_c) = outs
        assert_close(y_c, y_e, tolerance_for(FP32), "y")
        assert_close(l_c, l_e, tolerance_for(FP32), "aux loss")
        assert torch.equal(u_c, u_e)
        for n in g_e:
            assert_close(g_c[n], g_e[n], grads_tol("w1", FP32), f"grad of {n}")
    finally:
        torch._dynamo.reset()
