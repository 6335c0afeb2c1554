"""The C++ neighbourhood-attention kernels (`pyops._C.na_forward / na_backward`) called directly,
against an independent brute-force formulation of the window rule (docs/neighborhood.md) written here.

The brute force builds, per spatial dimension and by plain Python loops over positions, the
boolean "query x may attend key y" matrix and the relative-position offset (y - x) + k - 1 in
in-group coordinates; the 3D mask is their product. Attention is then dense masked softmax in fp64
(autograd for the gradients). It shares no code with pyops.neighborhood.reference or the kernels.

The native layer is always 3D: 1D and 2D problems are passed as 3D with leading extents of 1,
kernel 1, stride 1, dilation 1, non-causal (as pyops.neighborhood.ops does). The bindings' own
argument checks (ValueError naming the argument) are tested at the end.
"""
from __future__ import annotations

import pytest
import torch

from pyops import _native
from pyops.testing import REDUCTION_TOL, compare, tolerance_for

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [FP32, FP16, BF16]
_C = _native.cpu_module


def _cpu_reason():
    if _C is None:
        return _native.cpu_missing_reason
    if not hasattr(_C, "na_forward"):
        return "pyops._C was built without the neighborhood kernels"
    return None


pytestmark = pytest.mark.skipif(_cpu_reason() is not None, reason=f"cpu backend unavailable: {_cpu_reason()}")


# ------------------------------------------------------------------------------------------------
# The brute-force definition.
# ------------------------------------------------------------------------------------------------


