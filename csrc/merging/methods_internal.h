// Shared parts of the merge-method CPU kernels, private to csrc/merging/methods_*.cpp: tile and
// radix constants, Philox words over runs of counters, the per-call context (method flags,
// keep values, rank buffers), per-thread scratch, the tau loads and the argument checks.
//
// Every translation unit that includes this header must begin with the floating-point pragma
// of methods_forward.cpp (contraction off, no trapping math) before any #include: these helpers
// are compiled under it, as the kernels that call them are.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/convert.h"
#include "common/isa.h"
#include "common/thread_pool.h"
#include "merging/block_plan.h"
#include "merging/block_rank.h"
#include "merging/methods.h"

#if defined(__AVX2__)
#include <immintrin.h>
#define PYOPS_MERGE_AVX2_PHILOX 1
#else
#define PYOPS_MERGE_AVX2_PHILOX 0
#endif

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace merging_impl {


// Elements per tile: the fp32 working set of a tile (base, N task rows) stays in L1/L2.
constexpr int64_t kTile = 512;
// Blocks at least this long get their TIES threshold before the combine pass, from a sampled
// bracket and one counting pass over the block (falling back to a two-pass 16-bit radix select);
// shorter blocks (rows of a matrix, small chunks) select with std::nth_element on a per-thread
// copy, fused with the block's combine while the block is in cache.
constexpr int64_t kRadixMin = int64_t(1) << 16;
// The fused small-block selection needs every small block inside one work item.
static_assert(kRadixMin <= kChunk, "blocks shorter than kRadixMin must not be split across work items");
// Radix digits over the fp32 bit pattern of |tau| (monotone for non-negative floats; the sign
// bit is 0, so the high digit has 2^15 values).
constexpr int64_t kHiBins = int64_t(1) << 15;
constexpr int64_t kLoBins = int64_t(1) << 16;
// Upper bound on per-slice histogram sets alive at once in the few-blocks radix path.
constexpr int64_t kMaxSlices = 64;

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}


// ------------------------------------------------------------------------------------------------
// Philox4x32-10 over runs of counters (the same function as common/philox.h, laid out so that
// consecutive groups are independent lanes: GCC vectorises the portable loop, and the AVX2 build
// computes eight groups per step with vpmuludq).
// ------------------------------------------------------------------------------------------------

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

struct PhiloxKeys {
  uint32_t k0[10], k1[10];  // round keys
  explicit PhiloxKeys(uint64_t seed) {
    uint32_t a = (uint32_t)seed, b = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      k0[r] = a;
      k1[r] = b;
      a += kPhiloxW0;
      b += kPhiloxW1;
    }
  }
};

// words[4 q + w] = word w of Philox(counter (g lo, g hi, c2, c3)) for g = g0 + q, q < ng.
inline void philox_portable(uint64_t g0, int64_t ng, uint32_t c2, uint32_t c3, const PhiloxKeys& key,
                            uint32_t* words) {
  for (int64_t q = 0; q < ng; ++q) {
    const uint64_t g = g0 + (uint64_t)q;
    uint32_t x0 = (uint32_t)g, x1 = (uint32_t)(g >> 32), x2 = c2, x3 = c3;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = (uint64_t)kPhiloxM0 * x0;
      const uint64_t p1 = (uint64_t)kPhiloxM1 * x2;
      const uint32_t n0 = (uint32_t)(p1 >> 32) ^ x1 ^ key.k0[r];
      const uint32_t n2 = (uint32_t)(p0 >> 32) ^ x3 ^ key.k1[r];
      x1 = (uint32_t)p1;
      x3 = (uint32_t)p0;
      x0 = n0;
      x2 = n2;
    }
    words[4 * q + 0] = x0;
    words[4 * q + 1] = x1;
    words[4 * q + 2] = x2;
    words[4 * q + 3] = x3;
  }
}

#if PYOPS_MERGE_AVX2_PHILOX
// Eight groups per step, each 32-bit state word held in a 64-bit lane (four groups per vector):
// vpmuludq gives the full 64-bit product of the lane's low halves, so the high word is one shift
// and the low word is the product itself (its upper half is ignored by the next vpmuludq and
// masked off at the end). Two vectors are in flight to hide the multiply latency.
#if defined(__GNUC__) && !defined(__clang__)
#define PYOPS_MERGE_AVX512_PHILOX 1
inline const bool g_merge_avx512 =
    (__builtin_cpu_init(), __builtin_cpu_supports("avx512f")) && !std::getenv("PYOPS_MERGE_NO_AVX512");

