// mergekit 0.1.5's fusing merge methods sce and arcee_fusion (mergekit/merge_methods/sce.py,
// mergekit/merge_methods/arcee_fusion.py): CPU forward kernels, torch-free. The definitions are
// pyops/merging/reference.py's `sce` and `arcee_fusion`; every step below is that reference's fp32
// arithmetic, with the order statistics exact (a radix select on the fp32 bits, deterministic).
//
//   sce_forward:  tau_i = float(input_i) - float(base) (fp32), i = 0..n-1.
//                 0 < select_topk < 1: var = the biased variance of the tau_i per element (mean and
//                 mean square deviation in double, rounded to fp32), k = int(fp32(fp32(#{var != 0})
//                 * fp32(select_topk))) (torch's int64-tensor-times-float product), keep the k
//                 largest |var| (NaN ranks below every number), ties at the k-th by lowest flat
//                 index; select_topk <= 0 keeps none; otherwise (>= 1, NaN) all.
//                 tm_i = tau_i * keep (fp32: a dropped inf / NaN tau gives NaN, as the reference).
//                 w_i = mean(tm_i^2) (fp32 squares summed in double over fixed chunks, / numel,
//                 rounded to fp32), normalised by their fp32 sum t (1/n each when |t| < 1e-6).
//                 s = +1 where sum_i tm_i >= 0 else -1 (NaN: -1); e_i = [sign(tm_i) == s].
//                 out = base + (sum_i tm_i * (w_i * e_i)) / max(sum_i w_i * e_i, 1e-6) in fp32,
//                 i from 0, NaN propagating through the clamp, rounded once to out_dtype.
//   arcee_fusion_forward:
//                 per row r of the last dimension (n_rows x row_len, row-major): p = softmax(x) +
//                 1e-8, q = softmax(base) + 1e-8 (fp32, expf; exp(v - max) times 1 / sum, the sums
//                 in double), kl_r = sum p * logf(p / q) (terms fp32, sum in double);
//                 importance = |x - base| * kl_r (fp32). With n = n_rows * row_len and
//                 idx_j = int(fp32(q_j * fp32(n - 1))) for q = 0.25, 0.5, 0.75 (torch's fp32
//                 product), v_j the ascending order statistic idx_j of the importance (NaN last),
//                 thr = v_2 + 1.5 * (v_3 - v_1) (fp32); out = base + (x - base) * [importance >= thr]
//                 (fp32; a NaN importance or threshold drops the change, a dropped inf / NaN change
//                 gives NaN, as the reference's multiply by 0). *threshold receives thr.
//
// Scratch (an fp32 value per element, small per-chunk counts) is allocated per call. The work split
// depends on the sizes alone, so every result is the same bits for every thread count.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace pyops {

#define PYOPS_FUSION_DECLS                                                                               \
  Status sce_forward(const void* base, const void* const* inputs, int64_t n, DType in_dtype, int64_t numel, \
                     double select_topk, void* out, DType out_dtype, int n_threads);                     \
  Status arcee_fusion_forward(const void* base, const void* model, DType in_dtype, int64_t n_rows,       \
                              int64_t row_len, void* out, DType out_dtype, float* threshold, int n_threads);
namespace isa_base {
PYOPS_FUSION_DECLS
}  // namespace isa_base
namespace isa_avx2 {
PYOPS_FUSION_DECLS
}  // namespace isa_avx2
#undef PYOPS_FUSION_DECLS

}  // namespace pyops
