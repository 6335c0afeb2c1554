"""The C++ CPU merge kernels (`pyops.merge(..., backend="cpu")`, csrc/merging/) against
the reference (`backend="reference"`): ties, dare / dare_linear, dare_ties, breadcrumbs, della /
della_linear, consensus, model_stock.

The kernels reproduce the reference's fp32 operations one by one (contraction off, task sums in
the reference's order), so besides the per-dtype tolerance of docs/design.md#numerics the selections and
masks are checked for exact equality: TIES' kept set (ties with the k-th magnitude included), DARE's
Philox drops, the breadcrumbs / DELLA ranks (ties broken by position), and the results for every
thread count and instruction set.

model_stock is compared with the reference evaluated in fp64 (then cast to the output dtype): its
interpolation weight t comes from norms of whole task vectors, which the fp32 reference computes
with a relative error of ~2e-6 on 2e5 elements, while the kernel's Gram matrix accumulates in fp64.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops import _native
from pyops.merging import backend_cpu as MN
from pyops.merging import registry
from pyops.merging import reference as R
from pyops.merging import task_arithmetic as TM
from pyops.testing import REDUCTION_TOL, compare
from _support import assert_bitwise_equal, fmt_dtype, saved_outputs_with_and_without
from .cases import (BF16, DTYPES, FP32, FROM_MODELS_IDS, RANKED, block_size, check_close, merge_inputs as _inputs,
                    merge_reason, n_blocks, shape_id, merge_density)

METHODS = ["ties", "dare", "dare_linear", "dare_ties", "breadcrumbs", "della", "della_linear", "consensus",
           "model_stock"]
SHAPES = [(1,), (7,), (3, 517), (64, 1031), (200_000,)]  # 200k: one block above the large-block cut (65536)
BLOCKS = [None, "rows", 7]
CPU_REASON = merge_reason("cpu", torch.device("cpu"))

pytestmark = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend unavailable: {CPU_REASON}")


def _coeffs(shape, blocks, n, gen, per_block):
    """Positive weights in [0.25, 1.25): [n] or [n, n_blocks]."""
    cshape = (n, n_blocks(shape, blocks)) if per_block else (n,)
    return 0.25 + torch.rand(cshape, generator=gen)


def _kwargs(method, shape, blocks, n, gen, density, per_block=None):
    kw = dict(method=method, blocks=blocks)
    if method == "model_stock":
        return kw
    kw["coeffs"] = _coeffs(shape, blocks, n, gen, blocks is not None if per_block is None else per_block)
    kw["lam"] = 0.9
    if method == "consensus":
        kw["k"] = min(2, n)
    else:
        kw["density"] = merge_density(method, density)
        if method == "breadcrumbs":
            kw["gamma"] = 0.05
        kw["seed"] = 2**63 + 12345  # beyond int64: exercises the seed's round trip through the op schema
        kw["name"] = "model.layers.0.mlp.weight"
    return kw


def _run(fn, base, deltas, backend, **kw):
    return fn(base, deltas, backend=backend, **kw)


def _expected(fn, base, deltas, **kw):
    if kw["method"] != "model_stock":
        return _run(fn, base, deltas, "reference", **kw)
    out = _run(fn, base.double(), [d.double() for d in deltas], "reference", **kw)
    return out.to(base.dtype)


# ------------------------------------------------------------------------------------------------
# Every method against the reference: odd shapes, block layouts, dtypes, both entry points
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("from_models", [False, True], ids=FROM_MODELS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"blocks-{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference(method, shape, blocks, dtype, from_models, rng):
    n = 3
    base, deltas = _inputs(shape, n, dtype, rng)
    kw = _kwargs(method, shape, blocks, n, rng, density=[0.1, 0.3, 1.0])
    fn = pyops.merge_from_models if from_models else pyops.merge
    got = _run(fn, base, deltas, "cpu", **kw)
    check_close(got, _expected(fn, base, deltas, **kw), f"{method} {shape} blocks={blocks}")


@pytest.mark.parametrize("density", [0.1, 0.3, 1.0, "per-task"], ids=lambda d: f"density-{d}")
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10], ids=lambda n: f"N{n}")  # 10: past the election's unrolled task counts
@pytest.mark.parametrize("method", METHODS)
def test_task_counts_and_densities(method, n, density, rng):
    if method == "model_stock" and n < 2:
        pytest.skip("model_stock needs at least 2 models")
    shape, blocks = (64, 1031), "rows"
    dens = [0.05 + 0.9 * i / max(n - 1, 1) for i in range(n)] if density == "per-task" else density
    base, deltas = _inputs(shape, n, FP32, rng)
    kw = _kwargs(method, shape, blocks, n, rng, density=dens)
    for fn in (pyops.merge, pyops.merge_from_models):
        got = _run(fn, base, deltas, "cpu", **kw)
        check_close(got, _expected(fn, base, deltas, **kw), f"{fn.__name__} {method} n={n} density={dens}")


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_normalize_false_and_out_dtype(method, rng):
    base, deltas = _inputs((5, 300), 3, BF16, rng)
    kw = _kwargs(method, (5, 300), "rows", 3, rng, density=0.3)
    for normalize in (False, True):
        got = pyops.merge(base, deltas, normalize=normalize, out_dtype=FP32, backend="cpu", **kw)
        want = pyops.merge(base, deltas, normalize=normalize, out_dtype=FP32, backend="reference", **kw)
        assert_bitwise_equal(got, want, f"{method} normalize={normalize} bf16 -> fp32")


def test_out_and_in_place(rng):
    base, deltas = _inputs((64, 1031), 3, FP32, rng)
    kw = _kwargs("ties", (64, 1031), None, 3, rng, density=0.3)
    want = pyops.merge(base, deltas, backend="reference", **kw)
    out = torch.empty_like(base)
    assert pyops.merge(base, deltas, out=out, backend="cpu", **kw) is out
    assert_bitwise_equal(out, want, "out=")
    inplace = base.clone()
    pyops.merge(inplace, deltas, out=inplace, backend="cpu", **kw)
    assert_bitwise_equal(inplace, want, "out=base (in place)")


@pytest.mark.parametrize("method", ["ties", "dare", "breadcrumbs", "della", "consensus", "model_stock"])
def test_empty(method):
    base = torch.empty(0, 4)
    deltas = [torch.empty(0, 4), torch.empty(0, 4)]
    got = pyops.merge(base, deltas, method=method, backend="cpu")
    assert got.shape == (0, 4)


# ------------------------------------------------------------------------------------------------
# Exactness of the selections and masks
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,blocks", [((7,), None), ((3, 517), "rows"), ((64, 1031), 7), ((200_000,), None),
                                          ((300_000,), 70_000)], ids=["7", "3x517-rows", "64x1031-b7", "200000",
                                                                      "300000-b70000"])
@pytest.mark.parametrize("method", ["dare", "dare_linear", "ties", "dare_ties", *RANKED])
def test_bit_exact_fp32(method, shape, blocks, rng):
    """coeffs 1, fp32: the kept sets (and so the outputs) are the reference's, bit for bit."""
    base, deltas = _inputs(shape, 3, FP32, rng)
    for fn in (pyops.merge, pyops.merge_from_models):
        kw = dict(method=method, blocks=blocks, density=0.3, seed=7, name="w")
        got = fn(base, deltas, backend="cpu", **kw)
        assert_bitwise_equal(got, fn(base, deltas, backend="reference", **kw), f"{fn.__name__} {method}")


