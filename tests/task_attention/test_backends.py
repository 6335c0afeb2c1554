"""Every kernel backend (C++ CPU, Triton) against the reference: forward (out, lse) and dq, dk, dv,
fp32/fp16/bf16, on odd shapes: length 1, odd lengths, GQA, Dv != D, causal, padding, per-batch ids,
cross attention, tiles fully skipped by block-diagonal groups, dropout."""
from __future__ import annotations

import pytest
import torch

import pyops
from _support import assert_close, assert_bitwise_equal
from .cases import BF16, FP16, FP32, KERNEL_BACKENDS, fmt, randn, require_backend, to_device
from pyops import masks
from pyops.testing import tolerance_for

# name: (B, Hq, Hkv, Lq, Lk, D, Dv, groups, causal). The names are the test ids, and the `rng`
# fixture seeds each test's data from its id: renaming a config draws different data.
CONFIGS = {
    "L1": (1, 1, 1, 1, 1, 4, 4, "single", False),
    "multitab-TxT-L29": (3, 2, 2, 29, 29, 4, 4, "multitab", False),
    "gqa-Dv8-causal-pad-L37": (2, 4, 2, 37, 37, 16, 8, "padded", True),
    "cross-perbatch-19x45": (2, 2, 1, 19, 45, 8, 12, "per-batch", False),
    "blockdiag-L100": (1, 1, 1, 100, 100, 8, 8, "block-diagonal", False),
}


def make_groups(kind, B, Lq, Lk, gen):
    if kind == "single":
        return torch.zeros(Lq, dtype=torch.int64), None, None
    if kind == "multitab":
        g, allow = masks.multitab(3, Lq - 3, "TxT")
        return g, None, allow
    if kind == "padded":
        g = torch.randint(0, 3, (B, Lq), generator=gen)
        g[:, -4:] = -1
        g[0, 2] = -1
        allow = torch.tensor([[True, False, True], [True, True, False], [False, False, False]])
        return g, None, allow  # group 2 attends nothing: empty rows
    if kind == "per-batch":
        qg = torch.randint(-1, 4, (B, Lq), generator=gen)
        kg = torch.randint(-1, 4, (B, Lk), generator=gen)
        allow = torch.rand(4, 4, generator=gen) < 0.5
        allow[0, 0] = True
        return qg, kg, allow
    if kind == "block-diagonal":
        g, allow = masks.block_diagonal([40, 30, 30])
        return g, None, allow
    raise AssertionError(kind)


def make_problem(config, dtype, gen):
    B, Hq, Hkv, Lq, Lk, D, Dv, kind, causal = CONFIGS[config]
    qg, kg, allow = make_groups(kind, B, Lq, Lk, gen)
    return dict(q=randn((B, Hq, Lq, D), dtype, gen), k=randn((B, Hkv, Lk, D), dtype, gen),
                v=randn((B, Hkv, Lk, Dv), dtype, gen), dout=randn((B, Hq, Lq, Dv), dtype, gen),
                q_groups=qg, kv_groups=kg, allow=allow, causal=causal)


