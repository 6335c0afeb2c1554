"""Task-masked attention, the definition.

Inputs: q `[B, Hq, Lq, D]`, k `[B, Hkv, Lk, D]`, v `[B, Hkv, Lk, Dv]` with Hq a multiple of Hkv
(query head h reads kv head ``h // (Hq / Hkv)``, grouped-query attention); integer group ids
``q_groups`` (`[Lq]` or `[B, Lq]`) and ``kv_groups`` (`[Lk]` or `[B, Lk]`); a bool rule
``allow`` `[G, G]` (None: the identity, i.e. a query attends only keys of its own group).

Query i of batch row b may attend key j iff

    q_groups[b, i] >= 0  and  kv_groups[b, j] >= 0  and  allow[q_groups[b, i], kv_groups[b, j]]
    and (not causal or j <= i)

Group id −1 is padding: never attended, and a −1 query row outputs zeros. With
``s = scale · q·kᵀ`` (scale default ``D**-0.5``) and the masked-out scores set to −inf:

    lse_i  = log Σ_j exp(s_ij)                       (−inf for a row with no allowed key)
    p_ij   = exp(s_ij − lse_i)                        (0 for every j of such a row)
    out_i  = Σ_j p_ij · z_ij / (1 − dropout_p) · v_j  (z_ij = 1 without dropout)

A pair (i, j) that query i may not attend takes no part, whatever its values: its q, k and v
never meet in a product (docs/design.md#non-finite-values). Over the attended pairs NaN and ±inf
propagate as IEEE arithmetic of the formulas above does; a −inf score weighs 0, and a row whose
attended scores are all −inf is empty like a row with none.

Dropout (``dropout_p > 0``): element (b, h, i, j), h the query head, is kept (z = 1) iff
``uniform(philox4x32_10(c = (j, i, b·Hq + h, 0x5441534B), key = (seed mod 2³², seed >> 32 mod 2³²)).v[0])
>= dropout_p`` (Philox4x32-10, `pyops._philox`): the same bits on every backend, so a
backward pass regenerates the forward's mask from the seed. ``lse`` is that of the un-dropped
softmax. Accumulation is fp32 (fp64 for fp64 inputs); the output has q's dtype.

Everything here is dense ([B, Hq, Lq, Lk] scores) and differentiable by torch autograd: it is
the oracle for every kernel and the fallback on any device, not a fast path.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from pyops._finite import all_finite
from pyops._philox import philox4x32_10, uniform_from_word

DROPOUT_STREAM = 0x5441534B  # "TASK": the fourth Philox counter word of attention dropout
_MASK32 = 0xFFFFFFFF


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_batch(groups: torch.Tensor, batch: int) -> torch.Tensor:
    """[L] or [B, L] integer ids -> [B, L] int64."""
    g = groups.to(torch.int64)
    return g.unsqueeze(0).expand(batch, -1) if g.dim() == 1 else g


def allowed_mask(q_groups: torch.Tensor, kv_groups: Optional[torch.Tensor], allow: Optional[torch.Tensor],
                 batch: int, causal: bool = False) -> torch.Tensor:
    """Bool `[B, Lq, Lk]`: True where query i may attend key j (the rule in the module docstring)."""
    qg = _per_batch(q_groups, batch)
    kg = qg if kv_groups is None else _per_batch(kv_groups, batch)
    qi, kj = qg[:, :, None], kg[:, None, :]
    valid = (qi >= 0) & (kj >= 0)
    if allow is None:
        ok = valid & (qi == kj)
    else:
        a = allow.to(torch.bool)
        ok = valid & a[qi.clamp_min(0), kj.clamp_min(0)]
    if causal:
        lq, lk = qg.shape[1], kg.shape[1]
        ok = ok & torch.ones(lq, lk, dtype=torch.bool, device=ok.device).tril()
    return ok


def _seed_words(seed: Union[int, torch.Tensor]):
    """(k0, k1): the low and high 32 bits of the 64-bit seed (an int, or an int64 tensor of one element)."""
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(()).to(torch.int64)
        return s & _MASK32, (s >> 32) & _MASK32
    s = int(seed) & ((1 << 64) - 1)
    return s & _MASK32, (s >> 32) & _MASK32


def dropout_keep(seed: Union[int, torch.Tensor], batch: int, heads: int, lq: int, lk: int, dropout_p: float,
                 device=None) -> torch.Tensor:
    """Bool `[B, Hq, Lq, Lk]`: the attention-dropout keep mask of the interface (Philox4x32-10)."""
    k0, k1 = _seed_words(seed)
    if isinstance(k0, torch.Tensor):
        device = k0.device if device is None else device
        k0, k1 = k0.to(device), k1.to(device)
    j = torch.arange(lk, dtype=torch.int64, device=device).view(1, 1, 1, lk)
    i = torch.arange(lq, dtype=torch.int64, device=device).view(1, 1, lq, 1)
    bh = torch.arange(batch * heads, dtype=torch.int64, device=device).view(batch, heads, 1, 1)
    words = philox4x32_10(j, i, bh, torch.tensor(DROPOUT_STREAM, dtype=torch.int64, device=device), k0, k1)
    return uniform_from_word(words[0]) >= dropout_p


def task_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: Optional[torch.Tensor] = None,
    allow: Optional[torch.Tensor] = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    seed: Union[int, torch.Tensor, None] = 0,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """The definition (module docstring). Returns out `[B, Hq, Lq, Dv]` in q's dtype, and with
    `return_lse` also lse `[B, Hq, Lq]` (fp32; fp64 for fp64 inputs). No argument checking:
    `pyops.task_masked_attention` validates before calling this."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    rep = Hq // Hkv
    kf = k.to(acc).repeat_interleave(rep, dim=1) if rep > 1 else k.to(acc)
    vf = v.to(acc).repeat_interleave(rep, dim=1) if rep > 1 else v.to(acc)

    qf = q.to(acc)
    ok = allowed_mask(q_groups, kv_groups, allow, B, causal)[:, None]             # [B, 1, Lq, Lk]
    # A pair outside `ok` takes no part, whatever its values: with a NaN or ±inf input the products
    # are formed pair by pair with the unattended operands zeroed (0·NaN would be NaN), forward and
    # backward (docs/design.md#non-finite-values).
    exclude = not all_finite(q, k, v)
    if exclude:
        scores = _paired(qf, kf, ok, lambda a, b: (a * b).sum(-1)) * scale
    else:
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale                   # [B, Hq, Lq, Lk]
    scores = scores.masked_fill(~ok, float("-inf"))
    if Lk == 0:  # no keys at all: every row is empty
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    else:
        row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)                                               # 0 where masked
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (row_max + torch.log(denom)).squeeze(-1)                                # -inf: empty row

    if dropout_p > 0.0:
        keep = dropout_keep(0 if seed is None else seed, B, Hq, Lq, Lk, dropout_p, device=q.device)
        p = torch.where(keep, p / (1.0 - dropout_p), torch.zeros_like(p))
    if exclude:
        out = _paired(p.unsqueeze(-1), vf, ok, lambda a, b: (a * b).sum(-2), lhs_per_pair=True)
    else:
        out = torch.matmul(p, vf)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _paired(lhs: torch.Tensor, rhs: torch.Tensor, ok: torch.Tensor, reduce, lhs_per_pair: bool = False):
    """``reduce`` over the pairwise products of query-side `lhs` and key-side `rhs` (`[B, H, Lk, C]`)
    with both operands zeroed outside `ok` (`[B, 1, Lq, Lk]`), a block of query rows at a time.

    `lhs` is `[B, H, Lq, C]` (one row per query: q), or with `lhs_per_pair` `[B, H, Lq, Lk, 1]`
    (one value per pair: the probabilities). `reduce` maps the `[B, H, rows, Lk, C]` products to
    the block's result."""
    B, H, Lq = lhs.shape[0], lhs.shape[1], lhs.shape[2]
    Lk, C = rhs.shape[2], rhs.shape[3]
    rows = max(1, (1 << 24) // max(1, B * H * Lk * C))  # bounds a block's products to 2**24 elements
    parts = []
    for r0 in range(0, max(Lq, 1), rows):  # one empty block when Lq = 0: the result stays in the graph
        keep = ok[:, :, r0:r0 + rows, :, None]                                    # [B, 1, r, Lk, 1]
        a = lhs[:, :, r0:r0 + rows] if lhs_per_pair else lhs[:, :, r0:r0 + rows, None, :]
        b = torch.where(keep, rhs[:, :, None], torch.zeros((), dtype=rhs.dtype, device=rhs.device))
        a = torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))
        parts.append(reduce(a, b))
    return torch.cat(parts, dim=2)


