"""Expert parallelism (pyops.moe.parallel, TaskMoE(ep_group=...)) on 2 and 4 gloo ranks.

Each scenario builds the single-process layer holding all experts and, on every rank, the
expert-parallel layer with that rank's slice of the same weights. The global batch is split
rank-major (uneven, some ranks empty); every rank runs forward and backward of
``Σ(y·g) + load_balance + z_loss (+ mutual_information)`` on its tokens. Then, against the
single-process layer on the concatenated batch: each rank's y and dx are its rows, the losses
and statistics are the global ones, the expert gradients are the rank's slice, and the router
gradients summed over ranks are the single-process ones (docs/distributed.md#gradients).
The processes are started once per world size (module-scoped fixtures); each test checks one
behaviour of the recorded results.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch
import torch.distributed as dist

import pyops
from _distributed import run_ranks
from _support import assert_close
from pyops.testing import tolerance_for

FP32 = torch.float32


class Scenario(NamedTuple):
    name: str
    tokens: tuple            # tokens per rank
    E: int
    k: int
    capacity_factor: Optional[float] = None
    n_tasks: int = 1
    activation: str = "swiglu"
    score: str = "softmax"


SCENARIOS = {
    2: [Scenario("uneven-T37+20-E4-k2-tasks2", (37, 20), 4, 2, n_tasks=2),
        Scenario("capacity0.5-T40+24-E4-k2", (40, 24), 4, 2, capacity_factor=0.5),
        Scenario("empty-rank-T0+33-E4-k2-gelu", (0, 33), 4, 2, activation="gelu"),
        Scenario("empty-experts-T3+2-E8-k1-sigmoid", (3, 2), 8, 1, score="sigmoid")],
    4: [Scenario("uneven-T10+0+25+7-E8-k2-cap1.0-tasks3", (10, 0, 25, 7), 8, 2, capacity_factor=1.0, n_tasks=3)],
}
D, H = 12, 16
LOSSES = ("load_balance", "z_loss", "mutual_information")
STATS = ("tokens_per_expert", "dropped_fraction", "task_expert_usage")


def _data(s: Scenario):
    g = torch.Generator().manual_seed(7)
    T = sum(s.tokens)
    x = torch.randn(T, D, generator=g, dtype=torch.float64).float()
    tasks = torch.randint(0, s.n_tasks, (T,), generator=g)
    gy = torch.randn(T, D, generator=g, dtype=torch.float64).float()
    return x, tasks, gy


def _full(s: Scenario) -> pyops.nn.TaskMoE:
    torch.manual_seed(11)
    return pyops.nn.TaskMoE(D, H, s.E, s.k, n_tasks=s.n_tasks, activation=s.activation,
                            capacity_factor=s.capacity_factor, score=s.score)


def _step(m, x, tasks, gy):
    x = x.clone().requires_grad_()
    y, aux = m(x, tasks if m.n_tasks > 1 else None)
    loss = (y * gy).sum() + sum(aux[n] for n in LOSSES if n in aux)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    return {"y": y.detach(), "dx": x.grad, "aux": {n: v.detach() for n, v in aux.items()}, "grads": grads}


def _ep_worker(rank: int, world: int, scenarios):
    out = {}
    for s in scenarios:
        full = _full(s)
        m = pyops.nn.TaskMoE(D, H, s.E, s.k, n_tasks=s.n_tasks, activation=s.activation,
                             capacity_factor=s.capacity_factor, score=s.score, ep_group=dist.group.WORLD)
        lo, n = m.expert_offset, s.E // world
        with torch.no_grad():
            m.router.copy_(full.router)
            for name in ("w1", "w2", "w3"):
                if getattr(m, name) is not None:
                    getattr(m, name).copy_(getattr(full, name)[lo:lo + n])
        x, tasks, gy = _data(s)
        a = sum(s.tokens[:rank])
        sl = slice(a, a + s.tokens[rank])
        out[s.name] = _step(m, x[sl], tasks[sl], gy[sl])
    # Bad input on one rank: every rank raises (no rank waits forever in a collective).
    errors = {}
    try:
        pyops.nn.TaskMoE(D, H, 3, 1, ep_group=dist.group.WORLD)
    except ValueError as exc:
        errors["indivisible"] = str(exc)
    z = torch.randn(5, 4)
    r = pyops.moe_route(z, 1 if rank == 0 else 2)
    try:
        pyops.moe.parallel.dispatch(torch.randn(5, D), r, dist.group.WORLD)
    except (ValueError, RuntimeError) as exc:
        errors["k_mismatch"] = str(exc)
    r = pyops.moe_route(z, 2)
    try:
        pyops.moe.parallel.dispatch(torch.randn(5 if rank else 4, D), r, dist.group.WORLD)
    except (ValueError, RuntimeError) as exc:
        errors["bad_x_one_rank"] = str(exc)
    out["errors"] = errors
    out["fsdp2"] = _train_fsdp2_ep(rank, world)
    return out


RECIPE = Scenario("fsdp2-recipe-T9+14+5+8-E4-k2-tasks2-cap1.5", (9, 14, 5, 8), 4, 2, capacity_factor=1.5, n_tasks=2)
STEPS, LR = 2, 0.05


def _recipe_step(m, x, tasks, gy, opt, scale=1.0):
    y, aux = m(x, tasks)
    loss = ((y * gy).sum() + aux["load_balance"] + aux["z_loss"] + aux["mutual_information"]) * scale
    opt.zero_grad()
    loss.backward()
    opt.step()


def _train_fsdp2_ep(rank: int, world: int):
    """docs/distributed.md's recipe: experts expert-parallel (outside FSDP), the replicated router
    sharded by FSDP2, which averages its gradients over the W ranks; the expert gradients are
    divided by W to match. STEPS SGD steps: those of the single-process layer on the concatenated
    batch with the objective divided by W."""
    from torch.distributed.fsdp import fully_shard

    s = RECIPE._replace(tokens=RECIPE.tokens[:world])
    full = _full(s)
    m = pyops.nn.TaskMoE(D, H, s.E, s.k, n_tasks=s.n_tasks, capacity_factor=s.capacity_factor,
                         ep_group=dist.group.WORLD)
    lo, n = m.expert_offset, s.E // world
    with torch.no_grad():
        m.router.copy_(full.router)
        for name in ("w1", "w2", "w3"):
            getattr(m, name).copy_(getattr(full, name)[lo:lo + n])
    fully_shard(m, ignored_params={m.w1, m.w2, m.w3})
    for p in (m.w1, m.w2, m.w3):
        p.register_hook(lambda g: g / world)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    x, tasks, gy = _data(s)
    sl = _rows(s, rank)
    for _ in range(STEPS):
        _recipe_step(m, x[sl], tasks[sl], gy[sl], opt)
    return {"router": m.router.full_tensor().detach(), "is_dtensor": {n: hasattr(p, "full_tensor") for n, p in
                                                                     m.named_parameters()},
            **{name: getattr(m, name).detach().clone() for name in ("w1", "w2", "w3")}}


@pytest.fixture(scope="module", params=sorted(SCENARIOS), ids=lambda w: f"world{w}")
def ep_run(request):
    world = request.param
    return world, run_ranks(_ep_worker, world, SCENARIOS[world])


@pytest.fixture(scope="module")
def single():
    out = {}
    for scenarios in SCENARIOS.values():
        for s in scenarios:
            x, tasks, gy = _data(s)
            out[s.name] = _step(_full(s), x, tasks, gy)
    return out


def _each(ep_run, single):
    world, results = ep_run
    for s in SCENARIOS[world]:
        yield s, world, [res[s.name] for res in results], single[s.name]


def _rows(s: Scenario, rank: int) -> slice:
    a = sum(s.tokens[:rank])
    return slice(a, a + s.tokens[rank])


def test_outputs_are_the_single_process_rows(ep_run, single):
    for s, world, ranks, want in _each(ep_run, single):
        for r in range(world):
            assert_close(ranks[r]["y"], want["y"][_rows(s, r)], tolerance_for(FP32), f"{s.name} rank {r} y")


def test_input_gradients_are_the_single_process_rows(ep_run, single):
    for s, world, ranks, want in _each(ep_run, single):
        for r in range(world):
            assert_close(ranks[r]["dx"], want["dx"][_rows(s, r)], tolerance_for(FP32), f"{s.name} rank {r} dx")


def test_losses_are_global_and_equal_on_every_rank(ep_run, single):
    for s, world, ranks, want in _each(ep_run, single):
        for name in LOSSES:
            if name in want["aux"]:
                for r in range(world):
                    assert_close(ranks[r]["aux"][name], want["aux"][name], tolerance_for(FP32), f"{s.name} {name}")


def test_statistics_are_global(ep_run, single):
    for s, world, ranks, want in _each(ep_run, single):
        for name in STATS:
            for r in range(world):
                got = ranks[r]["aux"][name]
                if got.is_floating_point():
                    assert got.item() == pytest.approx(want["aux"][name].item(), rel=1e-6), (s.name, name)
                else:
                    assert torch.equal(got, want["aux"][name]), (s.name, name, r)


def test_capacity_drops_what_the_single_process_layer_drops(ep_run, single):
    for s, world, ranks, want in _each(ep_run, single):
        if s.capacity_factor is not None:
            assert want["aux"]["dropped_fraction"].item() > 0, f"{s.name}: the scenario must drop something"


def test_expert_gradients_are_the_ranks_slice(ep_run, single):
    for s, world, ranks, want in _each(ep_run, single):
        n = s.E // world
        for r in range(world):
            for name in ("w1", "w2", "w3"):
                if name in want["grads"]:
                    assert_close(ranks[r]["grads"][name], want["grads"][name][r * n:(r + 1) * n],
                                 tolerance_for(FP32), f"{s.name} rank {r} d{name}")


def test_router_gradients_sum_to_the_single_process_gradient(ep_run, single):
    for s, world, ranks, want in _each(ep_run, single):
        total = sum(ranks[r]["grads"]["router"] for r in range(world))
        assert_close(total, want["grads"]["router"], tolerance_for(FP32), f"{s.name} drouter")


def test_experts_not_divisible_by_the_group_is_refused(ep_run):
    world, results = ep_run
    for r in range(world):
        msg = results[r]["errors"]["indivisible"]
        assert "n_experts" in msg and f"group size {world}" in msg and "got 3" in msg


def test_ranks_disagreeing_on_k_all_raise(ep_run):
    world, results = ep_run
    for r in range(world):
        assert "disagree on k" in results[r]["errors"]["k_mismatch"]


def test_bad_input_on_one_rank_raises_on_every_rank(ep_run):
    world, results = ep_run
    assert "x: expected 5 rows" in results[0]["errors"]["bad_x_one_rank"]
    for r in range(1, world):
        assert "rank(s) [0]" in results[r]["errors"]["bad_x_one_rank"]


def test_fsdp2_on_the_router_with_expert_parallel_experts_trains_like_one_process(ep_run):
    world, results = ep_run
    s = RECIPE._replace(tokens=RECIPE.tokens[:world])
    m = _full(s)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    x, tasks, gy = _data(s)
    for _ in range(STEPS):
        _recipe_step(m, x, tasks, gy, opt, scale=1 / world)
    n = s.E // world
    for r in range(world):
        got = results[r]["fsdp2"]
        assert got["is_dtensor"] == {"router": True, "w1": False, "w2": False, "w3": False}
        assert_close(got["router"], m.router.detach(), tolerance_for(FP32), f"rank {r} router")
        for name in ("w1", "w2", "w3"):
            assert_close(got[name], getattr(m, name).detach()[r * n:(r + 1) * n], tolerance_for(FP32),
                         f"rank {r} {name}")


def test_without_a_process_group_is_refused():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        pyops.moe.parallel.expert_range(4)
