"""The native CPU kernels (`pyops._C.task_attention_forward` / `_backward`) called directly.

The oracle here is a dense fp64 formulation written in this file (not
`pyops.task_attention.reference`): scores for every (i, j), the group rule as a boolean
[B, Lq, Lk] mask, softmax, and torch autograd for the gradients. Shapes cover both native paths
— the whole-block path for short sequences (Lq, Lk <= `task_attention_short_max()`; query-lane
kernels for head dims <= 32, row kernels above) and the flash tiles beyond — with odd sizes,
length 1, GQA, Dv != D, causal, padding, per-batch groups and dropout (mask rebuilt with the
Philox reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

from pyops import _native
from pyops._philox import philox4x32_10, uniform_from_word
from pyops.testing import compare, tolerance_for

C = _native.cpu_module
pytestmark = pytest.mark.skipif(C is None or not hasattr(C, "task_attention_forward"),
                                reason=_native.cpu_missing_reason or "pyops._C has no task_attention kernels")

SHORT = C.task_attention_short_max() if C is not None and hasattr(C, "task_attention_short_max") else 128


@dataclass(frozen=True)
class Shape:
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    G: int = 3

    def __str__(self) -> str:
        return f"B{self.B}-H{self.Hq}/{self.Hkv}-L{self.Lq}x{self.Lk}-D{self.D}-Dv{self.Dv}-G{self.G}"


SHAPES = [
    Shape(2, 4, 4, 29, 29, 4, 4, 7),       # MultiTab-like, short path
    Shape(1, 1, 1, 1, 1, 3, 5),            # length 1
    Shape(3, 6, 2, 17, 23, 5, 11),         # GQA, Lq != Lk, Dv != D
    Shape(1, 2, 1, 130, 70, 7, 33, 5),     # flash tiles (Lq > short max), GQA
    Shape(1, 2, 2, 200, 150, 24, 16),      # flash tiles, D >= 16 (row-major kernels)
    Shape(2, 4, 2, 33, 45, 40, 36),        # short sequences, head dims past the lane kernels
    Shape(3, 2, 2, 20, 19, 8, 8),          # lane kernels compiled for D = Dv = 8
    Shape(2, 2, 1, 24, 31, 16, 16),        # ... and for D = Dv = 16
    Shape(2, 6, 2, 100, 70, 4, 4, 5),      # key-lane backward (AVX-512): GQA, three sweeps of 2 x 16 keys
    Shape(2, 4, 2, 45, 37, 8, 8),          # ... D = 8: one key vector per sweep, a partial last one
]
IDS = [str(s) for s in SHAPES]


# ---- the oracle -------------------------------------------------------------------------------

def dense_mask(qg, kg, allow, B, Lq, Lk, causal):
    qg = qg.long().expand(B, Lq)
    kg = kg.long().expand(B, Lk)
    ok = (qg[:, :, None] >= 0) & (kg[:, None, :] >= 0)
    ok &= allow[qg.clamp(min=0)[:, :, None], kg.clamp(min=0)[:, None, :]]
    if causal:
        ok &= torch.arange(Lk)[None, None, :] <= torch.arange(Lq)[None, :, None]
    return ok  # [B, Lq, Lk]


def philox_keep(B, Hq, Lq, Lk, p, seed):
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(Hq).view(1, Hq, 1, 1)
    i = torch.arange(Lq).view(1, 1, Lq, 1)
    j = torch.arange(Lk).view(1, 1, 1, Lk)
    word = philox4x32_10(j, i, b * Hq + h, 0x5441534B, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)[0]
    return uniform_from_word(word) >= p


def dense_attention(q, k, v, ok, scale, p=0.0, seed=0):
    """fp64 softmax attention with a boolean mask [B, Lq, Lk]; rows with no allowed key give zeros."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, 1)
    v = v.repeat_interleave(Hq // Hkv, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~ok[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    prob = torch.exp(s - lse[..., None].clamp(min=-1e300))
    prob = torch.where(ok[:, None], prob, torch.zeros((), dtype=prob.dtype))
    if p > 0:
        keep = philox_keep(q.shape[0], Hq, q.shape[2], k.shape[2], p, seed)
        prob = prob * keep / (1 - p)
    return prob @ v, lse


# ---- calling the kernels ----------------------------------------------------------------------

@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qg: torch.Tensor
    kg: torch.Tensor
    allow: torch.Tensor
    causal: bool = False
    p: float = 0.0
    seed: int = 0
    scale: Optional[float] = None

    @property
    def dims(self):
        B, Hq, Lq, D = self.q.shape
        return B, Hq, self.k.shape[1], Lq, self.k.shape[2], D, self.v.shape[3], self.allow.shape[0]

    def bstrides(self):
        return (self.qg.shape[-1] if self.qg.dim() == 2 else 0, self.kg.shape[-1] if self.kg.dim() == 2 else 0)

    def the_scale(self):
        return self.scale if self.scale is not None else self.q.shape[-1] ** -0.5

    def forward(self, n_threads=2) -> Tuple[torch.Tensor, torch.Tensor]:
        B, Hq, Hkv, Lq, Lk, D, Dv, G = self.dims
        out = torch.full((B, Hq, Lq, Dv), float("nan"), dtype=self.q.dtype)
        lse = torch.full((B, Hq, Lq), float("nan"))
        allow = self.allow.to(torch.uint8).contiguous()
        C.task_attention_forward(
            q=self.q.data_ptr(), k=self.k.data_ptr(), v=self.v.data_ptr(), out=out.data_ptr(),
            lse=lse.data_ptr(), q_groups=self.qg.data_ptr(), kv_groups=self.kg.data_ptr(),
            allow=allow.data_ptr(), B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, G=G,
            q_groups_bstride=self.bstrides()[0], kv_groups_bstride=self.bstrides()[1],
            causal=self.causal, scale=self.the_scale(), dropout_p=self.p, seed=self.seed,
            dtype=_native.dtype_code(self.q.dtype), n_threads=n_threads)
        return out, lse

    def backward(self, out, lse, dout, n_threads=2):
        B, Hq, Hkv, Lq, Lk, D, Dv, G = self.dims
        dq = torch.full_like(self.q, float("nan"))
        dk = torch.full_like(self.k, float("nan"))
        dv = torch.full_like(self.v, float("nan"))
        allow = self.allow.to(torch.uint8).contiguous()
        C.task_attention_backward(
            q=self.q.data_ptr(), k=self.k.data_ptr(), v=self.v.data_ptr(), out=out.data_ptr(),
            dout=dout.data_ptr(), lse=lse.data_ptr(), dq=dq.data_ptr(), dk=dk.data_ptr(), dv=dv.data_ptr(),
            q_groups=self.qg.data_ptr(), kv_groups=self.kg.data_ptr(), allow=allow.data_ptr(),
            B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, G=G,
            q_groups_bstride=self.bstrides()[0], kv_groups_bstride=self.bstrides()[1],
            causal=self.causal, scale=self.the_scale(), dropout_p=self.p, seed=self.seed,
            dtype=_native.dtype_code(self.q.dtype), n_threads=n_threads)
        return dq, dk, dv

    def oracle(self, dout):
        B, Hq, Hkv, Lq, Lk, D, Dv, G = self.dims
        ok = dense_mask(self.qg, self.kg, self.allow, B, Lq, Lk, self.causal)
        q, k, v = (t.detach().double().requires_grad_() for t in (self.q, self.k, self.v))
        out, lse = dense_attention(q, k, v, ok, self.the_scale(), self.p, self.seed)
        out.backward(dout.double())
        return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def make_case(shape: Shape, rng, dtype=torch.float32, batched=False, padding=True, density=0.5, **kw) -> Case:
    B, Hq, Hkv, Lq, Lk, D, Dv, G = (shape.B, shape.Hq, shape.Hkv, shape.Lq, shape.Lk, shape.D, shape.Dv, shape.G)
    q = torch.randn(B, Hq, Lq, D, generator=rng).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=rng).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=rng).to(dtype)
    lo = -1 if padding else 0
    qg = torch.randint(lo, G, (B, Lq) if batched else (Lq,), generator=rng, dtype=torch.int32)
    kg = torch.randint(lo, G, (B, Lk) if batched else (Lk,), generator=rng, dtype=torch.int32)
    allow = (torch.rand(G, G, generator=rng) < density) | torch.eye(G, dtype=torch.bool)
    return Case(q, k, v, qg, kg, allow, **kw)