// The same on 512-bit vectors: sixteen groups per step (the Philox words of DARE and DELLA are
// most of their kernels' arithmetic). Identical words: integer operations only.
__attribute__((target("avx512f"))) inline void philox_words_512(uint64_t g0, int64_t ng, uint32_t c2, uint32_t c3,
                                                         const PhiloxKeys& key, uint32_t* words) {
  constexpr int V = 2;
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i first = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), second = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  int64_t q = 0;
  for (; q + 8 * V <= ng; q += 8 * V) {
    __m512i x0[V], x1[V], x2[V], x3[V];
    for (int v = 0; v < V; ++v) {
      const __m512i g = _mm512_add_epi64(_mm512_set1_epi64((long long)(g0 + (uint64_t)(q + 8 * v))), lane);
      x0[v] = g;
      x1[v] = _mm512_srli_epi64(g, 32);
      x2[v] = _mm512_set1_epi64(c2);
      x3[v] = _mm512_set1_epi64(c3);
    }
    for (int r = 0; r < 10; ++r) {
      const __m512i k0 = _mm512_set1_epi64(key.k0[r]), k1 = _mm512_set1_epi64(key.k1[r]);
      for (int v = 0; v < V; ++v) {
        const __m512i p0 = _mm512_mul_epu32(x0[v], m0);
        const __m512i p1 = _mm512_mul_epu32(x2[v], m1);
        x0[v] = _mm512_xor_si512(_mm512_srli_epi64(p1, 32), _mm512_xor_si512(x1[v], k0));
        x2[v] = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), _mm512_xor_si512(x3[v], k1));
        x1[v] = p1;
        x3[v] = p0;
      }
    }
    for (int v = 0; v < V; ++v) {
      // (x0, x1) and (x2, x3) of each group as 64-bit lanes, interleaved group by group.
      const __m512i a = _mm512_mask_blend_epi32((__mmask16)0xAAAA, x0[v], _mm512_slli_epi64(x1[v], 32));
      const __m512i b = _mm512_mask_blend_epi32((__mmask16)0xAAAA, x2[v], _mm512_slli_epi64(x3[v], 32));
      uint32_t* dst = words + 4 * (q + 8 * v);
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(a, first, b));
      _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi64(a, second, b));
    }
  }
  if (q < ng) philox_portable(g0 + (uint64_t)q, ng - q, c2, c3, key, words + 4 * q);
}
#endif

inline void philox_words(uint64_t g0, int64_t ng, uint32_t c2, uint32_t c3, const PhiloxKeys& key,
                         uint32_t* words) {
#ifdef PYOPS_MERGE_AVX512_PHILOX
  if (g_merge_avx512) return philox_words_512(g0, ng, c2, c3, key, words);
#endif
  constexpr int V = 2;
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  int64_t q = 0;
  for (; q + 4 * V <= ng; q += 4 * V) {
    __m256i x0[V], x1[V], x2[V], x3[V];
    for (int v = 0; v < V; ++v) {
      const __m256i g = _mm256_add_epi64(_mm256_set1_epi64x((long long)(g0 + (uint64_t)(q + 4 * v))), lane);
      x0[v] = g;                         // low word in the low half
      x1[v] = _mm256_srli_epi64(g, 32);  // high word
      x2[v] = _mm256_set1_epi64x(c2);
      x3[v] = _mm256_set1_epi64x(c3);
    }
    for (int r = 0; r < 10; ++r) {
      const __m256i k0 = _mm256_set1_epi64x(key.k0[r]), k1 = _mm256_set1_epi64x(key.k1[r]);
      for (int v = 0; v < V; ++v) {
        const __m256i p0 = _mm256_mul_epu32(x0[v], m0);
        const __m256i p1 = _mm256_mul_epu32(x2[v], m1);
        x0[v] = _mm256_xor_si256(_mm256_srli_epi64(p1, 32), _mm256_xor_si256(x1[v], k0));
        x2[v] = _mm256_xor_si256(_mm256_srli_epi64(p0, 32), _mm256_xor_si256(x3[v], k1));
        x1[v] = p1;
        x3[v] = p0;
      }
    }
    for (int v = 0; v < V; ++v) {
      // (x0, x1) and (x2, x3) of each group as 64-bit lanes, then two groups per store.
      const __m256i a = _mm256_blend_epi32(x0[v], _mm256_slli_epi64(x1[v], 32), 0xAA);
      const __m256i b = _mm256_blend_epi32(x2[v], _mm256_slli_epi64(x3[v], 32), 0xAA);
      const __m256i lo = _mm256_unpacklo_epi64(a, b), hi = _mm256_unpackhi_epi64(a, b);  // g0|g2, g1|g3
      __m256i* dst = reinterpret_cast<__m256i*>(words + 4 * (q + 4 * v));
      _mm256_storeu_si256(dst, _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(lo, hi, 0x31));
    }
  }
  if (q < ng) philox_portable(g0 + (uint64_t)q, ng - q, c2, c3, key, words + 4 * q);
}
#else
inline void philox_words(uint64_t g0, int64_t ng, uint32_t c2, uint32_t c3, const PhiloxKeys& key,
                         uint32_t* words) {
  philox_portable(g0, ng, c2, c3, key, words);
}
#endif

