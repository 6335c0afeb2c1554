// Per-element ranks of |tau| within each block for breadcrumbs and DELLA, breadcrumbs' band
// limits on long blocks (the forward's alternative to ranks), and the keep multipliers formed
// from them; private to csrc/merging/methods_*.cpp (see methods_internal.h for
// the floating-point pragma the including translation unit starts with).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/thread_pool.h"
#include "merging/block_plan.h"
#include "merging/block_rank.h"
#include "merging/methods_internal.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace merging_impl {

// ------------------------------------------------------------------------------------------------
// Ranks (breadcrumbs, DELLA)
// ------------------------------------------------------------------------------------------------

// ent[j - lo] = (rank key of tau_i[j]) << 32 | (j - origin) for j in [lo, hi): positions count
// from the block's first element, origin.
template <typename T, bool FM>
void fill_rank_entries(const MergeProblem& p, int64_t i, int64_t lo, int64_t hi, int64_t origin, uint64_t* ent) {
  const T* base = static_cast<const T*>(p.base);
  alignas(64) float bbuf[kTile];
  alignas(64) float xbuf[kTile];
  alignas(64) float tbuf[kTile];
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t len = std::min(kTile, hi - t0);
    const float* bb = FM ? as_float_tile(base + t0, bbuf, len) : nullptr;
    const float* tau = load_tau<T, FM>(p, i, t0, len, bb, xbuf, tbuf);
    const uint64_t pos0 = (uint64_t)(t0 - origin);
    for (int64_t j = 0; j < len; ++j) ent[t0 - lo + j] = rank_key(tau[j]) << 32 | (pos0 + (uint64_t)j);
  }
}

// Ranks of every task over the short block [lo, hi) into s.ranks ([n][hi - lo]); tasks that keep
// every entry are not ranked.
template <typename T, bool FM>
RankView small_block_ranks(const Ctx& ctx, int64_t lo, int64_t hi, Scratch& s) {
  const MergeProblem& p = *ctx.p;
  const int64_t len = hi - lo;
  if (s.ent.size() < (size_t)len) {
    s.ent.resize((size_t)len);
    s.ent2.resize((size_t)len);
  }
  if (s.ranks.size() < (size_t)(len * p.n)) s.ranks.resize((size_t)(len * p.n));
  for (int64_t i = 0; i < p.n; ++i) {
    if (ctx.keep_all[i]) continue;
    fill_rank_entries<T, FM>(p, i, lo, hi, lo, s.ent.data());
    rank_entries(s.ent.data(), s.ent2.data(), len, s.ranks.data() + i * len, 1);
  }
  return RankView{s.ranks.data(), len, lo};
}

// Ranks of every task over every long block into ctx.ranks ([n][numel]); each block's sort runs
// on all threads.
template <typename T, bool FM>
RankView large_block_ranks(Ctx& ctx, int n_threads) {
  const MergeProblem& p = *ctx.p;
  const Plan& plan = ctx.plan;
  ctx.rank_bufs = take_rank_buffers();
  ctx.rank_bufs->reserve(plan.block_size, true, p.n * p.numel);
  uint64_t* ent = ctx.rank_bufs->ent.get();
  uint64_t* tmp = ctx.rank_bufs->tmp.get();
  uint32_t* ranks = ctx.rank_bufs->ranks.get();
  for (int64_t b = 0; b < plan.n_blocks; ++b) {
    const int64_t lo = b * plan.block_size, len = ctx.block_len(b);
    for (int64_t i = 0; i < p.n; ++i) {
      if (ctx.keep_all[i]) continue;
      const int64_t n_fill = (len + kChunk - 1) / kChunk;
      parallel_for(n_fill, n_threads, [&](int64_t c) {
        const int64_t a = lo + c * kChunk;
        fill_rank_entries<T, FM>(p, i, a, std::min(lo + len, a + kChunk), lo, ent + (a - lo));
      });
      rank_entries(ent, tmp, len, ranks + i * p.numel + lo, n_threads);
    }
  }
  return RankView{ranks, p.numel, 0};
}

// Breadcrumbs' band of task i in a block of blen elements: ranks in [lo, hi) are kept, with
// n_top = floor(gamma * blen) and n_keep = floor(density_i * blen) in fp64, as mergekit 0.1.5
// (mergekit/sparsify.py, magnitude_outliers). lo may be negative and hi may exceed blen.
struct RankBand {
  int64_t lo, hi;
};
inline RankBand breadcrumbs_band(const MergeProblem& p, int64_t i, int64_t blen) {
  const int64_t n_top = (int64_t)std::floor(p.gamma * (double)blen);
  const int64_t n_keep = (int64_t)std::floor(p.density[i] * (double)blen);  // fp64, as mergekit
  return RankBand{blen - n_keep - n_top, blen - n_top};
}