def assert_close(actual, expected, dtype, what):
    res = compare(actual, expected, tolerance_for(dtype))
    assert res.ok, f"{what}: {res}"


def check_against_oracle(case: Case, rng, n_threads=2):
    dtype = case.q.dtype
    out, lse = case.forward(n_threads)
    dout = torch.randn(out.shape, generator=rng).to(dtype)
    r_out, r_lse, r_dq, r_dk, r_dv = case.oracle(dout)
    assert_close(out, r_out, dtype, "out")
    assert_close(lse, r_lse, torch.float32, "lse")
    dq, dk, dv = case.backward(out, lse, dout, n_threads)
    assert_close(dq, r_dq, dtype, "dq")
    assert_close(dk, r_dk, dtype, "dk")
    assert_close(dv, r_dv, dtype, "dv")
    return out, lse, dq, dk, dv


@pytest.fixture(params=["auto", "base"])
def isa(request):
    """Both builds of the kernels: the AVX2 one (where the CPU has it) and the portable one."""
    C.set_isa(request.param)
    yield C.active_isa()
    C.set_isa("auto")


# ---- forward and backward against the oracle ---------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_matches_dense_fp32(shape, rng, isa):
    check_against_oracle(make_case(shape, rng), rng)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[5]], ids=[IDS[0], IDS[2], IDS[3], IDS[5]])
