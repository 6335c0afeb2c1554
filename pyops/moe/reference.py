"""Fused expert routing: the definition (docs/moe.md#definition).

Routing, for router logits ``z [T, E]`` and ``k`` experts per token:

    s = softmax(z, -1)          (score="softmax")   or   s = sigmoid(z)   (score="sigmoid")
    key = s + bias              (bias [E], DeepSeek-V3 aux-loss-free balancing: selection only)
    groups (n_group G, topk_group M; DeepSeek-V3 group-limited routing, arXiv:2412.19437):
                 the experts form G groups of E/G consecutive experts; group score of g =
                 the sum of the 2 largest keys of its experts (the largest alone if E/G = 1);
                 the M groups of largest score are kept (ties: the lower group index) and every
                 expert of the other groups is excluded (key −inf: never chosen); k <= M·E/G
    experts[t] = the k largest keys of token t, descending; ties go to the lower expert index
                 (a stable descending sort of the key)
    weights[t, j] = s[t, experts[t, j]]          (the score, never the bias)
    renormalize:  weights[t] /= Σ_j weights[t, j]
    routed_scaling: weights[t] *= routed_scaling  (after the renormalisation; default 1)
    order   = the flat assignment ids a = t·k + j stably sorted by expert (token order within an expert)
    offsets = [0, cumsum(counts)]                (counts[e] = assignments to e, dropped ones included)
    capacity_factor cf:  C = ceil(cf·k·T/E); in expert e's slice of `order`, the first C (token
                 order) are kept and the rest are dropped (dropped[t, j] = True).

Expert MLP for assignment a = (t, j) to expert e = experts[t, j], not dropped:

    a = x_t·w1[e] + b1[e]      b = x_t·w3[e] + b3[e]      (the biases b1, b3 are optional: 0)
    GLU ("swiglu", "geglu"):   h = gate(a) ⊙ b      gate = silu | exact (erf) gelu
    "swiglu_oai" (GPT-OSS, transformers' GptOssExperts):  g = min(a, limit), u = clamp(b, −limit, limit),
                               h = (u + 1) ⊙ g ⊙ sigmoid(alpha·g)      (alpha 1.702, limit 7.0 by default)
    plain ("gelu", "silu", "relu"):   h = act(a)
    y_t += weights[t, j] · (h·w2[e] + b2[e])

Scores and the MLP are computed in fp32 (fp64 for fp64 inputs, for gradcheck) and cast back to
the input dtype. The routing weights are differentiable w.r.t. the logits (the selection is held
fixed); the MLP output w.r.t. x, w1, w2, w3, the biases and the weights. The clamps pass the
gradient where the value lies inside the interval, bounds included (torch.clamp's convention).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("swiglu", "geglu", "gelu", "silu", "relu", "swiglu_oai")
GLU_ACTIVATIONS = ("swiglu", "geglu", "swiglu_oai")
# GPT-OSS's clamped SwiGLU (transformers' GptOssExperts, config.swiglu_alpha / swiglu_limit).
OAI_ALPHA = 1.702
OAI_LIMIT = 7.0
SCORES = ("softmax", "sigmoid")


class RouteResult(NamedTuple):
    weights: Tensor   # [T, k], logits' dtype
    experts: Tensor   # [T, k] int32
    order: Tensor     # [T*k] int64
    offsets: Tensor   # [E+1] int64
    dropped: Tensor   # [T, k] bool


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def capacity(capacity_factor: Optional[float], T: int, E: int, k: int) -> int:
    """Per-expert capacity C = ceil(cf·k·T/E), or -1 (no capacity).

    An expert gets at most one assignment per token, so a capacity of T or more drops nothing:
    C is returned as min(C, T), which keeps it an int64 (the ops' schemas carry one) and the rank
    comparison exact for any finite cf."""
    if capacity_factor is None:
        return -1
    return min(int(math.ceil(capacity_factor * k * T / E)), T)


def scores(logits: Tensor, score: str = "softmax") -> Tensor:
    """softmax or sigmoid of `logits [T, E]` in the compute dtype. Formed in float64 and rounded
    once: equal logits give equal scores wherever they sit (torch's fp32 kernels take a vectorised
    body and a scalar tail whose bits differ), so ties go to the lower expert as documented."""
    cd = compute_dtype(logits.dtype)
    z = logits.to(torch.float64)
    s = torch.softmax(z, dim=-1) if score == "softmax" else torch.sigmoid(z)
    return s.to(cd)


def group_mask(key: Tensor, n_group: int, topk_group: int) -> Tensor:
    """`[T, E]` bool, True for the experts of the `topk_group` kept groups of each token:
    group score = top-1 + top-2 key of the group (top-1 alone for groups of one expert), the
    largest scores kept, ties to the lower group index (a stable descending sort)."""
    T, E = key.shape
    size = E // n_group
    top = torch.topk(key.reshape(T, n_group, size), min(2, size), dim=-1).values
    gscore = top[..., 0] + top[..., 1] if size >= 2 else top[..., 0]
    kept = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    keep = torch.zeros(T, n_group, dtype=torch.bool, device=key.device).scatter_(1, kept, True)
    return keep.repeat_interleave(size, dim=1)


def route(logits: Tensor, k: int, score: str = "softmax", renormalize: bool = True,
          capacity_factor: Optional[float] = None, bias: Optional[Tensor] = None,
          n_group: Optional[int] = None, topk_group: Optional[int] = None,
          routed_scaling: float = 1.0) -> RouteResult:
    """Top-k routing of `logits [T, E]`; see the module docstring."""
    T, E = logits.shape
    s = scores(logits, score)
    key = (s if bias is None else s + bias.detach().to(s.dtype)).detach()
    if n_group is not None:
        # Excluded experts' keys become -inf (DeepSeek's official gate), so they are never chosen.
        key = key.masked_fill(~group_mask(key, n_group, topk_group), float("-inf"))
    # Stable descending sort: equal keys keep their index order, so ties go to the lower expert.
    sel = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    w = torch.gather(s, 1, sel)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    if routed_scaling != 1.0:
        w = w * routed_scaling
    flat = sel.reshape(-1)
    order = torch.sort(flat, stable=True).indices                       # token order within an expert
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device).index_add_(
        0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    C = capacity(capacity_factor, T, E, k)
    if C >= 0:
        # rank of each assignment within its expert's slice = position in `order` − slice start
        rank_sorted = torch.arange(T * k, device=logits.device) - offsets[flat[order]]
        rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
        dropped = (rank >= C).reshape(T, k)
    else:
        dropped = torch.zeros(T, k, dtype=torch.bool, device=logits.device)
    return RouteResult(w.to(logits.dtype), sel.to(torch.int32), order, offsets, dropped)


def activation(a: Tensor, b: Optional[Tensor], name: str, alpha: float = OAI_ALPHA,
               limit: float = OAI_LIMIT) -> Tensor:
    """The fused activation: gate(a) ⊙ b for GLU variants, act(a) otherwise (gelu is exact erf);
    alpha and limit are swiglu_oai's (the other activations ignore them)."""
    if name == "swiglu_oai":
        g = a.clamp(max=limit)
        return (b.clamp(-limit, limit) + 1) * (g * torch.sigmoid(alpha * g))
    if name == "swiglu":
        return F.silu(a) * b
    if name == "geglu":
        return F.gelu(a) * b
    if name == "gelu":
        return F.gelu(a)
    if name == "silu":
        return F.silu(a)
    if name == "relu":
        return torch.relu(a)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def experts(x: Tensor, weights: Tensor, expert_ids: Tensor, dropped: Tensor, w1: Tensor, w2: Tensor,
            w3: Optional[Tensor] = None, activation_name: str = "swiglu", b1: Optional[Tensor] = None,
            b2: Optional[Tensor] = None, b3: Optional[Tensor] = None, alpha: float = OAI_ALPHA,
            limit: float = OAI_LIMIT) -> Tensor:
    """The per-expert loop: y_t = Σ_j [not dropped] weights[t, j] · MLP_{experts[t, j]}(x_t).

    Shapes: x [T, d], weights / expert_ids / dropped [T, k], w1, w3 [E, d, hidden], w2 [E, hidden, d],
    biases b1, b3 [E, hidden], b2 [E, d] (each optional).

    Expert ids must lie in [0, E) (E = w1.shape[0]); there is no sentinel id (a dropped
    assignment is flagged in `dropped`). The loop below visits experts 0..E-1 only, so an id outside
    that range would silently contribute nothing: it raises ValueError instead (eager calls on
    real tensors; `pyops.moe_experts` checks before any backend runs)."""
    T, d = x.shape
    E = w1.shape[0]
    if expert_ids.numel() and expert_ids.device.type != "meta" and not torch.compiler.is_compiling():
        bad = (expert_ids < 0) | (expert_ids >= E)
        if bool(bad.any()):
            t, j = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"expert_ids[{t}, {j}] = {int(expert_ids[t, j])} is out of range for {E} experts "
                             f"(w1.shape[0]): expert ids must be in [0, {E - 1}]")
    cd = compute_dtype(x.dtype)
    y = torch.zeros(T, d, dtype=cd, device=x.device)
    for e in range(E):
        tok, slot = torch.nonzero((expert_ids == e) & ~dropped, as_tuple=True)   # token order
        if tok.numel() == 0:
            continue
        xe = x[tok].to(cd)
        a = xe @ w1[e].to(cd)
        if b1 is not None:
            a = a + b1[e].to(cd)
        b = None
        if activation_name in GLU_ACTIVATIONS:
            b = xe @ w3[e].to(cd)
            if b3 is not None:
                b = b + b3[e].to(cd)
        out = activation(a, b, activation_name, alpha, limit) @ w2[e].to(cd)
        if b2 is not None:
            out = out + b2[e].to(cd)
        y = y.index_add(0, tok, weights[tok, slot].to(cd)[:, None] * out)
    if y.grad_fn is None and torch.is_grad_enabled():
        # No assignment kept (T = 0, or every one dropped): y is zeros, still a function of the
        # inputs for autograd. Sums over no element are exactly 0 (never 0·NaN).
        for t in (x, weights, w1, w2, w3, b1, b2, b3):
            if t is not None and t.requires_grad:
                y = y + t.reshape(-1)[:0].sum().to(cd)
    return y.to(x.dtype)


