// CPU kernels for block-wise task arithmetic. This file is compiled once per ISA (see
// CMakeLists.txt); PYOPS_ISA names the namespace the build goes into.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/convert.h"
#include "common/isa.h"
#include "common/thread_pool.h"
#include "merging/block_plan.h"
#include "merging/task_arithmetic.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace {

// Elements held in the per-tile fp32 stack buffers: small enough for L1, long enough that the
// per-tile coefficient bookkeeping is negligible.
constexpr int64_t kTile = 512;
// Reductions run in kLanes independent fp32 accumulators so that the compiler can vectorise
// them without -ffast-math; tile sums are then added in double.
constexpr int kLanes = 16;
// Working sets above this are streamed: the output would evict the inputs before reuse anyway.
constexpr int64_t kStreamingBytes = int64_t(512) << 20;


template <typename T, typename O, bool FromModels>
void forward_item(const TaskArithmeticProblem& p, const Plan& plan, int64_t k, O* out,
                  std::vector<float>& coeff, bool streaming) {
  const T* base = static_cast<const T*>(p.base);
  plan.for_segments(k, [&](int64_t b, int64_t lo, int64_t hi) {
    for (int64_t i = 0; i < p.n; ++i)
      coeff[i] = p.coeffs[i * p.coeff_stride_n + b * p.coeff_stride_block];
    alignas(64) float acc[kTile];
    alignas(64) float bb[kTile];
    alignas(64) float buf[kTile];
    for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
      const int64_t len = std::min(kTile, hi - t0);
      const float* b0 = as_float_tile(base + t0, buf, len);
      for (int64_t j = 0; j < len; ++j) acc[j] = b0[j];
      if (FromModels)
        for (int64_t j = 0; j < len; ++j) bb[j] = acc[j];
      for (int64_t i = 0; i < p.n; ++i) {
        const float c = coeff[i];
        const float* x = as_float_tile(static_cast<const T*>(p.deltas[i]) + t0, buf, len);
        if (FromModels) {
          for (int64_t j = 0; j < len; ++j) acc[j] += c * (x[j] - bb[j]);
        } else {
          for (int64_t j = 0; j < len; ++j) acc[j] += c * x[j];
        }
      }
      if (streaming)
        stream_tile(acc, out + t0, len);
      else
        store_tile(acc, out + t0, len);
    }
  });
  if (streaming) stream_fence();
}

// sum_j x[j] * y[j] in kLanes fp32 lanes (vectorisable, order fixed by the sizes alone).
inline float dot_lanes(const float* x, const float* y, int64_t len) {
  float lanes[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[j + l] * y[j + l];
  for (; j < len; ++j) lanes[0] += x[j] * y[j];
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

template <typename T, typename G, bool FromModels>
void backward_item(const TaskArithmeticProblem& p, const Plan& plan, int64_t k, const G* grad,
                   T* grad_base, T* const* grad_deltas, float* grad_coeffs, double* partial,
                   std::vector<float>& coeff, std::vector<double>& dots) {
  const T* base = static_cast<const T*>(p.base);
  plan.for_segments(k, [&](int64_t b, int64_t lo, int64_t hi) {
    float coeff_sum = 0.f;
    for (int64_t i = 0; i < p.n; ++i) {
      coeff[i] = p.coeffs[i * p.coeff_stride_n + b * p.coeff_stride_block];
      coeff_sum += coeff[i];
      dots[i] = 0.0;
    }
    const float base_scale = FromModels ? 1.f - coeff_sum : 1.f;
    alignas(64) float gbuf[kTile];
    alignas(64) float xbuf[kTile];
    alignas(64) float bb[kTile];
    alignas(64) float tmp[kTile];
    for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
      const int64_t len = std::min(kTile, hi - t0);
      const float* g = as_float_tile(grad + t0, gbuf, len);
      if (FromModels && grad_coeffs) {
        const float* b0 = as_float_tile(base + t0, xbuf, len);
        for (int64_t j = 0; j < len; ++j) bb[j] = b0[j];
      }
      if (grad_base) {
        for (int64_t j = 0; j < len; ++j) tmp[j] = base_scale * g[j];
        store_tile(tmp, grad_base + t0, len);
      }
      for (int64_t i = 0; i < p.n; ++i) {
        const float c = coeff[i];
        if (grad_deltas) {
          for (int64_t j = 0; j < len; ++j) tmp[j] = c * g[j];
          store_tile(tmp, grad_deltas[i] + t0, len);
        }
        if (grad_coeffs) {
          const float* x = as_float_tile(static_cast<const T*>(p.deltas[i]) + t0, xbuf, len);
          if (FromModels) {
            for (int64_t j = 0; j < len; ++j) tmp[j] = x[j] - bb[j];
            x = tmp;
          }
          dots[i] += (double)dot_lanes(g, x, len);
        }
      }
    }
    if (grad_coeffs) {
      if (plan.large) {
        for (int64_t i = 0; i < p.n; ++i) partial[k * p.n + i] = dots[i];
      } else {
        for (int64_t i = 0; i < p.n; ++i) grad_coeffs[i * plan.n_blocks + b] = (float)dots[i];
      }
    }
  });
}

Status check(const TaskArithmeticProblem& p) {
  if (p.numel < 0) return Status::invalid("numel must be >= 0, got " + std::to_string(p.numel));
  if (p.block_size <= 0)
    return Status::invalid("block_size must be > 0, got " + std::to_string(p.block_size));
  if (p.n < 0) return Status::invalid("number of deltas must be >= 0");
  if (p.numel > 0 && (p.base == nullptr || (p.n > 0 && (p.deltas == nullptr || p.coeffs == nullptr))))
    return Status::invalid("null data pointer");
  for (int64_t i = 0; p.numel > 0 && i < p.n; ++i)
    if (p.deltas[i] == nullptr) return Status::invalid("delta " + std::to_string(i) + " is a null pointer");
  return Status::ok();
}

}  // namespace