def test_dare_mask_is_the_reference_philox_mask(rng):
    """One task, zero base, density 0.5: the kept positions are exactly u < 0.5 with the reference's
    uniforms (counter = element group, task, name hash; key = seed)."""
    numel, seed, name = 100_003, 2**64 - 3, "blk.3.attn_q"
    delta = torch.randn(numel, generator=rng)
    got = pyops.merge(torch.zeros(numel), [delta], method="dare", density=0.5, seed=seed, name=name, backend="cpu")
    keep = R.keep_uniforms(numel, 0, seed, name, "cpu") < 0.5
    assert torch.equal(got != 0, keep & (delta != 0))
    assert torch.equal(got[keep], (delta * (1 / torch.tensor(0.5)))[keep])


@pytest.mark.parametrize("shape,blocks", [((200_000,), None), ((1 << 20,), None), ((64, 1031), "rows"),
                                          ((64, 1031), 7), ((600_000,), 65_536)],
                         ids=["200000", "1M-radix-fallback", "64x1031-rows", "64x1031-b7", "600000-b65536"])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.77])
def test_ties_keeps_every_tied_entry(shape, blocks, density, rng):
    """Magnitudes in {1, 2}: the k-th largest magnitude is shared by a mass of entries, and every
    one of them is kept, as in the reference (1M elements take the radix fallback: the candidate
    bracket overflows)."""
    base, deltas = _inputs(shape, 3, FP32, rng, ties=True)
    for fn in (pyops.merge, pyops.merge_from_models):
        kw = dict(method="ties", blocks=blocks, density=density)
        got = fn(base, deltas, backend="cpu", **kw)
        assert_bitwise_equal(got, fn(base, deltas, backend="reference", **kw), f"{fn.__name__} ties")
    # The kept set itself, one task at a time (zero base, one delta: out = trimmed delta).
    bs = block_size(shape, blocks)
    d = deltas[0].reshape(-1)
    kept = pyops.merge(torch.zeros_like(deltas[0]), [deltas[0]], method="ties", blocks=blocks, density=density,
                       backend="cpu").reshape(-1) != 0
    for lo in range(0, d.numel(), bs)[:50]:
        seg = d[lo:lo + bs].abs()
        k = max(1, int(float(torch.tensor(density, dtype=FP32)) * seg.numel()))  # fp32 density, as the reference
        thr = torch.sort(seg, descending=True).values[k - 1]
        assert torch.equal(kept[lo:lo + bs], seg >= thr), f"block at {lo}"
        assert int(kept[lo:lo + bs].sum()) >= k


