"""The tensors every task-attention kernel returns, shared by the C++ and Triton paths.

Both backends' registered ops return these shapes, dtypes and devices, and both register the fake
kernels below, so a traced graph and an eager call agree:

    forward   out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] fp32
    backward  dq, dk, dv shaped like q, k, v (contiguous)

A call the kernels cannot prove exact (`exact_forward` / `exact_backward`: a non-finite input, or
magnitudes that could overflow fp32, pyops._finite) takes the definition's results instead,
through `reference_forward` / `reference_backward`, in these same layouts.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from pyops._finite import maxima, within
from pyops.task_attention import reference as ref


def forward_fake(q, k, v, q_groups, kv_groups, allow, causal, dropout_p, scale, seed) -> Tuple[Tensor, Tensor]:
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq, v.shape[3])), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def backward_fake(dout, q, k, v, out, lse, q_groups, kv_groups, allow, causal, dropout_p, scale,
                  seed) -> Tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _score_bound(q: Tensor, mq: float, mk: float, scale: float) -> float:
    return abs(scale) * q.shape[3] * mq * mk


def exact_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float) -> bool:
    """True unless an input holds a NaN or ±inf or its magnitudes could overflow the forward's fp32
    intermediates: a score (|scale|·D·max|q|·max|k|) or the unnormalised accumulator
    (Lk·max|v|/(1 − dropout_p), every weight exp(s − m) <= 1). True when values cannot be read."""
    m = maxima(q, k, v)
    if m is None:
        return True
    mq, mk, mv = m
    return within(_score_bound(q, mq, mk, scale), k.shape[2] * mv / (1.0 - dropout_p))


def exact_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float) -> bool:
    """`exact_forward` for the backward's intermediates as well: dP and dS
    (2·Dv·max|dO|·max|v|/(1 − p)), dQ (|scale|·Lk·max|dS|·max|k|), dK (|scale|·(Hq/Hkv)·Lq·max|dS|·max|q|)
    and dV ((Hq/Hkv)·Lq·max|dO|/(1 − p))."""
    m = maxima(dout, q, k, v)
    if m is None:
        return True
    mo, mq, mk, mv = m
    keep = 1.0 / (1.0 - dropout_p)
    rows = (q.shape[1] // max(k.shape[1], 1)) * q.shape[2]
    ds = 2.0 * v.shape[3] * mo * mv * keep
    return within(_score_bound(q, mq, mk, scale), k.shape[2] * mv * keep, ds, abs(scale) * k.shape[2] * ds * mk,
                  abs(scale) * rows * ds * mq, rows * mo * keep)


def reference_forward(q, k, v, q_groups, kv_groups, allow, causal, dropout_p, scale, seed) -> Tuple[Tensor, Tensor]:
    """The definition's (out, lse) in the kernels' layout."""
    out, lse = ref.task_masked_attention(q, k, v, q_groups, kv_groups, allow, causal=causal, dropout_p=dropout_p,
                                         scale=scale, seed=seed, return_lse=True)
    return out.contiguous(), lse.to(torch.float32).contiguous()


def reference_backward(dout, q, k, v, q_groups, kv_groups, allow, causal, dropout_p, scale,
                       seed) -> Tuple[Tensor, Tensor, Tensor]:
    """The definition's (dq, dk, dv) in the kernels' layout."""
    grads = ref.task_masked_attention_backward(dout, q, k, v, q_groups, kv_groups, allow, causal=causal,
                                               dropout_p=dropout_p, scale=scale, seed=seed)
    return tuple(g.contiguous() for g in grads)
