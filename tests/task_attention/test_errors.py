"""Bad input: a clear TypeError/ValueError naming the argument, never a crash (docs/design.md#errors)."""
from __future__ import annotations

import pytest
import torch

import pyops
from .cases import backend_reason

B, H, L, D = 2, 4, 5, 8


def args(**over):
    a = dict(q=torch.randn(B, H, L, D), k=torch.randn(B, 2, L, D), v=torch.randn(B, 2, L, 3),
             q_groups=torch.tensor([0, 0, 1, 1, -1]), kv_groups=None, allow=torch.eye(2, dtype=torch.bool))
    a.update(over)
    return a


def call(**over):
    a = args(**{k: v for k, v in over.items() if k in ("q", "k", "v", "q_groups", "kv_groups", "allow")})
    kw = {k: v for k, v in over.items() if k not in a}
    return pyops.task_masked_attention(a["q"], a["k"], a["v"], a["q_groups"], a["kv_groups"], a["allow"], **kw)


CASES = [
    ("q-not-4d", dict(q=torch.randn(H, L, D)), ValueError, r"q: expected a 4-D tensor"),
    ("q-int", dict(q=torch.ones(B, H, L, D, dtype=torch.int32)), TypeError, "q: expected a floating-point"),
    ("k-dtype", dict(k=torch.randn(B, 2, L, D, dtype=torch.float16)), TypeError, "k: expected dtype torch.float32"),
    ("k-batch", dict(k=torch.randn(3, 2, L, D)), ValueError, "k: expected batch size 2"),
    ("k-head-dim", dict(k=torch.randn(B, 2, L, 4)), ValueError, "k: expected head dim 8"),
    ("v-length", dict(v=torch.randn(B, 2, L + 1, 3)), ValueError, r"v: expected shape \[2, 2, 5, Dv\]"),
    ("gqa-not-divisible", dict(k=torch.randn(B, 3, L, D), v=torch.randn(B, 3, L, 3)), ValueError,
     r"number of kv heads \(3\) must divide the number of query heads \(4\)"),
    ("groups-length", dict(q_groups=torch.tensor([0, 1])), ValueError, r"q_groups: expected shape \[5\] or \[2, 5\]"),
    ("groups-batch", dict(q_groups=torch.zeros(3, L, dtype=torch.int64)), ValueError, "q_groups: expected shape"),
    ("groups-float", dict(q_groups=torch.zeros(L)), TypeError, "q_groups: expected an integer tensor"),
    ("group-id-too-big", dict(q_groups=torch.tensor([0, 0, 2, 1, 1])), ValueError,
     r"q_groups: group id 2 is out of range for allow of shape \[2, 2\]"),
    ("group-id-below-minus-one", dict(q_groups=torch.tensor([0, -2, 1, 1, 1])), ValueError,
     "q_groups: group ids must be >= -1"),
    ("kv-group-id-too-big", dict(kv_groups=torch.tensor([0, 0, 5, 1, 1])), ValueError, "kv_groups: group id 5"),
    ("kv-groups-missing-for-lk", dict(k=torch.randn(B, 2, 7, D), v=torch.randn(B, 2, 7, 3)), ValueError,
     r"kv_groups: required when the key length \(7\)"),
    ("allow-not-square", dict(allow=torch.ones(2, 3, dtype=torch.bool)), ValueError, r"allow: expected a square"),
    ("allow-not-bool", dict(allow=torch.eye(2)), TypeError, "allow: expected a bool tensor"),
    ("dropout-one", dict(dropout_p=1.0), ValueError, r"dropout_p: expected a float in \[0, 1\), got 1.0"),
    ("dropout-negative", dict(dropout_p=-0.1), ValueError, "dropout_p: expected a float in"),
    ("seed-float", dict(dropout_p=0.1, seed=1.5), TypeError, "seed: expected None, an int"),
    ("causal-not-bool", dict(causal=1), TypeError, "causal: expected a bool"),
    ("bad-backend", dict(backend="gpu"), ValueError, "backend: expected 'auto'"),
]


