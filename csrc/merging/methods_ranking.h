// Per-element ranks of |tau| within each block for breadcrumbs and DELLA, and the keep
// multipliers formed from them; private to csrc/merging/methods_*.cpp (see methods_internal.h for
// the floating-point pragma the including translation unit starts with).
#pragma once
#include <algorithm>
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
  ctx.rank_bufs->reserve(plan.block_size, p.n * p.numel);
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
    const int64_t n_top = (int64_t)std::floor(p.gamma * (double)blen);
    const int64_t n_keep = (int64_t)std::floor(p.density[i] * (double)blen);  // fp64, as mergekit
    const int64_t lo = blen - n_keep - n_top, hi = blen - n_top;
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
