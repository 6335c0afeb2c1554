// Task-masked attention: CPU kernels (torch-free).
//
// q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv], lse [B, Hq, Lq]
// fp32, all contiguous; query head h reads kv head h / (Hq / Hkv). Query i of batch row b may
// attend key j iff q_groups[b, i] >= 0, kv_groups[b, j] >= 0, allow[q_groups[b, i] * G +
// kv_groups[b, j]] != 0 and (not causal or j <= i). Group arrays are int32 with element (b, i) at
// b * bstride + i (bstride 0: shared over the batch). A row with no allowed key outputs zeros and
// lse = -inf. Dropout keeps element (b, h, i, j) iff philox_uniform(philox4x32_10(j, i, b*Hq + h,
// 0x5441534B, seed lo, seed hi).v[0]) >= dropout_p and scales kept probabilities by 1/(1 - p).
//
// Paths, chosen by the sizes alone: Lq, Lk <= kTaskAttentionShortMax runs one work item per
// batch row (all heads; per (batch row, kv head) when the batch is small) holding the whole score
// block, with the mask built once per batch row — for head dims <= 32 eight (backward) or sixteen
// (forward) query rows ride in the lanes of a vector, above that rows are register-blocked like
// the flash tiles. Longer sequences run flash-style 64 x 64 tiles with per-tile group summaries
// (tiles without an allowed pair are skipped; tiles whose pairs are all allowed skip the
// per-element test); the backward runs a key-centric pass (dk, dv) and a query-centric pass (dq). Accumulation is fp32; the
// work split depends only on the sizes, and the backward has no atomics, so the results are
// bit-identical for every thread count.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace pyops {

// Group ids are summarised as 64-bit masks: more groups than this are refused (the Python layer
// reports it as the reason the CPU backend cannot run).
constexpr int64_t kTaskAttentionMaxGroups = 64;
// Sequences up to this length (queries and keys) take the whole-block path.
constexpr int64_t kTaskAttentionShortMax = 128;

struct TaskAttentionProblem {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const int32_t* q_groups = nullptr;
  const int32_t* kv_groups = nullptr;
  const uint8_t* allow = nullptr;  // [G, G] row-major, nonzero = allowed
  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0, Dv = 0, G = 0;
  int64_t q_groups_bstride = 0;   // 0 or Lq
  int64_t kv_groups_bstride = 0;  // 0 or Lk
  bool causal = false;
  float scale = 1.f;
  float dropout_p = 0.f;
  uint64_t seed = 0;
  DType dtype = DType::kFloat32;
};

// Entry points, defined once per ISA and chosen at run time by PYOPS_ISA_CALL
// (common/isa_dispatch.h):
//   task_attention_forward(p, out, lse, n_threads): writes out [B, Hq, Lq, Dv] (dtype) and
//     lse [B, Hq, Lq] (fp32).
//   task_attention_backward(p, out, dout, lse, dq, dk, dv, n_threads): out, dout [B, Hq, Lq, Dv]
//     and lse as the forward wrote them; writes dq [B, Hq, Lq, D], dk [B, Hkv, Lk, D] and
//     dv [B, Hkv, Lk, Dv] (dtype; dk/dv summed over the query heads of each kv head in ascending
//     head order).
namespace isa_base {
Status task_attention_forward(const TaskAttentionProblem&, void*, float*, int);
Status task_attention_backward(const TaskAttentionProblem&, const void*, const void*, const float*,
                               void*, void*, void*, int);
}  // namespace isa_base
namespace isa_avx2 {
Status task_attention_forward(const TaskAttentionProblem&, void*, float*, int);
Status task_attention_backward(const TaskAttentionProblem&, const void*, const void*, const float*,
                               void*, void*, void*, int);
}  // namespace isa_avx2

}  // namespace pyops
