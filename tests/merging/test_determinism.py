"""The C++ CPU kernels are deterministic (docs/design.md#determinism): the split into work items depends on the
sizes alone, so the forward and the coefficient gradient (a long reduction) have the same bits
for every thread count. Across instruction sets (base vs AVX2 with FMA) the bits may differ, but
both stay within the project tolerance of each other.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops import _native
from _support import REDUCTION_TOL, assert_bitwise_equal, assert_close, fmt_dtype, randn, require_backend, tolerance_for

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
N_ELEMS = 300_000  # > 4 work items of 64k elements: whole-tensor blocks are split and recombined

# (shape, blocks, coeffs kind): one large block split over work items, a few large blocks with a
# short last one, and many small blocks grouped into items.
LAYOUTS = [((600, 500), None, "vec"), ((600, 500), 70_000, "block"), ((600, 500), "rows", "block")]
LAYOUT_IDS = ["600x500-whole", "600x500-b70000", "600x500-rows"]


def _n_blocks(blocks):
    return {None: 1, 70_000: -(-N_ELEMS // 70_000), "rows": 600}[blocks]


def run(shape, blocks, kind, dtype, from_models, gen_seed):
    """Forward output and (base, deltas, coeffs) gradients on the cpu backend, from fixed inputs."""
    gen = torch.Generator().manual_seed(gen_seed)
    base = randn(shape, dtype, gen)
    deltas = randn((3, *shape), dtype, gen).requires_grad_()
    coeffs = randn((3,) if kind == "vec" else (3, _n_blocks(blocks)), FP32, gen, scale=0.5).requires_grad_()
    grad_out = randn(shape, dtype, gen)
    fn = pyops.task_arithmetic_from_models if from_models else pyops.task_arithmetic
    base.requires_grad_()
    y = fn(base, deltas, coeffs, blocks=blocks, backend="cpu")
    y.backward(grad_out)
    return {"forward": y.detach(), "grad base": base.grad, "grad deltas": deltas.grad, "grad coeffs": coeffs.grad}


@pytest.fixture
def cpu_backend():
    require_backend("cpu")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def restore_isa():
    yield
    assert _native.cpu_module.set_isa("auto")


@pytest.mark.parametrize("from_models", [False, True], ids=["deltas", "from_models"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=fmt_dtype)
@pytest.mark.parametrize("shape,blocks,kind", LAYOUTS, ids=LAYOUT_IDS)
def test_thread_count_bit_identical(shape, blocks, kind, dtype, from_models, cpu_backend, restore_threads):
    torch.set_num_threads(1)
    one = run(shape, blocks, kind, dtype, from_models, 7)
    torch.set_num_threads(2)
    two = run(shape, blocks, kind, dtype, from_models, 7)
    for name in one:
        assert_bitwise_equal(two[name], one[name], f"{name}, 2 threads vs 1")


@pytest.mark.parametrize("shape,blocks,kind", LAYOUTS[:1], ids=LAYOUT_IDS[:1])
def test_more_threads_than_cores_bit_identical(shape, blocks, kind, cpu_backend, restore_threads):
    torch.set_num_threads(1)
    one = run(shape, blocks, kind, FP32, False, 11)
    torch.set_num_threads(7)
    seven = run(shape, blocks, kind, FP32, False, 11)
    for name in one:
        assert_bitwise_equal(seven[name], one[name], f"{name}, 7 threads vs 1")


def test_repeated_calls_bit_identical(cpu_backend):
    a = run((600, 500), None, "vec", FP32, True, 3)
    b = run((600, 500), None, "vec", FP32, True, 3)
    for name in a:
        assert_bitwise_equal(b[name], a[name], f"{name}, second call")


ISA_CASES = [pytest.param(*lay, dt, fm, "avx2", id=f"{lid}-{fmt_dtype(dt)}-{'from_models' if fm else 'deltas'}-avx2")
             for lay, lid in zip(LAYOUTS, LAYOUT_IDS) for dt in (FP32, BF16) for fm in (False, True)]
ISA_CASES += [pytest.param(*LAYOUTS[0], FP16, False, "avx2", id=f"{LAYOUT_IDS[0]}-fp16-deltas-avx2"),
              pytest.param(*LAYOUTS[1], FP32, True, "auto", id=f"{LAYOUT_IDS[1]}-fp32-from_models-auto")]


@pytest.mark.parametrize("shape,blocks,kind,dtype,from_models,isa", ISA_CASES)
def test_isa_base_vs_vectorised(shape, blocks, kind, dtype, from_models, isa, cpu_backend, restore_isa):
    mod = _native.cpu_module
    if not mod.set_isa("avx2"):
        pytest.skip("the CPU (or this build of pyops._C) has no AVX2+FMA+F16C kernels")
    assert mod.set_isa("base") and mod.active_isa() == "base"
    base_isa = run(shape, blocks, kind, dtype, from_models, 5)
    assert mod.set_isa(isa) and mod.active_isa() == "avx2"
    vec = run(shape, blocks, kind, dtype, from_models, 5)
    for name in base_isa:
        tol = REDUCTION_TOL if name == "grad coeffs" else tolerance_for(vec[name].dtype)
        assert_close(vec[name], base_isa[name], tol, f"{name}, {isa} vs base")


def test_set_isa_rejects_unknown_name(cpu_backend, restore_isa):
    before = _native.cpu_module.active_isa()
    assert _native.cpu_module.set_isa("avx512") is False
    assert _native.cpu_module.active_isa() == before
