"""The Triton path of mergekit 0.1.5's interpolating methods (pyops.kernels.merging.interpolate,
`backend="triton"` of pyops.merging.interpolate) against the reference: linear, slerp, nearswap,
passthrough, nuslerp in its three layouts, multislerp, karcher; odd shapes, fp32 / bf16 / fp16,
non-finite values, more inputs than one launch takes, a Gram matrix summed in several pieces.

The per-element passes (linear, nearswap, passthrough) do the C++ kernels' fp32 operations in the
same order: the same bits as the C++ path wherever both round to the output dtype alike (fp32,
fp16; bf16 on a GPU — the interpreter's bf16 conversion is its own). On CPU the kernels run under
TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run on CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

from _support import CUDA, assert_close_dtype, fmt_dtype, require_backend
from pyops._backend import BackendUnavailableError
from pyops.merging import backend_triton
from pyops.merging import interpolate as I
from .cases import BF16, DTYPES, FP16, FP32
from .test_interpolate import NATIVE_CASES, OPCHECK_UTILS, SHAPES, call, case_id, op_cases, rand

DEV = torch.device("cuda" if CUDA else "cpu")
TRITON_REASON = backend_triton.interpolate_reason(torch.zeros(1, device=DEV), FP32, False)

pytestmark = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend unavailable: {TRITON_REASON}")


def inputs(shape, dtype, rng, n, with_base):
    xs = [x.to(DEV) for x in rand(shape, dtype, rng, n)]
    base = rand(shape, dtype, rng)[0].to(DEV) if with_base else None
    if xs[0].numel() == 1 and base is None:
        # one-element vectors are ±1 unit vectors: of mixed signs they are exactly antipodal, where
        # the spherical means are undefined (θ = π) and the fp32 reference and the kernels' double
        # angles part arbitrarily (test_interpolate.py's cases draw other values)
        xs = [x.abs() for x in xs]
    return xs, base


def cpu(t):
    return None if t is None else t.cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=fmt_dtype)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_triton_matches_reference(case, shape, dtype, rng):
    method, n, with_base = case
    xs, base = inputs(shape, dtype, rng, n, with_base)
    got = call(method, xs, base, "triton")
    assert got.dtype == dtype and got.shape == xs[0].shape and got.device == xs[0].device
    assert_close_dtype(got.cpu(), call(method, [x.cpu() for x in xs], cpu(base), "reference"), f"{method} {dtype}")


@pytest.mark.parametrize("out_dtype", [FP32, BF16, FP16], ids=fmt_dtype)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_triton_rounds_once_to_out_dtype(case, out_dtype, rng):
    method, n, with_base = case
    xs, base = inputs((6, 70), BF16, rng, n, with_base)
    got = call(method, xs, base, "triton", out_dtype=out_dtype)
    assert got.dtype == out_dtype
    assert_close_dtype(got.cpu(), call(method, [x.cpu() for x in xs], cpu(base), "reference", out_dtype=out_dtype))


PER_ELEMENT = [c for c in NATIVE_CASES if c[0] in ("linear", "nearswap", "passthrough")]


@pytest.mark.parametrize("dtype", [FP32, FP16] + ([BF16] if CUDA else []), ids=fmt_dtype)
@pytest.mark.parametrize("case", PER_ELEMENT, ids=case_id)
def test_per_element_passes_give_the_cpu_kernels_bits(case, dtype, rng):
    require_backend("cpu")
    method, n, with_base = case
    xs, base = inputs((3, 517), dtype, rng, n, with_base)
    got = call(method, xs, base, "triton").cpu()
    assert torch.equal(got, call(method, [x.cpu() for x in xs], cpu(base), "cpu"))


@pytest.mark.parametrize("method,n", [("linear", 11), ("multislerp", 10), ("karcher", 9), ("linear", 16)],
                         ids=lambda v: str(v))
def test_more_inputs_than_one_launch_takes(method, n, rng):
    # the combine pass takes 8 inputs per launch; the rest accumulate in fp32, in order
    xs, _ = inputs((5, 131), FP32, rng, n, False)
    got = call(method, xs, None, "triton")
    assert_close_dtype(got.cpu(), call(method, [x.cpu() for x in xs], None, "reference"), method)


@pytest.mark.parametrize("case", [c for c in NATIVE_CASES if c[0] not in ("linear", "nearswap", "passthrough")],
                         ids=case_id)
def test_gram_summed_in_several_pieces(case, rng, monkeypatch):
    monkeypatch.setattr(backend_triton, "GRAM_CHUNK", 64)
    method, n, with_base = case
    shape = (301, 3) if method == "nuslerp_row_wise" else (3, 301)
    xs, base = inputs(shape, FP32, rng, n, with_base)
    got = call(method, xs, base, "triton")
    assert_close_dtype(got.cpu(), call(method, [x.cpu() for x in xs], cpu(base), "reference"), method)


@pytest.mark.parametrize("special", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_non_finite_inputs_match_reference(case, special, rng):
    method, n, with_base = case
    xs, base = inputs((4, 9), FP32, rng, n, with_base)
    xs[0][1, 2] = float(special)
    got = call(method, xs, base, "triton")
    assert_close_dtype(got.cpu(), call(method, [x.cpu() for x in xs], cpu(base), "reference"), f"{method} {special}")


def test_nearswap_nan_distance_propagates(rng):
    a = torch.tensor([0.0, 1.0, float("nan"), 2.0], device=DEV)
    b = torch.tensor([0.5, float("nan"), 1.0, 2.0], device=DEV)
    got = I.nearswap(a, b, 0.3, backend="triton").cpu()
    want = I.nearswap(a.cpu(), b.cpu(), 0.3, backend="reference")
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(got[~torch.isnan(got)],
                                                                            want[~torch.isnan(want)])


def test_passthrough_without_scale_is_a_copy(rng):
    (x,), _ = inputs((7, 3), BF16, rng, 1, False)
    got = I.passthrough(x, backend="triton")
    assert torch.equal(got, x) and got.data_ptr() != x.data_ptr()


def test_linear_zero_weight_sum_matches_reference(rng):
    xs, _ = inputs((5, 3), FP32, rng, 2, False)
    assert_close_dtype(I.linear(xs, [2.0, -2.0], backend="triton").cpu(),
                       I.linear([x.cpu() for x in xs], [2.0, -2.0], backend="reference"))


def test_multislerp_cancelling_triple_is_an_error(rng):
    (x,), _ = inputs((6,), FP32, rng, 1, False)
    with pytest.raises(ValueError, match="models"):
        I.multislerp([x, -x, x], [0.5, 1.0, 0.5], backend="triton")


def test_explicit_triton_backend_refuses_gradients(rng):
    xs, _ = inputs((4,), FP32, rng, 2, False)
    xs[0].requires_grad_(True)
    with pytest.raises(BackendUnavailableError, match="forward only"):
        I.linear(xs, [0.5, 0.5], backend="triton")


def test_ram_has_no_triton_kernels(rng):
    xs, base = inputs((4,), FP32, rng, 2, True)
    with pytest.raises(BackendUnavailableError, match="not implemented"):
        I.ram(base, xs, backend="triton")


@pytest.mark.skipif(not CUDA, reason="the automatic order prefers Triton for CUDA tensors")
def test_auto_picks_triton_for_cuda_tensors(rng):
    from pyops import _backend
    xs, _ = inputs((4, 5), FP32, rng, 2, False)
    I.linear(xs, [0.5, 0.5])
    assert _backend.last_choice("linear").backend == "triton"


def _to_dev(args):
    return tuple([x.to(DEV) for x in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                 else a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args)


def triton_op_cases(gen):
    cases = {name.replace("_cpu", "_triton"): [_to_dev(args) for args in arg_list]
             for name, arg_list in op_cases(gen).items()}
    a, b = rand((3, 5), FP32, gen, 2)
    cases["scale_triton"] = [_to_dev((a, 0.5, FP32)), _to_dev((b.to(BF16), -2.0, FP16))]
    return cases


TRITON_OPS = ("linear_triton", "slerp_triton", "nearswap_triton", "scale_triton", "nuslerp_triton",
              "multislerp_triton", "karcher_triton")


@pytest.mark.parametrize("name,index,util", [pytest.param(name, i, util, id=f"{name}-{i}-{util}")
                                             for name in TRITON_OPS for i in range(2) for util in OPCHECK_UTILS])
def test_opcheck(name, index, util, rng):
    args = triton_op_cases(rng)[name][index]
    torch.library.opcheck(getattr(torch.ops.pyops, name).default, args, test_utils=util)
