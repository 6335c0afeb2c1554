"""Verify cases for `pyops.merge`: every method but task_arithmetic (that is `pyops.task_arithmetic`,
verified as its own op), odd shapes, every dtype, block layouts, per-task densities; forward. The C++
kernels (`cpu`) take every case; the Triton kernels (`triton`: all but consensus and model_stock) take theirs on
CUDA tensors, or on CPU tensors under the interpreter; the CUDA kernels (`cuda`: all but model_stock) take
theirs on CUDA tensors. Gradients are checked by the tests
(tests/task_merge/test_merge_cpu_backward.py)."""
from __future__ import annotations

import itertools
from typing import Dict

import torch

import pyops
from pyops.testing import tolerance_for
from pyops.verify import Case

SHAPES = [(1,), (7,), (3, 517), (64, 1031), (70_001,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METHODS = ["ties", "dare", "dare_ties", "breadcrumbs", "della", "della_linear", "consensus", "model_stock"]
LAYOUTS = [None, "rows", 7]
TRITON_METHODS = ("ties", "dare", "dare_ties", "breadcrumbs", "della", "della_linear")
CUDA_METHODS = ("ties", "dare", "dare_ties", "breadcrumbs", "della", "della_linear", "consensus")


def _make(shape, n, dtype):
    def make(device):
        base = torch.randn(shape, device=device).to(dtype)
        fts = (base.float() + 0.1 * torch.randn((n, *shape), device=device)).to(dtype)
        return dict(base=base, finetuned=fts)
    return make


def _run(method, blocks, density, from_models):
    def run(backend: str, x: dict) -> Dict[str, torch.Tensor]:
        kw = dict(method=method, backend=backend, seed=1234, name="layer.weight")
        if method != "model_stock":
            kw.update(coeffs=[0.7, 0.4, 1.1][: x["finetuned"].shape[0]], blocks=blocks, density=density)
        if from_models:
            out = pyops.merge_from_models(x["base"], x["finetuned"], **kw)
        else:
            out = pyops.merge(x["base"], x["finetuned"] - x["base"], **kw)
        return {"out": out}
    return run


def cases():
    for k, (shape, dtype, method) in enumerate(itertools.product(SHAPES, DTYPES, METHODS)):
        blocks = LAYOUTS[k % len(LAYOUTS)] if method != "model_stock" else None
        n = 3 if method != "model_stock" else 2 + k % 2
        density = [0.3, 0.5, 0.9][:n] if k % 2 else 0.3
        from_models = k % 3 != 1
        name = f"{method} {list(shape)} N={n} blocks={blocks!r} density={density} {str(dtype)[6:]}" + (
            " from_models" if from_models else "")
        yield Case("merge", name, _make(shape, n, dtype), _run(method, blocks, density, from_models),
                   {"out": tolerance_for(dtype)},
                   backends=("cpu",) + (("cuda",) if method in CUDA_METHODS else ())
                   + (("triton",) if method in TRITON_METHODS else ()))
