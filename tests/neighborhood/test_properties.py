"""Property-based comparison of every neighbourhood-attention backend with the reference (hypothesis).

Drawn, per example (`Problem`, printed in full by a falsifying example):

* the op: na1d, na2d or na3d; per spatial dimension a kernel size (>= 2), a dilation, an extent
  from kernel·dilation up (odd extents and extents that the dilation does not divide included), a
  stride from 1 to the kernel size and a causal flag; with odd kernels and no causal dimension,
  sometimes a relative positional bias `rpb` (in q's dtype or float32);
* batch 0..2, heads 1..3, head dims D and Dv from 1 up (odd ones included, Dv may differ);
  Triton, interpreted on the CPU here, draws smaller problems;
* memory layouts, per tensor (q, k, v, rpb): contiguous, transposed (a spatial dim swapped with
  the heads: `.transpose(1, -2).contiguous().transpose(1, -2)`), expanded (the batch, a spatial or
  the head extent drawn as 1 and `expand`ed), and a storage offset with padded rows (a slice of a
  larger tensor whose other entries are NaN);
* dtype: float32, float16, bfloat16 (and float64 on the reference backend); `scale`: None or D**-0.5
  times 0, 0.5, ±1, 1.5 or 4;
* for the non-finite properties, 1 to 3 sites holding NaN, +inf or −inf in q, k, v or rpb, either
  at a position some window reads or at one none reads (rpb entries no window uses; for q, k and
  v every position is read by some window, so such a site lands anywhere).

Asserted, each backend that can run the drawn call (a call the backend refuses, by its own
`can_run`, is rejected with `assume`; a backend that cannot run here at all skips with its reason):

* finite inputs: out and lse, then dq, dk, dv and drpb (for a random dout), match the reference
  within the tolerance table (the conventions of test_backends.py: every tensor in the input
  dtype's bounds);
* non-finite inputs: the same, against the reference run on the same non-finite inputs:
  NaN exactly where the reference has NaN, the same infinity where it has one
  (docs/design.md#non-finite-values);
* keys outside the window take no part (the definition, on every backend, the reference
  included): with non-finite values at drawn sites, every query row that no non-finite value may
  reach (its q is finite, every key in its window and every rpb entry it reads are finite) has
  the out, lse and dq of the reference on the inputs without the non-finite values, and so do dk
  and dv of every key read only by such rows, and drpb of every entry only such rows read.

`PYOPS_FUZZ_EXAMPLES` raises the example counts (tests/_support.py `fuzz_settings`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import pytest
import torch
from hypothesis import assume, given, note, strategies as st

from _support import assert_close, fuzz, fuzz_settings, layout_base_shape, realize_layout
from pyops.neighborhood import ops as ops_na
from pyops.neighborhood.reference import _flat_windows
from pyops.testing import tolerance_for
from .cases import FNS, device_for, interpreted, require_backend

FP32, FP16, BF16, FP64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
KERNEL_BACKENDS = ("cpu", "triton")
# Default example counts per backend (Triton runs under its slow CPU interpreter here).
EXAMPLES = {"reference": 25, "cpu": 25, "triton": 5}

LAYOUTS = ("contiguous", "transposed", "expanded", "offset")
NONFINITE = (float("nan"), float("inf"), float("-inf"))
HEAD_DIMS = (1, 2, 3, 4, 5, 8, 13, 16, 32, 33)
HEAD_DIMS_INTERPRETED = (1, 3, 4, 8, 13)
NAMES = ("q", "k", "v", "rpb")


@dataclass(frozen=True)
class Problem:
    n: int
    spatial: Tuple[int, ...]
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    causal: Tuple[bool, ...]
    rpb: Optional[torch.dtype]     # the bias's dtype, None: no bias
    B: int
    H: int
    D: int
    Dv: int
    dtype: torch.dtype
    scale: Optional[float]
    layouts: Tuple[str, str, str, str]  # q, k, v, rpb
    seed: int
    # (tensor, "attended" | "unattended", value, position draw, feature draw)
    sites: Tuple[Tuple[str, str, float, int, int], ...] = field(default=())


@st.composite
def problems(draw, backend: str, nonfinite: bool = False) -> Problem:
    small = interpreted(backend)
    dtypes = (FP32, FP16, BF16, FP64) if backend == "reference" else (FP32, FP16, BF16)
    n = draw(st.sampled_from((1, 1, 2, 3)) if small else st.integers(1, 3))
    with_rpb = False if small and n == 3 else draw(st.booleans())   # 3D rpb: kernels >= 3, slow interpreted
    # Per dimension: (largest kernel, largest dilation, largest extent beyond kernel·dilation).
    if small:
        limits = {1: (5, 2, 6), 2: (3, 2, 1), 3: (2, 1, 1)}[n]
    else:
        limits = {1: (7, 3, 8), 2: (4, 2, 4), 3: (3, 2, 2)}[n]
    kmax, dmax, emax = limits
    kernel, stride, dilation, causal, spatial = [], [], [], [], []
    for dim in range(n):
        k = draw(st.sampled_from([x for x in range(3, max(kmax, 3) + 1, 2)]) if with_rpb else st.integers(2, kmax))
        d = draw(st.integers(1, dmax if k * dmax <= 2 * kmax else 1))
        kernel.append(k)
        dilation.append(d)
        spatial.append(k * d + draw(st.integers(0, emax)))
        stride.append(draw(st.integers(1, k)))
        causal.append(False if with_rpb else draw(st.booleans()))
    B = draw(st.integers(0, 1 if small and n > 1 else 2))
    H = draw(st.integers(1, 1 if small and n > 1 else (2 if small else 3)))
    dims = HEAD_DIMS_INTERPRETED if small else HEAD_DIMS
    D = draw(st.sampled_from(dims))
    Dv = D if draw(st.booleans()) else draw(st.sampled_from(dims))
    dtype = draw(st.sampled_from(dtypes))
    rpb = draw(st.sampled_from((dtype, FP32))) if with_rpb else None
    mult = draw(st.sampled_from((None, 1.0, 0.0, 0.5, -1.0, 1.5, 4.0)))
    scale = None if mult is None else mult * D ** -0.5
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in NAMES)
    seed = draw(st.integers(0, 2**31 - 1))
    sites = ()
    if nonfinite:
        names = NAMES if with_rpb else NAMES[:3]
        site = st.tuples(st.sampled_from(names), st.sampled_from(("attended", "unattended")),
                         st.sampled_from(NONFINITE), st.integers(0, 2**16), st.integers(0, 2**10))
        sites = tuple(draw(st.lists(site, min_size=1, max_size=3)))
    return Problem(n, tuple(spatial), tuple(kernel), tuple(stride), tuple(dilation), tuple(causal), rpb, B, H, D,
                   Dv, dtype, scale, layouts, seed, sites)


# --------------------------------------------------------------------------------------------
# Building a drawn problem
# --------------------------------------------------------------------------------------------

class Built:
    """The drawn problem's tensors: base values (fp32, CPU), dout, the window rule, the poison."""

    def __init__(self, p: Problem):
        gen = torch.Generator().manual_seed(p.seed)
        self.p = p
        n = p.n
        self.shapes = {"q": (p.B, *p.spatial, p.H, p.D), "k": (p.B, *p.spatial, p.H, p.D),
                       "v": (p.B, *p.spatial, p.H, p.Dv)}
        self.swap = {"q": (1, -2), "k": (1, -2), "v": (1, -2), "rpb": (0, 1)}
        expand_dims = {"q": (0, n + 1) + tuple(range(1, n + 1))}
        expand_dims["k"] = expand_dims["v"] = expand_dims["q"]
        self.rpb_ext = tuple(2 * k - 1 for k in p.kernel)
        if p.rpb is not None:
            self.shapes["rpb"] = (p.H, *self.rpb_ext)
            expand_dims["rpb"] = (0,)
        self.base: Dict[str, torch.Tensor] = {}
        self.layout: Dict[str, str] = {}
        for name, lay in zip(NAMES, p.layouts):
            if name not in self.shapes:
                continue
            shape, self.layout[name] = layout_base_shape(self.shapes[name], lay, expand_dims[name])
            self.base[name] = torch.randn(shape, generator=gen) * (0.5 if name == "rpb" else 1.0)
        self.dout = torch.randn(self.shapes["v"], generator=gen)
        key, ok, bias = _flat_windows(p.spatial, p.kernel, p.stride, p.dilation, p.causal,
                                      self.rpb_ext if p.rpb is not None else None, None)
        N = key.shape[0]
        self.N = N
        # Bool [N, N]: query i reads key j; and the rpb entry (flat) each window slot reads.
        self.mask = torch.zeros(N, N, dtype=torch.bool)
        self.mask[torch.arange(N)[:, None].expand_as(key)[ok], key[ok]] = True
        self.ok, self.bias = ok, bias
        self.poison = {name: torch.zeros(t.shape, dtype=torch.bool) for name, t in self.base.items()}

    def rpb_used(self) -> torch.Tensor:
        """Bool [H, Π(2k−1)]: the rpb entries some window slot reads (the same for every head)."""
        used = torch.zeros(math.prod(self.rpb_ext), dtype=torch.bool)
        used[self.bias[self.ok]] = True
        return used[None].expand(self.p.H, -1)

    def attended(self, name: str) -> torch.Tensor:
        """Bool over the base tensor's positions (without the last dim for q, k, v): True where some
        window reads it. Every query row and every key is read (each query sees itself)."""
        t = self.base[name]
        if name == "rpb":
            return self.rpb_used().reshape(self.shapes["rpb"])[tuple(slice(0, s) for s in t.shape)]
        return torch.ones(t.shape[:-1], dtype=torch.bool)

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
            idx = tuple(cand[pos % cand.shape[0]].tolist())
            if name != "rpb":
                idx = idx + (feat % t.shape[-1],)
            if bool(self.poison[name][idx]):
                continue  # one value per position: the first site drawn there
            t[idx] = value
            self.poison[name][idx] = True
            note(f"{name}{list(idx)} = {value} ({where})")

    def tensors(self, device, clean: bool = False):
        out = {}
        for name, vals in self.base.items():
            if clean:
                vals = vals.masked_fill(self.poison[name], 0.5)
            dtype = self.p.rpb if name == "rpb" else self.p.dtype
            out[name] = realize_layout(vals, self.shapes[name], self.layout[name], self.swap[name], dtype, device)
        return out

    def call_args(self):
        p = self.p
        return dict(stride=p.stride, dilation=p.dilation, is_causal=p.causal, scale=p.scale)


