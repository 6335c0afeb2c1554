// CUDA kernels of `pyops.merge` for ties, dare / dare_linear, dare_ties, breadcrumbs, della /
// della_linear and consensus (forward),
// written against cuda/simt.h so that the same source runs on a GPU (cuda/merge.cu) and, for
// tests on machines without one, on host threads (tests/merge/test_merge_cuda_emulated.py).
//
// Semantics: csrc/cpu/merge.h, operation for operation; the C++ CPU kernels are the bit-level
// reference these kernels are tested against (every product and sum rounded separately, tasks
// summed i = 0..N-1 from 0, the exact per-block TIES threshold).
//
// Work layout
// -----------
// * TIES threshold of (block b, task i): the k-th largest key |tau_i| (fp32 bits & 0x7fffffff,
//   monotone for non-negative floats), k = max(1, floor(density_i * len_b)), by a radix select over
//   three digits (bits 30..20, 19..9, 8..0). Each digit pass histograms the keys that match the
//   prefix chosen so far; the bucket holding the need-th largest key extends the prefix. After the
//   third pass the prefix is the threshold itself: exact, whatever the data (ties, zeros, NaN
//   keys), and independent of the grid, since histogram counts are integers.
//   - many blocks (n_blocks >= kCtaBlocks): one CTA owns a block and runs the three passes over
//     it with a shared-memory histogram (select_blocks);
//   - few blocks (a whole tensor, a few large chunks): each pass spreads the block over many CTAs
//     (select_count: work items of kItem elements, shared histograms flushed into a global
//     [n_blocks, n, kBins] histogram with integer atomics), then select_pick finds the bucket per
//     (block, task) and clears the histogram for the next pass.
// * The combine (every method): one thread per group of 4 consecutive elements, which is also one
//   Philox4x32-10 call per task for DARE (counter (g lo, g hi, i, name_hash), g = j >> 2, word
//   j & 3, key (seed lo, seed hi): common/philox.h). The first kRegTasks tasks' trimmed values stay
//   in registers for the election; further tasks are recomputed (the same operations, so the same
//   bits).
// * Breadcrumbs / DELLA take each element's ascending rank of |tau_i| in its block as an input
//   ([n, numel] int32, from a stable device sort: pyops/ops/merge_ranks.py) and form the keep
//   multiplier from it in the combine, with the CPU kernels' operations (rank_multipliers).
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/philox.h"
#include "common/status.h"
#include "cuda/simt.h"

#if defined(PYOPS_SIMT_EMULATE)
#define PYOPS_UNROLL _Pragma("GCC unroll 8")
#else
#define PYOPS_UNROLL _Pragma("unroll")
#endif

