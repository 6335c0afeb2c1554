"""The CUDA merge kernels (csrc/merging/methods_kernels.cuh) run on host threads give the C++ CPU
kernels' bits.

No GPU is needed: tests/merging/cuda_emulation/merge_driver.cpp compiles the kernels' source with
PYOPS_SIMT_EMULATE (csrc/common/simt.h), where every CTA runs as real threads meeting at barriers
and shared arrays are shared. The kernels' indexing, grid-stride loops, barriers, shared-memory
and workspace protocol, integer atomics and fp32 arithmetic all run; speed and the hardware's
memory system do not. The arguments come from `pyops.merging.backend_cuda.kernel_args`, the function
the CUDA op itself uses.

Two builds: "small" (32 threads per CTA, 1024-element selection items, one CTA per block from 8
blocks on, 256-element backward items) reaches every path with small tensors; "real" uses the
GPU build's sizes (256 threads, 16384-element items, one CTA per block from 256 blocks on,
4096-element backward items).

The backward's grad_base and grad_deltas are compared bit for bit with the C++ backward;
grad_coeffs, reduced in another fixed order, to fp32 rounding.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import pyops
from pyops.merging import backend_cuda as merge_cuda
from pyops.merging import registry
from pyops.merging import task_arithmetic as TM
from pyops.merging.spec import resolve_normalize
from pyops.merging import reference as ref
from _support import assert_bitwise_equal
from .cases import shape_id

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "cuda_emulation" / "merge_driver.cpp"
BUILDS = {
    "small": ["-DPYOPS_MERGE_CTA_THREADS=32", "-DPYOPS_MERGE_ITEM=1024", "-DPYOPS_MERGE_CTA_BLOCKS=8",
              "-DPYOPS_MERGE_RED_ITEM=256"],
    "real": [],
}


class Emu:
    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        i64, i32, u32, u64, f32, vp = (ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64,
                                       ctypes.c_float, ctypes.c_void_p)
        lib.emu_merge_workspace_bytes.argtypes = [i64, i64, i64, i32, i32]
        lib.emu_merge_workspace_bytes.restype = i64
        lib.emu_merge_threads.restype = i32
        f64 = ctypes.c_double
        lib.emu_merge_forward.argtypes = [vp, i32, vp, vp, i64, i32, vp, i64, i64, vp, i64, i64, i32, i32, f32, u64,
                                          u32, i64, f32, f64, f64, vp, i32, vp, i64, i32, ctypes.c_char_p, i32]
        lib.emu_merge_forward.restype = i32
        lib.emu_merge_backward.argtypes = [vp, i32, vp, vp, i64, i32, vp, i64, i64, vp, i64, i64, i32, i32, f32, u64,
                                           u32, f64, f64, vp, i32, vp, vp, vp, vp, i64, i32, ctypes.c_char_p, i32]
        lib.emu_merge_backward.restype = i32
        self.lib = lib

    def forward(self, args: dict, max_grid: int = 3, workspace_bytes=None) -> None:
        need = self.lib.emu_merge_workspace_bytes(args["numel"], args["block_size"], args["n"], args["method"], 0)
        nbytes = need if workspace_bytes is None else workspace_bytes
        ws = torch.full((max(nbytes, 1),), 0xAB, dtype=torch.uint8)  # garbage: the kernels must not rely on zeros
        err = ctypes.create_string_buffer(512)
        a = args
        rc = self.lib.emu_merge_forward(
            a["out"], a["out_dtype"], a["base"], a["delta_ptrs"], a["n"], a["in_dtype"], a["coeffs"],
            a["coeff_stride_n"], a["coeff_stride_block"], a["density"], a["numel"], a["block_size"],
            int(a["from_models"]), a["method"], a["lam"], a["seed"], a["name_hash"], a["k"], a["tall_lambda"],
            a["gamma"], a["epsilon"], a["ranks"], int(a["normalize"]), ws.data_ptr(), nbytes, max_grid, err,
            len(err))
        if rc != 0:
            raise ValueError(err.value.decode())

    def backward(self, args: dict, max_grid: int = 3) -> None:
        a = args
        nbytes = self.lib.emu_merge_workspace_bytes(a["numel"], a["block_size"], a["n"], a["method"],
                                                    int(a["grad_coeffs"] != 0))
        ws = torch.full((max(nbytes, 1),), 0xAB, dtype=torch.uint8)
        err = ctypes.create_string_buffer(512)
        rc = self.lib.emu_merge_backward(
            a["grad"], a["grad_dtype"], a["base"], a["delta_ptrs"], a["n"], a["in_dtype"], a["coeffs"],
            a["coeff_stride_n"], a["coeff_stride_block"], a["density"], a["numel"], a["block_size"],
            int(a["from_models"]), a["method"], a["lam"], a["seed"], a["name_hash"], a["gamma"], a["epsilon"],
            a["ranks"], int(a["normalize"]), a["grad_base"], a["grad_delta_ptrs"], a["grad_coeffs"], ws.data_ptr(),
            nbytes, max_grid, err, len(err))
        if rc != 0:
            raise ValueError(err.value.decode())


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH to build the emulated CUDA kernels")
    out = {}
    d = tmp_path_factory.mktemp("cuda-emu")
    for name, defs in BUILDS.items():
        so = d / f"merge_emu_{name}.so"
        cmd = [cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fvisibility=hidden", "-pthread",
               f"-I{REPO / 'csrc'}", *defs, str(DRIVER), "-o", str(so)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"building the emulated kernels failed:\n{proc.stderr}"
        out[name] = Emu(so)
    return out


def _data(shape, n, dtype, seed, dup=False):
    g = torch.Generator().manual_seed(seed)
    if dup:  # few distinct magnitudes: thresholds fall inside runs of equal keys
        base = torch.randint(-3, 4, shape, generator=g).to(torch.float32) / 4
        deltas = [torch.randint(-4, 5, shape, generator=g).to(torch.float32) / 8 for _ in range(n)]
    else:
        base = torch.randn(shape, generator=g)
        deltas = [torch.randn(shape, generator=g) * 0.1 for _ in range(n)]
    return base.to(dtype), [d.to(dtype) for d in deltas]


def _emulated(emu: Emu, base, deltas, *, method, coeffs=None, blocks=None, density=1.0, seed=0, lam=1.0, name="",
              k=2, tall_lambda=0.6, normalize=None, from_models=False, out_dtype=None, gamma=0.01, epsilon=0.1,
              max_grid=3):
    n = len(deltas)
    if coeffs is None:
        coeffs = [1.0] * n
    p = TM.prepare(base, deltas, coeffs, blocks, out_dtype or base.dtype,
                   deltas_name="finetuned" if from_models else "deltas")
    dens = list(density) if isinstance(density, (list, tuple)) else [float(density)] * n
    out = torch.full(base.shape, float("nan"), dtype=p.out_dtype)
    args, keep = merge_cuda.kernel_args(out, p.base, p.deltas, p.coeffs, dens, p.block_size, from_models,
                                        merge_cuda.METHOD_CODES[method], lam, seed, ref.name_hash(name), k,
                                        tall_lambda, resolve_normalize(method, normalize), gamma, epsilon)
    emu.forward(args, max_grid=max_grid)
    del keep
    return out


def _cpu(base, deltas, *, from_models=False, **kw):
    fn = pyops.merge_from_models if from_models else pyops.merge
    return fn(base, deltas, backend="cpu", **kw)


# (shape, blocks): whole tensors split into several work items, one-CTA-per-block layouts, chunks
# that cross the 4-element groups, 1-element blocks, a short last block.
LAYOUTS = [
    ((37,), None),
    ((5003,), None),
    ((5003,), 2500),
    ((61, 7), "rows"),
    ((10, 517), "rows"),
    ((203,), 5),
    ((101,), 3),
    ((29,), 1),
]
LAYOUT_IDS = [f"{shape_id(s)}-blocks{b}" for s, b in LAYOUTS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,blocks", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("method", ["ties", "dare", "dare_linear", "dare_ties", "breadcrumbs", "della",
                                    "della_linear", "consensus"])
def test_emulated_matches_cpu_kernels(emu, method, shape, blocks, dtype):
    base, deltas = _data(shape, 3, dtype, seed=hash((method, shape, blocks)) % 1000)
    kw = dict(method=method, blocks=blocks, density=[0.3, 0.55, 1.0], seed=7, name="layer.w", lam=0.9,
              coeffs=[0.7, -0.4, 1.1], k=2)
    assert_bitwise_equal(_emulated(emu["small"], base, deltas, **kw), _cpu(base, deltas, **kw))


@pytest.mark.parametrize("n", [1, 9, 11], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "consensus"])
def test_emulated_task_counts_beyond_registers(emu, method, n):
    base, deltas = _data((611,), n, torch.float32, seed=n)
    n_blocks = -(-611 // 63)  # blocks of 63: boundaries fall inside the kernels' 4-element groups
    coeffs = torch.linspace(1.0, -0.5, n * n_blocks).view(n, n_blocks)
    kw = dict(method=method, blocks=63, density=[0.2 + 0.06 * i for i in range(n)], seed=3, name="t",
              coeffs=coeffs, k=max(1, n // 2))
    assert_bitwise_equal(_emulated(emu["small"], base, deltas, **kw), _cpu(base, deltas, **kw))


@pytest.mark.parametrize("shape,blocks", [((4099,), None), ((40, 33), "rows")], ids=["whole", "rows"])
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_emulated_from_models_and_per_block_coeffs(emu, method, shape, blocks):
    base, ft = _data(shape, 3, torch.bfloat16, seed=11)
    n_blocks = 1 if blocks is None else shape[0]
    coeffs = torch.linspace(-0.5, 1.5, 3 * n_blocks).view(3, n_blocks)
    kw = dict(method=method, blocks=blocks, density=0.4, seed=2**63 + 5, name="m", coeffs=coeffs, from_models=True)
    assert_bitwise_equal(_emulated(emu["small"], base, ft, **kw), _cpu(base, ft, **kw))


@pytest.mark.parametrize("blocks", [None, "rows", 6], ids=["whole", "rows", "chunk6"])
@pytest.mark.parametrize("density", [0.001, 0.5, 0.999], ids=["k1", "half", "almost-all"])
def test_emulated_ties_thresholds_inside_runs_of_equal_values(emu, blocks, density):
    base, deltas = _data((24, 50), 3, torch.float32, seed=5, dup=True)
    kw = dict(method="ties", blocks=blocks, density=density)
    assert_bitwise_equal(_emulated(emu["small"], base, deltas, **kw), _cpu(base, deltas, **kw))


def test_emulated_ties_with_infinities_and_zeros(emu):
    base, deltas = _data((2000,), 3, torch.float32, seed=9)
    deltas[0][::7] = float("inf")
    deltas[1][::5] = -float("inf")
    deltas[2][:1000] = 0.0
    kw = dict(method="ties", density=0.2)
    assert_bitwise_equal(_emulated(emu["small"], base, deltas, **kw), _cpu(base, deltas, **kw))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d).split(".")[-1])
def test_emulated_output_dtype_conversion(emu, out_dtype):
    base, deltas = _data((777,), 2, torch.float32, seed=4)
    kw = dict(method="dare_ties", density=0.5, seed=1, out_dtype=out_dtype, normalize=False)
    assert_bitwise_equal(_emulated(emu["small"], base, deltas, **kw), _cpu(base, deltas, **kw))


@pytest.mark.parametrize("max_grid", [1, 2, 7], ids=lambda g: f"grid{g}")
def test_emulated_result_does_not_depend_on_the_grid(emu, max_grid):
    base, deltas = _data((3001,), 3, torch.float32, seed=8)
    kw = dict(method="ties", blocks=1000, density=0.35)
    assert_bitwise_equal(_emulated(emu["small"], base, deltas, max_grid=max_grid, **kw), _cpu(base, deltas, **kw))


def test_emulated_matches_reference_within_tolerance(emu):
    base, deltas = _data((50, 41), 3, torch.float32, seed=12)
    kw = dict(method="ties", blocks="rows", density=0.3)
    got = _emulated(emu["small"], base, deltas, **kw)
    want = pyops.merge(base, deltas, backend="reference", **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method,shape,blocks", [("ties", (40000,), None), ("dare_ties", (8, 300), "rows"),
                                                 ("consensus", (20000,), None)],
                         ids=["ties-whole-3-items", "dare_ties-rows", "consensus"])
def test_emulated_real_sizes(emu, method, shape, blocks):
    assert emu["real"].lib.emu_merge_threads() == 256
    base, deltas = _data(shape, 3, torch.float32, seed=21)
    kw = dict(method=method, blocks=blocks, density=0.3, seed=5, name="w")
    assert_bitwise_equal(_emulated(emu["real"], base, deltas, max_grid=2, **kw), _cpu(base, deltas, **kw))


def test_emulated_empty_tensor_writes_nothing(emu):
    base, deltas = _data((0,), 2, torch.float32, seed=0)
    out = _emulated(emu["small"], base, deltas, method="ties", density=0.5)
    assert out.shape == (0,)


def _raw_forward_args(numel: int, method_code: int, normalize: bool):
    """Forward kernel arguments for 2 fp32 task vectors of `numel` elements, one block, density 0.5,
    with a raw method code (the kernels' own checks, not the op layer's); (args, tensors to keep)."""
    base, deltas = _data((numel,), 2, torch.float32, seed=0)
    p = TM.prepare(base, deltas, [1.0, 1.0], None, torch.float32, deltas_name="deltas")
    return merge_cuda.kernel_args(torch.empty_like(base), p.base, p.deltas, p.coeffs, [0.5, 0.5], p.block_size, False,
                                  method_code, 1.0, 0, 0, 2, 0.6, normalize, 0.01, 0.1)


def test_emulated_rejects_a_method_it_does_not_implement(emu):
    args, keep = _raw_forward_args(16, 0, False)
    with pytest.raises(ValueError, match="method: the CUDA merge kernels implement"):
        emu["small"].forward(args)


def test_emulated_rejects_a_short_workspace(emu):
    args, keep = _raw_forward_args(5000, 1, True)
    with pytest.raises(ValueError, match="workspace: expected at least"):
        emu["small"].forward(args, workspace_bytes=16)


def test_emulated_ranked_methods_require_ranks(emu):
    args, keep = _raw_forward_args(64, 4, False)
    with pytest.raises(ValueError, match="ranks: breadcrumbs and della need"):
        emu["small"].forward({**args, "ranks": 0})


# --------------------------------------------------------------------------------------------
# Backward (masks held fixed)
# --------------------------------------------------------------------------------------------

def _backward_pair(emu: Emu, base, deltas, grad, *, method, coeffs, blocks, density, from_models, seed=9, name="g",
                   lam=0.8, normalize=None, gamma=0.01, epsilon=0.1, need=(True, True, True), max_grid=3):
    """(emulated CUDA grads, C++ grads): each (grad_base, [grad_deltas], grad_coeffs)."""
    from pyops.merging import backend_cpu as merge_native
    n = len(deltas)
    p = TM.prepare(base, deltas, coeffs, blocks, base.dtype, deltas_name="finetuned" if from_models else "deltas")
    code = merge_cuda.METHOD_CODES[method]
    norm = resolve_normalize(method, normalize)
    dens = list(density) if isinstance(density, (list, tuple)) else [float(density)] * n
    seed_i64 = seed - (1 << 64) if seed >= 1 << 63 else seed
    want = merge_native.merge_backward_op(grad, p.base, p.deltas, p.coeffs, dens, p.block_size, from_models, code,
                                          lam, seed_i64, ref.name_hash(name), 2, 0.6, norm, gamma, epsilon, *need)
    gb, gd, gc = registry.empty_grads(p.base, p.deltas, p.coeffs, *need)
    gc32 = torch.empty(registry.coeff_grad_shape(n, base.numel(), p.block_size)) if need[2] else None
    args, keep = merge_cuda.backward_args(grad, p.base, p.deltas, p.coeffs, dens, p.block_size, from_models, code,
                                          lam, seed, ref.name_hash(name), norm, gamma, epsilon,
                                          gb if need[0] else None, gd if need[1] else None, gc32)
    emu.backward(args, max_grid=max_grid)
    if gc32 is not None:
        registry.finish_coeff_grad(gc32, p.coeffs, gc)
    return (gb, gd, gc), want


def _check_backward(got, want, need=(True, True, True)):
    (gb, gd, gc), (wb, wd, wc) = got, want
    if need[0]:
        assert_bitwise_equal(gb, wb, "grad_base")
    if need[1]:
        for i, (a, b) in enumerate(zip(gd, wd)):
            assert_bitwise_equal(a, b, f"grad_deltas[{i}]")
    if need[2]:
        scale = float(wc.abs().max()) if wc.numel() else 1.0
        torch.testing.assert_close(gc, wc, rtol=2e-5, atol=2e-6 * max(scale, 1.0))


BWD_LAYOUTS = [((37,), None), ((5003,), None), ((5003,), 2500), ((61, 7), "rows"), ((10, 517), "rows"),
               ((203,), 5), ((29,), 1)]


@pytest.mark.parametrize("from_models", [False, True], ids=["deltas", "from_models"])
@pytest.mark.parametrize("shape,blocks", BWD_LAYOUTS, ids=[f"{shape_id(s)}-blocks{b}" for s, b in BWD_LAYOUTS])
@pytest.mark.parametrize("method", ["ties", "dare", "dare_ties", "breadcrumbs", "della", "della_linear"])
def test_emulated_backward_matches_cpu_kernels(emu, method, shape, blocks, from_models):
    base, deltas = _data(shape, 3, torch.float32, seed=len(shape) + shape[0])
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    n_blocks = 1 if blocks is None else TM.resolve_blocks(blocks, shape)[1]
    coeffs = torch.linspace(0.3, 1.2, 3 * n_blocks).view(3, n_blocks)
    got, want = _backward_pair(emu["small"], base, deltas, grad, method=method, coeffs=coeffs, blocks=blocks,
                               density=[0.3, 0.55, 1.0], from_models=from_models)
    _check_backward(got, want)


@pytest.mark.parametrize("n", [1, 10], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_emulated_backward_half_precision_and_many_tasks(emu, dtype, n):
    base, deltas = _data((611,), n, dtype, seed=n)
    grad = torch.randn(611, generator=torch.Generator().manual_seed(2)).to(dtype)
    got, want = _backward_pair(emu["small"], base, deltas, grad, method="dare_ties", coeffs=[0.5 + 0.1 * i for i in range(n)],
                               blocks=63, density=0.4, from_models=True)
    _check_backward(got, want)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["base", "deltas", "coeffs"])
def test_emulated_backward_computes_only_what_is_needed(emu, need):
    base, deltas = _data((700,), 2, torch.float32, seed=3)
    grad = torch.randn(700, generator=torch.Generator().manual_seed(3))
    got, want = _backward_pair(emu["small"], base, deltas, grad, method="ties", coeffs=[0.6, 0.9], blocks=300,
                               density=0.3, from_models=True, need=need)
    _check_backward(got, want, need)


@pytest.mark.parametrize("max_grid", [1, 5], ids=lambda g: f"grid{g}")
def test_emulated_backward_coeff_grads_do_not_depend_on_the_grid(emu, max_grid):
    base, deltas = _data((3001,), 3, torch.float32, seed=4)
    grad = torch.randn(3001, generator=torch.Generator().manual_seed(4))
    kw = dict(method="ties", coeffs=torch.ones(3, 4), blocks=1000, density=0.35, from_models=False)
    (_, _, gc), _ = _backward_pair(emu["small"], base, deltas, grad, max_grid=max_grid, **kw)
    (_, _, gc1), _ = _backward_pair(emu["small"], base, deltas, grad, max_grid=2, **kw)
    assert_bitwise_equal(gc, gc1, "grad_coeffs")


def test_emulated_backward_real_sizes(emu):
    base, deltas = _data((9000,), 3, torch.float32, seed=5)
    grad = torch.randn(9000, generator=torch.Generator().manual_seed(5))
    got, want = _backward_pair(emu["real"], base, deltas, grad, method="ties", coeffs=torch.rand(3, 1) + 0.5,
                               blocks=None, density=0.3, from_models=True, max_grid=2)
    _check_backward(got, want)


def test_emulated_backward_refuses_consensus(emu):
    base, deltas = _data((64,), 2, torch.float32, seed=0)
    grad = torch.ones(64)
    p = TM.prepare(base, deltas, [1.0, 1.0], None, torch.float32, deltas_name="deltas")
    gb = torch.empty_like(base)
    args, keep = merge_cuda.backward_args(grad, p.base, p.deltas, p.coeffs, [0.5, 0.5], p.block_size, False, 7, 1.0,
                                          0, 0, False, 0.01, 0.1, gb, None, None)
    with pytest.raises(ValueError, match="consensus has no backward"):
        emu["small"].backward(args)


@pytest.mark.parametrize("build", ["small", "real"])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_emulated_counts_follow_mergekits_fp64_rule(emu, method, build):
    # mergekit 0.1.5 (mergekit/sparsify.py) keeps int(density * n) in fp64: 0.9 · 20480 = 18432,
    # where fp32(0.9) · 20480 would floor to 18431 (tests/merging/test_density_count.py).
    n = 20480
    g = torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    tau = (torch.randperm(n, generator=g).to(torch.float32) + 1) * signs  # distinct magnitudes 1 … n
    kw = dict(method=method, density=0.9, gamma=0.01)
    out = _emulated(emu[build], torch.zeros(n), [tau], **kw)
    assert int((out != 0).sum()) == int(0.9 * n) == 18432
    assert_bitwise_equal(out, _cpu(torch.zeros(n), [tau], **kw))
