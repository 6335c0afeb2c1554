// The exact per-block TIES thresholds (the k-th largest |tau_i|): a sampled bracket and one
// counting pass for long blocks (a 16-bit radix select where the bracket misses), a top-digit
// histogram and std::nth_element for short ones; private to csrc/merging/methods_*.cpp (see
// methods_internal.h for the floating-point pragma the including translation unit starts with).
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
// TIES selection
// ------------------------------------------------------------------------------------------------

// k-th largest |tau_i| over [lo, hi) (small blocks), on a per-thread copy of the keys: one
// histogram pass over the top 11 bits (exponent and 3 mantissa bits) finds the bucket holding the
// k-th largest key, and std::nth_element finishes among that bucket's keys. Exact whatever the
// data (a bucket full of equal values only makes the last step longer).
// (Defined after the candidate helpers it shares with the large-block path.)
constexpr int64_t kSmallBins = int64_t(1) << 11;

// --- Large blocks: a sampled bracket, then one counting pass ----------------------------------
//
// The k-th largest key of a block lies, with overwhelming probability, between two order
// statistics of a deterministic sample of the block. One pass then counts the keys above the
// bracket and collects the keys inside it; the threshold is an exact selection among those
// candidates. If the bracket missed (or held too many candidates, e.g. masses of equal values), the
// task falls back to the two-pass 16-bit radix select below. Both routes give the exact k-th
// largest key, so the result never depends on the sample, the slicing or the thread count.

struct Bracket {
  int32_t lo = 0, hi = 0x7fffffff;  // candidates: lo <= key <= hi; counted above: key > hi
  int64_t cap = 0;                  // most candidates collected before giving up
};

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser: sample jitter within each stride
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

template <typename T, bool FM>
Bracket sample_bracket(const MergeProblem& p, int64_t i, int64_t lo, int64_t hi, int64_t k,
                       std::vector<uint32_t>& sample) {
  const int64_t n = hi - lo;
  // Sample size: n / 256 keys, at least 4096 and at most 2^20, in runs of kRun.
  constexpr int64_t kRun = 16;
  const int64_t S = std::min<int64_t>(n, std::max<int64_t>(4096, std::min<int64_t>(n / 256, int64_t(1) << 20))) / kRun * kRun;
  // Runs of kRun consecutive elements (one cache line of fp32) at jittered, evenly spaced places.
  const int64_t runs = S / kRun, stride = n / runs;
  sample.resize((size_t)S);
  const T* base = static_cast<const T*>(p.base);
  const T* d = static_cast<const T*>(p.deltas[i]);
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t room = stride - kRun;  // >= 0: n >= S
    const int64_t j0 = lo + r * stride + (room > 0 ? (int64_t)(mix64((uint64_t)r) % (uint64_t)(room + 1)) : 0);
    for (int64_t e = 0; e < kRun; ++e) {
      const int64_t j = j0 + e;
      const float tau = FM ? to_float(d[j]) - to_float(base[j]) : to_float(d[j]);
      sample[r * kRun + e] = float_bits(tau) & 0x7fffffffu;
    }
  }
  // The threshold's expected rank in the sample (from the top), and a margin of 5 standard
  // deviations of a binomial rank plus a constant.
  const double q = (double)k / (double)n;
  const double r = q * (double)S;
  const double m = 5.0 * std::sqrt((double)S * q * (1.0 - q)) + 16.0;
  const int64_t r_hi = (int64_t)std::floor(r - m), r_lo = (int64_t)std::ceil(r + m);
  Bracket br;
  uint32_t* sv = sample.data();
  if (r_hi >= 1) {  // the r_hi-th largest sample key
    std::nth_element(sv, sv + (S - r_hi), sv + S);
    br.hi = (int32_t)sv[S - r_hi];
  }
  if (r_lo <= S) {
    std::nth_element(sv, sv + (S - r_lo), sv + S);
    br.lo = (int32_t)sv[S - r_lo];
  }
  const double expected = (double)n * (double)(std::min(r_lo, S) - std::max<int64_t>(r_hi, 0) + 1) / (double)S;
  br.cap = std::min<int64_t>(n, (int64_t)(4.0 * expected) + 65536);
  return br;
}

