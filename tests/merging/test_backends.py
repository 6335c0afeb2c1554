"""pyops.task_arithmetic / task_arithmetic_from_models: every backend against the reference.

Forward on deliberately odd shapes and block layouts, every dtype, stacked and list deltas,
non-contiguous inputs, `out=`; backward for base, every delta and coeffs (docs/design.md#testing).
The Triton backend gets a reduced matrix on CPU: under TRITON_INTERPRET=1 every program runs in
the Python interpreter.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import pyops
from _support import BACKENDS, REDUCTION_TOL, assert_bitwise_equal, assert_close, assert_close_dtype, fmt_dtype, interpreted, randn, require_backend, tolerance_for
from .cases import BIG_BLOCK, block_size_for, fmt_blocks, fmt_shape, make_inputs, n_blocks_for, public_fn, reference, snapshot
from pyops.merging import reference as ref_mod

OP = "task_arithmetic"
FP32, FP16, BF16, FP64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

SHAPES = [(1,), (7,), (3, 517), (5, 1, 9), (0, 4), ()]
BLOCKS = [None, "rows", 7, BIG_BLOCK]
NS = [1, 3, 5, 9]
FUNCS = [False, True]  # from_models
FUNC_IDS = ["deltas", "from_models"]


def layouts(shapes=SHAPES, blocks=BLOCKS):
    """(shape, blocks) pairs; a 0-d tensor has no rows."""
    return [(s, b) for s, b in itertools.product(shapes, blocks) if not (len(s) == 0 and b == "rows")]


def case_id(shape, n, blocks, coeff_kind, dtype, out_dtype=None):
    od = "" if out_dtype is None else f"-to-{fmt_dtype(out_dtype)}"
    return f"{fmt_shape(shape)}-N{n}-{fmt_blocks(blocks)}-c{coeff_kind}-{fmt_dtype(dtype)}{od}"


def forward_cases():
    """The full matrix for the reference and C++ backends."""
    cases = []
    for (shape, blocks), n, ck in itertools.product(layouts(), NS, ["vec", "block"]):
        cases.append((shape, n, blocks, ck, FP32, None))
    for (shape, blocks), ck, dt in itertools.product(layouts(), ["vec", "block"], [FP16, BF16]):
        cases.append((shape, 3, blocks, ck, dt, None))
    for (shape, blocks), (dt, od) in itertools.product(layouts(), [(BF16, FP32), (FP32, FP16)]):
        cases.append((shape, 3, blocks, "block", dt, od))
    return cases + multi_tile_cases()


def multi_tile_cases():
    """5000 elements: several tiles/programs per block, blocks that are multiples of a tile, and
    more tasks than one Triton launch takes (N=9 > 8)."""
    return [((4, 1250), n, blocks, ck, FP32, None)
            for (blocks, ck), n in itertools.product([(None, "vec"), (2048, "block"), (1024, "vec")], [3, 9])]


def triton_forward_cases():
    """A reduced matrix: every layout once, N and dtypes varied on a few of them."""
    cases = [(shape, 3, blocks, "block" if i % 2 else "vec", FP32, None)
             for i, (shape, blocks) in enumerate(layouts(shapes=[(7,), (3, 517), (5, 1, 9), (0, 4), ()],
                                                         blocks=[None, "rows", 7]))]
    cases += [((7,), 1, None, "vec", FP32, None), ((7,), 9, 7, "block", FP32, None),
              ((5, 1, 9), 5, "rows", "block", FP32, None), ((1,), 3, BIG_BLOCK, "block", FP32, None)]
    for dt in (FP16, BF16):
        cases += [((3, 517), 3, "rows", "block", dt, None), ((5, 1, 9), 3, 7, "vec", dt, None)]
    cases += [((3, 517), 3, 7, "block", BF16, FP32), ((5, 1, 9), 3, None, "vec", FP32, FP16)]
    return cases + multi_tile_cases()


def backend_cases(make_full, make_triton):
    params = []
    for backend in BACKENDS:
        cases = make_triton() if interpreted(backend) else make_full()
        for c in cases:
            params.append(pytest.param(backend, *c, id=f"{backend}-{case_id(*c)}"))
    return params


FORWARD_PARAMS = backend_cases(forward_cases, triton_forward_cases)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("backend,shape,n,blocks,coeff_kind,dtype,out_dtype", FORWARD_PARAMS)
def test_forward_matches_reference(backend, shape, n, blocks, coeff_kind, dtype, out_dtype, from_models, rng):
    dev = require_backend(backend)
    base, deltas, coeffs = make_inputs(shape, n, dtype, blocks, coeff_kind, rng, dev)
    out = public_fn(from_models)(base, deltas, coeffs, blocks=blocks, out_dtype=out_dtype, backend=backend)
    assert pyops.last_choice(OP).backend == backend
    expected = reference(base, deltas, coeffs, blocks, from_models, out_dtype)
    assert out.device == base.device
    assert_close(out.cpu(), expected, tolerance_for(expected.dtype))


def _list_cases():
    return [((7,), 3, None, "vec", FP32, None), ((3, 517), 5, 7, "block", FP16, None),
            ((5, 1, 9), 1, "rows", "block", BF16, None)]


@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("backend,shape,n,blocks,coeff_kind,dtype,out_dtype", backend_cases(_list_cases, _list_cases))
def test_list_deltas_match_stacked(backend, shape, n, blocks, coeff_kind, dtype, out_dtype, from_models, rng):
    """A list of N tensors gives the stacked tensor's answer, bit for bit, and the reference's."""
    dev = require_backend(backend)
    base, deltas, coeffs = make_inputs(shape, n, dtype, blocks, coeff_kind, rng, dev)
    fn = public_fn(from_models)
    stacked = fn(base, deltas, coeffs, blocks=blocks, backend=backend)
    listed = fn(base, [d.clone() for d in deltas.unbind(0)], coeffs, blocks=blocks, backend=backend)
    assert_bitwise_equal(listed, stacked, "list vs stacked")
    assert_close_dtype(listed.cpu(), reference(base, deltas, coeffs, blocks, from_models))


@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_coeffs_as_list_of_floats(backend, from_models, rng):
    dev = require_backend(backend)
    base, deltas, coeffs = make_inputs((3, 5), 3, FP32, None, "vec", rng, dev)
    as_list = [float(c) for c in coeffs.cpu()]
    out = public_fn(from_models)(base, deltas, as_list, backend=backend)
    assert_bitwise_equal(out, public_fn(from_models)(base, deltas, coeffs, backend=backend))


@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("coeff_dtype", [FP16, BF16, FP64], ids=fmt_dtype)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_coeffs(backend, coeff_dtype, from_models, rng):
    """coeffs may have any float dtype; the reference defines them as converted to fp32."""
    dev = require_backend(backend)
    base, deltas, coeffs = make_inputs((3, 17), 3, FP32, 7, "block", rng, dev)
    coeffs = coeffs.to(coeff_dtype)
    out = public_fn(from_models)(base, deltas, coeffs, blocks=7, backend=backend)
    assert_close_dtype(out.cpu(), reference(base, deltas, coeffs, 7, from_models))


# ------------------------------------------------------------------------------------------------
# Non-contiguous inputs
# ------------------------------------------------------------------------------------------------

def _noncontiguous_inputs(kind, dtype, gen, dev):
    """base [6, 11] and deltas / coeffs as strided views; returns (base, deltas, coeffs, blocks)."""
    n, shape, blocks = 3, (6, 11), 5
    nb = n_blocks_for(blocks, shape)
    if kind == "transposed":
        base = randn((11, 6), dtype, gen, dev).t()
        deltas = randn((n, 11, 6), dtype, gen, dev).transpose(1, 2)
        coeffs = randn((nb, n), FP32, gen, dev).t()
    elif kind == "sliced":
        base = randn((6, 22), dtype, gen, dev)[:, ::2]
        deltas = randn((2 * n, 6, 22), dtype, gen, dev)[::2, :, 1::2]
        coeffs = randn((n, 2 * nb), FP32, gen, dev)[:, 1::2]
    else:  # "list": a list of strided views of different kinds
        base = randn((6, 11, 2), dtype, gen, dev)[..., 1]
        deltas = [randn((11, 6), dtype, gen, dev).t(), randn((6, 13), dtype, gen, dev)[:, 2:],
                  randn((12, 11), dtype, gen, dev)[1::2]]
        coeffs = randn((n, nb + 1), FP32, gen, dev)[:, :nb]
    assert not base.is_contiguous() and not coeffs.is_contiguous()
    assert not all(d.is_contiguous() for d in deltas) if isinstance(deltas, list) else not deltas.is_contiguous()
    return base, deltas, coeffs, blocks


NONCONTIG_PARAMS = [pytest.param(b, k, dt, id=f"{b}-{k}-{fmt_dtype(dt)}") for b in BACKENDS
                    for k in ("transposed", "sliced", "list") for dt in (FP32, BF16)]


@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("backend,kind,dtype", NONCONTIG_PARAMS)
def test_noncontiguous_inputs_same_answer(backend, kind, dtype, from_models, rng):
    dev = require_backend(backend)
    base, deltas, coeffs, blocks = _noncontiguous_inputs(kind, dtype, rng, dev)
    fn = public_fn(from_models)
    out = fn(base, deltas, coeffs, blocks=blocks, backend=backend)
    contig = fn(base.contiguous(), [d.contiguous() for d in deltas] if isinstance(deltas, list) else deltas.contiguous(),
                coeffs.contiguous(), blocks=blocks, backend=backend)
    assert out.is_contiguous()
    assert_bitwise_equal(out, contig, "non-contiguous vs contiguous")
    assert_close_dtype(out.cpu(), reference(base, deltas, coeffs, blocks, from_models))


@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("backend,kind,dtype", NONCONTIG_PARAMS)
def test_inputs_not_modified(backend, kind, dtype, from_models, rng):
    dev = require_backend(backend)
    base, deltas, coeffs, blocks = _noncontiguous_inputs(kind, dtype, rng, dev)
    items = list(deltas)
    before = snapshot([base, coeffs, *items])
    public_fn(from_models)(base, deltas, coeffs, blocks=blocks, backend=backend)
    for name, now, was in zip(["base", "coeffs"] + [f"deltas[{i}]" for i in range(len(items))],
                              [base, coeffs, *items], before):
        assert_bitwise_equal(now, was, name)


# ------------------------------------------------------------------------------------------------
# out=
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("dtype,out_dtype", [(FP32, FP32), (BF16, FP32), (FP32, FP16)],
                         ids=lambda d: fmt_dtype(d))
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_preallocated(backend, dtype, out_dtype, from_models, rng):
    """out= is filled and returned (the same object); its dtype sets the output dtype."""
    dev = require_backend(backend)
    base, deltas, coeffs = make_inputs((3, 517), 3, dtype, "rows", "block", rng, dev)
    out = torch.full((3, 517), float("nan"), dtype=out_dtype, device=dev)
    result = public_fn(from_models)(base, deltas, coeffs, blocks="rows", out=out, backend=backend)
    assert result is out
    assert_close(out.cpu(), reference(base, deltas, coeffs, "rows", from_models, out_dtype), tolerance_for(out_dtype))


@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_empty_tensor(backend, from_models, rng):
    dev = require_backend(backend)
    base, deltas, coeffs = make_inputs((0, 4), 3, FP32, "rows", "block", rng, dev)
    out = torch.empty((0, 4), device=dev)
    assert public_fn(from_models)(base, deltas, coeffs, blocks="rows", out=out, backend=backend) is out


@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=fmt_dtype)
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_is_base_inplace(backend, dtype, from_models, rng):
    """out=base updates base in place with the merged values."""
    dev = require_backend(backend)
    base, deltas, coeffs = make_inputs((5, 1, 9), 3, dtype, 7, "block", rng, dev)
    expected = reference(base, deltas, coeffs, 7, from_models)
    result = public_fn(from_models)(base, deltas, coeffs, blocks=7, out=base, backend=backend)
    assert result is base
    assert_close_dtype(base.cpu(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_with_requires_grad_raises(backend, rng):
    dev = require_backend(backend)
    base, deltas, coeffs = make_inputs((7,), 3, FP32, None, "vec", rng, dev)
    coeffs.requires_grad_(True)
    with pytest.raises(RuntimeError, match="out="):
        pyops.task_arithmetic(base, deltas, coeffs, out=torch.empty_like(base), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_with_requires_grad_under_no_grad(backend, rng):
    """Under no_grad nothing is recorded, so out= is allowed with inputs that require grad."""
    dev = require_backend(backend)
    base, deltas, coeffs = make_inputs((7,), 3, FP32, None, "vec", rng, dev)
    coeffs.requires_grad_(True)
    out = torch.empty_like(base)
    with torch.no_grad():
        assert pyops.task_arithmetic(base, deltas, coeffs, out=out, backend=backend) is out
    assert_close_dtype(out.cpu(), reference(base, deltas, coeffs.detach(), None, False))


OUT_MSG = r"^out(\.dtype)?: "  # the message starts with the argument's name


def _bad_outs():
    return {
        "shape": lambda b: torch.empty(b.shape[0], b.shape[1] + 1),
        "dtype": lambda b: torch.empty(b.shape, dtype=FP16),
        "int-dtype": lambda b: torch.empty(b.shape, dtype=torch.int32),
        "device": lambda b: torch.empty(b.shape, device="meta"),
        "noncontiguous": lambda b: torch.empty(b.shape[1], b.shape[0]).t(),
        "overlap": lambda b: None,  # filled in the test: a view overlapping a delta
        "not-a-tensor": lambda b: [0.0] * b.numel(),
    }


@pytest.mark.parametrize("kind,exc", [("shape", ValueError), ("dtype", TypeError),
                                      ("int-dtype", TypeError),
                                      ("device", ValueError), ("noncontiguous", ValueError),
                                      ("overlap", ValueError), ("not-a-tensor", TypeError)],
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_bad_out_names_out(kind, exc, rng):
    base, deltas, coeffs = make_inputs((4, 6), 2, FP32, None, "vec", rng)
    out = _bad_outs()[kind](base)
    if kind == "dtype":  # out_dtype given and out disagrees
        with pytest.raises(exc, match=OUT_MSG):
            pyops.task_arithmetic(base, deltas, coeffs, out=out, out_dtype=FP32)
        return
    if kind == "overlap":
        storage = torch.zeros(2 * base.numel())
        deltas = [storage[: base.numel()].view(base.shape), deltas[1]]
        out = storage[base.numel() // 2: base.numel() // 2 + base.numel()].view(base.shape)
    with pytest.raises(exc, match=OUT_MSG):
        pyops.task_arithmetic(base, deltas, coeffs, out=out)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------

GRAD_LAYOUTS = [((7,), None), ((1,), 7), ((3, 517), "rows"), ((3, 517), 7), ((5, 1, 9), BIG_BLOCK),
                ((0, 4), "rows"), ((), None), ((4, 1250), None), ((4, 1250), 2048)]
TRITON_GRAD_LAYOUTS = [((7,), None), ((3, 517), "rows"), ((5, 1, 9), 7), ((0, 4), "rows"), ((), None),
                       ((4, 1250), None), ((4, 1250), 2048)]
REQUIRES = ["all", "coeffs", "base", "deltas", "base+coeffs"]


def grad_cases(triton: bool):
    cases = []
    lay = TRITON_GRAD_LAYOUTS if triton else GRAD_LAYOUTS
    dtypes = [FP32, FP16, BF16]
    for i, ((shape, blocks), dt) in enumerate(itertools.product(lay, dtypes)):
        if triton and dt != FP32 and shape != (3, 517):
            continue
        cases.append((shape, 3 if shape != (1,) else 1, blocks, "block" if i % 2 else "vec", dt, "all",
                      "list" if i % 3 == 1 else "stacked"))
    for req in REQUIRES[1:]:
        cases.append(((3, 517), 5, 7, "block", FP32, req, "stacked"))
    cases.append(((5, 1, 9), 3, "rows", "vec", FP32, "deltas", "list"))
    # more tasks than one Triton launch takes (N=9 > 8): chunked launches, Σc over every chunk
    cases.append(((3, 517), 9, 7, "block", FP32, "all", "list"))
    cases.append(((4, 1250), 9, None, "vec", FP32, "base+coeffs", "stacked"))
    return cases


GRAD_PARAMS = [pytest.param(b, *c, id=f"{b}-{fmt_shape(c[0])}-N{c[1]}-{fmt_blocks(c[2])}-c{c[3]}-{fmt_dtype(c[4])}"
                            f"-grad_{c[5]}-{c[6]}")
               for b in BACKENDS for c in grad_cases(interpreted(b))]


def _leaves(base, deltas, coeffs, requires, deltas_kind):
    """Fresh leaves; deltas as one stacked leaf or a list of leaves; `requires` picks which need grad."""
    need = {"base": requires in ("all", "base", "base+coeffs"), "deltas": requires in ("all", "deltas"),
            "coeffs": requires in ("all", "coeffs", "base+coeffs")}
    b = base.detach().clone().requires_grad_(need["base"])
    c = coeffs.detach().clone().requires_grad_(need["coeffs"])
    if deltas_kind == "list":
        d = [x.detach().clone().requires_grad_(need["deltas"]) for x in deltas.unbind(0)]
    else:
        d = deltas.detach().clone().requires_grad_(need["deltas"])
    return b, d, c, need


def _grads(b, d, c, need):
    out = {}
    if need["base"]:
        out["base"] = b.grad
    if need["deltas"]:
        ds = d if isinstance(d, list) else [d]
        for i, x in enumerate(ds):
            out[f"deltas[{i}]" if isinstance(d, list) else "deltas"] = x.grad
    if need["coeffs"]:
        out["coeffs"] = c.grad
    return out


@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("backend,shape,n,blocks,coeff_kind,dtype,requires,deltas_kind", GRAD_PARAMS)
def test_gradients_match_reference(backend, shape, n, blocks, coeff_kind, dtype, requires, deltas_kind,
                                   from_models, rng):
    dev = require_backend(backend)
    base, deltas, coeffs = make_inputs(shape, n, dtype, blocks, coeff_kind, rng, dev)
    grad_out = randn(shape, dtype, rng, dev)

    b, d, c, need = _leaves(base, deltas, coeffs, requires, deltas_kind)
    y = public_fn(from_models)(b, d, c, blocks=blocks, backend=backend)
    assert y.requires_grad
    y.backward(grad_out)
    got = _grads(b, d, c, need)

    rb, rd, rc, _ = _leaves(base.cpu(), deltas.cpu(), coeffs.cpu(), requires, deltas_kind)
    ry = ref_mod.task_arithmetic(rb, list(rd) if isinstance(rd, list) else list(rd.unbind(0)), rc,
                                 block_size=block_size_for(blocks, shape), from_models=from_models)
    ry.backward(grad_out.cpu())
    expected = _grads(rb, rd, rc, need)

    assert set(got) == set(expected)
    for name, g in got.items():
        assert g is not None, f"{name}: no gradient"
        tol = REDUCTION_TOL if name == "coeffs" else tolerance_for(expected[name].dtype)
        assert_close(g.cpu(), expected[name], tol, f"grad of {name}")
    for name, leaf in (("base", b), ("coeffs", c)):
        if not need[name]:
            assert leaf.grad is None, f"{name} does not require grad but got one"


# ------------------------------------------------------------------------------------------------
# gradcheck of the reference, and the C++ backend against the float64 reference
# ------------------------------------------------------------------------------------------------

GRADCHECK_LAYOUTS = [((5,), None, "vec"), ((3, 4), "rows", "block"), ((2, 5), 3, "block"), ((2, 3), 4, "vec"),
                     ((), None, "block")]


@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("shape,blocks,coeff_kind", GRADCHECK_LAYOUTS,
                         ids=[f"{fmt_shape(s)}-{fmt_blocks(b)}-c{k}" for s, b, k in GRADCHECK_LAYOUTS])
def test_reference_gradcheck_fp64(shape, blocks, coeff_kind, from_models, rng):
    base, deltas, coeffs = make_inputs(shape, 3, FP64, blocks, coeff_kind, rng)
    coeffs = coeffs.double()
    bs = block_size_for(blocks, shape)

    def f(b, d0, d1, d2, c):
        return ref_mod.task_arithmetic(b, [d0, d1, d2], c, block_size=bs, from_models=from_models)

    inputs = [base.requires_grad_(), *[d.clone().requires_grad_() for d in deltas.unbind(0)], coeffs.requires_grad_()]
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


# (300, 700) spans several 64k-element work items of the C++ kernels, whole and in 70000-blocks.
CPU64_LAYOUTS = [((7,), None, "vec"), ((3, 517), "rows", "block"), ((5, 1, 9), 7, "block"), ((300, 70), 4000, "block"),
                 ((), None, "vec"), ((300, 700), None, "vec"), ((300, 700), 70000, "block")]


@pytest.mark.parametrize("from_models", FUNCS, ids=FUNC_IDS)
@pytest.mark.parametrize("shape,blocks,coeff_kind", CPU64_LAYOUTS,
                         ids=[f"{fmt_shape(s)}-{fmt_blocks(b)}-c{k}" for s, b, k in CPU64_LAYOUTS])
def test_cpu_gradients_match_fp64_reference(shape, blocks, coeff_kind, from_models, rng):
    """gradcheck needs fp64, which the C++ kernels do not take: their fp32 forward and gradients are
    judged against the reference's exact (fp64) values instead."""
    dev = require_backend("cpu")
    base, deltas, coeffs = make_inputs(shape, 3, FP32, blocks, coeff_kind, rng, dev)
    grad_out = randn(shape, FP32, rng, dev)

    b, d, c, need = _leaves(base, deltas, coeffs, "all", "list")
    y = public_fn(from_models)(b, d, c, blocks=blocks, backend="cpu")
    y.backward(grad_out)
    got = _grads(b, d, c, need)

    rb, rd, rc, _ = _leaves(base.double(), deltas.double(), coeffs.double(), "all", "list")
    ry = ref_mod.task_arithmetic(rb, rd, rc, block_size=block_size_for(blocks, shape), from_models=from_models)
    ry.backward(grad_out.double())
    expected = _grads(rb, rd, rc, need)

    assert_close(y.detach(), ry.detach(), tolerance_for(FP32), "forward", check_dtype=False)
    for name, g in got.items():
        tol = REDUCTION_TOL if name == "coeffs" else tolerance_for(FP32)
        assert_close(g, expected[name], tol, f"grad of {name}", check_dtype=False)
