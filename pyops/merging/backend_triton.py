"""The Triton path of `pyops.merge` (kernels/merge.py): ties, dare / dare_linear, dare_ties,
breadcrumbs, della / della_linear (their per-block ranks from a stable device sort).

`pyops.merging.merge` validates and chooses the backend; `run` here makes the inputs contiguous,
lays out the coefficients, allocates the output and calls the registered ops:

    pyops::merge_triton        functional
    pyops::merge_triton_out    the same, writing into `out`

Forward only: these methods' gradients (masks held fixed) are computed by the reference, and the
op layer sends calls that need them there, with that reason. Both ops are `triton_op`s, so they
trace under `torch.compile(fullgraph=True)`.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from pyops.merging import task_arithmetic as TM
from pyops.merging.spec import resolve_normalize
from pyops.merging import reference as ref

METHODS = ("ties", "dare", "dare_linear", "dare_ties", "breadcrumbs", "della", "della_linear")
# Method codes of kernels/merge.py (METHOD_TIES ... METHOD_DELLA_LINEAR).
METHOD_CODES = {"ties": 1, "dare": 2, "dare_linear": 2, "dare_ties": 3, "breadcrumbs": 4, "della": 5,
                "della_linear": 6}

_U64 = 1 << 64


def _kernels():
    from pyops.kernels.merging import methods as k  # imported lazily: Triton is optional
    return k


def _forward_into(out: Tensor, base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float],
                  block_size: int, from_models: bool, method: int, lam: float, seed: int, name_hash: int,
                  normalize: bool, gamma: float, epsilon: float) -> None:
    if out.numel() == 0:
        return
    c, s_n, s_b = TM._coeff_layout(coeffs)
    _kernels().merge_forward(out, base.detach().contiguous(), [d.detach().contiguous() for d in deltas], c, s_n,
                             s_b, [float(d) for d in density], block_size, from_models, method, lam,
                             seed & (_U64 - 1), name_hash, normalize, gamma=float(gamma), epsilon=float(epsilon))


@torch.library.triton_op("pyops::merge_triton", mutates_args=())
def _merge_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float], block_size: int,
              from_models: bool, method: int, lam: float, seed: int, name_hash: int, normalize: bool, gamma: float,
              epsilon: float, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    _forward_into(out, base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash,
                  normalize, gamma, epsilon)
    return out


@torch.library.triton_op("pyops::merge_triton_out", mutates_args=("out",))
def _merge_out_op(base: Tensor, deltas: List[Tensor], coeffs: Tensor, density: List[float], block_size: int,
                  from_models: bool, method: int, lam: float, seed: int, name_hash: int, normalize: bool,
                  gamma: float, epsilon: float, out: Tensor) -> None:
    _forward_into(out, base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash,
                  normalize, gamma, epsilon)


@_merge_op.register_fake
def _merge_fake(base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash, normalize,
                gamma, epsilon, out_dtype):
    return torch.empty(base.shape, dtype=out_dtype, device=base.device)


@_merge_out_op.register_fake
def _merge_out_fake(base, deltas, coeffs, density, block_size, from_models, method, lam, seed, name_hash,
                    normalize, gamma, epsilon, out):
    return None


def run(p: TM.Prepared, method: str, dens: List[float], *, from_models: bool, seed: int, lam: float, name: str,
        normalize: Optional[bool], gamma: float, epsilon: float, out: Optional[Tensor]) -> Tensor:
    """Runs `method` on the Triton kernels; `p`, `dens` and the parameters are validated by the caller."""
    if method not in METHOD_CODES:
        raise ValueError(f"method: the Triton kernels implement {', '.join(METHODS)}, got {method!r}")
    normalize = resolve_normalize(method, normalize)
    seed_i64 = seed - _U64 if seed >= 1 << 63 else seed  # the op schema's int is int64
    args = (p.base, p.deltas, p.coeffs, [float(d) for d in dens], p.block_size, from_models, METHOD_CODES[method],
            float(lam), seed_i64, ref.name_hash(name), bool(normalize), float(gamma), float(epsilon))
    if out is None:
        return _merge_op(*args, p.out_dtype)
    _merge_out_op(*args, out)
    return out
