// Merge-method CPU backward with every mask held fixed (merging/methods.h), one translation unit
// per ISA (see CMakeLists.txt): the forward's masks recomputed per tile, then the gradients to
// base, the task tensors and the coefficients.
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
#include "merging/methods_ranking.h"
#include "merging/methods_selection.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace merging_impl {

namespace {


// ------------------------------------------------------------------------------------------------
// Backward (masks held fixed)
// ------------------------------------------------------------------------------------------------
//
// With the keep multipliers m_i (TIES: 1 kept / 0 trimmed; DARE: 1/density kept / 0 dropped) and
// the election a_i = [sign t_i = s, t_i != 0] (all 1 without an election) treated as constants,
//   merged = sum_i a_i w_i t_i / D,  t_i = m_i tau_i,  D = sum_i a_i w_i (0 -> the constant 1) or 1,
//   d out / d w_i   = lam * a_i * (t_i - [normalize] merged) / D
//   d out / d tau_i = lam * a_i * w_i * m_i / D
// so grad_coeffs[i, b] = sum over block b of grad * (d out / d w_i), grad_deltas[i] = grad *
// d out / d tau_i, grad_base = grad (deltas) or grad * (1 - sum_i d out / d tau_i) (from_models).

// sum_j x[j] * y[j] in double over 8 fp32 lanes flushed per tile (order fixed by len alone).
inline double dot_tile(const float* x, const float* y, int64_t len) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= len; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += x[j + l] * y[j + l];
  for (; j < len; ++j) lanes[0] += x[j] * y[j];
  return (((double)lanes[0] + lanes[1]) + ((double)lanes[2] + lanes[3])) +
         (((double)lanes[4] + lanes[5]) + ((double)lanes[6] + lanes[7]));
}

