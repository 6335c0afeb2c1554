"""The native backward of `pyops.merge` on the C++ CPU kernels (`pyops::merge_native_backward`):
gradients to base, every delta / fine-tuned model and the coefficients, with every mask (TIES trim,
DARE drop, the breadcrumbs rank band, DELLA's rank-dependent drop, the sign election) held fixed — the reference's definition of these gradients.

Each case runs forward + backward on the cpu backend and on the reference with the same inputs and
upstream gradient; outputs and input gradients are judged with the dtype's tolerance, coefficient
gradients (sums over a whole block) with the reduction tolerance in fp32.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops import _native
from pyops.merging.task_arithmetic import resolve_blocks
from pyops.testing import REDUCTION_TOL, compare, tolerance_for
from _support import assert_bitwise_equal, fmt_dtype

pytestmark = pytest.mark.skipif(
    _native.cpu_module is None or not hasattr(_native.cpu_module, "merge_backward"),
    reason="pyops._C without the merge backward")

METHODS = ["ties", "dare", "dare_linear", "dare_ties", "breadcrumbs", "della", "della_linear"]
SHAPES = [(1,), (5, 7), (3, 517), (70_001,)]   # 70001: one block above the large-block cut (65536)
BLOCKS = [None, "rows", 13]


def _inputs(shape, dtype, from_models, blocks, gen):
    base = torch.randn(shape, generator=gen).to(dtype)
    taus = [(0.1 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(3)]
    tasks = [(base.float() + t.float()).to(dtype) for t in taus] if from_models else taus
    n_blocks = resolve_blocks(blocks, shape)[1]
    coeffs = torch.rand((3, n_blocks) if blocks == "rows" else (3,), generator=gen) + 0.2
    grad = torch.randn(shape, generator=gen).to(dtype)
    return base, tasks, coeffs, grad


def _run(backend, method, base, tasks, coeffs, grad, from_models, blocks, normalize=None):
    b = base.clone().requires_grad_()
    ts = [t.clone().requires_grad_() for t in tasks]
    c = coeffs.clone().requires_grad_()
    fn = pyops.merge_from_models if from_models else pyops.merge
    out = fn(b, ts, method=method, coeffs=c, blocks=blocks, density=[0.3, 0.55, 0.8], lam=0.7, seed=11,
             name="model.layers.0.mlp.up_proj.weight", normalize=normalize, backend=backend)
    out.backward(grad)
    return out.detach(), b.grad, [t.grad for t in ts], c.grad


def _check(actual, expected, dtype):
    tol = tolerance_for(dtype)
    names = ["out", "grad base", "grad task 0", "grad task 1", "grad task 2", "grad coeffs"]
    got = [actual[0], actual[1], *actual[2], actual[3]]
    want = [expected[0], expected[1], *expected[2], expected[3]]
    for name, a, e in zip(names, got, want):
        t = REDUCTION_TOL if (name == "grad coeffs" and dtype == torch.float32) else tol
        r = compare(a, e, t)
        assert r.ok, f"{name}: {r}"


@pytest.mark.parametrize("from_models", [False, True], ids=["deltas", "from_models"])
@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"blocks={b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_reference_fp32(method, shape, blocks, from_models, rng):
    base, tasks, coeffs, grad = _inputs(shape, torch.float32, from_models, blocks, rng)
    actual = _run("cpu", method, base, tasks, coeffs, grad, from_models, blocks)
    assert pyops.last_choice("merge").backend == "cpu"
    expected = _run("reference", method, base, tasks, coeffs, grad, from_models, blocks)
    _check(actual, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=fmt_dtype)
@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_reference_half(method, dtype, rng):
    base, tasks, coeffs, grad = _inputs((37, 29), dtype, True, "rows", rng)
    actual = _run("cpu", method, base, tasks, coeffs, grad, True, "rows")
    expected = _run("reference", method, base, tasks, coeffs, grad, True, "rows")
    _check(actual, expected, dtype)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_gradients_without_normalisation(method, rng):
    base, tasks, coeffs, grad = _inputs((41, 17), torch.float32, False, None, rng)
    actual = _run("cpu", method, base, tasks, coeffs, grad, False, None, normalize=False)
    expected = _run("reference", method, base, tasks, coeffs, grad, False, None, normalize=False)
    _check(actual, expected, torch.float32)


def test_coefficient_gradient_is_the_same_for_every_thread_count(rng):
    base, tasks, coeffs, grad = _inputs((200_003,), torch.float32, True, None, rng)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("cpu", "ties", base, tasks, coeffs, grad, True, None)
        torch.set_num_threads(2)
        two = _run("cpu", "ties", base, tasks, coeffs, grad, True, None)
    finally:
        torch.set_num_threads(old)
    assert_bitwise_equal(one[3], two[3])
    assert_bitwise_equal(one[1], two[1])


def test_consensus_gradients_come_from_the_reference(rng):
    base, tasks, coeffs, grad = _inputs((9, 11), torch.float32, False, None, rng)
    c = coeffs.clone().requires_grad_()
    pyops.merge(base, tasks, method="consensus", coeffs=c, k=2)
    choice = pyops.last_choice("merge")
    assert choice.backend == "reference"
    assert "consensus" in choice.passed_over["cpu"]


def test_opcheck_backward_op(rng):
    from pyops.merging import backend_cpu as MN
    base, tasks, coeffs, grad = _inputs((6, 10), torch.float32, True, None, rng)
    args = (grad, base, tasks, coeffs, [0.3, 0.5, 0.9], 60, True, 1, 0.7, 5, 123, 2, 0.6, True, 0.01, 0.1, True, True,
            True)
    torch.library.opcheck(MN.merge_backward_op, args)
    b = base.clone().requires_grad_()
    c = coeffs.clone().requires_grad_()
    torch.library.opcheck(MN.merge_op, (b, tasks, c, [0.3, 0.5, 0.9], 60, True, 1, 0.7, 5, 123, 2, 0.6, True,
                                         0.01, 0.1, torch.float32))


def test_compiled_merge_backward_has_no_graph_break(rng):
    base, tasks, coeffs, grad = _inputs((8, 12), torch.float32, True, None, rng)

    def f(b, ts, c):
        return pyops.merge_from_models(b, ts, method="dare_ties", coeffs=c, density=0.5, seed=2, backend="cpu")

    c1 = coeffs.clone().requires_grad_()
    torch.compile(f, fullgraph=True)(base, tasks, c1).backward(grad)
    c2 = coeffs.clone().requires_grad_()
    f(base, tasks, c2).backward(grad)
    assert_bitwise_equal(c1.grad, c2.grad)