@pytest.mark.parametrize("shape,blocks", [((3000,), None), ((1 << 20,), None), ((64, 1031), "rows"),
                                          ((64, 1031), 7), ((300_000,), 70_000)],
                         ids=["3000", "1M", "64x1031-rows", "64x1031-b7", "300000-b70000"])
@pytest.mark.parametrize("method", RANKED)
def test_ranked_methods_break_ties_by_position(method, shape, blocks, rng):
    """Magnitudes in {1, 2}: the rank band (breadcrumbs) and the keep probabilities (DELLA) fall
    inside runs of equal magnitudes, ordered by position as the reference's stable sort orders them."""
    base, deltas = _inputs(shape, 3, FP32, rng, ties=True)
    kw = dict(method=method, blocks=blocks, density=0.4, seed=3, name="w", gamma=0.3)
    for fn in (pyops.merge, pyops.merge_from_models):
        got = fn(base, deltas, backend="cpu", **kw)
        assert_bitwise_equal(got, fn(base, deltas, backend="reference", **kw), f"{fn.__name__} {method}")


def test_breadcrumbs_keeps_the_rank_band(rng):
    """One task, zero base: exactly ⌊ρ·n⌋ entries survive per block, the ranks [n − ⌊ρn⌋ − ⌊γn⌋, n − ⌊γn⌋)
    of a stable ascending sort of |τ|."""
    delta = torch.randn(5, 4001, generator=rng)
    delta[:, ::3] = 0.5  # a run of equal magnitudes across the band's lower edge
    got = pyops.merge(torch.zeros_like(delta), [delta], method="breadcrumbs", blocks="rows", density=0.6, gamma=0.1,
                      backend="cpu")
    n = delta.shape[1]
    n_top, n_keep = int(0.1 * n), int(float(torch.tensor(0.6)) * n)
    for r in range(delta.shape[0]):
        order = torch.sort(delta[r].abs(), stable=True).indices
        band = torch.zeros(n, dtype=torch.bool)
        band[order[n - n_keep - n_top:n - n_top]] = True
        assert torch.equal(got[r] != 0, band), f"row {r}"
        assert torch.equal(got[r][band], delta[r][band])


