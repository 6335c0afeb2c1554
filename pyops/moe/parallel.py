"""Expert parallelism: the experts of one MoE layer spread over the ranks of a process group.

The layout follows GShard / DeepSpeed-MoE / MegaBlocks / torchtitan: with ``W`` ranks and ``E``
experts, rank ``r`` holds experts ``r·E/W … (r+1)·E/W − 1`` (``E_local = E/W``); routers are
replicated. One layer's forward on every rank is

    logits, Routing   = moe_route(local tokens)                      (replicated router, local)
    routing           = global_capacity(routing, capacity_factor)    (drops over the global token set)
    rows, plan        = dispatch(x, routing, group)                  (all-to-all: tokens → expert owners)
    out               = moe_experts(rows, plan.routing, w1_l, w2_l, w3_l)   (this rank's experts)
    y                 = combine(out, plan, routing.weights)          (all-to-all back, weighted sum)

Every exchange is `torch.distributed.all_to_all_single` (gloo on CPU, NCCL on GPUs) inside an
autograd function whose backward is the opposite exchange, so gradients reach x, the routing
weights (hence the router) and the local experts. Dropped assignments are decided before
dispatch and never sent. All collectives run on `group`; a rank that stops answering makes the
others raise after the group's timeout (`init_process_group(timeout=...)`) instead of hanging.

The global token order is rank-major: rank 0's tokens, then rank 1's, … — the order in which a
single process holding the concatenated batch would see them. Capacity drops follow it, so an EP
layer drops exactly the assignments the single-process layer drops on the concatenated batch.

Auxiliary losses over the global token set (`global_load_balance_loss`, `global_router_z_loss`,
`global_mutual_information_loss`): each rank forms sums over its own tokens, an all-reduce adds
them, and the loss is formed from the global sums, so every rank holds the same value — the
single-process loss of the concatenated batch. The all-reduce's backward is the identity: the
gradient that reaches a rank's logits is that rank's share, and the shares summed over ranks are
the single-process gradient (docs/distributed.md#gradients).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from pyops.moe import ops as M
from pyops.moe import reference as ref

__all__ = ["DispatchPlan", "expert_range", "global_capacity", "dispatch", "combine", "global_load_balance_loss",
           "global_router_z_loss", "global_mutual_information_loss", "global_losses"]


class DispatchPlan(NamedTuple):
    """What `dispatch` sent and received; `combine` runs the same exchange in reverse.

    routing:       the Routing of the received rows for `moe_experts` on the local experts
                   (one assignment per row, weight 1, rows grouped by local expert).
    tokens:        [S] int64, the local token of each row sent, in send order.
    slots:         [S] int64, the flat assignment id t·k + j of each row sent.
    send_splits:   rows sent to each rank.
    recv_splits:   rows received from each rank.
    perm:          [N] int64, received row i (source-rank-major) is row perm⁻¹ of `rows`;
                   rows = received[perm].
    group:         the process group.
    """
    routing: M.Routing
    tokens: Tensor
    slots: Tensor
    send_splits: List[int]
    recv_splits: List[int]
    perm: Tensor
    group: Optional[dist.ProcessGroup]


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def expert_range(n_experts: int, group=None) -> tuple[int, int]:
    """``(first, count)``: the experts this rank holds, ``r·E/W`` and ``E/W``. ValueError when W does
    not divide E."""
    W, r = _world(group)
    if n_experts % W:
        raise ValueError(f"n_experts: expected a multiple of the expert-parallel group size {W}, got {n_experts}")
    n = n_experts // W
    return r * n, n


class _AllToAll(torch.autograd.Function):
    """Rows exchanged by `all_to_all_single`; the backward is the opposite exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, send: List[int], recv: List[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        x = x.contiguous()
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous()
        out = g.new_empty((sum(ctx.send),) + tuple(g.shape[1:]))
        dist.all_to_all_single(out, g, output_split_sizes=ctx.send, input_split_sizes=ctx.recv, group=ctx.group)
        return out, None, None, None


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward passes the gradient through: each rank's inputs receive
    their own share of the gradient of a loss formed from the global sum."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


def sum_across_ranks(x: Tensor, group=None) -> Tensor:
    """``Σ_ranks x`` on every rank; the gradient reaching ``x`` is the local share (identity)."""
    return _SumAcrossRanks.apply(x, group)


def _check_routing(routing: M.Routing, group, error: Optional[Exception] = None) -> None:
    """One all-gather of (T, k, E, ok) from every rank, so that every rank raises together: the
    ranks must agree on k and E, and a rank whose own arguments were bad (`error`) raises it while
    the others name that rank — no rank is left waiting in a later collective."""
    W, r = _world(group)
    T, k = routing.weights.shape
    E = routing.offsets.numel() - 1
    meta = torch.tensor([T, k, E, error is None], dtype=torch.int64, device=meta_device(group, routing.offsets))
    got = [torch.empty_like(meta) for _ in range(W)]
    dist.all_gather(got, meta, group=group)
    allm = torch.stack(got).cpu()
    if error is not None:
        raise error
    bad = [i for i in range(W) if not allm[i, 3]]
    if bad:
        raise RuntimeError(f"expert parallelism: rank(s) {bad} of the group refused their arguments (see their error)")
    for name, col in (("k", 1), ("E", 2)):
        vals = allm[:, col].tolist()
        if len(set(vals)) > 1:
            raise ValueError(f"routing: the expert-parallel ranks disagree on {name}: {vals} (rank order); every "
                             "rank must route with the same k over the same experts")


def meta_device(group, like: Tensor) -> torch.device:
    """Where the small count tensors of a collective live: NCCL exchanges device tensors, gloo CPU ones."""
    backend = dist.get_backend(group)
    return like.device if backend == "nccl" else torch.device("cpu")


def global_capacity(routing: M.Routing, capacity_factor: Optional[float], group=None) -> M.Routing:
    """`routing` (from `moe_route` without capacity) with the drops of a per-expert capacity over
    the global token set: ``C = min(ceil(cf·k·T_global/E), T_global)``; in the global token order
    (rank-major) each expert keeps its first C assignments. ``capacity_factor=None`` keeps every
    assignment. Also checks that the ranks agree on k and E (one all-gather)."""
    if capacity_factor is None:
        return routing
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
        raise ValueError(f"capacity_factor: expected None or a number > 0, got {capacity_factor!r}")
    W, r = _world(group)
    T, k = routing.weights.shape
    E = routing.offsets.numel() - 1
    _check_routing(routing, group)  # the ranks agree on k and E before sizes depend on them
    dev = meta_device(group, routing.offsets)
    counts = (routing.offsets[1:] - routing.offsets[:-1]).to(dev)
    payload = torch.cat([counts, torch.tensor([T], dtype=torch.int64, device=dev)])
    got = [torch.empty_like(payload) for _ in range(W)]
    dist.all_gather(got, payload, group=group)
    allc = torch.stack(got).cpu()                           # [W, E+1]
    T_global = int(allc[:, E].sum())
    C = ref.capacity(float(capacity_factor), T_global, E, k)
    before = allc[:r, :E].sum(0).to(routing.offsets.device)  # assignments to each expert on earlier ranks
    # Position of each assignment within its expert's slice of `order` (token order), plus the
    # assignments of earlier ranks: kept while below C.
    sorted_e = routing.experts.reshape(-1).long()[routing.order]
    pos = torch.arange(T * k, device=routing.order.device) - routing.offsets[:-1][sorted_e]
    drop_sorted = (before[sorted_e] + pos) >= C
    dropped = torch.empty(T * k, dtype=torch.bool, device=routing.order.device)
    dropped[routing.order] = drop_sorted
    return routing._replace(dropped=dropped.view(T, k) | routing.dropped)


def dispatch(x: Tensor, routing: M.Routing, group=None, *, check: bool = True) -> tuple[Tensor, DispatchPlan]:
    """Send each kept assignment's token row to the rank holding its expert.

    Args:
        x: ``[T, d]`` this rank's tokens (any float dtype; T may be 0).
        routing: this rank's `Routing` over all E experts (global expert ids), drops decided
            (`global_capacity`); dropped assignments are not sent.
        group: the expert-parallel process group (default: the world).
        check: run the all-gather that makes every rank raise together when the ranks disagree on
            k or E or one rank's x is wrong. ``False`` only where that is known already: after
            `global_capacity` on the same routing (which checked k and E) with ``x`` the routed
            tokens themselves (as `TaskMoE` does).

    Returns ``(rows [N, d], plan)``: the rows this rank's experts must process, grouped by local
    expert (within an expert in global token order), and the plan for `combine`; ``plan.routing``
    is the Routing of `rows` to pass to `moe_experts` with this rank's expert weights.
    Differentiable w.r.t. x (the backward is the reverse exchange, summed into the token rows).
    """
    W, r = _world(group)
    T, k = routing.weights.shape
    E = routing.offsets.numel() - 1
    error = None
    if not isinstance(x, Tensor) or x.dim() != 2:
        error = ValueError(f"x: expected a tensor [T, d], got "
                           f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    elif x.shape[0] != T:
        error = ValueError(f"x: expected {T} rows (routing.weights.shape[0]), got {x.shape[0]}")
    if check or error is not None:
        _check_routing(routing, group, error)
    if E % W:  # E agrees across ranks now, so every rank raises
        raise ValueError(f"routing: expected a number of experts divisible by the group size {W}, got {E}")
    El = E // W
    dev = routing.order.device
    # Kept assignments in expert order (the slice order of `order`, token order within an expert).
    keep_sorted = ~routing.dropped.reshape(-1)[routing.order]
    slots = routing.order[keep_sorted]
    experts_sent = routing.experts.reshape(-1).long()[slots]
    tokens = torch.div(slots, k, rounding_mode="floor")
    per_expert = torch.bincount(experts_sent, minlength=E)                       # [E] kept per expert
    mdev = meta_device(group, x)
    recv_per_expert = torch.empty(E, dtype=torch.int64, device=mdev)
    dist.all_to_all_single(recv_per_expert, per_expert.to(mdev), group=group)   # [W, El]: from each source
    recv_counts = recv_per_expert.cpu().view(W, El)
    send_splits = per_expert.cpu().view(W, El).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    received = _AllToAll.apply(x.index_select(0, tokens), send_splits, recv_splits, group)
    # Received rows are source-major, local-expert order within a source; regroup by local expert
    # (stable, so within an expert the global token order is kept).
    local_e = torch.repeat_interleave(torch.arange(El).repeat(W), recv_counts.reshape(-1)).to(dev)
    perm = torch.sort(local_e, stable=True).indices
    rows = received.index_select(0, perm)
    n = rows.shape[0]
    counts_local = recv_counts.sum(0).to(dev)
    offsets = torch.zeros(El + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts_local, 0)
    local_routing = M.Routing(
        weights=torch.ones(n, 1, dtype=x.dtype, device=x.device),
        experts=local_e[perm].to(torch.int32).view(n, 1),
        order=torch.arange(n, dtype=torch.int64, device=dev),
        offsets=offsets,
        dropped=torch.zeros(n, 1, dtype=torch.bool, device=dev))
    return rows, DispatchPlan(local_routing, tokens, slots, send_splits, recv_splits, perm, group)


def combine(out: Tensor, plan: DispatchPlan, weights: Tensor) -> Tensor:
    """Return the expert outputs to their tokens and form ``y_t = Σ_j w_tj · out_tj``.

    Args:
        out: ``[N, d]`` the local experts' outputs for `dispatch`'s rows (same order).
        plan: `dispatch`'s plan.
        weights: ``[T, k]`` this rank's routing weights (differentiable: the router's gradient
            flows through them).

    Returns ``y [T, d]`` in out's dtype: the weighted sum formed in fp32 (fp64 for fp64), zero for
    a token with no kept assignment. Differentiable w.r.t. out and weights.
    """
    T, k = weights.shape
    if out.dim() != 2 or out.shape[0] != plan.perm.shape[0]:
        raise ValueError(f"out: expected [{plan.perm.shape[0]}, d] (dispatch's rows), got {list(out.shape)}")
    cd = ref.compute_dtype(out.dtype)
    # Undo dispatch's regrouping. Always part of the graph, also with no rows: every rank must
    # run the backward exchange whenever any rank does, or the collective would wait forever.
    back = torch.zeros_like(out).index_copy(0, plan.perm, out)
    returned = _AllToAll.apply(back, plan.recv_splits, plan.send_splits, plan.group)
    w = weights.reshape(-1).index_select(0, plan.slots).to(cd)
    contrib = returned.to(cd) * w[:, None]
    y = torch.zeros(T, out.shape[1], dtype=cd, device=out.device).index_add(0, plan.tokens, contrib)
    return y.to(out.dtype)


# ---------------------------------------------------------------------------------------------
# Auxiliary losses over the global token set (same definitions as pyops.moe_losses)
# ---------------------------------------------------------------------------------------------

def _probs(logits: Tensor, score: str) -> Tensor:
    p = ref.scores(logits, score)
    return p if score == "softmax" else p / p.sum(-1, keepdim=True)


def global_load_balance_loss(logits: Tensor, experts: Tensor, *, score: str = "softmax", group=None) -> Tensor:
    """Switch load balance ``E · Σ_i f_i · P_i`` over the tokens of every rank (the value of
    `pyops.moe_losses.load_balance_loss` on the concatenated batch), identical on every rank."""
    p = _probs(logits, score)
    T, E = p.shape
    counts = ref.selection_counts(experts, E, p.dtype)
    stats = sum_across_ranks(torch.cat([p.sum(0), counts, p.new_tensor([T])]), group)
    return ref.load_balance_from_sums(stats[:E], stats[E:2 * E], stats[2 * E], experts.shape[1])


def global_router_z_loss(logits: Tensor, group=None) -> Tensor:
    """ST-MoE z-loss ``mean_t (logsumexp z_t)²`` over the tokens of every rank."""
    lse2 = torch.logsumexp(logits.to(ref.compute_dtype(logits.dtype)), dim=-1).pow(2)
    stats = sum_across_ranks(torch.stack([lse2.sum(), lse2.new_tensor(float(lse2.shape[0]))]), group)
    return stats[0] / stats[1]


def global_losses(logits: Tensor, experts: Tensor, dropped: Tensor, task_ids: Optional[Tensor], n_tasks: int, *,
                  score: str = "softmax", group=None) -> dict:
    """Every auxiliary loss and statistic of an expert-parallel `TaskMoE` forward over the global
    token set, from ONE all-reduce: the load balance, the z-loss, (``n_tasks > 1``) the mutual
    information, and the detached ``task_expert_usage [n_tasks, E]`` (int64), ``tokens_per_expert
    [E]``, ``dropped_fraction`` (0-d). The same values as the three `global_*_loss` functions and the
    single-process statistics of the concatenated batch.

    The sums travel in fp64 (the counts exactly up to 2**53, the fp32 sums rounded once when they
    come back); the all-reduce's backward passes each rank its share of the gradient."""
    cd = ref.compute_dtype(logits.dtype)
    p = _probs(logits, score)
    T, E = p.shape
    k = experts.shape[1]
    t = task_ids.long() if task_ids is not None else torch.zeros(T, dtype=torch.int64, device=p.device)
    with torch.no_grad():
        flat = (t[:, None] * E + experts.long()).reshape(-1)
        usage = torch.zeros(n_tasks * E, dtype=torch.float64, device=p.device).index_add_(
            0, flat, torch.ones(flat.numel(), dtype=torch.float64, device=p.device))
    lse2 = torch.logsumexp(logits.to(cd), dim=-1).pow(2)
    mi = n_tasks > 1
    joint = torch.zeros(n_tasks, E, dtype=p.dtype, device=p.device).index_add(0, t, p) if mi else p.new_zeros(0)
    parts = [p.sum(0), lse2.sum().reshape(1), joint.reshape(-1)]
    tail = torch.cat([usage, torch.tensor([float(T), float(dropped.sum())], dtype=torch.float64, device=p.device)])
    sums = sum_across_ranks(torch.cat([q.to(torch.float64) for q in parts] + [tail]), group)
    n_mi = joint.numel()
    prob_sum, lse2_sum = sums[:E].to(cd), sums[E].to(cd)
    usage_g = sums[E + 1 + n_mi:E + 1 + n_mi + n_tasks * E].detach()
    T_global, n_dropped = sums[-2].detach(), sums[-1].detach()
    counts = usage_g.view(n_tasks, E).sum(0).to(cd)
    out = {"load_balance": ref.load_balance_from_sums(prob_sum, counts, T_global.to(cd), k),
           "z_loss": lse2_sum / T_global.to(cd)}
    if mi:
        out["mutual_information"] = ref.mutual_information_from_joint(
            sums[E + 1:E + 1 + n_mi].to(cd).view(n_tasks, E) / T_global.to(cd))
    usage_i = usage_g.round().to(torch.int64).view(n_tasks, E)
    out["task_expert_usage"] = usage_i
    out["tokens_per_expert"] = usage_i.sum(0)
    n = T_global * k
    out["dropped_fraction"] = (n_dropped / n).to(torch.float32) if float(n) > 0 else \
        logits.new_zeros((), dtype=torch.float32)
    return out


def global_mutual_information_loss(logits: Tensor, task_ids: Tensor, n_tasks: int, *, score: str = "softmax",
                                   group=None) -> Tensor:
    """Mod-Squad mutual-information loss with ``P(t, e)`` over the tokens of every rank."""
    p = _probs(logits, score)
    T, E = p.shape
    joint = torch.zeros(n_tasks, E, dtype=p.dtype, device=p.device).index_add(0, task_ids.long(), p)
    stats = sum_across_ranks(torch.cat([joint.reshape(-1), p.new_tensor([T])]), group)
    return ref.mutual_information_from_joint(stats[:-1].view(n_tasks, E) / stats[-1])
