"""The reference (the definition) against an independent dense formulation built from
docs/task_attention.md#definition with Python loops; fp64 gradcheck; the dropout rule; empty rows."""
from __future__ import annotations

import pytest
import torch

from _support import assert_close_dtype
from .cases import FP64, dense_attention, dense_mask_loops, dropout_keep_loops, randn
from pyops import masks
from pyops.task_attention.reference import task_masked_attention as ref

# (B, Hq, Hkv, Lq, Lk, D, Dv)
SHAPES = [(1, 1, 1, 1, 1, 4, 4), (2, 4, 2, 7, 7, 8, 5), (3, 3, 1, 5, 9, 6, 6), (1, 2, 2, 13, 4, 3, 7)]


def shape_id(s):
    B, Hq, Hkv, Lq, Lk, D, Dv = s
    return f"B{B}-H{Hq}/{Hkv}-L{Lq}x{Lk}-D{D}-Dv{Dv}"


def random_groups(gen, shape, G, pad=True):
    lo = -1 if pad else 0
    return torch.randint(lo, G, shape, generator=gen)


@pytest.mark.parametrize("per_batch", [False, True], ids=["shared-ids", "per-batch-ids"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reference_matches_dense_formulation(shape, causal, per_batch, rng):
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    G = 3
    q, k, v = randn((B, Hq, Lq, D), FP64, rng), randn((B, Hkv, Lk, D), FP64, rng), randn((B, Hkv, Lk, Dv), FP64, rng)
    qg = random_groups(rng, (B, Lq) if per_batch else (Lq,), G)
    kg = random_groups(rng, (B, Lk) if per_batch else (Lk,), G)
    allow = torch.rand(G, G, generator=rng) < 0.6
    out, lse = ref(q, k, v, qg, kg, allow, causal=causal, return_lse=True)
    mask = dense_mask_loops(qg, kg, allow, B, Lq, Lk, causal)
    exp_out, exp_lse = dense_attention(q, k, v, mask)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(lse, exp_lse)


def test_default_allow_is_identity_and_kv_groups_default_to_q_groups(rng):
    q, k, v = (randn((2, 2, 6, 4), FP64, rng) for _ in range(3))
    g = torch.tensor([0, 0, 1, 1, 2, -1])
    out = ref(q, k, v, g)
    mask = dense_mask_loops(g, None, None, 2, 6, 6, False)
    torch.testing.assert_close(out, dense_attention(q, k, v, mask)[0])


def test_padding_and_empty_rows_give_zeros_lse_minus_inf_and_zero_grads(rng):
    q, k, v = (randn((1, 2, 5, 4), FP64, rng, requires_grad=True) for _ in range(3))
    qg = torch.tensor([0, -1, 1, 2, 0])
    kg = torch.tensor([0, 0, 1, -1, 1])
    allow = torch.tensor([[True, False, False], [False, True, False], [False, False, True]])
    out, lse = ref(q, k, v, qg, kg, allow, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[:, :, 1] == 0).all() and (out[:, :, 3] == 0).all()  # padding query; group 2 has no key
    assert torch.isneginf(lse[:, :, [1, 3]]).all() and torch.isfinite(lse[:, :, [0, 2, 4]]).all()
    out.sum().backward()
    assert (q.grad[:, :, [1, 3]] == 0).all()
    assert (k.grad[:, :, 3] == 0).all() and (v.grad[:, :, 3] == 0).all()  # the padding key is never used
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout0.3"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_gradcheck_fp64(causal, dropout_p, rng):
    q = randn((2, 4, 5, 3), FP64, rng, requires_grad=True)
    k = randn((2, 2, 6, 3), FP64, rng, requires_grad=True)
    v = randn((2, 2, 6, 2), FP64, rng, requires_grad=True)
    qg = torch.tensor([[0, 1, -1, 1, 0], [1, 1, 0, 0, 0]])
    kg = torch.tensor([0, 1, 1, 0, -1, 0])
    allow = torch.tensor([[True, True], [False, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: ref(q, k, v, qg, kg, allow, causal=causal, dropout_p=dropout_p, seed=123), (q, k, v))


def test_dropout_follows_the_philox_rule(rng):
    B, H, Lq, Lk, p, seed = 2, 3, 4, 5, 0.4, (7 << 32) + 99
    q, k, v = randn((B, H, Lq, 4), FP64, rng), randn((B, H, Lk, 4), FP64, rng), randn((B, H, Lk, 3), FP64, rng)
    g = torch.zeros(Lq, dtype=torch.int64)
    kg = torch.zeros(Lk, dtype=torch.int64)
    out = ref(q, k, v, g, kg, dropout_p=p, seed=seed)
    keep = dropout_keep_loops(seed, B, H, Lq, Lk, p)
    assert 0 < keep.float().mean() < 1
    mask = torch.ones(B, Lq, Lk, dtype=torch.bool)
    torch.testing.assert_close(out, dense_attention(q, k, v, mask, keep=keep, dropout_p=p)[0])


def test_dropout_seed_as_tensor_equals_seed_as_int(rng):
    q, k, v = (randn((1, 2, 6, 4), torch.float32, rng) for _ in range(3))
    g = torch.zeros(6, dtype=torch.int64)
    a = ref(q, k, v, g, dropout_p=0.5, seed=-5)
    b = ref(q, k, v, g, dropout_p=0.5, seed=torch.tensor([-5]))
    c = ref(q, k, v, g, dropout_p=0.5, seed=(1 << 64) - 5)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_half_inputs_accumulate_in_fp32(rng):
    q, k, v = (randn((1, 2, 9, 8), torch.float16, rng) for _ in range(3))
    g, allow = masks.multitab(3, 6, "TxT")
    out, lse = ref(q, k, v, g, None, allow, return_lse=True)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    exp = ref(q.double(), k.double(), v.double(), g, None, allow)
    assert_close_dtype(out, exp.to(torch.float16))
