"""TIES with `exact_k=True` (issue 16, item 5): exactly k = max(1, ⌊ρ·n⌋) entries kept per block,
the ties at the k-th magnitude taken by lowest flat index first; the default (every tie kept) is
unchanged. Reference against an independent formulation, the C++ kernels against the reference
(forward bits, gradients, thread counts, non-finite inputs), the GPU backends' refusals and bad
input."""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_bitwise_equal, assert_close, fmt_dtype, require_backend
from pyops.merging import backend_cpu, backend_triton
from pyops.merging import reference as ref
from pyops.merging import task_arithmetic as TM
from pyops.merging.spec import resolve_blocks
from pyops.testing import REDUCTION_TOL, tolerance_for
from .cases import BF16, DTYPES, FP16, FP32, shape_id


def tied(shape, n, gen, dtype=FP32):
    """Task vectors with many equal magnitudes (a few levels, both signs), as bf16 checkpoints have."""
    return [(torch.randint(-3, 4, shape, generator=gen).float() * 0.25).to(dtype) for _ in range(n)]


def exact_mask64(mag, density, block_size):
    """Independent: per block, a stable sort by (−|τ|, index), the first k positions."""
    out = torch.zeros(mag.numel(), dtype=torch.bool)
    for lo in range(0, mag.numel(), block_size):
        blk = mag[lo:lo + block_size]
        k = max(1, int(density * blk.numel()))
        order = sorted(range(blk.numel()), key=lambda j: (-float(blk[j]), j))
        out[[lo + j for j in order[:k]]] = True
    return out


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("blocks", [None, "rows", 7], ids=["whole", "rows", "b7"])
def test_reference_mask_is_the_first_k_by_magnitude_then_index(density, blocks, rng):
    shape = (6, 25)
    (tau,) = tied(shape, 1, rng)
    bs = resolve_blocks(blocks, shape)[0]
    got = ref.topk_keep(tau.abs().reshape(-1), density, bs, exact_k=True)
    assert torch.equal(got, exact_mask64(tau.abs().reshape(-1), density, bs))


def test_reference_ties_taken_by_lowest_index():
    mag = torch.tensor([1.0, 2.0, 1.0, 1.0, 0.5, 1.0])
    # k = 3: the 2.0, then the first two of the four 1.0s (indices 0 and 2)
    assert ref.topk_keep(mag, 0.5, 6, exact_k=True).tolist() == [True, True, True, False, False, False]
    assert ref.topk_keep(mag, 0.5, 6).tolist() == [True, True, True, True, False, True]


def test_default_keeps_every_tie(rng):
    base = torch.randn(5, 12, generator=rng)
    deltas = tied((5, 12), 3, rng)
    default = pyops.merge(base, deltas, method="ties", density=0.4, backend="reference")
    explicit = pyops.merge(base, deltas, method="ties", density=0.4, exact_k=False, backend="reference")
    assert torch.equal(default, explicit)
    exact = pyops.merge(base, deltas, method="ties", density=0.4, exact_k=True, backend="reference")
    assert not torch.equal(default, exact)


def test_without_ties_exact_k_changes_nothing(rng):
    base = torch.randn(4, 33, generator=rng)
    deltas = [torch.randn(4, 33, generator=rng) for _ in range(3)]
    assert torch.equal(pyops.merge(base, deltas, method="ties", density=0.3, exact_k=True, backend="cpu"),
                       pyops.merge(base, deltas, method="ties", density=0.3, backend="cpu"))


# (shape, blocks): small blocks (one selection per segment), large blocks (the radix thresholds),
# and blocks split across work items
CPU_CASES = [((7, 33), None), ((5, 40), "rows"), ((100, 50), 7), ((300, 400), None), ((3, 70000), None),
             ((3, 70000), "rows"), ((2, 90001), 65537)]


@pytest.mark.parametrize("from_models", [False, True], ids=["deltas", "from_models"])
@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("shape,blocks", CPU_CASES, ids=[f"{shape_id(s)}-{b}" for s, b in CPU_CASES])
def test_cpu_matches_reference_bitwise(shape, blocks, dtype, from_models, rng):
    require_backend("cpu")
    base = torch.randn(shape, generator=rng).to(dtype)
    deltas = tied(shape, 3, rng, dtype)
    if from_models:
        deltas = [(base.float() + d.float()).to(dtype) for d in deltas]
    fn = pyops.merge_from_models if from_models else pyops.merge
    kw = dict(method="ties", density=[0.3, 0.55, 0.8], blocks=blocks, coeffs=[0.5, 1.0, 2.0], exact_k=True)
    assert_bitwise_equal(fn(base, deltas, backend="cpu", **kw), fn(base, deltas, backend="reference", **kw))


