"""Auxiliary losses of mixture-of-experts routing, computed from the routing pass (`pyops.moe_route`).

Every loss takes the router logits `[T, E]` that went into `moe_route` (so gradients reach the
router) and, where it needs the selection, the `experts [T, k]` of the returned `Routing` (or the
Routing itself). Probabilities are ``softmax(logits)`` for ``score="softmax"``; for
``score="sigmoid"`` the sigmoid scores normalised to sum to 1 per token. Each returns a 0-d fp32
tensor (fp64 for fp64 logits), differentiable w.r.t. the logits.

* `load_balance_loss(logits, experts)` — Switch Transformer: ``E · Σ_i f_i · P_i``, with
  ``f_i`` the fraction of all T·k selections that chose expert i (a count, not differentiated)
  and ``P_i`` the mean router probability of expert i over the T tokens. 1.0 when balanced.
* `router_z_loss(logits)` — ST-MoE: ``mean_t (logsumexp_e z_te)²``.
* `mutual_information_loss(logits, task_ids, n_tasks)` — Mod-Squad: with
  ``P(t, e) = (1/T)·Σ_{tokens x of task t} p(e | x)``, ``P(t) = Σ_e P(t, e)``, ``P(e) = Σ_t P(t, e)``,
  the loss is ``−Σ_{t,e} P(t, e)·log(P(t, e) / (P(t)·P(e)))`` (minimising it maximises the mutual
  information between tasks and experts). `task_ids [T]` integer in [0, n_tasks).
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from pyops import _validate as V
from pyops.moe import reference as ref

__all__ = ["load_balance_loss", "router_z_loss", "mutual_information_loss", "router_probs"]


def _check_logits(logits: object) -> Tensor:
    logits = V.check_float_tensor(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [T, E] (2 dimensions), got {V.fmt_shape(logits.shape)}")
    return logits


def router_probs(logits: Tensor, score: str = "softmax") -> Tensor:
    """Per-token probabilities over experts `[T, E]` (fp32, fp64 for fp64 logits)."""
    logits = _check_logits(logits)
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score: expected 'softmax' or 'sigmoid', got {score!r}")
    p = ref.scores(logits, score)
    return p if score == "softmax" else p / p.sum(-1, keepdim=True)


def load_balance_loss(logits: Tensor, experts: Union[Tensor, tuple], *, score: str = "softmax") -> Tensor:
    """Switch load-balancing loss ``E · Σ_i f_i · P_i`` (see the module docstring)."""
    if isinstance(experts, tuple):
        experts = experts[1]  # a Routing
    p = router_probs(logits, score)
    experts = V.check_tensor(experts, "experts")
    if experts.dim() != 2 or experts.shape[0] != p.shape[0] or experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"experts: expected an int32/int64 tensor [T, k] with T = {p.shape[0]}, "
                         f"got {experts.dtype} {V.fmt_shape(experts.shape)}")
    return ref.load_balance_loss(p, experts)


def router_z_loss(logits: Tensor) -> Tensor:
    """Router z-loss ``mean_t (logsumexp z_t)²``."""
    return ref.router_z_loss(_check_logits(logits))


def mutual_information_loss(logits: Tensor, task_ids: Tensor, n_tasks: int, *, score: str = "softmax") -> Tensor:
    """Mod-Squad mutual-information loss ``−Σ P(t,e)·log(P(t,e)/(P(t)P(e)))`` (see the module docstring)."""
    p = router_probs(logits, score)
    task_ids = V.check_tensor(task_ids, "task_ids")
    if task_ids.dim() != 1 or task_ids.shape[0] != p.shape[0] or task_ids.is_floating_point():
        raise ValueError(f"task_ids: expected an integer tensor [T] with T = {p.shape[0]}, "
                         f"got {task_ids.dtype} {V.fmt_shape(task_ids.shape)}")
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise ValueError(f"n_tasks: expected an int >= 1, got {n_tasks!r}")
    if not torch.compiler.is_compiling() and task_ids.numel() and \
            bool(((task_ids < 0) | (task_ids >= n_tasks)).any()):
        raise ValueError(f"task_ids: expected values in [0, n_tasks = {n_tasks}), got min {int(task_ids.min())}, "
                         f"max {int(task_ids.max())}")
    return ref.mutual_information_loss(p, task_ids, n_tasks)
