"""Property-based comparison of every task-attention backend with the reference (hypothesis).

Drawn, per example (`Problem`, printed in full by a falsifying example):

* shapes: batch 0..3, kv heads 1..2 with 1..3 query heads each (grouped-query attention),
  lengths 0..40 (odd ones, 0 and 1 included; sometimes 127..150, the C++ kernels' flash path,
  except on the Triton interpreter), cross attention (Lk != Lq, its own `kv_groups`) or self attention (`kv_groups` None),
  head dims D and Dv from 1 up (odd ones included; Dv may differ from D);
* memory layouts, per tensor: contiguous, transposed (`.transpose(1, 2).contiguous()
  .transpose(1, 2)`), expanded (a batch or head extent of 1, `expand`ed), and a storage offset
  with padded rows (a slice of a larger tensor whose other entries are NaN);
* dtype: float32, float16, bfloat16 (and float64 on the reference backend);
* group ids: one group, contiguous blocks, random ids, random ids with −1 padding, all padding;
  shared by the batch (`[L]`) or per batch row (`[B, L]`); 1 to 5 groups, sometimes 63 to 70
  (the 64-bit masks' edge); the rule `allow`: None (identity), all True, random, or random with a
  row of all False; `causal` on or off; `scale`: None or D**-0.5 times 0, 0.5, ±1, 1.5 or 4;
* for the non-finite properties, 1 to 3 sites holding NaN, +inf or −inf in q, k or v, each
  either at a position some row attends (a query row with an allowed key, a key allowed for some
  query) or at a position no row attends (a query row with no allowed key, a key no query may
  attend).

Asserted, each backend that can run the drawn call (a call the backend refuses, by its own
`can_run`, is rejected with `assume`; a backend that cannot run here at all skips with its reason):

* finite inputs: out and lse, then dq, dk and dv (for a random dout), match the reference within
  the tolerance table (the conventions of test_backends.py: lse in fp32 bounds for fp32 inputs);
* non-finite inputs: the same, against the reference run on the same non-finite inputs:
  NaN exactly where the reference has NaN, the same infinity where it has one
  (docs/design.md#non-finite-values);
* masked pairs take no part (the definition, on every backend, the reference included): with
  non-finite values at drawn sites, every output row that no non-finite value may reach (its
  query is finite or attends nothing, every key it may attend is finite) has the out, lse and dq
  of the reference on the inputs without the non-finite values, and so do dk and dv of every key
  that only such rows attend (zero for a key no row attends).

`PYOPS_FUZZ_EXAMPLES` raises the example counts (tests/_support.py `fuzz_settings`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import pytest
import torch
from hypothesis import assume, given, note, strategies as st

import pyops
from _support import assert_close, fuzz, fuzz_settings, interpreted, layout_base_shape, realize_layout
from pyops.task_attention import ops as ta
from pyops.task_attention.reference import allowed_mask
from pyops.testing import tolerance_for
from .cases import BF16, FP16, FP32, FP64, KERNEL_BACKENDS, device_for, require_backend

# Default example counts per backend (Triton runs under its slow CPU interpreter here).
EXAMPLES = {"reference": 25, "cpu": 25, "triton": 5}

LAYOUTS = ("contiguous", "transposed", "expanded", "offset")
ID_KINDS = ("one", "blocks", "random", "padded", "all-padding")
RULES = ("identity", "all", "random", "empty-row")
NONFINITE = (float("nan"), float("inf"), float("-inf"))
HEAD_DIMS = (1, 2, 3, 4, 5, 8, 13, 16, 24, 32, 33, 48, 64)
HEAD_DIMS_INTERPRETED = (1, 3, 4, 8, 13, 16)
NAMES = ("q", "k", "v")


@dataclass(frozen=True)
class Problem:
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    dtype: torch.dtype
    q_ids: str
    kv_ids: Optional[str]          # None: self attention, kv_groups not passed
    per_batch: bool                # ids [B, L] instead of [L]
    G: int
    rule: str
    causal: bool
    scale: Optional[float]
    layouts: Tuple[str, str, str]  # q, k, v
    seed: int
    # (tensor, "attended" | "unattended", value, position draw, feature draw)
    sites: Tuple[Tuple[str, str, float, int, int], ...] = field(default=())


@st.composite
def problems(draw, backend: str, nonfinite: bool = False) -> Problem:
    small = interpreted(backend)
    dtypes = (FP32, FP16, BF16, FP64) if backend == "reference" else (FP32, FP16, BF16)
    B = draw(st.integers(0, 2 if small else 3))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 2 if small else 3))

    def length() -> int:
        if not small and draw(st.integers(0, 7)) == 7:
            return draw(st.sampled_from((127, 129, 150)))   # the C++ flash path (above 128)
        return draw(st.integers(0, 40))

    Lq = length()
    cross = draw(st.booleans())
    Lk = length() if cross else Lq
    dims = HEAD_DIMS_INTERPRETED if small else HEAD_DIMS
    D = draw(st.sampled_from(dims))
    Dv = D if draw(st.booleans()) else draw(st.sampled_from(dims))
    dtype = draw(st.sampled_from(dtypes))
    q_ids = draw(st.sampled_from(ID_KINDS))
    kv_ids = draw(st.sampled_from(ID_KINDS)) if cross else None
    per_batch = draw(st.booleans())
    G = draw(st.sampled_from((63, 64, 65, 70))) if draw(st.integers(0, 7)) == 7 else draw(st.integers(1, 5))
    rule = draw(st.sampled_from(RULES))
    causal = draw(st.booleans())
    mult = draw(st.sampled_from((None, 1.0, 0.0, 0.5, -1.0, 1.5, 4.0)))
    scale = None if mult is None else mult * D ** -0.5
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in NAMES)
    seed = draw(st.integers(0, 2**31 - 1))
    sites = ()
    if nonfinite:
        site = st.tuples(st.sampled_from(NAMES), st.sampled_from(("attended", "unattended")),
                         st.sampled_from(NONFINITE), st.integers(0, 2**16), st.integers(0, 2**10))
        sites = tuple(draw(st.lists(site, min_size=1, max_size=3)))
    return Problem(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, q_ids, kv_ids, per_batch, G, rule, causal, scale, layouts,
                   seed, sites)


# --------------------------------------------------------------------------------------------
# Building a drawn problem
# --------------------------------------------------------------------------------------------

def _ids(kind: str, shape, G: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "one":
        return torch.zeros(shape, dtype=torch.int64)
    if kind == "all-padding":
        return torch.full(shape, -1, dtype=torch.int64)
    ids = torch.randint(-1 if kind == "padded" else 0, G, shape, generator=gen)
    if kind == "blocks":
        ids = ids.sort(dim=-1).values
    if kind == "padded" and ids.numel():
        ids.view(-1)[int(torch.randint(ids.numel(), (1,), generator=gen))] = -1
    return ids


def _allow(rule: str, G: int, gen: torch.Generator) -> Optional[torch.Tensor]:
    if rule == "identity":
        return None
    if rule == "all":
        return torch.ones(G, G, dtype=torch.bool)
    allow = torch.rand(G, G, generator=gen) < 0.5
    if rule == "empty-row":
        allow[int(torch.randint(G, (1,), generator=gen))] = False
    return allow


class Built:
    """The drawn problem's tensors: base values (fp32, CPU), ids, rule, dout, and the poison."""

    def __init__(self, p: Problem):
        gen = torch.Generator().manual_seed(p.seed)
        self.p = p
        self.shapes = {"q": (p.B, p.Hq, p.Lq, p.D), "k": (p.B, p.Hkv, p.Lk, p.D), "v": (p.B, p.Hkv, p.Lk, p.Dv)}
        self.base: Dict[str, torch.Tensor] = {}
        self.layout: Dict[str, str] = {}
        for name, lay in zip(NAMES, p.layouts):
            shape, self.layout[name] = layout_base_shape(self.shapes[name], lay, (0, 1))
            self.base[name] = torch.randn(shape, generator=gen)
        G = p.G
        self.allow = _allow(p.rule, G, gen)
        qshape = (p.B, p.Lq) if p.per_batch else (p.Lq,)
        self.q_groups = _ids(p.q_ids, qshape, G, gen)
        self.kv_groups = None
        if p.kv_ids is not None:
            self.kv_groups = _ids(p.kv_ids, (p.B, p.Lk) if p.per_batch else (p.Lk,), G, gen)
        self.dout = torch.randn(p.B, p.Hq, p.Lq, p.Dv, generator=gen)
        # Bool [B, Lq, Lk]: the pairs the rule allows.
        self.mask = allowed_mask(self.q_groups, self.kv_groups, self.allow, p.B, p.causal)
        self.poison = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in self.base.items()}

    def attended(self, name: str) -> torch.Tensor:
        """Bool over the base tensor's positions (without the feature dim): True where some
        (query, key) pair the rule allows reads it."""
        if name == "q":
            live = self.mask.any(-1)[:, None, :].expand(self.p.B, self.p.Hq, self.p.Lq)
        else:
            live = self.mask.any(-2)[:, None, :].expand(self.p.B, self.p.Hkv, self.p.Lk)
        base = self.base[name].shape[:-1]
        for d in (0, 1):
            if base[d] == 1 and live.shape[d] != 1:
                live = live.any(d, keepdim=True)
        return live

    def add_sites(self) -> None:
        """Writes the drawn non-finite values into the base values (and records where)."""
        for name, where, value, pos, feat in self.p.sites:
            t = self.base[name]
            if t.numel() == 0:
                continue
            live = self.attended(name)
            cand = (live if where == "attended" else ~live).nonzero()
            if cand.shape[0] == 0:
                cand = torch.ones_like(live).nonzero()
            idx = (*cand[pos % cand.shape[0]].tolist(), feat % t.shape[-1])
            if bool(self.poison[name][idx]):
                continue  # one value per position: the first site drawn there
            t[idx] = value
            self.poison[name][idx] = True
            note(f"{name}{list(idx)} = {value} ({where})")

    def tensors(self, dtype, device, clean: bool = False):
        out = []
        for name in NAMES:
            vals = self.base[name]
            if clean:
                vals = vals.masked_fill(self.poison[name], 0.5)
            out.append(realize_layout(vals, self.shapes[name], self.layout[name], (1, 2), dtype, device))
        return out

    def extras(self, device):
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return mv(self.q_groups), mv(self.kv_groups), mv(self.allow)


