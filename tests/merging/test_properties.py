"""Property-based comparison of every merging backend with the reference (hypothesis).

Drawn, per example (`Problem`, printed in full by a falsifying example):

* the op: `pyops.task_arithmetic`, `pyops.task_arithmetic_from_models`, `pyops.merge` or
  `pyops.merge_from_models`, and for the merge ops a method of `pyops.merging.spec.METHODS` that
  the backend implements (for the gradient properties: one it differentiates);
* the tensor: 0 to 3 dimensions, numel 0, 1, odd and tiny, or exactly on / one off a multiple of
  an int block size (on the C++ backend sometimes 65535..65537, around its large-block cut, for
  the methods without random drops);
  blocks None, "rows" or an int (1, small, numel ± 1); 1..6 tasks (sometimes 9 or 10, past one
  Triton launch and the C++ election's unrolled counts);
* the parameters: density (one float, a list or a tensor; 1, or inside what the method allows),
  gamma (breadcrumbs), epsilon (DELLA), k and tall_lambda (consensus), normalize (None, True,
  False), lam, seed (0 .. 2**64 − 1), the tensor's name (any text), coefficients `[N]`,
  `[N, n_blocks]` (also as a transposed view), a list of floats or none (the merge default),
  positive or on a grid with zeros and negatives, in float32 or (forward) another float dtype;
* dtypes float32 / float16 / bfloat16, out_dtype and `out=` (a new tensor or base itself);
* values: normal, a grid of few magnitudes (masses of ties and zeros), mostly zeros, or normal
  with some task vectors exactly zero (a fine-tuned tensor equal to the base: a frozen layer);
* layouts: base contiguous, transposed or a strided slice of a larger tensor whose other entries
  are NaN; deltas stacked (contiguous or as such a view) or a list (contiguous or views);
* for the non-finite properties, 1..4 sites holding NaN, +inf or −inf in base or a task tensor.

Asserted, for each backend that can run the drawn call (a call the backend refuses by its own
`can_run` is rejected with `assume`; a backend that cannot run here at all skips with the
library's reason):

* finite inputs: the output matches the reference within the tolerance of its dtype, and so do
  the gradients of base, every delta / fine-tuned tensor and the coefficients (test_backends.py's
  and test_methods_cpu*.py's conventions: coefficient gradients of task arithmetic, and of fp32
  merges, with REDUCTION_TOL; model_stock against the reference evaluated in float64);
* non-finite inputs: the same, against the reference on the same inputs: NaN exactly where the
  reference has NaN, the same infinity where it has one. For TIES, DARE, breadcrumbs and DELLA
  this pins the reference's handling of NaN magnitudes (they rank above every finite one and
  take their place in the block's top k / rank band) on every backend;
* refusals: an invalid parameter raises the same ValueError / TypeError naming it on every
  backend, before any backend is chosen; a call a backend cannot run (float64, gradients it does
  not compute) raises BackendUnavailableError with the library's reason, never a silent fallback.

`PYOPS_FUZZ_EXAMPLES` raises the example counts (tests/_support.py `fuzz_settings`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import pytest
import torch
from hypothesis import assume, given, note, strategies as st

import pyops
from _support import (BACKENDS, REDUCTION_TOL, assert_close, device_for, fmt_dtype, fuzz, fuzz_settings, interpreted,
                      require_backend)
from pyops import _backend
from pyops.merging import merge as M
from pyops.merging import task_arithmetic as TM
from pyops.merging.spec import METHODS, resolve_blocks
from pyops.testing import tolerance_for
from .cases import BF16, FP16, FP32, FP64

# Default example counts per backend (Triton runs under its slow CPU interpreter here).
EXAMPLES = {"reference": 100, "cpu": 100, "cuda": 100, "triton": 12}
KERNEL_BACKENDS = tuple(b for b in BACKENDS if b != "reference")

TA_OPS = ("task_arithmetic", "task_arithmetic_from_models")
MERGE_OPS = ("merge", "merge_from_models")
NONFINITE = (float("nan"), float("inf"), float("-inf"))
DENSITIES = (1.0, 0.95, 0.9, 0.77, 0.5, 0.3, 0.25, 0.125, 0.1, 0.05)
VALUES = ("normal", "grid", "sparse", "frozen")
BASE_LAYOUTS = ("contiguous", "transposed", "strided")
DELTA_LAYOUTS = ("stacked", "stacked-view", "list", "list-views")
COEFFS = ("none", "vec", "block", "block-t", "list")
# Methods drawn at 65535..65537 elements (the C++ kernels' large-block TIES threshold and ranking);
# the Philox methods are left out there: the reference draws its uniforms in plain torch, slowly.
LARGE_OK = ("task_arithmetic", "ties", "breadcrumbs", "consensus", "model_stock")


def _fns(op: str):
    return {"task_arithmetic": pyops.task_arithmetic, "task_arithmetic_from_models": pyops.task_arithmetic_from_models,
            "merge": pyops.merge, "merge_from_models": pyops.merge_from_models}[op]


def _probe_reason(backend: str, method: str, needs_grad: bool) -> Optional[str]:
    """The library's reason `backend` cannot run `method` on small fp32 tensors of its device."""
    dev = device_for(backend)
    base = torch.zeros(4, device=dev)
    p = TM.prepare(base, [base, base], [1.0, 1.0], None, None)
    if method == "task_arithmetic":
        return TM._can_run(p, FP32)[backend]()
    return M._can_run(p, method, needs_grad)[backend]()


