// Merge-method CPU forward (TIES, DARE, DARE-TIES, breadcrumbs, DELLA, consensus; merging/methods.h),
// one translation unit per ISA (see CMakeLists.txt): thresholds, ranks or breadcrumbs' band limits
// first where a block needs them, then one combine pass per tile (trim / drop, the election,
// base + lam * merged).
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
// The combine pass
// ------------------------------------------------------------------------------------------------

// TIES' election over a tile, from the trimmed rows t_i (row i at trows + i * kTile) and
// acc = sum_i w_i t_i; writes the merged value into acc. Per element, in the reference's order:
//   s = (acc >= 0 ? + : -), a_i = [sign t_i = s, t_i != 0],
//   tot = sum_i a_i (w_i t_i), div = sum_i a_i w_i, merged = tot / (div == 0 ? 1 : div) or tot.
// Up to 8 tasks the task loop is unrolled inside the element loop (sums in registers).
template <int N, bool Normalize>
void elect_fixed(const float* trows, const float* w, float* acc, int64_t len) {
  float wi[N];
  for (int i = 0; i < N; ++i) wi[i] = w[i];
  for (int64_t j = 0; j < len; ++j) {
    // t * s > 0 exactly when sign t = s and t != 0 (t * +-1 is exact; NaN compares false).
    const float sg = acc[j] >= 0.f ? 1.f : -1.f;
    float tot = 0.f, div = 0.f;
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) {
      const float t = trows[i * kTile + j];
      const float a = t * sg > 0.f ? 1.f : 0.f;
      tot += a * (wi[i] * t);
      div += a * wi[i];
    }
    acc[j] = Normalize ? tot / (div == 0.f ? 1.f : div) : tot;
  }
}

template <int N>
void elect_n(const float* trows, const float* w, bool normalize, float* acc, int64_t len) {
  if (normalize)
    elect_fixed<N, true>(trows, w, acc, len);
  else
    elect_fixed<N, false>(trows, w, acc, len);
}

void elect(const float* trows, const float* w, int64_t n, bool normalize, float* acc, int64_t len, float* tot,
           float* div) {
  switch (n) {
    case 1: return elect_n<1>(trows, w, normalize, acc, len);
    case 2: return elect_n<2>(trows, w, normalize, acc, len);
    case 3: return elect_n<3>(trows, w, normalize, acc, len);
    case 4: return elect_n<4>(trows, w, normalize, acc, len);
    case 5: return elect_n<5>(trows, w, normalize, acc, len);
    case 6: return elect_n<6>(trows, w, normalize, acc, len);
    case 7: return elect_n<7>(trows, w, normalize, acc, len);
    case 8: return elect_n<8>(trows, w, normalize, acc, len);
    default: break;
  }
  for (int64_t j = 0; j < len; ++j) tot[j] = div[j] = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float* t = trows + i * kTile;
    const float wi = w[i];
    for (int64_t j = 0; j < len; ++j) {
      const float a = t[j] * (acc[j] >= 0.f ? 1.f : -1.f) > 0.f ? 1.f : 0.f;
      tot[j] += a * (wi * t[j]);
      div[j] += a * wi;
    }
  }
  if (normalize) {
    for (int64_t j = 0; j < len; ++j) acc[j] = tot[j] / (div[j] == 0.f ? 1.f : div[j]);
  } else {
    for (int64_t j = 0; j < len; ++j) acc[j] = tot[j];
  }
}

