"""The C++ CPU path of `pyops.task_masked_attention` (csrc/task_attention/), kept apart from validation.

`pyops.task_attention.ops` validates, chooses the backend and ties each forward op to its
backward for autograd; this module declares what the C++ kernels take (`CPU`), registers the two
ops with their fake kernels and makes the calls into `pyops._C`:

    pyops::task_masked_attention            forward: (out [B, Hq, Lq, Dv], lse [B, Hq, Lq] fp32)
    pyops::task_masked_attention_backward   its backward: (dq, dk, dv)

The kernels take contiguous CPU tensors (fp32, fp16 or bf16), int32 group ids and a uint8
``[G, G]`` rule of at most 64 groups (`CPU.limits`, the kernels' own `kTaskAttentionMaxGroups`,
which they enforce with a ValueError); allow=None (the identity rule) becomes ``eye(max id + 1)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from pyops import _native
from pyops._backend import Capability
from pyops.task_attention import layout

# "groups" is G, the side of the [G, G] rule; `pyops._C.task_attention_max_groups()` reports the same bound.
CPU = Capability("cpu", functions=("task_attention_forward", "task_attention_backward"), limits={"groups": 64})

_U64 = (1 << 64) - 1


def reason(q: Tensor, n_groups: Optional[int]) -> Optional[str]:
    """None if the C++ kernels can take `q` (k and v share its dtype and device) with a rule of
    `n_groups` groups (None: not known, under torch.compile), else why not."""
    return CPU.reason(q.device, q, groups=n_groups)


def _native_allow(q_groups: Tensor, kv_groups: Tensor, allow: Optional[Tensor]) -> Tensor:
    """uint8 [G, G]; None (identity rule) becomes eye(max id + 1)."""
    if allow is None:
        hi = max(int(q_groups.max()) if q_groups.numel() else -1, int(kv_groups.max()) if kv_groups.numel() else -1)
        return torch.eye(max(hi + 1, 1), dtype=torch.uint8)
    return allow.to(torch.uint8).contiguous()


def _seed_u64(seed: Tensor) -> int:
    return int(seed.reshape(-1)[0]) & _U64


def _native_common(q, k, v, q_groups, kv_groups, allow):
    """The size arguments of both kernels (B, Hq, Hkv, Lq, Lk, D, Dv, G, and the ids' batch
    strides: 0 for ids shared by the batch), the uint8 rule and the int32 ids."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    al = _native_allow(q_groups, kv_groups, allow)
    qg = q_groups.to(torch.int32).contiguous()
    kg = kv_groups.to(torch.int32).contiguous()
    return (B, Hq, Hkv, Lq, Lk, D, Dv, al.shape[0], Lq if qg.dim() == 2 else 0, Lk if kg.dim() == 2 else 0), al, qg, kg


@torch.library.custom_op("pyops::task_masked_attention", mutates_args=(), device_types=("cpu",))
def forward_op(q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor, kv_groups: Tensor, allow: Optional[Tensor],
               causal: bool, dropout_p: float, scale: float, seed: Tensor) -> Tuple[Tensor, Tensor]:
    B, Hq, Lq, _ = q.shape
    out = torch.empty((B, Hq, Lq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if not layout.exact_forward(q, k, v, scale, dropout_p):
        return layout.reference_forward(q, k, v, q_groups, kv_groups, allow, causal, dropout_p, scale, seed)
    _native_forward(q, k, v, out, lse, q_groups, kv_groups, allow, causal, dropout_p, scale, seed)
    return out, lse


def _native_forward(q, k, v, out, lse, q_groups, kv_groups, allow, causal, dropout_p, scale, seed) -> None:
    """The C++ forward into `out` (q's dtype) and `lse`."""
    sizes, al, qg, kg = _native_common(q, k, v, q_groups, kv_groups, allow)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _native.cpu_module.task_attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), qg.data_ptr(), kg.data_ptr(),
        al.data_ptr(), *sizes, causal, scale, dropout_p, _seed_u64(seed), _native.dtype_code(q.dtype),
        torch.get_num_threads())


@torch.library.custom_op("pyops::task_masked_attention_backward", mutates_args=(), device_types=("cpu",))
def backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_groups: Tensor,
                kv_groups: Tensor, allow: Optional[Tensor], causal: bool, dropout_p: float, scale: float,
                seed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] == 0 or q.shape[1] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if not layout.exact_backward(dout, q, k, v, scale, dropout_p):
        return layout.reference_backward(dout, q, k, v, q_groups, kv_groups, allow, causal, dropout_p, scale, seed)
    if q.dtype != torch.float32:
        # The backward's D_i = dO_i·O_i needs O before its rounding to fp16/bf16 (with the rounded
        # O, dS = P(dP - D) loses the definition's value where dP and D cancel). The kernels
        # compute in fp32 whatever the storage dtype, so the call runs in fp32: O recomputed by an
        # fp32 forward, the gradients rounded once at the end.
        q32, k32, v32 = (t.to(torch.float32) for t in (q, k, v))
        out32 = torch.empty(out.shape, dtype=torch.float32)
        lse32 = torch.empty(lse.shape, dtype=torch.float32)
        _native_forward(q32, k32, v32, out32, lse32, q_groups, kv_groups, allow, causal, dropout_p, scale, seed)
        grads = [torch.empty(t.shape, dtype=torch.float32) for t in (q, k, v)]
        _native_backward(dout.to(torch.float32), q32, k32, v32, out32, lse32, *grads, q_groups, kv_groups, allow,
                         causal, dropout_p, scale, seed)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))
    _native_backward(dout, q, k, v, out, lse, dq, dk, dv, q_groups, kv_groups, allow, causal, dropout_p, scale, seed)
    return dq, dk, dv


def _native_backward(dout, q, k, v, out, lse, dq, dk, dv, q_groups, kv_groups, allow, causal, dropout_p, scale,
                     seed) -> None:
    """The C++ backward into `dq`, `dk`, `dv` (contiguous, the inputs' dtype)."""
    sizes, al, qg, kg = _native_common(q, k, v, q_groups, kv_groups, allow)
    q, k, v, out, dout, lse = (t.contiguous() for t in (q, k, v, out, dout, lse))
    _native.cpu_module.task_attention_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dout.data_ptr(), lse.data_ptr(),
        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), qg.data_ptr(), kg.data_ptr(), al.data_ptr(), *sizes,
        causal, scale, dropout_p, _seed_u64(seed), _native.dtype_code(q.dtype), torch.get_num_threads())


forward_op.register_fake(layout.forward_fake)
backward_op.register_fake(layout.backward_fake)