@pytest.mark.parametrize("over,exc,msg", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(over, exc, msg):
    with pytest.raises(exc, match=msg):
        call(**over)


def test_device_mismatch_names_the_argument():
    with pytest.raises(ValueError, match="q_groups: expected a tensor on cpu"):
        call(q_groups=torch.zeros(L, dtype=torch.int64, device="meta"))


def test_explicit_unavailable_backend_raises_with_reason():
    if backend_reason("cpu") is None:
        pytest.skip("the C++ backend is available here")
    with pytest.raises(pyops.BackendUnavailableError, match="backend 'cpu' cannot run"):
        call(backend="cpu")


def test_fp64_runs_on_the_reference_only():
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    with pytest.raises(pyops.BackendUnavailableError, match="float64|cannot run this call"):
        pyops.task_masked_attention(q, q, q, torch.zeros(3, dtype=torch.int64), backend="triton")
    pyops.task_masked_attention(q, q, q, torch.zeros(3, dtype=torch.int64))  # auto -> reference


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernels_reject_out_of_range_ids_under_compile_paths(backend):
    """The eager check reads the ids; the native kernels re-check them themselves."""
    if backend_reason(backend) is not None:
        pytest.skip(f"backend '{backend}' cannot run here: {backend_reason(backend)}")
    from pyops.task_attention import ops as ta
    q = torch.randn(1, 1, 4, 8)
    op = ta._OPS[backend]
    bad = torch.tensor([0, 3, 0, 0], dtype=torch.int32)
    if backend == "cpu":
        with pytest.raises(ValueError, match="q_groups"):
            op(q, q, q, bad, bad, torch.eye(2, dtype=torch.bool), False, 0.0, 1.0, torch.zeros(1, dtype=torch.int64))
    else:  # Triton treats ids outside [0, G) as padding (no out-of-bounds read)
        out, lse = op(q, q, q, bad, bad, torch.eye(2, dtype=torch.bool), False, 0.0, 1.0,
                      torch.zeros(1, dtype=torch.int64))
        assert torch.isfinite(out).all() and (out[0, 0, 1] == 0).all()


# ------------------------------------------------------------------------------------------------
# Ids are checked in their own dtype, before they are narrowed to the kernels' int32
# ------------------------------------------------------------------------------------------------

def _require(backend):
    if backend not in ("auto", "reference") and backend_reason(backend) is not None:
        pytest.skip(f"backend '{backend}' cannot run here: {backend_reason(backend)}")


# int64 ids that int32 narrowing would turn into the valid groups 0, 1 and 1
WRAPPING_IDS = [(2**32, "2p32-wraps-to-0"), (2**32 + 1, "2p32+1-wraps-to-1"), (-(2**32) + 1, "-2p32+1-wraps-to-1")]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bad", [b for b, _ in WRAPPING_IDS], ids=[i for _, i in WRAPPING_IDS])
def test_int64_group_id_that_int32_would_wrap_is_refused(backend, bad):
    _require(backend)
    q_groups = torch.tensor([0, 0, bad, 1, -1])
    msg = (r"q_groups: group ids must be >= -1 \(-1 = padding\), got -4294967295 at q_groups\[2\]" if bad < 0 else
           rf"q_groups: group id {bad} is out of range for allow of shape \[2, 2\] \(ids must be in \[-1, 1\]\), "
           r"at q_groups\[2\]")
    with pytest.raises(ValueError, match=msg):
        call(q_groups=q_groups, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_int64_kv_group_id_error_names_its_batch_row_and_position(backend):
    _require(backend)
    kv_groups = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2**32, 0]])
    with pytest.raises(ValueError, match=r"kv_groups: group id 4294967296 is out of range .* at kv_groups\[1, 3\]"):
        call(kv_groups=kv_groups, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_identity_rule_refuses_ids_beyond_int32(backend):
    """Without allow any id >= -1 is a group of its own; the kernels take int32 ids, so 2**32
    (which would merge with group 0) is refused."""
    _require(backend)
    with pytest.raises(ValueError, match=r"q_groups: group id 4294967296 at q_groups\[4\] is out of range: "
                                         r"without allow .* \[-1, 2147483647\]"):
        call(q_groups=torch.tensor([0, 0, 1, 1, 2**32]), allow=None, backend=backend)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_ids_in_range_are_accepted_in_every_integer_dtype(dtype):
    a = args()
    g = torch.tensor([0, 0, 1, 1, 1])
    out = pyops.task_masked_attention(a["q"], a["k"], a["v"], g.to(dtype), allow=a["allow"], backend="reference")
    exp = pyops.task_masked_attention(a["q"], a["k"], a["v"], g, allow=a["allow"], backend="reference")
    assert torch.equal(out, exp)


def test_the_callers_ids_are_not_modified():
    q_groups = torch.tensor([0, 0, 1, 1, -1])
    before = q_groups.clone()
    call(q_groups=q_groups)
    assert q_groups.dtype == torch.int64 and torch.equal(q_groups, before)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1], ids=["2p64", "-2p63-1"])
