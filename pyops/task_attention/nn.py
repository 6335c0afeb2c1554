"""`TaskMaskedMultiheadAttention`: `nn.MultiheadAttention(batch_first=True)` with a group rule
instead of a dense ``attn_mask``, computed by `pyops.task_masked_attention`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyops import _validate as V
from pyops.task_attention.ops import INT_DTYPES, check_ids, task_masked_attention


def _widen(ids: Optional[Tensor]) -> Optional[Tensor]:
    """Integer ids as int64 (lossless) before the module writes ids of its own into them: -1 for a
    padded key, G for an appended token (in uint8 ids -1 would wrap to 255, in int8 G may not fit).
    Anything else passes through unchanged, for task_masked_attention to refuse by name."""
    if ids is None or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        return ids
    return ids.to(torch.int64)


class TaskMaskedMultiheadAttention(nn.Module):
    """Multi-head attention masked by per-token group ids and a G×G rule.

    A drop-in for ``nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, kdim=, vdim=,
    batch_first=True)``: the same constructor arguments, parameters, initialisation and
    ``state_dict`` keys (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``;
    with kdim/vdim != embed_dim: ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` instead of
    ``in_proj_weight``), so a checkpoint of the torch module loads with ``load_state_dict``.
    ``batch_first=False`` is accepted too (inputs ``[L, B, E]``). ``add_bias_kv`` (parameters
    ``bias_k``, ``bias_v`` `[1, 1, E]`, appended as one more key/value token) and ``add_zero_attn``
    (a zero key/value token appended per head) follow torch: every query may attend those tokens
    (they get a group of their own, allowed from every group); they cannot be combined with
    ``causal=True`` (torch pads ``attn_mask`` with "allowed" there, which no causal rule expresses).

    The mask is given as groups (see `pyops.task_masked_attention`) instead of ``attn_mask``:

        groups    int ids `[L]` or `[B, L]` of the query tokens (−1 = padding); None: one group.
        allow     bool `[G, G]`, True = group a may attend group b (None: identity).
        kv_groups ids of the key tokens (default: ``groups``; needed when S != L).
        preset    a ``(groups, allow)`` pair, e.g. ``pyops.masks.multitab(5, 24, "TxT")``.

    Note the convention: ``allow`` True means *attend*, while `nn.MultiheadAttention`'s boolean
    ``attn_mask`` means True = *blocked*. ``key_padding_mask`` keeps torch's meaning (True = ignore
    that key) and is folded into the key groups (as −1).

    Differences from `nn.MultiheadAttention`: attention dropout (training mode, ``dropout > 0``) is
    drawn from Philox keyed by a seed taken from torch's generator, so its mask differs from
    torch's (same distribution); a query row that may attend no key outputs zeros where torch
    gives NaN; ``attn_mask`` and ``is_causal`` are replaced by the group rule and ``causal``.
    ``backend`` (constructor) is passed to `pyops.task_masked_attention` (default ``"auto"``).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = True, device=None, dtype=None,
                 backend: str = "auto") -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.backend = backend
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **fk))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **fk))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **fk))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """The initialisation of nn.MultiheadAttention."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _extra_tokens(self, groups: Tensor, kv_groups: Optional[Tensor], allow: Optional[Tensor], B: int, S: int,
                      n_extra: int) -> Tuple[Tensor, Tensor]:
        """kv_groups and allow with `n_extra` appended key tokens in a new group X that every
        group may attend (torch pads attn_mask / key_padding_mask with "allowed" for them)."""
        kg = groups if kv_groups is None else kv_groups
        for name, g in (("groups", groups), ("kv_groups", kg)):
            if g.dtype not in INT_DTYPES:
                raise TypeError(f"{name}: expected an integer tensor of group ids, got {g.dtype}")
        if allow is None:  # the identity rule over the ids present
            if torch.compiler.is_compiling() or V.values_readable(groups, kg):
                # the ids in their own dtype first (an id of 2**32 is refused, not an eye of 2**32 rows)
                hi = max(check_ids(groups, "groups", None), check_ids(kg, "kv_groups", None))
            else:  # meta / fake tensors: shapes only, and G does not change a shape
                hi = 0
            allow = torch.eye(max(hi + 1, 1), dtype=torch.bool, device=groups.device)
        else:
            if allow.dim() != 2 or allow.shape[0] != allow.shape[1] or allow.shape[0] == 0:
                raise ValueError(f"allow: expected a square [G, G] tensor with G >= 1, got {V.fmt_shape(allow.shape)}")
            if V.values_readable(groups, kg):  # against the caller's rule, before it grows by one group
                check_ids(groups, "groups", allow.shape[0])
                check_ids(kg, "kv_groups", allow.shape[0])
        G = allow.shape[0]
        ext = torch.zeros((G + 1, G + 1), dtype=torch.bool, device=allow.device)
        ext[:G, :G] = allow.to(torch.bool)
        ext[:, G] = True
        tail = torch.full(kg.shape[:-1] + (n_extra,), G, dtype=kg.dtype, device=kg.device)
        return torch.cat([kg, tail], dim=-1), ext

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if key is query and value is query:  # self-attention: one matmul
                return F.linear(query, w, b).chunk(3, dim=-1)
            wq, wk, wv = w[:E], w[E:2 * E], w[2 * E:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None, *,
                groups: Optional[Tensor] = None, allow: Optional[Tensor] = None,
                kv_groups: Optional[Tensor] = None, preset: Optional[Tuple[Tensor, Tensor]] = None,
                key_padding_mask: Optional[Tensor] = None, causal: bool = False, need_weights: bool = False,
                average_attn_weights: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """query `[B, L, E]` (key/value `[B, S, kdim/vdim]`, default: query: self-attention).

        Returns ``(attn_output [B, L, E], attn_weights)`` like `nn.MultiheadAttention`; the weights
        are None unless ``need_weights=True``, which computes them densely (`[B, L, S]` averaged over
        heads, or `[B, H, L, S]`) as an extra, slow, non-fused step.
        """
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if preset is not None:
            if groups is not None or allow is not None:
                raise ValueError("preset: pass either preset=(groups, allow) or groups/allow, not both")
            groups, allow = preset
        B, L, _ = query.shape
        S = key.shape[1]
        dev = query.device
        if groups is None:
            if allow is not None or kv_groups is not None:
                raise ValueError("groups: required when allow or kv_groups is given")
            groups = torch.zeros(L, dtype=torch.int32, device=dev)
            kv_groups = torch.zeros(S, dtype=torch.int32, device=dev) if S != L else None
        groups = groups.to(dev)
        kv_groups = kv_groups.to(dev) if kv_groups is not None else None
        allow = allow.to(dev) if allow is not None else None
        n_extra = (self.bias_k is not None) + bool(self.add_zero_attn)
        if key_padding_mask is not None or n_extra:
            groups, kv_groups = _widen(groups), _widen(kv_groups)
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, S):
                raise ValueError(f"key_padding_mask: expected a bool tensor [{B}, {S}] (True = ignore), got "
                                 f"{key_padding_mask.dtype} {list(key_padding_mask.shape)}")
            kg = groups if kv_groups is None else kv_groups
            kg = kg.expand(B, S) if kg.dim() == 1 else kg
            kv_groups = torch.where(key_padding_mask, torch.full_like(kg, -1), kg)

        q, k, v = self._project(query, key, value)
        H, hd = self.num_heads, self.head_dim
        if n_extra:
            if causal:
                raise ValueError("causal: not supported together with add_bias_kv / add_zero_attn (torch lets every "
                                 "query attend the appended tokens, which no causal rule expresses)")
            kv_groups, allow = self._extra_tokens(groups, kv_groups, allow, B, S, n_extra)
        if self.bias_k is not None:  # torch's order: the bias token, then the zero token
            k = torch.cat([k, self.bias_k.expand(B, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(B, 1, self.embed_dim)], dim=1)
            S += 1
        q = q.view(B, L, H, hd).transpose(1, 2)
        k = k.view(B, S, H, hd).transpose(1, 2)
        v = v.view(B, S, H, hd).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(B, H, 1, hd)], dim=2)
            S += 1
        p = self.dropout if self.training else 0.0
        out = task_masked_attention(q, k, v, groups, kv_groups, allow, causal=causal, dropout_p=p,
                                    backend=self.backend)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            from pyops.task_attention.reference import allowed_mask
            ok = allowed_mask(groups, kv_groups, allow, B, causal)[:, None]
            s = (q.float() @ k.float().transpose(-1, -2)) * hd ** -0.5
            weights = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0).to(q.dtype)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        return out, weights