// out[lo, hi) of block b; thr: the n TIES thresholds of the block (ties only); cut: with exact k,
// the n flat indices of the last admitted ties (else null); rv: the ranks (ranked methods only);
// band: breadcrumbs on long blocks, the block's [n][2] entry limits instead of ranks (else null).
template <typename T, typename O, bool FM>
void combine_segment(const Ctx& ctx, int64_t b, int64_t lo, int64_t hi, const float* thr, const int64_t* cut,
                     const RankView& rv, const uint64_t* band, O* out, Scratch& s) {
  const MergeProblem& p = *ctx.p;
  const int64_t n = p.n;
  const T* base = static_cast<const T*>(p.base);
  float* w = s.w.data();
  for (int64_t i = 0; i < n; ++i) w[i] = p.coeffs[i * p.coeff_stride_n + b * p.coeff_stride_block];
  const bool keep_rows = ctx.electing || p.method == kMergeConsensus;
  float* trows = s.rows.data();           // n rows: t_i (or tau_i for consensus)
  const float lam = p.lam;
  alignas(64) float bbuf[kTile];
  alignas(64) float xbuf[kTile];
  alignas(64) float tbuf[kTile];
  alignas(64) float acc[kTile];
  alignas(64) float res[kTile];
  alignas(64) float mbuf[kTile];
  alignas(64) uint32_t words[kTile + 8];
  const int64_t blen = ctx.block_len(b);

  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t len = std::min(kTile, hi - t0);
    // For fp32, bb points into base, which may be out itself: every read of bb happens before
    // the store at the end of the tile.
    const float* bb = as_float_tile(base + t0, bbuf, len);
    if (t0 + 3 * kTile <= p.numel) {  // software prefetch two tiles ahead (past hi: the next item's)
      constexpr int64_t kLine = 64 / (int64_t)sizeof(T);
      for (int64_t j = 0; j < kTile; j += kLine) {
        __builtin_prefetch(base + t0 + 2 * kTile + j);
        for (int64_t i = 0; i < n; ++i) __builtin_prefetch(static_cast<const T*>(p.deltas[i]) + t0 + 2 * kTile + j);
      }
    }
    for (int64_t j = 0; j < len; ++j) acc[j] = 0.f;
    const uint64_t g0 = (uint64_t)t0 >> 2;
    const int64_t ng = (int64_t)(((uint64_t)(t0 + len - 1) >> 2) - g0 + 1);
    const uint32_t* word = words + (t0 - (int64_t)(g0 << 2));  // word[j] belongs to element t0 + j

    for (int64_t i = 0; i < n; ++i) {
      float* row = keep_rows ? trows + i * kTile : tbuf;
      const float* tau = load_tau<T, FM>(p, i, t0, len, bb, xbuf, row);
      const float wi = w[i];
      // t_i (the trimmed / dropped tau) into row, and acc += w_i * t_i, in one sweep.
      if (ctx.ties && !ctx.keep_all[i] && cut) {
        const float th = thr[i];
        const int64_t last = cut[i] - t0;  // ties at tile offsets <= last are kept
        for (int64_t j = 0; j < len; ++j) {
          const float a = std::fabs(tau[j]);
          const float t = (a > th || (a == th && j <= last) ? 1.f : 0.f) * tau[j];
          row[j] = t;
          acc[j] += wi * t;
        }
      } else if (ctx.ties && !ctx.keep_all[i]) {
        const float th = thr[i];
        for (int64_t j = 0; j < len; ++j) {
          const float t = (std::fabs(tau[j]) >= th ? 1.f : 0.f) * tau[j];
          row[j] = t;
          acc[j] += wi * t;
        }
      } else if (ctx.dare) {
        philox_words(g0, ng, (uint32_t)i, p.name_hash, ctx.keys, words);
        const uint32_t lim = ctx.dare_lim[i];
        const float keep = ctx.inv[i];
        for (int64_t j = 0; j < len; ++j) {
          const float t = ((word[j] >> 8) < lim ? keep : 0.f) * tau[j];
          row[j] = t;
          acc[j] += wi * t;
        }
      } else if (band) {
        band_multipliers(band + 2 * i, tau, (uint64_t)(t0 - b * ctx.plan.block_size), len, mbuf);
        for (int64_t j = 0; j < len; ++j) {
          const float t = mbuf[j] * tau[j];
          row[j] = t;
          acc[j] += wi * t;
        }
      } else if (ctx.ranked) {
        if (ctx.della) philox_words(g0, ng, (uint32_t)i, p.name_hash, ctx.keys, words);
        rank_multipliers(ctx, i, blen, rv.row(i, t0), word, len, mbuf);
        for (int64_t j = 0; j < len; ++j) {
          const float t = mbuf[j] * tau[j];
          row[j] = t;
          acc[j] += wi * t;
        }
      } else {  // ties keeping everything, consensus, task arithmetic: t = tau
        if (keep_rows && tau != row)
          for (int64_t j = 0; j < len; ++j) row[j] = tau[j];
        for (int64_t j = 0; j < len; ++j) acc[j] += wi * tau[j];
      }
    }

    if (ctx.electing) {
      // acc holds sum_i w_i t_i: elect the sign, then the (weighted) disjoint mean.
      elect(trows, w, n, p.normalize, acc, len, s.tot.data(), s.div.data());
    } else if (p.method == kMergeConsensus) {
      alignas(64) int32_t cnt[kTile];
      for (int64_t j = 0; j < len; ++j) cnt[j] = 0;
      const float tl = p.tall_lambda;
      for (int64_t i = 0; i < n; ++i) {
        const float* tau = trows + i * kTile;
        for (int64_t j = 0; j < len; ++j) cnt[j] += std::fabs(tau[j]) >= tl * std::fabs(acc[j] - tau[j]) ? 1 : 0;
      }
      const int32_t kk = (int32_t)p.k;
      for (int64_t j = 0; j < len; ++j) acc[j] = (cnt[j] >= kk ? 1.f : 0.f) * acc[j];
    }
    for (int64_t j = 0; j < len; ++j) res[j] = bb[j] + lam * acc[j];
    store_tile(res, out + t0, len);
  }
}

