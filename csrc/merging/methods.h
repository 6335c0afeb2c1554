// Model merging over task vectors (TIES, DARE, DARE-TIES, breadcrumbs, DELLA, consensus;
// model_stock's Gram matrix):
// fused CPU kernels, torch-free. The definitions are pyops/merging/reference.py; these kernels
// reproduce them operation for operation in fp32:
//
//   tau_i   = delta_i                  or  float(finetuned_i) - float(base)     (from_models)
//   ties    : t_i = [|tau_i| >= thr_i,b] * tau_i, thr_i,b the k-th largest |tau_i| of block b,
//             k = max(1, floor(density_i * n_b)) in fp64 (exact; ties kept); density_i >= 1 keeps all
//   ties, exact k (code 8): the same threshold, exactly k kept: every entry with !(|tau| <= thr)
//             (greater, or NaN), then the entries with |tau| == thr in increasing flat index
//   dare    : t_i = ([u_ij < density_i] / density_i) * tau_i, u from Philox4x32-10 with
//             counter (g lo, g hi, i, name_hash), g = j >> 2, key (seed lo, seed hi), word j & 3
//   breadcrumbs: t_i = [n_bottom <= r_ij < n - n_top] * tau_i with r_ij the ascending rank of
//             |tau_ij| in its block (ties by position), n_top = floor(gamma * n),
//             n_bottom = n - floor(density_i * n) - n_top (fp64 products, as the reference)
//   della   : p_ij = (density_i - eps) + (2 eps) * (n > 1 ? r_ij / (n - 1) : 0.5) in fp32,
//             t_i = ([u_ij < p_ij] / p_ij) * tau_i, u as for dare
//   breadcrumbs, della: density_i >= 1 keeps every entry (t_i = tau_i, nothing ranked or drawn)
//   breadcrumbs_ties (code 9): breadcrumbs' t_i, then the election below
//   electing (ties, dare_ties, della, breadcrumbs_ties): s = (sum_i w_i t_i >= 0 ? +1 : -1), a_i = [sign t_i = s, t_i != 0],
//             merged = sum_i a_i w_i t_i / sum_i a_i w_i (zero divisor -> 1; or the plain sum
//             when !normalize)
//   dare, breadcrumbs, della_linear: merged = sum_i w_i t_i
//   consensus: mtl = sum_i w_i tau_i, merged = [#{i : |tau_i| >= tall_lambda |mtl - tau_i|} >= k] * mtl
//   out     = base + lam * merged
//
// Sums over tasks run i = 0..N-1 from 0 (torch's order for a sum over dim 0 of up to 4 rows, and
// of the vectorised columns below 16 rows). The selection and masks are exact and depend on the
// data alone, so they are the same bits for every thread count and ISA.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"
#include "merging/task_arithmetic.h"

namespace pyops {

// Method codes (pyops/merging/spec.py NATIVE_METHOD_CODES).
enum MergeMethodCode : int {
  kMergeTaskArithmetic = 0,
  kMergeTies = 1,
  kMergeDare = 2,
  kMergeDareTies = 3,
  kMergeBreadcrumbs = 4,
  kMergeDella = 5,
  kMergeDellaLinear = 6,
  kMergeConsensus = 7,
  kMergeTiesExactK = 8,  // ties keeping exactly k per block (ties at the k-th by lowest flat index)
  kMergeBreadcrumbsTies = 9,  // breadcrumbs' rank band, then TIES' election (mergekit's breadcrumbs_ties)
};

// The task-arithmetic problem (base, task tensors, coefficients, blocks) plus the method's
// parameters.
struct MergeProblem : TaskArithmeticProblem {
  // n values in (0, 1], as the caller gave them (fp64). Counts are formed from them in fp64,
  // k = floor(density * n) as mergekit 0.1.5's int(density * n); keep probabilities (DARE, DELLA)
  // use fp32(density), as the reference and mergekit's fp32 Bernoulli draws.
  const double* density = nullptr;
  int method = kMergeTies;
  float lam = 1.f;
  uint64_t seed = 0;
  uint32_t name_hash = 0;
  int64_t k = 1;                        // consensus: tasks that must agree, in [1, n]
  float tall_lambda = 0.6f;             // consensus
  double gamma = 0.01;                  // breadcrumbs: the dropped top fraction, in [0, 1)
  double epsilon = 0.1;                 // della: the keep-probability spread
  bool normalize = true;                // electing methods: disjoint weighted mean
};

// Entry points, defined once per ISA (methods_forward.cpp, methods_backward.cpp,
// methods_gram.cpp) and reached through PYOPS_ISA_CALL (common/isa_dispatch.h):
//   merge_forward(p, out, out_dtype, n_threads): writes out[numel] in out_dtype. out may be base
//     itself (an in-place update: every tile of base is read before the same tile of out is
//     written); it must not overlap a delta.
//   merge_backward(p, grad, grad_dtype, grad_base, grad_deltas, grad_coeffs, n_threads): every mask
//     held fixed (every method but consensus, whose mask depends on the coefficients). grad
//     [numel] in grad_dtype; each output may be null: grad_base [numel] and grad_deltas (n
//     pointers to [numel]) in in_dtype, grad_coeffs [n, n_blocks] fp32 row-major. The same bits
//     for every thread count.
//   task_vector_gram(base, deltas, n, in_dtype, numel, from_models, gram, n_threads):
//     gram[i * n + j] = sum_j tau_i[j] * tau_j[j], accumulated in double over fixed chunks (the
//     same bits for every thread count).
#define PYOPS_MERGE_METHODS_DECLS                                                                    \
  Status merge_forward(const MergeProblem& p, void* out, DType out_dtype, int n_threads);            \
  Status merge_backward(const MergeProblem& p, const void* grad, DType grad_dtype, void* grad_base,  \
                        void* const* grad_deltas, float* grad_coeffs, int n_threads);                \
  Status task_vector_gram(const void* base, const void* const* deltas, int64_t n, DType in_dtype,    \
                          int64_t numel, bool from_models, double* gram, int n_threads);
namespace isa_base {
PYOPS_MERGE_METHODS_DECLS
}  // namespace isa_base
namespace isa_avx2 {
PYOPS_MERGE_METHODS_DECLS
}  // namespace isa_avx2
#undef PYOPS_MERGE_METHODS_DECLS

}  // namespace pyops
