"""`pyops.merge(..., backend="cuda")`: the hand-written CUDA kernels for every method but model_stock
(csrc/merging/, glue in pyops/merging/backend_cuda.py).

On a GPU: the C++ CPU kernels' bits on every method, dtype and block layout (both TIES selection
paths: one CTA per block, and a histogram spread over the device), the gradients (masks held
fixed), the auto order, opcheck and torch.compile. Without one, only the backend's refusals run
here; the kernels' logic is tested on host threads by test_methods_cuda_emulated.py.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops import _backend, _native
from pyops.merging import merge as M
from pyops.merging import backend_cuda as MC
from pyops.merging import task_arithmetic as TM
from pyops.merging import reference as R
from _support import CUDA, assert_bitwise_equal
from .cases import BF16, FP16, FP32, shape_id

HAVE = CUDA and _native.cuda_module is not None and hasattr(_native.cuda_module, "merge_forward")
gpu = pytest.mark.skipif(not HAVE, reason="needs a CUDA device and pyops._C_cuda with the merge kernels")


def _inputs(shape, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base.to(dtype), [(torch.randn(shape, generator=g) * 0.1).to(dtype) for _ in range(n)]


def test_cuda_backend_refuses_cpu_tensors():
    base, deltas = _inputs((4, 5), 2, FP32, 0)
    p = TM.prepare(base, deltas, [1.0, 1.0], None, None)
    reason = M._can_run(p, "ties", False)["cuda"]()
    assert reason is not None and ("cuda" in reason.lower() or "CUDA" in reason)
    with pytest.raises(_backend.BackendUnavailableError, match="backend 'cuda' cannot run this call"):
        pyops.merge(base, deltas, method="ties", density=0.5, backend="cuda")


@gpu
def test_cuda_backend_names_the_methods_it_implements():
    base, deltas = _inputs((4, 5), 2, FP32, 0)
    p = TM.prepare(base.cuda(), [d.cuda() for d in deltas], [1.0, 1.0], None, None)
    assert "della_linear, consensus" in M._can_run(p, "model_stock", False)["cuda"]()


@gpu
def test_cuda_backend_leaves_consensus_gradients_to_the_reference():
    base, deltas = _inputs((4, 5), 2, FP32, 0)
    p = TM.prepare(base.cuda(), [d.cuda() for d in deltas], [1.0, 1.0], None, None)
    assert "reference" in M._can_run(p, "consensus", True)["cuda"]()
    assert M._can_run(p, "ties", True)["cuda"]() is None


@gpu
@pytest.mark.parametrize("shape,blocks", [((3, 1667), None), ((300, 65), "rows"), ((1000, 33), 7)],
                         ids=["whole", "rows", "chunk7"])
@pytest.mark.parametrize("method", ["ties", "dare", "dare_ties", "breadcrumbs", "della"])
def test_cuda_gradients_match_cpu_kernels(method, shape, blocks):
    base, ft = _inputs(shape, 3, FP32, seed=5)
    n_blocks = TM.resolve_blocks(blocks, shape)[1]
    coeffs = torch.linspace(0.2, 1.4, 3 * n_blocks).view(3, n_blocks)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    kw = dict(method=method, blocks=blocks, density=0.4, seed=3, name="w")

    def grads(device, backend):
        b = base.to(device).requires_grad_()
        f = [x.to(device).requires_grad_() for x in ft]
        c = coeffs.to(device).requires_grad_()
        out = pyops.merge_from_models(b, f, coeffs=c, backend=backend, **kw)
        return [t.cpu() for t in torch.autograd.grad(out, [b, *f, c], g.to(device))]

    got, want = grads("cuda", "cuda"), grads("cpu", "cpu")
    for a, b in zip(got[:-1], want[:-1]):
        assert_bitwise_equal(a, b)
    # grad_coeffs: the same fp32 products summed in another fixed order (the C++ kernels add them
    # in fp32 lanes, the CUDA ones in double): equal to fp32 rounding of the block sums, which
    # grows with the block length; the blocks here stay a few thousand elements long.
    scale = max(float(want[-1].abs().max()), 1.0)
    torch.testing.assert_close(got[-1], want[-1], rtol=2e-5, atol=2e-6 * scale)


LAYOUTS = [((37,), None), ((3, 70001), None), ((300, 65), "rows"), ((1000, 33), 7), ((50021,), 3)]


@gpu
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,blocks", LAYOUTS, ids=[f"{shape_id(s)}-blocks{b}" for s, b in LAYOUTS])
@pytest.mark.parametrize("method", ["ties", "dare", "dare_linear", "dare_ties", "breadcrumbs", "della", "della_linear",
                                    "consensus"])
def test_cuda_matches_cpu_kernels_bitwise(method, shape, blocks, dtype):
    base, deltas = _inputs(shape, 3, dtype, seed=len(shape) * 7 + shape[-1])
    kw = dict(method=method, blocks=blocks, density=[0.3, 0.6, 1.0], coeffs=[0.8, -0.3, 1.2], lam=0.9, seed=11,
              name="w", k=2)
    want = pyops.merge(base, deltas, backend="cpu", **kw)
    got = pyops.merge(base.cuda(), [d.cuda() for d in deltas], backend="cuda", **kw)
    assert_bitwise_equal(got.cpu(), want)


@gpu
@pytest.mark.parametrize("n", [1, 9], ids=lambda n: f"N{n}")
def test_cuda_from_models_and_many_tasks(n):
    base, ft = _inputs((257, 129), n, BF16, seed=n)
    kw = dict(method="ties", blocks="rows", density=0.25, coeffs=torch.linspace(0.1, 1.0, n))
    want = pyops.merge_from_models(base, ft, backend="cpu", **kw)
    got = pyops.merge_from_models(base.cuda(), [f.cuda() for f in ft], backend="cuda",
                                  **{**kw, "coeffs": kw["coeffs"].cuda()})
    assert_bitwise_equal(got.cpu(), want)


@gpu
def test_auto_picks_cuda_for_ties():
    base, deltas = _inputs((64, 33), 2, FP32, 1)
    pyops.merge(base.cuda(), [d.cuda() for d in deltas], method="ties", density=0.5)
    assert _backend.last_choice("merge").backend == "cuda"


@gpu
def test_cuda_out_variant_writes_in_place():
    base, deltas = _inputs((128, 40), 2, FP32, 2)
    base, deltas = base.cuda(), [d.cuda() for d in deltas]
    out = torch.empty_like(base)
    res = pyops.merge(base, deltas, method="dare_ties", density=0.4, out=out, backend="cuda")
    assert res.data_ptr() == out.data_ptr()
    assert_bitwise_equal(out, pyops.merge(base, deltas, method="dare_ties", density=0.4, backend="cuda"))


@gpu
@pytest.mark.parametrize("method", [1, 2, 3, 4, 5, 6, 7],
                         ids=["ties", "dare", "dare_ties", "breadcrumbs", "della", "della_linear", "consensus"])
def test_opcheck_merge_cuda_ops(method):
    base, deltas = _inputs((6, 13), 3, FP32, 3)
    base, deltas = base.cuda(), [d.cuda() for d in deltas]
    coeffs = torch.rand(3, 6, device="cuda") + 0.25
    args = (base, deltas, coeffs, [0.3] * 3, 13, False, method, 0.9, -3, R.name_hash("x"), 2, 0.6, True, 0.01, 0.1)
    torch.library.opcheck(MC.merge_op, args + (FP32,))
    if method != 7:  # consensus has no backward with the masks held fixed
        torch.library.opcheck(MC.merge_backward_op, (torch.randn_like(base),) + args + (True, True, True))
    torch.library.opcheck(MC.merge_out_op, args + (torch.empty_like(base),))


@gpu
def test_cuda_merge_compiles_fullgraph():
    base, deltas = _inputs((32, 17), 2, FP32, 4)
    base, deltas = base.cuda(), [d.cuda() for d in deltas]

    def f(b, d0, d1):
        return pyops.merge(b, [d0, d1], method="ties", density=0.4, blocks="rows", backend="cuda") * 2

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(base, *deltas)
    assert_bitwise_equal(got, f(base, *deltas))