@functools.lru_cache(maxsize=None)
def methods_for(backend: str, needs_grad: bool) -> Tuple[str, ...]:
    return tuple(m for m in METHODS if _probe_reason(backend, m, needs_grad) is None)


# --------------------------------------------------------------------------------------------
# Drawn problems
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    op: str
    method: str
    shape: Tuple[int, ...]
    blocks: object
    n: int
    dtype: torch.dtype
    out_dtype: Optional[torch.dtype]
    out: Optional[str]                 # None | "new" | "base"
    density: object                    # float | tuple (passed as a list) | ("tensor", tuple)
    gamma: float
    epsilon: float
    k: int
    tall_lambda: float
    normalize: Optional[bool]
    lam: float
    seed: int
    name: str
    coeffs: str
    coeff_style: str
    coeff_dtype: torch.dtype
    values: str
    base_layout: str
    delta_layout: str
    value_seed: int
    requires: Tuple[str, ...] = ()     # leaves that require grad (gradient properties)
    # (target "base" | "task", task index draw, value, position draw)
    sites: Tuple[Tuple[str, int, float, int], ...] = field(default=())

    def __repr__(self) -> str:
        od = f" out_dtype={fmt_dtype(self.out_dtype)}" if self.out_dtype else ""
        sites = ", ".join(f"{t}{'' if t == 'base' else i % self.n}[{p}]={v}" for t, i, v, p in self.sites)
        return (f"Problem({self.op} method={self.method} shape={self.shape} blocks={self.blocks!r} N={self.n} "
                f"{fmt_dtype(self.dtype)}{od} out={self.out} density={self.density} gamma={self.gamma} "
                f"epsilon={self.epsilon} k={self.k} tall_lambda={self.tall_lambda} normalize={self.normalize} "
                f"lam={self.lam} seed={self.seed} name={self.name!r} coeffs={self.coeffs}/{self.coeff_style}/"
                f"{fmt_dtype(self.coeff_dtype)} values={self.values} layouts={self.base_layout}/{self.delta_layout} "
                f"value_seed={self.value_seed} requires={self.requires}" + (f" sites=[{sites}]" if sites else "")
                + ")")


