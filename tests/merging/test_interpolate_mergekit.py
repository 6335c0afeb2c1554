"""Where mergekit is installed (its own venv: `PYOPS_MERGEKIT_PYTHON`, or the python beside
`PYOPS_MERGEKIT_YAML` / `mergekit-yaml` on PATH), pyops' interpolating methods give mergekit
0.1.5's own method functions' tensors (mergekit.merge_methods.registry), run in a subprocess with
mergekit's torch. Skipped otherwise: mergekit is not a test dependency.

fp32 inputs: within fp32 rounding, reference and C++ kernels. bf16 inputs: linear and slerp,
which mergekit computes in fp32 and rounds once as pyops does, within bf16 rounding; for the
methods mergekit computes in bf16 (nuslerp, multislerp, karcher, nearswap) pyops deliberately
computes in fp32 (docs/merging.md), so only the fp32 rows are compared."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from _support import assert_close_dtype, require_backend
from pyops.merging import interpolate as I


def _mergekit_python():
    explicit = os.environ.get("PYOPS_MERGEKIT_PYTHON")
    if explicit:
        return explicit
    yaml = os.environ.get("PYOPS_MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    if yaml:
        candidate = os.path.join(os.path.dirname(yaml), "python")
        if os.path.exists(candidate):
            return candidate
    return None


PYTHON = _mergekit_python()
pytestmark = pytest.mark.skipif(PYTHON is None, reason="mergekit's python not found (PYOPS_MERGEKIT_PYTHON / "
                                                       "PYOPS_MERGEKIT_YAML unset)")

# Runs in mergekit's venv: each case through the registered method, as mergekit's graph calls it.
DRIVER = r"""
import sys, torch
from mergekit.merge_methods.registry import get
from mergekit.merge_methods.base import TensorGroup
cases = torch.load(sys.argv[1], weights_only=True)
out = []
for c in cases:
    group = TensorGroup.from_tensors(c["tensors"], base_index=c["base_index"])
    try:
        out.append(get(c["method"])([group], parameters=c["params"])[0])
    except Exception as e:
        out.append(type(e).__name__ + ": " + str(e))
torch.save(out, sys.argv[2])
"""


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _case(cid, method, base, models, params, dtype, shape, seed):
    """(id, method, base tensor or None, model tensors, mergekit params, pyops params)."""
    xs = [_rand(shape, dtype, seed + i) for i in range(models)]
    b = _rand(shape, dtype, seed + 100) if base else None
    return dict(id=cid, method=method, base=b, models=xs, params=params)


def _sparse_case(cid, method, models, params, shape, seed):
    """Models that change about half of the base's entries (RAM counts the contributors)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.5) for _ in range(models)]
    return dict(id=cid, method=method, base=base, models=xs, params=params)


