"""Learned model merging with `pyops.nn.TaskVectorComposition` (aTLAS / AdaMerging style).

A small MLP is "pretrained" on a generic synthetic task, fine-tuned separately on three
synthetic tasks, and the three fine-tuned models are merged back into one:

* plain task arithmetic, θ = θ_base + 0.3·Σᵢ τᵢ (the usual fixed coefficient), and
* learned merging: coefficients λ (one per task and parameter tensor, or per task and row)
  trained with Adam while every weight stays frozen.

The coefficients are learned with a *supervised* loss (cross-entropy) on a small labelled
held-out set of each task (256 examples per task, never used for evaluation). AdaMerging instead
minimises the prediction entropy on unlabelled test inputs; swapping the loss is one line
(see `entropy_loss` below). Accuracies are measured on separate test sets.

The tasks: inputs of task t are ``z + μ_t`` (z ~ N(0, I), a task-specific mean μ_t), labels are
``argmax(A_t·x)`` over 4 classes with a task-specific random A_t. One network can solve all three
(their inputs live in different regions), but each fine-tuning run pulls the shared weights its
own way, so merging with a single fixed λ loses accuracy that learned λ recovers.

Run: ``python examples/learned_merging.py`` (CPU, well under a minute on two cores).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import pyops
from pyops.nn import TaskVectorComposition

D_IN, HIDDEN, N_CLASSES, N_TASKS = 16, 64, 4, 3
SEED = 0
HELD_OUT = 256  # labelled examples per task for learning λ
LAMBDA_STEPS = 200


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                         nn.Linear(HIDDEN, N_CLASSES))


class Task:
    """Inputs spread·z + μ (z ~ N(0, I), |μ| = shift); labels argmax(A·x)."""

    def __init__(self, gen: torch.Generator, shift: float, spread: float = 1.0):
        mu = torch.randn(D_IN, generator=gen)
        self.mu = mu / mu.norm() * shift
        self.spread = spread
        self.A = torch.randn(N_CLASSES, D_IN, generator=gen)

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, D_IN, generator=gen) * self.spread + self.mu
        return x, (x @ self.A.T).argmax(dim=1)


def train(model: nn.Module, task: Task, steps: int, lr: float, gen: torch.Generator, batch: int = 128) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = task.sample(batch, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = data
    return float((model(x).argmax(dim=1) == y).float().mean())


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """AdaMerging's unsupervised objective (mean prediction entropy); not used here."""
    p = logits.softmax(dim=1)
    return -(p * logits.log_softmax(dim=1)).sum(dim=1).mean()


def learn_coefficients(comp: TaskVectorComposition, held_out: list, steps: int, lr: float, label: str) -> list:
    """Adam on λ only, supervised cross-entropy on the union of the tasks' held-out sets."""
    x = torch.cat([h[0] for h in held_out])
    y = torch.cat([h[1] for h in held_out])
    opt = torch.optim.Adam([p for p in comp.parameters() if p.requires_grad], lr=lr)
    losses = []
    print(f"\nlearning λ ({label}: {comp.n_coefficients()} coefficients, "
          f"{sum(p.numel() for p in comp.base_module.parameters())} frozen weights)")
    for step in range(steps + 1):
        loss = F.cross_entropy(comp(x), y)
        losses.append(loss.item())
        if step % 25 == 0:
            print(f"  step {step:4d}  loss {losses[-1]:.4f}")
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return losses


def main() -> None:
    t0 = time.perf_counter()
    # The matrices here are tiny (64 wide): one thread beats two, whose per-op synchronisation
    # dominates at this size (and on a loaded machine costs ten times more).
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    # "Pretraining": a generic task on wide inputs (covering every task's region).
    pretrain_task = Task(gen, shift=0.0, spread=2.0)
    tasks = [Task(gen, shift=3.0) for _ in range(N_TASKS)]
    pretrained = make_mlp()
    train(pretrained, pretrain_task, steps=300, lr=2e-3, gen=gen)

    # Fine-tune one copy per task; task vectors τᵢ = θᵢ − θ_base.
    finetuned = []
    for task in tasks:
        model = copy.deepcopy(pretrained)
        train(model, task, steps=300, lr=1e-3, gen=gen)
        finetuned.append(model)
    base_params = dict(pretrained.named_parameters())
    task_vectors = [{n: (p - base_params[n]).detach() for n, p in m.named_parameters()} for m in finetuned]

    held_out = [task.sample(HELD_OUT, gen) for task in tasks]    # labelled, for learning λ only
    test_sets = [task.sample(4000, gen) for task in tasks]  # for the accuracies below

    # Plain task arithmetic with the usual fixed coefficient (the fused op, no learning).
    fixed = copy.deepcopy(pretrained)
    with torch.no_grad():
        for name, p in fixed.named_parameters():
            pyops.task_arithmetic(p, [tv[name] for tv in task_vectors], [0.3] * N_TASKS, out=p)

    print(f"pretrained, fine-tuned on {N_TASKS} tasks; learning λ with a supervised objective: cross-entropy on "
          f"{HELD_OUT} labelled held-out examples per task (AdaMerging would minimise entropy on unlabelled inputs)")

    # Learned merging, two granularities (the fine-tuned models are passed directly: the
    # fused op forms θᵢ − θ_base on the fly).
    results = {}
    curves = {}
    for granularity, label in (("tensor", "one λ per task and tensor"), ("rows", "one λ per task and row")):
        comp = TaskVectorComposition(copy.deepcopy(pretrained), finetuned, granularity=granularity, init=0.3)
        curves[granularity] = learn_coefficients(comp, held_out, steps=LAMBDA_STEPS, lr=0.05, label=label)
        results[granularity] = comp.merge_and_unload()
        if granularity == "tensor":
            lam = torch.stack([c.detach()[:, 0] for c in comp.coefficients().values()])  # [tensors, N]
            print("  learned λ per task (mean over tensors): "
                  + ", ".join(f"task {i}: {float(v):.3f}" for i, v in enumerate(lam.mean(dim=0))))

    columns = [
        ("pretrained", [pretrained] * N_TASKS),
        ("fine-tuned*", finetuned),
        ("TA λ=0.3", [fixed] * N_TASKS),
        ("learned/tensor", [results["tensor"]] * N_TASKS),
        ("learned/rows", [results["rows"]] * N_TASKS),
    ]
    table = [[accuracy(models[t], test_sets[t]) for _, models in columns] for t in range(N_TASKS)]
    print("\ntest accuracy (4000 examples per task, 4 classes; * = each task's own fine-tuned model)")
    print(f"{'task':<8}" + "".join(f"{name:>16}" for name, _ in columns))
    for t, row in enumerate(table):
        print(f"{f'task {t}':<8}" + "".join(f"{100 * a:>15.1f}%" for a in row))
    means = [sum(col) / N_TASKS for col in zip(*table)]
    print(f"{'mean':<8}" + "".join(f"{100 * a:>15.1f}%" for a in means))
    for g, c in curves.items():
        print(f"λ-learning loss ({g}): {c[0]:.4f} -> {c[-1]:.4f}")
    print(f"total time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
