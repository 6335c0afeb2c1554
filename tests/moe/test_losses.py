"""pyops.moe_losses against hand computations; gradients reach the logits."""
from __future__ import annotations

import math

import pytest
import torch

import pyops
from pyops import moe_losses as L


def test_load_balance_by_hand():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    experts = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    # f = [1, 2, 1] / 4; P = [0.3, 0.45, 0.25]; E Σ f P = 3 (0.075 + 0.225 + 0.0625)
    assert L.load_balance_loss(z, experts).item() == pytest.approx(3 * (0.3 / 4 + 0.9 / 4 + 0.25 / 4), rel=1e-6)


def test_load_balance_is_one_when_uniform():
    z = torch.zeros(8, 4)
    r = pyops.moe_route(z + torch.arange(8)[:, None].remainder(4).eq(torch.arange(4)).float() * 1e-3, 1,
                        backend="reference")
    assert L.load_balance_loss(z, r).item() == pytest.approx(1.0)


def test_z_loss_by_hand():
    z = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    want = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert L.router_z_loss(z).item() == pytest.approx(want, rel=1e-6)


def test_mutual_information_by_hand():
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    tasks = torch.tensor([0, 1, 1])
    joint = [[0.9 / 3, 0.1 / 3], [0.7 / 3, 1.3 / 3]]
    pt = [sum(r) for r in joint]
    pe = [joint[0][e] + joint[1][e] for e in range(2)]
    want = -sum(joint[t][e] * math.log(joint[t][e] / (pt[t] * pe[e])) for t in range(2) for e in range(2))
    assert L.mutual_information_loss(torch.log(p), tasks, 2).item() == pytest.approx(want, rel=1e-5)


def test_mutual_information_with_an_unused_task_is_finite():
    z = torch.randn(5, 3)
    v = L.mutual_information_loss(z, torch.zeros(5, dtype=torch.int64), 3)
    assert torch.isfinite(v) and v.item() == pytest.approx(0.0, abs=1e-6)


def test_sigmoid_probs_are_normalised():
    z = torch.randn(4, 3)
    p = L.router_probs(z, "sigmoid")
    torch.testing.assert_close(p.sum(-1), torch.ones(4))


def test_losses_are_differentiable_fp64():
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    tasks = torch.tensor([0, 1, 2, 0, 1, 2])
    experts = pyops.moe_route(z.detach(), 2, backend="reference").experts
    assert torch.autograd.gradcheck(lambda z: L.load_balance_loss(z, experts), (z,))
    assert torch.autograd.gradcheck(L.router_z_loss, (z,))
    assert torch.autograd.gradcheck(lambda z: L.mutual_information_loss(z, tasks, 3), (z,))


def test_bad_task_ids():
    z = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"task_ids: expected values in \[0, n_tasks = 2\)"):
        L.mutual_information_loss(z, torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="task_ids: expected an integer tensor"):
        L.mutual_information_loss(z, torch.tensor([0, 1]), 2)
