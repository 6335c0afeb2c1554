"""Mask presets for `pyops.task_masked_attention`: group ids plus a G×G rule instead of an L×L mask.

Every preset returns ``(groups, allow)``: int64 group ids ``[L]`` and a bool ``allow [G, G]``
(True = a query of group a may attend a key of group b), ready to pass as
``task_masked_attention(q, k, v, groups, allow=allow)``. `from_dense` goes the other way: it
recovers ``(q_groups, kv_groups, allow)`` from a dense boolean mask (True = attend) when the mask
has that structure.

Note the boolean convention: here and in SDPA True means *attend*; `nn.MultiheadAttention`'s
boolean ``attn_mask`` means True = *blocked* (pass ``~dense(...)`` to it).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from pyops import _validate as V

MULTITAB_MODES = ("TxT", "FxT", "FxT_TxT", "none")
DEFAULT_MAX_GROUPS = 64

__all__ = ["MULTITAB_MODES", "block_diagonal", "dense", "from_dense", "multitab", "prefix"]


def _dev(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def block_diagonal(sizes: Sequence[int], *, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed independent sequences (tasks) of the given lengths: token t of segment s gets group s,
    and a group attends only itself (``allow`` = identity, which is also what ``allow=None`` means).

    >>> groups, allow = block_diagonal([3, 2])   # groups = [0, 0, 0, 1, 1]
    """
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 0 for s in sizes):
        raise ValueError(f"sizes: expected a non-empty list of lengths >= 0, got {sizes}")
    dev = _dev(device)
    groups = torch.repeat_interleave(torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev))
    return groups, torch.eye(len(sizes), dtype=torch.bool, device=dev)


