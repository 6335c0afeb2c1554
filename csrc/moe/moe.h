// Fused expert routing (mixture of experts): CPU kernels (torch-free).
//
// Routing (moe_route), for logits [T, E] (dtype), fp32 math:
//   scores  s[t, e] = softmax(logits[t])[e]  (score 0)  or  sigmoid(logits[t, e])  (score 1)
//   keys    q[t, e] = s[t, e] + bias[e]  (bias fp32 [E], optional: it moves the choice only)
//   groups (n_group G > 0, topk_group M; DeepSeek-V3 group-limited routing): the experts form G
//                     groups of E / G consecutive experts; group score = top1 + top2 of its keys
//                     (top1 alone for groups of one expert); the M groups of largest score are
//                     kept (ties: lower group index), every expert of the others is excluded
//   experts[t, :]   = the k (kept) experts of largest key, descending; ties: lower expert index first
//   weights[t, j]   = s[t, experts[t, j]]  (divided by sum_j when renormalize, then multiplied by
//                     routed_scaling)                                              fp32 [T, k]
//   order  [T * k]  = assignment ids a = t * k + j stably sorted by expert (token order within an
//                     expert); offsets [E + 1]: expert e owns order[offsets[e] : offsets[e + 1]]
//   dropped[t, j]   = capacity >= 0 and the assignment's rank within its expert >= capacity
// The arithmetic (exp polynomial, 8-lane softmax sum, IEEE division, j-order renormalisation) is
// spelled out in moe/routing.cpp and repeated operation for operation by moe/routing.cu,
// so every ISA, thread count and the CUDA kernel produce the same bits.
//
// Expert MLP helpers (all arrays contiguous, dtype = fp32 / fp16 / bf16, fp32 math):
//   gather           rows[r] = x[order[r] / k]                                     rows [T*k, d]
//   act_forward      h = gate(a) * b (act 0 swiglu: silu, 1 geglu: erf-gelu) or act(a)
//                    (2 gelu, 3 silu, 4 relu), or act 5 swiglu_oai (GPT-OSS):
//                    g = min(a, limit), h = (clamp(b, -limit, limit) + 1) * g * sigmoid(alpha * g)
//                                                                                  [n_rows, hdim]
//   act_backward     da, db (db only for the GLU activations: 0, 1, 5); the clamps pass the
//                    gradient inside their interval, bounds included
//   combine          y[t] = sum_j [!dropped[t,j]] w[t,j] * ys[pos(t*k+j)], pos = order^-1
//   combine_backward dys[pos(a)] = w[a] * dy[t] (0 if dropped); dw[t,j] = <dy[t], ys[pos(a)]>
//   scatter_add      dx[t] = sum_j dxs[pos(t*k+j)]
// Sums over j run in increasing j; the work split depends on the sizes only: bit-identical for
// any thread count. Every index read from memory (order entries) is range-checked first: a bad
// one returns a Status error, never an out-of-bounds access.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace pyops {

enum class MoeScore : int { kSoftmax = 0, kSigmoid = 1 };
enum class MoeAct : int { kSwiglu = 0, kGeglu = 1, kGelu = 2, kSilu = 3, kRelu = 4, kSwigluOai = 5 };
inline bool moe_act_is_glu(int act) { return act == 0 || act == 1 || act == 5; }

#define PYOPS_MOE_DECLS                                                                          \
  Status moe_route(const void* logits, DType dtype, int64_t T, int64_t E, int64_t k, int score,  \
                   bool renormalize, const float* bias, int64_t capacity, int64_t n_group,       \
                   int64_t topk_group, float routed_scaling, float* weights, int32_t* experts,   \
                   int64_t* order, int64_t* offsets, uint8_t* dropped, int n_threads);           \
  Status moe_gather(const void* x, const int64_t* order, int64_t k, int64_t T, int64_t d,        \
                    void* rows, DType dtype, int n_threads);                                     \
  Status moe_act_forward(const void* a, const void* b, void* h, int64_t n_rows, int64_t hdim,    \
                         int act, DType dtype, int n_threads, float alpha, float limit);         \
  Status moe_act_backward(const void* a, const void* b, const void* dh, void* da, void* db,      \
                          int64_t n_rows, int64_t hdim, int act, DType dtype, int n_threads,     \
                          void* h, float alpha, float limit);                                    \
  Status moe_combine(const void* ys, const int64_t* order, const float* weights,                 \
                     const uint8_t* dropped, int64_t k, int64_t T, int64_t d, void* y,           \
                     DType dtype, int n_threads);                                                \
  Status moe_combine_backward(const void* dy, const void* ys, const int64_t* order,              \
                              const float* weights, const uint8_t* dropped, int64_t k,           \
                              int64_t T, int64_t d, void* dys, float* dweights, DType dtype,     \
                              int n_threads);                                                    \
  Status moe_scatter_add(const void* dxs, const int64_t* order, int64_t k, int64_t T, int64_t d, \
                         void* dx, DType dtype, int n_threads);

// Per-ISA implementations (routing.cpp, experts.cpp: compiled once per ISA); the binding reaches
// them through PYOPS_ISA_CALL (common/isa_dispatch.h).
namespace isa_base {
PYOPS_MOE_DECLS
}  // namespace isa_base
namespace isa_avx2 {
PYOPS_MOE_DECLS
}  // namespace isa_avx2

}  // namespace pyops
