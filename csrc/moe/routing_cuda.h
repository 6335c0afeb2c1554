// Fused expert routing: hand-written CUDA kernel (torch-free; see routing.cu).
//
// Plain C++ header (no CUDA headers) so that moe/bind_cuda.cpp compiles with the host
// compiler. Every pointer is a device address, `stream` a cudaStream_t; the kernels run on the
// current CUDA device, which must hold the tensors. All arrays contiguous.
//
// Semantics and outputs are those of the CPU kernel (moe/moe.h), bit for bit:
//   logits [T, E] (dtype code 0 fp32, 1 fp16, 2 bf16); score 0 softmax / 1 sigmoid;
//   bias fp32 [E] or null (must be finite: the host-side op validates it);
//   capacity -1 (none) or >= 0;
//   n_group G > 0, topk_group M: DeepSeek-V3 group-limited routing (0, 0: none); G divides E,
//   1 <= M <= G, k <= M * E / G; routed_scaling > 0 multiplies the weights (after renormalising);
//   weights fp32 [T, k], experts int32 [T, k], order int64 [T*k], offsets int64 [E+1],
//   dropped uint8 [T, k].
//
// Non-finite logits: the kernel cannot raise, so it reports through offsets[E]. Normally
// offsets[E] == T * k; if some logit is NaN or +-inf, offsets[E] == -(t + 1) where t is the
// smallest token index holding one, and the other outputs are unspecified (but every index the
// kernels wrote stays in range). The caller reads offsets[E] (one 8-byte copy) and raises
// "logits: contains NaN/inf at token t".
//
// Temporary device memory (per-tile expert counts, (T/256) * E * 8 bytes, one flag and, with
// groups, T * G * 5 bytes of group scores and flags) is taken with cudaMallocAsync /
// cudaFreeAsync on `stream`.
#pragma once
#include <cstdint>

#include "common/status.h"

namespace pyops {
namespace cuda_ops {

Status moe_route(const void* logits, int dtype, int64_t T, int64_t E, int64_t k, int score,
                 bool renormalize, const void* bias, int64_t capacity, int64_t n_group,
                 int64_t topk_group, float routed_scaling, void* weights, void* experts,
                 void* order, void* offsets, void* dropped, void* stream);

}  // namespace cuda_ops
}  // namespace pyops
