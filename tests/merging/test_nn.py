"""`pyops.nn.TaskVectorComposition`: learned task-vector merging on the fused op.

Every check is against a plain-PyTorch composition written out here, independently of the
package: per-element coefficients expanded by hand from the granularity, ``base + Σᵢ λᵢ·τᵢ``
through autograd, and the model run with `torch.func.functional_call`. Tolerances come from
`pyops.testing` (fp32 for outputs and merged weights, REDUCTION_TOL for λ gradients).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pyops
from pyops.nn import TaskVectorComposition
from _support import REDUCTION_TOL, assert_close, randn, tolerance_for

FP32 = torch.float32
N_TASKS = 3
GRANULARITIES = [
    pytest.param("tensor", id="tensor"),
    pytest.param("rows", id="rows"),
    pytest.param(("chunks", 7), id="chunks7"),
    pytest.param(("chunks", 1000), id="chunks1000"),  # one chunk larger than every parameter
]


class Net(nn.Module):
    """Small, deliberately odd model: 2-d, 3-d, 1-d, 0-d and non-contiguous parameters, a
    buffer, and a non-floating parameter (which is never merged)."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.lin1 = nn.Linear(6, 10)
        self.conv = nn.Conv1d(1, 2, 3)
        self.ln = nn.LayerNorm(10)
        self.head = nn.Linear(10, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.proj = nn.Parameter(randn((3, 10), FP32, gen).t())  # [10, 3], non-contiguous
        self.register_buffer("shift", randn((10,), FP32, gen))
        self.counter = nn.Parameter(torch.arange(4), requires_grad=False)  # int64
        with torch.no_grad():
            for p in self.parameters():
                if p.is_floating_point():
                    p.copy_(randn(p.shape, FP32, gen))

    def forward(self, x, *, offset=0.0):
        h = self.ln(torch.tanh(self.lin1(x)) * self.scale + self.shift)
        c = self.conv(h[:, None, :]).mean(dim=(1, 2))[:, None]
        return self.head(h) + h @ self.proj + c + offset + self.counter.float().sum() * 0


def floating_params(module: nn.Module) -> dict:
    return {n: p for n, p in module.named_parameters() if p.is_floating_point()}


def make_setup(gen, n=N_TASKS):
    base = Net(gen)
    taus = [{name: randn(p.shape, FP32, gen, scale=0.1) for name, p in floating_params(base).items()}
            for _ in range(n)]
    return base, taus


def per_element(lam: torch.Tensor, shape, granularity) -> torch.Tensor:
    """λ [N, n_blocks] expanded to [N, *shape], written out from the granularity's definition."""
    n = lam.shape[0]
    numel = math.prod(shape)
    if granularity == "tensor" or (granularity == "rows" and len(shape) < 2):
        assert lam.shape == (n, 1)
        return lam.reshape(n, *([1] * len(shape))).expand(n, *shape)
    if granularity == "rows":
        assert lam.shape == (n, shape[0])
        return lam.reshape(n, shape[0], *([1] * (len(shape) - 1))).expand(n, *shape)
    chunk = granularity[1]
    assert lam.shape == (n, -(-numel // chunk))
    return lam[:, torch.arange(numel) // chunk].reshape(n, *shape)


def plain_merged(base_params: dict, taus: list, lams: dict, granularity) -> dict:
    """base + Σᵢ λᵢ ⊙ τᵢ through ordinary autograd."""
    out = {}
    for name, lam in lams.items():
        b = base_params[name]
        coeff = per_element(lam, b.shape, granularity)
        out[name] = b + sum(coeff[i] * taus[i][name] for i in range(len(taus)))
    return out


def randomise_coeffs(comp, gen):
    with torch.no_grad():
        for c in comp.coefficients().values():
            c.copy_(randn(c.shape, FP32, gen, scale=0.5))


def finetuned_models(base, taus):
    models = []
    for tv in taus:
        m = copy.deepcopy(base)
        with torch.no_grad():
            for name, t in tv.items():
                m.get_parameter(name).add_(t)
        models.append(m)
    return models


# ------------------------------------------------------------------------------------------------
# Merged parameters and λ gradients against the plain-PyTorch composition
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_merged_parameters_match_hand_computation(granularity, rng):
    base, taus = make_setup(rng)
    base_values = {n: p.detach().clone() for n, p in floating_params(base).items()}
    comp = TaskVectorComposition(base, taus, granularity=granularity)
    randomise_coeffs(comp, rng)
    lams = {n: c.detach() for n, c in comp.coefficients().items()}
    expected = plain_merged(base_values, taus, lams, granularity)
    merged = comp.merged_parameters()
    assert sorted(merged) == sorted(expected)
    for name, m in merged.items():
        assert_close(m, expected[name], tolerance_for(FP32), f"merged {name}")
    # The non-floating parameter is not merged and has no coefficients.
    assert "counter" not in merged and "counter" not in comp.coefficients()
    # The reference backend gives the same merge.
    comp.backend = "reference"
    for name, m in comp.merged_parameters().items():
        assert_close(m, expected[name], tolerance_for(FP32), f"merged {name} (reference backend)")


def test_coefficient_shapes_and_init(rng):
    base, taus = make_setup(rng)
    comp = TaskVectorComposition(base, taus, granularity="rows", init=[0.1, 0.2, 0.7])
    shapes = {n: tuple(c.shape) for n, c in comp.coefficients().items()}
    assert shapes == {"lin1.weight": (3, 10), "lin1.bias": (3, 1), "conv.weight": (3, 2), "conv.bias": (3, 1),
                      "ln.weight": (3, 1), "ln.bias": (3, 1), "head.weight": (3, 3), "head.bias": (3, 1),
                      "scale": (3, 1), "proj": (3, 10)}
    assert comp.n_coefficients() == sum(math.prod(s) for s in shapes.values())
    for c in comp.coefficients().values():
        assert c.dtype == FP32 and c.requires_grad
        assert torch.equal(c, torch.tensor([0.1, 0.2, 0.7])[:, None].expand_as(c))
    whole = TaskVectorComposition(make_setup(rng)[0], taus)
    assert whole.n_coefficients() == 3 * 10
    assert all(bool((c == 0.3).all()) for c in whole.coefficients().values())
    chunks = TaskVectorComposition(make_setup(rng)[0], taus, granularity=("chunks", 4))
    assert tuple(chunks.coefficients()["lin1.weight"].shape) == (3, 15)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_coefficient_gradients_match_plain_autograd(granularity, rng):
    base, taus = make_setup(rng)
    comp = TaskVectorComposition(base, taus, granularity=granularity)
    randomise_coeffs(comp, rng)
    x = randn((5, 6), FP32, rng)
    w = randn((5, 3), FP32, rng)

    loss = (comp(x, offset=0.25).square() * w).sum()
    loss.backward()

    lams = {n: c.detach().clone().requires_grad_() for n, c in comp.coefficients().items()}
    base_values = {n: p.detach() for n, p in floating_params(base).items()}
    merged = plain_merged(base_values, taus, lams, granularity)
    out = torch.func.functional_call(base, merged, (x,), {"offset": 0.25})
    loss_ref = (out.square() * w).sum()
    loss_ref.backward()

    assert_close(loss.detach(), loss_ref.detach(), tolerance_for(FP32), "loss")
    for name, c in comp.coefficients().items():
        assert c.grad is not None, f"no gradient reached the coefficients of {name}"
        assert_close(c.grad, lams[name].grad, REDUCTION_TOL, f"grad of λ[{name}]")


def test_only_coefficients_get_gradients(rng):
    base, taus = make_setup(rng)
    comp = TaskVectorComposition(base, taus, granularity="rows")
    trainable = sorted(n for n, p in comp.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"coeffs.{n.replace('.', '__')}" for n in comp.coefficients())
    comp(randn((4, 6), FP32, rng)).sum().backward()
    for name, p in base.named_parameters():
        assert not p.requires_grad, f"base parameter {name} should be frozen"
        assert p.grad is None, f"base parameter {name} got a gradient"
    for name, b in comp.task_vectors.named_buffers():
        assert not b.requires_grad and b.grad is None, f"task vector {name} requires/got a gradient"
    assert all(c.grad is not None for c in comp.coefficients().values())


@pytest.mark.parametrize("from_models", [False, True], ids=["task_vectors", "models"])
def test_learnable_base_gets_plain_autograd_gradients(from_models, rng):
    base, taus = make_setup(rng)
    base.lin1.bias.requires_grad_(False)  # learnable_base keeps the user's flags
    src = finetuned_models(base, taus) if from_models else taus
    comp = TaskVectorComposition(base, src, granularity=("chunks", 5), learnable_base=True)
    randomise_coeffs(comp, rng)
    x = randn((4, 6), FP32, rng)
    comp(x).square().sum().backward()

    leaves = {n: p.detach().clone().requires_grad_(n != "lin1.bias") for n, p in floating_params(base).items()}
    lams = {n: c.detach().clone().requires_grad_() for n, c in comp.coefficients().items()}
    if from_models:
        # τᵢ = θᵢ − base with θᵢ fixed: the base's gradient is g·(1 − Σᵢ λᵢ).
        thetas = [{n: p.detach() for n, p in floating_params(m).items()} for m in src]
        merged = {}
        for name, lam in lams.items():
            coeff = per_element(lam, leaves[name].shape, ("chunks", 5))
            merged[name] = leaves[name] + sum(coeff[i] * (thetas[i][name] - leaves[name]) for i in range(N_TASKS))
    else:
        merged = plain_merged(leaves, taus, lams, ("chunks", 5))
    torch.func.functional_call(base, merged, (x,)).square().sum().backward()

    for name, p in floating_params(base).items():
        if name == "lin1.bias":
            assert not p.requires_grad and p.grad is None
            continue
        assert p.requires_grad
        assert_close(p.grad, leaves[name].grad, REDUCTION_TOL, f"grad of base {name}")
    for name, c in comp.coefficients().items():
        assert_close(c.grad, lams[name].grad, REDUCTION_TOL, f"grad of λ[{name}]")


# ------------------------------------------------------------------------------------------------
# The fine-tuned-models form
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["tensor", "rows"])
def test_models_form_equals_task_vector_form(granularity, rng):
    base, taus = make_setup(rng)
    models = finetuned_models(base, taus)
    # The fine-tuned models' task vectors, exactly as the kernel forms them (θᵢ − base in fp32).
    exact_taus = [{n: p.detach() - base.get_parameter(n).detach() for n, p in floating_params(m).items()}
                  for m in models]
    comp_tv = TaskVectorComposition(base, exact_taus, granularity=granularity)
    comp_m = TaskVectorComposition(copy.deepcopy(base), models, granularity=granularity)
    assert comp_m.from_models and not comp_tv.from_models
    randomise_coeffs(comp_tv, rng)
    comp_m.load_state_dict(comp_tv.state_dict())
    m_tv, m_m = comp_tv.merged_parameters(), comp_m.merged_parameters()
    assert sorted(m_tv) == sorted(m_m)
    for name in m_tv:
        assert_close(m_m[name], m_tv[name], tolerance_for(FP32), f"merged {name}")
    x = randn((4, 6), FP32, rng)
    y_tv, y_m = comp_tv(x), comp_m(x)
    assert_close(y_m, y_tv, tolerance_for(FP32), "forward")
    y_tv.sum().backward()
    y_m.sum().backward()
    for name, c in comp_m.coefficients().items():
        assert_close(c.grad, comp_tv.coefficients()[name].grad, REDUCTION_TOL, f"grad of λ[{name}]")
    # the stacked fine-tuned weights are held, not their differences
    assert torch.equal(comp_m.task_vectors.lin1__weight[1], models[1].lin1.weight.detach())


# ------------------------------------------------------------------------------------------------
# State dict, deployment, module plumbing
# ------------------------------------------------------------------------------------------------

def test_state_dict_keys_and_round_trip(rng):
    base, taus = make_setup(rng)
    comp = TaskVectorComposition(base, taus, granularity="rows")
    randomise_coeffs(comp, rng)
    sd = comp.state_dict()
    assert all(k.startswith("base_module.") or k.startswith("coeffs.") for k in sd), sorted(sd)
    assert "coeffs.lin1__weight" in sd and "coeffs.scale" in sd
    assert not any(k.startswith("task_vectors") for k in sd), "task vectors must not be saved"
    other = TaskVectorComposition(copy.deepcopy(base), taus, granularity="rows")
    other.load_state_dict(sd)
    x = randn((3, 6), FP32, rng)
    assert torch.equal(other(x), comp(x))


@pytest.mark.parametrize("granularity", ["tensor", ("chunks", 7)], ids=["tensor", "chunks7"])
@pytest.mark.parametrize("from_models", [False, True], ids=["task_vectors", "models"])
def test_merge_and_unload_matches_forward(granularity, from_models, rng):
    base, taus = make_setup(rng)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    src = finetuned_models(base, taus) if from_models else taus
    comp = TaskVectorComposition(base, src, granularity=granularity)
    randomise_coeffs(comp, rng)
    deployed = comp.merge_and_unload()
    assert type(deployed) is Net and deployed is not base
    x = randn((5, 6), FP32, rng)
    with torch.no_grad():
        assert_close(deployed(x), comp(x), tolerance_for(FP32), "merge_and_unload output")
    merged = comp.merged_parameters()
    for name, p in deployed.named_parameters():
        assert p.data_ptr() != base.get_parameter(name).data_ptr(), f"{name} shares storage with the base"
        assert p.requires_grad == (name != "counter"), f"{name}: requires_grad not restored"
        if name in merged:
            assert_close(p.detach(), merged[name].detach(), tolerance_for(FP32), f"deployed {name}")
    assert not deployed.proj.is_contiguous()  # written through the copy_ fallback, not out=
    for name, p in base.named_parameters():
        assert torch.equal(p, before[name]), f"merge_and_unload changed base parameter {name}"


def test_to_moves_task_vectors_and_dtype_follows(rng):
    base, taus = make_setup(rng)
    comp = TaskVectorComposition(base, taus).to(torch.float64)
    assert comp.task_vectors.lin1__weight.dtype == torch.float64
    assert comp.coefficients()["lin1.weight"].dtype == torch.float64
    comp.backend = "reference"  # float64 runs on the reference only
    y = comp(randn((2, 6), FP32, rng).double())
    assert y.dtype == torch.float64


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_training_step(rng, fresh_dynamo):
    """A loss function calling the module compiles to one graph holding the fused op (backend
    'auto' picks the C++ CPU kernel), and its loss and λ gradients equal eager mode's."""
    if pyops._native.cpu_module is None:
        pytest.skip(f"the C++ CPU module is not available: {pyops._native.cpu_missing_reason}")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4))
    taus = [{n: randn(p.shape, FP32, rng, scale=0.1) for n, p in base.named_parameters()} for _ in range(2)]
    comp = TaskVectorComposition(base, taus, granularity="rows")
    x, y = randn((8, 6), FP32, rng), torch.randint(0, 4, (8,), generator=rng)

    def loss_fn(x, y):
        return nn.functional.cross_entropy(comp(x), y)

    eager = loss_fn(x, y)
    eager.backward()
    assert pyops.last_choice("task_arithmetic").backend == "cpu"
    eager_grads = {n: c.grad.clone() for n, c in comp.coefficients().items()}
    comp.zero_grad()

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=recording_backend)
    loss = compiled(x, y)
    loss.backward()
    assert len(graphs) == 1
    assert "pyops.task_arithmetic" in graphs[0].code, "the fused op is not in the compiled graph"
    assert_close(loss.detach(), eager.detach(), tolerance_for(FP32), "compiled loss")
    for name, c in comp.coefficients().items():
        assert_close(c.grad, eager_grads[name], REDUCTION_TOL, f"compiled grad of λ[{name}]")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_bad_base_module(rng):
    _, taus = make_setup(rng)
    with pytest.raises(TypeError, match=r"^base_module: expected an nn.Module, got dict"):
        TaskVectorComposition({"w": torch.zeros(2)}, taus)


