"""Comparison rules shared by the test suite and `python -m pyops verify`.

This is the one tolerance table of the project (docs/design.md#numerics): tests/ and the verify command
both import it, so a kernel that passes one passes the other. Errors are measured against the
reference run on the same inputs; the bound is

    |actual − expected| ≤ atol · scale + rtol · |expected|,   scale = max(1, max |expected|)

so `atol` is relative to the magnitude of the tensor (a sum of many terms is judged against its
size, not against 1). Low-precision bounds allow one rounding step of the output dtype
(fp16: 2⁻¹⁰, bf16: 2⁻⁷ relative) plus fp32 summation-order differences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


TOLERANCES = {
    torch.float64: Tol(atol=1e-12, rtol=1e-10),
    torch.float32: Tol(atol=2e-6, rtol=2e-5),
    torch.float16: Tol(atol=1e-3, rtol=2e-3),
    torch.bfloat16: Tol(atol=8e-3, rtol=1.6e-2),
}

# Gradients that are long fp32 sums (e.g. a coefficient's gradient over a block of a million
# elements) differ from the reference by summation order only; judged in fp32 at their scale.
REDUCTION_TOL = Tol(atol=2e-5, rtol=2e-5)


@dataclass(frozen=True)
class Comparison:
    """The worst errors of one tensor against the reference, and the tolerance they were judged by.

    `used` is the largest |actual − expected| / bound over the finite elements: ≤ 1 passes, so it
    reads as the fraction of the allowed error spent (max_rel alone can be large on entries near
    zero, where the atol term of the bound decides)."""
    max_abs: float
    max_rel: float
    ok: bool
    tol: Optional[Tol] = None
    used: float = 0.0

    def __str__(self) -> str:
        tol = f" (tol atol={self.tol.atol:.2g} rtol={self.tol.rtol:.2g}, {self.used:.0%} used)" if self.tol else ""
        return f"max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g}{tol} {'ok' if self.ok else 'MISMATCH'}"


def compare(actual: torch.Tensor, expected: torch.Tensor, tol: Tol) -> Comparison:
    """Element-wise comparison in fp64; NaNs must match NaNs, infs must match exactly."""
    if actual.shape != expected.shape:
        return Comparison(float("inf"), float("inf"), False, tol, float("inf"))
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.numel() == 0:
        return Comparison(0.0, 0.0, True, tol)
    both_nan = torch.isnan(a) & torch.isnan(e)
    same_inf = torch.isinf(e) & (a == e)
    special_ok = bool(((torch.isnan(a) | torch.isinf(a) | torch.isnan(e) | torch.isinf(e)) <= (both_nan | same_inf)).all())
    finite = torch.isfinite(a) & torch.isfinite(e)
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return Comparison(0.0, 0.0, special_ok, tol)
    diff = (a - e).abs()
    scale = max(1.0, float(e.abs().max()))
    bound = tol.atol * scale + tol.rtol * e.abs()
    max_abs = float(diff.max())
    max_rel = float((diff / e.abs().clamp_min(tol.atol * scale)).max())
    used = float((diff / bound).max())
    return Comparison(max_abs, max_rel, special_ok and bool((diff <= bound).all()), tol, used)


def tolerance_for(dtype: torch.dtype) -> Tol:
    return TOLERANCES[dtype]