def refusal(backend: str, b: Built, q, k, v, device) -> Optional[str]:
    """The library's own answer to "can `backend` run this call?" (None: it can)."""
    qg, kg, allow = b.extras(device)
    prep = ta.prepare(q, k, v, qg, kg, allow, b.p.causal, 0.0, b.p.scale, None)
    return ta._can_run(prep)[backend]()


def run(backend: str, b: Built, tensors, device, grads: bool = True) -> Dict[str, torch.Tensor]:
    """out and lse, and with `grads` dq, dk, dv for the drawn dout (the leaves keep the drawn
    strides)."""
    leaves = [t.detach().requires_grad_(grads) for t in tensors]
    qg, kg, allow = b.extras(device)
    out, lse = pyops.task_masked_attention(*leaves, qg, kg, allow, causal=b.p.causal, scale=b.p.scale,
                                           return_lse=True, backend=backend)
    if not grads:
        return {"out": out, "lse": lse}
    assert out.requires_grad, f"backend '{backend}': out does not require grad (inputs do)"
    dout = b.dout.to(dtype=out.dtype, device=device)
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True, materialize_grads=True)
    return {"out": out.detach(), "lse": lse.detach(), **dict(zip(("dq", "dk", "dv"), grads))}


def tolerances(dtype):
    """test_backends.py's conventions: every tensor in its dtype's bounds, lse (fp32) in the fp32
    bounds for fp32 inputs and in the input dtype's otherwise."""
    tol = tolerance_for(dtype)
    return tol, (tolerance_for(FP32) if dtype == FP32 else tol)