def test_no_tasks(rng):
    base, _ = make_setup(rng)
    with pytest.raises(ValueError, match=r"^task_vectors: expected at least one task \(N >= 1\)"):
        TaskVectorComposition(base, [])
    with pytest.raises(TypeError, match=r"^task_vectors: expected a list of N dicts"):
        TaskVectorComposition(base, {"lin1.weight": torch.zeros(10, 6)})
    with pytest.raises(ValueError, match=r"^task_vectors: no parameter to merge"):
        TaskVectorComposition(base, [{}, {}])


def test_mixed_task_vector_forms(rng):
    base, taus = make_setup(rng)
    with pytest.raises(TypeError, match=r"^task_vectors: expected a list of dicts .* not a mix"):
        TaskVectorComposition(base, [taus[0], copy.deepcopy(base)])


def test_task_vector_shape_mismatch(rng):
    base, taus = make_setup(rng)
    taus[1]["head.weight"] = torch.zeros(3, 11)
    with pytest.raises(ValueError, match=r"^task_vectors\[1\]\['head.weight'\]: expected .*shape to be \[3, 10\].*"
                                         r"got \[3, 11\]"):
        TaskVectorComposition(base, taus)


def test_task_vector_dtype_mismatch(rng):
    base, taus = make_setup(rng)
    taus[2]["lin1.bias"] = taus[2]["lin1.bias"].half()
    with pytest.raises(TypeError, match=r"^task_vectors\[2\]\['lin1.bias'\]: expected dtype torch.float32.*"
                                        r"got torch.float16"):
        TaskVectorComposition(base, taus)


