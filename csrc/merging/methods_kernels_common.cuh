// CUDA kernels of `pyops.merge`, part 1 of 4 (see methods_kernels.cuh): the compile-time sizes,
// method codes, the kernel arguments and the device helpers every part shares.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/philox.h"
#include "common/simt.h"
#include "common/status.h"

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

// Method codes (merging/methods.h) these kernels implement.
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
  const double* density;      // [n], device, fp64 as given (counts in fp64; probabilities fp32(density))
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

// k = max(1, floor(density * len)) in fp64: mergekit 0.1.5's int(density * n), as the reference.
PYOPS_DEVICE int64_t topk(double density, int64_t len) {
  const int64_t k = (int64_t)floor(density * (double)len);
  return max64(1, min64(k, len));
}

PYOPS_DEVICE bool keeps_all(double density) { return !(density < 1.0); }

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

}  // namespace cuda_merge
}  // namespace pyops
