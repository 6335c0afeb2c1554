"""Property-based comparison of every moe backend with the reference (hypothesis).

Drawn, per example (`RouteProblem` / `LayerProblem`, printed in full by a falsifying example):

* routing (`pyops.moe_route`): tokens T 0..40, experts E 1..12, k 1..E, score softmax or sigmoid,
  renormalize on or off, capacity_factor None or 0.25..2 (drops), a selection bias (None or one
  value per expert), the logits' dtype (float32, float16, bfloat16) and layout (contiguous,
  transposed, a strided slice), and the logits' pattern: random, every token's first choice on
  one expert ("hot"), some experts with no token ("empty"), or two values only ("ties": masses of
  exactly tied scores, broken by the lower expert index). Logits lie on a 1/16 grid in [-8, 8]
  (bias on a 1/8 grid): two keys are then either exactly equal or many ulps apart, so the
  selection is defined independently of a kernel's exp rounding;
* the expert MLP (`pyops.moe_experts`, routed by the reference): T 0..12 (0 and 1 included;
  fewer on the Triton interpreter), E 1..6, k 1..min(E, 4), d and hidden 1..9 (odd ones
  included), every activation, float32 / float16 / bfloat16 (logits in float32 or x's dtype),
  the same routing patterns and capacity drops, and per tensor a layout: contiguous, transposed
  (x as a `[d, T]` leaf, a weight as the `[E, hidden, d]`-style leaf of MegaBlocks or
  transformers, transposed back) or a strided slice of a larger leaf whose unused entries are
  NaN (a kernel that reads past the view shows it);
* for the non-finite properties, 1..3 sites holding NaN, +inf or -inf in x, w1, w2, w3 or (for the
  gradients) the upstream gradient dy.

Asserted, for each backend that can run the drawn call (a call the backend refuses by its own
`can_run` is rejected with `assume`; a backend that cannot run here at all, or lacks the op,
skips with the library's reason):

* routing: experts, order, offsets and dropped bit for bit as the reference's, weights within
  the tolerance of the logits' dtype; the gradient of the weights w.r.t. the logits likewise;
* the expert MLP, finite inputs: y (with and without autograd, i.e. the training and the
  inference ops) and the gradients of x, w1, w2, w3 and the logits within the tolerance table
  (test_backends.py's conventions: fp32 weight and logit gradients with REDUCTION_TOL);
* the expert MLP, non-finite inputs: the same against the reference run on the same inputs,
  i.e. NaN exactly where the reference has NaN and the same infinity where it has one
  (docs/design.md#non-finite-values: a NaN token is NaN only where the reference makes it so);
* refusals, on every routing backend (the reference included): NaN or ±inf logits raise
  `ValueError` naming the first bad token, a non-finite bias `ValueError` naming the bias.

`PYOPS_FUZZ_EXAMPLES` raises the example counts (tests/_support.py `fuzz_settings`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import pytest
import torch
from hypothesis import assume, given, note, strategies as st

import pyops
from _support import BACKENDS, assert_bitwise_equal, assert_close, device_for, fmt_dtype, fuzz, fuzz_settings, interpreted
from pyops.moe import ops as M
from pyops.testing import tolerance_for
from .cases import BF16, FP16, FP32, GLU, backend_reason, grads_tol

# Default example counts per backend (Triton runs under its slow CPU interpreter here).
EXAMPLES = {"reference": 60, "cpu": 60, "cuda": 60, "triton": 8}
KERNEL_BACKENDS = tuple(b for b in BACKENDS if b != "reference")

ACTIVATIONS = M.ACTIVATIONS
PATTERNS = ("random", "hot", "empty", "ties")
LAYOUTS = ("contiguous", "transposed", "strided")
CAPACITY = (None, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0)
NONFINITE = (float("nan"), float("inf"), float("-inf"))


def require(backend: str, op: str) -> torch.device:
    """Skip, with the library's reason, where `backend` cannot run `op` here at all."""
    reason = backend_reason(backend, op)
    if reason is not None:
        pytest.skip(f"backend '{backend}' cannot run {op}: {reason}")
    return device_for(backend)


# --------------------------------------------------------------------------------------------
# Drawn problems
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RouteProblem:
    T: int
    E: int
    k: int
    score: str
    renormalize: bool
    cf: Optional[float]
    bias: Optional[Tuple[float, ...]]
    dtype: torch.dtype
    layout: str
    pattern: str
    hot: int
    seed: int

    def __repr__(self) -> str:
        return (f"RouteProblem(T{self.T}-E{self.E}-k{self.k} {self.score} renormalize={self.renormalize} "
                f"cf={self.cf} bias={self.bias} {fmt_dtype(self.dtype)} layout={self.layout} "
                f"pattern={self.pattern} hot={self.hot} seed={self.seed})")


