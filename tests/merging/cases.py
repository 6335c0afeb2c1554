"""Helpers shared by the merging family's test files: dtypes, inputs of the merge methods, the
library's own reasons for a merge backend that cannot run, result checks, parametrize ids and
the compile fixture. Helpers shared with other families live in tests/_support.py."""
from __future__ import annotations

from typing import Optional, Sequence

import pytest
import torch

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
