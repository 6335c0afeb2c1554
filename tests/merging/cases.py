"""Helpers shared by the merging family's test files: dtypes, inputs of the merge methods, the
library's own reasons for a merge backend that cannot run, result checks, parametrize ids and
the compile fixture. Helpers shared with other families live in tests/_support.py."""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import pytest
import torch

import pyops
from _support import randn
from pyops.merging import merge as M
from pyops.merging import task_arithmetic as TM
from pyops.merging.spec import resolve_blocks
from pyops.testing import compare, tolerance_for

FP32, FP16, BF16, FP64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DTYPES = [FP32, FP16, BF16]
RANKED = ["breadcrumbs", "della", "della_linear"]
FROM_MODELS_IDS = ["deltas", "from_models"]  # ids of a from_models parameter [False, True]

INTERPRETER_AOT_REASON = (
    "Triton under TRITON_INTERPRET=1: torch.library.wrap_triton returns the raw InterpretedFunction "
    "(torch/_library/triton.py), so AOT dispatch would run the interpreter on FakeTensors "
    "('Attempted to access the data pointer on an invalid python storage'); checked on a GPU")


def shape_id(shape: Sequence[int]) -> str:
    """`3x517` for a shape, `scalar` for ()."""
    return "x".join(map(str, shape)) if len(shape) else "scalar"


def block_size(shape: Sequence[int], blocks) -> int:
    """Elements per block of a tensor of `shape` for a `blocks` argument (the package's parser)."""
    return resolve_blocks(blocks, shape)[0]


def n_blocks(shape: Sequence[int], blocks) -> int:
    """Coefficient blocks of a tensor of `shape` for a `blocks` argument (the package's parser)."""
    return resolve_blocks(blocks, shape)[1]


def merge_inputs(shape, n: int, dtype, gen: torch.Generator, ties: bool = False, device=None):
    """base and n deltas (or fine-tuned weights) drawn in fp32 on the CPU, then cast (and moved to
    `device`): the same values for every dtype. `ties`: magnitudes 1 and 2 only, so masses of
    entries are tied with any k-th largest magnitude."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if ties:
        vals = torch.tensor([-2.0, -1.0, 1.0, 2.0])
        pick = lambda: vals[torch.randint(0, 4, shape, generator=gen)]  # noqa: E731
        return pick().to(dev, dtype), [pick().to(dev, dtype) for _ in range(n)]
    base = torch.randn(shape, generator=gen).to(dev, dtype)
    return base, [torch.randn(shape, generator=gen).to(dev, dtype) for _ in range(n)]


def merge_reason(backend: str, device: torch.device, method: str = "ties") -> Optional[str]:
    """The library's reason `backend` cannot run `method` on fp32 tensors of `device` (None: it can),
    so that a test skips with exactly what `pyops.merge` would say."""
    base = torch.zeros(4, device=device)
    p = TM.prepare(base, [base, base], [1.0, 1.0], None, None)
    return M._can_run(p, method, False)[backend]()


def check_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same dtype and shape, values within the tolerance of expected's dtype (docs/design.md#numerics)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    res = compare(actual.cpu(), expected.cpu(), tolerance_for(expected.dtype))
    assert res.ok, f"{what}: {res}"


@pytest.fixture
def fresh_dynamo():
    """torch._dynamo's caches cleared before and after the test."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Task-arithmetic inputs, block layouts and ids (the matrix of test_backends.py and friends)

BIG_BLOCK = 4096  # an int block size larger than any numel used in the matrix


def block_size_for(blocks, shape: Sequence[int]) -> int:
    """Block size of the flattened tensor, written out independently of the package's parser."""
    numel = math.prod(shape)
    if blocks is None:
        return max(numel, 1)
    if blocks == "rows":
        return max(numel // shape[0], 1) if shape[0] > 0 else 1
    return int(blocks)


def n_blocks_for(blocks, shape: Sequence[int]) -> int:
    numel = math.prod(shape)
    if blocks is None:
        return 1
    if blocks == "rows":
        return int(shape[0])
    return -(-numel // int(blocks))


def fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


def fmt_blocks(blocks) -> str:
    return "whole" if blocks is None else ("rows" if blocks == "rows" else f"b{blocks}")


def make_inputs(shape, n: int, dtype, blocks, coeff_kind: str, gen: torch.Generator, device=None):
    """base [*shape], stacked deltas [n, *shape], coeffs fp32 [n] ('vec') or [n, n_blocks] ('block')."""
    base = randn(shape, dtype, gen, device)
    deltas = randn((n, *shape), dtype, gen, device)
    cshape = (n,) if coeff_kind == "vec" else (n, n_blocks_for(blocks, shape))
    coeffs = randn(cshape, torch.float32, gen, device, scale=0.5)
    return base, deltas, coeffs


def reference(base, deltas, coeffs, blocks, from_models: bool, out_dtype=None) -> torch.Tensor:
    """The definition (pyops/merging/reference.py) on CPU copies of the inputs."""
    from pyops.merging.reference import task_arithmetic as ref

    items = list(deltas.unbind(0)) if isinstance(deltas, torch.Tensor) else list(deltas)
    return ref(base.cpu(), [d.cpu() for d in items], coeffs.cpu(), block_size=block_size_for(blocks, base.shape),
               from_models=from_models, out_dtype=out_dtype)


def public_fn(from_models: bool):
    return pyops.task_arithmetic_from_models if from_models else pyops.task_arithmetic


def merge_density(method: str, density):
    """`density` made acceptable to `method` (a float or a list): 1 stays 1 (keeps everything);
    below 1, breadcrumbs needs density + gamma (0.05 in the tests) <= 1 and DELLA density ± epsilon
    (0.1) inside (0, 1]."""
    lo, hi = {"breadcrumbs": (0.0, 0.95), "della": (0.15, 0.9), "della_linear": (0.15, 0.9)}.get(method, (0.0, 1.0))
    clamp = lambda d: d if d >= 1.0 else min(max(d, lo), hi)  # noqa: E731
    return [clamp(d) for d in density] if isinstance(density, list) else clamp(density)


def snapshot(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """Bit-exact copies (same strides) of `tensors`, to prove later that they were not modified."""
    return [t.detach().clone() for t in tensors]