def test_task_vector_not_a_tensor(rng):
    base, taus = make_setup(rng)
    taus[0]["scale"] = 0.5
    with pytest.raises(TypeError, match=r"^task_vectors\[0\]\['scale'\]: expected a torch.Tensor, got float"):
        TaskVectorComposition(base, taus)


def test_task_vector_keys(rng):
    base, taus = make_setup(rng)
    bad = [dict(t) for t in taus]
    bad[0]["shift"] = torch.zeros(10)  # a buffer
    with pytest.raises(ValueError, match=r"^task_vectors\[0\]\['shift'\]: 'shift' is not a parameter of base_module"):
        TaskVectorComposition(base, bad)
    bad = [dict(t) for t in taus]
    del bad[1]["ln.bias"]
    with pytest.raises(ValueError, match=r"^task_vectors\[1\]: expected the same parameter names .*missing \['ln.bias'\]"):
        TaskVectorComposition(base, bad)
    bad = [dict(t) for t in taus]
    bad[0]["counter"] = torch.zeros(4, dtype=torch.int64)
    for t in bad[1:]:
        t["counter"] = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"^task_vectors: parameter 'counter' of base_module has dtype torch.int64"):
        TaskVectorComposition(base, bad)


def test_subset_of_parameters_leaves_the_rest_unchanged(rng):
    base, taus = make_setup(rng)
    subset = [{"head.weight": t["head.weight"]} for t in taus]
    comp = TaskVectorComposition(base, subset, init=[1.0, 0.0, 0.0])
    assert list(comp.coefficients()) == ["head.weight"]
    x = randn((3, 6), FP32, rng)
    expected = torch.func.functional_call(base, {"head.weight": base.head.weight + taus[0]["head.weight"]}, (x,))
    assert_close(comp(x), expected.detach(), tolerance_for(FP32), "forward with one merged parameter")


