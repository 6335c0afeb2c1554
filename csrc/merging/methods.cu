// The CUDA entry points of `pyops.merge` (merging/methods_cuda.h): the kernels of
// merging/methods_kernels.cuh launched on the caller's stream, each grid capped at the CTAs resident on
// the device (every kernel strides over its work).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common/launch_util.h"
#include "merging/methods_cuda.h"
#include "merging/methods_kernels.cuh"

namespace pyops {
namespace cuda_ops {
namespace {

struct StreamLauncher {
  cudaStream_t stream;

  template <class A>
  Status launch(void (*kernel)(A), int64_t ctas, const A& args) {
    int64_t limit = 1;
    Status st = grid_limit(reinterpret_cast<const void*>(kernel), cuda_merge::kThreads, &limit);
    if (!st.is_ok()) return st;
    const unsigned grid = (unsigned)std::max<int64_t>(1, std::min(ctas, limit));
    kernel<<<grid, cuda_merge::kThreads, 0, stream>>>(args);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_error("merge_forward: launching a kernel", e);
    return Status::ok();
  }

  Status zero(void* p, int64_t bytes) {
    const cudaError_t e = cudaMemsetAsync(p, 0, (size_t)bytes, stream);
    if (e != cudaSuccess) return cuda_error("merge_forward: cudaMemsetAsync", e);
    return Status::ok();
  }
};

}  // namespace

Status merge_workspace_bytes(int64_t numel, int64_t block_size, int64_t n, int method, bool grad_coeffs,
                             int64_t* bytes) {
  if (numel < 0) return Status::invalid("numel: expected >= 0, got " + std::to_string(numel));
  if (block_size <= 0) return Status::invalid("block_size: expected > 0, got " + std::to_string(block_size));
  if (n < 0) return Status::invalid("n: expected >= 0, got " + std::to_string(n));
  *bytes = cuda_merge::layout(numel, block_size, n, method, grad_coeffs).bytes;
  return Status::ok();
}

Status merge_forward(void* out, int out_dtype, const void* base, const void* delta_ptrs, int64_t n, int in_dtype,
                     const void* coeffs, int64_t coeff_stride_n, int64_t coeff_stride_block, const void* density,
                     int64_t numel, int64_t block_size, bool from_models, int method, float lam, uint64_t seed,
                     uint32_t name_hash, int64_t k, float tall_lambda, double gamma, double epsilon,
                     const void* ranks, bool normalize, void* workspace, int64_t workspace_bytes, void* stream) {
  if (reinterpret_cast<uintptr_t>(delta_ptrs) % 8 != 0)
    return Status::invalid("delta_ptrs must be 8-byte aligned (an int64 array)");
  if (reinterpret_cast<uintptr_t>(ranks) % 4 != 0) return Status::invalid("ranks must be 4-byte aligned (int32)");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return Status::invalid("workspace must be 16-byte aligned");
  const cuda_merge::Problem p{out, out_dtype, base, delta_ptrs, n, in_dtype, static_cast<const float*>(coeffs),
                              coeff_stride_n, coeff_stride_block, static_cast<const double*>(density), numel,
                              block_size, from_models, method, lam, seed, name_hash, k, tall_lambda, gamma,
                              epsilon, static_cast<const int32_t*>(ranks), normalize, workspace, workspace_bytes};
  StreamLauncher launcher{static_cast<cudaStream_t>(stream)};
  return cuda_merge::run(p, launcher);
}

Status merge_backward(const void* grad, int grad_dtype, const void* base, const void* delta_ptrs, int64_t n,
                      int in_dtype, const void* coeffs, int64_t coeff_stride_n, int64_t coeff_stride_block,
                      const void* density, int64_t numel, int64_t block_size, bool from_models, int method,
                      float lam, uint64_t seed, uint32_t name_hash, double gamma, double epsilon, const void* ranks,
                      bool normalize, void* grad_base, const void* grad_delta_ptrs, void* grad_coeffs,
                      void* workspace, int64_t workspace_bytes, void* stream) {
  if (reinterpret_cast<uintptr_t>(delta_ptrs) % 8 != 0 || reinterpret_cast<uintptr_t>(grad_delta_ptrs) % 8 != 0)
    return Status::invalid("delta_ptrs and grad_delta_ptrs must be 8-byte aligned (int64 arrays)");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) return Status::invalid("workspace must be 16-byte aligned");
  const cuda_merge::Problem p{nullptr, 0, base, delta_ptrs, n, in_dtype, static_cast<const float*>(coeffs),
                              coeff_stride_n, coeff_stride_block, static_cast<const double*>(density), numel,
                              block_size, from_models, method, lam, seed, name_hash, 1, 0.f, gamma, epsilon,
                              static_cast<const int32_t*>(ranks), normalize, workspace, workspace_bytes};
  const cuda_merge::BwdOutputs o{grad, grad_dtype, grad_base, grad_delta_ptrs, static_cast<float*>(grad_coeffs)};
  StreamLauncher launcher{static_cast<cudaStream_t>(stream)};
  return cuda_merge::run_backward(p, o, launcher);
}

}  // namespace cuda_ops
}  // namespace pyops