@dataclass(frozen=True)
class LayerProblem:
    T: int
    d: int
    h: int
    E: int
    k: int
    act: str
    dtype: torch.dtype
    logits_dtype: torch.dtype
    score: str
    renormalize: bool
    cf: Optional[float]
    pattern: str
    hot: int
    layouts: Tuple[str, str, str, str]   # x, w1, w2, w3
    seed: int
    # (tensor, value, position draw)
    sites: Tuple[Tuple[str, float, int], ...] = field(default=())

    def __repr__(self) -> str:
        sites = ", ".join(f"{n}[{p}]={v}" for n, v, p in self.sites)
        return (f"LayerProblem(T{self.T}-d{self.d}-h{self.h}-E{self.E}-k{self.k} {self.act} "
                f"{fmt_dtype(self.dtype)} logits {fmt_dtype(self.logits_dtype)} {self.score} "
                f"renormalize={self.renormalize} cf={self.cf} pattern={self.pattern} hot={self.hot} "
                f"layouts={self.layouts} seed={self.seed}" + (f" sites=[{sites}]" if sites else "") + ")")


@st.composite
def route_problems(draw) -> RouteProblem:
    T = draw(st.integers(0, 40))
    E = draw(st.integers(1, 12))
    k = draw(st.integers(1, E))
    bias = None
    if draw(st.booleans()):
        bias = tuple(draw(st.integers(-4, 4)) / 8 for _ in range(E))
    return RouteProblem(T, E, k, draw(st.sampled_from(("softmax", "sigmoid"))), draw(st.booleans()),
                        draw(st.sampled_from(CAPACITY)), bias, draw(st.sampled_from((FP32, FP16, BF16))),
                        draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(PATTERNS)), draw(st.integers(0, E - 1)),
                        draw(st.integers(0, 2**31 - 1)))


@st.composite
def layer_problems(draw, backend: str, nonfinite: bool = False, dy_sites: bool = False) -> LayerProblem:
    small = interpreted(backend)
    T = draw(st.integers(0, 6 if small else 12))
    d = draw(st.integers(1, 5 if small else 9))
    h = draw(st.integers(1, 5 if small else 9))
    E = draw(st.integers(1, 4 if small else 6))
    k = draw(st.integers(1, min(E, 4)))
    act = draw(st.sampled_from(ACTIVATIONS))
    dtype = draw(st.sampled_from((FP32, FP16, BF16)))
    logits_dtype = FP32 if dtype == FP32 else draw(st.sampled_from((FP32, dtype)))
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(4))
    sites = ()
    if nonfinite:
        names = ("x", "w1", "w2") + (("w3",) if act in GLU else ()) + (("dy",) if dy_sites else ())
        site = st.tuples(st.sampled_from(names), st.sampled_from(NONFINITE), st.integers(0, 2**16))
        sites = tuple(draw(st.lists(site, min_size=1, max_size=3)))
    return LayerProblem(T, d, h, E, k, act, dtype, logits_dtype, draw(st.sampled_from(("softmax", "sigmoid"))),
                        draw(st.booleans()), draw(st.sampled_from(CAPACITY)), draw(st.sampled_from(PATTERNS)),
                        draw(st.integers(0, E - 1)), layouts, draw(st.integers(0, 2**31 - 1)), sites)


# --------------------------------------------------------------------------------------------
# Building a drawn problem
# --------------------------------------------------------------------------------------------