@pytest.mark.parametrize("method", RANKED)
def test_ranked_methods_with_nan_in_the_last_block(method, rng):
    """A NaN ranks above every finite magnitude (and above the reference's padding): the outputs
    agree with the reference, NaN where the reference has NaN."""
    base, deltas = _inputs((1003,), 2, FP32, rng)
    deltas[0][1001] = float("nan")
    deltas[1][5] = float("nan")
    kw = dict(method=method, blocks=100, density=0.5, seed=1)
    got = pyops.merge(base, deltas, backend="cpu", **kw)
    want = pyops.merge(base, deltas, backend="reference", **kw)
    assert torch.equal(got.isnan(), want.isnan())
    assert_bitwise_equal(got[~got.isnan()], want[~want.isnan()], method)


# ------------------------------------------------------------------------------------------------
# Determinism: thread counts and instruction sets
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def restore_threads_and_isa():
    threads = torch.get_num_threads()
    isa = _native.cpu_module.active_isa()
    yield
    torch.set_num_threads(threads)
    _native.cpu_module.set_isa(isa)


@pytest.mark.parametrize("shape,blocks", [((600, 500), None), ((600, 500), "rows"), ((600, 500), 70_000),
                                          ((1 << 20,), None)], ids=["whole", "rows", "b70000", "1M"])
@pytest.mark.parametrize("method", ["ties", "dare", "dare_ties", "breadcrumbs", "della", "consensus", "model_stock"])
def test_same_bits_for_threads_and_isa(method, shape, blocks, rng, restore_threads_and_isa):
    ties = shape == (1 << 20,)
    base, deltas = _inputs(shape, 3, FP32, rng, ties=ties)
    kw = _kwargs(method, shape, blocks, 3, rng, density=[0.3, 0.1, 0.5])
    isas = ["base"] + (["avx2"] if _native.cpu_module.set_isa("avx2") else [])
    results = {}
    for isa in isas:
        assert _native.cpu_module.set_isa(isa)
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[(isa, threads)] = pyops.merge_from_models(base, deltas, backend="cpu", **kw)
    for (isa, threads), val in results.items():
        assert_bitwise_equal(val, results[(isa, 1)], f"{method} isa={isa} threads={threads}")
        if method == "model_stock":
            # Its final pass is pyops.task_arithmetic, whose AVX2 build contracts to FMA: ISAs agree
            # within the tolerance (tests/merging/test_determinism.py); the Gram pass is exact.
            check_close(val, results[(isas[0], 1)], f"model_stock isa={isa}")
        else:
            assert_bitwise_equal(val, results[(isas[0], 1)], f"{method} isa={isa} threads={threads}")


_PHILOX_SCRIPT = """
import sys, torch, pyops
g = torch.Generator().manual_seed(5)
base, ds = torch.randn(100_003, generator=g), [torch.randn(100_003, generator=g) for _ in range(3)]
outs = [pyops.merge(base, ds, method=m, density=0.4, seed=2**64 - 9, name="w", backend="cpu")
        for m in ("dare", "dare_ties", "della")]
torch.save(outs, sys.argv[1])
"""


