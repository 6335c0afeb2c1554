"""The CPU expert ops' buffer pools (pyops/moe/pool.py): a saved or returned buffer is handed out
again only once nothing else references it, a backward reuses its forward's gathered rows only when
they are still its own, the pools are per thread, and PYOPS_MOE_WORKSPACE_MB bounds what is kept.
Whatever the pools hold, the results are the same bits."""
from __future__ import annotations

import threading

import pytest
import torch

import pyops
from _support import assert_bitwise_equal, assert_close, fmt_dtype, randn
from .cases import BF16, FP32, grads_tol, make_logits, make_weights, require
from pyops import _native
from pyops.moe import pool


def test_cpu_saved_buffers_are_recycled_only_once_dead(rng):
    """The CPU forward's saved a/b/ys come from a per-thread pool: two layers in flight (and a graph
    kept with retain_graph) never share a buffer, and gradients match the reference; after the
    backward the buffers are reused (the pool does not grow with the number of steps)."""
    dev = require("cpu")
    T, d, h, E, k = 13, 6, 10, 3, 2
    pool.release_workspace()

    def two_layers(backend):
        x = randn((T, d), FP32, torch.Generator().manual_seed(1), dev).requires_grad_(True)
        ws = [make_weights(E, d, h, "swiglu", FP32, torch.Generator().manual_seed(2 + i), dev, requires_grad=True)
              for i in range(2)]
        z = make_logits(T, E, torch.Generator().manual_seed(5), dev)
        r = pyops.moe_route(z, k, backend="reference")
        y = x
        for w1, w2, w3 in ws:
            y = pyops.moe_experts(y, r, w1, w2, w3, activation="swiglu", backend=backend) + y
        return y, [x] + [w for trio in ws for w in trio]

    want_y, leaves = two_layers("reference")
    want = torch.autograd.grad(want_y.square().sum(), leaves)
    sizes = []
    kept = None
    for step in range(6):
        y, leaves = two_layers("cpu")
        loss = y.square().sum()
        g1 = torch.autograd.grad(loss, leaves, retain_graph=True)
        g2 = torch.autograd.grad(loss, leaves)   # the retained saved buffers are not recycled in between
        for a, b, c in zip(g1, g2, want):
            assert_bitwise_equal(a, b)
            assert_close(a, c, grads_tol("w1", FP32))
        if kept is None:  # results the caller holds on to are never handed out again
            kept = (g1, [g.clone() for g in g1])
        del y, loss
        sizes.append(len(pool.saved_pool.bufs))
    for a, b in zip(*kept):
        assert_bitwise_equal(a, b)
    # results (y, dx, dW) come from the pool too: g1 / g2 of one step are still alive during the next
    # step's backward (and `kept` for good), so the pool takes a few steps to settle, then stops growing
    assert sizes[-3] == sizes[-1] > 0


class _GatherCounter:
    """pyops._C with its moe_gather calls counted."""

    def __init__(self, real):
        self.real, self.gathers = real, 0

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name != "moe_gather":
            return fn

        def counted(*args):
            self.gathers += 1
            return fn(*args)
        return counted


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=fmt_dtype)
def test_cpu_backward_reuses_the_forwards_gathered_rows_only_when_they_are_its_own(dtype, rng, monkeypatch):
    """The backward skips its gather of x when the per-thread rows buffer still holds its forward's
    gather (fp32 x; same x and order, nothing gathered since); with a second layer in between, or a
    converted (bf16) x, it gathers again. Gradients are the same bits either way."""
    dev = require("cpu")
    T, d, h, E, k = 21, 8, 12, 4, 2
    x = randn((T, d), dtype, rng, dev).requires_grad_(True)
    r = pyops.moe_route(make_logits(T, E, rng, dev), k, backend="reference")
    layers = [make_weights(E, d, h, "swiglu", dtype, rng, dev, requires_grad=True) for _ in range(2)]
    dy = randn((T, d), dtype, rng, dev)

    def step(n_layers, release_between):
        y = x
        for w1, w2, w3 in layers[:n_layers]:
            y = pyops.moe_experts(y, r, w1, w2, w3, backend="cpu")
        if release_between:
            pool.release_workspace()
        leaves = [x] + [w for trio in layers[:n_layers] for w in trio]
        return torch.autograd.grad(y, leaves, dy)

    for n_layers in (1, 2):
        want = step(n_layers, release_between=True)   # every backward gathers
        counter = _GatherCounter(_native.cpu_module)
        monkeypatch.setattr(_native, "cpu_module", counter)
        got = step(n_layers, release_between=False)
        monkeypatch.setattr(_native, "cpu_module", counter.real)
        for a, b in zip(got, want):
            assert_bitwise_equal(a, b)
        # forwards gather once each; the last layer's backward finds its rows, the others gather
        expected = n_layers + (n_layers - 1) if dtype == FP32 else 2 * n_layers
        assert counter.gathers == expected, (n_layers, counter.gathers)


def cpu_step(seed: int = 0):
    """One forward and backward of a small layer on the CPU backend: (y, dx, dw1, dw2, dw3)."""
    g = torch.Generator().manual_seed(seed)
    T, d, h, E, k = 11, 6, 9, 3, 2
    x = randn((T, d), FP32, g).requires_grad_(True)
    w1, w2, w3 = make_weights(E, d, h, "swiglu", FP32, g, "cpu", requires_grad=True)
    r = pyops.moe_route(make_logits(T, E, g, "cpu"), k, backend="reference")
    y = pyops.moe_experts(x, r, w1, w2, w3, backend="cpu")
    return [y.detach(), *torch.autograd.grad(y, (x, w1, w2, w3), randn((T, d), FP32, g))]


def test_pools_are_per_thread():
    """Another thread's calls fill that thread's pools only; its results are this thread's bits."""
    require("cpu")
    pool.release_workspace()
    want = cpu_step()
    here = (set(pool.workspace.bufs), len(pool.saved_pool.bufs))
    assert here[0] and (here[1] or not pool.HAS_USE_COUNT)   # this thread's pools hold buffers now
    pool.release_workspace()
    seen = {}
    n_threads = torch.get_num_threads()

    def worker():
        torch.set_num_threads(n_threads)   # the same thread team as this thread's call
        seen["out"] = cpu_step()
        seen["pools"] = (set(pool.workspace.bufs), len(pool.saved_pool.bufs))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["pools"] == here
    assert pool.workspace.bufs == {} and pool.saved_pool.bufs == [] and pool.workspace.rows_key is None
    for a, b in zip(seen["out"], want):
        assert_bitwise_equal(a, b)


def test_workspace_limit_zero_keeps_nothing(monkeypatch):
    """PYOPS_MOE_WORKSPACE_MB=0: every buffer is allocated for its call and dropped; same bits."""
    require("cpu")
    pool.release_workspace()
    want = cpu_step()
    pool.release_workspace()
    monkeypatch.setenv("PYOPS_MOE_WORKSPACE_MB", "0")
    got = cpu_step()
    assert pool.workspace.bufs == {} and pool.saved_pool.bufs == []
    for a, b in zip(got, want):
        assert_bitwise_equal(a, b)
