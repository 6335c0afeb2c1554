// Block-wise task arithmetic on the GPU (merging/task_arithmetic_cuda.h): argument checks, the
// choice of kernel and the launches on the caller's stream. The kernels and the layout of the
// work are in task_arithmetic_kernels.cuh.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common/launch_util.h"
#include "merging/task_arithmetic_cuda.h"
#include "merging/task_arithmetic_kernels.cuh"

namespace pyops {
namespace cuda_ops {

using namespace cuda_task_arithmetic;

namespace {

// ---- host side -------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Launches kernel<<<min(ctas, resident limit), kThreads>>> and reports launch errors.
template <typename Args>
Status launch(void (*kernel)(Args), int64_t ctas, const Args& a, cudaStream_t stream,
              const char* name) {
  int64_t limit = 1;
  Status st = grid_limit(reinterpret_cast<const void*>(kernel), kThreads, &limit);
  if (!st.is_ok()) return st;
  const unsigned grid = (unsigned)std::max<int64_t>(1, std::min(ctas, limit));
  kernel<<<grid, kThreads, 0, stream>>>(a);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_error(std::string("launching ") + name, e);
  return Status::ok();
}

bool valid_code(int code) { return code >= 0 && code <= 2; }

template <class F>
void dispatch(int code, F&& f) {
  switch (code) {
    case 1: f(F16{}); break;
    case 2: f(BF16{}); break;
    default: f(F32{}); break;
  }
}

bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

// The checks shared by forward and backward, in the CPU kernel's order.
Status check_common(int64_t numel, int64_t block_size, int64_t n, int in_dtype, const void* base,
                    const void* delta_ptrs, const void* coeffs) {
  if (!valid_code(in_dtype))
    return Status::invalid("in_dtype: unknown dtype code " + std::to_string(in_dtype));
  if (numel < 0) return Status::invalid("numel must be >= 0, got " + std::to_string(numel));
  if (block_size <= 0)
    return Status::invalid("block_size must be > 0, got " + std::to_string(block_size));
  if (n < 0) return Status::invalid("number of deltas must be >= 0, got " + std::to_string(n));
  if (numel == 0) return Status::ok();
  if (base == nullptr) return Status::invalid("base is a null pointer");
  if (n > 0 && delta_ptrs == nullptr) return Status::invalid("delta_ptrs is a null pointer");
  if (n > 0 && coeffs == nullptr) return Status::invalid("coeffs is a null pointer");
  if (!aligned(delta_ptrs, 8))
    return Status::invalid("delta_ptrs must be 8-byte aligned (an int64 array)");
  if (!aligned(coeffs, 4)) return Status::invalid("coeffs must be 4-byte aligned (float32)");
  return Status::ok();
}

// Large-block backward plan (block_size already clamped to numel).
struct LargePlan {
  int64_t n_blocks, items_per_block, n_items, ws_bytes;
};
LargePlan large_plan(int64_t numel, int64_t bs, int64_t n) {
  LargePlan p;
  p.n_blocks = ceil_div(numel, bs);
  p.items_per_block = ceil_div(bs, kChunk);
  p.n_items = p.n_blocks * p.items_per_block;
  p.ws_bytes = p.items_per_block > 1 ? p.n_items * n * (int64_t)sizeof(double) : 0;
  return p;
}

}  // namespace

Status task_arithmetic_forward(void* out, int out_dtype, const void* base, const void* delta_ptrs,
                               int64_t n, int in_dtype, const void* coeffs, int64_t coeff_stride_n,
                               int64_t coeff_stride_block, int64_t numel, int64_t block_size,
                               bool from_models, void* stream) {
  if (!valid_code(out_dtype))
    return Status::invalid("out_dtype: unknown dtype code " + std::to_string(out_dtype));
  Status st = check_common(numel, block_size, n, in_dtype, base, delta_ptrs, coeffs);
  if (!st.is_ok() || numel == 0) return st;
  if (out == nullptr) return Status::invalid("out is a null pointer");

  FwdArgs a;
  a.out = out;
  a.base = base;
  a.deltas = static_cast<const long long*>(delta_ptrs);
  a.n = n;
  a.coeffs = static_cast<const float*>(coeffs);
  a.sn = coeff_stride_n;
  a.sb = coeff_stride_block;
  a.numel = numel;
  // Blocks beyond numel do not exist; with a broadcast coefficient they do not matter at all.
  a.bs = coeff_stride_block == 0 ? numel : std::min(block_size, numel);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);

