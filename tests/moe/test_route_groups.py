"""DeepSeek-V3 group-limited routing in `pyops.moe_route` (n_group, topk_group, routed_scaling):
the reference against a literal per-token loop of the definition, the C++ kernel against the
reference on odd shapes, ties, gradients, the scaling, the deliberate difference from Hugging
Face's masking (negative kept keys), argument errors, opcheck of the changed op schemas,
torch.compile(fullgraph=True), and parity with transformers' DeepSeek-V3 router when installed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyops
from _support import assert_bitwise_equal, assert_close, fmt_dtype, randn
from .cases import BF16, FP16, FP32, FP64, require
from pyops.integrations import prefer_installed_kernels
from pyops.testing import tolerance_for


def literal_group_route(z, k, n_group, topk_group, score="sigmoid", renormalize=True, bias=None, scale=1.0):
    """Token by token with Python lists: group score = sum of the 2 largest keys (1 for one-expert
    groups), the topk_group best groups (ties: lower group), the k best keys among their experts
    (ties: lower expert), weights = scores, renormalised, times scale."""
    T, E = z.shape
    size = E // n_group
    s = torch.softmax(z.double(), -1) if score == "softmax" else torch.sigmoid(z.double())
    experts, weights = [], []
    for t in range(T):
        key = [float(s[t, e]) + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        gscore = [sum(sorted(key[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
        candidates = [e for e in range(E) if e // size in kept]
        chosen = sorted(candidates, key=lambda e: (-key[e], e))[:k]
        w = [float(s[t, e]) for e in chosen]
        if renormalize:
            tot = sum(w)
            w = [v / tot for v in w]
        experts.append(chosen)
        weights.append([v * scale for v in w])
    return experts, weights


def group_kw(n_group, topk_group, score="sigmoid", bias=None, scale=1.0, renormalize=True):
    return dict(n_group=n_group, topk_group=topk_group, score=score, bias=bias, routed_scaling=scale,
                renormalize=renormalize)


# ------------------------------------------------------------------------------------------------
# The reference against the literal loop
# ------------------------------------------------------------------------------------------------

# (T, E, n_group, topk_group, k)
LITERAL_SHAPES = [(5, 8, 4, 2, 3), (9, 12, 3, 2, 5), (6, 12, 12, 4, 4), (4, 8, 1, 1, 8), (7, 16, 8, 1, 2),
                  (3, 64, 8, 4, 6)]


def gid(s):
    T, E, G, M, k = s
    return f"T{T}-E{E}-G{G}-M{M}-k{k}"


@pytest.mark.parametrize("shape", LITERAL_SHAPES, ids=gid)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_reference_matches_literal_loop(shape, score, with_bias, rng):
    T, E, G, M, k = shape
    z = randn((T, E), FP64, rng)
    bias = randn((E,), FP64, rng, scale=0.2) if with_bias else None
    r = pyops.moe_route(z, k, backend="reference", **group_kw(G, M, score, bias, 2.5))
    e, w = literal_group_route(z, k, G, M, score, True, bias, 2.5)
    assert r.experts.tolist() == e
    torch.testing.assert_close(r.weights, torch.tensor(w, dtype=FP64), rtol=1e-12, atol=1e-14)


def test_reference_ties_go_to_lower_group_then_lower_expert():
    # every key equal: groups 0..M-1 are kept and experts 0..k-1 chosen
    z = torch.zeros(2, 12)
    r = pyops.moe_route(z, 5, backend="reference", **group_kw(4, 2))
    assert r.experts.tolist() == [[0, 1, 2, 3, 4]] * 2
    # groups 1 and 3 tie for the best score (2·sigmoid(3)); group 1 wins; its experts tie too
    z = torch.zeros(1, 8)
    z[0, 2:4] = 3.0
    z[0, 6:8] = 3.0
    r = pyops.moe_route(z, 2, backend="reference", **group_kw(4, 1))
    assert r.experts.tolist() == [[2, 3]]


def test_reference_one_expert_groups_score_by_the_expert_alone():
    # E = G: group score = the expert's key, so the M kept groups are the top-M experts
    z = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5]])
    r = pyops.moe_route(z, 2, backend="reference", **group_kw(6, 3))
    assert r.experts.tolist() == [[1, 5]]


def test_excluded_experts_are_never_chosen(rng):
    # the single largest key sits in a group whose other experts are tiny: the group loses on its
    # top-2 sum and its expert is not chosen although its key is the largest of all
    z = torch.full((1, 8), 0.0)
    z[0, 0] = 6.0
    z[0, 1] = -6.0
    z[0, 2:4] = 2.0
    z[0, 4:8] = -3.0
    for backend in ("reference", "cpu"):
        if backend == "cpu":
            require("cpu", "moe_route")
        r = pyops.moe_route(z, 2, backend=backend, **group_kw(4, 1))
        assert r.experts.tolist() == [[2, 3]], backend


# ------------------------------------------------------------------------------------------------
# C++ against the reference
# ------------------------------------------------------------------------------------------------

# (E, n_group, topk_group, k): k <= 8 takes the kernel's 8-token lane path, k > 8 the row path
CPU_SHAPES = [(8, 1, 1, 3), (8, 2, 1, 4), (8, 4, 2, 4), (8, 8, 3, 3), (12, 2, 1, 6), (12, 4, 3, 9),
              (12, 12, 5, 5), (64, 8, 4, 6), (64, 4, 2, 12), (64, 2, 1, 8), (64, 8, 1, 8)]
VARIANTS = [("fp32", FP32, False), ("fp32-bias", FP32, True), ("bf16-bias", BF16, True), ("fp16", FP16, False)]


def cid(s):
    E, G, M, k = s
    return f"E{E}-G{G}-M{M}-k{k}"


@pytest.mark.parametrize("T", [0, 1, 7, 33], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=cid)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
def test_cpu_matches_reference(T, shape, score, variant, rng):
    require("cpu", "moe_route")
    E, G, M, k = shape
    _, dtype, with_bias = variant
    z = randn((T, E), FP32, rng, scale=2.0).to(dtype)
    bias = randn((E,), FP32, rng, scale=0.1) if with_bias else None
    kw = group_kw(G, M, score, bias, 1.5)
    got = pyops.moe_route(z, k, backend="cpu", capacity_factor=0.7, **kw)
    want = pyops.moe_route(z, k, backend="reference", capacity_factor=0.7, **kw)
    for name in ("experts", "order", "offsets", "dropped"):
        assert_bitwise_equal(getattr(got, name), getattr(want, name), name)
    assert got.weights.dtype == dtype
    assert_close(got.weights, want.weights, tolerance_for(dtype), "weights")


@pytest.mark.parametrize("shape", [(8, 4, 2, 4), (12, 12, 5, 5), (64, 8, 4, 6), (64, 4, 2, 12)], ids=cid)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=fmt_dtype)
def test_cuda_matches_cpu_bitwise(shape, score, dtype, rng):
    """The CUDA kernel repeats the C++ arithmetic: the same bits, groups and scaling included."""
    dev = require("cuda", "moe_route")
    require("cpu", "moe_route")
    E, G, M, k = shape
    z = randn((777, E), FP32, rng, scale=2.0).to(dtype)
    bias = randn((E,), FP32, rng, scale=0.1)
    kw = group_kw(G, M, score, bias, 2.5)
    got = pyops.moe_route(z.to(dev), k, backend="cuda", capacity_factor=0.8, **dict(kw, bias=bias.to(dev)))
    want = pyops.moe_route(z, k, backend="cpu", capacity_factor=0.8, **kw)
    for a, b, name in zip(got, want, pyops.Routing._fields):
        assert_bitwise_equal(a.cpu(), b, name)


@pytest.mark.parametrize("k", [3, 10], ids=["k3-lanes", "k10-rows"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_cpu_ties_match_reference(k, with_bias):
    require("cpu", "moe_route")
    # rows of equal logits, equal pairs across groups, and a tie broken by the bias
    z = torch.tensor([[0.0] * 16, [1.0, 1.0, 0.0, 0.0] * 4, [2.0] * 8 + [1.0] * 8,
                      [0.5, 0.5, 3.0, 3.0, 3.0, 3.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 0.5, 0.5]] * 3)
    bias = torch.tensor([0.0, 0.25] * 8) if with_bias else None
    for G, M in ((4, 3), (8, 5), (2, 1)):
        if k > M * 16 // G:
            continue
        got = pyops.moe_route(z, k, backend="cpu", **group_kw(G, M, "sigmoid", bias))
        want = pyops.moe_route(z, k, backend="reference", **group_kw(G, M, "sigmoid", bias))
        assert_bitwise_equal(got.experts, want.experts, f"experts G={G} M={M}")
        assert_close(got.weights, want.weights, tolerance_for(FP32), "weights")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("k", [2, 9], ids=["k2", "k9"])
def test_one_group_keeping_everything_is_plain_routing(backend, k, rng):
    """n_group=1, topk_group=1 keeps every expert: the ungrouped result, bit for bit."""
    if backend != "reference":
        require(backend, "moe_route")
    z = randn((21, 12), FP32, rng)
    bias = randn((12,), FP32, rng, scale=0.1)
    plain = pyops.moe_route(z, k, score="sigmoid", bias=bias, backend=backend)
    grouped = pyops.moe_route(z, k, backend=backend, **group_kw(1, 1, "sigmoid", bias))
    for a, b, name in zip(grouped, plain, pyops.Routing._fields):
        assert_bitwise_equal(a, b, name)


# ------------------------------------------------------------------------------------------------
# routed_scaling
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("groups", [None, (4, 2)], ids=["nogroups", "G4-M2"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_routed_scaling_multiplies_the_weights(backend, groups, renormalize, rng):
    if backend != "reference":
        require(backend, "moe_route")
    z = randn((13, 8), FP32, rng)
    G, M = groups or (None, None)
    kw = dict(score="sigmoid", n_group=G, topk_group=M, renormalize=renormalize, backend=backend)
    one = pyops.moe_route(z, 3, **kw)
    scaled = pyops.moe_route(z, 3, routed_scaling=2.5, **kw)
    assert_bitwise_equal(scaled.experts, one.experts, "experts")
    assert_bitwise_equal(scaled.weights, one.weights * 2.5, "weights")   # one fp32 product, both ways


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_reference_gradcheck_fp64(score, renormalize, rng):
    z = randn((5, 12), FP64, rng).requires_grad_()
    bias = randn((12,), FP64, rng, scale=0.1)

    def f(z_):
        return pyops.moe_route(z_, 4, backend="reference",
                               **group_kw(4, 2, score, bias, 2.5, renormalize)).weights
    assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("groups", [None, (4, 2)], ids=["nogroups", "G4-M2"])
def test_cpu_backward_matches_reference(score, renormalize, groups, rng):
    require("cpu", "moe_route")
    z0 = randn((11, 16), FP32, rng)
    bias = randn((16,), FP32, rng, scale=0.1)
    gw = randn((11, 5), FP32, rng)
    G, M = groups or (None, None)
    grads = []
    for b in ("cpu", "reference"):
        z = z0.clone().requires_grad_()
        r = pyops.moe_route(z, 5, backend=b, **group_kw(G, M, score, bias, 2.5, renormalize))
        grads.append(torch.autograd.grad(r.weights, z, gw)[0])
    assert_close(grads[0], grads[1], tolerance_for(FP32), "grad of logits")


# ------------------------------------------------------------------------------------------------
# The deliberate difference from Hugging Face (excluded keys -inf, not 0.0)
# ------------------------------------------------------------------------------------------------

def hf_masking_rule(z, bias, k, G, M):
    """Hugging Face transformers' rule: excluded experts' keys are set to 0.0 (not -inf)."""
    T, E = z.shape
    key = torch.sigmoid(z) + bias
    gscore = key.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
    groups = torch.topk(gscore, M, dim=-1).indices
    keep = torch.zeros(T, G, dtype=torch.bool).scatter_(1, groups, True).repeat_interleave(E // G, dim=1)
    return torch.topk(key.masked_fill(~keep, 0.0), k, dim=-1).indices.sort(-1).values


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_negative_kept_keys_still_win_over_excluded_experts(backend):
    """Kept keys below 0 (a negative bias): pyops (as DeepSeek's official gate, -inf) chooses
    them; Hugging Face's 0.0 fill would choose experts of an excluded group instead."""
    if backend != "reference":
        require(backend, "moe_route")
    z = torch.zeros(1, 4)
    bias = torch.tensor([-1.0, -1.0, -2.0, -2.0])   # keys -0.5, -0.5 (group 0), -1.5, -1.5 (group 1)
    r = pyops.moe_route(z, 2, backend=backend, **group_kw(2, 1, "sigmoid", bias))
    assert r.experts.tolist() == [[0, 1]]
    assert hf_masking_rule(z, bias, 2, 2, 1).tolist() == [[2, 3]]   # the other rule, for the record


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

ERRORS = [
    ("n_group-without-topk_group", 2, dict(n_group=4), ValueError, r"topk_group: expected an int together with n_group = 4"),
    ("topk_group-without-n_group", 2, dict(topk_group=2), ValueError, r"n_group: expected an int together with topk_group = 2"),
    ("n_group-float", 2, dict(n_group=4.0, topk_group=2), ValueError, r"n_group: expected an int, got float"),
    ("topk_group-bool", 2, dict(n_group=4, topk_group=True), ValueError, r"topk_group: expected an int, got bool"),
    ("n_group-not-dividing-E", 2, dict(n_group=3, topk_group=1), ValueError,
     r"n_group: expected a positive divisor of E = 8 .*got 3"),
    ("n_group-zero", 2, dict(n_group=0, topk_group=1), ValueError, r"n_group: expected a positive divisor of E = 8"),
    ("topk_group-zero", 2, dict(n_group=4, topk_group=0), ValueError,
     r"topk_group: expected 1 <= topk_group <= n_group = 4, got 0"),
    ("topk_group-above-n_group", 2, dict(n_group=4, topk_group=5), ValueError,
     r"topk_group: expected 1 <= topk_group <= n_group = 4, got 5"),
    ("k-above-kept-experts", 5, dict(n_group=4, topk_group=2), ValueError,
     r"k: expected k <= topk_group·E/n_group = 2·8/4 = 4 \(the experts of the kept groups\), got 5"),
    ("scaling-zero", 2, dict(routed_scaling=0.0), ValueError, r"routed_scaling: expected a finite number > 0, got 0.0"),
    ("scaling-inf", 2, dict(routed_scaling=float("inf")), ValueError, r"routed_scaling: expected a finite number > 0"),
    ("scaling-nan", 2, dict(routed_scaling=float("nan")), ValueError, r"routed_scaling: expected a finite number > 0"),
    ("scaling-str", 2, dict(routed_scaling="2"), TypeError, r"routed_scaling: expected a positive number, got str"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("k,kw,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_group_arguments_raise(backend, k, kw, exc, match):
    z = torch.zeros(3, 8)
    with pytest.raises(exc, match=match):
        pyops.moe_route(z, k, backend=backend, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(n_group=3, topk_group=1), "n_group: expected 0 \\(none\\) or a divisor of E = 8, got 3"),
    (dict(n_group=4, topk_group=0), "topk_group: expected 1 <= topk_group <= n_group = 4, got 0"),
    (dict(n_group=0, topk_group=2), "topk_group: expected 0 without groups, got 2"),
    (dict(n_group=4, topk_group=1, k=3), "k: expected k <= topk_group \\* E / n_group = 2"),
    (dict(routed_scaling=-1.0), "routed_scaling: expected a finite number > 0"),
], ids=["G3-E8", "M0", "M-without-G", "k3-M1", "scaling-negative"])
def test_native_kernel_checks_group_arguments(kw, match):
    """The C++ kernel checks its arguments itself (a direct call bypassing pyops.moe_route)."""
    require("cpu", "moe_route")
    from pyops.moe import backend_cpu
    kw = dict(kw)
    k = kw.pop("k", 2)
    args = {**dict(n_group=0, topk_group=0, routed_scaling=1.0), **kw}
    with pytest.raises(ValueError, match=match):
        backend_cpu.route_op(torch.zeros(3, 8), k, 1, True, -1, None, args["n_group"], args["topk_group"],
                             args["routed_scaling"])


# ------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("util", OPCHECK_UTILS)
def test_opcheck_route_with_groups(util, rng):
    require("cpu", "moe_route")
    z = randn((9, 8), FP32, rng).requires_grad_()
    bias = randn((8,), FP32, rng, scale=0.1)
    torch.library.opcheck(torch.ops.pyops.moe_route.default, (z, 3, 1, True, 4, bias, 4, 2, 2.5), test_utils=util)


@pytest.mark.parametrize("util", OPCHECK_UTILS)
def test_opcheck_route_backward_with_scaling(util, rng):
    z = randn((9, 8), FP32, rng)
    r = pyops.moe_route(z, 3, backend="reference", **group_kw(4, 2))
    torch.library.opcheck(torch.ops.pyops.moe_route_backward.default,
                          (randn((9, 3), FP32, rng), z, r.experts, 1, True, 2.5), test_utils=util)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend,compiler", [("cpu", "aot_eager"), ("cpu", "inductor"), ("reference", "aot_eager")],
                         ids=lambda v: str(v))
def test_compile_fullgraph_matches_eager(backend, compiler, rng, fresh_dynamo):
    if backend != "reference":
        require(backend, "moe_route")
    z0 = randn((10, 16), FP32, rng)
    bias = randn((16,), FP32, rng, scale=0.1)
    gw = randn((10, 4), FP32, rng)

    def f(z):
        r = pyops.moe_route(z, 4, capacity_factor=1.0, backend=backend, **group_kw(4, 2, "sigmoid", bias, 2.5))
        return r, (r.weights * gw).sum()

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=compiler)):
        z = z0.clone().requires_grad_()
        r, loss = fn(z)
        loss.backward()
        results.append((r, z.grad))
    (r_e, g_e), (r_c, g_c) = results
    for a, b, name in zip(r_c, r_e, pyops.Routing._fields):
        if name == "weights":
            assert_close(a, b, tolerance_for(FP32), name)
        else:
            assert_bitwise_equal(a, b, name)
    assert_close(g_c, g_e, tolerance_for(FP32), "grad of logits")


