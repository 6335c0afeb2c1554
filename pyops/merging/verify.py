"""Verify cases of the merging family for `python -m pyops verify`.

* `task_arithmetic` / `task_arithmetic_from_models`: odd shapes, every dtype, every block layout,
  forward and the gradients of base, every task tensor and the coefficients.
* `merge`: every method but task_arithmetic (that is `pyops.task_arithmetic`, verified as its own
  op), odd shapes, every dtype, block layouts, per-task densities; forward. The C++ kernels (`cpu`)
  take every case; the Triton kernels (`triton`: all but consensus and model_stock) take theirs on
  CUDA tensors, or on CPU tensors under the interpreter; the CUDA kernels (`cuda`: all but
  model_stock) take theirs on CUDA tensors. The merge methods' gradients are checked by the tests
  (tests/merging/test_methods_cpu_backward.py). breadcrumbs_ties and ties with exact_k=True
  (`ties_exact_k` in the case names) run on the C++ kernels only.
* mergekit 0.1.5's methods of `pyops.merging.interpolate` with C++ kernels (linear, slerp,
  nearswap, passthrough, nuslerp in its three layouts, multislerp, karcher, ram, ramplus_tl),
  with and without a base where the method takes one, odd shapes, every dtype; forward. The
  Triton kernels take all but ram and ramplus_tl (CUDA tensors, or CPU tensors under the
  interpreter).
"""
from __future__ import annotations

import itertools
from typing import Dict

import torch

import pyops
from pyops.merging import interpolate as IP
from pyops.merging.task_arithmetic import resolve_blocks
from pyops.testing import REDUCTION_TOL, tolerance_for
from pyops.verify import Case

TA_SHAPES = [(1,), (7,), (3, 517), (5, 1, 9), (64, 1031)]
TA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TA_LAYOUTS = [None, "rows", 7, 4096]


def _ta_make(shape, n, blocks, dtype, per_block):
    def make(device):
        _, n_blocks = resolve_blocks(blocks, shape)
        base = torch.randn(shape, device=device).to(dtype)
        deltas = (0.1 * torch.randn((n, *shape), device=device)).to(dtype)
        coeffs = torch.rand((n, n_blocks) if per_block else (n,), device=device) + 0.25
        grad = torch.randn(shape, device=device).to(dtype)
        return dict(base=base, deltas=deltas, coeffs=coeffs, grad=grad, blocks=blocks)
    return make


def _ta_run(from_models: bool):
    fn = pyops.task_arithmetic_from_models if from_models else pyops.task_arithmetic

    def run(backend: str, x: dict) -> Dict[str, torch.Tensor]:
        base = x["base"].clone().requires_grad_(True)
        deltas = [d.clone().requires_grad_(True) for d in x["deltas"].unbind(0)]
        coeffs = x["coeffs"].clone().requires_grad_(True)
        out = fn(base, deltas, coeffs, blocks=x["blocks"], backend=backend)
        out.backward(x["grad"])
        result = {"out": out.detach(), "grad_base": base.grad, "grad_coeffs": coeffs.grad}
        result.update({f"grad_delta{i}": d.grad for i, d in enumerate(deltas)})
        return result
    return run


def task_arithmetic_cases():
    combos = itertools.product(TA_SHAPES, TA_DTYPES, TA_LAYOUTS, (False, True))
    for k, (shape, dtype, blocks, from_models) in enumerate(combos):
        n = (1, 3, 5)[k % 3]
        per_block = k % 2 == 0
        tol = tolerance_for(dtype)
        tols = {"out": tol, "grad_base": tol, "grad_coeffs": REDUCTION_TOL}
        tols.update({f"grad_delta{i}": tol for i in range(n)})
        name = (f"{list(shape)} N={n} blocks={blocks!r} {str(dtype)[6:]} "
                f"coeffs={'[N,nb]' if per_block else '[N]'}")
        yield Case("task_arithmetic", f"{'from_models ' if from_models else ''}{name}",
                   _ta_make(shape, n, blocks, dtype, per_block), _ta_run(from_models), tols)