def _density_for(draw, method: str, n: int, gamma: float, epsilon: float):
    if method == "breadcrumbs":
        ok = [d for d in DENSITIES if d >= 1.0 or d + gamma <= 1.0 + 1e-12]
    elif method in ("della", "della_linear"):
        ok = [d for d in DENSITIES if d >= 1.0 or (d - epsilon > 0.0 and d + epsilon <= 1.0)]
    else:
        ok = list(DENSITIES)
    form = draw(st.sampled_from(("float", "list", "tensor")))
    if form == "float":
        return draw(st.sampled_from(ok))
    vals = tuple(draw(st.sampled_from(ok)) for _ in range(n))
    return vals if form == "list" else ("tensor", vals)


@st.composite
def problems(draw, backend: str, grads: bool = False, nonfinite: bool = False) -> Problem:
    small = interpreted(backend)
    method = draw(st.sampled_from(methods_for(backend, grads)))
    op = draw(st.sampled_from(TA_OPS + MERGE_OPS if method == "task_arithmetic" else MERGE_OPS))

    # The tensor and its blocks.
    kind = draw(st.sampled_from(("free", "aligned")))
    if not small and method in LARGE_OK and draw(st.integers(0, 15)) == 15:
        kind = "large"
    if kind == "large":
        shape, blocks = (draw(st.sampled_from((65535, 65536, 65537))),), draw(st.sampled_from((None, 65536, 4096)))
    elif kind == "aligned":
        bs = draw(st.sampled_from((1, 2, 3, 4, 5, 7, 8, 16, 32)))
        numel = max(0, bs * draw(st.integers(1, 3 if small else 5)) + draw(st.sampled_from((-1, 0, 1))))
        shape, blocks = (numel,), bs
    else:
        ndim = draw(st.integers(0, 3))
        top = (5, 4, 3) if small else (13, 9, 5)
        shape = tuple(draw(st.integers(0 if i == 0 else 1, top[ndim - 1] if ndim else 1)) for i in range(ndim))
        numel = math.prod(shape)
        choices = [None, 1, 2, 3, 7, max(numel, 1), numel + 1] + ([max(numel - 1, 1)] if numel > 1 else [])
        if ndim:
            choices.append("rows")
        blocks = draw(st.sampled_from(choices))

    n_choices = (1, 2, 3) if small or kind == "large" else (1, 2, 3, 4, 5, 6, 9, 10)
    if method == "model_stock":
        n_choices = tuple(c for c in n_choices if c >= 2)
    n = draw(st.sampled_from(n_choices))
    dtype = draw(st.sampled_from((FP32, FP16, BF16)))
    forward_only = not grads
    out_dtype = draw(st.sampled_from((None, None, FP32, FP16, BF16))) if forward_only else None
    out = draw(st.sampled_from((None, None, "new", "base"))) if forward_only else None
    if out == "base" and out_dtype not in (None, dtype):
        out = "new"

    gamma = draw(st.sampled_from((0.0, 0.01, 0.05, 0.1, 0.2, 0.3))) if method == "breadcrumbs" else 0.01
    epsilon = draw(st.sampled_from((0.0, 0.02, 0.05, 0.1, 0.2))) if method.startswith("della") else 0.1
    density = _density_for(draw, method, n, gamma, epsilon) if method not in ("model_stock", "consensus") else 1.0
    k = draw(st.integers(1, n)) if method == "consensus" else 2
    tall_lambda = draw(st.sampled_from((0.0, 0.3, 0.6, 1.0, 2.0))) if method == "consensus" else 0.6
    normalize = draw(st.sampled_from((None, True, False)))
    lam = 1.0 if method == "model_stock" else draw(st.sampled_from((1.0, 0.5, 2.0, -0.7, 0.0)))
    seed = draw(st.integers(0, 2**64 - 1))
    name = draw(st.text(max_size=12))

    if method == "model_stock":
        coeffs = "none"
    else:
        opts = [c for c in COEFFS if not (c == "none" and op in TA_OPS) and not (c == "list" and grads)]
        coeffs = draw(st.sampled_from(opts))
    coeff_style = draw(st.sampled_from(("positive", "grid")))
    coeff_dtype = FP32 if grads or coeffs in ("none", "list") else draw(st.sampled_from((FP32, FP32, FP64, FP16, BF16)))

    requires: Tuple[str, ...] = ()
    if grads:
        leaves = ("base", "deltas") + (("coeffs",) if coeffs not in ("none", "list") else ())
        requires = tuple(draw(st.lists(st.sampled_from(leaves), min_size=1, max_size=3, unique=True)))

    sites = ()
    if nonfinite:
        site = st.tuples(st.sampled_from(("base", "task", "task")), st.integers(0, 15), st.sampled_from(NONFINITE),
                         st.integers(0, 2**20))
        sites = tuple(draw(st.lists(site, min_size=1, max_size=4)))

    return Problem(op, method, shape, blocks, n, dtype, out_dtype, out, density, gamma, epsilon, k, tall_lambda,
                   normalize, lam, seed, name, coeffs, coeff_style, coeff_dtype, draw(st.sampled_from(VALUES)),
                   draw(st.sampled_from(BASE_LAYOUTS)), draw(st.sampled_from(DELTA_LAYOUTS)),
                   draw(st.integers(0, 2**31 - 1)), requires, sites)


