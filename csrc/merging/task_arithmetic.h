// Block-wise task arithmetic (merging family): CPU kernels (torch-free).
//
//   out[j] = base[j] + sum_i coeffs[i, block(j)] * delta_i[j]                 (deltas given)
//   out[j] = base[j] + sum_i coeffs[i, block(j)] * (finetuned_i[j] - base[j])  (from_models)
//
// block(j) = j / block_size over the flattened tensor (the last block may be shorter).
// All arrays are contiguous; accumulation is fp32; the split into work items depends only on
// the sizes, so results are bit-identical for every thread count.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace pyops {

struct TaskArithmeticProblem {
  const void* base = nullptr;
  const void* const* deltas = nullptr;  // n pointers (fine-tuned weights when from_models)
  int64_t n = 0;
  DType in_dtype = DType::kFloat32;     // dtype of base and every delta
  const float* coeffs = nullptr;        // coeffs[i * coeff_stride_n + b * coeff_stride_block]
  int64_t coeff_stride_n = 0;
  int64_t coeff_stride_block = 0;       // 0 broadcasts one coefficient per task over all blocks
  int64_t numel = 0;
  int64_t block_size = 0;               // > 0
  bool from_models = false;
};

// Entry points, defined once per ISA (task_arithmetic.cpp) and reached through PYOPS_ISA_CALL
// (common/isa_dispatch.h):
//   task_arithmetic_forward(p, out, out_dtype, n_threads): writes out[numel] in out_dtype.
//   task_arithmetic_backward(p, grad, grad_dtype, grad_base, grad_deltas, grad_coeffs, n_threads):
//     one pass over grad [numel] (in grad_dtype). Each output may be null (not needed):
//       grad_base   [numel] in in_dtype: grad (deltas) or grad * (1 - sum_i c_i) (from_models)
//       grad_deltas n pointers to [numel] in in_dtype: c_i * grad
//       grad_coeffs [n, n_blocks] fp32 row-major: sum over the block of grad * delta_i
//                   (grad * (finetuned_i - base) when from_models)
#define PYOPS_TASK_ARITHMETIC_DECLS                                                                \
  Status task_arithmetic_forward(const TaskArithmeticProblem& p, void* out, DType out_dtype,       \
                                 int n_threads);                                                    \
  Status task_arithmetic_backward(const TaskArithmeticProblem& p, const void* grad, DType grad_dtype, \
                                  void* grad_base, void* const* grad_deltas, float* grad_coeffs,   \
                                  int n_threads);
namespace isa_base {
PYOPS_TASK_ARITHMETIC_DECLS
}  // namespace isa_base
namespace isa_avx2 {
PYOPS_TASK_ARITHMETIC_DECLS
}  // namespace isa_avx2
#undef PYOPS_TASK_ARITHMETIC_DECLS

}  // namespace pyops