def grid_logits(T: int, E: int, pattern: str, hot: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 logits on a 1/16 grid (exact in fp16 and bf16) with the drawn pattern."""
    if pattern == "ties":
        return torch.randint(0, 2, (T, E), generator=gen).float()
    z = torch.randint(-64, 65, (T, E), generator=gen).float() / 16
    if pattern == "hot":
        z[:, hot] = 8.0
    elif pattern == "empty" and E > 1:
        empty = torch.randperm(E, generator=gen)[: max(1, E // 2)]
        z[:, empty] = -8.0
    return z


def realize(values: torch.Tensor, layout: str, dtype, device) -> Tuple[torch.Tensor, "callable"]:
    """A leaf holding `values` (fp32) in the drawn layout, and the function that views it as
    `values`' shape: contiguous, transposed (last two dims swapped in storage) or a strided slice
    of a larger leaf whose other entries are NaN."""
    if layout == "transposed" and values.dim() >= 2:
        leaf = values.transpose(-1, -2).contiguous().to(dtype=dtype, device=device)
        return leaf, lambda t: t.transpose(-1, -2)
    if layout == "strided" and values.dim() >= 1:
        big = torch.full((*values.shape[:-1], 2 * values.shape[-1] + 1), float("nan"))
        big[..., 1::2] = values
        return big.to(dtype=dtype, device=device, copy=True), lambda t: t[..., 1::2]
    return values.to(dtype=dtype, device=device, copy=True), lambda t: t


class Layer:
    """The drawn layer's values (fp32, CPU): x, the weights, logits and dy, with the sites written."""

    def __init__(self, p: LayerProblem):
        gen = torch.Generator().manual_seed(p.seed)
        self.p = p
        T, d, h, E = p.T, p.d, p.h, p.E
        self.values: Dict[str, torch.Tensor] = {
            "x": torch.randn(T, d, generator=gen),
            "w1": torch.randn(E, d, h, generator=gen) * d ** -0.5,
            "w2": torch.randn(E, h, d, generator=gen) * h ** -0.5,
        }
        if p.act in GLU:
            self.values["w3"] = torch.randn(E, d, h, generator=gen) * d ** -0.5
        self.logits = grid_logits(T, E, p.pattern, p.hot, gen)
        self.dy = torch.randn(T, d, generator=gen)
        for name, value, pos in p.sites:
            t = self.dy if name == "dy" else self.values[name]
            if t.numel() == 0:
                continue
            idx = pos % t.numel()
            t.view(-1)[idx] = value
            note(f"{name}.flat[{idx}] = {value}")

    def leaves(self, device, requires_grad: bool):
        """({name: leaf}, {name: view function}), x and the weights in the drawn layouts, logits."""
        leaves, views = {}, {}
        for name, layout in zip(("x", "w1", "w2", "w3"), self.p.layouts):
            if name in self.values:
                leaves[name], views[name] = realize(self.values[name], layout, self.p.dtype, device)
        leaves["logits"] = self.logits.to(dtype=self.p.logits_dtype, device=device, copy=True)
        views["logits"] = lambda t: t
        for t in leaves.values():
            t.requires_grad_(requires_grad)
        return leaves, views


def run_layer(backend: str, layer: Layer, device, grads: bool, autograd: bool = False) -> Dict[str, torch.Tensor]:
    """y, and with `grads` the gradients of <y, dy> w.r.t. every leaf (routing by the reference).
    The leaves require grad with `grads` or `autograd` (without either, the CPU backend runs its
    inference op)."""
    p = layer.p
    leaves, views = layer.leaves(device, grads or autograd)
    v = {n: views[n](t) for n, t in leaves.items()}
    r = pyops.moe_route(v["logits"], p.k, score=p.score, renormalize=p.renormalize, capacity_factor=p.cf,
                        backend="reference")
    y = pyops.moe_experts(v["x"], r, v["w1"], v["w2"], v.get("w3"), activation=p.act, backend=backend)
    out = {"y": y.detach()}
    if grads:
        names = list(leaves)
        if y.requires_grad:
            g = torch.autograd.grad(y, [leaves[n] for n in names], layer.dy.to(dtype=y.dtype, device=device),
                                    allow_unused=True, materialize_grads=True)
        else:  # the reference's y is a constant zero when no assignment is kept (no tokens, all dropped)
            g = [torch.zeros_like(leaves[n]) for n in names]
        out.update(dict(zip(names, g)))
    return out


def experts_refusal(backend: str, layer: Layer, device) -> Optional[str]:
    """The library's own answer to "can `backend` run this moe_experts call?" (None: it can)."""
    x = torch.empty(0, dtype=layer.p.dtype, device=device)
    w = torch.empty(0, dtype=layer.p.logits_dtype, device=device)
    return M._experts_can_run(x, w)[backend]()


def layer_against_reference(backend: str, p: LayerProblem, grads: bool, autograd: bool = False) -> None:
    """y (grads=False; through the training op with `autograd`, else the inference op) or every
    gradient (grads=True) of `backend` against the reference on the same drawn inputs."""
    dev = device_for(backend)
    layer = Layer(p)
    reason = experts_refusal(backend, layer, dev)
    if reason is not None:
        note(f"'{backend}' refuses: {reason}")
    assume(reason is None)
    got = run_layer(backend, layer, dev, grads, autograd)
    exp = run_layer("reference", layer, torch.device("cpu"), grads)
    if not grads:
        assert got["y"].dtype == p.dtype
        assert_close(got["y"].cpu(), exp["y"], tolerance_for(p.dtype), "y")
        return
    assert set(got) == set(exp)
    for name in exp:
        if name != "y":
            assert_close(got[name].cpu(), exp[name], grads_tol(name, p.dtype), f"grad of {name}")


# --------------------------------------------------------------------------------------------
# Routing properties
# --------------------------------------------------------------------------------------------

def route_inputs(p: RouteProblem, device, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(p.seed)
    z = grid_logits(p.T, p.E, p.pattern, p.hot, gen)
    gw = torch.randn(p.T, p.k, generator=gen)
    leaf, view = realize(z, p.layout, p.dtype, device)
    leaf.requires_grad_(requires_grad)
    bias = None if p.bias is None else torch.tensor(p.bias, device=device)
    return leaf, view, bias, gw


def route(p: RouteProblem, logits, bias, backend: str):
    return pyops.moe_route(logits, p.k, score=p.score, renormalize=p.renormalize, capacity_factor=p.cf, bias=bias,
                           backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_route_finite_forward_matches_reference(backend):
    dev = require(backend, "moe_route")

    @fuzz_settings(EXAMPLES[backend])
    @given(p=route_problems())
    def prop(p):
        leaf, view, bias, _ = route_inputs(p, dev)
        reason = M._route_can_run(leaf)[backend]()
        assume(reason is None)
        got = route(p, view(leaf), bias, backend)
        rleaf, rview, rbias, _ = route_inputs(p, torch.device("cpu"))
        want = route(p, rview(rleaf), rbias, "reference")
        for name in ("experts", "order", "offsets", "dropped"):
            assert_bitwise_equal(getattr(got, name).cpu(), getattr(want, name), name)
        assert_close(got.weights.cpu(), want.weights, tolerance_for(p.dtype), "weights")

    prop()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_route_finite_gradients_match_reference(backend):
    dev = require(backend, "moe_route")

    @fuzz_settings(EXAMPLES[backend])
    @given(p=route_problems())
    def prop(p):
        grads = []
        for b, device in ((backend, dev), ("reference", torch.device("cpu"))):
            leaf, view, bias, gw = route_inputs(p, device, requires_grad=True)
            assume(M._route_can_run(leaf)[b]() is None)
            r = route(p, view(leaf), bias, b)
            grads.append(torch.autograd.grad(r.weights, leaf, gw.to(dtype=r.weights.dtype, device=device))[0])
        assert_close(grads[0].cpu(), grads[1], tolerance_for(p.dtype), "grad of logits")

    prop()


@st.composite
def bad_routings(draw):
    """A route problem with 1..3 non-finite logits, or (sometimes) a non-finite bias entry."""
    p = draw(route_problems().filter(lambda q: q.T > 0))
    sites = draw(st.lists(st.tuples(st.integers(0, p.T - 1), st.integers(0, p.E - 1), st.sampled_from(NONFINITE)),
                          min_size=1, max_size=3))
    bad_bias = draw(st.sampled_from((None,) * 3 + NONFINITE))
    return p, tuple(sites), bad_bias


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_refuses_nonfinite_logits(backend):
    dev = require(backend, "moe_route")

    @fuzz_settings(EXAMPLES[backend])
    @given(case=bad_routings())
    def prop(case):
        p, sites, bad_bias = case
        gen = torch.Generator().manual_seed(p.seed)
        z = grid_logits(p.T, p.E, p.pattern, p.hot, gen)
        for t, e, v in sites:
            z[t, e] = v
        leaf, view = realize(z, p.layout, p.dtype, dev)[:2]
        bias = None if p.bias is None else torch.tensor(p.bias)
        if bad_bias is not None:
            bias = torch.zeros(p.E) if bias is None else bias
            bias[sites[0][1]] = bad_bias
        if bias is not None:
            bias = bias.to(dev)
        assume(M._route_can_run(leaf)[backend]() is None)
        if bad_bias is not None:
            want = "bias: contains NaN/inf"
        else:
            want = f"logits: contains NaN/inf at token {min(t for t, _, _ in sites)}"
        with pytest.raises(ValueError, match=re.escape(want) + r"(\D|$)"):
            route(p, view(leaf), bias, backend)

    prop()


# --------------------------------------------------------------------------------------------
# Expert MLP properties
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("values", ["finite", "nonfinite"])
@pytest.mark.parametrize("part", ["forward", "gradients"])
def test_experts_match_reference(backend, part, values):
    """y (the CPU backend's inference op or its training op, drawn) or every gradient of the
    backend against the reference on drawn layers, with finite values or with NaN / ±inf written
    at drawn sites (dy included for the gradients)."""
    require(backend, "moe_experts")
    nonfinite = values == "nonfinite"
    if part == "forward":
        fuzz(EXAMPLES[backend], lambda p, autograd: layer_against_reference(backend, p, grads=False, autograd=autograd),
             p=layer_problems(backend, nonfinite=nonfinite), autograd=st.booleans())
    else:
        fuzz(EXAMPLES[backend], lambda p: layer_against_reference(backend, p, grads=True),
             p=layer_problems(backend, nonfinite=nonfinite, dy_sites=nonfinite))
