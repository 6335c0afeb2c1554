"""`TaskMoE`: a mixture-of-experts MLP layer with per-task routers, on the fused routing ops."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyops import _validate as V
from pyops.moe import losses as moe_losses
from pyops.moe import ops as M
from pyops.moe import parallel as P


class TaskMoE(nn.Module):
    """Top-k mixture of experts with one router per task (Mod-Squad / TaskExpert-style task gating).

    ``y = Σ_j w_tj · MLP_{e_tj}(x_t)`` with ``(w, e) = moe_route(x_t · W_r[task_t])``, run by
    `pyops.moe_route` and `pyops.moe_experts`. Task ids are per token, so one batch may mix tasks.

    Args:
        d_model: token width d.
        d_hidden: expert hidden width.
        n_experts: E.
        k: experts per token.
        n_tasks: number of routers; with ``n_tasks > 1`` `forward` needs `task_ids`.
        activation: ``"swiglu"`` (default), ``"geglu"``, ``"swiglu_oai"`` (default alpha and limit),
            ``"gelu"``, ``"silu"``, ``"relu"``.
        capacity_factor: None or cf > 0 (per-expert capacity ``ceil(cf·k·T/E)``, drops in token order).
        noisy_gating: Shazeer et al. (2017) trainable noise: in training mode the logits get
            ``N(0, 1) · softplus(x · W_noise[task])`` (W_noise starts at zero); eval mode is noise-free.
        renormalize: renormalise the k gate values of a token to sum to 1.
        score: ``"softmax"`` or ``"sigmoid"``.
        n_group, topk_group, routed_scaling: DeepSeek-V3 group-limited routing and its weight scale,
            passed to `pyops.moe_route` (both or neither of the first two; checked here).
        backend: passed to both ops (``"auto"`` by default).
        ep_group: None, or a `torch.distributed` process group of W ranks over which the experts
            are spread (expert parallelism, `pyops.moe.parallel`): this rank holds experts
            ``r·E/W … (r+1)·E/W − 1`` only (W must divide E); tokens reach them by all-to-all.
            Routers stay replicated; capacity, the losses and the statistics are over the global
            token set (rank-major), so every rank gets what the single-process layer gives for the
            concatenated batch (docs/distributed.md#expert-parallelism).

    Parameters: ``router [n_tasks, d_model, E]``, ``w1 [E_local, d_model, d_hidden]``, ``w3`` (GLU
    only), ``w2 [E_local, d_hidden, d_model]``, ``w_noise [n_tasks, d_model, E]`` (noisy gating only);
    ``E_local = E`` without `ep_group`, ``E / W`` with it.

    `forward(x, task_ids=None)` takes ``x [..., d_model]`` and ``task_ids`` (an int for the whole
    batch, or an integer tensor of shape ``x.shape[:-1]``, or ``[x.shape[0]]`` broadcast over the
    other token dimensions) and returns ``(y, aux)``: ``y`` of x's shape and a dict with the
    differentiable losses ``load_balance``, ``z_loss`` and (``n_tasks > 1``) ``mutual_information``,
    and the statistics (detached) ``tokens_per_expert [E]`` (assignments, dropped included),
    ``dropped_fraction`` (0-d), ``task_expert_usage [n_tasks, E]`` (selections per task and expert).
    The caller weights and adds the losses.
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, k: int, *, n_tasks: int = 1,
                 activation: str = "swiglu", capacity_factor: Optional[float] = None, noisy_gating: bool = False,
                 renormalize: bool = True, score: str = "softmax", n_group: Optional[int] = None,
                 topk_group: Optional[int] = None, routed_scaling: float = 1.0, backend: str = "auto",
                 ep_group=None, device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("d_hidden", d_hidden), ("n_experts", n_experts), ("n_tasks", n_tasks)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_experts:
            raise ValueError(f"k: expected an int with 1 <= k <= n_experts = {n_experts}, got {k!r}")
        if activation not in M.ACTIVATIONS:
            raise ValueError(f"activation: expected one of {M.ACTIVATIONS}, got {activation!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor: expected None or a number > 0, got {capacity_factor!r}")
        if score not in M.SCORE_CODES:
            raise ValueError(f"score: expected 'softmax' or 'sigmoid', got {score!r}")
        M.check_group_args(n_experts, k, n_group, topk_group, routed_scaling)
        self.n_group, self.topk_group, self.routed_scaling = n_group, topk_group, float(routed_scaling)
        self.d_model, self.d_hidden, self.n_experts, self.k = d_model, d_hidden, n_experts, k
        self.n_tasks, self.activation, self.capacity_factor = n_tasks, activation, capacity_factor
        self.noisy_gating, self.renormalize, self.score, self.backend = noisy_gating, renormalize, score, backend
        self.ep_group = ep_group
        self.expert_offset, E_local = (0, n_experts) if ep_group is None else P.expert_range(n_experts, ep_group)
        fk = dict(device=device, dtype=dtype)
        E = n_experts
        self.router = nn.Parameter(torch.empty(n_tasks, d_model, E, **fk))
        self.w1 = nn.Parameter(torch.empty(E_local, d_model, d_hidden, **fk))
        self.w3 = nn.Parameter(torch.empty(E_local, d_model, d_hidden, **fk)) if activation in M.GLU else None
        self.w2 = nn.Parameter(torch.empty(E_local, d_hidden, d_model, **fk))
        self.w_noise = nn.Parameter(torch.empty(n_tasks, d_model, E, **fk)) if noisy_gating else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router, std=self.d_model ** -0.5)
        b1, b2 = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_hidden)
        nn.init.uniform_(self.w1, -b1, b1)
        if self.w3 is not None:
            nn.init.uniform_(self.w3, -b1, b1)
        nn.init.uniform_(self.w2, -b2, b2)
        if self.w_noise is not None:
            nn.init.zeros_(self.w_noise)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, n_experts={self.n_experts}, k={self.k}, "
                f"n_tasks={self.n_tasks}, activation={self.activation!r}, capacity_factor={self.capacity_factor}, "
                f"noisy_gating={self.noisy_gating}"
                + ("" if self.n_group is None else f", n_group={self.n_group}, topk_group={self.topk_group}")
                + ("" if self.routed_scaling == 1.0 else f", routed_scaling={self.routed_scaling}")
                + ("" if self.ep_group is None else f", experts {self.expert_offset}..."
                   f"{self.expert_offset + self.w1.shape[0] - 1} on this rank"))

    # ------------------------------------------------------------------------------------------

    def _task_ids(self, task_ids: Union[None, int, Tensor], x: Tensor, T: int) -> Optional[Tensor]:
        if task_ids is None:
            if self.n_tasks > 1:
                raise ValueError(f"task_ids: this TaskMoE has n_tasks = {self.n_tasks} routers; pass the task id "
                                 "of every token (or one int for the whole batch)")
            return None
        if isinstance(task_ids, int) and not isinstance(task_ids, bool):
            if not 0 <= task_ids < self.n_tasks:
                raise ValueError(f"task_ids: expected values in [0, n_tasks = {self.n_tasks}), got {task_ids}")
            return torch.full((T,), task_ids, dtype=torch.int64, device=x.device)
        if (not isinstance(task_ids, Tensor) or task_ids.is_floating_point() or task_ids.is_complex()
                or task_ids.dtype == torch.bool):
            raise TypeError(f"task_ids: expected an int or an integer tensor, got "
                            f"{task_ids.dtype if isinstance(task_ids, Tensor) else type(task_ids).__name__}")
        lead = tuple(x.shape[:-1])
        if tuple(task_ids.shape) == lead:
            t = task_ids.reshape(T)
        elif task_ids.dim() == 1 and len(lead) >= 1 and task_ids.shape[0] == lead[0]:
            t = task_ids.reshape((lead[0],) + (1,) * (len(lead) - 1)).expand(lead).reshape(T)
        else:
            raise ValueError(f"task_ids: expected shape {list(lead)} (x.shape[:-1]) or [{lead[0] if lead else 1}] "
                             f"(one id per batch row), got {list(task_ids.shape)}")
        if task_ids.device != x.device:
            raise ValueError(f"task_ids: expected a tensor on {x.device} (x's device), got {task_ids.device}")
        if V.values_readable(t):  # in the ids' own dtype, before the int64 copy below
            bad = V.first_out_of_range(t, 0, self.n_tasks)
            if bad is not None:
                raise ValueError(f"task_ids: expected values in [0, n_tasks = {self.n_tasks}), got {bad[1]} "
                                 f"(token {bad[0][0]} of x.reshape(-1, d_model))")
        return t.long()

    def _per_task(self, xt: Tensor, w: Tensor, tasks: Optional[Tensor]) -> Tensor:
        """xt [T, d] times the [d, E] matrix of each token's task (all tasks in one GEMM, then a gather)."""
        if tasks is None or self.n_tasks == 1:
            return xt @ w[0]
        T, E = xt.shape[0], self.n_experts
        allz = (xt @ w.permute(1, 0, 2).reshape(self.d_model, self.n_tasks * E)).view(T, self.n_tasks, E)
        return allz.gather(1, tasks.view(T, 1, 1).expand(T, 1, E)).squeeze(1)

    def forward(self, x: Tensor, task_ids: Union[None, int, Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected a tensor [..., d_model = {self.d_model}], got "
                             f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        shape = x.shape
        xt = x.reshape(-1, self.d_model)
        T = xt.shape[0]
        tasks = self._task_ids(task_ids, x, T)
        logits = self._per_task(xt, self.router, tasks)
        if self.noisy_gating and self.training:
            std = F.softplus(self._per_task(xt, self.w_noise, tasks))
            logits = logits + torch.randn_like(logits) * std
        groups = dict(n_group=self.n_group, topk_group=self.topk_group, routed_scaling=self.routed_scaling)
        if self.ep_group is None:
            r = M.moe_route(logits, self.k, score=self.score, renormalize=self.renormalize,
                            capacity_factor=self.capacity_factor, backend=self.backend, **groups)
            y = M.moe_experts(xt, r, self.w1, self.w2, self.w3, activation=self.activation, backend=self.backend)
        else:
            r = M.moe_route(logits, self.k, score=self.score, renormalize=self.renormalize, backend=self.backend,
                            **groups)
            r = P.global_capacity(r, self.capacity_factor, self.ep_group)
            # global_capacity has checked k and E across the ranks (when it ran); xt is the routed tokens
            rows, plan = P.dispatch(xt, r, self.ep_group, check=self.capacity_factor is None)
            out = M.moe_experts(rows, plan.routing, self.w1, self.w2, self.w3, activation=self.activation,
                                backend=self.backend)
            y = P.combine(out, plan, r.weights)
        aux = self._aux(logits, r, tasks)
        return y.reshape(shape), aux

    def _aux(self, logits: Tensor, r: M.Routing, tasks: Optional[Tensor]) -> Dict[str, Tensor]:
        E, g = self.n_experts, self.ep_group
        if g is not None:  # the losses and statistics of the global token set: one all-reduce
            return P.global_losses(logits, r.experts, r.dropped, tasks, self.n_tasks, score=self.score, group=g)
        aux = {"load_balance": moe_losses.load_balance_loss(logits, r.experts, score=self.score),
               "z_loss": moe_losses.router_z_loss(logits)}
        if self.n_tasks > 1:
            aux["mutual_information"] = moe_losses.mutual_information_loss(logits, tasks, self.n_tasks,
                                                                           score=self.score)
        with torch.no_grad():
            t = tasks if tasks is not None else torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
            flat = (t[:, None] * E + r.experts.long()).reshape(-1)
            usage = torch.zeros(self.n_tasks * E, dtype=torch.int64, device=logits.device) \
                .index_add_(0, flat, torch.ones_like(flat))
            aux["tokens_per_expert"] = r.offsets[1:] - r.offsets[:-1]
            aux["dropped_fraction"] = r.dropped.float().mean() if r.dropped.numel() else logits.new_zeros(())
            aux["task_expert_usage"] = usage.view(self.n_tasks, E)
        return aux