def check(got, exp, dtype, names) -> None:
    tol, lse_tol = tolerances(dtype)
    for name in names:
        assert_close(got[name].cpu(), exp[name].cpu(), lse_tol if name == "lse" else tol, name)


def against_reference(backend: str, p: Problem, names, nonfinite: bool) -> None:
    dev = device_for(backend)
    b = Built(p)
    if nonfinite:
        b.add_sites()
    tensors = b.tensors(p.dtype, dev)
    reason = refusal(backend, b, *tensors, dev)
    if reason is not None:
        note(f"'{backend}' refuses: {reason}")
    assume(reason is None)
    grads = any(n.startswith("d") for n in names)
    check(run(backend, b, tensors, dev, grads), run("reference", b, tensors, dev, grads), p.dtype, names)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

FORWARD = ("out", "lse")
GRADIENTS = ("dq", "dk", "dv")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("values", ["finite", "nonfinite"])
@pytest.mark.parametrize("part", ["forward", "gradients"])
def test_matches_reference(backend, part, values):
    """Forward (out, lse) or the gradients (dq, dk, dv) of the backend against the reference on
    drawn problems, with finite values or with NaN / ±inf written at drawn sites."""
    require_backend(backend)
    names, nonfinite = (FORWARD if part == "forward" else GRADIENTS), values == "nonfinite"
    fuzz(EXAMPLES[backend], lambda p: against_reference(backend, p, names, nonfinite=nonfinite),
         p=problems(backend, nonfinite=nonfinite))


