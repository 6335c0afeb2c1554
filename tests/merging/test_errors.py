"""Bad input to task_arithmetic / task_arithmetic_from_models: a ValueError or TypeError whose
message names the argument and says what was expected and what was received (docs/design.md#errors).

Validation runs before a backend is chosen, so these tests use the default backend; the last
ones check the backend argument itself.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import BACKENDS, backend_reason, fmt_dtype

FP32, FP16 = torch.float32, torch.float16
FUNCS = [pytest.param(pyops.task_arithmetic, "deltas", id="deltas"),
         pytest.param(pyops.task_arithmetic_from_models, "finetuned", id="from_models")]


def inputs(shape=(4, 6), n=3, dtype=FP32):
    return torch.randn(shape, dtype=dtype), torch.randn((n, *shape), dtype=dtype), torch.randn(n)


# ------------------------------------------------------------------------------------------------
# base / deltas
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("bad_shape", [(3, 4, 7), (3, 6, 4), (3, 24), (4, 6)],
                         ids=lambda s: "x".join(map(str, s)))
def test_stacked_deltas_shape_mismatch(fn, dname, bad_shape):
    base, _, coeffs = inputs()
    with pytest.raises(ValueError, match=rf"^{dname}: expected .*\[N, 4, 6\].*got \[{', '.join(map(str, bad_shape))}\]"):
        fn(base, torch.randn(bad_shape), coeffs)


@pytest.mark.parametrize("fn,dname", FUNCS)
def test_list_deltas_shape_mismatch(fn, dname):
    base, deltas, coeffs = inputs()
    items = [deltas[0], torch.randn(4, 7), deltas[2]]
    with pytest.raises(ValueError, match=rf"^{dname}\[1\]: expected shape \[4, 6\].*got \[4, 7\]"):
        fn(base, items, coeffs)


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
def test_deltas_dtype_mismatch(fn, dname, as_list):
    base, deltas, coeffs = inputs()
    deltas = deltas.half()
    with pytest.raises(TypeError, match=rf"^{dname}\[0\]: expected dtype torch.float32.*got torch.float16"):
        fn(base, list(deltas) if as_list else deltas, coeffs)


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
def test_deltas_device_mismatch(fn, dname, as_list):
    base, deltas, coeffs = inputs()
    deltas = deltas.to("meta")
    with pytest.raises(ValueError, match=rf"^{dname}\[0\]: expected a tensor on cpu.*got meta"):
        fn(base, list(deltas) if as_list else deltas, coeffs)


@pytest.mark.parametrize("fn,dname", FUNCS)
def test_coeffs_device_mismatch(fn, dname):
    base, deltas, coeffs = inputs()
    with pytest.raises(ValueError, match=r"^coeffs: expected a tensor on cpu.*got meta"):
        fn(base, deltas, coeffs.to("meta"))


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_non_floating_base(fn, dname, dtype):
    base, deltas, coeffs = inputs()
    with pytest.raises(TypeError, match=rf"^base: expected a floating-point tensor.*got {dtype}"):
        fn(base.to(dtype), deltas, coeffs)


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
def test_non_floating_deltas(fn, dname, as_list):
    base, deltas, coeffs = inputs()
    deltas = deltas.long()
    with pytest.raises(TypeError, match=rf"^{dname}(\[0\])?: expected a floating-point tensor.*got torch.int64"):
        fn(base, list(deltas) if as_list else deltas, coeffs)


@pytest.mark.parametrize("fn,dname", FUNCS)
def test_base_not_a_tensor(fn, dname):
    _, deltas, coeffs = inputs()
    with pytest.raises(TypeError, match=r"^base: expected a torch.Tensor, got list"):
        fn([[0.0] * 6] * 4, deltas, coeffs)


@pytest.mark.parametrize("fn,dname", FUNCS)
def test_deltas_wrong_type(fn, dname):
    base, _, coeffs = inputs()
    with pytest.raises(TypeError, match=rf"^{dname}: expected a stacked tensor .* or a list of tensors, got dict"):
        fn(base, {"a": base}, coeffs)


@pytest.mark.parametrize("fn,dname", FUNCS)
def test_list_item_not_a_tensor(fn, dname):
    base, deltas, coeffs = inputs()
    with pytest.raises(TypeError, match=rf"^{dname}\[1\]: expected a torch.Tensor, got float"):
        fn(base, [deltas[0], 1.0, deltas[2]], coeffs)


@pytest.mark.parametrize("fn,dname", FUNCS)
def test_empty_list_of_deltas(fn, dname):
    base, _, _ = inputs()
    with pytest.raises(ValueError, match=rf"^{dname}: expected at least one task tensor, got 0"):
        fn(base, [], torch.empty(0))


@pytest.mark.parametrize("fn,dname", FUNCS)
def test_empty_stacked_deltas(fn, dname):
    base, _, _ = inputs()
    with pytest.raises(ValueError, match=rf"^{dname}: expected at least one task tensor, got 0"):
        fn(base, torch.empty(0, 4, 6), torch.empty(0))


# ------------------------------------------------------------------------------------------------
# coeffs
# ------------------------------------------------------------------------------------------------

# base [4, 6] with N = 3: (blocks, bad coeffs shape, n_blocks in the message)
COEFF_SHAPE_CASES = [
    (None, (2,), 1), (None, (3, 2), 1), (None, (1, 3), 1), ("rows", (3, 6), 4), ("rows", (4, 3), 4),
    (5, (3, 4), 5), (5, (3, 5, 1), 5), (5, (), 5), (100, (3, 2), 1),
]


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("blocks,shape,n_blocks", COEFF_SHAPE_CASES,
                         ids=[f"{b}-{'x'.join(map(str, s)) or 'scalar'}" for b, s, _ in COEFF_SHAPE_CASES])
def test_coeffs_wrong_shape_for_block_layout(fn, dname, blocks, shape, n_blocks):
    base, deltas, _ = inputs()
    got = "[" + ", ".join(map(str, shape)) + "]"
    with pytest.raises(ValueError, match=rf"^coeffs: expected shape \[3\] or \[3, {n_blocks}\].*got {re_escape(got)}"):
        fn(base, deltas, torch.randn(shape), blocks=blocks)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


@pytest.mark.parametrize("fn,dname", FUNCS)
def test_coeffs_list_of_floats_works(fn, dname):
    base, deltas, coeffs = inputs()
    out = fn(base, deltas, [0.5, -1.0, 2])
    assert torch.equal(out, fn(base, deltas, torch.tensor([0.5, -1.0, 2.0])))


@pytest.mark.parametrize("fn,dname", FUNCS)
def test_coeffs_list_wrong_length(fn, dname):
    base, deltas, _ = inputs()
    with pytest.raises(ValueError, match=r"^coeffs: expected shape \[3\] or \[3, 1\].*got \[2\]"):
        fn(base, deltas, [0.5, 1.0])


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("bad", [[0.5, "a", 1.0], [True, 1.0, 2.0], "0.5", 0.5, None],
                         ids=["str-item", "bool-item", "str", "float", "None"])
def test_coeffs_wrong_type(fn, dname, bad):
    base, deltas, _ = inputs()
    with pytest.raises(TypeError, match=r"^coeffs: expected a tensor"):
        fn(base, deltas, bad)


@pytest.mark.parametrize("fn,dname", FUNCS)
def test_coeffs_integer_tensor(fn, dname):
    base, deltas, _ = inputs()
    with pytest.raises(TypeError, match=r"^coeffs: expected a floating-point tensor.*got torch.int64"):
        fn(base, deltas, torch.tensor([1, 2, 3]))


# ------------------------------------------------------------------------------------------------
# blocks, out_dtype
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("blocks,exc,msg", [
    (0, ValueError, r"^blocks: block size must be > 0, got 0"),
    (-3, ValueError, r"^blocks: block size must be > 0, got -3"),
    ("cols", ValueError, r"^blocks: expected None, 'rows' or a positive int, got 'cols'"),
    ("", ValueError, r"^blocks: expected None, 'rows' or a positive int, got ''"),
    (True, TypeError, r"^blocks: expected None, 'rows' or a positive int, got bool"),
    (2.5, TypeError, r"^blocks: expected None, 'rows' or a positive int, got float"),
    ((2, 3), TypeError, r"^blocks: expected None, 'rows' or a positive int, got tuple"),
], ids=["zero", "negative", "cols", "empty-str", "True", "float", "tuple"])
def test_bad_blocks(fn, dname, blocks, exc, msg):
    base, deltas, coeffs = inputs()
    with pytest.raises(exc, match=msg):
        fn(base, deltas, coeffs, blocks=blocks)


@pytest.mark.parametrize("fn,dname", FUNCS)
def test_rows_on_scalar(fn, dname):
    with pytest.raises(ValueError, match=r"^blocks: 'rows' needs a tensor with at least one dimension"):
        fn(torch.tensor(1.0), torch.randn(2), torch.randn(2), blocks="rows")


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("out_dtype", [torch.int32, torch.bool, "float32"], ids=str)
def test_bad_out_dtype(fn, dname, out_dtype):
    base, deltas, coeffs = inputs()
    with pytest.raises(TypeError, match=r"^out_dtype: expected one of float32, float16, bfloat16, float64"):
        fn(base, deltas, coeffs, out_dtype=out_dtype)


# ------------------------------------------------------------------------------------------------
# backend
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("backend", ["gpu", "CPU", "", None, 3], ids=repr)
def test_unknown_backend(fn, dname, backend):
    base, deltas, coeffs = inputs()
    with pytest.raises(ValueError, match=r"^backend: expected 'auto' or one of .*got"):
        fn(base, deltas, coeffs, backend=backend)


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])  # the reference runs anywhere
def test_explicit_backend_that_cannot_run(fn, dname, backend):
    """An explicit backend that cannot run raises BackendUnavailableError with can_run's reason."""
    reason = backend_reason(backend, "cpu")
    if reason is None:
        pytest.skip(f"backend '{backend}' can run on cpu here")
    base, deltas, coeffs = inputs()
    with pytest.raises(pyops.BackendUnavailableError, match=re_escape(reason)) as info:
        fn(base, deltas, coeffs, backend=backend)
    assert f"'{backend}'" in str(info.value)


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_explicit_native_backend_rejects_float64(fn, dname, backend):
    """The kernels take fp32/fp16/bf16; fp64 (for gradcheck) is the reference's alone."""
    base, deltas, coeffs = inputs(dtype=torch.float64)
    with pytest.raises(pyops.BackendUnavailableError, match=rf"'{backend}' cannot run"):
        fn(base, deltas, coeffs, backend=backend)


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("out_dtype", [torch.float64], ids=fmt_dtype)
def test_explicit_cpu_rejects_float64_out_dtype(fn, dname, out_dtype):
    if backend_reason("cpu", "cpu") is not None:
        pytest.skip(backend_reason("cpu", "cpu"))
    base, deltas, coeffs = inputs()
    with pytest.raises(pyops.BackendUnavailableError, match=r"float64"):
        fn(base, deltas, coeffs, out_dtype=out_dtype, backend="cpu")