Status task_arithmetic_forward(const TaskArithmeticProblem& p, void* out, DType out_dtype,
                               int n_threads) {
  Status st = check(p);
  if (!st.is_ok()) return st;
  if (p.numel == 0) return Status::ok();
  if (out == nullptr) return Status::invalid("out is a null pointer");
  const Plan plan(p.numel, p.block_size);
  // Stream the output past the cache only when the whole working set cannot live in it.
  const int64_t working_set = p.numel * (int64_t)sizeof(float) * (p.n + 2);
  const bool streaming = working_set >= kStreamingBytes;
  return dispatch_dtype(p.in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    return dispatch_dtype(out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      O* o = static_cast<O*>(out);
      parallel_for(plan.n_items, n_threads, [&](int64_t k) {
        thread_local std::vector<float> coeff;
        coeff.resize(std::max<int64_t>(p.n, 1));
        if (p.from_models)
          forward_item<T, O, true>(p, plan, k, o, coeff, streaming);
        else
          forward_item<T, O, false>(p, plan, k, o, coeff, streaming);
      });
      return Status::ok();
    });
  });
}

Status task_arithmetic_backward(const TaskArithmeticProblem& p, const void* grad, DType grad_dtype,
                                void* grad_base, void* const* grad_deltas, float* grad_coeffs,
                                int n_threads) {
  Status st = check(p);
  if (!st.is_ok()) return st;
  const Plan plan(p.numel, p.block_size);
  if (p.numel == 0) {
    return Status::ok();
  }
  if (grad == nullptr) return Status::invalid("grad is a null pointer");
  std::vector<double> partial;
  if (grad_coeffs && plan.large) partial.assign((size_t)(plan.n_items * p.n), 0.0);
  st = dispatch_dtype(p.in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    return dispatch_dtype(grad_dtype, [&](auto grad_tag) {
      using G = decltype(grad_tag);
      const G* g = static_cast<const G*>(grad);
      T* const* gd = reinterpret_cast<T* const*>(grad_deltas);
      parallel_for(plan.n_items, n_threads, [&](int64_t k) {
        thread_local std::vector<float> coeff;
        thread_local std::vector<double> dots;
        coeff.resize(std::max<int64_t>(p.n, 1));
        dots.resize(std::max<int64_t>(p.n, 1));
        if (p.from_models)
          backward_item<T, G, true>(p, plan, k, g, static_cast<T*>(grad_base), gd, grad_coeffs,
                                    partial.data(), coeff, dots);
        else
          backward_item<T, G, false>(p, plan, k, g, static_cast<T*>(grad_base), gd, grad_coeffs,
                                     partial.data(), coeff, dots);
      });
      return Status::ok();
    });
  });
  if (!st.is_ok()) return st;
  if (grad_coeffs && plan.large) {
    for (int64_t b = 0; b < plan.n_blocks; ++b)
      for (int64_t i = 0; i < p.n; ++i) {
        double s = 0.0;
        for (int64_t c = 0; c < plan.items_per_block; ++c)
          s += partial[(b * plan.items_per_block + c) * p.n + i];
        grad_coeffs[i * plan.n_blocks + b] = (float)s;
      }
  }
  return Status::ok();
}

}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