  dispatch(in_dtype, [&](auto ti) {
    using TI = decltype(ti);
    dispatch(out_dtype, [&](auto to) {
      using TO = decltype(to);
      constexpr int V = FwdOp<TI, TO, false>::V;
      const int64_t ctas = ceil_div(ceil_div(numel, V), kThreads);
      if (from_models)
        st = launch(elementwise_kernel<FwdOp<TI, TO, true>>, ctas, a, s, "task_arithmetic_forward");
      else
        st = launch(elementwise_kernel<FwdOp<TI, TO, false>>, ctas, a, s, "task_arithmetic_forward");
    });
  });
  return st;
}

Status task_arithmetic_backward_workspace_bytes(int64_t numel, int64_t block_size, int64_t n,
                                                int64_t* bytes) {
  *bytes = 0;
  if (numel < 0) return Status::invalid("numel must be >= 0, got " + std::to_string(numel));
  if (block_size <= 0)
    return Status::invalid("block_size must be > 0, got " + std::to_string(block_size));
  if (n < 0) return Status::invalid("number of deltas must be >= 0, got " + std::to_string(n));
  if (numel == 0 || n == 0) return Status::ok();
  const int64_t bs = std::min(block_size, numel);
  if (bs < kLargeMin) return Status::ok();
  *bytes = large_plan(numel, bs, n).ws_bytes;
  return Status::ok();
}

Status task_arithmetic_backward(const void* grad, int grad_dtype, const void* base,
                                const void* delta_ptrs, int64_t n, int in_dtype, const void* coeffs,
                                int64_t coeff_stride_n, int64_t coeff_stride_block, int64_t numel,
                                int64_t block_size, bool from_models, void* grad_base,
                                const void* grad_delta_ptrs, void* grad_coeffs, void* workspace,
                                int64_t workspace_bytes, void* stream) {
  if (!valid_code(grad_dtype))
    return Status::invalid("grad_dtype: unknown dtype code " + std::to_string(grad_dtype));
  Status st = check_common(numel, block_size, n, in_dtype, base, delta_ptrs, coeffs);
  if (!st.is_ok() || numel == 0) return st;
  if (grad == nullptr) return Status::invalid("grad is a null pointer");
  if (!aligned(grad_delta_ptrs, 8))
    return Status::invalid("grad_delta_ptrs must be 8-byte aligned (an int64 array)");
  if (!aligned(grad_coeffs, 4)) return Status::invalid("grad_coeffs must be 4-byte aligned");

  const int64_t bs = std::min(block_size, numel);
  BwdArgs a;
  a.grad = grad;
  a.base = base;
  a.deltas = static_cast<const long long*>(delta_ptrs);
  a.n = n;
  a.coeffs = static_cast<const float*>(coeffs);
  a.sn = coeff_stride_n;
  a.sb = coeff_stride_block;
  a.numel = numel;
  a.bs = bs;
  a.n_blocks = ceil_div(numel, bs);
  a.grad_base = grad_base;
  a.grad_deltas = n > 0 ? static_cast<const long long*>(grad_delta_ptrs) : nullptr;
  a.grad_coeffs = static_cast<float*>(grad_coeffs);
  a.ws = nullptr;
  a.items_per_block = 1;
  a.n_items = 0;
  a.group = 1;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);

  if (grad_coeffs == nullptr || n == 0) {
    // Element-wise only: grad_base and grad_deltas.
    if (grad_base == nullptr && a.grad_deltas == nullptr) return Status::ok();
    if (coeff_stride_block == 0) a.bs = numel;  // broadcast coefficient: one block will do
    dispatch(in_dtype, [&](auto ti) {
      using TI = decltype(ti);
      dispatch(grad_dtype, [&](auto tg) {
        using TG = decltype(tg);
        constexpr int V = BwdElemOp<TI, TG, false>::V;
        const int64_t ctas = ceil_div(ceil_div(numel, V), kThreads);
        if (from_models)
          st = launch(elementwise_kernel<BwdElemOp<TI, TG, true>>, ctas, a, s,
                      "task_arithmetic_backward");
        else
          st = launch(elementwise_kernel<BwdElemOp<TI, TG, false>>, ctas, a, s,
                      "task_arithmetic_backward");
      });
    });
    return st;
  }

  if (bs >= kLargeMin) {
    const LargePlan plan = large_plan(numel, bs, n);
    a.items_per_block = plan.items_per_block;
    a.n_items = plan.n_items;
    if (plan.ws_bytes > 0) {
      if (workspace == nullptr || workspace_bytes < plan.ws_bytes)
        return Status::invalid("workspace: expected at least " + std::to_string(plan.ws_bytes) +
                               " bytes, got " + std::to_string(workspace == nullptr ? 0 : workspace_bytes) +
                               (workspace == nullptr ? " (null pointer)" : ""));
      if (!aligned(workspace, 8)) return Status::invalid("workspace must be 8-byte aligned");
      a.ws = static_cast<double*>(workspace);
    }
    dispatch(in_dtype, [&](auto ti) {
      using TI = decltype(ti);
      dispatch(grad_dtype, [&](auto tg) {
        using TG = decltype(tg);
        if (from_models)
          st = launch(bwd_large_kernel<TI, TG, true>, plan.n_items, a, s,
                      "task_arithmetic_backward (stage 1)");
        else
          st = launch(bwd_large_kernel<TI, TG, false>, plan.n_items, a, s,
                      "task_arithmetic_backward (stage 1)");
      });
    });
    if (!st.is_ok() || a.ws == nullptr) return st;
    int64_t limit = 1;
    st = grid_limit(reinterpret_cast<const void*>(bwd_finish_kernel), kThreads, &limit);
    if (!st.is_ok()) return st;
    const unsigned grid =
        (unsigned)std::max<int64_t>(1, std::min(ceil_div(n * plan.n_blocks, kThreads), limit));
    bwd_finish_kernel<<<grid, kThreads, 0, s>>>(a.ws, a.grad_coeffs, n, plan.n_blocks,
                                                plan.items_per_block);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_error("launching task_arithmetic_backward (stage 2)", e);
    return Status::ok();
  }

  dispatch(in_dtype, [&](auto ti) {
    using TI = decltype(ti);
    dispatch(grad_dtype, [&](auto tg) {
      using TG = decltype(tg);
      constexpr int V = BwdElemOp<TI, TG, false>::V;
      int G = 1;
      while (G < 32 && (int64_t)G * V < bs) G *= 2;  // smallest power of two with G*V >= bs
      a.group = G;
      const int64_t ctas = ceil_div(a.n_blocks, (int64_t)kWarps * (32 / G));
      if (from_models)
        st = launch(bwd_small_kernel<TI, TG, true>, ctas, a, s, "task_arithmetic_backward");
      else
        st = launch(bwd_small_kernel<TI, TG, false>, ctas, a, s, "task_arithmetic_backward");
    });
  });
  return st;
}

}  // namespace cuda_ops
}  // namespace pyops