template <typename T, typename G, bool FM>
void backward_segment(const Ctx& ctx, int64_t b, int64_t lo, int64_t hi, const float* thr, const int64_t* cut,
                      const RankView& rv, const G* grad, T* grad_base, T* const* grad_deltas, double* dots, Scratch& s) {
  const MergeProblem& p = *ctx.p;
  const int64_t n = p.n;
  const T* base = static_cast<const T*>(p.base);
  float* w = s.w.data();
  for (int64_t i = 0; i < n; ++i) w[i] = p.coeffs[i * p.coeff_stride_n + b * p.coeff_stride_block];
  float* trows = s.rows.data();
  float* mrows = s.mult.data();
  const float lam = p.lam;
  const bool norm = ctx.electing && p.normalize;
  alignas(64) float bbuf[kTile];
  alignas(64) float xbuf[kTile];
  alignas(64) float gbuf[kTile];
  alignas(64) float acc[kTile];
  alignas(64) float sg[kTile];
  alignas(64) float invd[kTile];   // lam / D
  alignas(64) float merged[kTile];
  alignas(64) float dw[kTile];
  alignas(64) float dtau[kTile];
  alignas(64) float gsum[kTile];   // sum_i d out / d tau_i (from_models: grad_base)
  alignas(64) uint32_t words[kTile + 8];
  const int64_t blen = ctx.block_len(b);
  if (dots)
    for (int64_t i = 0; i < n; ++i) dots[i] = 0.0;

  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t len = std::min(kTile, hi - t0);
    const float* bb = FM ? as_float_tile(base + t0, bbuf, len) : nullptr;
    const float* g = as_float_tile(grad + t0, gbuf, len);
    for (int64_t j = 0; j < len; ++j) acc[j] = 0.f;
    const uint64_t g0 = (uint64_t)t0 >> 2;
    const int64_t ng = (int64_t)(((uint64_t)(t0 + len - 1) >> 2) - g0 + 1);
    const uint32_t* word = words + (t0 - (int64_t)(g0 << 2));
    for (int64_t i = 0; i < n; ++i) {
      float* row = trows + i * kTile;
      float* m = mrows + i * kTile;
      float tmp[kTile];
      const float* tau = load_tau<T, FM>(p, i, t0, len, bb, xbuf, tmp);
      if (ctx.ties && !ctx.keep_all[i] && cut) {  // exact k: the forward's mask (methods_forward.cpp)
        const float th = thr[i];
        const int64_t last = cut[i] - t0;
        for (int64_t j = 0; j < len; ++j) {
          const float a = std::fabs(tau[j]);
          m[j] = a > th || (a == th && j <= last) ? 1.f : 0.f;
        }
      } else if (ctx.ties && !ctx.keep_all[i]) {
        const float th = thr[i];
        for (int64_t j = 0; j < len; ++j) m[j] = std::fabs(tau[j]) >= th ? 1.f : 0.f;
      } else if (ctx.dare) {
        philox_words(g0, ng, (uint32_t)i, p.name_hash, ctx.keys, words);
        const uint32_t lim = ctx.dare_lim[i];
        const float keep = ctx.inv[i];
        for (int64_t j = 0; j < len; ++j) m[j] = (word[j] >> 8) < lim ? keep : 0.f;
      } else if (ctx.ranked) {
        if (ctx.della) philox_words(g0, ng, (uint32_t)i, p.name_hash, ctx.keys, words);
        rank_multipliers(ctx, i, blen, rv.row(i, t0), word, len, m);
      } else {
        for (int64_t j = 0; j < len; ++j) m[j] = 1.f;
      }
      const float wi = w[i];
      for (int64_t j = 0; j < len; ++j) {
        const float t = m[j] * tau[j];
        row[j] = t;
        acc[j] += wi * t;
      }
    }
    // The election (a_i folded into the multipliers: m_i = 0 where task i disagrees) and D.
    if (ctx.electing) {
      for (int64_t j = 0; j < len; ++j) {
        sg[j] = acc[j] >= 0.f ? 1.f : -1.f;
        invd[j] = 0.f;
        merged[j] = 0.f;
      }
      for (int64_t i = 0; i < n; ++i) {
        float* row = trows + i * kTile;
        float* m = mrows + i * kTile;
        const float wi = w[i];
        for (int64_t j = 0; j < len; ++j) {
          const float a = row[j] * sg[j] > 0.f ? 1.f : 0.f;
          row[j] *= a;
          m[j] *= a;
          invd[j] += a * wi;          // D
          merged[j] += a * (wi * row[j]);
        }
      }
      for (int64_t j = 0; j < len; ++j) {
        // D == 0 is replaced by the constant 1 (no gradient flows through it), so the merged
        // term of d out / d w_i vanishes there: merged is zeroed rather than divided.
        const float d = norm ? (invd[j] == 0.f ? 1.f : invd[j]) : 1.f;
        merged[j] = norm ? (invd[j] == 0.f ? 0.f : merged[j] / d) : merged[j];
        invd[j] = lam / d;
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        invd[j] = lam;
        merged[j] = 0.f;
      }
    }
    if (FM && grad_base)
      for (int64_t j = 0; j < len; ++j) gsum[j] = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float* row = trows + i * kTile;
      const float* m = mrows + i * kTile;
      const float wi = w[i];
      if (dots) {
        // d out / d w_i = lam * (t_i - [norm] merged) / D  (row already carries a_i; so must merged)
        for (int64_t j = 0; j < len; ++j) {
          const float a = m[j] != 0.f ? 1.f : 0.f;
          dw[j] = invd[j] * (row[j] - (norm ? a * merged[j] : 0.f));
        }
        dots[i] += dot_tile(g, dw, len);
      }
      if (grad_deltas || (FM && grad_base)) {
        for (int64_t j = 0; j < len; ++j) dtau[j] = invd[j] * wi * m[j] * g[j];
        if (grad_deltas) store_tile(dtau, grad_deltas[i] + t0, len);
        if (FM && grad_base)
          for (int64_t j = 0; j < len; ++j) gsum[j] += dtau[j];
      }
    }
    if (grad_base) {
      if (FM) {
        for (int64_t j = 0; j < len; ++j) gsum[j] = g[j] - gsum[j];
        store_tile(gsum, grad_base + t0, len);
      } else {
        store_tile(g, grad_base + t0, len);
      }
    }
  }
}