# --------------------------------------------------------------------------------------------
# Building a drawn problem
# --------------------------------------------------------------------------------------------

def _values(style: str, shape, gen: torch.Generator) -> torch.Tensor:
    if style == "grid":   # magnitudes 0, 0.5, 1, 1.5, 2: ties with any k-th magnitude, zeros
        return torch.randint(-4, 5, tuple(shape), generator=gen).float() / 2
    v = torch.randn(tuple(shape), generator=gen)
    if style == "sparse":
        v = v * (torch.rand(tuple(shape), generator=gen) < 0.2)
    return v


def _realize(values: torch.Tensor, layout: str, dtype, device):
    """A leaf holding `values` in `layout` and the view giving `values`' shape back: contiguous,
    transposed (last two dims swapped in storage) or a strided slice of a larger leaf whose other
    entries are NaN (a kernel reading past the view would show it)."""
    if layout == "transposed" and values.dim() >= 2:
        leaf = values.transpose(-1, -2).contiguous().to(dtype=dtype, device=device, copy=True)
        return leaf, lambda t: t.transpose(-1, -2)
    if layout == "strided" and values.dim() >= 1:
        big = torch.full((*values.shape[:-1], 2 * values.shape[-1] + 1), float("nan"))
        big[..., 1::2] = values
        return big.to(dtype=dtype, device=device, copy=True), lambda t: t[..., 1::2]
    return values.to(dtype=dtype, device=device, copy=True), lambda t: t