template <typename T, typename O, bool FM>
void merge_typed(Ctx& ctx, O* out, int n_threads) {
  const MergeProblem& p = *ctx.p;
  const Plan& plan = ctx.plan;
  const bool large = ctx.ties && plan.block_size >= kRadixMin;
  if (large) large_thresholds<T, FM>(ctx, n_threads);
  if (large && ctx.exact_k) large_exact_k_cuts<T, FM>(ctx, n_threads);
  // Long blocks: breadcrumbs needs only whether a rank lies in its band (two selected entries per
  // block and task); DELLA needs the ranks themselves.
  const bool bands = ctx.ranked && !ctx.della && plan.large;
  if (bands) large_block_bands<T, FM>(ctx, n_threads);
  RankView large_rv;
  if (ctx.ranked && ctx.della && plan.large) large_rv = large_block_ranks<T, FM>(ctx, n_threads);
  parallel_for(plan.n_items, n_threads, [&](int64_t item) {
    Scratch& s = thread_scratch(p.n);
    std::vector<int64_t> cuts;  // exact k, small blocks: this segment's cuts
    plan.for_segments(item, [&](int64_t b, int64_t lo, int64_t hi) {
      RankView rv = large_rv;
      if (ctx.ranked && !plan.large) rv = small_block_ranks<T, FM>(ctx, lo, hi, s);
      const float* thr = nullptr;
      const int64_t* cut = nullptr;
      if (ctx.ties) {
        if (large) {
          thr = ctx.thr.data() + b * p.n;
          if (ctx.exact_k) cut = ctx.cut.data() + b * p.n;
        } else {
          // a small block lies whole in this segment
          for (int64_t i = 0; i < p.n; ++i)
            s.thr[i] = ctx.keep_all[i] ? 0.f : kth_largest_small<T, FM>(p, i, lo, hi, ctx.topk(i, hi - lo), s);
          thr = s.thr.data();
          if (ctx.exact_k) {
            cuts.assign((size_t)p.n, lo - 1);
            for (int64_t i = 0; i < p.n; ++i)
              if (!ctx.keep_all[i]) cuts[i] = exact_k_cut<T, FM>(p, i, lo, hi, s.thr[i], ctx.topk(i, hi - lo));
            cut = cuts.data();
          }
        }
      }
      const uint64_t* band = bands ? ctx.band.data() + b * p.n * 2 : nullptr;
      combine_segment<T, O, FM>(ctx, b, lo, hi, thr, cut, rv, band, out, s);
    });
  });
}

}  // namespace
}  // namespace merging_impl

using namespace merging_impl;

Status merge_forward(const MergeProblem& p, void* out, DType out_dtype, int n_threads) {
  Status st = check(p, true, out);
  if (!st.is_ok()) return st;
  if (p.numel == 0) return Status::ok();
  Ctx ctx(p);
  return dispatch_dtype(p.in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    return dispatch_dtype(out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      O* o = static_cast<O*>(out);
      if (p.from_models)
        merge_typed<T, O, true>(ctx, o, n_threads);
      else
        merge_typed<T, O, false>(ctx, o, n_threads);
      return Status::ok();
    });
  });
}

}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
