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
