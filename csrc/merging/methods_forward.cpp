// CPU kernels for model merging (TIES, DARE, DARE-TIES, breadcrumbs, DELLA, consensus;
// model_stock's Gram matrix).
// Compiled once per ISA (see CMakeLists.txt); PYOPS_ISA names the namespace the build goes into.
//
// Floating-point contraction is off for this file: every a * b + c rounds twice, as the
// reference's separate torch ops do, so the products, sums and the elected sign are the
// reference's bits wherever the summation order is the same (see cpu/merge.h).
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

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/convert.h"
#include "common/isa.h"
#include "common/thread_pool.h"
#include "cpu/block_plan.h"
#include "cpu/block_rank.h"
#include "cpu/merge.h"

#if defined(__AVX2__)
#include <immintrin.h>
#define PYOPS_MERGE_AVX2_PHILOX 1
#else
#define PYOPS_MERGE_AVX2_PHILOX 0
#endif

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace {

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
const bool g_merge_avx512 =
    (__builtin_cpu_init(), __builtin_cpu_supports("avx512f")) && !std::getenv("PYOPS_MERGE_NO_AVX512");

// The same on 512-bit vectors: sixteen groups per step (the Philox words of DARE and DELLA are
// most of their kernels' arithmetic). Identical words: integer operations only.
__attribute__((target("avx512f"))) void philox_words_512(uint64_t g0, int64_t ng, uint32_t c2, uint32_t c3,
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

// Scratch of the long-block ranking: (key, position) entries twice the block, and the ranks of
// every task. Fresh memory costs a page fault per 4 KiB at first touch, about as much as the
// sort itself at these sizes, so one call's buffers are kept for the next (a streaming merge
// repeats a few tensor shapes) unless they exceed kRankKeepBytes.
struct RankBuffers {
  RankArray<uint64_t> ent, tmp;
  RankArray<uint32_t> ranks;

  int64_t bytes() const { return ent.size() * 16 + ranks.size() * 4; }
  void reserve(int64_t entries, int64_t rank_count) {
    if (ent.size() < entries) {
      ent.reset(entries);
      tmp.reset(entries);
    }
    if (ranks.size() < rank_count) ranks.reset(rank_count);
  }
};
constexpr int64_t kRankKeepBytes = int64_t(1) << 30;
std::mutex g_rank_mu;
std::unique_ptr<RankBuffers> g_rank_cache;

std::unique_ptr<RankBuffers> take_rank_buffers() {
  std::lock_guard<std::mutex> lock(g_rank_mu);
  if (g_rank_cache) return std::move(g_rank_cache);
  return std::unique_ptr<RankBuffers>(new RankBuffers());
}

void keep_rank_buffers(std::unique_ptr<RankBuffers> b) {
  if (!b || b->bytes() > kRankKeepBytes) return;
  std::lock_guard<std::mutex> lock(g_rank_mu);
  if (!g_rank_cache || g_rank_cache->bytes() < b->bytes()) g_rank_cache = std::move(b);
}

struct Ctx {
  const MergeProblem* p;
  Plan plan;
  PhiloxKeys keys;
  bool ties, dare, electing;
  bool ranked, della;             // breadcrumbs / della / della_linear: per-element ranks
  std::vector<float> della_lo;    // della: density - epsilon (fp32, as the reference forms it)
  float della_span = 0.f;         // della: 2 * epsilon (fp64 product, then fp32)
  std::unique_ptr<RankBuffers> rank_bufs;  // ranked methods, large blocks (ranks: [n][numel])
  std::vector<uint8_t> keep_all;  // ties, breadcrumbs, della: density >= 1 keeps every entry
  std::vector<float> inv;         // dare: the reference's keep value 1 / density (fp32)
  std::vector<uint32_t> dare_lim; // dare: keep iff (word >> 8) < dare_lim  <=>  u < density
  std::vector<float> thr;         // ties, large blocks: [n_blocks][n] thresholds on |tau|

  Ctx(const MergeProblem& pp) : p(&pp), plan(pp.numel, pp.block_size), keys(pp.seed) {
    ties = p->method == kMergeTies;
    dare = p->method == kMergeDare || p->method == kMergeDareTies;
    electing = p->method == kMergeTies || p->method == kMergeDareTies || p->method == kMergeDella;
    della = p->method == kMergeDella || p->method == kMergeDellaLinear;
    ranked = della || p->method == kMergeBreadcrumbs;
    della_span = (float)(2.0 * p->epsilon);
    const int64_t n = p->n;
    della_lo.assign((size_t)n, 0.f);
    keep_all.assign((size_t)n, 0);
    inv.assign((size_t)n, 1.f);
    dare_lim.assign((size_t)n, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (ties || ranked) keep_all[i] = !(p->density[i] < 1.f);  // ranked: density 1 keeps all, unscaled
      if (della) della_lo[i] = p->density[i] - (float)p->epsilon;
      if (dare) {
        const float rho = p->density[i];
        inv[i] = 1.f / rho;
        // u = m * 2^-24 with m = word >> 8 an integer; u < rho  <=>  m < rho * 2^24  <=>
        // m < ceil(rho * 2^24) (rho * 2^24 is exact in double).
        dare_lim[i] = (uint32_t)std::ceil((double)rho * 16777216.0);
      }
    }
  }

  // k = max(1, floor(density * n)) as the reference computes it (fp32 density, fp64 product).
  int64_t topk(int64_t i, int64_t len) const {
    const int64_t k = (int64_t)std::floor((double)p->density[i] * (double)len);
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

Scratch& thread_scratch(int64_t n) {
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
    const int64_t n_keep = (int64_t)std::floor((double)p.density[i] * (double)blen);
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
const PackTable kPack;
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

// out[lo, hi) of block b; thr: the n TIES thresholds of the block (ties only); rv: the ranks
// (ranked methods only).
template <typename T, typename O, bool FM>
void combine_segment(const Ctx& ctx, int64_t b, int64_t lo, int64_t hi, const float* thr, const RankView& rv,
                     O* out, Scratch& s) {
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
      if (ctx.ties && !ctx.keep_all[i]) {
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
  RankView large_rv;
  if (ctx.ranked && plan.large) large_rv = large_block_ranks<T, FM>(ctx, n_threads);
  parallel_for(plan.n_items, n_threads, [&](int64_t item) {
    Scratch& s = thread_scratch(p.n);
    plan.for_segments(item, [&](int64_t b, int64_t lo, int64_t hi) {
      RankView rv = large_rv;
      if (ctx.ranked && !plan.large) rv = small_block_ranks<T, FM>(ctx, lo, hi, s);
      const float* thr = nullptr;
      if (ctx.ties) {
        if (large) {
          thr = ctx.thr.data() + b * p.n;
        } else {
          for (int64_t i = 0; i < p.n; ++i)
            s.thr[i] = ctx.keep_all[i] ? 0.f : kth_largest_small<T, FM>(p, i, lo, hi, ctx.topk(i, hi - lo), s);
          thr = s.thr.data();
        }
      }
      combine_segment<T, O, FM>(ctx, b, lo, hi, thr, rv, out, s);
    });
  });
}

// ------------------------------------------------------------------------------------------------
// Backward (masks held fixed)
// ------------------------------------------------------------------------------------------------
//
// With the keep multipliers m_i (TIES: 1 kept / 0 trimmed; DARE: 1/density kept / 0 dropped) and
// the election a_i = [sign t_i = s, t_i != 0] (all 1 without an election) treated as constants,
//   merged = sum_i a_i w_i t_i / D,  t_i = m_i tau_i,  D = sum_i a_i w_i (0 -> 1) or 1,
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
void backward_segment(const Ctx& ctx, int64_t b, int64_t lo, int64_t hi, const float* thr, const RankView& rv,
                      const G* grad, T* grad_base, T* const* grad_deltas, double* dots, Scratch& s) {
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
      if (ctx.ties && !ctx.keep_all[i]) {
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
        const float d = norm ? (invd[j] == 0.f ? 1.f : invd[j]) : 1.f;
        merged[j] = norm ? merged[j] / d : merged[j];
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
    plan.for_segments(item, [&](int64_t b, int64_t lo, int64_t hi) {
      RankView rv = large_rv;
      if (ctx.ranked && !plan.large) rv = small_block_ranks<T, FM>(ctx, lo, hi, s);
      const float* thr = nullptr;
      if (ctx.ties) {
        if (large) {
          thr = ctx.thr.data() + b * n;
        } else {
          for (int64_t i = 0; i < n; ++i)
            s.thr[i] = ctx.keep_all[i] ? 0.f : kth_largest_small<T, FM>(p, i, lo, hi, ctx.topk(i, hi - lo), s);
          thr = s.thr.data();
        }
      }
      double* dots = grad_coeffs ? dots_local.data() : nullptr;
      backward_segment<T, G, FM>(ctx, b, lo, hi, thr, rv, grad, grad_base, grad_deltas, dots, s);
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

Status check(const MergeProblem& p, bool need_out, const void* out) {
  const int m = p.method;
  if (m < kMergeTaskArithmetic || m > kMergeConsensus)
    return Status::invalid("method: unknown merge method code " + std::to_string(m) +
                           " (expected 0 task_arithmetic, 1 ties, 2 dare, 3 dare_ties, 4 breadcrumbs, 5 della, "
                           "6 della_linear or 7 consensus)");
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
      if (!(p.density[i] > 0.f && p.density[i] <= 1.f))
        return Status::invalid("density[" + std::to_string(i) + "] must be in (0, 1] (as fp32), got " +
                               std::to_string(p.density[i]));
  }
  if (m == kMergeBreadcrumbs) {
    if (!(p.gamma >= 0.0 && p.gamma < 1.0))
      return Status::invalid("gamma must be in [0, 1), got " + std::to_string(p.gamma));
  }
  if (m == kMergeDella || m == kMergeDellaLinear) {
    // Every keep probability must be positive (it divides); the op layer checks the full range.
    // Density 1 keeps every entry and draws nothing.
    for (int64_t i = 0; i < p.n; ++i)
      if (!(p.epsilon >= 0.0) || (p.density[i] < 1.f && !(p.density[i] - (float)p.epsilon > 0.f)))
        return Status::invalid("epsilon: della needs density - epsilon > 0, got density[" + std::to_string(i) +
                               "]=" + std::to_string(p.density[i]) + ", epsilon=" + std::to_string(p.epsilon));
  }
  if ((m == kMergeBreadcrumbs || m == kMergeDella || m == kMergeDellaLinear) &&
      std::min(p.block_size, p.numel) > (int64_t)0xffffffffLL)
    return Status::invalid("block_size: the rank-based methods rank blocks of at most 2^32 - 1 elements, got " +
                           std::to_string(std::min(p.block_size, p.numel)));
  return Status::ok();
}

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