def test_philox_paths_give_the_same_bits(tmp_path):
    """The AVX2 build draws its Philox words 16 groups per step on AVX-512 machines and 8 per step
    otherwise (PYOPS_MERGE_NO_AVX512=1 forces the latter): DARE, DARE-TIES and DELLA agree bit for bit."""
    outs = saved_outputs_with_and_without("PYOPS_MERGE_NO_AVX512", _PHILOX_SCRIPT, tmp_path)
    for m, x, y in zip(("dare", "dare_ties", "della"), *outs):
        assert_bitwise_equal(x, y, m)


# ------------------------------------------------------------------------------------------------
# model_stock: the Gram pass and gradients
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("from_models", [False, True], ids=FROM_MODELS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
def test_gram_matches_fp64(from_models, dtype, rng):
    base, deltas = _inputs((300_001,), 4, dtype, rng)
    g = MN.gram_op(base, deltas, from_models)
    # tau is formed in fp32, as the kernels (and the reference) define it; its products summed in fp64.
    taus = torch.stack([d.float() - base.float() if from_models else d.float() for d in deltas]).double()
    want = taus @ taus.T
    assert g.dtype == torch.float64 and g.shape == (4, 4)
    assert torch.allclose(g, want, rtol=1e-12, atol=1e-9 * float(want.abs().max()))
    assert torch.equal(g, g.T)


@pytest.mark.parametrize("from_models", [False, True], ids=FROM_MODELS_IDS)
def test_model_stock_gradients(from_models, rng):
    """Gradients reach base and the models through t (the Gram op's backward), as in the reference."""
    base, deltas = _inputs((37, 29), 3, FP32, rng)
    w = torch.randn(37, 29, generator=rng)
    fn = pyops.merge_from_models if from_models else pyops.merge

    def grads(backend, dtype):
        b = base.detach().to(dtype, copy=True).requires_grad_()
        ds = [d.detach().to(dtype, copy=True).requires_grad_() for d in deltas]
        (fn(b, ds, method="model_stock", backend=backend) * w.to(dtype)).sum().backward()
        return [b.grad] + [d.grad for d in ds]

    got = grads("cpu", FP32)
    want = grads("reference", torch.float64)
    for i, (g, e) in enumerate(zip(got, want)):
        assert (g is None) == (e is None), f"grad {i}: {g is None} vs reference {e is None}"
        if e is not None:
            res = compare(g, e.to(FP32), REDUCTION_TOL)
            assert res.ok, f"grad {i}: {res}"


# ------------------------------------------------------------------------------------------------
# Registration and bad input
# ------------------------------------------------------------------------------------------------

def _op_args(rng, dtype=FP32, n=2, shape=(5, 13), out_dtype=FP32, method=1):
    base, deltas = _inputs(shape, n, dtype, rng)
    coeffs = _coeffs(shape, "rows", n, rng, True)
    return (base, deltas, coeffs, [0.3] * n, shape[1], False, method, 0.9, registry.seed_to_i64(2**64 - 1),
            R.name_hash("x"), min(2, n), 0.6, True, 0.05, 0.1)


@pytest.mark.parametrize("method", [1, 2, 3, 4, 5, 6, 7],
                         ids=["ties", "dare", "dare_ties", "breadcrumbs", "della", "della_linear", "consensus"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=fmt_dtype)
def test_opcheck_merge_ops(method, dtype, rng):
    args = _op_args(rng, dtype=dtype, method=method)
    torch.library.opcheck(torch.ops.pyops.merge_native.default, (*args, FP32))
    out = torch.empty(args[0].shape, dtype=dtype)
    torch.library.opcheck(torch.ops.pyops.merge_native_out.default, (*args, out))


@pytest.mark.parametrize("from_models", [False, True], ids=FROM_MODELS_IDS)
def test_opcheck_gram(from_models, rng):
    base, deltas = _inputs((6, 11), 3, FP32, rng)
    base.requires_grad_()
    deltas = [d.requires_grad_() for d in deltas]
    torch.library.opcheck(torch.ops.pyops.task_vector_gram.default, (base, deltas, from_models))


def test_seed_round_trip():
    for seed in (0, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1):
        s = registry.seed_to_i64(seed)
        assert -2**63 <= s < 2**63 and registry.seed_from_i64(s) == seed


def _raw_args(**over):
    """Arguments for _C.merge_forward over small real buffers (kept alive in the dict)."""
    base = torch.randn(8)
    d = torch.randn(8)
    out = torch.empty(8)
    c = torch.ones(1)
    args = dict(out=out.data_ptr(), out_dtype=0, base=base.data_ptr(), deltas=[d.data_ptr()], in_dtype=0,
                coeffs=c.data_ptr(), coeff_stride_n=1, coeff_stride_block=0, density=[0.5], numel=8, block_size=8,
                from_models=False, method=1, lam=1.0, seed=0, name_hash=0, k=1, tall_lambda=0.6, normalize=True,
                gamma=0.01, epsilon=0.1, n_threads=1)
    args.update(over)
    return args, (base, d, out, c)


BAD_NATIVE_ARGUMENTS = [
    (dict(method=-1), "method"),
    (dict(method=10), "method"),
    (dict(method=9, gamma=1.0), "gamma"),
    (dict(block_size=0), "block_size"),
    (dict(numel=-1), "numel"),
    (dict(density=[0.0]), "density"),
    (dict(density=[1.5]), "density"),
    (dict(density=[float("nan")]), "density"),
    (dict(density=[0.5, 0.5]), "density"),
    (dict(method=7, k=0), "k"),
    (dict(method=7, k=2), "k"),
    (dict(method=7, tall_lambda=-1.0), "tall_lambda"),
    (dict(method=4, gamma=1.0), "gamma"),
    (dict(method=4, gamma=-0.1), "gamma"),
    (dict(method=5, epsilon=0.5), "epsilon"),
    (dict(method=6, epsilon=-0.1), "epsilon"),
    (dict(base=0), "null"),
    (dict(out=0), "null"),
    (dict(deltas=[0]), "null"),
    (dict(coeffs=0), "null"),
    (dict(in_dtype=9), "dtype"),
    (dict(out_dtype=-2), "dtype"),
    (dict(name_hash=2**32), "name_hash"),
    (dict(coeff_stride_n=-1), "stride"),
]


@pytest.mark.parametrize("over,match", BAD_NATIVE_ARGUMENTS,
                         ids=[",".join(f"{k}={v}" for k, v in over.items()) for over, _ in BAD_NATIVE_ARGUMENTS])
def test_bad_native_arguments_raise(over, match):
    args, _keep = _raw_args(**over)
    with pytest.raises(ValueError, match=match):
        _native.cpu_module.merge_forward(**args)


def test_bad_gram_arguments_raise():
    base = torch.randn(4)
    with pytest.raises(ValueError, match="null"):
        _native.cpu_module.task_vector_gram(base.data_ptr(), [0], 0, 4, False, 1)
    with pytest.raises(ValueError, match="dtype"):
        _native.cpu_module.task_vector_gram(base.data_ptr(), [base.data_ptr()], 7, 4, False, 1)


def test_run_rejects_a_method_without_a_kernel(rng):
    base, deltas = _inputs((4,), 2, FP32, rng)
    p = TM.prepare(base, deltas, [1.0, 1.0], None, None)
    with pytest.raises(ValueError, match="frankenmerge"):
        MN.run(p, "frankenmerge", [0.5, 0.5], from_models=False, seed=0, lam=1.0, name="", k=2, tall_lambda=0.6,
               normalize=None, gamma=0.01, epsilon=0.1, out=None)


@pytest.mark.parametrize("method", RANKED)
def test_ranked_methods_run_on_the_cpu_backend_by_default(method, rng):
    base, deltas = _inputs((9, 40), 2, FP32, rng)
    pyops.merge(base, deltas, method=method, density=0.5)
    assert pyops.last_choice("merge").backend == "cpu"