# ------------------------------------------------------------------------------------------------
# Parity with Hugging Face transformers' DeepSeek-V3 router (skipped without transformers)
# ------------------------------------------------------------------------------------------------

def _import_transformers_deepseek_v3():
    """transformers' DeepSeek-V3 modeling module, or skip."""
    prefer_installed_kernels()
    pytest.importorskip("transformers")
    return pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")


def _hf_route(x, weight, bias, cfg_kw):
    """(expert ids, weights) of transformers' DeepSeek-V3 routing for hidden states x."""
    mod = _import_transformers_deepseek_v3()
    cfg = mod.DeepseekV3Config(hidden_size=x.shape[1], intermediate_size=32, moe_intermediate_size=8,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                               n_shared_experts=1, **cfg_kw)
    moe = mod.DeepseekV3MoE(cfg)
    gate = moe.gate
    with torch.no_grad():
        gate.weight.copy_(weight)
        gate.e_score_correction_bias.copy_(bias)
        out = gate(x)
        if isinstance(out, tuple):           # the router routes: (logits,) weights, indices in some order
            idx = next(t for t in out if not t.is_floating_point())
            w = next(t for t in out if t.is_floating_point() and t.shape == idx.shape)
        else:                                # the router returns logits; the MoE block routes
            idx, w = moe.route_tokens_to_experts(out)
    return idx.long(), w.float()