namespace pyops {
namespace cuda_merge {

// The three sizes below can be overridden at compile time; only the emulated tests do, so that
// small tensors reach every path (several work items per block, one CTA per block) quickly.
#ifndef PYOPS_MERGE_CTA_THREADS
#define PYOPS_MERGE_CTA_THREADS 256
#endif
#ifndef PYOPS_MERGE_ITEM
#define PYOPS_MERGE_ITEM 16384
#endif
#ifndef PYOPS_MERGE_CTA_BLOCKS
#define PYOPS_MERGE_CTA_BLOCKS 256
#endif
constexpr int kThreads = PYOPS_MERGE_CTA_THREADS;    // threads per CTA, every kernel
constexpr int kRegTasks = 8;           // tasks whose trimmed values the combine keeps in registers
constexpr int64_t kItem = PYOPS_MERGE_ITEM;          // elements per work item of the few-blocks selection
constexpr int64_t kCtaBlocks = PYOPS_MERGE_CTA_BLOCKS;  // at least this many blocks: one CTA selects each
constexpr int kPasses = 3;
constexpr int kBins = 2048;            // the widest digit (11 bits)
static_assert(kThreads >= 32 && kThreads <= 512 && (kThreads & (kThreads - 1)) == 0,
              "find_bucket_cta splits 512 and 2048 bins evenly over the CTA's threads");
constexpr int64_t kMaxSelectLen = int64_t(1) << 32;  // histogram counts are uint32

// Method codes (csrc/cpu/merge.h) these kernels implement.
constexpr int kTies = 1, kDare = 2, kDareTies = 3, kBreadcrumbs = 4, kDella = 5, kDellaLinear = 6,
              kConsensus = 7;

inline bool implements(int method) { return method >= kTies && method <= kConsensus; }
PYOPS_DEVICE bool is_ranked(int method) { return method >= kBreadcrumbs && method <= kDellaLinear; }
PYOPS_DEVICE bool is_electing(int method) { return method == kTies || method == kDareTies || method == kDella; }

// Digit p of a key: (key >> shift) & mask.
PYOPS_DEVICE int pass_shift(int p) { return p == 0 ? 20 : (p == 1 ? 9 : 0); }
PYOPS_DEVICE uint32_t pass_mask(int p) { return p == 2 ? 0x1ffu : 0x7ffu; }

// Radix-select progress of one (block, task) between passes of the few-blocks path.
struct SelState {
  uint32_t prefix, pmask;  // digits chosen so far, and the bits they cover
  int64_t need;            // rank of the threshold among the keys matching prefix (from the top)
};

struct Args {
  void* out;
  const void* base;
  const void* const* deltas;  // device array of n device addresses
  int64_t n;
  const float* coeffs;        // c[i, b] = coeffs[i * s_n + b * s_b]
  int64_t s_n, s_b;
  const float* density;       // [n], device
  int64_t numel, block_size, n_blocks;
  int method;
  float lam;
  uint32_t seed_lo, seed_hi, name_hash;
  int64_t k;                  // consensus
  float tall_lambda;          // consensus
  double gamma;               // breadcrumbs: the dropped top fraction
  double epsilon;             // della: the keep-probability spread
  const int32_t* ranks;       // breadcrumbs, della: [n, numel] ascending ranks of |tau| per block
  bool normalize;             // electing methods
  float* thr;                 // ties: [n_blocks, n] thresholds
  uint32_t* hist;             // ties, few blocks: [n_blocks, n, kBins]
  SelState* state;            // ties, few blocks: [n_blocks, n]
  int pass;                   // selection pass of select_count / select_pick
};

PYOPS_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
PYOPS_DEVICE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// k = max(1, floor(density * len)) as the reference computes it (fp32 density, fp64 product).
PYOPS_DEVICE int64_t topk(float density, int64_t len) {
  const int64_t k = (int64_t)floor((double)density * (double)len);
  return max64(1, min64(k, len));
}

PYOPS_DEVICE bool keeps_all(float density) { return !(density < 1.f); }

template <class T, bool FM>
PYOPS_DEVICE float tau_at(const Args& a, int64_t i, int64_t j) {
  using S = typename T::S;
  const float x = T::to_f(static_cast<const S*>(a.deltas[i])[j]);
  if (!FM) return x;
  return simt::fsub(x, T::to_f(static_cast<const S*>(a.base)[j]));
}

PYOPS_DEVICE uint32_t key_of(float tau) { return simt::float_as_uint(tau) & 0x7fffffffu; }

// Called by every thread of the CTA. hist[0..nbins) counts the keys matching the current prefix
// by digit; returns in *digit the bucket that holds the need-th largest of them (counting from the
// top digit down) and in *need_out that key's rank inside the bucket. nbins is a multiple of
// kThreads; the total count must be >= need.
PYOPS_DEVICE void find_bucket_cta(const uint32_t* hist, int nbins, int64_t need, uint32_t* digit,
                                  int64_t* need_out) {
  PYOPS_SHARED int64_t scan[kThreads];
  PYOPS_SHARED uint32_t s_digit;
  PYOPS_SHARED int64_t s_need;
  const int t = simt::tid();
  const int per = nbins / kThreads;
  const int top = nbins - 1 - t * per;  // this thread's bins: top, top - 1, ..., top - per + 1
  int64_t part = 0;
  for (int q = 0; q < per; ++q) part += hist[top - q];
  scan[t] = part;
  if (t == 0) {
    s_digit = 0;
    s_need = need;
  }
  simt::sync();
  for (int off = 1; off < kThreads; off <<= 1) {  // inclusive scan, thread order = descending bins
    const int64_t v = t >= off ? scan[t - off] : 0;
    simt::sync();
    scan[t] += v;
    simt::sync();
  }
  const int64_t incl = scan[t], excl = incl - part;
  if (excl < need && need <= incl) {  // exactly one thread
    int64_t rem = need - excl;
    for (int q = 0; q < per; ++q) {
      const int64_t c = hist[top - q];
      if (c >= rem) {
        s_digit = (uint32_t)(top - q);
        s_need = rem;
        break;
      }
      rem -= c;
    }
  }
  simt::sync();
  *digit = s_digit;
  *need_out = s_need;
  simt::sync();  // every thread has read the result (and hist) before anyone reuses them
}

// Called by every thread of the CTA: hist[0..kBins) = the counts of digit (key >> shift) & dm over
// the keys of task i in [lo, hi) that match prefix on the bits pmask (complete when it returns).
template <class T, bool FM>
PYOPS_DEVICE void count_digits(const Args& a, int64_t i, int64_t lo, int64_t hi, uint32_t prefix, uint32_t pmask,
                               int shift, uint32_t dm, uint32_t* hist) {
  const int t = simt::tid();
  for (int h = t; h < kBins; h += kThreads) hist[h] = 0;
  simt::sync();
  for (int64_t j = lo + t; j < hi; j += kThreads) {
    const uint32_t key = key_of(tau_at<T, FM>(a, i, j));
    if ((key & pmask) == prefix) simt::atomic_add(&hist[(key >> shift) & dm], 1u);
  }
  simt::sync();
}

// ---- TIES thresholds, many blocks: one CTA per block ------------------------------------------
template <class T, bool FM>
PYOPS_KERNEL void select_blocks(Args a) {
  PYOPS_SHARED uint32_t hist[kBins];
  const int t = simt::tid();
  for (int64_t b = simt::bid(); b < a.n_blocks; b += simt::gdim()) {
    const int64_t lo = b * a.block_size, hi = min64(a.numel, lo + a.block_size);
    for (int64_t i = 0; i < a.n; ++i) {
      const float rho = a.density[i];
      if (keeps_all(rho)) {
        if (t == 0) a.thr[b * a.n + i] = 0.f;
        continue;
      }
      int64_t need = topk(rho, hi - lo);
      uint32_t prefix = 0, pmask = 0;
      for (int p = 0; p < kPasses; ++p) {
        const int shift = pass_shift(p);
        const uint32_t dm = pass_mask(p);
        count_digits<T, FM>(a, i, lo, hi, prefix, pmask, shift, dm, hist);
        uint32_t digit;
        find_bucket_cta(hist, (int)dm + 1, need, &digit, &need);
        prefix |= digit << shift;
        pmask |= dm << shift;
      }
      if (t == 0) a.thr[b * a.n + i] = simt::uint_as_float(prefix);
    }
  }
}

// ---- TIES thresholds, few blocks: pass a.pass over work items of kItem elements -----------------
template <class T, bool FM>
PYOPS_KERNEL void select_count(Args a) {
  PYOPS_SHARED uint32_t hist[kBins];
  const int t = simt::tid();
  const int p = a.pass, shift = pass_shift(p);
  const uint32_t dm = pass_mask(p);
  const int64_t per_block = (a.block_size + kItem - 1) / kItem;
  const int64_t n_items = a.n_blocks * per_block;
  for (int64_t it = simt::bid(); it < n_items; it += simt::gdim()) {
    const int64_t b = it / per_block;
    const int64_t lo = b * a.block_size + (it - b * per_block) * kItem;
    const int64_t hi = min64(min64(lo + kItem, (b + 1) * a.block_size), a.numel);  // lo >= hi: empty
    for (int64_t i = 0; i < a.n; ++i) {
      if (keeps_all(a.density[i])) continue;
      const SelState st = a.state[b * a.n + i];
      const uint32_t prefix = p == 0 ? 0u : st.prefix, pmask = p == 0 ? 0u : st.pmask;
      count_digits<T, FM>(a, i, lo, hi, prefix, pmask, shift, dm, hist);
      uint32_t* gh = a.hist + (b * a.n + i) * kBins;
      for (int h = t; h <= (int)dm; h += kThreads)
        if (hist[h] != 0) simt::atomic_add(&gh[h], hist[h]);
      simt::sync();
    }
  }
}

// One CTA per (block, task): the bucket of pass a.pass, the new prefix, and the cleared histogram.
PYOPS_KERNEL void select_pick(Args a) {
  const int t = simt::tid();
  const int p = a.pass, shift = pass_shift(p);
  const uint32_t dm = pass_mask(p);
  for (int64_t q = simt::bid(); q < a.n_blocks * a.n; q += simt::gdim()) {
    const int64_t b = q / a.n, i = q - b * a.n;
    const float rho = a.density[i];
    if (keeps_all(rho)) {
      if (t == 0 && p == kPasses - 1) a.thr[q] = 0.f;
      continue;
    }
    SelState st = a.state[q];
    if (p == 0) {
      const int64_t lo = b * a.block_size;
      st = SelState{0u, 0u, topk(rho, min64(a.numel, lo + a.block_size) - lo)};
    }
    uint32_t* gh = a.hist + q * kBins;
    uint32_t digit;
    int64_t need;
    find_bucket_cta(gh, (int)dm + 1, st.need, &digit, &need);
    if (t == 0) {
      st.prefix |= digit << shift;
      st.pmask |= dm << shift;
      st.need = need;
      a.state[q] = st;
      if (p == kPasses - 1) a.thr[q] = simt::uint_as_float(st.prefix);
    }
    for (int h = t; h < kBins; h += kThreads) gh[h] = 0;  // find_bucket_cta's last sync: all read
  }
}

// ---- The combine -------------------------------------------------------------------------------

// blk[e]: the block of element j0 + e of a 4-element group (e < cnt; the others get the first's).
// One division, then at most one step per element; blocks shorter than 4 elements divide each.
PYOPS_DEVICE void group_blocks(const Args& a, int64_t j0, int cnt, int64_t* blk) {
  const int64_t b0 = j0 / a.block_size, r0 = j0 - b0 * a.block_size;
  PYOPS_UNROLL
  for (int e = 0; e < 4; ++e)
    blk[e] = e >= cnt ? b0 : (a.block_size >= 4 ? b0 + (r0 + e >= a.block_size ? 1 : 0) : (j0 + e) / a.block_size);
}

// Breadcrumbs / DELLA: the keep multiplier m of each element from its rank r in its block
// (length blen):
//   breadcrumbs: m = [blen - n_keep - n_top <= r < blen - n_top], n_top = floor(gamma blen),
//                n_keep = floor(density blen) (fp64 products)
//   della:       p = (density - eps) + (2 eps) * (blen > 1 ? r / (blen - 1) : 0.5) in fp32,
//                m = [u < p] / p, u from the element's Philox word as for DARE
// (density >= 1 is handled by the caller: m = 1).
PYOPS_DEVICE void ranked_mult(const Args& a, int64_t i, int64_t g, int64_t j0, int cnt, const int64_t* blk,
                              float rho, float* m) {
  const int32_t* rk = a.ranks + i * a.numel;
  int64_t r[4];
  PYOPS_UNROLL
  for (int e = 0; e < 4; ++e) r[e] = e < cnt ? (int64_t)rk[j0 + e] : 0;
  if (a.method == kBreadcrumbs) {
    PYOPS_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int64_t lo_b = blk[e] * a.block_size;
      const int64_t blen = min64(a.numel, lo_b + a.block_size) - lo_b;
      const int64_t n_top = (int64_t)floor(a.gamma * (double)blen);
      const int64_t n_keep = (int64_t)floor((double)rho * (double)blen);
      m[e] = (r[e] >= blen - n_keep - n_top && r[e] < blen - n_top) ? 1.f : 0.f;
    }
    return;
  }
  const Philox4 w = philox4x32_10((uint32_t)g, (uint32_t)((uint64_t)g >> 32), (uint32_t)i, a.name_hash, a.seed_lo,
                                  a.seed_hi);
  const float plo = simt::fsub(rho, (float)a.epsilon), span = (float)(2.0 * a.epsilon);
  PYOPS_UNROLL
  for (int e = 0; e < 4; ++e) {
    const int64_t lo_b = blk[e] * a.block_size;
    const int64_t blen = min64(a.numel, lo_b + a.block_size) - lo_b;
    const float frac = blen > 1 ? simt::fdiv((float)r[e], (float)(blen - 1)) : 0.5f;
    const float prob = simt::fadd(plo, simt::fmul(span, frac));
    const float u = simt::fmul((float)(w.v[e] >> 8), 0x1p-24f);
    m[e] = simt::fdiv(u < prob ? 1.f : 0.f, prob);
  }
}

// tau_i and the keep multiplier m_i of the group's elements e < cnt (entries e >= cnt are
// unspecified): TIES 1 kept / 0 trimmed, DARE 1/density kept / 0 dropped, breadcrumbs / DELLA
// from the rank, 1 otherwise (and wherever density >= 1 keeps every entry). t_i = m_i * tau_i.
template <class T, bool FM>
PYOPS_DEVICE void task_mult(const Args& a, int64_t i, int64_t g, int64_t j0, int cnt, const float* bb,
                            const int64_t* blk, float* tau, float* m) {
  using S = typename T::S;
  const S* d = static_cast<const S*>(a.deltas[i]);
  PYOPS_UNROLL
  for (int e = 0; e < 4; ++e) {
    const float x = e < cnt ? T::to_f(d[j0 + e]) : 0.f;
    tau[e] = FM ? simt::fsub(x, bb[e]) : x;
    m[e] = 1.f;
  }
  const float rho = a.density[i];
  if (a.method == kTies && !keeps_all(rho)) {
    PYOPS_UNROLL
    for (int e = 0; e < 4; ++e) m[e] = fabsf(tau[e]) >= a.thr[blk[e] * a.n + i] ? 1.f : 0.f;
  } else if (a.method == kDare || a.method == kDareTies) {
    const Philox4 r = philox4x32_10((uint32_t)g, (uint32_t)((uint64_t)g >> 32), (uint32_t)i, a.name_hash,
                                    a.seed_lo, a.seed_hi);
    const float keep = simt::fdiv(1.f, rho);
    // u = (word >> 8) * 2^-24 < rho  <=>  (word >> 8) < ceil(rho * 2^24) (exact in double).
    const uint32_t lim = (uint32_t)ceil((double)rho * 16777216.0);
    PYOPS_UNROLL
    for (int e = 0; e < 4; ++e) m[e] = (r.v[e] >> 8) < lim ? keep : 0.f;
  } else if (is_ranked(a.method) && !keeps_all(rho)) {
    ranked_mult(a, i, g, j0, cnt, blk, rho, m);
  }
}

// t_i = m_i * tau_i over the group (1 * tau is tau itself, bit for bit).
template <class T, bool FM>
PYOPS_DEVICE void task_values(const Args& a, int64_t i, int64_t g, int64_t j0, int cnt, const float* bb,
                              const int64_t* blk, float* tv) {
  float tau[4], m[4];
  task_mult<T, FM>(a, i, g, j0, cnt, bb, blk, tau, m);
  PYOPS_UNROLL
  for (int e = 0; e < 4; ++e) tv[e] = simt::fmul(m[e], tau[e]);
}

template <class T, class O, bool FM>
PYOPS_KERNEL void combine(Args a) {
  using S = typename T::S;
  using SO = typename O::S;
  const S* base = static_cast<const S*>(a.base);
  SO* out = static_cast<SO*>(a.out);
  const bool electing = is_electing(a.method);
  const bool consensus = a.method == kConsensus;
  const int64_t n_groups = (a.numel + 3) >> 2;
  const int64_t stride = (int64_t)simt::gdim() * simt::bdim();
  for (int64_t g = (int64_t)simt::bid() * simt::bdim() + simt::tid(); g < n_groups; g += stride) {
    const int64_t j0 = g << 2;
    const int cnt = (int)min64(4, a.numel - j0);
    float bb[4], acc[4], w[4];
    int64_t blk[4];
    group_blocks(a, j0, cnt, blk);
    PYOPS_UNROLL
    for (int e = 0; e < 4; ++e) {
      bb[e] = e < cnt ? T::to_f(base[j0 + e]) : 0.f;
      acc[e] = 0.f;
    }
    float rows[kRegTasks][4];
    PYOPS_UNROLL
    for (int i = 0; i < kRegTasks; ++i) {
      if (i < a.n) {
        task_values<T, FM>(a, i, g, j0, cnt, bb, blk, rows[i]);
        PYOPS_UNROLL
        for (int e = 0; e < 4; ++e)
          acc[e] = simt::fadd(acc[e], simt::fmul(a.coeffs[i * a.s_n + blk[e] * a.s_b], rows[i][e]));
      }
    }
    for (int64_t i = kRegTasks; i < a.n; ++i) {
      float tv[4];
      task_values<T, FM>(a, i, g, j0, cnt, bb, blk, tv);
      PYOPS_UNROLL
      for (int e = 0; e < 4; ++e) acc[e] = simt::fadd(acc[e], simt::fmul(a.coeffs[i * a.s_n + blk[e] * a.s_b], tv[e]));
    }

    if (electing) {
      // s = sign of sum_i w_i t_i (+ for 0); a_i = [t_i * s > 0]; merged = sum a_i (w_i t_i) / sum a_i w_i.
      float sg[4], tot[4], div[4];
      PYOPS_UNROLL
      for (int e = 0; e < 4; ++e) {
        sg[e] = acc[e] >= 0.f ? 1.f : -1.f;
        tot[e] = div[e] = 0.f;
      }
      PYOPS_UNROLL
      for (int i = 0; i < kRegTasks; ++i) {
        if (i < a.n) {
          PYOPS_UNROLL
          for (int e = 0; e < 4; ++e) {
            w[e] = a.coeffs[i * a.s_n + blk[e] * a.s_b];
            const float t = rows[i][e];
            const float am = simt::fmul(t, sg[e]) > 0.f ? 1.f : 0.f;
            tot[e] = simt::fadd(tot[e], simt::fmul(am, simt::fmul(w[e], t)));
            div[e] = simt::fadd(div[e], simt::fmul(am, w[e]));
          }
        }
      }
      for (int64_t i = kRegTasks; i < a.n; ++i) {
        float tv[4];
        task_values<T, FM>(a, i, g, j0, cnt, bb, blk, tv);
        PYOPS_UNROLL
        for (int e = 0; e < 4; ++e) {
          w[e] = a.coeffs[i * a.s_n + blk[e] * a.s_b];
          const float am = simt::fmul(tv[e], sg[e]) > 0.f ? 1.f : 0.f;
          tot[e] = simt::fadd(tot[e], simt::fmul(am, simt::fmul(w[e], tv[e])));
          div[e] = simt::fadd(div[e], simt::fmul(am, w[e]));
        }
      }
      PYOPS_UNROLL
      for (int e = 0; e < 4; ++e) acc[e] = a.normalize ? simt::fdiv(tot[e], div[e] == 0.f ? 1.f : div[e]) : tot[e];
    } else if (consensus) {
      // TALL masks: keep the weighted sum where at least k tasks satisfy |tau_i| >= lambda |mtl - tau_i|.
      int cntk[4] = {0, 0, 0, 0};
      PYOPS_UNROLL
      for (int i = 0; i < kRegTasks; ++i) {
        if (i < a.n) {
          PYOPS_UNROLL
          for (int e = 0; e < 4; ++e)
            cntk[e] += fabsf(rows[i][e]) >= simt::fmul(a.tall_lambda, fabsf(simt::fsub(acc[e], rows[i][e]))) ? 1 : 0;
        }
      }
      for (int64_t i = kRegTasks; i < a.n; ++i) {
        float tv[4];
        task_values<T, FM>(a, i, g, j0, cnt, bb, blk, tv);
        PYOPS_UNROLL
        for (int e = 0; e < 4; ++e)
          cntk[e] += fabsf(tv[e]) >= simt::fmul(a.tall_lambda, fabsf(simt::fsub(acc[e], tv[e]))) ? 1 : 0;
      }
      PYOPS_UNROLL
      for (int e = 0; e < 4; ++e) acc[e] = simt::fmul((int64_t)cntk[e] >= a.k ? 1.f : 0.f, acc[e]);
    }
    PYOPS_UNROLL
    for (int e = 0; e < 4; ++e)
      if (e < cnt) out[j0 + e] = O::from_f(simt::fadd(bb[e], simt::fmul(a.lam, acc[e])));
  }
}

// ---- Backward (masks held fixed; every method but consensus) -----------------------------------
//
// With the keep multipliers m_i and the election a_i = [t_i * s > 0] (all 1 without one) held
// constant (csrc/cpu/merge.h):
//   d out / d w_i   = lam * a_i * (t_i - [normalize] merged) / D
//   d out / d tau_i = lam * a_i * w_i * m_i / D
// grad_deltas[i] = grad * d out / d tau_i and grad_base (grad, or grad - sum_i of those when
// from_models) are the CPU kernels' bits: the same operations in the same order. grad_coeffs[i, b],
// the sum over block b of grad * d out / d w_i, is reduced in a fixed order (fp32 products summed
// in double), so its bits depend on the sizes only, never on the grid:
//   - blocks of at most kSerialMax elements: one thread sums a whole block, element by element;
//   - longer blocks: items of kRedItem elements inside a block, each summed by one CTA (threads
//     over 4-element groups, then a fixed tree), the items of a block added in order afterwards.
// Tasks' gradients are accumulated kRegTasks at a time (more tasks: one pass over the item per
// kRegTasks of them; grad_deltas and grad_base are written in the first).
#ifndef PYOPS_MERGE_RED_ITEM
#define PYOPS_MERGE_RED_ITEM 4096
#endif
constexpr int64_t kSerialMax = 128;
constexpr int64_t kRedItem = PYOPS_MERGE_RED_ITEM;

struct BwdArgs {
  const void* grad;
  void* grad_base;                // null: not wanted
  void* const* grad_deltas;       // device array of n addresses; null: not wanted
  float* grad_coeffs;             // [n, n_blocks]; null: not wanted
  double* partial;                // long blocks with grad_coeffs: [n_items, n]
};

struct BwdKernelArgs {
  Args a;
  BwdArgs bw;
};

PYOPS_DEVICE bool serial_blocks(const Args& a) { return a.block_size <= kSerialMax; }
PYOPS_DEVICE int64_t red_items_per_block(const Args& a) { return (a.block_size + kRedItem - 1) / kRedItem; }

// The group g's elements inside [lo, hi): writes grad_deltas / grad_base (when `write`) and adds
// grad * d out / d w_i for tasks c0 .. c0 + kRegTasks - 1 into dots (when grad_coeffs is wanted).
template <class T, class G, bool FM>
PYOPS_DEVICE void group_backward(const Args& a, const BwdArgs& bw, int64_t g, int64_t lo, int64_t hi, int64_t c0,
                                 bool write, double* dots) {
  using S = typename T::S;
  const int64_t j0 = g << 2;
  const int cnt = (int)min64(4, a.numel - j0);
  bool valid[4];
  int64_t blk[4];
  float bb[4], gr[4];
  group_blocks(a, j0, cnt, blk);
  PYOPS_UNROLL
  for (int e = 0; e < 4; ++e) {
    valid[e] = e < cnt && j0 + e >= lo && j0 + e < hi;
    bb[e] = (FM && e < cnt) ? T::to_f(static_cast<const S*>(a.base)[j0 + e]) : 0.f;
    gr[e] = valid[e] ? G::to_f(static_cast<const typename G::S*>(bw.grad)[j0 + e]) : 0.f;
  }
  const bool electing = is_electing(a.method);
  const bool norm = electing && a.normalize;
  float tr[kRegTasks][4], mr[kRegTasks][4], acc[4] = {0.f, 0.f, 0.f, 0.f};
  auto coeff = [&](int64_t i, int e) { return a.coeffs[i * a.s_n + blk[e] * a.s_b]; };
  // t_i and m_i of task i, from registers or recomputed (tasks past kRegTasks).
  auto load = [&](int64_t i, float* t, float* m) {
    float tau[4];
    task_mult<T, FM>(a, i, g, j0, cnt, bb, blk, tau, m);
    PYOPS_UNROLL
    for (int e = 0; e < 4; ++e) t[e] = simt::fmul(m[e], tau[e]);
  };
  PYOPS_UNROLL
  for (int i = 0; i < kRegTasks; ++i) {
    if (i < a.n) {
      load(i, tr[i], mr[i]);
      PYOPS_UNROLL
      for (int e = 0; e < 4; ++e) acc[e] = simt::fadd(acc[e], simt::fmul(coeff(i, e), tr[i][e]));
    }
  }
  for (int64_t i = kRegTasks; i < a.n; ++i) {
    float t[4], m[4];
    load(i, t, m);
    PYOPS_UNROLL
    for (int e = 0; e < 4; ++e) acc[e] = simt::fadd(acc[e], simt::fmul(coeff(i, e), t[e]));
  }
  float sg[4], invd[4], merged[4];
  PYOPS_UNROLL
  for (int e = 0; e < 4; ++e) {
    sg[e] = acc[e] >= 0.f ? 1.f : -1.f;
    invd[e] = merged[e] = 0.f;
  }
  // The election folded into t and m (a_i = 0 where task i disagrees), and D.
  auto elect = [&](int64_t i, float* t, float* m, bool sums) {
    PYOPS_UNROLL
    for (int e = 0; e < 4; ++e) {
      const float am = simt::fmul(t[e], sg[e]) > 0.f ? 1.f : 0.f;
      t[e] = simt::fmul(t[e], am);
      m[e] = simt::fmul(m[e], am);
      if (sums) {
        const float w = coeff(i, e);
        invd[e] = simt::fadd(invd[e], simt::fmul(am, w));
        merged[e] = simt::fadd(merged[e], simt::fmul(am, simt::fmul(w, t[e])));
      }
    }
  };
  if (electing) {
    PYOPS_UNROLL
    for (int i = 0; i < kRegTasks; ++i)
      if (i < a.n) elect(i, tr[i], mr[i], true);
    for (int64_t i = kRegTasks; i < a.n; ++i) {
      float t[4], m[4];
      load(i, t, m);
      elect(i, t, m, true);
    }
    PYOPS_UNROLL
    for (int e = 0; e < 4; ++e) {
      const float d = norm ? (invd[e] == 0.f ? 1.f : invd[e]) : 1.f;
      merged[e] = norm ? simt::fdiv(merged[e], d) : merged[e];
      invd[e] = simt::fdiv(a.lam, d);
    }
  } else {
    PYOPS_UNROLL
    for (int e = 0; e < 4; ++e) invd[e] = a.lam;
  }
  const bool deltas_out = write && bw.grad_deltas != nullptr;
  const bool base_out = write && bw.grad_base != nullptr;
  float gsum[4] = {0.f, 0.f, 0.f, 0.f};
  auto outputs = [&](int64_t i, const float* t, const float* m) {
    if (bw.grad_coeffs != nullptr && i >= c0 && i < c0 + kRegTasks) {
      double s = 0.0;
      PYOPS_UNROLL
      for (int e = 0; e < 4; ++e) {
        if (!valid[e]) continue;
        const float a1 = m[e] != 0.f ? 1.f : 0.f;
        const float dw = simt::fmul(invd[e], simt::fsub(t[e], norm ? simt::fmul(a1, merged[e]) : 0.f));
        s += (double)simt::fmul(gr[e], dw);
      }
      dots[i - c0] += s;
    }
    if (deltas_out || (FM && base_out)) {
      S* gd = deltas_out ? static_cast<S*>(bw.grad_deltas[i]) : nullptr;
      PYOPS_UNROLL
      for (int e = 0; e < 4; ++e) {
        const float dtau = simt::fmul(simt::fmul(simt::fmul(invd[e], coeff(i, e)), m[e]), gr[e]);
        if (valid[e] && gd != nullptr) gd[j0 + e] = T::from_f(dtau);
        gsum[e] = simt::fadd(gsum[e], dtau);
      }
    }
  };
  PYOPS_UNROLL
  for (int i = 0; i < kRegTasks; ++i)
    if (i < a.n) outputs(i, tr[i], mr[i]);
  for (int64_t i = kRegTasks; i < a.n; ++i) {
    float t[4], m[4];
    load(i, t, m);
    if (electing) elect(i, t, m, false);
    outputs(i, t, m);
  }
  if (base_out) {
    S* gb = static_cast<S*>(bw.grad_base);
    PYOPS_UNROLL
    for (int e = 0; e < 4; ++e)
      if (valid[e]) gb[j0 + e] = T::from_f(FM ? simt::fsub(gr[e], gsum[e]) : gr[e]);
  }
}

// Blocks of at most kSerialMax elements: thread q owns block q (grid-stride).
template <class T, class G, bool FM>
PYOPS_KERNEL void backward_serial(BwdKernelArgs k) {
  const Args& a = k.a;
  const BwdArgs& bw = k.bw;
  const int64_t stride = (int64_t)simt::gdim() * simt::bdim();
  const int64_t passes = bw.grad_coeffs != nullptr ? (a.n + kRegTasks - 1) / kRegTasks : 1;
  for (int64_t b = (int64_t)simt::bid() * simt::bdim() + simt::tid(); b < a.n_blocks; b += stride) {
    const int64_t lo = b * a.block_size, hi = min64(a.numel, lo + a.block_size);
    for (int64_t p = 0; p < passes; ++p) {
      const int64_t c0 = p * kRegTasks;
      double dots[kRegTasks];
      for (int q = 0; q < kRegTasks; ++q) dots[q] = 0.0;
      for (int64_t g = lo >> 2; g <= (hi - 1) >> 2; ++g) group_backward<T, G, FM>(a, bw, g, lo, hi, c0, p == 0, dots);
      if (bw.grad_coeffs != nullptr)
        for (int64_t i = c0; i < min64(a.n, c0 + kRegTasks); ++i) bw.grad_coeffs[i * a.n_blocks + b] = (float)dots[i - c0];
    }
  }
}

// Longer blocks: one CTA per item of kRedItem elements; per-item sums into bw.partial.
template <class T, class G, bool FM>
PYOPS_KERNEL void backward_items(BwdKernelArgs k) {
  PYOPS_SHARED double red[kRegTasks][kThreads];
  const Args& a = k.a;
  const BwdArgs& bw = k.bw;
  const int t = simt::tid();
  const int64_t per_block = red_items_per_block(a), n_items = a.n_blocks * per_block;
  const int64_t passes = bw.grad_coeffs != nullptr ? (a.n + kRegTasks - 1) / kRegTasks : 1;
  for (int64_t it = simt::bid(); it < n_items; it += simt::gdim()) {
    const int64_t b = it / per_block;
    const int64_t lo = b * a.block_size + (it - b * per_block) * kRedItem;
    const int64_t hi = min64(min64(lo + kRedItem, (b + 1) * a.block_size), a.numel);  // lo >= hi: empty
    for (int64_t p = 0; p < passes; ++p) {
      const int64_t c0 = p * kRegTasks;
      double dots[kRegTasks];
      for (int q = 0; q < kRegTasks; ++q) dots[q] = 0.0;
      if (lo < hi)
        for (int64_t g = (lo >> 2) + t; g <= (hi - 1) >> 2; g += kThreads)
          group_backward<T, G, FM>(a, bw, g, lo, hi, c0, p == 0, dots);
      if (bw.grad_coeffs == nullptr) continue;
      for (int q = 0; q < kRegTasks; ++q) red[q][t] = dots[q];
      simt::sync();
      for (int half = kThreads / 2; half > 0; half >>= 1) {
        if (t < half)
          for (int q = 0; q < kRegTasks; ++q) red[q][t] += red[q][t + half];
        simt::sync();
      }
      if (t == 0)
        for (int64_t i = c0; i < min64(a.n, c0 + kRegTasks); ++i) bw.partial[it * a.n + i] = red[i - c0][0];
      simt::sync();  // red is reused by the next pass
    }
  }
}

// grad_coeffs[i, b] = the items of block b added in order.
PYOPS_KERNEL void backward_finish(BwdKernelArgs k) {
  const Args& a = k.a;
  const BwdArgs& bw = k.bw;
  const int64_t per_block = red_items_per_block(a);
  const int64_t stride = (int64_t)simt::gdim() * simt::bdim();
  for (int64_t q = (int64_t)simt::bid() * simt::bdim() + simt::tid(); q < a.n_blocks * a.n; q += stride) {
    const int64_t b = q / a.n, i = q - b * a.n;
    double s = 0.0;
    for (int64_t c = 0; c < per_block; ++c) s += bw.partial[(b * per_block + c) * a.n + i];
    bw.grad_coeffs[i * a.n_blocks + b] = (float)s;
  }
}

// ---- Host side: workspace and the sequence of launches -----------------------------------------

struct Problem {
  void* out;
  int out_dtype;             // 0 fp32, 1 fp16, 2 bf16 (common/dtype.h)
  const void* base;
  const void* delta_ptrs;    // device int64 array of n addresses
  int64_t n;
  int in_dtype;
  const float* coeffs;
  int64_t coeff_stride_n, coeff_stride_block;
  const float* density;      // device [n]
  int64_t numel, block_size;
  bool from_models;
  int method;
  float lam;
  uint64_t seed;
  uint32_t name_hash;
  int64_t k;
  float tall_lambda;
  double gamma;
  double epsilon;
  const int32_t* ranks;      // device [n, numel]: breadcrumbs, della, della_linear
  bool normalize;
  void* workspace;
  int64_t workspace_bytes;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Layout {
  int64_t block_size = 1, n_blocks = 0;
  bool per_block = true;     // ties: one CTA per block
  int64_t thr_off = 0, hist_off = 0, state_off = 0, partial_off = 0, bytes = 0;
};

// The workspace: TIES thresholds (and the few-blocks selection's histograms and states); for a
// backward with grad_coeffs over blocks longer than kSerialMax, the per-item partial sums.
inline Layout layout(int64_t numel, int64_t block_size, int64_t n, int method, bool grad_coeffs = false) {
  Layout l;
  if (numel <= 0 || block_size <= 0 || n <= 0) return l;
  l.block_size = block_size < numel ? block_size : numel;
  l.n_blocks = (numel + l.block_size - 1) / l.block_size;
  l.per_block = l.n_blocks >= kCtaBlocks;
  const int64_t pairs = l.n_blocks * n;
  if (method == kTies) {
    l.thr_off = 0;
    l.bytes = round_up(pairs * (int64_t)sizeof(float), 256);
    if (!l.per_block) {
      l.hist_off = l.bytes;
      l.bytes += round_up(pairs * kBins * (int64_t)sizeof(uint32_t), 256);
      l.state_off = l.bytes;
      l.bytes += round_up(pairs * (int64_t)sizeof(SelState), 256);
    }
  }
  if (grad_coeffs && l.block_size > kSerialMax) {
    l.partial_off = l.bytes;
    l.bytes += round_up(pairs * ((l.block_size + kRedItem - 1) / kRedItem) * (int64_t)sizeof(double), 256);
  }
  return l;
}

// L: launch(kernel, ctas wanted, args) -> Status (the launcher may cap the grid: every kernel
// strides), zero(ptr, bytes) -> Status.
// TIES: the per-block thresholds into a.thr.
template <class L, class T, bool FM>
Status select_thresholds(Args a, const Layout& l, L& launcher) {
  if (l.per_block) return launcher.launch(&select_blocks<T, FM>, a.n_blocks, a);
  Status st = launcher.zero(a.hist, a.n_blocks * a.n * kBins * (int64_t)sizeof(uint32_t));
  const int64_t items = a.n_blocks * ((a.block_size + kItem - 1) / kItem);
  for (int p = 0; p < kPasses && st.is_ok(); ++p) {
    a.pass = p;
    st = launcher.launch(&select_count<T, FM>, items, a);
    if (st.is_ok()) st = launcher.launch(&select_pick, a.n_blocks * a.n, a);
  }
  return st;
}

template <class L, class T, class O, bool FM>
Status run_typed(const Args& a, const Layout& l, L& launcher) {
  if (a.method == kTies) {
    const Status st = select_thresholds<L, T, FM>(a, l, launcher);
    if (!st.is_ok()) return st;
  }
  return launcher.launch(&combine<T, O, FM>, ((a.numel + 3) / 4 + kThreads - 1) / kThreads, a);
}

// The backward's outputs (each may be null: not wanted) and its incoming gradient; the Problem
// describes the forward (its out / out_dtype are ignored).
struct BwdOutputs {
  const void* grad;          // [numel] in grad_dtype
  int grad_dtype;
  void* grad_base;           // [numel] in in_dtype
  const void* grad_delta_ptrs;  // device int64 array of n addresses of [numel] in in_dtype
  float* grad_coeffs;        // [n, n_blocks] fp32
};

inline Status check(const Problem& p, bool backward, bool grad_coeffs) {
  if (!implements(p.method))
    return Status::invalid("method: the CUDA merge kernels implement codes 1 (ties), 2 (dare), 3 (dare_ties), "
                           "4 (breadcrumbs), 5 (della), 6 (della_linear) and 7 (consensus), got " +
                           std::to_string(p.method));
  if (backward && p.method == kConsensus)
    return Status::invalid("method: consensus has no backward with masks held fixed (its mask depends on the "
                           "coefficients)");
  if (p.in_dtype < 0 || p.in_dtype > 2) return Status::invalid("in_dtype: unknown dtype code " + std::to_string(p.in_dtype));
  if (!backward && (p.out_dtype < 0 || p.out_dtype > 2))
    return Status::invalid("out_dtype: unknown dtype code " + std::to_string(p.out_dtype));
  if (p.numel < 0) return Status::invalid("numel: expected >= 0, got " + std::to_string(p.numel));
  if (p.block_size <= 0) return Status::invalid("block_size: expected > 0, got " + std::to_string(p.block_size));
  if (p.n < 1) return Status::invalid("n: expected at least one task vector, got " + std::to_string(p.n));
  if (p.method == kConsensus && (p.k < 1 || p.k > p.n))
    return Status::invalid("k: expected 1 <= k <= n = " + std::to_string(p.n) + ", got " + std::to_string(p.k));
  if (p.numel == 0) return Status::ok();
  if ((!backward && p.out == nullptr) || p.base == nullptr || p.delta_ptrs == nullptr || p.coeffs == nullptr ||
      p.density == nullptr)
    return Status::invalid("out, base, delta_ptrs, coeffs and density must be non-null device pointers");
  const bool ranked = p.method >= kBreadcrumbs && p.method <= kDellaLinear;
  if (ranked && p.ranks == nullptr)
    return Status::invalid("ranks: breadcrumbs and della need the [n, numel] int32 ranks (a null pointer)");
  const Layout l = layout(p.numel, p.block_size, p.n, p.method, backward && grad_coeffs);
  if (ranked && l.block_size >= (int64_t(1) << 31))
    return Status::invalid("block_size: ranks are int32, blocks must have fewer than 2**31 elements, got " +
                           std::to_string(l.block_size));
  if (p.method == kTies && l.block_size >= kMaxSelectLen)
    return Status::invalid("block_size: the CUDA TIES selection counts blocks of fewer than 2**32 elements, got " +
                           std::to_string(l.block_size));
  if (p.workspace_bytes < l.bytes || (l.bytes > 0 && p.workspace == nullptr))
    return Status::invalid("workspace: expected at least " + std::to_string(l.bytes) + " bytes, got " +
                           std::to_string(p.workspace_bytes));
  return Status::ok();
}

inline Args make_args(const Problem& p, const Layout& l) {
  char* ws = static_cast<char*>(p.workspace);
  Args a{};
  a.out = p.out;
  a.base = p.base;
  a.deltas = static_cast<const void* const*>(p.delta_ptrs);
  a.n = p.n;
  a.coeffs = p.coeffs;
  a.s_n = p.coeff_stride_n;
  a.s_b = p.coeff_stride_block;
  a.density = p.density;
  a.numel = p.numel;
  a.block_size = l.block_size;
  a.n_blocks = l.n_blocks;
  a.method = p.method;
  a.lam = p.lam;
  a.seed_lo = (uint32_t)p.seed;
  a.seed_hi = (uint32_t)(p.seed >> 32);
  a.name_hash = p.name_hash;
  a.k = p.k;
  a.tall_lambda = p.tall_lambda;
  a.gamma = p.gamma;
  a.epsilon = p.epsilon;
  a.ranks = p.ranks;
  a.normalize = p.normalize;
  a.thr = p.method == kTies ? reinterpret_cast<float*>(ws + l.thr_off) : nullptr;
  a.hist = p.method == kTies && !l.per_block ? reinterpret_cast<uint32_t*>(ws + l.hist_off) : nullptr;
  a.state = p.method == kTies && !l.per_block ? reinterpret_cast<SelState*>(ws + l.state_off) : nullptr;
  a.pass = 0;
  return a;
}

// Calls f(T-tag, G-tag or O-tag, FM) with the dtype codes resolved to types.
template <class F>
Status dispatch(int in_dtype, int second_dtype, bool fm, F&& f) {
  auto with_second = [&](auto t) -> Status {
    auto with_fm = [&](auto t2) -> Status {
      return fm ? f(t, t2, std::true_type{}) : f(t, t2, std::false_type{});
    };
    switch (second_dtype) {
      case 0: return with_fm(simt::F32{});
      case 1: return with_fm(simt::F16{});
      default: return with_fm(simt::BF16{});
    }
  };
  switch (in_dtype) {
    case 0: return with_second(simt::F32{});
    case 1: return with_second(simt::F16{});
    default: return with_second(simt::BF16{});
  }
}

template <class L>
Status run(const Problem& p, L& launcher) {
  Status st = check(p, false, false);
  if (!st.is_ok() || p.numel == 0) return st;
  const Layout l = layout(p.numel, p.block_size, p.n, p.method);
  const Args a = make_args(p, l);
  return dispatch(p.in_dtype, p.out_dtype, p.from_models, [&](auto t, auto o, auto fm) -> Status {
    return run_typed<L, decltype(t), decltype(o), decltype(fm)::value>(a, l, launcher);
  });
}

template <class L, class T, class G, bool FM>
Status run_backward_typed(const Args& a, const BwdArgs& bw, const Layout& l, L& launcher) {
  Status st;
  if (a.method == kTies) {
    st = select_thresholds<L, T, FM>(a, l, launcher);
    if (!st.is_ok()) return st;
  }
  const BwdKernelArgs k{a, bw};
  if (a.block_size <= kSerialMax)
    return launcher.launch(&backward_serial<T, G, FM>, (a.n_blocks + kThreads - 1) / kThreads, k);
  st = launcher.launch(&backward_items<T, G, FM>, a.n_blocks * ((a.block_size + kRedItem - 1) / kRedItem), k);
  if (!st.is_ok() || bw.grad_coeffs == nullptr) return st;
  return launcher.launch(&backward_finish, (a.n_blocks * a.n + kThreads - 1) / kThreads, k);
}

template <class L>
Status run_backward(const Problem& p, const BwdOutputs& o, L& launcher) {
  const bool want_coeffs = o.grad_coeffs != nullptr;
  Status st = check(p, true, want_coeffs);
  if (!st.is_ok() || p.numel == 0) return st;
  if (o.grad == nullptr) return Status::invalid("grad must be a non-null device pointer");
  if (o.grad_dtype < 0 || o.grad_dtype > 2)
    return Status::invalid("grad_dtype: unknown dtype code " + std::to_string(o.grad_dtype));
  const Layout l = layout(p.numel, p.block_size, p.n, p.method, want_coeffs);
  const Args a = make_args(p, l);
  BwdArgs bw{};
  bw.grad = o.grad;
  bw.grad_base = o.grad_base;
  bw.grad_deltas = static_cast<void* const*>(const_cast<void*>(o.grad_delta_ptrs));
  bw.grad_coeffs = o.grad_coeffs;
  bw.partial = want_coeffs && l.block_size > kSerialMax
                   ? reinterpret_cast<double*>(static_cast<char*>(p.workspace) + l.partial_off)
                   : nullptr;
  return dispatch(p.in_dtype, o.grad_dtype, p.from_models, [&](auto t, auto g, auto fm) -> Status {
    return run_backward_typed<L, decltype(t), decltype(g), decltype(fm)::value>(a, bw, l, launcher);
  });
}

}  // namespace cuda_merge
}  // namespace pyops
