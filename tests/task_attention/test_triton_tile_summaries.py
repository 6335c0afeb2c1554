"""The Triton tile summaries (`pyops.kernels.task_attention.summaries`) are sound — a skipped tile
has no allowed pair, a "full" tile has no blocked pair — and they do skip what they should."""
from __future__ import annotations

import pytest
import torch

from .cases import backend_reason
from pyops import masks

CHUNK = 16


def tile_states(qg, kg, allow, Lq, Lk, bm, bn):
    from pyops.kernels.task_attention import summaries
    qsum, ksum = summaries(qg, kg, allow, Lq, Lk)
    states = {}
    for qt in range(-(-Lq // bm)):
        qc = range(qt * bm // CHUNK, min((qt + 1) * bm // CHUNK, qsum.shape[1]))
        reach = full = None
        for c in qc:
            r, f = int(qsum[0, c, 0]), int(qsum[0, c, 1])
            reach = r if reach is None else reach | r
            full = f if full is None else full & f
        for kt in range(-(-Lk // bn)):
            kb = 0
            for c in range(kt * bn // CHUNK, min((kt + 1) * bn // CHUNK, ksum.shape[1])):
                kb |= int(ksum[0, c])
            if (reach & kb) == 0:
                states[qt, kt] = "skip"
            elif (kb & ~full) == 0:
                states[qt, kt] = "full"
            else:
                states[qt, kt] = "partial"
    return states


def check_sound(qg, kg, allow, Lq, Lk, bm=32, bn=32):
    dense = masks.dense(qg, kg, allow)
    states = tile_states(qg, kg, allow, Lq, Lk, bm, bn)
    for (qt, kt), st in states.items():
        block = dense[qt * bm:(qt + 1) * bm, kt * bn:(kt + 1) * bn]
        if st == "skip":
            assert not block.any(), f"tile {(qt, kt)} skipped but has allowed pairs"
        if st == "full":
            assert block.shape == (bm, bn) and block.all(), f"tile {(qt, kt)} marked full but has blocked pairs"
    return states


@pytest.fixture(autouse=True)
def _need_kernels():
    reason = backend_reason("triton")
    if reason is not None and "import" in reason:
        pytest.skip(reason)


def test_block_diagonal_skips_off_diagonal_tiles_and_runs_diagonal_tiles_unmasked():
    g, allow = masks.block_diagonal([64, 64, 64, 64])
    states = check_sound(g, g, allow, 256, 256, 64, 64)
    assert all(st == ("full" if qt == kt else "skip") for (qt, kt), st in states.items())
    states = check_sound(g, g, None, 256, 256, 64, 64)  # allow=None (identity) too
    assert all(st == ("full" if qt == kt else "skip") for (qt, kt), st in states.items())


@pytest.mark.parametrize("G", [3, 70], ids=["G3", "G70-overflow"])
def test_random_groups_are_sound(G, rng):
    for _ in range(5):
        qg = torch.randint(-1, G, (83,), generator=rng)
        kg = torch.randint(-1, G, (57,), generator=rng)
        allow = torch.rand(G, G, generator=rng) < 0.5
        check_sound(qg, kg, allow, 83, 57)


def test_sorted_groups_with_sparse_rule_skip_tiles(rng):
    g = torch.arange(8).repeat_interleave(16)
    a = torch.arange(8)
    allow = (a[:, None] // 2) == (a[None, :] // 2)  # pairs of groups see each other: one pair per 32-tile
    states = check_sound(g, g, allow, 128, 128)
    assert [st for (qt, kt), st in sorted(states.items()) if qt == kt] == ["full"] * 4
    assert sum(st == "skip" for st in states.values()) == 12
    allow[0, 7] = True  # one more pair: tile (0, 3) becomes partial, the rest unchanged
    states = check_sound(g, g, allow, 128, 128)
    assert states[0, 3] == "partial" and sum(st == "skip" for st in states.values()) == 11