// ------------------------------------------------------------------------------------------------
// Per-call constants and per-thread scratch
// ------------------------------------------------------------------------------------------------

// Uninitialised memory for the ranking, on transparent huge pages where Linux offers them: the
// radix scatter writes into 2048 buckets spread over the whole buffer and the rank writes go to
// random positions, so with 4 KiB pages nearly every store misses the TLB.
template <typename T>
class RankArray {
 public:
  RankArray() = default;
  RankArray(const RankArray&) = delete;
  RankArray& operator=(const RankArray&) = delete;
  ~RankArray() { release(); }
  T* get() const { return ptr_; }
  int64_t size() const { return n_; }
  void reset(int64_t n) {
    release();
#if defined(__linux__)
    constexpr size_t kHuge = size_t(1) << 21;
    bytes_ = ((size_t)n * sizeof(T) + kHuge - 1) / kHuge * kHuge;
    void* m = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    madvise(m, bytes_, MADV_HUGEPAGE);  // advice only: 4 KiB pages if refused
    ptr_ = static_cast<T*>(m);
#else
    ptr_ = new T[(size_t)n];
#endif
    n_ = n;
  }

 private:
  void release() {
    if (!ptr_) return;
#if defined(__linux__)
    munmap(ptr_, bytes_);
#else
    delete[] ptr_;
#endif
    ptr_ = nullptr;
    n_ = 0;
  }
  T* ptr_ = nullptr;
  int64_t n_ = 0;
  size_t bytes_ = 0;
};

// Scratch of the long-block ranking: (key, position) entries of one block, the radix sort's second
// copy of them and the ranks of every task, or the entries alone (breadcrumbs' forward selects its
// band limits in place: no copy, no ranks). Fresh memory costs a page fault per 4 KiB at first
// touch, about as much as the sort itself at these sizes, so one call's buffers are kept for the
// next (a streaming merge repeats a few tensor shapes) unless they exceed kRankKeepBytes.
struct RankBuffers {
  RankArray<uint64_t> ent, tmp;
  RankArray<uint32_t> ranks;

  int64_t bytes() const { return (ent.size() + tmp.size()) * 8 + ranks.size() * 4; }
  // At least `entries` entries, as many in tmp when with_tmp, and rank_count ranks.
  void reserve(int64_t entries, bool with_tmp, int64_t rank_count) {
    if (ent.size() < entries) ent.reset(entries);
    if (with_tmp && tmp.size() < entries) tmp.reset(entries);
    if (ranks.size() < rank_count) ranks.reset(rank_count);
  }
};
constexpr int64_t kRankKeepBytes = int64_t(1) << 30;
inline std::mutex g_rank_mu;
inline std::unique_ptr<RankBuffers> g_rank_cache;

inline std::unique_ptr<RankBuffers> take_rank_buffers() {
  std::lock_guard<std::mutex> lock(g_rank_mu);
  if (g_rank_cache) return std::move(g_rank_cache);
  return std::unique_ptr<RankBuffers>(new RankBuffers());
}

inline void keep_rank_buffers(std::unique_ptr<RankBuffers> b) {
  if (!b || b->bytes() > kRankKeepBytes) return;
  std::lock_guard<std::mutex> lock(g_rank_mu);
  if (!g_rank_cache || g_rank_cache->bytes() < b->bytes()) g_rank_cache = std::move(b);
}