def refusal(backend: str, b: Built, t) -> Optional[str]:
    """The library's own answer to "can `backend` run this call?" (None: it can)."""
    p = b.p
    prep = ops_na.prepare(p.n, t["q"], t["k"], t["v"], p.kernel, p.stride, p.dilation, p.causal, t.get("rpb"),
                          p.scale)
    return ops_na._can_run(prep)[backend]()


def run(backend: str, b: Built, t, device, grads: bool = True) -> Dict[str, torch.Tensor]:
    """out and lse, and with `grads` dq, dk, dv (and drpb) for the drawn dout (the leaves keep the
    drawn strides)."""
    leaves = {name: x.detach().requires_grad_(grads) for name, x in t.items()}
    out, lse = FNS[b.p.n](leaves["q"], leaves["k"], leaves["v"], b.p.kernel, rpb=leaves.get("rpb"),
                          return_lse=True, backend=backend, **b.call_args())
    if not grads:
        return {"out": out, "lse": lse}
    assert out.requires_grad, f"backend '{backend}': out does not require grad (inputs do)"
    names = [name for name in NAMES if name in leaves]
    dout = b.dout.to(dtype=out.dtype, device=device)
    g = torch.autograd.grad(out, [leaves[name] for name in names], dout, allow_unused=True, materialize_grads=True)
    return {"out": out.detach(), "lse": lse.detach(), **{"d" + name: x for name, x in zip(names, g)}}