def test_model_architecture_mismatch(rng):
    base, _ = make_setup(rng)
    other = nn.Sequential(nn.Linear(6, 10))
    with pytest.raises(ValueError, match=r"^task_vectors\[1\]: expected a fine-tuned model with the parameters of "
                                         r"base_module, got missing \[.*'lin1.weight'.*; unexpected \['0.weight'"):
        TaskVectorComposition(base, [copy.deepcopy(base), other])
    wrong = copy.deepcopy(base)
    wrong.head = nn.Linear(10, 4)
    with pytest.raises(ValueError, match=r"^task_vectors\[0\]\['head.weight'\]: expected the fine-tuned parameter's "
                                         r"shape to be \[3, 10\]"):
        TaskVectorComposition(base, [wrong])
    half = copy.deepcopy(base).half()
    with pytest.raises(TypeError, match=r"^task_vectors\[0\]\['scale'\]: expected dtype torch.float32.*got torch.float16"):
        TaskVectorComposition(base, [half])


@pytest.mark.parametrize("granularity,exc,msg", [
    ("layer", ValueError, r"^granularity: expected 'tensor', 'rows' or \('chunks', n\), got 'layer'"),
    (("chunks", 0), ValueError, r"^granularity: \('chunks', n\) needs a chunk size n > 0, got 0"),
    (("chunks", 2.5), TypeError, r"^granularity: \('chunks', n\) needs an int chunk size n, got float"),
    (("blocks", 4), ValueError, r"^granularity: expected"),
    (7, ValueError, r"^granularity: expected"),
], ids=["layer", "chunks-0", "chunks-2.5", "blocks-4", "int-7"])
def test_bad_granularity(granularity, exc, msg, rng):
    base, taus = make_setup(rng)
    with pytest.raises(exc, match=msg):
        TaskVectorComposition(base, taus, granularity=granularity)


@pytest.mark.parametrize("init,exc,msg", [
    ([0.1, 0.2], ValueError, r"^init: expected 3 values \(one per task\), got 2"),
    ("0.3", TypeError, r"^init: expected a float or a list of 3 floats, got str"),
    ([0.1, None, 0.2], TypeError, r"^init: expected a float or a list of 3 floats"),
    (torch.zeros(2, 2), ValueError, r"^init: expected a float or 3 values .*got a tensor of shape \[2, 2\]"),
], ids=["2-values", "str", "None-item", "tensor-2x2"])
def test_bad_init(init, exc, msg, rng):
    base, taus = make_setup(rng)
    with pytest.raises(exc, match=msg):
        TaskVectorComposition(base, taus, init=init)


def test_bad_backend(rng):
    base, taus = make_setup(rng)
    with pytest.raises(ValueError, match=r"^backend: expected 'auto' or one of .*got 'gpu'"):
        TaskVectorComposition(base, taus, backend="gpu")