// Candidate keys of one (slice, task): an uninitialised buffer with room for cap + kTile + 8 keys,
// so that a whole tile can be appended without a bounds check.
struct Candidates {
  std::unique_ptr<uint32_t[]> data;
  int64_t size = 0, cap = 0;
  bool over = false;
  void reset(int64_t cap_) {
    if (data == nullptr || cap_ > cap) data.reset(new uint32_t[(size_t)(cap_ + kTile + 8)]);
    cap = std::max(cap, cap_);
    size = 0;
    over = false;
  }
};

#if defined(__AVX2__)
// Left-packing permutations: entry m lists the set lanes of the 8-bit mask m, in order.
struct PackTable {
  alignas(32) uint32_t idx[256][8];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int l = 0; l < 8; ++l)
        if (m & (1 << l)) idx[m][c++] = (uint32_t)l;
      for (; c < 8; ++c) idx[m][c] = 0;
    }
  }
};
inline const PackTable kPack;
#endif

// Appends the keys of kbuf[0..len) in [lo, hi] to dst (room for len more); returns how many.
inline int64_t collect(const int32_t* kbuf, int64_t len, int32_t lo, int32_t hi, uint32_t* dst) {
  int64_t c = 0, j = 0;
#if defined(__AVX2__)
  const __m256i vlo = _mm256_set1_epi32(lo - 1), vhi = _mm256_set1_epi32(hi);
  for (; j + 8 <= len; j += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kbuf + j));
    const __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(k, vhi), _mm256_cmpgt_epi32(k, vlo));
    const int m = _mm256_movemask_ps(_mm256_castsi256_ps(in));
    if (m == 0) continue;
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.idx[m]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), _mm256_permutevar8x32_epi32(k, perm));
    c += __builtin_popcount((unsigned)m);
  }
#endif
  for (; j < len; ++j) {  // branchless: always store, advance on a hit
    dst[c] = (uint32_t)kbuf[j];
    c += (kbuf[j] >= lo) & (kbuf[j] <= hi);
  }
  return c;
}

// One pass over [lo, hi) for tasks todo[0..nt): above[t] += #(key > hi), keys in [lo, hi] appended
// to cand[t] until it holds more than its cap (then cand[t].over is set and collection stops).
template <typename T, bool FM>
void bracket_pass(const MergeProblem& p, const int64_t* todo, int64_t nt, int64_t lo, int64_t hi,
                  const Bracket* br, int64_t* above, Candidates* cand) {
  const T* base = static_cast<const T*>(p.base);
  alignas(64) float bbuf[kTile];
  alignas(64) float xbuf[kTile];
  alignas(64) float tbuf[kTile];
  alignas(64) int32_t kbuf[kTile];
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t len = std::min(kTile, hi - t0);
    const float* bb = FM ? as_float_tile(base + t0, bbuf, len) : nullptr;
    prefetch_tile<T, FM>(p, todo, nt, t0);
    for (int64_t t = 0; t < nt; ++t) {
      const float* tau = load_tau<T, FM>(p, todo[t], t0, len, bb, xbuf, tbuf);
      const int32_t blo = br[t].lo, bhi = br[t].hi;
      Candidates& c = cand[t];
      int64_t j = 0;
      int32_t n_above = 0;
#if defined(__AVX2__)
      // Keys, the count above the bracket and the candidates in one sweep over the tile.
      if (!c.over) {
        const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
        const __m256i vlo = _mm256_set1_epi32(blo - 1), vhi = _mm256_set1_epi32(bhi);
        __m256i cnt = _mm256_setzero_si256();
        uint32_t* dst = c.data.get() + c.size;
        int64_t m_total = 0;
        for (; j + 8 <= len; j += 8) {
          const __m256i k = _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(tau + j)), abs_mask);
          const __m256i gt = _mm256_cmpgt_epi32(k, vhi);
          cnt = _mm256_sub_epi32(cnt, gt);
          const int m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(gt, _mm256_cmpgt_epi32(k, vlo))));
          if (m == 0) continue;
          const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.idx[m]));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + m_total), _mm256_permutevar8x32_epi32(k, perm));
          m_total += __builtin_popcount((unsigned)m);
        }
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), cnt);
        for (int l = 0; l < 8; ++l) n_above += lanes[l];
        c.size += m_total;
      }
#endif
      const int64_t j0 = j;
      for (; j < len; ++j) {
        kbuf[j] = (int32_t)(float_bits(tau[j]) & 0x7fffffffu);
        n_above += kbuf[j] > bhi ? 1 : 0;
      }
      above[t] += n_above;
      if (c.over) continue;
      c.size += collect(kbuf + j0, len - j0, blo, bhi, c.data.get() + c.size);
      if (c.size > c.cap) c.over = true;
    }
  }
}