def dense_additive_mask(q_groups, kv_groups, allow, batch: int, causal: bool = False,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[B, 1, Lq, Lk]` float mask (0 where allowed, −inf elsewhere): what SDPA-style peers take."""
    ok = allowed_mask(q_groups, kv_groups, allow, batch, causal)[:, None]
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(~ok, float("-inf"))


def task_masked_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   q_groups: torch.Tensor, kv_groups: Optional[torch.Tensor],
                                   allow: Optional[torch.Tensor], *, causal: bool = False,
                                   dropout_p: float = 0.0, scale: Optional[float] = None,
                                   seed: Union[int, torch.Tensor, None] = 0
                                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `task_masked_attention` for the upstream gradient `dout` `[B, Hq, Lq, Dv]`:
    the vector-Jacobian product of the definition, each in its input's dtype. The fused backends hand a
    call whose inputs are not finite to this and to `task_masked_attention` (pyops._finite)."""
    def forward(q_, k_, v_):
        return task_masked_attention(q_, k_, v_, q_groups, kv_groups, allow, causal=causal, dropout_p=dropout_p,
                                     scale=scale, seed=seed)

    # torch.func.vjp rather than autograd.grad: it differentiates inside a custom op's kernel too,
    # where the dispatcher has excluded the autograd keys.
    _, vjp = torch.func.vjp(forward, q.detach(), k.detach(), v.detach())
    return vjp(dout.to(q.dtype))
