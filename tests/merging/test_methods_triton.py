"""The Triton merge kernels (`pyops.merge(..., backend="triton")`, pyops.kernels.merging.methods)
against the reference: ties, dare / dare_linear, dare_ties, breadcrumbs, della / della_linear; forward only
(gradients go to the cpu or reference backend).

Besides the per-dtype tolerance of docs/design.md#numerics, the selections and masks are checked exactly:
TIES' kept set (every entry tied with the k-th magnitude kept), DARE's Philox drops and the
breadcrumbs / DELLA rank masks (ties broken by position), bit for bit against the reference and
the C++ CPU kernels. Shapes are small: on CPU the kernels
run under the Triton interpreter. On a GPU the same tests run on CUDA tensors.
"""
from __future__ import annotations

import math

import pytest
import torch

import pyops
from pyops import _backend
from pyops.merging import merge as M
from pyops.merging import backend_triton as MT
from pyops.merging import reference as R
from pyops.merging import task_arithmetic as TM
from _support import CUDA, assert_bitwise_equal, fmt_dtype
from .cases import (BF16, DTYPES, FP16, FP32, INTERPRETER_AOT_REASON, RANKED, block_size, check_close, merge_inputs,
                    merge_reason, n_blocks, merge_density)
from .cases import fresh_dynamo  # noqa: F401 (a fixture)

METHODS = ["ties", "dare", "dare_linear", "dare_ties", *RANKED]
DEV = torch.device("cuda" if CUDA else "cpu")
TRITON_REASON = merge_reason("triton", DEV)
CPU_REASON = merge_reason("cpu", torch.device("cpu"))

pytestmark = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend unavailable: {TRITON_REASON}")


def _inputs(shape, n, dtype, gen, ties=False):
    """base and n deltas (or fine-tuned weights), drawn in fp32 on the CPU, then cast and moved."""
    return merge_inputs(shape, n, dtype, gen, ties=ties, device=DEV)


def _kwargs(method, shape, blocks, n, gen, density, per_block):
    cshape = (n, n_blocks(shape, blocks)) if per_block else (n,)
    kw = dict(method=method, blocks=blocks, density=merge_density(method, density),
              coeffs=(0.25 + torch.rand(cshape, generator=gen)).to(DEV), lam=0.9, seed=2**63 + 12345,
              name="model.layers.0.mlp.weight")
    if method == "breadcrumbs":
        kw["gamma"] = 0.05
    return kw


def _reference(fn, base, deltas, **kw):
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return fn(base.cpu(), [d.cpu() for d in deltas], backend="reference", **kw)


# ------------------------------------------------------------------------------------------------
# Every method × dtype × block layout against the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("blocks", [None, "rows", 7], ids=lambda b: f"blocks-{b}")
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference(method, blocks, dtype, rng):
    shape, n = (5, 37), 3
    base, deltas = _inputs(shape, n, dtype, rng)
    per_block = blocks is not None
    kw = _kwargs(method, shape, blocks, n, rng, density=[0.1, 0.3, 1.0], per_block=per_block)
    for fn in (pyops.merge, pyops.merge_from_models):
        got = fn(base, deltas, backend="triton", **kw)
        check_close(got, _reference(fn, base, deltas, **kw), f"{fn.__name__} {method} blocks={blocks}")
        if dtype != FP32:  # the fp32 result before the final rounding
            got32 = fn(base, deltas, backend="triton", out_dtype=FP32, **kw)
            check_close(got32, _reference(fn, base, deltas, out_dtype=FP32, **kw), f"{fn.__name__} {method} -> fp32")


@pytest.mark.parametrize("shape,blocks", [((1,), None), ((7,), None), ((2, 3, 5), "rows"), ((9,), 1), ((5, 1), "rows"),
                                          ((33,), 32)],
                         ids=["1", "7", "2x3x5-rows", "9-b1", "5x1-rows", "33-b32"])