def moe(x: Tensor, logits: Tensor, k: int, w1: Tensor, w2: Tensor, w3: Optional[Tensor] = None, *,
        activation_name: str = "swiglu", score: str = "softmax", renormalize: bool = True,
        capacity_factor: Optional[float] = None, bias: Optional[Tensor] = None) -> Tensor:
    """Routing then the expert MLP: the whole layer."""
    r = route(logits, k, score, renormalize, capacity_factor, bias)
    return experts(x, r.weights, r.experts, r.dropped, w1, w2, w3, activation_name)


# ---------------------------------------------------------------------------------------------
# Auxiliary losses (the definitions behind pyops.moe_losses)
# ---------------------------------------------------------------------------------------------

def load_balance_loss(probs: Tensor, expert_ids: Tensor) -> Tensor:
    """Switch load balance: E · Σ_i f_i · P_i, f_i = share of all T·k selections that went to i,
    P_i = mean router probability of expert i over tokens."""
    T, E = probs.shape
    return load_balance_from_sums(probs.sum(0), selection_counts(expert_ids, E, probs.dtype), T, expert_ids.shape[1])


def selection_counts(expert_ids: Tensor, E: int, dtype: torch.dtype) -> Tensor:
    """[E] how many of the T·k selections in `expert_ids [T, k]` chose each expert (not differentiable)."""
    flat = expert_ids.reshape(-1).long()
    return torch.zeros(E, dtype=dtype, device=flat.device).index_add_(0, flat, torch.ones(flat.numel(), dtype=dtype,
                                                                                           device=flat.device))