class Built:
    """The drawn problem's values (fp32, CPU): base, the N task inputs (deltas or fine-tuned
    weights), coefficients and the upstream gradient, with the non-finite sites written."""

    def __init__(self, p: Problem):
        gen = torch.Generator().manual_seed(p.value_seed)
        self.p = p
        self.base = _values(p.values, p.shape, gen)
        taus = [_values(p.values, p.shape, gen) for _ in range(p.n)]
        if p.values == "frozen":   # some fine-tuned tensors equal the base: τᵢ = 0 exactly (a frozen layer)
            for i in torch.randperm(p.n, generator=gen)[: 1 + int(torch.randint(p.n, (1,), generator=gen))].tolist():
                taus[i] = torch.zeros(tuple(p.shape))
        from_models = p.op.endswith("from_models")
        self.tasks = torch.stack([self.base + t if from_models else t for t in taus]) if p.n else None
        self.n_blocks = resolve_blocks(p.blocks, p.shape)[1]
        cshape = (p.n,) if p.coeffs in ("vec", "list") else (p.n, self.n_blocks)
        if p.coeff_style == "positive":
            self.coeffs = 0.25 + torch.rand(cshape, generator=gen)
        else:
            self.coeffs = torch.randint(-5, 6, cshape, generator=gen).float() / 4
        self.grad = torch.randn(tuple(p.shape), generator=gen)
        for target, i, value, pos in p.sites:
            t = self.base if target == "base" else self.tasks[i % p.n]
            if t.numel() == 0:
                continue
            idx = pos % t.numel()
            t.view(-1)[idx] = value
            note(f"{'base' if target == 'base' else f'task {i % p.n}'}.flat[{idx}] = {value}")

    def leaves(self, dtype, device, requires: Tuple[str, ...] = (), storage=None):
        """({name: leaf}, call arguments built from the leaves by differentiable views). With
        `storage`, values are first rounded to that dtype: an fp64 evaluation then sees exactly
        the inputs the backends see."""
        p = self.p
        if storage is not None and storage != dtype:
            rounded = Built.__new__(Built)
            rounded.__dict__.update(self.__dict__)
            rounded.base = self.base.to(storage).to(torch.float32)
            rounded.tasks = None if self.tasks is None else self.tasks.to(storage).to(torch.float32)
            return rounded.leaves(dtype, device, requires)
        leaves: Dict[str, object] = {}
        base_leaf, base_view = _realize(self.base, p.base_layout, dtype, device)
        leaves["base"] = base_leaf.requires_grad_("base" in requires)
        if p.delta_layout in ("stacked", "stacked-view"):
            layout = "contiguous" if p.delta_layout == "stacked" else ("strided" if len(p.shape) % 2 else "transposed")
            leaf, view = _realize(self.tasks, layout, dtype, device)
            leaves["deltas"] = leaf.requires_grad_("deltas" in requires)
            deltas = lambda: view(leaves["deltas"])  # noqa: E731
        else:
            items = []
            for i in range(p.n):
                layout = "contiguous" if p.delta_layout == "list" else BASE_LAYOUTS[i % 3]
                leaf, view = _realize(self.tasks[i], layout, dtype, device)
                leaves[f"deltas[{i}]"] = leaf.requires_grad_("deltas" in requires)
                items.append((f"deltas[{i}]", view))
            deltas = lambda: [v(leaves[nm]) for nm, v in items]  # noqa: E731
        coeffs = None
        if p.coeffs == "list":
            coeffs = [float(c) for c in self.coeffs]
        elif p.coeffs != "none":
            c = self.coeffs.t().contiguous() if p.coeffs == "block-t" else self.coeffs
            leaves["coeffs"] = c.to(dtype=p.coeff_dtype, device=device, copy=True).requires_grad_("coeffs" in requires)
            cview = (lambda t: t.t()) if p.coeffs == "block-t" else (lambda t: t)
            coeffs = lambda: cview(leaves["coeffs"])  # noqa: E731
        args = lambda: (base_view(leaves["base"]), deltas(), coeffs() if callable(coeffs) else coeffs)  # noqa: E731
        return leaves, args


def _density(p: Problem, device):
    if isinstance(p.density, tuple) and p.density and p.density[0] == "tensor":
        return torch.tensor(p.density[1], device=device)
    return list(p.density) if isinstance(p.density, tuple) else p.density


def call(p: Problem, base, deltas, coeffs, backend: str, out=None, device=None, out_dtype="drawn"):
    od = p.out_dtype if out_dtype == "drawn" else out_dtype
    if p.op in TA_OPS:
        return _fns(p.op)(base, deltas, coeffs, blocks=p.blocks, out=out, out_dtype=od, backend=backend)
    kw = dict(method=p.method, blocks=p.blocks, out=out, out_dtype=od, backend=backend)
    if p.method != "model_stock":
        kw.update(coeffs=coeffs, density=_density(p, device or base.device), seed=p.seed, lam=p.lam, name=p.name,
                  gamma=p.gamma, epsilon=p.epsilon, k=p.k, tall_lambda=p.tall_lambda, normalize=p.normalize)
    return _fns(p.op)(base, deltas, **kw)