@pytest.mark.parametrize("method", ["ties", "dare", "dare_ties", *RANKED])
def test_odd_shapes_and_one_element_blocks(method, shape, blocks, rng):
    base, deltas = _inputs(shape, 2, FP32, rng)
    kw = _kwargs(method, shape, blocks, 2, rng, density=0.5, per_block=blocks is not None)
    got = pyops.merge_from_models(base, deltas, backend="triton", **kw)
    check_close(got, _reference(pyops.merge_from_models, base, deltas, **kw), f"{method} {shape} blocks={blocks}")


@pytest.mark.parametrize("shape,blocks", [((20_000,), None), ((3, 9_001), "rows"), ((25_000,), 10_000)],
                         ids=["20000", "3x9001-rows", "25000-b10000"])
def test_ties_large_blocks(shape, blocks, rng):
    """Blocks above SMALL_MAX: the multi-program radix select (three digit passes), last block shorter."""
    base, deltas = _inputs(shape, 3, FP32, rng)
    kw = _kwargs("ties", shape, blocks, 3, rng, density=[0.1, 0.3, 0.77], per_block=blocks is not None)
    for fn in (pyops.merge, pyops.merge_from_models):
        got = fn(base, deltas, backend="triton", **kw)
        check_close(got, _reference(fn, base, deltas, **kw), f"{fn.__name__} {shape} blocks={blocks}")


@pytest.mark.parametrize("method,shape,blocks", [("ties", (5, 11), "rows"), ("dare", (5, 11), "rows"),
                                                 ("dare_ties", (5, 11), "rows"), ("ties", (12_000,), None),
                                                 ("dare_ties", (12_000,), None), ("breadcrumbs", (5, 11), "rows"),
                                                 ("della", (300,), 7)],
                         ids=["ties-5x11-rows", "dare-5x11-rows", "dare_ties-5x11-rows", "ties-12000", "dare_ties-12000",
                              "breadcrumbs-5x11-rows", "della-300-b7"])
def test_more_tasks_than_one_launch(method, shape, blocks, rng):
    """10 tasks: two launches of at most 8 task pointers, accumulating in fp32 scratch."""
    n = 10
    base, deltas = _inputs(shape, n, FP32, rng)
    dens = [0.05 + 0.9 * i / (n - 1) for i in range(n)]
    kw = _kwargs(method, shape, blocks, n, rng, density=dens, per_block=True)
    got = pyops.merge_from_models(base, deltas, backend="triton", **kw)
    check_close(got, _reference(pyops.merge_from_models, base, deltas, **kw), f"{method} n={n}")


def test_ties_large_block_mostly_zero(rng):
    """A block of zeros but for a few entries: the k-th largest magnitude is 0 (bin 0 of every
    digit, where the padding lanes are counted too), so every entry is kept."""
    d = torch.zeros(20_001)
    d[torch.randint(0, 20_001, (17,), generator=rng)] = torch.randn(17, generator=rng)
    base, deltas = torch.zeros(20_001, device=DEV), [d.to(DEV), (-d).roll(3).to(DEV)]
    got = pyops.merge(base, deltas, method="ties", density=0.3, backend="triton")
    assert_bitwise_equal(got.cpu(), _reference(pyops.merge, base, deltas, method="ties", density=0.3), "mostly zero")


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_normalize_false(method, rng):
    base, deltas = _inputs((5, 30), 3, BF16, rng)
    kw = _kwargs(method, (5, 30), "rows", 3, rng, density=0.3, per_block=False)
    for normalize in (False, True):
        got = pyops.merge(base, deltas, normalize=normalize, out_dtype=FP32, backend="triton", **kw)
        want = _reference(pyops.merge, base, deltas, normalize=normalize, out_dtype=FP32, **kw)
        check_close(got, want, f"{method} normalize={normalize}")


def test_density_one_keeps_everything(rng):
    """ties with density 1.0 keeps every entry: the disjoint mean of the untrimmed task vectors."""
    base, deltas = _inputs((4, 33), 3, FP32, rng)
    for blocks in (None, "rows", 5):
        got = pyops.merge(base, deltas, method="ties", density=1.0, blocks=blocks, backend="triton")
        check_close(got, _reference(pyops.merge, base, deltas, method="ties", density=1.0, blocks=blocks), f"blocks={blocks}")