def multitab(n_tasks: int, n_features: int, mode: str = "TxT", *, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MultiTab-Net's token order and masks: ``n_tasks`` task tokens first (task token t has group t),
    then ``n_features`` feature tokens (all in group ``n_tasks``); G = n_tasks + 1.

    mode:
        ``"TxT"``: task token i sees itself and every feature, no other task token; features see everything.
        ``"FxT"``: features do not see task tokens (they see every feature); task tokens see everything.
        ``"FxT_TxT"``: both restrictions.
        ``"none"``: everything sees everything (no mask).
    """
    if mode not in MULTITAB_MODES:
        raise ValueError(f"mode: expected one of {MULTITAB_MODES}, got {mode!r}")
    if n_tasks < 1 or n_features < 0:
        raise ValueError(f"n_tasks/n_features: expected n_tasks >= 1 and n_features >= 0, got {n_tasks}, {n_features}")
    dev = _dev(device)
    T = int(n_tasks)
    F = T  # the feature group
    groups = torch.cat([torch.arange(T, device=dev), torch.full((int(n_features),), F, device=dev)])
    allow = torch.ones(T + 1, T + 1, dtype=torch.bool, device=dev)
    if mode in ("TxT", "FxT_TxT"):
        allow[:T, :T] = torch.eye(T, dtype=torch.bool, device=dev)
    if mode in ("FxT", "FxT_TxT"):
        allow[F, :T] = False
    return groups, allow


def prefix(prefix_len: int, suffix_len: int, *, chunk: int = 1, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prefix-LM attention: the first ``prefix_len`` tokens attend one another bidirectionally;
    the ``suffix_len`` tokens after them attend the whole prefix and the suffix causally.

    The suffix is cut into chunks of ``chunk`` tokens (chunk=1: exactly causal; larger: block-causal,
    bidirectional inside a chunk). Prefix = group 0, suffix chunk c = group 1 + c, so
    G = 1 + ceil(suffix_len / chunk): ``allow[a, b] = b == 0 or 1 <= b <= a``. Do not also pass
    ``causal=True`` (it would make the prefix causal). For long suffixes with chunk=1 the group
    count grows with the length: the Triton kernels and the reference accept any G, the C++ kernels
    up to 64 (``backend="auto"`` passes them over beyond that); a larger ``chunk`` keeps the rule small.
    """
    if prefix_len < 0 or suffix_len < 0 or chunk < 1:
        raise ValueError(f"prefix: expected prefix_len >= 0, suffix_len >= 0, chunk >= 1, got "
                         f"{prefix_len}, {suffix_len}, {chunk}")
    dev = _dev(device)
    n_chunks = -(-int(suffix_len) // int(chunk))
    groups = torch.cat([torch.zeros(int(prefix_len), dtype=torch.int64, device=dev),
                        1 + torch.arange(int(suffix_len), device=dev) // int(chunk)])
    G = 1 + n_chunks
    a = torch.arange(G, device=dev)
    allow = (a[None, :] == 0) | ((a[None, :] >= 1) & (a[None, :] <= a[:, None]))
    return groups, allow


def dense(q_groups: torch.Tensor, kv_groups: Optional[torch.Tensor] = None, allow: Optional[torch.Tensor] = None,
          causal: bool = False) -> torch.Tensor:
    """The dense boolean mask (True = attend) of a group rule: `[Lq, Lk]`, or `[B, Lq, Lk]` for
    per-batch ids. What SDPA takes; `nn.MultiheadAttention` wants its negation.

    Ids must lie in [−1, G) for an ``allow`` of shape `[G, G]` (any id >= −1 without one), checked
    in their own dtype (an int64 id of 2³² is refused, never wrapped); ValueError names the id and
    where it is."""
    from pyops.task_attention.ops import check_ids
    from pyops.task_attention.reference import allowed_mask

    if allow is not None:
        V.check_tensor(allow, "allow")
        if allow.dim() != 2 or allow.shape[0] != allow.shape[1]:
            raise ValueError(f"allow: expected a square [G, G] tensor, got {V.fmt_shape(allow.shape)}")
    for name, g in (("q_groups", q_groups), ("kv_groups", kv_groups)):
        if g is None:
            continue
        V.check_tensor(g, name)
        if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor of group ids, got {g.dtype}")
        if g.dim() not in (1, 2):
            raise ValueError(f"{name}: expected shape [L] or [B, L], got {V.fmt_shape(g.shape)}")
        if V.values_readable(g):
            check_ids(g, name, None if allow is None else allow.shape[0], identity_limit=None)

    batch = q_groups.shape[0] if q_groups.dim() == 2 else (kv_groups.shape[0] if kv_groups is not None
                                                            and kv_groups.dim() == 2 else 1)
    m = allowed_mask(q_groups, kv_groups, allow, batch, causal)
    per_batch = q_groups.dim() == 2 or (kv_groups is not None and kv_groups.dim() == 2)
    return m if per_batch else m[0]


def _ids(patterns: torch.Tensor, name: str, limit: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ids of identical rows of `patterns` [N, M], numbered by first occurrence (all-False rows
    get -1), and the distinct non-empty rows in id order."""
    n = patterns.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=patterns.device), patterns[:0]
    uniq, inverse = torch.unique(patterns, dim=0, return_inverse=True)
    first = torch.full((uniq.shape[0],), n, dtype=torch.int64, device=patterns.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=patterns.device), "amin")
    keep = (uniq.any(dim=1)).nonzero().flatten()
    keep = keep[torch.argsort(first[keep])]
    if keep.numel() > limit:
        raise ValueError(
            f"from_dense: the mask has {keep.numel()} distinct non-empty {name}, more than max_groups={limit}; "
            f"it is not representable as group ids with a rule of at most {limit} groups "
            "(for a causal mask pass causal=True and recover the groups of the rest)")
    remap = torch.full((uniq.shape[0],), -1, dtype=torch.int64, device=patterns.device)
    remap[keep] = torch.arange(keep.numel(), device=patterns.device)
    return remap[inverse], uniq[keep]


def from_dense(mask: torch.Tensor, *, max_groups: int = DEFAULT_MAX_GROUPS
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recover ``(q_groups, kv_groups, allow)`` from a dense boolean mask (True = attend).

    ``mask`` is `[Lq, Lk]`. Queries with identical mask rows share a group, keys with identical
    mask columns share a group; queries that attend nothing and keys that no query attends get −1
    (padding, which gives the same result: zeros for such a query, never attended for such a key).
    Then ``mask[i, j] == allow[q_groups[i], kv_groups[j]]`` exactly. For a per-batch mask call it
    per batch row (the rules may then differ by row).

    Raises ValueError when more than ``max_groups`` distinct rows or columns are needed (the mask has
    no small group structure, e.g. a causal mask) and TypeError for a non-bool mask.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor (True = attend), got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"mask: expected shape [Lq, Lk], got {list(mask.shape)}")
    Lq, Lk = mask.shape
    m = mask
    rows, cols = m, m.t()
    qg, row_pat = _ids(rows, "query rows", max_groups)
    kg, col_pat = _ids(cols, "key columns", max_groups)
    G = max(row_pat.shape[0], col_pat.shape[0], 1)
    allow = torch.zeros(G, G, dtype=torch.bool, device=m.device)
    if row_pat.shape[0] and col_pat.shape[0]:
        # allow[a, b] = mask[any row of group a, any column of group b] = row_pat[a, a column of b]
        valid = kg >= 0
        rep_col = torch.full((col_pat.shape[0],), Lk, dtype=torch.int64, device=m.device)
        rep_col.scatter_reduce_(0, kg[valid], torch.arange(Lk, device=m.device)[valid], "amin")
        allow[: row_pat.shape[0], : col_pat.shape[0]] = row_pat[:, rep_col]
    return qg, kg, allow