def test_seed_beyond_64_bits_is_refused(seed):
    with pytest.raises(ValueError, match=rf"seed: expected an int in \[-2\*\*63, {2**64 - 1}\].*got {seed}"):
        call(dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("seed,same_as", [(2**64 - 1, -1), (-(2**63), 2**63)], ids=["2p64-1", "-2p63"])
def test_seed_is_64_bits_signed_or_unsigned(seed, same_as):
    """Either spelling of the same 64 bits gives the same dropout mask."""
    a = args()
    outs = [pyops.task_masked_attention(a["q"], a["k"], a["v"], a["q_groups"], allow=a["allow"], dropout_p=0.3,
                                        seed=s, backend="reference") for s in (seed, same_as)]
    assert torch.equal(outs[0], outs[1])


def test_masks_dense_refuses_int64_id_beyond_allow():
    with pytest.raises(ValueError, match=r"q_groups: group id 4294967296 is out of range for allow of shape "
                                         r"\[2, 2\] .* at q_groups\[1\]"):
        pyops.masks.dense(torch.tensor([0, 2**32]), allow=torch.eye(2, dtype=torch.bool))


def test_masks_dense_refuses_ids_below_minus_one():
    with pytest.raises(ValueError, match=r"kv_groups: group ids must be >= -1 .* got -4294967295 at kv_groups\[0\]"):
        pyops.masks.dense(torch.tensor([0, 1]), torch.tensor([-(2**32) + 1, 0]), torch.eye(2, dtype=torch.bool))


def test_module_refuses_int64_id_before_building_the_rule_of_appended_tokens():
    """add_bias_kv with the identity rule sizes a rule by the largest id: 2**32 is refused first."""
    m = pyops.nn.TaskMaskedMultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(ValueError, match=r"groups: group id 4294967296 at groups\[4\] is out of range"):
        m(torch.randn(2, 5, 8), groups=torch.tensor([0, 0, 1, 1, 2**32]))


def test_module_checks_ids_against_the_callers_rule_with_appended_tokens():
    m = pyops.nn.TaskMaskedMultiheadAttention(8, 2, add_zero_attn=True)
    with pytest.raises(ValueError, match=r"groups: group id 2 is out of range for allow of shape \[2, 2\]"):
        m(torch.randn(2, 5, 8), groups=torch.tensor([0, 0, 1, 1, 2]), allow=torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("extra", [{}, {"add_bias_kv": True}], ids=["plain", "add_bias_kv"])
def test_module_key_padding_with_uint8_ids_pads_instead_of_wrapping_to_255(extra):
    torch.manual_seed(0)
    m = pyops.nn.TaskMaskedMultiheadAttention(8, 2, **extra)
    x = torch.randn(2, 5, 8)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[:, 3] = True
    allow = torch.ones(2, 2, dtype=torch.bool)
    g = torch.tensor([0, 0, 1, 1, 1])
    out8, _ = m(x, groups=g.to(torch.uint8), allow=allow, key_padding_mask=kpm)
    out64, _ = m(x, groups=g, allow=allow, key_padding_mask=kpm)
    assert torch.equal(out8, out64)


# ------------------------------------------------------------------------------------------------
# Meta and fake tensors: shapes only, no data-dependent checks
# ------------------------------------------------------------------------------------------------

def _shapes(result):
    return [(tuple(t.shape), t.dtype, t.device.type) for t in result]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("allow", [True, False], ids=["allow", "identity"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_meta_inputs_give_meta_outputs(backend, allow, dropout_p):
    a = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in args().items()}
    out, lse = pyops.task_masked_attention(a["q"], a["k"], a["v"], a["q_groups"],
                                           allow=a["allow"] if allow else None, dropout_p=dropout_p, seed=1,
                                           return_lse=True, backend=backend)
    assert _shapes((out, lse)) == [((B, H, L, 3), torch.float32, "meta"), ((B, H, L), torch.float32, "meta")]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_meta_inputs_on_a_kernel_backend_get_a_clear_error(backend):
    a = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in args().items()}
    with pytest.raises(pyops.BackendUnavailableError, match=rf"backend '{backend}' cannot run this call: .*meta"):
        pyops.task_masked_attention(a["q"], a["k"], a["v"], a["q_groups"], allow=a["allow"], backend=backend)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "triton"])
def test_fake_inputs_give_fake_outputs(backend):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    _require(backend)
    mode = FakeTensorMode()
    with mode:
        a = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in args().items()}
        out = pyops.task_masked_attention(a["q"], a["k"], a["v"], a["q_groups"], allow=a["allow"], backend=backend)
    assert isinstance(out, FakeTensor) and tuple(out.shape) == (B, H, L, 3)


def test_meta_module_runs_with_appended_tokens_and_weights():
    m = pyops.nn.TaskMaskedMultiheadAttention(8, 2, add_bias_kv=True, device="meta")
    out, w = m(torch.randn(2, 5, 8, device="meta"), groups=torch.tensor([0, 0, 1, 1, -1], device="meta"),
               need_weights=True)
    assert _shapes((out, w)) == [((2, 5, 8), torch.float32, "meta"), ((2, 5, 6), torch.float32, "meta")]