SHAPES = [(1,), (7,), (3, 517), (64, 1031), (70_001,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METHODS = ["ties", "dare", "dare_ties", "breadcrumbs", "della", "della_linear", "consensus", "model_stock",
           "breadcrumbs_ties", "ties_exact_k"]
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
        if method == "ties_exact_k":
            kw.update(method="ties", exact_k=True)
        if method != "model_stock":
            kw.update(coeffs=[0.7, 0.4, 1.1][: x["finetuned"].shape[0]], blocks=blocks, density=density)
        if from_models:
            out = pyops.merge_from_models(x["base"], x["finetuned"], **kw)
        else:
            out = pyops.merge(x["base"], x["finetuned"] - x["base"], **kw)
        return {"out": out}
    return run


def merge_cases():
    # method outermost: each method's 15 (shape, dtype) cases are consecutive, so the quick subset's
    # stride (pyops.verify.QUICK_STRIDE, 5) takes three of each method whatever the number of methods
    for k, (method, shape, dtype) in enumerate(itertools.product(METHODS, SHAPES, DTYPES)):
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


IP_SHAPES = [(1,), (7,), (3, 517), (64, 1031), (70_001,)]
# (case name, number of models, whether a base is passed, the call)
IP_METHODS = [
    ("linear", 3, False, lambda b, ms, be: IP.linear(ms, [0.5, 0.3, 0.2], backend=be)),
    ("slerp", 1, True, lambda b, ms, be: IP.slerp(b, ms[0], 0.35, backend=be)),
    ("nearswap", 1, True, lambda b, ms, be: IP.nearswap(b, ms[0], 0.05, backend=be)),
    ("passthrough", 1, False, lambda b, ms, be: IP.passthrough(ms[0], 0.75, backend=be)),
    ("nuslerp", 2, True, lambda b, ms, be: IP.nuslerp(ms, [0.4, 0.6], base=b, backend=be)),
    ("nuslerp rows", 2, True, lambda b, ms, be: IP.nuslerp(ms, [0.4, 0.6], base=b, nuslerp_flatten=False,
                                                            backend=be)),
    ("nuslerp row_wise", 2, True, lambda b, ms, be: IP.nuslerp(ms, [0.4, 0.6], base=b, nuslerp_flatten=False,
                                                                nuslerp_row_wise=True, backend=be)),
    # weights no signed sum of which is 0 (1-element task vectors are ±1 unit vectors)
    ("multislerp", 3, True, lambda b, ms, be: IP.multislerp(ms, [0.25, 0.35, 0.4], base=b, backend=be)),
    ("multislerp no base", 3, False, lambda b, ms, be: IP.multislerp(ms, [0.25, 0.35, 0.4], backend=be)),
    ("karcher", 3, False, lambda b, ms, be: IP.karcher(ms, backend=be)),
    # epsilon 0.1 of task vectors 0.1·N(0, 1): about a third of the entries do not contribute
    ("ram", 3, True, lambda b, ms, be: IP.ram(b, ms, epsilon=0.1, backend=be)),
    ("ramplus_tl", 3, True, lambda b, ms, be: IP.ramplus_tl(b, ms, r=0.5, alpha=0.5, epsilon=0.1, backend=be)),
]


def _ip_make(shape, n, dtype):
    def make(device):
        base = torch.randn(shape, device=device).to(dtype)
        models = [(base.float() + 0.1 * torch.randn(shape, device=device)).to(dtype) for _ in range(n)]
        return dict(base=base, models=models)
    return make


def _ip_run(fn, with_base):
    def run(backend: str, x: dict) -> Dict[str, torch.Tensor]:
        return {"out": fn(x["base"] if with_base else None, x["models"], backend)}
    return run


def interpolate_cases():
    for shape, dtype, (name, n, with_base, fn) in itertools.product(IP_SHAPES, DTYPES, IP_METHODS):
        if name.endswith("row_wise"):
            # vectors along dim 0 of the transposed shape: hundreds of elements each. Three-element
            # vectors come near antipodal, where slerp is ill-conditioned (sin θ → 0 divides) and
            # the fp32 reference and the C++ kernels' double-precision angle part beyond rounding.
            shape = tuple(reversed(shape))
        yield Case(name.split(" ")[0], f"{name} {list(shape)} N={n} {str(dtype)[6:]}", _ip_make(shape, n, dtype),
                   _ip_run(fn, with_base), {"out": tolerance_for(dtype)},
                   backends=("cpu",) + (("triton",) if not name.startswith("ram") else ()))


def cases():
    yield from task_arithmetic_cases()
    yield from merge_cases()
    yield from interpolate_cases()
