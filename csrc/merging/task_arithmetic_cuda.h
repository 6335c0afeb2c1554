// Block-wise task arithmetic: hand-written CUDA kernels (torch-free; see task_arithmetic.cu).
//
// This header is plain C++ (no CUDA headers) so that merging/bind_cuda.cpp can be compiled by
// the host compiler. Every pointer is a device address; `stream` is a cudaStream_t. Kernels run
// on the *current* CUDA device, which must be the one that holds the tensors. The forward may
// write out exactly over base or one delta (same address, same dtype); no other overlap of an
// output with an input is supported.
//
// Semantics are those of merging/task_arithmetic.h (numel elements, flattened and contiguous,
// block(j) = j / block_size, n_blocks = ceil(numel / block_size), fp32 accumulation):
//   out[j] = base[j] + sum_i c[i, block(j)] * delta_i[j]                 (from_models = false)
//   out[j] = base[j] + sum_i c[i, block(j)] * (finetuned_i[j] - base[j])  (from_models = true)
// with c[i, b] = coeffs[i * coeff_stride_n + b * coeff_stride_block] (fp32; stride 0 broadcasts).
// Dtype codes: 0 = float32, 1 = float16, 2 = bfloat16 (common/dtype.h).
#pragma once
#include <cstdint>

#include "common/status.h"

namespace pyops {
namespace cuda_ops {

// delta_ptrs: device array of n int64 device addresses (base and every delta in in_dtype).
// out: [numel] in out_dtype.
Status task_arithmetic_forward(void* out, int out_dtype, const void* base, const void* delta_ptrs,
                               int64_t n, int in_dtype, const void* coeffs, int64_t coeff_stride_n,
                               int64_t coeff_stride_block, int64_t numel, int64_t block_size,
                               bool from_models, void* stream);

// Bytes of device workspace task_arithmetic_backward needs when grad_coeffs is requested
// (0 when none is needed). Depends only on (numel, block_size, n).
Status task_arithmetic_backward_workspace_bytes(int64_t numel, int64_t block_size, int64_t n,
                                                int64_t* bytes);

// One pass over grad [numel] (grad_dtype). Each output may be null:
//   grad_base        [numel] in in_dtype: grad, or grad * (1 - sum_i c_i) when from_models
//   grad_delta_ptrs  device array of n int64 addresses of [numel] in in_dtype: c_i * grad
//   grad_coeffs      [n, n_blocks] fp32 row-major: sum over the block of grad * delta_i
//                    (grad * (finetuned_i - base) when from_models); deterministic
// workspace: at least task_arithmetic_backward_workspace_bytes(...) bytes, 8-byte aligned.
Status task_arithmetic_backward(const void* grad, int grad_dtype, const void* base,
                                const void* delta_ptrs, int64_t n, int in_dtype, const void* coeffs,
                                int64_t coeff_stride_n, int64_t coeff_stride_block, int64_t numel,
                                int64_t block_size, bool from_models, void* grad_base,
                                const void* grad_delta_ptrs, void* grad_coeffs, void* workspace,
                                int64_t workspace_bytes, void* stream);

}  // namespace cuda_ops
}  // namespace pyops