def _cases():
    out = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out += [
            _case(f"linear-{tag}", "linear", False, 3, {"weight": [0.2, 0.5, 0.3]}, dtype, (16, 33), 1),
            _case(f"linear-unnormalized-{tag}", "linear", False, 2, {"weight": [0.7, 1.3], "normalize": False},
                  dtype, (65,), 2),
            _case(f"slerp-{tag}", "slerp", True, 1, {"t": 0.3}, dtype, (8, 24), 3),
            _case(f"slerp-t1-{tag}", "slerp", True, 1, {"t": 1.0}, dtype, (5, 7), 4),
        ]
    f = torch.float32
    out += [
        _case("linear-zero-sum-fp32", "linear", False, 2, {"weight": [1.0, -1.0]}, f, (4, 5), 5),
        _case("nearswap-fp32", "nearswap", True, 1, {"t": 0.5}, f, (9, 13), 6),
        _case("passthrough-fp32", "passthrough", False, 1, {"scale": [0.25]}, f, (3, 11), 7),
        _case("passthrough-none-fp32", "passthrough", False, 1, {}, f, (3, 11), 8),
        _case("nuslerp-flat-fp32", "nuslerp", False, 2, {"weight": [0.4, 0.6]}, f, (6, 10), 9),
        _case("nuslerp-flat-base-fp32", "nuslerp", True, 2, {"weight": [1.0, 3.0]}, f, (6, 10), 10),
        _case("nuslerp-rows-base-fp32", "nuslerp", True, 2, {"weight": [1.0, 3.0], "nuslerp_flatten": False}, f,
              (6, 10), 11),
        _case("nuslerp-rowwise-base-fp32", "nuslerp", True, 2,
              {"weight": [2.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}, f, (12, 5), 12),
        _case("nuslerp-zero-weight-sum-fp32", "nuslerp", False, 2, {"weight": [1.0, -1.0]}, f, (7,), 13),
        _case("multislerp-fp32", "multislerp", False, 3, {"weight": [0.2, 0.3, 0.5]}, f, (10, 9), 14),
        _case("multislerp-base-fp32", "multislerp", True, 3, {"weight": [1.0, 2.0, 3.0]}, f, (10, 9), 15),
        _case("multislerp-unnormalized-fp32", "multislerp", True, 2,
              {"weight": [0.3, 0.4], "normalize_weights": False}, f, (10, 9), 16),
        _case("multislerp-one-fp32", "multislerp", True, 1, {"weight": [2.0]}, f, (4, 4), 17),
        _case("karcher-fp32", "karcher", False, 3, {}, f, (11, 7), 18),
        _case("karcher-iter2-fp32", "karcher", False, 4, {"max_iter": 2, "tol": 1e-4}, f, (11, 7), 19),
        _case("breadcrumbs_ties-fp32", "breadcrumbs_ties", True, 3,
              {"weight": [0.5, 1.0, 0.7], "density": [0.5, 0.6, 0.4], "gamma": 0.05}, f, (24, 17), 20),
        _case("breadcrumbs_ties-normalized-fp32", "breadcrumbs_ties", True, 2,
              {"weight": [1.0, 2.0], "density": 0.3, "normalize": True, "lambda": 0.8}, f, (40, 9), 21),
        _sparse_case("ram-fp32", "ram", 3, {}, (16, 20), 22),
        _sparse_case("ramplus_tl-fp32", "ramplus_tl", 3, {}, (16, 20), 23),
        _sparse_case("ramplus_tl-params-fp32", "ramplus_tl", 2, {"r": 0.5, "alpha": 0.4, "epsilon": 1e-3}, (16, 20),
                     24),
        _case("sce-fp32", "sce", True, 3, {}, f, (12, 10), 25),
        _case("sce-topk-fp32", "sce", True, 3, {"select_topk": 0.3}, f, (12, 10), 26),
        _case("arcee_fusion-fp32", "arcee_fusion", True, 1, {}, f, (32, 16), 27),
        _case("arcee_fusion-1d-fp32", "arcee_fusion", True, 1, {}, f, (300,), 28),
    ]
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def mergekit_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_methods")
    payload = []
    for c in CASES:
        tensors = ([c["base"]] if c["base"] is not None else []) + c["models"]
        payload.append(dict(method=c["method"], tensors=tensors, base_index=0 if c["base"] is not None else None,
                            params=c["params"]))
    torch.save(payload, root / "cases.pt")
    (root / "driver.py").write_text(DRIVER)
    subprocess.run([PYTHON, str(root / "driver.py"), str(root / "cases.pt"), str(root / "out.pt")], check=True,
                   capture_output=True)
    return {c["id"]: r for c, r in zip(CASES, torch.load(root / "out.pt", weights_only=True))}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_same_tensor_as_mergekit(case, backend, mergekit_results):
    require_backend(backend)
    want = mergekit_results[case["id"]]
    assert isinstance(want, torch.Tensor), f"mergekit raised: {want}"
    got = I.merge_tensors(case["method"], case["base"], case["models"], case["params"], backend=backend)
    assert got.dtype == want.dtype
    assert_close_dtype(got, want, f"{case['id']} ({backend})")