// ------------------------------------------------------------------------------------------------
// Band limits (breadcrumbs' forward, long blocks)
// ------------------------------------------------------------------------------------------------
//
// Entries are distinct (positions differ), so an element's rank is the number of entries below
// its own, and rank in [lo, hi) <=> E_lo <= entry < E_hi with E_r the entry of rank r (E_0 = 0 and
// E_blen = UINT64_MAX, above every entry since keys < 2^31). Selecting E_lo and E_hi therefore
// keeps exactly the elements the ranks keep, ties and NaNs included, with no ranks array.

constexpr uint64_t kEntryNone = ~uint64_t(0);
// Selection digit: entry bits 49..62 (key bits 17..30: the exponent and 6 mantissa bits).
constexpr int kBandShift = 49;
constexpr int64_t kBandBins = int64_t(1) << 14;

// found[t] = the entry of rank target[t] among task i's entries of the block [origin, origin +
// len), targets strictly increasing in [0, len). ent (len entries) is overwritten. One pass fills
// the entries and counts their top digits (slices on n_threads); the entries whose digit holds a
// target are moved to the front (each slice compacts in place, then the slices' runs are joined
// in order) and std::nth_element picks each target there. The result is exact, so it does not
// depend on the slicing or on the thread count.
template <typename T, bool FM>
void select_entries(const MergeProblem& p, int64_t i, int64_t origin, int64_t len, const int64_t* target, int nt,
                    uint64_t* ent, uint64_t* found, int n_threads) {
  const int64_t n_slices = std::max<int64_t>(1, std::min<int64_t>(4 * (int64_t)std::max(n_threads, 1), len / kChunk));
  const int64_t per = (len + n_slices - 1) / n_slices;
  std::vector<uint32_t> hist((size_t)(n_slices * kBandBins), 0u);  // a slice holds < 2^32 entries
  parallel_for(n_slices, n_threads, [&](int64_t s) {
    uint32_t* h = hist.data() + s * kBandBins;
    const int64_t a = s * per, e = std::min(len, a + per);
    for (int64_t c = a; c < e; c += kChunk) {
      const int64_t ce = std::min(e, c + kChunk);
      fill_rank_entries<T, FM>(p, i, origin + c, origin + ce, origin, ent + c);
      for (int64_t j = c; j < ce; ++j) ++h[ent[j] >> kBandShift];
    }
  });
  // The digit q[t] holding target[t], and the number of entries of smaller digits, below[t].
  int64_t q[2] = {0, 0}, below[2] = {0, 0}, in_q[2] = {0, 0};
  {
    int t = 0;
    int64_t run = 0;
    for (int64_t d = 0; d < kBandBins && t < nt; ++d) {
      int64_t c = 0;
      for (int64_t s = 0; s < n_slices; ++s) c += hist[(size_t)(s * kBandBins + d)];
      while (t < nt && target[t] < run + c) {
        q[t] = d;
        below[t] = run;
        in_q[t] = c;
        ++t;
      }
      run += c;
    }
  }
  const int64_t q0 = q[0], q1 = q[nt - 1];
  std::vector<int64_t> kept((size_t)n_slices, 0);
  parallel_for(n_slices, n_threads, [&](int64_t s) {
    const int64_t a = s * per, e = std::min(len, a + per);
    int64_t w = a;
    for (int64_t j = a; j < e; ++j) {
      const uint64_t x = ent[j];
      const int64_t d = (int64_t)(x >> kBandShift);
      if (d == q0 || d == q1) ent[w++] = x;
    }
    kept[(size_t)s] = w - a;
  });
  int64_t m = 0;  // the digit q0's entries, then q1's (when q1 > q0), in [0, m) in some order
  for (int64_t s = 0; s < n_slices; ++s) {
    if (kept[(size_t)s] && m != s * per) std::memmove(ent + m, ent + s * per, (size_t)kept[(size_t)s] * 8);
    m += kept[(size_t)s];
  }
  // Position of target t among [0, m) in sorted order; the larger target is selected first so the
  // smaller one is the k-th smallest of the entries left below it.
  int64_t end = m;
  for (int t = nt - 1; t >= 0; --t) {
    const int64_t k = target[t] - below[t] + (q[t] != q0 ? in_q[0] : 0);
    std::nth_element(ent, ent + k, ent + end);
    found[t] = ent[k];
    end = k;
  }
}

