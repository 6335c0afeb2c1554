"""Every `pyops.nn` module trains under DDP and FSDP2 (fully_shard) as it does in one process.

Data parallelism over W ranks optimises the mean of the ranks' losses, each on its own batch; so
the single-process oracle evaluates each rank's batch with the same module and averages the
losses. Two SGD steps on 2 gloo ranks must give the oracle's losses and parameters (fp32 within
rounding). pyops' ops see ordinary local tensors after DDP's broadcast / FSDP's all-gather, so
this holds for every backend; the C++ kernels run here. One module is also trained compiled
(`torch.compile` of the wrapped module, both wrappers). The processes start once (a module-scoped
fixture); each test checks one module's recorded results. Expert parallelism combined with FSDP2
on the replicated parameters is checked in tests/moe/test_expert_parallel.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import pyops
from _distributed import run_ranks
from _support import assert_close
from pyops.testing import tolerance_for

WORLD = 2
STEPS = 2
LR = 0.1


class _Base(nn.Module):
    """A tiny model for TaskVectorComposition."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _composition() -> nn.Module:
    base = _Base()
    tvs = [{n: torch.randn_like(p) * 0.1 for n, p in base.named_parameters()} for _ in range(3)]
    return pyops.nn.TaskVectorComposition(base, tvs, granularity="rows")


# name -> (module factory, input factory(generator), loss(module output, generator))
def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _moe_loss(y, g):
    out, aux = y
    return (out * torch.randn(out.shape, generator=g)).sum() + aux["load_balance"] + aux["z_loss"] \
        + aux["mutual_information"]


def _plain_loss(y, g):
    out = _out(y)
    return (out * torch.randn(out.shape, generator=g)).sum()


MODULES = {
    "NeighborhoodAttention1D-C8-h2-k3": (lambda: pyops.nn.NeighborhoodAttention1D(8, 2, 3, rel_pos_bias=True),
                                         lambda g: ((torch.randn(2, 9, 8, generator=g),), {}), _plain_loss),
    "NeighborhoodAttention2D-C8-h2-k3-dil2": (lambda: pyops.nn.NeighborhoodAttention2D(8, 2, 3, dilation=2),
                                              lambda g: ((torch.randn(2, 7, 6, 8, generator=g),), {}), _plain_loss),
    "NeighborhoodAttention3D-C8-h2-k3": (lambda: pyops.nn.NeighborhoodAttention3D(8, 2, 3, rel_pos_bias=True),
                                         lambda g: ((torch.randn(1, 4, 3, 5, 8, generator=g),), {}), _plain_loss),
    "TaskMaskedMultiheadAttention-E8-h2-groups": (
        lambda: pyops.nn.TaskMaskedMultiheadAttention(8, 2),
        lambda g: ((torch.randn(2, 11, 8, generator=g),), {"groups": torch.randint(0, 3, (2, 11), generator=g)}),
        _plain_loss),
    "TaskMoE-d8-h16-E4-k2-tasks2-cap1.0": (
        lambda: pyops.nn.TaskMoE(8, 16, 4, 2, n_tasks=2, capacity_factor=1.0),
        lambda g: ((torch.randn(2, 9, 8, generator=g),), {"task_ids": torch.randint(0, 2, (2, 9), generator=g)}),
        _moe_loss),
    "TaskVectorComposition-rows-N3": (_composition, lambda g: ((torch.randn(5, 6, generator=g),), {}), _plain_loss),
}
COMPILED = "NeighborhoodAttention1D-C8-h2-k3"


def _batch(name: str, rank: int):
    g = torch.Generator().manual_seed(1000 + rank)
    args, kwargs = MODULES[name][1](g)
    return args, kwargs, g


def _build(name: str) -> nn.Module:
    torch.manual_seed(3)
    return MODULES[name][0]()


def _full_params(m: nn.Module) -> dict:
    out = {}
    for n, p in m.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        for prefix in ("_orig_mod.", "module."):  # torch.compile's and DDP's wrappers
            n = n[len(prefix):] if n.startswith(prefix) else n
        out[n] = t.detach().clone()
    return out


def _train(name: str, wrap: str, rank: int, compiled: bool = False):
    """STEPS SGD steps of the wrapped module on this rank's batch: (losses, final parameters)."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    m = _build(name)
    if wrap == "ddp":
        m = DDP(m)
    else:
        fully_shard(m)
    if compiled:
        m = torch.compile(m)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(STEPS):
        args, kwargs, g = _batch(name, rank)
        loss = MODULES[name][2](m(*args, **kwargs), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return losses, _full_params(m)


def _worker(rank: int, world: int, names):
    out = {}
    for name in names:
        for wrap in ("ddp", "fsdp2"):
            out[(name, wrap)] = _train(name, wrap, rank)
        if name == COMPILED:
            for wrap in ("ddp", "fsdp2"):
                out[(name, wrap, "compiled")] = _train(name, wrap, rank, compiled=True)
    return out


def _oracle(name: str, world: int):
    """The mean of the ranks' losses, optimised in one process: per-rank losses and parameters."""
    m = _build(name)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=LR)
    losses = [[] for _ in range(world)]
    for step in range(STEPS):
        opt.zero_grad()
        total = 0
        for r in range(world):
            args, kwargs, g = _batch(name, r)
            loss = MODULES[name][2](m(*args, **kwargs), g)
            losses[r].append(loss.detach().clone())
            total = total + loss / world
        total.backward()
        opt.step()
    return losses, _full_params(m)


@pytest.fixture(scope="module")
def trained():
    return run_ranks(_worker, WORLD, list(MODULES))


def _check(trained, name, key):
    want_losses, want_params = _oracle(name, WORLD)
    tol = tolerance_for(torch.float32)
    for r in range(WORLD):
        losses, params = trained[r][key]
        for step in range(STEPS):
            assert_close(losses[step], want_losses[r][step], tol, f"{key} rank {r} loss at step {step}")
        assert set(params) == set(want_params)
        for n in want_params:
            assert_close(params[n], want_params[n], tol, f"{key} rank {r} {n}")


@pytest.mark.parametrize("name", list(MODULES))
def test_ddp_trains_like_one_process(trained, name):
    _check(trained, name, (name, "ddp"))


@pytest.mark.parametrize("name", list(MODULES))
def test_fsdp2_trains_like_one_process(trained, name):
    _check(trained, name, (name, "fsdp2"))


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_compiled_wrapped_module_trains_like_one_process(trained, wrap):
    _check(trained, COMPILED, (COMPILED, wrap, "compiled"))


def test_every_nn_module_is_covered():
    covered = {name.split("-")[0] for name in MODULES}
    assert covered == set(pyops.nn.__all__)