def test_matches_dense_low_precision(shape, dtype, rng, isa):
    check_against_oracle(make_case(shape, rng, dtype=dtype), rng)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4]], ids=[IDS[0], IDS[2], IDS[4]])
def test_causal(shape, rng):
    check_against_oracle(make_case(shape, rng, causal=True), rng)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=[IDS[2], IDS[3]])
def test_per_batch_groups(shape, rng):
    check_against_oracle(make_case(shape, rng, batched=True, causal=True), rng)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[5]], ids=[IDS[0], IDS[2], IDS[3], IDS[5]])
def test_dropout_matches_philox_mask(shape, rng, isa):
    seed = (0x9E3779B97F4A7C15 * 3) & 0xFFFFFFFFFFFFFFFF  # both 32-bit halves non-zero
    check_against_oracle(make_case(shape, rng, p=0.3, seed=seed), rng)


def test_dropout_accepts_a_negative_int64_seed_as_its_bits(rng):
    """The Python side may draw the seed as a signed int64: the kernel uses its 64 bits."""
    case = make_case(SHAPES[2], rng, p=0.25, seed=-12345)
    out, _ = case.forward()
    bits = case.seed & 0xFFFFFFFFFFFFFFFF
    ref = Case(case.q, case.k, case.v, case.qg, case.kg, case.allow, p=0.25, seed=bits).forward()[0]
    assert torch.equal(out, ref)
    check_against_oracle(Case(case.q, case.k, case.v, case.qg, case.kg, case.allow, p=0.25, seed=bits), rng)


@pytest.mark.parametrize("batched", [False, True], ids=["shared-groups", "per-batch-groups"])
@pytest.mark.parametrize("shape", [Shape(17, 4, 2, 13, 11, 4, 4), Shape(17, 2, 1, 9, 12, 40, 36)],
                         ids=["B17-lanes", "B17-rows"])
def test_large_batch_runs_one_item_per_batch_row(shape, batched, rng):
    """With many batch rows the short path gives each work item a whole batch row (all heads),
    reusing the mask built for that row; per-batch groups must rebuild it for every row."""
    check_against_oracle(make_case(shape, rng, batched=batched, causal=True), rng)
    case = make_case(shape, rng, batched=batched, p=0.2, seed=5)
    out1, lse1 = case.forward(n_threads=1)
    out2, lse2 = case.forward(n_threads=2)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


@pytest.mark.parametrize("density", [0.0, 1.0], ids=["identity-rule", "all-allowed"])
@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[4]], ids=[IDS[3], IDS[4]])
def test_tile_skipping_extremes(shape, density, rng):
    """Rules that make many flash tiles skipped (identity with sorted groups) or full (all allowed)."""
    case = make_case(shape, rng, padding=False, density=density)
    case.qg = torch.sort(case.qg).values
    case.kg = torch.sort(case.kg).values
    check_against_oracle(case, rng)


# ---- padding and empty rows ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[5]], ids=[IDS[0], IDS[3], IDS[5]])
def test_padding_rows_give_zeros_and_minus_inf_lse(shape, rng):
    case = make_case(shape, rng, padding=False)
    case.qg = case.qg.clone()
    case.qg[::3] = -1           # padding queries
    case.kg = case.kg.clone()
    case.kg[1::4] = -1          # padding keys
    out, lse, dq, dk, dv = check_against_oracle(case, rng)
    pad_q = case.qg == -1
    assert torch.all(out[:, :, pad_q] == 0)
    assert torch.all(lse[:, :, pad_q] == float("-inf"))
    assert torch.all(dq[:, :, pad_q] == 0)
    pad_k = case.kg == -1
    assert torch.all(dk[:, :, pad_k] == 0) and torch.all(dv[:, :, pad_k] == 0)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=[IDS[2], IDS[3]])
def test_row_without_allowed_key_is_zero_not_nan(shape, rng):
    """Group 0 may attend nothing: its rows output zeros, lse -inf, and get zero gradient."""
    case = make_case(shape, rng, padding=False)
    allow = case.allow.clone()
    allow[0, :] = False
    case.allow = allow
    case.qg = case.qg.clone()
    case.qg[0] = 0
    out, lse, dq, _, _ = check_against_oracle(case, rng)
    rows = case.qg == 0
    assert torch.all(out[:, :, rows] == 0) and torch.all(lse[:, :, rows] == float("-inf"))
    assert torch.all(dq[:, :, rows] == 0)


