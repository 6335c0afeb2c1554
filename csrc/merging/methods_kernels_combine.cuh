// CUDA kernels of `pyops.merge`, part 3 of 4 (see methods_kernels.cuh): the combine, one thread per
// 4-element group, for every method.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/philox.h"
#include "common/simt.h"
#include "merging/methods_kernels_common.cuh"

namespace pyops {
namespace cuda_merge {

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
//                n_keep = floor(density blen) (fp64 density and products, as mergekit)
//   della:       p = (fp32(density) - eps) + (2 eps) * (blen > 1 ? r / (blen - 1) : 0.5) in fp32,
//                m = [u < p] / p, u from the element's Philox word as for DARE
// (density >= 1 is handled by the caller: m = 1).
PYOPS_DEVICE void ranked_mult(const Args& a, int64_t i, int64_t g, int64_t j0, int cnt, const int64_t* blk,
                              double rho, float* m) {
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
      const int64_t n_keep = (int64_t)floor(rho * (double)blen);
      m[e] = (r[e] >= blen - n_keep - n_top && r[e] < blen - n_top) ? 1.f : 0.f;
    }
    return;
  }
  const Philox4 w = philox4x32_10((uint32_t)g, (uint32_t)((uint64_t)g >> 32), (uint32_t)i, a.name_hash, a.seed_lo,
                                  a.seed_hi);
  const float plo = simt::fsub((float)rho, (float)a.epsilon), span = (float)(2.0 * a.epsilon);
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
  const double rho64 = a.density[i];
  const float rho = (float)rho64;  // the keep probability, fp32 as the reference
  if (a.method == kTies && !keeps_all(rho64)) {
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
  } else if (is_ranked(a.method) && !keeps_all(rho64)) {
    ranked_mult(a, i, g, j0, cnt, blk, rho64, m);
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

}  // namespace cuda_merge
}  // namespace pyops