def refusal(p: Problem, backend: str, base, deltas, coeffs, needs_grad: bool, out_dtype="drawn") -> Optional[str]:
    """The library's own answer to "can `backend` run this call?" (None: it can)."""
    c = coeffs if coeffs is not None else [1.0] * p.n
    od = (p.out_dtype if out_dtype == "drawn" else out_dtype) or base.dtype
    prep = TM.prepare(base, deltas, c, p.blocks, od)
    if p.method == "task_arithmetic":
        return TM._can_run(prep, od)[backend]()
    return M._can_run(prep, p.method, needs_grad)[backend]()


def run(p: Problem, b: Built, backend: str, device, grads: bool):
    """The output (and with `grads` every requested leaf's gradient) of `backend` on the drawn call.
    model_stock on the reference is evaluated in float64 (test_methods_cpu.py's convention: its
    interpolation weight comes from whole-tensor norms), results cast back."""
    fp64 = backend == "reference" and p.method == "model_stock"
    dtype = FP64 if fp64 else p.dtype
    leaves, args = b.leaves(dtype, device, p.requires if grads else (), storage=p.dtype)
    base, deltas, coeffs = args()
    if backend != "reference":
        reason = refusal(p, backend, base, deltas, coeffs, grads)
        if reason is not None:
            note(f"'{backend}' refuses: {reason}")
        assume(reason is None)
    od = p.out_dtype or p.dtype
    if p.out is None or grads:
        y = call(p, base, deltas, coeffs, backend, out_dtype=None if fp64 else p.out_dtype)
    else:
        target = base if p.out == "base" else torch.full(tuple(p.shape), float("nan"), dtype=od, device=device)
        if fp64:   # the reference's answer, computed apart (the output dtype is the drawn one)
            y = call(p, base, deltas, coeffs, backend, out_dtype=None)
        else:
            if p.out == "base" and not target.is_contiguous():
                target = leaves["base"] = base.contiguous()
                base = target
            y = call(p, base, deltas, coeffs, backend, out=target, device=device, out_dtype=None)
            assert y is target
    result = {"out": y.detach().to(od)}
    if grads:
        names = [n for n, t in leaves.items() if t.requires_grad]
        g = torch.autograd.grad(y, [leaves[n] for n in names], b.grad.to(dtype=y.dtype, device=device),
                                allow_unused=True, materialize_grads=True)
        result.update({f"grad {n}": x.to(leaves[n].dtype if not fp64 else _leaf_dtype(p, n)) for n, x in zip(names, g)})
    return result


def _leaf_dtype(p: Problem, name: str) -> torch.dtype:
    return p.coeff_dtype if name == "coeffs" else p.dtype


def grad_tol(p: Problem, name: str):
    """test_backends.py: task arithmetic's coefficient gradient with REDUCTION_TOL;
    test_methods_cpu_backward.py: a merge's with REDUCTION_TOL in fp32, the dtype's bounds
    otherwise; test_methods_cpu.py: model_stock's gradients (against fp64) with REDUCTION_TOL."""
    if p.method == "model_stock":
        return REDUCTION_TOL if p.dtype == FP32 else tolerance_for(p.dtype)
    if name == "grad coeffs" and (p.method == "task_arithmetic" or p.dtype == FP32):
        return REDUCTION_TOL
    return tolerance_for(p.dtype)


def against_reference(backend: str, p: Problem, grads: bool) -> None:
    dev = device_for(backend)
    b = Built(p)
    got = run(p, b, backend, dev, grads)
    exp = run(p, b, "reference", torch.device("cpu"), grads)
    assert set(got) == set(exp)
    od = p.out_dtype or p.dtype
    if not grads:
        assert got["out"].dtype == od
        assert_close(got["out"].cpu(), exp["out"], tolerance_for(od), "out")
        return
    for name in exp:
        if name != "out":
            assert_close(got[name].cpu(), exp[name], grad_tol(p, name), name)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("values", ["finite", "nonfinite"])
