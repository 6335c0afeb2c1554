"""The CUDA path of `pyops.moe_route` (pyops._C_cuda, kernel in csrc/moe/).

`pyops::moe_route` is one registered op for CPU and CUDA tensors: backend_cpu.py defines it (schema,
fake kernel, the C++ kernel) and this module registers its CUDA kernel, which launches
`pyops._C_cuda.moe_route` on the current stream of the logits' device. Its results are the C++
kernel's bits (the same selection, order and fp32 scores).

The CUDA kernel cannot raise: non-finite logits come back as offsets[E] = -(t + 1), t the first
such token, and this module turns that into the C++ path's ValueError.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyops import _native
from pyops._backend import Capability
from pyops.moe import backend_cpu, schema as S

ROUTE = Capability("cuda", functions=("moe_route",))


@backend_cpu.route_op.register_kernel("cuda")
def route_cuda(logits: Tensor, k: int, score: int, renormalize: bool, capacity: int, bias: Optional[Tensor],
               n_group: int = 0, topk_group: int = 0,
               routed_scaling: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dev = logits.device

    def launch(*args, **kw) -> None:
        with torch.cuda.device(dev):
            _native.cuda_module.moe_route(*args, torch.cuda.current_stream(dev).cuda_stream, **kw)

    out = S.run_native_route(logits, k, score, renormalize, capacity, bias, launch, n_group, topk_group,
                             routed_scaling)
    if logits.shape[0]:
        last = int(out[3][logits.shape[1]])
        if last < 0:
            raise ValueError(f"logits: contains NaN/inf at token {-last - 1}")
    return out