@pytest.mark.parametrize("backend", ("reference",) + KERNEL_BACKENDS)
def test_masked_pairs_take_no_part(backend):
    if backend != "reference":
        require_backend(backend)

    @fuzz_settings(EXAMPLES[backend])
    @given(p=problems(backend, nonfinite=True))
    def prop(p):
        dev = device_for(backend)
        b = Built(p)
        b.add_sites()
        tensors = b.tensors(p.dtype, dev)
        reason = refusal(backend, b, *tensors, dev)
        assume(reason is None)
        got = run(backend, b, tensors, dev)
        exp = run("reference", b, b.tensors(p.dtype, dev, clean=True), dev)

        # Rows a non-finite value may reach: a poisoned query row with an allowed key, or a row
        # that may attend a poisoned key (of its kv head).
        M = b.mask                                                    # [B, Lq, Lk]
        rep = p.Hq // p.Hkv
        qpois = b.poison["q"].any(-1).expand(p.B, p.Hq, p.Lq)
        kvpois = (b.poison["k"].any(-1) | b.poison["v"].any(-1)).expand(p.B, p.Hkv, p.Lk)
        kvpois = kvpois.repeat_interleave(rep, dim=1)                 # [B, Hq, Lk]
        tainted = (qpois & M.any(-1)[:, None]) | (M[:, None] & kvpois[:, :, None, :]).any(-1)   # [B, Hq, Lq]
        reached = (M[:, None] & tainted[..., None]).any(2)                                     # [B, Hq, Lk]
        clean_keys = ~reached.view(p.B, p.Hkv, rep, p.Lk).any(2)                               # [B, Hkv, Lk]
        note(f"untainted rows: {int((~tainted).sum())} of {tainted.numel()}, "
             f"clean keys: {int(clean_keys.sum())} of {clean_keys.numel()}")

        tol, lse_tol = tolerances(p.dtype)
        rows = ~tainted
        assert_close(got["out"].cpu()[rows], exp["out"].cpu()[rows], tol, "out (untainted rows)")
        assert_close(got["lse"].cpu()[rows], exp["lse"].cpu()[rows], lse_tol, "lse (untainted rows)")
        assert_close(got["dq"].cpu()[rows], exp["dq"].cpu()[rows], tol, "dq (untainted rows)")
        for name in ("dk", "dv"):
            assert_close(got[name].cpu()[clean_keys], exp[name].cpu()[clean_keys], tol,
                         f"{name} (keys only untainted rows attend)")

    prop()