def run(backend, x, **kw):
    q, k, v = (x[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
    out, lse = pyops.task_masked_attention(q, k, v, x["q_groups"], x["kv_groups"], x["allow"], causal=x["causal"],
                                           return_lse=True, backend=backend, **kw)
    out.backward(x["dout"])
    return {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def check_against_reference(got, exp, dtype):
    tol = tolerance_for(dtype)
    for name in ("out", "dq", "dk", "dv"):
        assert_close(got[name], exp[name], tol, name)
    assert_close(got["lse"], exp["lse"], tolerance_for(FP32) if dtype == FP32 else tol, "lse")


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=fmt)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_matches_reference(backend, config, dtype, rng):
    dev = require_backend(backend, dtype)
    x = to_device(make_problem(config, dtype, rng), dev)
    check_against_reference(run(backend, x), run("reference", x), dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_matches_reference_forward_and_backward(backend, rng):
    dev = require_backend(backend)
    x = to_device(make_problem("gqa-Dv8-causal-pad-L37", FP32, rng), dev)
    got = run(backend, x, dropout_p=0.25, seed=1234567890123)
    exp = run("reference", x, dropout_p=0.25, seed=1234567890123)
    check_against_reference(got, exp, FP32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_is_deterministic_per_seed(backend, rng):
    dev = require_backend(backend)
    x = to_device(make_problem("multitab-TxT-L29", FP32, rng), dev)
    a = run(backend, x, dropout_p=0.5, seed=7)
    b = run(backend, x, dropout_p=0.5, seed=7)
    c = run(backend, x, dropout_p=0.5, seed=8)
    for name in a:
        assert_bitwise_equal(a[name], b[name], name)
    assert not torch.equal(a["out"], c["out"])


def test_seed_none_draws_from_torch_generator(rng):
    x = make_problem("multitab-TxT-L29", FP32, rng)
    torch.manual_seed(3)
    a = run("reference", x, dropout_p=0.5)
    torch.manual_seed(3)
    b = run("reference", x, dropout_p=0.5)
    assert torch.equal(a["out"], b["out"])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_noncontiguous_inputs(backend, rng):
    dev = require_backend(backend)
    q = randn((2, 5, 3, 8), FP32, rng).to(dev).transpose(1, 2)  # [B, H, L, D] view of [B, L, H, D]
    k = randn((2, 5, 3, 8), FP32, rng).to(dev).transpose(1, 2)
    v = randn((2, 5, 3, 8), FP32, rng).to(dev).transpose(1, 2)
    g = torch.tensor([0, 1, 1, 0, 1], device=dev)
    got = pyops.task_masked_attention(q, k, v, g, backend=backend)
    exp = pyops.task_masked_attention(q, k, v, g, backend="reference")
    assert_close(got, exp, tolerance_for(FP32))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_many_groups(backend, rng):
    """More groups than a 64-bit tile summary word holds: 70 groups, a random rule. A backend
    with a group limit must say so (and `auto` then falls back)."""
    dev = require_backend(backend)
    L = 90
    g = torch.randint(0, 70, (L,), generator=rng).to(dev)
    allow = (torch.rand(70, 70, generator=rng) < 0.3).to(dev)
    q, k, v = (randn((1, 1, L, 8), FP32, rng).to(dev) for _ in range(3))
    try:
        got = pyops.task_masked_attention(q, k, v, g, allow=allow, backend=backend)
    except pyops.BackendUnavailableError as exc:  # the C++ kernels' declared limit (backend_cpu.CPU)
        assert str(exc) == ("task_masked_attention: backend 'cpu' cannot run this call: "
                            "the C++ kernels take up to 64 groups, got 70")
        got = pyops.task_masked_attention(q, k, v, g, allow=allow)
    exp = pyops.task_masked_attention(q, k, v, g, allow=allow, backend="reference")
    assert_close(got, exp, tolerance_for(FP32))


def test_auto_backend_on_cpu_prefers_cpu_then_reference(rng):
    q = randn((1, 1, 3, 4), FP32, rng)
    pyops.task_masked_attention(q, q, q, torch.zeros(3, dtype=torch.int64))
    choice = pyops.last_choice("task_masked_attention")
    assert choice.backend in ("cpu", "reference")
    if choice.backend == "reference":
        assert "cpu" in choice.passed_over


@pytest.mark.parametrize("B,L,S", [(0, 3, 3), (2, 0, 0), (2, 3, 0)], ids=["B0-L3x3", "B2-L0x0", "B2-L3x0-no-keys"])
@pytest.mark.parametrize("backend", ("reference",) + KERNEL_BACKENDS)
def test_empty_shapes(backend, B, L, S):
    dev = require_backend(backend) if backend != "reference" else torch.device("cpu")
    q, k, v = (torch.randn(B, 2, n, 4, device=dev, requires_grad=True) for n in (L, S, S))
    out, lse = pyops.task_masked_attention(q, k, v, torch.zeros(L, dtype=torch.int64, device=dev),
                                           torch.zeros(S, dtype=torch.int64, device=dev), return_lse=True,
                                           backend=backend)
    out.sum().backward()
    assert out.shape == (B, 2, L, 4) and bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    assert all(bool((t.grad == 0).all()) for t in (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_fused_backward_many_heads(causal, rng):
    """Long sequences with many (batch, kv head) pairs take the C++ kernel's fused backward (one
    work item per (b, kv head) computing dq from the same dS as dk / dv); fewer pairs take the
    two-pass split. Both must match the reference, and each other bit for bit."""
    dev = require_backend("cpu")
    B, Hq, Hkv, L, D = 2, 8, 4, 150, 16
    g, allow = masks.block_diagonal([60, 50, 40])
    x = dict(q=randn((B, Hq, L, D), FP32, rng), k=randn((B, Hkv, L, D), FP32, rng),
             v=randn((B, Hkv, L, D), FP32, rng), dout=randn((B, Hq, L, D), FP32, rng),
             q_groups=g, kv_groups=None, allow=allow, causal=causal)
    x = to_device(x, dev)
    fused = run("cpu", x)
    check_against_reference(fused, run("reference", x), FP32)
    # One batch row, one kv head: the two-pass split, the same sums in the same order.
    one = {**x, "q": x["q"][:1, :2], "k": x["k"][:1, :1], "v": x["v"][:1, :1], "dout": x["dout"][:1, :2]}
    split = run("cpu", one)
    for name in ("out", "dq", "dk", "dv"):
        assert_bitwise_equal(split[name], fused[name][:1, :(2 if name in ("out", "dq") else 1)], name)


_AVX2_ONLY_SCRIPT = r"""
import torch, pyops
from pyops import masks
from pyops.testing import compare, tolerance_for
torch.manual_seed(0)
bad = []
for (B, H, L, D) in ((3, 4, 29, 4), (1, 2, 150, 16)):   # the short path and the flash path
    g, allow = masks.block_diagonal([L // 3, L // 3, L - 2 * (L // 3)])
    x = [torch.randn(B, H, L, D, requires_grad=True) for _ in range(3)]
    dout = torch.randn(B, H, L, D)
    res = {}
    for be in ("cpu", "reference"):
        xs = [t.detach().clone().requires_grad_() for t in x]
        out = pyops.task_masked_attention(*xs, g, allow=allow, backend=be)
        out.backward(dout)
        res[be] = [out.detach()] + [t.grad for t in xs]
    for name, a, e in zip(("out", "dq", "dk", "dv"), res["cpu"], res["reference"]):
        r = compare(a, e, tolerance_for(torch.float32))
        if not r.ok:
            bad.append(f"{(B, H, L, D)} {name}: {r}")
print("BAD" if bad else "OK", bad)
"""


def test_cpu_kernels_without_avx512_match_reference():
    """The C++ kernels pick AVX-512 tile code at run time where the CPU has it; the AVX2-only code
    (what CPUs without AVX-512 run) is checked in a child process with PYOPS_TA_NO_AVX512=1."""
    import os
    import subprocess
    import sys

    require_backend("cpu")
    env = dict(os.environ, PYOPS_TA_NO_AVX512="1")
    p = subprocess.run([sys.executable, "-c", _AVX2_ONLY_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().startswith("OK"), p.stdout
