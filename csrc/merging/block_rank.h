// Ascending ranks of |tau| within a block, ties broken by position: the order a stable sort gives
// (torch.sort(stable=True) in pyops/merging/reference.py `ascending_rank`). The rank-based merge
// methods (breadcrumbs, DELLA) read every element's rank.
//
// Entries are (key << 32) | position with key the fp32 bit pattern of |tau| (sign bit clear, so
// non-negative floats order as their bits; every NaN is folded to one key above +inf, as torch's
// sort holds NaNs equal and last). A stable LSD radix sort on the 31 key bits (digits of 11, 11
// and 9 bits) leaves equal keys in position order; short blocks sort the whole 64-bit entry
// (key, then position: the same order). Either way the ranks are exact, so they do not depend on
// the slicing or the thread count.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/isa.h"
#include "common/thread_pool.h"

namespace pyops {
inline namespace PYOPS_PER_ISA_NS {

constexpr int kRankPasses = 3;
constexpr int kRankShift[kRankPasses] = {32, 43, 54};
constexpr int kRankBins[kRankPasses] = {2048, 2048, 512};
// Below this many entries std::sort beats three radix passes over 2048-bin histograms.
constexpr int64_t kRankSortMin = 2048;

// The rank key of x: |x|'s bits, every NaN the same key.
inline uint64_t rank_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u &= 0x7fffffffu;
  return u > 0x7f800000u ? 0x7fc00000u : u;
}

// Sorts ent[0, len) (entries as above) with tmp as scratch and writes ranks[position] = rank;
// ent and tmp are both overwritten. Each radix pass is split into slices counted and scattered on
// n_threads (one slice for the short blocks a work item owns): slice s's entries of digit q go
// after every slice's smaller digits and after slices < s' q's, so the scatter is stable whatever
// the number of slices. The last pass writes the ranks themselves (an entry's destination is its
// rank), so no sorted copy is read back.
inline void rank_entries(uint64_t* ent, uint64_t* tmp, int64_t len, uint32_t* ranks, int n_threads) {
  if (len < kRankSortMin) {
    std::sort(ent, ent + len);
    for (int64_t r = 0; r < len; ++r) ranks[(uint32_t)ent[r]] = (uint32_t)r;
    return;
  }
  constexpr int64_t kMinSlice = int64_t(1) << 16;
  const int64_t n_slices = std::max<int64_t>(1, std::min<int64_t>(4 * (int64_t)std::max(n_threads, 1),
                                                                 len / kMinSlice));
  const int64_t per = (len + n_slices - 1) / n_slices;
  thread_local std::vector<int64_t> hist_buf;  // n_slices x 2048 counters, kept between calls
  if (hist_buf.size() < (size_t)(n_slices * 2048)) hist_buf.resize((size_t)(n_slices * 2048));
  int64_t* hist = hist_buf.data();
  uint64_t* a = ent;
  uint64_t* b = tmp;
  for (int d = 0; d < kRankPasses; ++d) {
    const int sh = kRankShift[d];
    const int bins = kRankBins[d];
    const uint64_t mask = (uint64_t)bins - 1;
    const uint64_t* src = a;
    parallel_for(n_slices, n_threads, [&](int64_t s) {
      int64_t* h = hist + s * 2048;
      std::fill(h, h + bins, int64_t(0));
      const int64_t lo = s * per, hi = std::min(len, lo + per);
      for (int64_t j = lo; j < hi; ++j) ++h[(src[j] >> sh) & mask];
    });
    const uint64_t first = (a[0] >> sh) & mask;
    int64_t same = 0;
    for (int64_t s = 0; s < n_slices; ++s) same += hist[s * 2048 + first];
    if (same == len) continue;  // one digit value: the pass would copy
    int64_t run = 0;
    for (int q = 0; q < bins; ++q)
      for (int64_t s = 0; s < n_slices; ++s) {
        int64_t& c = hist[s * 2048 + q];
        const int64_t v = c;
        c = run;
        run += v;
      }
    const bool last = d == kRankPasses - 1;
    uint64_t* dst = b;
    parallel_for(n_slices, n_threads, [&](int64_t s) {
      int64_t* h = hist + s * 2048;
      const int64_t lo = s * per, hi = std::min(len, lo + per);
      if (last) {
        for (int64_t j = lo; j < hi; ++j) ranks[(uint32_t)src[j]] = (uint32_t)h[(src[j] >> sh) & mask]++;
      } else {
        for (int64_t j = lo; j < hi; ++j) dst[h[(src[j] >> sh) & mask]++] = src[j];
      }
    });
    if (last) return;
    std::swap(a, b);
  }
  // The last digit was the same for every entry: a already holds the sorted order.
  const uint64_t* sorted = a;
  parallel_for(n_slices, n_threads, [&](int64_t s) {
    const int64_t lo = s * per, hi = std::min(len, lo + per);
    for (int64_t r = lo; r < hi; ++r) ranks[(uint32_t)sorted[r]] = (uint32_t)r;
  });
}

}  // inline namespace PYOPS_PER_ISA_NS
}  // namespace pyops
