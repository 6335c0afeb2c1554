// Model merging (`pyops.merge`) on the GPU: ties, dare / dare_linear, dare_ties, breadcrumbs,
// della / della_linear and consensus, forward and backward (kernels: merging/methods_kernels.cuh;
// semantics and bits: merging/methods.h).
//
// Plain C++ (no CUDA headers), for merging/bind_cuda.cpp. Every pointer is a device address and
// `stream` a cudaStream_t; kernels run on the current device, which must hold the tensors.
#pragma once
#include <cstdint>

#include "common/status.h"

namespace pyops {
namespace cuda_ops {

// Device workspace (bytes) merge_forward (grad_coeffs = false) or merge_backward needs; depends
// only on the sizes, the method and whether the coefficients' gradient is wanted.
Status merge_workspace_bytes(int64_t numel, int64_t block_size, int64_t n, int method, bool grad_coeffs,
                             int64_t* bytes);

// out [numel] (out_dtype) = base + lam * merged, method codes as merging/methods.h (1 ties,
// 2 dare, 3 dare_ties, 4 breadcrumbs, 5 della, 6 della_linear, 7 consensus). ranks: device int32
// [n, numel], each element's ascending rank of |tau_i| in its block (ties by position), for
// breadcrumbs and della (null otherwise). delta_ptrs: device int64 array of n addresses of [numel] in
// in_dtype (fine-tuned weights when from_models); coeffs: fp32, c[i, b] = coeffs[i * coeff_stride_n
// + b * coeff_stride_block]; density: device fp64 [n]. out may be base itself; it must not overlap
// a delta. workspace: merge_workspace_bytes(...) bytes, 16-byte aligned, contents ignored.
Status merge_forward(void* out, int out_dtype, const void* base, const void* delta_ptrs, int64_t n, int in_dtype,
                     const void* coeffs, int64_t coeff_stride_n, int64_t coeff_stride_block, const void* density,
                     int64_t numel, int64_t block_size, bool from_models, int method, float lam, uint64_t seed,
                     uint32_t name_hash, int64_t k, float tall_lambda, double gamma, double epsilon,
                     const void* ranks, bool normalize, void* workspace, int64_t workspace_bytes, void* stream);

// The backward with every mask held fixed (every method but consensus), for the forward described
// by the same arguments: grad [numel] in grad_dtype; each output may be null (not wanted):
//   grad_base [numel] and grad_delta_ptrs (device int64 array of n addresses of [numel]) in
//   in_dtype: the C++ CPU kernels' bits; grad_coeffs [n, n_blocks] fp32, reduced in a fixed order
//   (deterministic; fp32 products summed in double).
Status merge_backward(const void* grad, int grad_dtype, const void* base, const void* delta_ptrs, int64_t n,
                      int in_dtype, const void* coeffs, int64_t coeff_stride_n, int64_t coeff_stride_block,
                      const void* density, int64_t numel, int64_t block_size, bool from_models, int method,
                      float lam, uint64_t seed, uint32_t name_hash, double gamma, double epsilon, const void* ranks,
                      bool normalize, void* grad_base, const void* grad_delta_ptrs, void* grad_coeffs,
                      void* workspace, int64_t workspace_bytes, void* stream);

}  // namespace cuda_ops
}  // namespace pyops