def test_errors_do_not_depend_on_backend():
    """Validation comes before the backend choice: the same error whichever backend is named."""
    base, deltas, coeffs = inputs()
    for backend in ("auto",) + BACKENDS:
        with pytest.raises(ValueError, match=r"^blocks: block size must be > 0"):
            pyops.task_arithmetic(base, deltas, coeffs, blocks=0, backend=backend)


# ------------------------------------------------------------------------------------------------
# Integer arguments: the int64 of the ops' schemas, checked before any op is called
# ------------------------------------------------------------------------------------------------

def _require(backend):
    if backend != "reference":
        reason = backend_reason(backend, "cpu")
        if reason is not None:
            pytest.skip(f"backend '{backend}' cannot run on cpu here: {reason}")


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("blocks", [2**63, 2**64], ids=["2p63", "2p64"])
def test_blocks_beyond_int64_is_refused(fn, dname, backend, blocks):
    _require(backend)
    base, deltas, coeffs = inputs()
    with pytest.raises(ValueError, match=rf"^blocks: block size must be <= 2\*\*63 - 1 .*got {blocks}$"):
        fn(base, deltas, coeffs, blocks=blocks, backend=backend)


@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("blocks", [24, 25, 2**62, 2**63 - 1], ids=["numel", "numel+1", "2p62", "2p63-1"])
def test_block_at_least_the_tensor_is_one_block(fn, dname, backend, blocks):
    _require(backend)
    base, deltas, _ = inputs()
    coeffs = torch.randn(3, 1)
    assert torch.equal(fn(base, deltas, coeffs, blocks=blocks, backend=backend),
                       fn(base, deltas, coeffs, blocks=None, backend=backend))