// The need-th largest of c[0..size) (1 <= need <= size), reordering c.
inline uint32_t select_desc(uint32_t* c, int64_t size, int64_t need) {
  std::nth_element(c, c + (size - need), c + size);
  return c[size - need];
}

template <typename T, bool FM>
float kth_largest_small(const MergeProblem& p, int64_t i, int64_t lo, int64_t hi, int64_t k, Scratch& s) {
  const int64_t n = hi - lo;
  if ((int64_t)s.keys.size() < n + kTile + 8) s.keys.resize((size_t)(n + kTile + 8));
  if ((int64_t)s.cand.size() < n + kTile + 8) s.cand.resize((size_t)(n + kTile + 8));
  if ((int64_t)s.hist.size() < kSmallBins) s.hist.resize((size_t)kSmallBins);
  int32_t* key = reinterpret_cast<int32_t*>(s.keys.data());
  const T* base = static_cast<const T*>(p.base);
  alignas(64) float bbuf[kTile];
  alignas(64) float xbuf[kTile];
  alignas(64) float tbuf[kTile];
  int32_t kmax = 0;
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t len = std::min(kTile, hi - t0);
    const float* bb = FM ? as_float_tile(base + t0, bbuf, len) : nullptr;
    const float* tau = load_tau<T, FM>(p, i, t0, len, bb, xbuf, tbuf);
    int32_t* kk = key + (t0 - lo);
    for (int64_t j = 0; j < len; ++j) {
      kk[j] = (int32_t)(float_bits(tau[j]) & 0x7fffffffu);
      kmax = std::max(kmax, kk[j]);
    }
  }
  if (k == 1) return bits_float((uint32_t)kmax);
  uint32_t* c = s.cand.data();
  if (n <= 256) {
    std::memcpy(c, key, (size_t)n * sizeof(uint32_t));
    return bits_float(select_desc(c, n, k));
  }
  uint32_t* hist = s.hist.data();
  const int64_t top = (int64_t)(kmax >> 20);
  std::fill(hist, hist + top + 1, 0u);
  for (int64_t j = 0; j < n; ++j) ++hist[key[j] >> 20];
  int64_t need = k;
  int64_t h = top;
  for (; h > 0; --h) {
    if ((int64_t)hist[h] >= need) break;
    need -= hist[h];
  }
  const int32_t blo = (int32_t)(h << 20), bhi = (int32_t)((h << 20) | 0xfffff);
  int64_t size = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kTile)
    size += collect(key + t0, std::min(kTile, n - t0), blo, bhi, c + size);
  return bits_float(select_desc(c, size, need));
}

// --- Radix fallback: two 16-bit digit passes ---------------------------------------------------

// Digit search from the top: the bucket holding the need-th largest key; need becomes the rank
// inside that bucket.
inline int64_t find_bucket(const uint32_t* hist, int64_t bins, int64_t& need) {
  for (int64_t h = bins - 1; h > 0; --h) {
    if ((int64_t)hist[h] >= need) return h;
    need -= hist[h];
  }
  return 0;
}

// Counts keys of tasks `todo` over [lo, hi). Pass 1 (digit_hi == nullptr): high digit into
// hist[t * kLoBins + key >> 16]. Pass 2: low digit of keys whose high digit is digit_hi[t].
template <typename T, bool FM>
void radix_count(const MergeProblem& p, const int64_t* todo, int64_t nt, int64_t lo, int64_t hi,
                 const uint32_t* digit_hi, uint32_t* hist) {
  const T* base = static_cast<const T*>(p.base);
  alignas(64) float bbuf[kTile];
  alignas(64) float xbuf[kTile];
  alignas(64) float tbuf[kTile];
  alignas(64) uint32_t kbuf[kTile];
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t len = std::min(kTile, hi - t0);
    const float* bb = FM ? as_float_tile(base + t0, bbuf, len) : nullptr;
    for (int64_t t = 0; t < nt; ++t) {
      const float* tau = load_tau<T, FM>(p, todo[t], t0, len, bb, xbuf, tbuf);
      for (int64_t j = 0; j < len; ++j) kbuf[j] = float_bits(tau[j]) & 0x7fffffffu;
      uint32_t* h = hist + t * kLoBins;
      if (digit_hi == nullptr) {
        for (int64_t j = 0; j < len; ++j) ++h[kbuf[j] >> 16];
      } else {
        const uint32_t d = digit_hi[t];
        for (int64_t j = 0; j < len; ++j)
          if ((kbuf[j] >> 16) == d) ++h[kbuf[j] & 0xffffu];
      }
    }
  }
}