def test_out_out_dtype_and_in_place(rng):
    base, deltas = _inputs((6, 41), 3, FP32, rng)
    for method in ("ties", "dare"):
        kw = _kwargs(method, (6, 41), "rows", 3, rng, density=0.3, per_block=True)
        want = _reference(pyops.merge, base, deltas, **kw)
        out = torch.empty_like(base)
        assert pyops.merge(base, deltas, out=out, backend="triton", **kw) is out
        check_close(out, want, f"{method} out=")
        inplace = base.clone()
        pyops.merge(inplace, deltas, out=inplace, backend="triton", **kw)
        check_close(inplace, want, f"{method} out=base (in place)")
        half = pyops.merge(base, deltas, out_dtype=FP16, backend="triton", **kw)
        check_close(half, _reference(pyops.merge, base, deltas, out_dtype=FP16, **kw), f"{method} out_dtype=fp16")


@pytest.mark.parametrize("method", METHODS)
def test_empty(method):
    base = torch.empty(0, 4, device=DEV)
    got = pyops.merge(base, [torch.empty(0, 4, device=DEV)] * 2, method=method, density=0.5, backend="triton")
    assert got.shape == (0, 4) and got.device.type == DEV.type


# ------------------------------------------------------------------------------------------------
# Exactness of the masks and selections
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dare", "dare_ties"])
@pytest.mark.parametrize("task", [0, 2], ids=lambda t: f"task{t}")
def test_dare_mask_bit_exact(method, task, rng):
    """One non-zero task among three, zero base, coefficients 1: the output is that task's
    trimmed τ, so its kept positions must be exactly u < ρ with the reference's uniforms (counter =
    element group, task index, name hash; key = seed), and the bits those of the C++ kernels."""
    numel, seed, name, rho = 10_003, 2**64 - 3, "blk.3.attn_q", 0.37
    delta = torch.randn(numel, generator=rng)
    deltas = [torch.zeros(numel) for _ in range(3)]
    deltas[task] = delta
    kw = dict(method=method, density=rho, seed=seed, name=name)
    got = pyops.merge(torch.zeros(numel, device=DEV), [d.to(DEV) for d in deltas], backend="triton", **kw).cpu()
    keep = R.keep_uniforms(numel, task, seed, name, "cpu") < torch.tensor(rho, dtype=FP32)
    assert torch.equal(got != 0, keep & (delta != 0))
    inv = 1.0 / torch.tensor(rho, dtype=FP32)
    assert torch.equal(got[keep], (inv * delta)[keep])
    if CPU_REASON is None:
        assert_bitwise_equal(got, pyops.merge(torch.zeros(numel), deltas, backend="cpu", **kw), "triton vs cpu")
    assert_bitwise_equal(got, pyops.merge(torch.zeros(numel), deltas, backend="reference", **kw), "triton vs reference")


