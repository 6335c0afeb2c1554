// Gram matrix of the task vectors for model_stock (merging/methods.h), one translation unit per
// ISA (see CMakeLists.txt): fixed chunks, double accumulation, summed in chunk order.
//
// Floating-point contraction is off for this file: every a * b + c rounds twice, as the
// reference's separate torch ops do, so the products, sums and the elected sign are the
// reference's bits wherever the summation order is the same (see merging/methods.h).
// -fno-trapping-math only declares FP exception flags unobservable, which lets GCC if-convert
// (and so vectorise) the masked selects; it changes no value.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "common/convert.h"
#include "common/isa.h"
#include "common/thread_pool.h"
#include "merging/block_plan.h"
#include "merging/methods.h"
#include "merging/methods_internal.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace merging_impl {

namespace {

// ------------------------------------------------------------------------------------------------
// Gram matrix of the task vectors (model_stock)
// ------------------------------------------------------------------------------------------------

// sum_j x[j] * y[j] in double, eight independent lanes (vectorisable; order fixed by len alone).
inline double dot_double(const float* x, const float* y, int64_t len) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= len; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += (double)x[j + l] * (double)y[j + l];
  for (; j < len; ++j) lanes[0] += (double)x[j] * (double)y[j];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

template <typename T, bool FM>
void gram_item(const MergeProblem& p, int64_t lo, int64_t hi, double* part, Scratch& s) {
  const int64_t n = p.n;
  const T* base = static_cast<const T*>(p.base);
  float* rows = s.rows.data();
  alignas(64) float bbuf[kTile];
  alignas(64) float xbuf[kTile];
  for (int64_t q = 0; q < n * n; ++q) part[q] = 0.0;
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t len = std::min(kTile, hi - t0);
    const float* bb = FM ? as_float_tile(base + t0, bbuf, len) : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      float* row = rows + i * kTile;
      const float* tau = load_tau<T, FM>(p, i, t0, len, bb, xbuf, row);
      if (tau != row)
        for (int64_t j = 0; j < len; ++j) row[j] = tau[j];
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i; j < n; ++j) part[i * n + j] += dot_double(rows + i * kTile, rows + j * kTile, len);
  }
}


}  // namespace
}  // namespace merging_impl

using namespace merging_impl;

Status task_vector_gram(const void* base, const void* const* deltas, int64_t n, DType in_dtype,
                        int64_t numel, bool from_models, double* gram, int n_threads) {
  if (n < 0) return Status::invalid("number of deltas must be >= 0, got " + std::to_string(n));
  if (numel < 0) return Status::invalid("numel must be >= 0, got " + std::to_string(numel));
  if (n > 0 && gram == nullptr) return Status::invalid("gram is a null pointer");
  for (int64_t q = 0; q < n * n; ++q) gram[q] = 0.0;
  if (numel == 0 || n == 0) return Status::ok();
  if (base == nullptr || deltas == nullptr) return Status::invalid("base or deltas is a null pointer");
  for (int64_t i = 0; i < n; ++i)
    if (deltas[i] == nullptr) return Status::invalid("delta " + std::to_string(i) + " is a null pointer");
  MergeProblem p;
  p.base = base;
  p.deltas = deltas;
  p.n = n;
  p.in_dtype = in_dtype;
  p.numel = numel;
  p.from_models = from_models;
  const int64_t n_items = (numel + kChunk - 1) / kChunk;
  std::vector<double> partial((size_t)(n_items * n * n));
  dispatch_dtype(in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    parallel_for(n_items, n_threads, [&](int64_t item) {
      Scratch& s = thread_scratch(n);
      const int64_t lo = item * kChunk, hi = std::min(numel, lo + kChunk);
      double* part = partial.data() + item * n * n;
      if (from_models)
        gram_item<T, true>(p, lo, hi, part, s);
      else
        gram_item<T, false>(p, lo, hi, part, s);
    });
    return 0;
  });
  for (int64_t item = 0; item < n_items; ++item)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i; j < n; ++j) gram[i * n + j] += partial[(item * n + i) * n + j];
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) gram[i * n + j] = gram[j * n + i];
  return Status::ok();
}

}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