template <typename T, typename G, bool FM>
void merge_backward_typed(Ctx& ctx, const G* grad, T* grad_base, T* const* grad_deltas, float* grad_coeffs,
                          int n_threads) {
  const MergeProblem& p = *ctx.p;
  const Plan& plan = ctx.plan;
  const int64_t n = p.n;
  const bool large = ctx.ties && plan.block_size >= kRadixMin;
  if (large) large_thresholds<T, FM>(ctx, n_threads);
  if (large && ctx.exact_k) large_exact_k_cuts<T, FM>(ctx, n_threads);
  RankView large_rv;
  if (ctx.ranked && plan.large) large_rv = large_block_ranks<T, FM>(ctx, n_threads);
  // Per item, per segment: the n dot products. Small blocks: each block is one segment of one
  // item, written straight into grad_coeffs. Large blocks: one partial per item, summed in item
  // order afterwards (the same bits for every thread count).
  std::vector<double> partial;
  if (grad_coeffs && plan.large) partial.assign((size_t)(plan.n_items * n), 0.0);
  parallel_for(plan.n_items, n_threads, [&](int64_t item) {
    Scratch& s = thread_scratch(n);
    std::vector<double> dots_local;  // one small allocation per 64K-element item
    dots_local.resize((size_t)std::max<int64_t>(n, 1));
    std::vector<int64_t> cuts;
    plan.for_segments(item, [&](int64_t b, int64_t lo, int64_t hi) {
      RankView rv = large_rv;
      if (ctx.ranked && !plan.large) rv = small_block_ranks<T, FM>(ctx, lo, hi, s);
      const float* thr = nullptr;
      const int64_t* cut = nullptr;
      if (ctx.ties) {
        if (large) {
          thr = ctx.thr.data() + b * n;
          if (ctx.exact_k) cut = ctx.cut.data() + b * n;
        } else {
          for (int64_t i = 0; i < n; ++i)
            s.thr[i] = ctx.keep_all[i] ? 0.f : kth_largest_small<T, FM>(p, i, lo, hi, ctx.topk(i, hi - lo), s);
          thr = s.thr.data();
          if (ctx.exact_k) {
            cuts.assign((size_t)n, lo - 1);
            for (int64_t i = 0; i < n; ++i)
              if (!ctx.keep_all[i]) cuts[i] = exact_k_cut<T, FM>(p, i, lo, hi, s.thr[i], ctx.topk(i, hi - lo));
            cut = cuts.data();
          }
        }
      }
      double* dots = grad_coeffs ? dots_local.data() : nullptr;
      backward_segment<T, G, FM>(ctx, b, lo, hi, thr, cut, rv, grad, grad_base, grad_deltas, dots, s);
      if (grad_coeffs) {
        if (plan.large) {
          for (int64_t i = 0; i < n; ++i) partial[item * n + i] = dots[i];
        } else {
          for (int64_t i = 0; i < n; ++i) grad_coeffs[i * plan.n_blocks + b] = (float)dots[i];
        }
      }
    });
  });
  if (grad_coeffs && plan.large) {
    for (int64_t b = 0; b < plan.n_blocks; ++b)
      for (int64_t i = 0; i < n; ++i) {
        double acc = 0.0;
        for (int64_t c = 0; c < plan.items_per_block; ++c) acc += partial[(b * plan.items_per_block + c) * n + i];
        grad_coeffs[i * plan.n_blocks + b] = (float)acc;
      }
  }
}

}  // namespace
}  // namespace merging_impl

using namespace merging_impl;

Status merge_backward(const MergeProblem& p, const void* grad, DType grad_dtype, void* grad_base,
                      void* const* grad_deltas, float* grad_coeffs, int n_threads) {
  Status st = check(p, false, nullptr);
  if (!st.is_ok()) return st;
  if (p.method == kMergeConsensus)
    return Status::invalid("method: the consensus mask depends on the coefficients; its backward is the reference's");
  if (p.numel == 0) return Status::ok();
  if (grad == nullptr) return Status::invalid("grad is a null pointer");
  Ctx ctx(p);
  return dispatch_dtype(p.in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    return dispatch_dtype(grad_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      const G* g = static_cast<const G*>(grad);
      T* gb = static_cast<T*>(grad_base);
      T* const* gd = reinterpret_cast<T* const*>(grad_deltas);
      if (p.from_models)
        merge_backward_typed<T, G, true>(ctx, g, gb, gd, grad_coeffs, n_threads);
      else
        merge_backward_typed<T, G, false>(ctx, g, gb, gd, grad_coeffs, n_threads);
      return Status::ok();
    });
  });
}

}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