@pytest.mark.parametrize("method", ["ties", "dare", "breadcrumbs", "della", "consensus"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_merge_blocks_beyond_int64_is_refused(method, backend):
    _require(backend)
    base, deltas, _ = inputs()
    with pytest.raises(ValueError, match=r"^blocks: block size must be <= 2\*\*63 - 1"):
        pyops.merge(base, deltas, method=method, density=0.5, blocks=2**63, backend=backend)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "della"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_merge_block_longer_than_the_tensor_is_one_block(method, backend):
    """A block of 2**62 elements is the one block of a 24-element tensor (no 2**62-element padding)."""
    _require(backend)
    base, deltas, _ = inputs()
    kw = dict(method=method, density=0.5, seed=3, backend=backend)
    assert torch.equal(pyops.merge(base, deltas, blocks=2**62, **kw), pyops.merge(base, deltas, blocks=None, **kw))


@pytest.mark.parametrize("method", ["ties", "dare", "breadcrumbs"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("k,exc,msg", [
    (2**63, ValueError, r"^k: expected an int in \[-2\*\*63, 2\*\*63 - 1\].*got 9223372036854775808$"),
    (True, TypeError, r"^k: expected an int .*got bool True$"),
    (2.0, TypeError, r"^k: expected an int .*got float 2.0$"),
], ids=["2p63", "True", "float"])
def test_merge_k_must_be_an_int64_for_every_method(method, backend, k, exc, msg):
    """k reaches the native op's int64 schema whatever the method (consensus alone reads it)."""
    _require(backend)
    base, deltas, _ = inputs()
    with pytest.raises(exc, match=msg):
        pyops.merge(base, deltas, method=method, density=0.5, k=k, backend=backend)


@pytest.mark.parametrize("k", [2**63, 4, 0, True], ids=["2p63", "N+1", "zero", "True"])
def test_consensus_k_is_a_task_count(k):
    base, deltas, _ = inputs()
    with pytest.raises(ValueError, match=r"^k: expected an int in \[1, 3\] \(tasks that must agree\)"):
        pyops.merge(base, deltas, method="consensus", k=k)


# ------------------------------------------------------------------------------------------------
# Meta and fake tensors: shapes only, no data-dependent checks
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,dname", FUNCS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_meta_out_is_not_an_overlap(fn, dname, backend):
    """Meta tensors own no memory: their data pointers say nothing about overlap."""
    base, deltas, coeffs = (t.to("meta") for t in inputs())
    out = torch.empty(4, 6, device="meta")
    assert fn(base, deltas, coeffs, out=out, backend=backend) is out


@pytest.mark.parametrize("method", ["ties", "dare", "breadcrumbs", "della", "consensus", "model_stock"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_meta_merge_gives_a_meta_output(method, backend):
    base, deltas, _ = (t.to("meta") for t in inputs())
    out = pyops.merge(base, deltas, method=method, backend=backend,
                      **({} if method == "model_stock" else {"density": 0.5}))
    assert (tuple(out.shape), out.dtype, out.device.type) == ((4, 6), FP32, "meta")


@pytest.mark.parametrize("method", ["ties", "dare", "breadcrumbs", "della", "consensus", "model_stock"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fake_merge_gives_a_fake_output(method, backend):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        base, deltas, _ = (mode.from_tensor(t) for t in inputs())
        out = pyops.merge(base, deltas, method=method, backend=backend,
                          **({} if method == "model_stock" else {"density": 0.5}))
    assert isinstance(out, FakeTensor) and tuple(out.shape) == (4, 6)