// ctx.band[b][i] = {E_lo, E_hi} for every long block b and task i: keep iff E_lo <= entry < E_hi
// ({UINT64_MAX, 0}: keep none; {0, UINT64_MAX}: keep all, as for tasks with density >= 1).
template <typename T, bool FM>
void large_block_bands(Ctx& ctx, int n_threads) {
  const MergeProblem& p = *ctx.p;
  const Plan& plan = ctx.plan;
  ctx.band.assign((size_t)(plan.n_blocks * p.n * 2), 0);
  ctx.rank_bufs = take_rank_buffers();
  ctx.rank_bufs->reserve(plan.block_size, false, 0);
  uint64_t* ent = ctx.rank_bufs->ent.get();
  for (int64_t b = 0; b < plan.n_blocks; ++b) {
    const int64_t origin = b * plan.block_size, len = ctx.block_len(b);
    for (int64_t i = 0; i < p.n; ++i) {
      uint64_t* lim = ctx.band.data() + (b * p.n + i) * 2;
      lim[0] = 0;
      lim[1] = kEntryNone;
      if (ctx.keep_all[i]) continue;
      const RankBand r = breadcrumbs_band(p, i, len);
      const int64_t lo = std::max<int64_t>(0, r.lo), hi = std::min(len, r.hi);
      if (lo >= hi) {
        lim[0] = kEntryNone;
        lim[1] = 0;
        continue;
      }
      int64_t target[2];
      uint64_t found[2];
      int nt = 0;
      if (lo > 0) target[nt++] = lo;
      if (hi < len) target[nt++] = hi;
      if (nt == 0) continue;
      select_entries<T, FM>(p, i, origin, len, target, nt, ent, found, n_threads);
      int t = 0;
      if (lo > 0) lim[0] = found[t++];
      if (hi < len) lim[1] = found[t];
    }
  }
}

// Breadcrumbs' keep multipliers of one task over a tile from its band limits: 1 where
// lim[0] <= entry < lim[1], else 0, with entry = rank_key(tau) << 32 | position in the block
// (pos0: the tile's first element's).
inline void band_multipliers(const uint64_t* lim, const float* tau, uint64_t pos0, int64_t len, float* m) {
  const uint64_t elo = lim[0], ehi = lim[1];
  for (int64_t j = 0; j < len; ++j) {
    const uint64_t e = rank_key(tau[j]) << 32 | (pos0 + (uint64_t)j);
    m[j] = (e >= elo && e < ehi) ? 1.f : 0.f;
  }
}

// Keep multipliers of task i over one tile of block b (block length blen) from the ranks rk:
//   breadcrumbs: 1 inside the rank band [n_bottom, blen - n_top), else 0
//   della:       (u < p ? 1 : 0) / p, p = (density - eps) + (2 eps) * frac(rank), u from word
// each formed with the reference's operations and roundings.
inline void rank_multipliers(const Ctx& ctx, int64_t i, int64_t blen, const uint32_t* rk, const uint32_t* word,
                             int64_t len, float* m) {
  const MergeProblem& p = *ctx.p;
  if (ctx.keep_all[i]) {
    for (int64_t j = 0; j < len; ++j) m[j] = 1.f;
    return;
  }
  if (!ctx.della) {
    const RankBand r = breadcrumbs_band(p, i, blen);
    const int64_t lo = r.lo, hi = r.hi;
    for (int64_t j = 0; j < len; ++j) m[j] = ((int64_t)rk[j] >= lo && (int64_t)rk[j] < hi) ? 1.f : 0.f;
    return;
  }
  const float plo = ctx.della_lo[i], span = ctx.della_span;
  if (blen > 1) {
    const float denom = (float)(blen - 1);
    for (int64_t j = 0; j < len; ++j) {
      const float prob = plo + span * ((float)rk[j] / denom);
      const float u = (float)(word[j] >> 8) * 0x1p-24f;
      m[j] = (u < prob ? 1.f : 0.f) / prob;
    }
  } else {
    const float prob = plo + span * 0.5f;
    for (int64_t j = 0; j < len; ++j) m[j] = ((float)(word[j] >> 8) * 0x1p-24f < prob ? 1.f : 0.f) / prob;
  }
}

}  // namespace merging_impl
}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
