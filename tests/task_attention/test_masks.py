"""Mask presets (`pyops.masks`) and `from_dense`: the dense masks they stand for, round trips, refusals."""
from __future__ import annotations

import pytest
import torch

from pyops import masks


def test_block_diagonal_groups_and_identity_rule():
    groups, allow = masks.block_diagonal([3, 1, 2])
    assert groups.tolist() == [0, 0, 0, 1, 2, 2]
    assert torch.equal(allow, torch.eye(3, dtype=torch.bool))
    d = masks.dense(groups, None, allow)
    assert torch.equal(d, torch.block_diag(*(torch.ones(n, n) for n in (3, 1, 2))).bool())


def _multitab_expected(T, F, mode):
    """MultiTab-Net's masks written out per token pair (TxT, FxT, FxT_TxT: docs/task_attention.md#definition)."""
    L = T + F
    m = torch.ones(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            i_task, j_task = i < T, j < T
            if mode in ("TxT", "FxT_TxT") and i_task and j_task and i != j:
                m[i, j] = False
            if mode in ("FxT", "FxT_TxT") and not i_task and j_task:
                m[i, j] = False
    return m


@pytest.mark.parametrize("mode", ["TxT", "FxT", "FxT_TxT", "none"])
@pytest.mark.parametrize("T,F", [(1, 1), (3, 26), (4, 0)], ids=["T1-F1", "T3-F26", "T4-F0"])
def test_multitab_matches_token_pair_definition(T, F, mode):
    groups, allow = masks.multitab(T, F, mode)
    assert groups.tolist() == list(range(T)) + [T] * F
    assert allow.shape == (T + 1, T + 1)
    assert torch.equal(masks.dense(groups, None, allow), _multitab_expected(T, F, mode))


@pytest.mark.parametrize("P,S,chunk", [(3, 4, 1), (0, 5, 1), (4, 0, 1), (2, 7, 3)],
                         ids=["P3-S4-chunk1", "P0-S5-chunk1", "P4-S0-chunk1", "P2-S7-chunk3"])
def test_prefix_is_bidirectional_prefix_plus_block_causal_suffix(P, S, chunk):
    groups, allow = masks.prefix(P, S, chunk=chunk)
    L = P + S
    exp = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            exp[i, j] = j < P or (i >= P and (j - P) // chunk <= (i - P) // chunk)
    assert torch.equal(masks.dense(groups, None, allow), exp)


@pytest.mark.parametrize("preset", [
    lambda: masks.multitab(5, 24, "TxT"), lambda: masks.multitab(3, 9, "FxT_TxT"),
    lambda: masks.block_diagonal([4, 1, 3, 2]), lambda: masks.prefix(3, 5, chunk=2)],
    ids=["multitab-TxT", "multitab-FxT_TxT", "block-diagonal", "prefix"])
def test_from_dense_round_trip(preset):
    groups, allow = preset()
    d = masks.dense(groups, None, allow)
    qg, kg, al = masks.from_dense(d)
    assert torch.equal(masks.dense(qg, kg, al), d)
    assert al.shape[0] <= allow.shape[0]


def test_from_dense_rectangular_with_empty_rows_and_columns():
    d = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    qg, kg, al = masks.from_dense(d)
    assert qg.tolist() == [0, -1, 0, 1, -1]
    assert kg[3] == -1 and kg[1] != kg[0]
    assert torch.equal(masks.dense(qg, kg, al), d)


def test_from_dense_refuses_causal_mask_beyond_max_groups():
    d = torch.ones(70, 70, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="70 distinct non-empty query rows, more than max_groups=64"):
        masks.from_dense(d)
    qg, kg, al = masks.from_dense(d, max_groups=70)
    assert torch.equal(masks.dense(qg, kg, al), d)


def test_from_dense_rejects_non_bool_and_wrong_rank():
    with pytest.raises(TypeError, match="mask: expected a bool tensor"):
        masks.from_dense(torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"mask: expected shape \[Lq, Lk\]"):
        masks.from_dense(torch.ones(2, 3, 3, dtype=torch.bool))


def test_preset_argument_errors():
    with pytest.raises(ValueError, match="mode: expected one of"):
        masks.multitab(2, 3, "TT")
    with pytest.raises(ValueError, match="sizes"):
        masks.block_diagonal([])
    with pytest.raises(ValueError, match="prefix"):
        masks.prefix(1, 2, chunk=0)