// Radix select of one task over one block on the calling thread; hist holds kLoBins counters.
template <typename T, bool FM>
uint32_t radix_select_serial(const MergeProblem& p, int64_t i, int64_t lo, int64_t hi, int64_t k,
                             uint32_t* hist) {
  int64_t need = k;
  std::fill(hist, hist + kHiBins, 0u);
  radix_count<T, FM>(p, &i, 1, lo, hi, nullptr, hist);
  const uint32_t dh = (uint32_t)find_bucket(hist, kHiBins, need);
  std::fill(hist, hist + kLoBins, 0u);
  radix_count<T, FM>(p, &i, 1, lo, hi, &dh, hist);
  const uint32_t dl = (uint32_t)find_bucket(hist, kLoBins, need);
  return (dh << 16) | dl;
}

// Radix select of tasks todo[0..nt) over one block, the block split into slices counted in
// parallel (counts are integers: the sums, and so the result, do not depend on the slicing).
template <typename T, bool FM>
void radix_select_sliced(const MergeProblem& p, const int64_t* todo, int64_t nt, int64_t lo, int64_t hi,
                         const int64_t* ks, uint32_t* result, int n_threads) {
  const int64_t len = hi - lo;
  const int64_t n_slices = std::max<int64_t>(
      1, std::min<int64_t>({(int64_t)std::max(1, n_threads), (len + kChunk - 1) / kChunk, kMaxSlices}));
  const int64_t per = ((len + n_slices - 1) / n_slices + kTile - 1) / kTile * kTile;
  std::vector<uint32_t> hist((size_t)(n_slices * nt * kLoBins));
  std::vector<uint32_t> total((size_t)kLoBins);
  std::vector<uint32_t> dh((size_t)nt);
  std::vector<int64_t> need(ks, ks + nt);
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t bins = pass == 0 ? kHiBins : kLoBins;
    parallel_for(n_slices, n_threads, [&](int64_t s) {
      uint32_t* h = hist.data() + s * nt * kLoBins;
      for (int64_t t = 0; t < nt; ++t) std::fill(h + t * kLoBins, h + t * kLoBins + bins, 0u);
      const int64_t s_lo = std::min(hi, lo + s * per), s_hi = std::min(hi, s_lo + per);
      if (s_lo < s_hi) radix_count<T, FM>(p, todo, nt, s_lo, s_hi, pass == 0 ? nullptr : dh.data(), h);
    });
    for (int64_t t = 0; t < nt; ++t) {
      std::fill(total.begin(), total.begin() + bins, 0u);
      for (int64_t s = 0; s < n_slices; ++s) {
        const uint32_t* h = hist.data() + (s * nt + t) * kLoBins;
        for (int64_t d = 0; d < bins; ++d) total[d] += h[d];
      }
      if (pass == 0) {
        dh[t] = (uint32_t)find_bucket(total.data(), kHiBins, need[t]);
      } else {
        result[t] = (dh[t] << 16) | (uint32_t)find_bucket(total.data(), kLoBins, need[t]);
      }
    }
  }
}