def tolerance(p: Problem, name: str):
    """test_backends.py's convention: every tensor in the input dtype's bounds; drpb in the looser
    of its own dtype's and the input dtype's (a float32 bias of float16 inputs)."""
    tols = [tolerance_for(p.dtype)]
    if name == "drpb":
        tols.append(tolerance_for(p.rpb))
    return max(tols, key=lambda t: (t.atol, t.rtol))


def against_reference(backend: str, p: Problem, forward: bool, nonfinite: bool) -> None:
    dev = device_for(backend)
    b = Built(p)
    if nonfinite:
        b.add_sites()
    t = b.tensors(dev)
    reason = refusal(backend, b, t)
    if reason is not None:
        note(f"'{backend}' refuses: {reason}")
    assume(reason is None)
    got, exp = run(backend, b, t, dev, not forward), run("reference", b, t, dev, not forward)
    names = ("out", "lse") if forward else tuple(n for n in ("dq", "dk", "dv", "drpb") if n in exp)
    for name in names:
        assert_close(got[name].cpu(), exp[name].cpu(), tolerance(p, name), name)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("values", ["finite", "nonfinite"])
@pytest.mark.parametrize("part", ["forward", "gradients"])
def test_matches_reference(backend, part, values):
    """Forward (out, lse) or every gradient of the backend against the reference on drawn
    problems, with finite values or with NaN / ±inf written at drawn sites."""
    require_backend(backend)
    forward, nonfinite = part == "forward", values == "nonfinite"
    fuzz(EXAMPLES[backend], lambda p: against_reference(backend, p, forward=forward, nonfinite=nonfinite),
         p=problems(backend, nonfinite=nonfinite))