def window_1d(S: int, k: int, s: int, d: int, causal: bool):
    """allowed[x][y] (query position x may attend key position y) and offset[x][y] = (j - i) + k - 1
    with i, j the in-group indices, by loops over positions (docs/neighborhood.md, one dimension)."""
    allowed = [[False] * S for _ in range(S)]
    offset = [[0] * S for _ in range(S)]
    for x in range(S):
        g, i = x % d, x // d
        members = [y for y in range(S) if y % d == g]  # the group, in order
        L = len(members)
        if causal:
            leader = min((i // s) * s + s - 1, L - 1)
            lo, hi = max(leader - k + 1, 0), i  # inclusive
        else:
            leader = min((i // s) * s + s // 2, L - 1)
            lo = min(max(leader - k // 2, 0), L - k)
            hi = lo + k - 1
        for j, y in enumerate(members):
            if lo <= j <= hi:
                allowed[x][y] = True
                offset[x][y] = (j - i) + k - 1
    return allowed, offset


def brute_force(q, k, v, kernel, stride, dilation, causal, rpb, scale):
    """q, k [B, S0, S1, S2, H, D], v [..., Dv], rpb [H, 2k0-1, 2k1-1, 2k2-1] or None -> out, lse."""
    B, S0, S1, S2, H, D = q.shape
    Dv = v.shape[-1]
    S = (S0, S1, S2)
    masks, offs = [], []
    for dim in range(3):
        a, o = window_1d(S[dim], kernel[dim], stride[dim], dilation[dim], causal[dim])
        masks.append(torch.tensor(a))
        offs.append(torch.tensor(o))
    N = S0 * S1 * S2
    allowed = (masks[0][:, None, None, :, None, None] & masks[1][None, :, None, None, :, None]
               & masks[2][None, None, :, None, None, :]).reshape(N, N)
    qf = q.reshape(B, N, H, D).permute(0, 2, 1, 3)
    kf = k.reshape(B, N, H, D).permute(0, 2, 1, 3)
    vf = v.reshape(B, N, H, Dv).permute(0, 2, 1, 3)
    scores = scale * qf @ kf.transpose(-1, -2)  # [B, H, N, N]
    if rpb is not None:
        i0 = offs[0][:, None, None, :, None, None].expand(S0, S1, S2, S0, S1, S2).reshape(N, N)
        i1 = offs[1][None, :, None, None, :, None].expand(S0, S1, S2, S0, S1, S2).reshape(N, N)
        i2 = offs[2][None, None, :, None, None, :].expand(S0, S1, S2, S0, S1, S2).reshape(N, N)
        bias = rpb[:, i0.clamp_min(0), i1.clamp_min(0), i2.clamp_min(0)]  # [H, N, N]
        scores = scores + torch.where(allowed, bias, torch.zeros((), dtype=bias.dtype))
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, N]
    out = torch.softmax(scores, dim=-1) @ vf
    return (out.permute(0, 2, 1, 3).reshape(B, S0, S1, S2, H, Dv),
            lse.permute(0, 2, 1).reshape(B, S0, S1, S2, H))


# ------------------------------------------------------------------------------------------------
# Calling the bindings.
# ------------------------------------------------------------------------------------------------


def _args(q, v, kernel, stride, dilation, causal, has_rpb, scale, n_threads):
    B, S0, S1, S2, H, D = q.shape
    return dict(B=B, S0=S0, S1=S1, S2=S2, H=H, D=D, Dv=v.shape[-1],
                k0=kernel[0], k1=kernel[1], k2=kernel[2], s0=stride[0], s1=stride[1], s2=stride[2],
                d0=dilation[0], d1=dilation[1], d2=dilation[2],
                c0=int(causal[0]), c1=int(causal[1]), c2=int(causal[2]),
                has_rpb=has_rpb, scale=scale, dtype=_native.dtype_code(q.dtype), n_threads=n_threads)


def native_forward(q, k, v, kernel, stride, dilation, causal, rpb, scale, n_threads=2):
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32)
    _C.na_forward(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
                  rpb=rpb.data_ptr() if rpb is not None else 0,
                  **_args(q, v, kernel, stride, dilation, causal, rpb is not None, scale, n_threads))
    return out, lse


def native_backward(q, k, v, out, dout, lse, kernel, stride, dilation, causal, rpb, scale, n_threads=2):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    drpb = torch.empty_like(rpb) if rpb is not None else None
    _C.na_backward(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), dout=dout.data_ptr(),
                   lse=lse.data_ptr(), rpb=rpb.data_ptr() if rpb is not None else 0, dq=dq.data_ptr(),
                   dk=dk.data_ptr(), dv=dv.data_ptr(), drpb=drpb.data_ptr() if drpb is not None else 0,
                   **_args(q, v, kernel, stride, dilation, causal, rpb is not None, scale, n_threads))
    return dq, dk, dv, drpb


# ------------------------------------------------------------------------------------------------
# Cases: (id, B, spatial S0..S2, H, D, Dv, kernel, stride, dilation, causal, rpb)
# ------------------------------------------------------------------------------------------------

CASES = [
    # 1D as 3D
    ("1d-L13-k5", 2, (1, 1, 13), 2, 8, 8, (1, 1, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), True),
    ("1d-L10-k4-even", 1, (1, 1, 10), 1, 5, 7, (1, 1, 4), (1, 1, 1), (1, 1, 1), (0, 0, 0), False),
    ("1d-L11-k3-d3", 1, (1, 1, 11), 2, 4, 4, (1, 1, 3), (1, 1, 1), (1, 1, 3), (0, 0, 0), True),
    ("1d-L9-k9-equal", 1, (1, 1, 9), 1, 3, 3, (1, 1, 9), (1, 1, 1), (1, 1, 1), (0, 0, 0), True),
    ("1d-L14-k5-s3", 1, (1, 1, 14), 2, 6, 6, (1, 1, 5), (1, 1, 3), (1, 1, 1), (0, 0, 0), True),
    ("1d-L12-k4-causal-s2", 1, (1, 1, 12), 1, 4, 4, (1, 1, 4), (1, 1, 2), (1, 1, 1), (0, 0, 1), False),
    ("1d-L150-k21", 1, (1, 1, 150), 1, 9, 9, (1, 1, 21), (1, 1, 1), (1, 1, 1), (0, 0, 0), False),
    ("1d-L90-k41-s5-wide", 1, (1, 1, 90), 1, 8, 8, (1, 1, 41), (1, 1, 5), (1, 1, 2), (0, 0, 0), True),
    ("1d-L1-k1", 2, (1, 1, 1), 1, 4, 4, (1, 1, 1), (1, 1, 1), (1, 1, 1), (0, 0, 0), True),
    # 2D (S0 = 1)
    ("2d-7x9-k3", 2, (1, 7, 9), 3, 8, 8, (1, 3, 3), (1, 1, 1), (1, 1, 1), (0, 0, 0), True),
    ("2d-6x7-k4x2-even", 1, (1, 6, 7), 2, 5, 3, (1, 4, 2), (1, 1, 1), (1, 1, 1), (0, 0, 0), False),
    ("2d-11x10-k3-d3x2", 1, (1, 11, 10), 2, 8, 8, (1, 3, 3), (1, 1, 1), (1, 3, 2), (0, 0, 0), True),
    ("2d-5x5-k5-equal", 1, (1, 5, 5), 1, 4, 4, (1, 5, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), True),
    ("2d-9x8-k5x3-s2x3", 1, (1, 9, 8), 2, 4, 4, (1, 5, 3), (1, 2, 3), (1, 1, 1), (0, 0, 0), True),
    ("2d-7x8-k3-causal-mixed", 1, (1, 7, 8), 2, 4, 6, (1, 3, 3), (1, 1, 1), (1, 1, 2), (0, 1, 0), False),
    ("2d-10x19-k3x11-tiles", 1, (1, 10, 19), 1, 16, 16, (1, 3, 11), (1, 1, 1), (1, 1, 1), (0, 0, 0), True),
    # 3D
    ("3d-4x5x6-k3", 1, (4, 5, 6), 2, 8, 8, (3, 3, 3), (1, 1, 1), (1, 1, 1), (0, 0, 0), True),
    ("3d-5x4x7-k2x3x4-even", 1, (5, 4, 7), 1, 4, 5, (2, 3, 4), (1, 1, 1), (1, 1, 1), (0, 0, 0), False),
    ("3d-6x5x7-k3-d2-s2-causal", 1, (6, 5, 7), 2, 4, 4, (3, 3, 3), (2, 1, 2), (2, 1, 1), (1, 0, 1), False),
    ("3d-3x5x7-k3x5x3-d1x1x2", 1, (3, 5, 7), 1, 6, 6, (3, 5, 3), (1, 1, 1), (1, 1, 2), (0, 0, 0), True),
]


def _case(case, dtype, gen):
    _, B, S, H, D, Dv, kernel, stride, dilation, causal, has_rpb = case
    q = torch.randn(B, *S, H, D, generator=gen).to(dtype)
    k = torch.randn(B, *S, H, D, generator=gen).to(dtype)
    v = torch.randn(B, *S, H, Dv, generator=gen).to(dtype)
    rpb = torch.randn(H, 2 * kernel[0] - 1, 2 * kernel[1] - 1, 2 * kernel[2] - 1, generator=gen) if has_rpb else None
    return q, k, v, rpb, kernel, stride, dilation, tuple(bool(c) for c in causal), D ** -0.5


def _id(case) -> str:
    """The case's name followed by its batch, heads and head dims: ``2d-7x9-k3-B2-H3-D8``."""
    name, B, _, H, D, Dv = case[:6]
    return f"{name}-B{B}-H{H}-D{D}" + (f"-Dv{Dv}" if Dv != D else "")


def _ids(cases):
    return [_id(c) for c in cases]


def _check(actual, expected, tol, what):
    cmp = compare(actual, expected, tol)
    assert cmp.ok, f"{what}: {cmp} (atol={tol.atol}, rtol={tol.rtol})"


@pytest.fixture(params=["auto", "base"])
def isa(request):
    assert _C.set_isa(request.param)
    yield request.param
    _C.set_isa("auto")


def _brute(q, k, v, rpb, kernel, stride, dilation, causal, scale, grad=False):
    t = [x.detach().double().requires_grad_(grad) if x is not None else None for x in (q, k, v, rpb)]
    out, lse = brute_force(t[0], t[1], t[2], kernel, stride, dilation, causal, t[3], scale)
    return t, out, lse


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_brute_force_window_rule_examples():
    """Spot checks of the window rule itself (hand-derived from docs/neighborhood.md)."""
    a, _ = window_1d(7, 3, 1, 1, False)
    assert [y for y in range(7) if a[0][y]] == [0, 1, 2]  # shifted to stay inside
    assert [y for y in range(7) if a[3][y]] == [2, 3, 4]
    assert [y for y in range(7) if a[6][y]] == [4, 5, 6]
    a, _ = window_1d(7, 2, 1, 2, False)  # dilation 2: groups {0,2,4,6}, {1,3,5}
    assert [y for y in range(7) if a[4][y]] == [2, 4]  # in-group i=2, window [1, 3)
    assert [y for y in range(7) if a[5][y]] == [3, 5]
    a, _ = window_1d(6, 3, 1, 1, True)
    assert [y for y in range(6) if a[0][y]] == [0]
    assert [y for y in range(6) if a[4][y]] == [2, 3, 4]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_forward_matches_brute_force(case, dtype, isa, rng):
    q, k, v, rpb, kernel, stride, dilation, causal, scale = _case(case, dtype, rng)
    out, lse = native_forward(q, k, v, kernel, stride, dilation, causal, rpb, scale)
    _, ref_out, ref_lse = _brute(q, k, v, rpb, kernel, stride, dilation, causal, scale)
    _check(out, ref_out.to(dtype), tolerance_for(dtype), "out")
    _check(lse, ref_lse.float(), tolerance_for(FP32), "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_backward_matches_brute_force(case, dtype, isa, rng):
    q, k, v, rpb, kernel, stride, dilation, causal, scale = _case(case, dtype, rng)
    dout = torch.randn(*q.shape[:-1], v.shape[-1], generator=rng).to(dtype)
    out, lse = native_forward(q, k, v, kernel, stride, dilation, causal, rpb, scale)
    dq, dk, dv, drpb = native_backward(q, k, v, out, dout, lse, kernel, stride, dilation, causal, rpb, scale)
    t, ref_out, _ = _brute(q, k, v, rpb, kernel, stride, dilation, causal, scale, grad=True)
    ref_out.backward(dout.double())
    tol = tolerance_for(dtype)
    _check(dq, t[0].grad.to(dtype), tol, "dq")
    _check(dk, t[1].grad.to(dtype), tol, "dk")
    _check(dv, t[2].grad.to(dtype), tol, "dv")
    if rpb is not None:
        # drpb sums dS over every query of every batch: a long fp32 reduction.
        _check(drpb, t[3].grad.float(), REDUCTION_TOL if dtype == FP32 else tol, "drpb")


THREAD_CASES = ["1d-L150-k21", "1d-L90-k41-s5-wide", "2d-10x19-k3x11-tiles", "3d-4x5x6-k3", "3d-6x5x7-k3-d2-s2-causal"]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in THREAD_CASES], ids=_id)
def test_bit_identical_for_any_thread_count(case, isa, rng):
    q, k, v, rpb, kernel, stride, dilation, causal, scale = _case(case, FP32, rng)
    if rpb is None:
        rpb = torch.randn(q.shape[-2], 2 * kernel[0] - 1, 2 * kernel[1] - 1, 2 * kernel[2] - 1, generator=rng)
    dout = torch.randn(*q.shape[:-1], v.shape[-1], generator=rng)
    results = []
    for n_threads in (1, 2, 3):
        out, lse = native_forward(q, k, v, kernel, stride, dilation, causal, rpb, scale, n_threads)
        grads = native_backward(q, k, v, out, dout, lse, kernel, stride, dilation, causal, rpb, scale, n_threads)
        results.append([out, lse, *grads])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_kernel_equal_to_extent_is_full_attention(rng):
    """k == S in every dimension: every query sees every key (plain softmax attention)."""
    q, k, v = (torch.randn(1, 1, 4, 6, 2, 8, generator=rng) for _ in range(3))
    out, lse = native_forward(q, k, v, (1, 4, 6), (1, 1, 1), (1, 1, 1), (False,) * 3, None, 0.3)
    qf, kf, vf = (x.reshape(24, 2, 8).transpose(0, 1).double() for x in (q, k, v))
    s = 0.3 * qf @ kf.transpose(-1, -2)
    ref = (torch.softmax(s, -1) @ vf).transpose(0, 1).reshape(1, 1, 4, 6, 2, 8)
    _check(out, ref.float(), tolerance_for(FP32), "out")
    _check(lse, torch.logsumexp(s, -1).transpose(0, 1).reshape(1, 1, 4, 6, 2).float(), tolerance_for(FP32), "lse")


def test_empty_batch_writes_zero_drpb():
    q = torch.empty(0, 1, 1, 5, 1, 4)
    rpb = torch.randn(1, 1, 1, 5)
    out, lse = native_forward(q, q, q, (1, 1, 3), (1, 1, 1), (1, 1, 1), (False,) * 3, rpb, 0.5)
    assert out.shape == (0, 1, 1, 5, 1, 4)
    _, _, _, drpb = native_backward(q, q, q, out, out, lse, (1, 1, 3), (1, 1, 1), (1, 1, 1), (False,) * 3, rpb, 0.5)
    assert torch.equal(drpb, torch.zeros_like(drpb))


BAD = [
    ("kernel-times-dilation-too-large", dict(k2=3, d2=2), "kernel_size\\[2\\]=3 times dilation\\[2\\]=2"),
    ("kernel-larger-than-extent", dict(k2=6), "kernel_size\\[2\\]=6"),
    ("stride-larger-than-kernel", dict(s2=4), "stride\\[2\\]=4 is larger than kernel_size\\[2\\]=3"),
    ("kernel-zero", dict(k1=0), "kernel_size\\[1\\] must be >= 1"),
    ("dilation-zero", dict(d0=0), "dilation\\[0\\] must be >= 1"),
    ("stride-zero", dict(s2=0), "stride\\[2\\] must be >= 1"),
    ("causal-flag", dict(c1=2), "causal flag c1 must be 0 or 1"),
    ("extent-zero", dict(S1=0), "spatial extent S1 must be >= 1"),
    ("heads-zero", dict(H=0), "number of heads H"),
    ("head-dim-zero", dict(D=0), "head dimension D"),
    ("dtype-code", dict(dtype=7), "dtype"),
    ("rpb-null", dict(has_rpb=True), "rpb"),
]


@pytest.mark.parametrize("fn", ["forward", "backward"])
@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_sizes_raise_value_error(bad, fn):
    _, override, message = bad
    x = torch.zeros(1, 1, 1, 5, 1, 4)
    lse = torch.zeros(1, 1, 1, 5, 1)
    args = dict(B=1, S0=1, S1=1, S2=5, H=1, D=4, Dv=4, k0=1, k1=1, k2=3, s0=1, s1=1, s2=1, d0=1, d1=1, d2=1,
                c0=0, c1=0, c2=0, has_rpb=False, scale=0.5, dtype=0, n_threads=1)
    args.update(override)
    p = x.data_ptr()
    with pytest.raises(ValueError, match=message):
        if fn == "forward":
            _C.na_forward(q=p, k=p, v=p, out=torch.empty_like(x).data_ptr(), lse=lse.data_ptr(), rpb=0, **args)
        else:
            g = [torch.empty_like(x) for _ in range(3)]
            _C.na_backward(q=p, k=p, v=p, out=p, dout=p, lse=lse.data_ptr(), rpb=0, dq=g[0].data_ptr(),
                           dk=g[1].data_ptr(), dv=g[2].data_ptr(), drpb=0, **args)