// Thresholds of every large block into ctx.thr ([n_blocks][n]).
template <typename T, bool FM>
void large_thresholds(Ctx& ctx, int n_threads) {
  const MergeProblem& p = *ctx.p;
  const Plan& plan = ctx.plan;
  const int64_t n = p.n;
  ctx.thr.assign((size_t)(plan.n_blocks * n), 0.f);
  std::vector<int64_t> todo;
  for (int64_t i = 0; i < n; ++i)
    if (!ctx.keep_all[i]) todo.push_back(i);
  if (todo.empty()) return;
  const int64_t nt = (int64_t)todo.size();
  auto block_range = [&](int64_t b, int64_t& lo, int64_t& hi) {
    lo = b * plan.block_size;
    hi = std::min(lo + plan.block_size, plan.numel);
  };

  if (plan.n_blocks >= 4 * (int64_t)std::max(1, n_threads)) {
    // Many blocks: one block per work item, one task at a time, on one thread.
    parallel_for(plan.n_blocks, n_threads, [&](int64_t b) {
      thread_local std::vector<uint32_t> sample, hist;
      thread_local Candidates cand;
      int64_t lo, hi;
      block_range(b, lo, hi);
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t i = todo[t], k = ctx.topk(i, hi - lo);
        const Bracket br = sample_bracket<T, FM>(p, i, lo, hi, k, sample);
        int64_t above = 0;
        cand.reset(br.cap);
        bracket_pass<T, FM>(p, &todo[t], 1, lo, hi, &br, &above, &cand);
        uint32_t key;
        if (!cand.over && above < k && k <= above + cand.size) {
          key = select_desc(cand.data.get(), cand.size, k - above);
        } else {
          if ((int64_t)hist.size() < kLoBins) hist.resize((size_t)kLoBins);
          key = radix_select_serial<T, FM>(p, i, lo, hi, k, hist.data());
        }
        ctx.thr[b * n + i] = bits_float(key);
      }
    });
    return;
  }

  // Few blocks: each block's pass split into slices run in parallel.
  std::vector<Bracket> br((size_t)nt);
  std::vector<int64_t> ks((size_t)nt), need((size_t)nt);
  std::vector<Candidates> cand;
  for (int64_t b = 0; b < plan.n_blocks; ++b) {
    int64_t lo, hi;
    block_range(b, lo, hi);
    const int64_t len = hi - lo;
    parallel_for(nt, n_threads, [&](int64_t t) {  // the tasks' samples, in parallel
      thread_local std::vector<uint32_t> sample;
      ks[t] = ctx.topk(todo[t], len);
      br[t] = sample_bracket<T, FM>(p, todo[t], lo, hi, ks[t], sample);
    });
    const int64_t n_slices = std::max<int64_t>(
        1, std::min<int64_t>({(int64_t)std::max(1, n_threads), (len + kChunk - 1) / kChunk, kMaxSlices}));
    const int64_t per = ((len + n_slices - 1) / n_slices + kTile - 1) / kTile * kTile;
    std::vector<int64_t> above((size_t)(n_slices * nt), 0);
    cand.resize((size_t)(n_slices * nt));
    for (int64_t s = 0; s < n_slices; ++s)
      for (int64_t t = 0; t < nt; ++t) cand[s * nt + t].reset(br[t].cap);
    parallel_for(n_slices, n_threads, [&](int64_t s) {
      const int64_t s_lo = std::min(hi, lo + s * per), s_hi = std::min(hi, s_lo + per);
      if (s_lo < s_hi)
        bracket_pass<T, FM>(p, todo.data(), nt, s_lo, s_hi, br.data(), above.data() + s * nt, cand.data() + s * nt);
    });
    std::vector<int64_t> redo, redo_k, found;
    for (int64_t t = 0; t < nt; ++t) {
      int64_t a = 0, c = 0;
      bool overflow = false;
      for (int64_t s = 0; s < n_slices; ++s) {
        a += above[s * nt + t];
        c += cand[s * nt + t].size;
        overflow = overflow || cand[s * nt + t].over;
      }
      if (overflow || c > br[t].cap || !(a < ks[t] && ks[t] <= a + c)) {
        redo.push_back(todo[t]);
        redo_k.push_back(ks[t]);
        continue;
      }
      // Gather the slices' candidates into slice 0's buffer (its room is cap + kTile >= c).
      Candidates& dst = cand[t];
      for (int64_t s = 1; s < n_slices; ++s) {
        const Candidates& src = cand[s * nt + t];
        std::memcpy(dst.data.get() + dst.size, src.data.get(), (size_t)src.size * sizeof(uint32_t));
        dst.size += src.size;
      }
      need[t] = ks[t] - a;
      found.push_back(t);
    }
    parallel_for((int64_t)found.size(), n_threads, [&](int64_t q) {  // the tasks' selections, in parallel
      const int64_t t = found[q];
      ctx.thr[b * n + todo[t]] = bits_float(select_desc(cand[t].data.get(), cand[t].size, need[t]));
    });
    if (!redo.empty()) {
      std::vector<uint32_t> keys(redo.size());
      radix_select_sliced<T, FM>(p, redo.data(), (int64_t)redo.size(), lo, hi, redo_k.data(), keys.data(),
                                 n_threads);
      for (size_t r = 0; r < redo.size(); ++r) ctx.thr[b * n + redo[r]] = bits_float(keys[r]);
    }
  }
}

}  // namespace merging_impl
}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
