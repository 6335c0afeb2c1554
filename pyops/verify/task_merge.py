"""Verify cases for `task_arithmetic` / `task_arithmetic_from_models`: odd shapes, every dtype,
every block layout, forward and the gradients of base, every task tensor and the coefficients."""
from __future__ import annotations

import itertools
from typing import Dict

import torch

import pyops
from pyops.ops.task_merge import resolve_blocks
from pyops.testing import REDUCTION_TOL, tolerance_for
from pyops.verify import Case

SHAPES = [(1,), (7,), (3, 517), (5, 1, 9), (64, 1031)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [None, "rows", 7, 4096]


def _make(shape, n, blocks, dtype, per_block):
    def make(device):
        _, n_blocks = resolve_blocks(blocks, shape)
        base = torch.randn(shape, device=device).to(dtype)
        deltas = (0.1 * torch.randn((n, *shape), device=device)).to(dtype)
        coeffs = torch.rand((n, n_blocks) if per_block else (n,), device=device) + 0.25
        grad = torch.randn(shape, device=device).to(dtype)
        return dict(base=base, deltas=deltas, coeffs=coeffs, grad=grad, blocks=blocks)
    return make


def _run(from_models: bool):
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


def cases():
    combos = itertools.product(SHAPES, DTYPES, LAYOUTS, (False, True))
    for k, (shape, dtype, blocks, from_models) in enumerate(combos):
        n = (1, 3, 5)[k % 3]
        per_block = k % 2 == 0
        tol = tolerance_for(dtype)
        tols = {"out": tol, "grad_base": tol, "grad_coeffs": REDUCTION_TOL}
        tols.update({f"grad_delta{i}": tol for i in range(n)})
        name = (f"{list(shape)} N={n} blocks={blocks!r} {str(dtype)[6:]} "
                f"coeffs={'[N,nb]' if per_block else '[N]'}")
        yield Case("task_arithmetic", f"{'from_models ' if from_models else ''}{name}",
                   _make(shape, n, blocks, dtype, per_block), _run(from_models), tols)
