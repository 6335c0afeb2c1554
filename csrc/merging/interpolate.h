// Interpolating merge methods of mergekit 0.1.5 (linear, slerp, nuslerp, multislerp, karcher,
// nearswap, passthrough): CPU kernels, torch-free. The definitions are in
// pyops/merging/reference.py; pyops/merging/interpolate.py composes every method from these
// three passes, with the few scalars between them (norms, angles, weights) computed from the
// Gram matrix:
//
//   vector_gram:    for every vector v of the layout, G[v][i][j] = sum_k x_i[v,k] * x_j[v,k]
//                   with x_i = float(input_i) - float(base) (base given) or float(input_i); the
//                   fp32 values' products are summed in double over fixed chunks of each vector.
//   vector_combine: out[v,k] = [base[v,k] +] (sum_i c[v][i] * x_i[v,k]) [/ divisor[v]]
//                   in fp32 (i = 0..n-1 from 0, no contraction), rounded once to out_dtype.
//   nearswap:       w = clamp(t / max(|a - b|, 1e-6), 0, 1), out = w * b + (1 - w) * a per element
//                   (a the base), fp32, rounded once; NaN propagates as torch's clamp does.
//   ram_counts:     mergekit's ramplus_tl statistics: per task i, over the whole tensor,
//                   shared[i] = #{nz_i and c > 1}, unique[i] = #{nz_i and c = 1}, with
//                   tau_i = float(input_i) - float(base), nz_i = |tau_i| > epsilon, c = sum_i nz_i.
//   ram_forward:    out = base + sum_i (tz_i * u * lam_i + (tz_i * o) / max(c, 1)) per element, with
//                   tz_i = tau_i * nz_i, u = [c = 1], o = [c > 1], lam_i = 1 (ram, lam null) or
//                   ramplus_tl's factor; fp32 term by term as mergekit's torch expression (a NaN or
//                   inf tau gives NaN), i = 0..n-1 from 0, rounded once.
//
// A vector layout: vector v (0 <= v < n_vectors) is the elements at flat indices
// v * vector_stride + k * element_stride, k in [0, length). Whole tensor: (1, numel, 0, 1); the
// rows of the last dimension: (numel / last, last, last, 1); the vectors along dim 0 (mergekit's
// nuslerp_row_wise): (numel / d0, d0, 1, numel / d0). The work split depends on the sizes alone,
// so every result is the same bits for every thread count.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace pyops {

struct VectorLayout {
  int64_t n_vectors = 1;
  int64_t length = 0;
  int64_t vector_stride = 0;
  int64_t element_stride = 1;
};

#define PYOPS_INTERPOLATE_DECLS                                                                       \
  Status vector_gram(const void* base, const void* const* inputs, int64_t n, DType in_dtype,         \
                     const VectorLayout& layout, double* gram, int n_threads);                        \
  Status vector_combine(const void* base, const void* const* inputs, int64_t n, DType in_dtype,      \
                        const VectorLayout& layout, const float* coeffs, const float* divisor,       \
                        void* out, DType out_dtype, int n_threads);                                  \
  Status nearswap_forward(const void* base, const void* model, DType in_dtype, int64_t numel, float t, \
                          void* out, DType out_dtype, int n_threads);                                 \
  Status ram_counts(const void* base, const void* const* inputs, int64_t n, DType in_dtype, int64_t numel, \
                    float epsilon, int64_t* shared, int64_t* unique, int n_threads);                  \
  Status ram_forward(const void* base, const void* const* inputs, int64_t n, DType in_dtype, int64_t numel, \
                     float epsilon, const float* lam, void* out, DType out_dtype, int n_threads);
namespace isa_base {
PYOPS_INTERPOLATE_DECLS
}  // namespace isa_base
namespace isa_avx2 {
PYOPS_INTERPOLATE_DECLS
}  // namespace isa_avx2
#undef PYOPS_INTERPOLATE_DECLS

}  // namespace pyops