def test_cpu_same_bits_for_every_thread_count(rng):
    require_backend("cpu")
    base = torch.randn(3, 90000, generator=rng)
    deltas = tied((3, 90000), 3, rng)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pyops.merge(base, deltas, method="ties", density=0.35, exact_k=True, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = pyops.merge(base, deltas, method="ties", density=0.35, exact_k=True, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert_bitwise_equal(one, many)


@pytest.mark.parametrize("special", ["nan", "inf"])
def test_cpu_non_finite_inputs_match_reference(special, rng):
    require_backend("cpu")
    base = torch.randn(4, 30, generator=rng)
    deltas = tied((4, 30), 2, rng)
    deltas[0][1, 3] = float(special)
    deltas[1][2, 5] = float(special)
    kw = dict(method="ties", density=0.3, exact_k=True)
    assert_close(pyops.merge(base, deltas, backend="cpu", **kw), pyops.merge(base, deltas, backend="reference", **kw),
                 tolerance_for(FP32))


@pytest.mark.parametrize("shape,blocks", [((6, 20), None), ((6, 20), "rows"), ((2, 70001), None)],
                         ids=["6x20-whole", "6x20-rows", "2x70001-whole"])  # the last: radix thresholds
def test_cpu_gradients_match_reference(shape, blocks, rng):
    require_backend("cpu")
    base0 = torch.randn(shape, generator=rng)
    deltas0 = tied(shape, 3, rng)
    coeffs0 = torch.tensor([0.5, 1.0, 1.5])
    grads = []
    for backend in ("cpu", "reference"):
        base = base0.clone().requires_grad_()
        deltas = [d.clone().requires_grad_() for d in deltas0]
        coeffs = coeffs0.clone().requires_grad_()
        out = pyops.merge(base, deltas, method="ties", density=0.3, coeffs=coeffs, blocks=blocks, exact_k=True,
                          backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append([base.grad, *[d.grad for d in deltas], coeffs.grad])
    for g_cpu, g_ref in zip(*grads):
        assert_close(g_cpu, g_ref, REDUCTION_TOL, "gradient")


def test_gradcheck_reference_fp64(rng):
    base = torch.randn(3, 8, generator=rng, dtype=torch.float64)
    deltas = [d.double() for d in tied((3, 8), 2, rng)]
    coeffs = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c: pyops.merge(base, deltas, method="ties", density=0.4, coeffs=c, exact_k=True), (coeffs,))


def test_triton_refuses_exact_k():
    reason = backend_triton.MERGE.reason(torch.device("cpu"), torch.zeros(1))
    if reason is not None:
        pytest.skip(reason)
    p = TM.prepare(torch.zeros(4), [torch.ones(4)], [1.0], None, None)
    assert "exact_k" in backend_triton.merge_reason(p, "ties", False, exact_k=True)
    assert backend_triton.merge_reason(p, "ties", False) is None


def test_cpu_accepts_exact_k():
    p = TM.prepare(torch.zeros(4), [torch.ones(4)], [1.0], None, None)
    assert backend_cpu.merge_reason(p, "ties", True, exact_k=True) in (None, backend_cpu.MERGE.reason(
        torch.device("cpu"), torch.zeros(1)))


def test_exact_k_for_other_methods_is_an_error():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="exact_k"):
        pyops.merge(x, [x], method="breadcrumbs", density=0.5, exact_k=True)


def test_exact_k_must_be_a_bool():
    x = torch.ones(4)
    with pytest.raises(TypeError, match="exact_k"):
        pyops.merge(x, [x], method="ties", density=0.5, exact_k=1)


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=fmt_dtype)
def test_exact_k_keeps_exactly_k_on_half_precision(dtype, rng):
    """The mask counts exactly k per task: merging one task with weight 1 leaves k nonzeros."""
    base = torch.zeros(8, 50, dtype=dtype)
    (delta,) = tied((8, 50), 1, rng, dtype)
    delta[delta == 0] = 0.25
    out = pyops.merge(base, [delta], method="ties", density=0.3, exact_k=True, backend="cpu")
    assert int((out != 0).sum()) == int(0.3 * 400)