@pytest.mark.parametrize("backend", ("reference",) + KERNEL_BACKENDS)
def test_keys_outside_the_window_take_no_part(backend):
    if backend != "reference":
        require_backend(backend)

    @fuzz_settings(EXAMPLES[backend])
    @given(p=problems(backend, nonfinite=True))
    def prop(p):
        dev = device_for(backend)
        b = Built(p)
        b.add_sites()
        t = b.tensors(dev)
        assume(refusal(backend, b, t) is None)
        got = run(backend, b, t, dev)
        exp = run("reference", b, b.tensors(dev, clean=True), dev)

        B, N, H = p.B, b.N, p.H
        rows = lambda name: b.poison[name].any(-1).expand(b.shapes[name][:-1]).reshape(B, N, H)  # noqa: E731
        M = b.mask                                                                  # [N(query), N(key)]
        kvpois = rows("k") | rows("v")                                              # [B, N, H]
        # Rows a non-finite value may reach: a poisoned query, a poisoned key in the window, or a
        # poisoned rpb entry the window reads.
        tainted = rows("q") | (M[None, :, :, None] & kvpois[:, None, :, :]).any(2)
        if "rpb" in b.base:
            rp = b.poison["rpb"].expand(b.shapes["rpb"]).reshape(H, math.prod(b.rpb_ext))  # [H, E]
            reads = (rp[:, b.bias] & b.ok[None]).any(-1)                                 # [H, N]
            tainted = tainted | reads.T[None]
        clean_keys = ~(M[None, :, :, None] & tainted[:, :, None, :]).any(1)          # [B, N, H]
        note(f"untainted rows: {int((~tainted).sum())} of {tainted.numel()}, "
             f"clean keys: {int(clean_keys.sum())} of {clean_keys.numel()}")

        flat = lambda x: x.cpu().reshape(B, N, H, x.shape[-1])  # noqa: E731
        ok_rows = ~tainted
        for name in ("out", "dq"):
            assert_close(flat(got[name])[ok_rows], flat(exp[name])[ok_rows], tolerance(p, name),
                         f"{name} (untainted rows)")
        assert_close(got["lse"].cpu().reshape(B, N, H)[ok_rows], exp["lse"].cpu().reshape(B, N, H)[ok_rows],
                     tolerance(p, "lse"), "lse (untainted rows)")
        for name in ("dk", "dv"):
            assert_close(flat(got[name])[clean_keys], flat(exp[name])[clean_keys], tolerance(p, name),
                         f"{name} (keys only untainted rows read)")
        if "rpb" in b.base:
            src = (tainted.any(0)[:, None, :] & b.ok[:, :, None]).reshape(-1, H)      # [N·K, H]
            touched = torch.zeros(rp.shape[1], H).index_add_(0, b.bias.reshape(-1), src.float()) > 0
            entries = ~touched.T                                                     # [H, E]
            assert_close(got["drpb"].cpu().reshape(rp.shape)[entries], exp["drpb"].cpu().reshape(rp.shape)[entries],
                         tolerance(p, "drpb"), "drpb (entries only untainted rows read)")

    prop()