struct Ctx {
  const MergeProblem* p;
  Plan plan;
  PhiloxKeys keys;
  bool ties, dare, electing;
  bool exact_k;                   // ties keeping exactly k (kMergeTiesExactK)
  bool ranked, della;             // breadcrumbs / della / della_linear: per-element ranks
  std::vector<float> della_lo;    // della: density - epsilon (fp32, as the reference forms it)
  float della_span = 0.f;         // della: 2 * epsilon (fp64 product, then fp32)
  std::unique_ptr<RankBuffers> rank_bufs;  // ranked methods, large blocks (ranks: [n][numel])
  std::vector<uint64_t> band;     // breadcrumbs forward, large blocks: [n_blocks][n][2] entry limits
  std::vector<uint8_t> keep_all;  // ties, breadcrumbs, della: density >= 1 keeps every entry
  std::vector<float> inv;         // dare: the reference's keep value 1 / density (fp32)
  std::vector<uint32_t> dare_lim; // dare: keep iff (word >> 8) < dare_lim  <=>  u < density
  std::vector<float> thr;         // ties, large blocks: [n_blocks][n] thresholds on |tau|
  std::vector<int64_t> cut;       // exact k, large blocks: [n_blocks][n] the last admitted tie's index

  Ctx(const MergeProblem& pp) : p(&pp), plan(pp.numel, pp.block_size), keys(pp.seed) {
    exact_k = p->method == kMergeTiesExactK;
    ties = p->method == kMergeTies || exact_k;
    dare = p->method == kMergeDare || p->method == kMergeDareTies;
    electing = ties || p->method == kMergeDareTies || p->method == kMergeDella || p->method == kMergeBreadcrumbsTies;
    della = p->method == kMergeDella || p->method == kMergeDellaLinear;
    ranked = della || p->method == kMergeBreadcrumbs || p->method == kMergeBreadcrumbsTies;
    della_span = (float)(2.0 * p->epsilon);
    const int64_t n = p->n;
    della_lo.assign((size_t)n, 0.f);
    keep_all.assign((size_t)n, 0);
    inv.assign((size_t)n, 1.f);
    dare_lim.assign((size_t)n, 0);
    for (int64_t i = 0; i < n; ++i) {
      // the fp64 density decides (mergekit's `density >= 1`); ranked: density 1 keeps all, unscaled
      if (ties || ranked) keep_all[i] = !(p->density[i] < 1.0);
      if (della) della_lo[i] = (float)p->density[i] - (float)p->epsilon;
      if (dare) {
        const float rho = (float)p->density[i];
        inv[i] = 1.f / rho;
        // u = m * 2^-24 with m = word >> 8 an integer; u < rho  <=>  m < rho * 2^24  <=>
        // m < ceil(rho * 2^24) (rho * 2^24 is exact in double).
        dare_lim[i] = (uint32_t)std::ceil((double)rho * 16777216.0);
      }
    }
  }

  // k = max(1, floor(density * n)), the fp64 density times n in fp64: mergekit 0.1.5's
  // int(density * n) (mergekit/sparsify.py), and the reference's.
  int64_t topk(int64_t i, int64_t len) const {
    const int64_t k = (int64_t)std::floor(p->density[i] * (double)len);
    return std::max<int64_t>(1, std::min(k, len));
  }

  ~Ctx() { keep_rank_buffers(std::move(rank_bufs)); }
  Ctx(const Ctx&) = delete;
  Ctx& operator=(const Ctx&) = delete;

  int64_t block_len(int64_t b) const {
    return std::min(p->numel, (b + 1) * plan.block_size) - b * plan.block_size;
  }
};

// Where the ranks of a segment live: rank of task i at element e = at[i * task_stride + e - origin].
struct RankView {
  const uint32_t* at = nullptr;
  int64_t task_stride = 0, origin = 0;
  const uint32_t* row(int64_t i, int64_t e) const { return at + i * task_stride + (e - origin); }
};

struct Scratch {
  std::vector<float> rows;     // n * kTile: per-task t (or tau) rows
  std::vector<float> mult;     // n * kTile: backward, the keep multiplier m_i (0, 1 or 1/density)
  std::vector<float> tot, div; // kTile each: the election's sums (more than 8 tasks)
  std::vector<float> w;        // n coefficients of the current block
  std::vector<float> thr;      // n thresholds of the current (small) block
  std::vector<uint32_t> keys;  // small-block selection: |tau| bits of one task's block
  std::vector<uint32_t> cand;  // small-block selection: the keys of the threshold's bucket
  std::vector<uint32_t> hist;  // small-block selection: top-digit histogram
  std::vector<uint64_t> ent, ent2;  // small-block ranking: (key, position) entries and scratch
  std::vector<uint32_t> ranks;      // small-block ranking: [n][block] ranks of the current block