def test_dare_same_bits_as_cpu(rng):
    """Three tasks, per-block coefficients, fine-tuned weights: the same result as the C++ kernels."""
    if CPU_REASON is not None:
        pytest.skip(f"cpu backend unavailable: {CPU_REASON}")
    shape = (7, 123)
    base, deltas = _inputs(shape, 3, FP32, rng)
    kw = _kwargs("dare", shape, "rows", 3, rng, density=[0.2, 0.5, 0.9], per_block=True)
    got = pyops.merge_from_models(base, deltas, backend="triton", **kw).cpu()
    want = pyops.merge_from_models(base.cpu(), [d.cpu() for d in deltas], backend="cpu",
                                   **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    if CUDA:  # the GPU may contract w·t + acc to one FMA: equal within the fp32 tolerance
        check_close(got, want, "triton vs cpu")
    else:
        assert_bitwise_equal(got, want, "triton vs cpu")


TIED_CASES = [pytest.param(shape, blocks, density, id=f"{name}-d{density}")
              for shape, blocks, name in [((300,), None, "300"), ((6, 50), "rows", "6x50-rows"), ((64, 31), 7, "64x31-b7")]
              for density in (0.1, 0.5, 0.77)]
TIED_CASES += [pytest.param((20_000,), None, 0.3, id="20000-radix-d0.3"),
               pytest.param((2, 12_000), "rows", 0.77, id="2x12000-rows-radix-d0.77")]


@pytest.mark.parametrize("shape,blocks,density", TIED_CASES)
def test_ties_keeps_every_tied_entry(shape, blocks, density, rng):
    """Magnitudes in {1, 2}: the k-th largest magnitude is shared by a mass of entries and every one
    of them is kept; the kept set of each block is exactly |τ| ≥ (k-th largest |τ|)."""
    base, deltas = _inputs(shape, 3, FP32, rng, ties=True)
    for fn in (pyops.merge, pyops.merge_from_models):
        kw = dict(method="ties", blocks=blocks, density=density)
        got = fn(base, deltas, backend="triton", **kw)
        # Sums of ±1, ±2 are exact: the same bits as the reference on any device.
        assert_bitwise_equal(got.cpu(), _reference(fn, base, deltas, **kw), f"{fn.__name__} ties")
    bs = block_size(shape, blocks)
    d = deltas[0].reshape(-1).cpu()
    kept = pyops.merge(torch.zeros_like(deltas[0]), [deltas[0]], method="ties", blocks=blocks, density=density,
                       backend="triton").reshape(-1).cpu() != 0
    for lo in range(0, d.numel(), bs)[:40]:
        seg = d[lo:lo + bs].abs()
        k = max(1, math.floor(float(torch.tensor(density, dtype=FP32)) * seg.numel()))
        thr = torch.sort(seg, descending=True).values[k - 1]
        assert torch.equal(kept[lo:lo + bs], seg >= thr), f"block at {lo}"


RANKED_CASES = [((300,), None), ((6, 50), "rows"), ((64, 31), 7), ((2, 3000), 2048)]


@pytest.mark.parametrize("shape,blocks", RANKED_CASES, ids=["300", "6x50-rows", "64x31-b7", "2x3000-b2048"])
@pytest.mark.parametrize("method", RANKED)
def test_ranked_masks_bit_exact(method, shape, blocks, rng):
    """Magnitudes in {1, 2} (runs of equal ranks keys, broken by position), coefficients 1: the
    reference's bits, and the C++ kernels' (the last block is shorter in the chunked layouts)."""
    base, deltas = _inputs(shape, 3, FP32, rng, ties=True)
    kw = dict(method=method, blocks=blocks, density=0.4, gamma=0.2, seed=5, name="w")
    for fn in (pyops.merge, pyops.merge_from_models):
        got = fn(base, deltas, backend="triton", **kw).cpu()
        assert_bitwise_equal(got, _reference(fn, base, deltas, **kw), f"{fn.__name__} {method} vs reference")
        if CPU_REASON is None:
            want = fn(base.cpu(), [d.cpu() for d in deltas], backend="cpu", **kw)
            assert_bitwise_equal(got, want, f"{fn.__name__} {method} vs cpu")


def test_ties_threshold_is_exact_kth_magnitude(rng):
    """Distinct magnitudes: exactly k entries per block survive (k = max(1, ⌊ρ·n⌋), ρ in fp32)."""
    shape, density = (4, 1000), 0.3
    d = torch.randn(shape, generator=rng).to(DEV)
    kept = pyops.merge(torch.zeros_like(d), [d], method="ties", blocks="rows", density=density, backend="triton") != 0
    assert kept.sum(dim=1).tolist() == [math.floor(float(torch.tensor(density, dtype=FP32)) * 1000)] * 4


# ------------------------------------------------------------------------------------------------
# Backend choice, registration, compile
# ------------------------------------------------------------------------------------------------

def test_can_run_reasons(rng):
    base, deltas = _inputs((4, 5), 2, FP32, rng)
    p = TM.prepare(base, deltas, [1.0, 1.0], None, None)
    assert M._can_run(p, "ties", False)["triton"]() is None
    assert M._can_run(p, "della", False)["triton"]() is None
    assert "consensus" in M._can_run(p, "consensus", False)["triton"]()
    assert "gradients" in M._can_run(p, "dare", True)["triton"]()
    c = torch.ones(2, requires_grad=True, device=DEV)
    with pytest.raises(_backend.BackendUnavailableError, match="gradients"):
        pyops.merge(base, deltas, coeffs=c, method="ties", density=0.5, backend="triton")
    # auto with gradients falls back to the reference (on CUDA: triton is first in the order)
    out = pyops.merge(base, deltas, coeffs=c, method="ties", density=0.5)
    out.sum().backward()
    assert c.grad is not None


@pytest.mark.skipif(not CUDA, reason="the GPU order (cuda, triton, then reference) applies to CUDA tensors")
def test_auto_picks_triton_on_cuda_for_methods_without_cuda_kernels(rng):
    base, deltas = _inputs((4, 5), 2, FP32, rng)
    pyops.merge(base, deltas, method="della", density=0.5)
    assert _backend.last_choice("merge").backend == "triton"


def _op_args(rng, dtype=FP32, method=1, n=2, shape=(5, 13)):
    base, deltas = _inputs(shape, n, dtype, rng)
    coeffs = (0.25 + torch.rand(n, shape[0], generator=rng)).to(DEV)
    return (base, deltas, coeffs, [0.3] * n, shape[1], False, method, 0.9, -3, R.name_hash("x"), True, 0.05, 0.1)


@pytest.mark.parametrize("util", ["test_schema", "test_faketensor", "test_aot_dispatch_dynamic"])
@pytest.mark.parametrize("method", [1, 2, 3, 4, 5], ids=["ties", "dare", "dare_ties", "breadcrumbs", "della"])
def test_opcheck_merge_triton_ops(method, util, rng):
    if util == "test_aot_dispatch_dynamic" and not CUDA:
        pytest.skip(INTERPRETER_AOT_REASON)
    args = _op_args(rng, method=method, dtype=BF16 if method == 3 else FP32)
    torch.library.opcheck(torch.ops.pyops.merge_triton.default, (*args, FP32), test_utils=util)
    out = torch.empty(args[0].shape, dtype=args[0].dtype, device=DEV)
    torch.library.opcheck(torch.ops.pyops.merge_triton_out.default, (*args, out), test_utils=util)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph(compiler, rng, fresh_dynamo):
    if compiler != "eager" and not CUDA:
        pytest.skip(INTERPRETER_AOT_REASON)
    base, deltas = _inputs((6, 40), 3, FP32, rng)

    def f(b, ds, out):
        y = pyops.merge(b, ds, method="ties", blocks="rows", density=0.3, backend="triton")
        z = pyops.merge_from_models(b, ds, method="dare_ties", density=0.5, seed=3, name="w", backend="triton")
        pyops.merge(b, ds, method="dare", density=0.5, seed=3, name="w", out=out, backend="triton")
        r = pyops.merge_from_models(b, ds, method="della", blocks=7, density=0.5, seed=3, name="w", backend="triton")
        return y, z, out, r

    want = f(base, deltas, torch.empty_like(base))
    got = torch.compile(f, fullgraph=True, backend=compiler)(base, deltas, torch.empty_like(base))
    for g, w, what in zip(got, want, ("ties", "dare_ties from_models", "dare out=", "della from_models")):
        check_close(g, w.cpu(), what)


def test_run_rejects_other_methods(rng):
    base, deltas = _inputs((4,), 2, FP32, rng)
    p = TM.prepare(base, deltas, [1.0, 1.0], None, None)
    with pytest.raises(ValueError, match="consensus"):
        MT.run(p, "consensus", [0.5, 0.5], from_models=False, seed=0, lam=1.0, name="", normalize=None, gamma=0.01,
               epsilon=0.1, out=None)