@pytest.mark.parametrize("Lq,Lk", [(5, 0), (0, 7), (300, 0)], ids=["Lk0", "Lq0", "Lq300-Lk0"])
def test_empty_sequences(Lq, Lk, rng):
    case = make_case(Shape(2, 2, 1, Lq, Lk, 4, 3), rng)
    out, lse = case.forward()
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    dout = torch.randn(out.shape, generator=rng)
    dq, dk, dv = case.backward(out, lse, dout)
    assert torch.all(dq == 0) and torch.all(dk == 0) and torch.all(dv == 0)


@pytest.mark.parametrize("D", [8, 40], ids=["lanes", "rows"])
def test_short_and_flash_paths_agree(D, rng):
    """The same problem at Lq = short max (whole block) and with one query more (flash tiles): the
    shared rows agree within fp32 tolerance."""
    n = SHORT
    case = make_case(Shape(1, 2, 1, n + 1, n, D, D, 4), rng, causal=True)
    short = Case(case.q[:, :, :n].contiguous(), case.k, case.v, case.qg[:n].contiguous(), case.kg,
                 case.allow, causal=True)
    out_long, lse_long = case.forward()
    out_short, lse_short = short.forward()
    assert_close(out_short, out_long[:, :, :n], torch.float32, "out")
    assert_close(lse_short, lse_long[:, :, :n], torch.float32, "lse")


# ---- determinism -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[5]], ids=[IDS[0], IDS[2], IDS[3], IDS[5]])
def test_bit_identical_for_any_thread_count(shape, rng, isa):
    case = make_case(shape, rng, p=0.2, seed=77, batched=True)
    out1, lse1 = case.forward(n_threads=1)
    out2, lse2 = case.forward(n_threads=2)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    dout = torch.randn(out1.shape, generator=rng)
    g1 = case.backward(out1, lse1, dout, n_threads=1)
    g2 = case.backward(out1, lse1, dout, n_threads=2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("which,bad", [("q_groups", "G"), ("q_groups", -2), ("kv_groups", "G+4"), ("kv_groups", -5)])
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=[IDS[2], IDS[3]])
def test_group_id_out_of_range_is_a_value_error(shape, which, bad, rng):
    if isinstance(bad, str):
        bad = shape.G + (4 if bad == "G+4" else 0)
    case = make_case(shape, rng)
    g = getattr(case, "qg" if which == "q_groups" else "kg").clone()
    g[-1] = bad
    setattr(case, "qg" if which == "q_groups" else "kg", g)
    with pytest.raises(ValueError, match=rf"{which}.*{bad}"):
        case.forward()
    out = torch.zeros(case.q.shape[:3] + (case.v.shape[3],))
    with pytest.raises(ValueError, match=rf"{which}.*{bad}"):
        case.backward(out, torch.zeros(out.shape[:3]), out)


def test_too_many_groups_is_refused(rng):
    assert C.task_attention_max_groups() == 64
    case = make_case(Shape(1, 1, 1, 4, 4, 2, 2, G=65), rng)
    with pytest.raises(ValueError, match="at most 64 groups"):
        case.forward()


def test_sixty_four_groups_work(rng):
    case = make_case(Shape(1, 2, 1, 150, 90, 4, 4, G=64), rng, density=0.2)
    check_against_oracle(case, rng)


@pytest.mark.parametrize("field,value,match", [
    ("Hkv", 3, "multiple"), ("dropout_p", 1.0, "dropout_p"), ("q_groups_bstride", 5, "q_groups_bstride"),
    ("dtype", 7, "dtype"),
])
def test_bad_sizes_are_value_errors(field, value, match, rng):
    case = make_case(Shape(1, 4, 2, 6, 6, 2, 2), rng)
    out, lse = torch.empty(1, 4, 6, 2), torch.empty(1, 4, 6)
    allow = case.allow.to(torch.uint8)
    kw = dict(q=case.q.data_ptr(), k=case.k.data_ptr(), v=case.v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
              q_groups=case.qg.data_ptr(), kv_groups=case.kg.data_ptr(), allow=allow.data_ptr(), B=1, Hq=4, Hkv=2,
              Lq=6, Lk=6, D=2, Dv=2, G=3, q_groups_bstride=0, kv_groups_bstride=0, causal=False, scale=1.0,
              dropout_p=0.0, seed=0, dtype=0, n_threads=1)
    kw[field] = value
    with pytest.raises(ValueError, match=match):
        C.task_attention_forward(**kw)