  void reserve(int64_t n) {
    const size_t rn = (size_t)(std::max<int64_t>(n, 1) * kTile);
    if (rows.size() < rn) rows.resize(rn);
    if (mult.size() < rn) mult.resize(rn);
    if (tot.size() < (size_t)kTile) tot.resize((size_t)kTile);
    if (div.size() < (size_t)kTile) div.resize((size_t)kTile);
    if (w.size() < (size_t)std::max<int64_t>(n, 1)) w.resize((size_t)std::max<int64_t>(n, 1));
    if (thr.size() < (size_t)std::max<int64_t>(n, 1)) thr.resize((size_t)std::max<int64_t>(n, 1));
  }
};

inline Scratch& thread_scratch(int64_t n) {
  thread_local Scratch s;
  s.reserve(n);
  return s;
}

// Software prefetch of the tile `ahead` elements past t0 (base when FM, and every task in todo):
// the passes do enough work per element that the hardware prefetcher alone falls behind.
// Lines past the end of the arrays are never touched (the work item's end is no bound: the next
// item's first tiles are worth fetching too).
template <typename T, bool FM>
inline void prefetch_tile(const MergeProblem& p, const int64_t* todo, int64_t nt, int64_t t0) {
  constexpr int64_t kAhead = 2 * kTile;
  if (t0 + kAhead + kTile > p.numel) return;
  constexpr int64_t kLine = 64 / (int64_t)sizeof(T);
  const T* base = static_cast<const T*>(p.base) + t0 + kAhead;
  for (int64_t j = 0; j < kTile; j += kLine) {
    if (FM) __builtin_prefetch(base + j);
    for (int64_t t = 0; t < nt; ++t)
      __builtin_prefetch(static_cast<const T*>(p.deltas[todo ? todo[t] : t]) + t0 + kAhead + j);
  }
}

// tau of task i over [t0, t0 + len): a pointer to fp32 values (delta itself for fp32 deltas).
template <typename T, bool FM>
inline const float* load_tau(const MergeProblem& p, int64_t i, int64_t t0, int64_t len, const float* bb,
                             float* buf, float* dst) {
  const float* x = as_float_tile(static_cast<const T*>(p.deltas[i]) + t0, buf, len);
  if (!FM) return x;
  for (int64_t j = 0; j < len; ++j) dst[j] = x[j] - bb[j];
  return dst;
}

// TIES with exact k: the flat index of the last entry with |tau_i| == thr admitted in the block
// [lo, hi), so that exactly k entries are kept: the `greater` ones (!(|tau| <= thr): larger, or
// NaN, which the sort ranks first) count first, then the ties in increasing flat index.
// lo - 1 when no tie is admitted. Two sequential passes over the block.
template <typename T, bool FM>
int64_t exact_k_cut(const MergeProblem& p, int64_t i, int64_t lo, int64_t hi, float thr, int64_t k) {
  const T* base = static_cast<const T*>(p.base);
  alignas(64) float bbuf[kTile];
  alignas(64) float xbuf[kTile];
  alignas(64) float tmp[kTile];
  int64_t greater = 0;
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t len = std::min(kTile, hi - t0);
    const float* bb = FM ? as_float_tile(base + t0, bbuf, len) : nullptr;
    const float* tau = load_tau<T, FM>(p, i, t0, len, bb, xbuf, tmp);
    for (int64_t j = 0; j < len; ++j) greater += !(std::fabs(tau[j]) <= thr) ? 1 : 0;
  }
  int64_t allowed = k - greater;
  if (allowed <= 0) return lo - 1;
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t len = std::min(kTile, hi - t0);
    const float* bb = FM ? as_float_tile(base + t0, bbuf, len) : nullptr;
    const float* tau = load_tau<T, FM>(p, i, t0, len, bb, xbuf, tmp);
    for (int64_t j = 0; j < len; ++j)
      if (std::fabs(tau[j]) == thr && --allowed == 0) return t0 + j;
  }
  return hi - 1;
}

