// CUDA kernels of `pyops.merge`, part 2 of 4 (see methods_kernels.cuh): the TIES thresholds, a radix
// select per (block, task), one CTA per block or spread over many.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/philox.h"
#include "common/simt.h"
#include "merging/methods_kernels_common.cuh"

namespace pyops {
namespace cuda_merge {

// ---- TIES thresholds, many blocks: one CTA per block ------------------------------------------
template <class T, bool FM>
PYOPS_KERNEL void select_blocks(Args a) {
  PYOPS_SHARED uint32_t hist[kBins];
  const int t = simt::tid();
  for (int64_t b = simt::bid(); b < a.n_blocks; b += simt::gdim()) {
    const int64_t lo = b * a.block_size, hi = min64(a.numel, lo + a.block_size);
    for (int64_t i = 0; i < a.n; ++i) {
      const double rho = a.density[i];
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
    const double rho = a.density[i];
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

}  // namespace cuda_merge
}  // namespace pyops
