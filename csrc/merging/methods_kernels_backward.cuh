// CUDA kernels of `pyops.merge`, part 4 of 4 (see methods_kernels.cuh): the backward with every
// mask held fixed (every method but consensus), which recomputes the masks with the combine's
// device helpers.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/philox.h"
#include "common/simt.h"
#include "merging/methods_kernels_combine.cuh"
#include "merging/methods_kernels_common.cuh"

namespace pyops {
namespace cuda_merge {

// ---- Backward (masks held fixed; every method but consensus) -----------------------------------
//
// With the keep multipliers m_i and the election a_i = [t_i * s > 0] (all 1 without one) held
// constant (merging/methods.h):
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
      // D == 0 is replaced by the constant 1 (no gradient flows through it): the merged term of
      // d out / d w_i vanishes there.
      const float d = norm ? (invd[e] == 0.f ? 1.f : invd[e]) : 1.f;
      merged[e] = norm ? (invd[e] == 0.f ? 0.f : simt::fdiv(merged[e], d)) : merged[e];
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

}  // namespace cuda_merge
}  // namespace pyops