// Exact k, large blocks: ctx.cut[b][i] for every block and task, after large_thresholds.
template <typename T, bool FM>
void large_exact_k_cuts(Ctx& ctx, int n_threads) {
  const MergeProblem& p = *ctx.p;
  const int64_t n = p.n, nb = ctx.plan.n_blocks;
  ctx.cut.assign((size_t)(nb * n), -1);
  parallel_for(nb * n, n_threads, [&](int64_t q) {
    const int64_t b = q / n, i = q % n;
    if (ctx.keep_all[i]) return;
    const int64_t lo = b * ctx.plan.block_size, len = ctx.block_len(b);
    ctx.cut[(size_t)q] = exact_k_cut<T, FM>(p, i, lo, lo + len, ctx.thr[(size_t)q], ctx.topk(i, len));
  });
}


// The checks every entry point makes, in this order (the Python layer has checked the same).
inline Status check(const MergeProblem& p, bool need_out, const void* out) {
  const int m = p.method;
  if (m < kMergeTaskArithmetic || m > kMergeBreadcrumbsTies)
    return Status::invalid("method: unknown merge method code " + std::to_string(m) +
                           " (expected 0 task_arithmetic, 1 ties, 2 dare, 3 dare_ties, 4 breadcrumbs, 5 della, "
                           "6 della_linear, 7 consensus, 8 ties with exact k or 9 breadcrumbs_ties)");
  if (p.numel < 0) return Status::invalid("numel must be >= 0, got " + std::to_string(p.numel));
  if (p.block_size <= 0) return Status::invalid("block_size must be > 0, got " + std::to_string(p.block_size));
  if (p.n < 0) return Status::invalid("number of deltas must be >= 0, got " + std::to_string(p.n));
  if (p.coeff_stride_n < 0 || p.coeff_stride_block < 0)
    return Status::invalid("coefficient strides must be >= 0");
  if (m == kMergeConsensus) {
    if (p.k < 1 || p.k > p.n)
      return Status::invalid("k must be in [1, " + std::to_string(p.n) + "] (tasks that must agree), got " +
                             std::to_string(p.k));
    if (!(p.tall_lambda >= 0.f)) return Status::invalid("tall_lambda must be >= 0");
  }
  if (p.numel == 0) return Status::ok();
  if (p.base == nullptr) return Status::invalid("base is a null pointer");
  if (need_out && out == nullptr) return Status::invalid("out is a null pointer");
  if (p.n > 0 && (p.deltas == nullptr || p.coeffs == nullptr))
    return Status::invalid("deltas or coeffs is a null pointer");
  for (int64_t i = 0; i < p.n; ++i)
    if (p.deltas[i] == nullptr) return Status::invalid("delta " + std::to_string(i) + " is a null pointer");
  const bool uses_density = m != kMergeTaskArithmetic && m != kMergeConsensus;
  if (uses_density && p.n > 0) {
    if (p.density == nullptr) return Status::invalid("density is a null pointer");
    for (int64_t i = 0; i < p.n; ++i)
      if (!(p.density[i] > 0.0 && p.density[i] <= 1.0 && (float)p.density[i] > 0.f))
        return Status::invalid("density[" + std::to_string(i) + "] must be in (0, 1] (also as fp32), got " +
                               std::to_string(p.density[i]));
  }
  if (m == kMergeBreadcrumbs || m == kMergeBreadcrumbsTies) {
    if (!(p.gamma >= 0.0 && p.gamma < 1.0))
      return Status::invalid("gamma must be in [0, 1), got " + std::to_string(p.gamma));
  }
  if (m == kMergeDella || m == kMergeDellaLinear) {
    // Every keep probability must be positive (it divides); the op layer checks the full range.
    // Density 1 keeps every entry and draws nothing.
    for (int64_t i = 0; i < p.n; ++i)
      if (!(p.epsilon >= 0.0) || (p.density[i] < 1.0 && !((float)p.density[i] - (float)p.epsilon > 0.f)))
        return Status::invalid("epsilon: della needs density - epsilon > 0, got density[" + std::to_string(i) +
                               "]=" + std::to_string(p.density[i]) + ", epsilon=" + std::to_string(p.epsilon));
  }
  if ((m == kMergeBreadcrumbs || m == kMergeBreadcrumbsTies || m == kMergeDella || m == kMergeDellaLinear) &&
      std::min(p.block_size, p.numel) > (int64_t)0xffffffffLL)
    return Status::invalid("block_size: the rank-based methods rank blocks of at most 2^32 - 1 elements, got " +
                           std::to_string(std::min(p.block_size, p.numel)));
  return Status::ok();
}

}  // namespace merging_impl
}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