@pytest.mark.parametrize("part", ["forward", "gradients"])
def test_matches_reference(backend, part, values):
    """The merged tensor or every gradient of the backend against the reference on drawn
    problems, with finite values or with NaN / ±inf written at drawn sites."""
    require_backend(backend)
    grads, nonfinite = part == "gradients", values == "nonfinite"
    fuzz(EXAMPLES[backend], lambda p: against_reference(backend, p, grads=grads),
         p=problems(backend, grads=grads, nonfinite=nonfinite))


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

# (method, parameter overrides, exception, the message's start): every one is refused before a
# backend is chosen, so every backend raises it, available or not.
BAD_PARAMS = [
    ("ties", dict(density=0.0), ValueError, "density"),
    ("dare", dict(density=-0.5), ValueError, "density"),
    ("dare_ties", dict(density=1.5), ValueError, "density"),
    ("della", dict(density=float("nan")), ValueError, "density"),
    ("ties", dict(density=[0.5]), TypeError, "density"),        # one value for N = 2 tasks
    ("breadcrumbs", dict(gamma=1.0), ValueError, "gamma"),
    ("breadcrumbs", dict(gamma=-0.1), ValueError, "gamma"),
    ("breadcrumbs", dict(density=0.9, gamma=0.2), ValueError, "gamma"),
    ("della", dict(density=0.1, epsilon=0.1), ValueError, "epsilon"),
    ("della_linear", dict(density=0.95, epsilon=0.1), ValueError, "epsilon"),
    ("della", dict(epsilon=-0.1), ValueError, "epsilon"),
    ("consensus", dict(k=0), ValueError, "k"),
    ("consensus", dict(k=3), ValueError, "k"),
    ("consensus", dict(tall_lambda=-1.0), ValueError, "tall_lambda"),
    ("dare", dict(seed=-1), ValueError, "seed"),
    ("dare", dict(seed=2**64), ValueError, "seed"),
    ("ties", dict(normalize=1), TypeError, "normalize"),
    ("model_stock", dict(coeffs=[1.0, 1.0]), ValueError, "coeffs"),
    ("model_stock", dict(lam=0.5), ValueError, "coeffs"),
    ("ties", dict(blocks=0), ValueError, "blocks"),
    ("ties", dict(coeffs=[1.0, 1.0, 1.0]), ValueError, "coeffs"),
    ("frankenmerge", {}, ValueError, "method"),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusals_are_the_same_on_every_backend(backend):
    dev = device_for(backend)

    @fuzz_settings(EXAMPLES[backend])
    @given(case=st.sampled_from(BAD_PARAMS), from_models=st.booleans(), shape=st.sampled_from(((5,), (2, 3), ())),
           dtype=st.sampled_from((FP32, FP16, BF16, FP64)))
    def invalid(case, from_models, shape, dtype):
        method, over, exc, arg = case
        base = torch.randn(shape).to(dtype=dtype, device=dev)
        deltas = [torch.randn(shape).to(dtype=dtype, device=dev) for _ in range(2)]
        kw = dict(method=method, backend=backend)
        kw.update(over)
        fn = pyops.merge_from_models if from_models else pyops.merge
        with pytest.raises(exc, match=rf"^{arg}\b"):
            fn(base, deltas, **kw)

    invalid()

    @fuzz_settings(EXAMPLES[backend])
    @given(p=problems("reference"), fp64=st.booleans(), requires=st.booleans())
    def unavailable(p, fp64, requires):
        # A valid call with float64 inputs or inputs that need gradients: where the backend's
        # can_run refuses it, the explicit backend raises BackendUnavailableError with that reason.
        b = Built(p)
        dtype = FP64 if fp64 else p.dtype
        leaves, args = b.leaves(dtype, dev, ("base",) if requires else ())
        base, deltas, coeffs = args()
        reason = refusal(p, backend, base, deltas, coeffs, requires, out_dtype=None)
        assume(reason is not None)
        with pytest.raises(_backend.BackendUnavailableError) as info:
            call(p, base, deltas, coeffs, backend, device=dev, out_dtype=None)
        assert reason in str(info.value)

    if backend != "reference":
        unavailable()