def load_balance_from_sums(prob_sum: Tensor, counts: Tensor, T, k: int) -> Tensor:
    """E · Σ_i (counts_i / (T·k)) · (prob_sum_i / T): the load-balance loss from the per-expert sums
    over T tokens (T a number or a 0-d tensor; sums over several ranks give the global loss)."""
    E = prob_sum.shape[0]
    return E * ((counts.detach() / (T * k)) * (prob_sum / T)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """mean over tokens of logsumexp(z)²."""
    return torch.logsumexp(logits.to(compute_dtype(logits.dtype)), dim=-1).pow(2).mean()


def mutual_information_loss(probs: Tensor, task_ids: Tensor, n_tasks: int) -> Tensor:
    """Mod-Squad: −Σ_{t,e} P(t,e)·log(P(t,e) / (P(t)·P(e))), P(t,e) = (1/T)·Σ_{tokens of task t} p(e|x)."""
    T, E = probs.shape
    joint = torch.zeros(n_tasks, E, dtype=probs.dtype, device=probs.device).index_add_(0, task_ids.long(), probs)
    return mutual_information_from_joint(joint / T)


def mutual_information_from_joint(joint: Tensor) -> Tensor:
    """−Σ_{t,e} P(t,e)·log(P(t,e) / (P(t)·P(e))) for the joint distribution `joint [n_tasks, E]`."""
    pt = joint.sum(1, keepdim=True)
    pe = joint.sum(0, keepdim=True)
    tiny = torch.finfo(joint.dtype).tiny
    ratio = joint / (pt * pe).clamp_min(tiny)
    terms = torch.where(joint > 0, joint * torch.log(ratio.clamp_min(tiny)), torch.zeros_like(joint))
    return -terms.sum()
