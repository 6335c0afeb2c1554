"""Bad input gets a clear error naming the argument and, where it applies, the dimension."""
from __future__ import annotations

import pytest
import torch

import pyops


def qkv(*spatial, H=2, D=8, dtype=torch.float32):
    shape = (1, *spatial, H, D)
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


def test_kernel_size_below_two_names_the_dimension():
    with pytest.raises(ValueError, match=r"kernel_size.*>= 2.*got 1 in dimension 1"):
        pyops.na2d(*qkv(7, 7), (3, 1))


def test_kernel_times_dilation_larger_than_extent():
    with pytest.raises(ValueError, match=r"dimension 0 has kernel_size 3 · dilation 3 = 9 > extent 8"):
        pyops.na2d(*qkv(8, 9), 3, dilation=3)


def test_kernel_larger_than_extent():
    with pytest.raises(ValueError, match=r"dimension 2 .* > extent 4"):
        pyops.na3d(*qkv(5, 5, 4), 5)


def test_stride_larger_than_kernel():
    with pytest.raises(ValueError, match=r"stride 4 > kernel_size 3 in dimension 0"):
        pyops.na1d(*qkv(9), 3, stride=4)


def test_wrong_number_of_per_dimension_values():
    with pytest.raises(ValueError, match=r"dilation: expected .* 2 ints"):
        pyops.na2d(*qkv(9, 9), 3, dilation=(1, 2, 3))


def test_non_int_kernel():
    with pytest.raises(TypeError, match="kernel_size"):
        pyops.na1d(*qkv(9), 3.0)


def test_rpb_with_even_kernel():
    with pytest.raises(ValueError, match=r"rpb: .*odd kernel sizes, got kernel_size 4 in dimension 1"):
        pyops.na2d(*qkv(9, 9), (3, 4), rpb=torch.zeros(2, 5, 7))


def test_rpb_wrong_shape():
    with pytest.raises(ValueError, match=r"rpb: expected shape \[2, 5, 5\]"):
        pyops.na2d(*qkv(9, 9), 3, rpb=torch.zeros(2, 5, 4))


def test_rpb_with_causal():
    with pytest.raises(ValueError, match="rpb: .*causal"):
        pyops.na1d(*qkv(9), 3, is_causal=True, rpb=torch.zeros(2, 5))


def test_wrong_rank_names_the_layout():
    q, k, v = qkv(9, 9)
    with pytest.raises(ValueError, match=r"q: expected a 4-d tensor \[B, S0, H, D\]"):
        pyops.na1d(q, k, v, 3)


def test_k_shape_mismatch():
    q, k, v = qkv(9, 9)
    with pytest.raises(ValueError, match=r"k: expected shape \[1, 9, 9, 2, 8\]"):
        pyops.na2d(q, k[:, :8], v, 3)


def test_v_shape_mismatch():
    q, k, v = qkv(9, 9)
    with pytest.raises(ValueError, match=r"v: expected shape \[1, 9, 9, 2, Dv\]"):
        pyops.na2d(q, k, v[:, :, :, :1], 3)


def test_v_may_have_its_own_head_dim():
    q, k, _ = qkv(9)
    out = pyops.na1d(q, k, torch.randn(1, 9, 2, 5), 3)
    assert out.shape == (1, 9, 2, 5)


def test_dtype_mismatch():
    q, k, v = qkv(9)
    with pytest.raises(TypeError, match=r"k: expected dtype torch.float32"):
        pyops.na1d(q, k.half(), v, 3)


def test_integer_inputs():
    q, k, v = qkv(9)
    with pytest.raises(TypeError, match="q: expected a floating-point tensor"):
        pyops.na1d(q.long(), k, v, 3)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        pyops.na1d(*qkv(9), 3, backend="nope")


def test_unavailable_backend_says_why():
    with pytest.raises(pyops.BackendUnavailableError, match="na1d: backend 'triton' cannot run"):
        pyops.na1d(*qkv(9, dtype=torch.float64), 3, backend="triton")


# ------------------------------------------------------------------------------------------------
# Meta and fake tensors: shapes only
# ------------------------------------------------------------------------------------------------

NA = [pytest.param(pyops.na1d, (9,), id="na1d-S9"), pytest.param(pyops.na2d, (7, 6), id="na2d-S7x6"),
      pytest.param(pyops.na3d, (5, 4, 6), id="na3d-S5x4x6")]


@pytest.mark.parametrize("fn,spatial", NA)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_meta_inputs_give_meta_outputs(fn, spatial, backend):
    q, k, v = (t.to("meta") for t in qkv(*spatial))
    out, lse = fn(q, k, v, 3, return_lse=True, backend=backend)
    assert (tuple(out.shape), out.dtype, out.device.type) == ((1, *spatial, 2, 8), torch.float32, "meta")
    assert lse.device.type == "meta" and tuple(lse.shape) == (1, *spatial, 2)


@pytest.mark.parametrize("fn,spatial", NA)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_meta_inputs_on_a_kernel_backend_get_a_clear_error(fn, spatial, backend):
    q, k, v = (t.to("meta") for t in qkv(*spatial))
    with pytest.raises(pyops.BackendUnavailableError, match=rf"backend '{backend}' cannot run this call: .*meta"):
        fn(q, k, v, 3, backend=backend)


@pytest.mark.parametrize("fn,spatial", NA)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fake_inputs_give_fake_outputs(fn, spatial, backend):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        q, k, v = (mode.from_tensor(t) for t in qkv(*spatial))
        out = fn(q, k, v, 3, backend=backend)
    assert isinstance(out, FakeTensor) and tuple(out.shape) == (1, *spatial, 2, 8)