def test_matches_transformers_deepseek_v3_router(rng):
    """Inputs where the two rules agree: positive kept keys (bias >= 0), so HF's 0.0 fill of the
    excluded keys and pyops' -inf choose alike; its 1e-20 in the denominator is below fp32's
    resolution here. Compared as sets (HF's top-k is unsorted)."""
    E, G, M, k, d = 16, 4, 2, 4, 12
    cfg_kw = dict(n_routed_experts=E, num_experts_per_tok=k, n_group=G, topk_group=M, routed_scaling_factor=2.5,
                  norm_topk_prob=True)
    x = randn((23, d), FP32, rng)
    weight = randn((E, d), FP32, rng, scale=d ** -0.5)
    bias = randn((E,), FP32, rng, scale=0.05).abs()
    idx, w = _hf_route(x, weight, bias, cfg_kw)
    r = pyops.moe_route(F.linear(x, weight), k, score="sigmoid", bias=bias, n_group=G, topk_group=M,
                        routed_scaling=2.5)
    ours, pos = torch.sort(r.experts.long(), dim=-1)
    theirs, tpos = torch.sort(idx.view(-1, k), dim=-1)
    assert torch.equal(ours, theirs)
    assert_close(r.weights.gather(1, pos), w.view(-1, k).gather(1, tpos), tolerance_for(FP32), "weights")
