// Task-masked attention backward on the row kernels, one translation unit per ISA (see
// CMakeLists.txt): the flash path (a key-centric dK / dV pass and a query-centric dQ pass, or
// both fused per (batch row, kv head)) and the short path's whole-block rows for head dims above
// kLaneMaxDim. The choice between the paths is in task_attention.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/convert.h"
#include "common/isa.h"
#include "common/philox.h"
#include "common/thread_pool.h"
#include "task_attention/task_attention.h"
#include "task_attention/tiles.h"
#include "task_attention/vector_math.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace task_attention_impl {

namespace {

#ifdef PYOPS_TA_AVX512
// The backward's element-wise step for kR = 4 rows at once (no dropout, every row live):
// P = fexp(S - lse) in place and dS = P * (dP - D_i), the same operations per element as the
// one-row path, with the four rows' work interleaved.
__attribute__((target("avx512f"))) static void bwd_rows4_512(float* S, float* dS, int64_t nkp, const float* lse,
                                                             const float* di) {
  __m512 lv[4], dv[4];
  for (int r = 0; r < 4; ++r) {
    lv[r] = _mm512_set1_ps(lse[r]);
    dv[r] = _mm512_set1_ps(di[r]);
  }
  for (int64_t j = 0; j < nkp; j += 16) {
    const __mmask16 k = j + 16 <= nkp ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
    for (int r = 0; r < 4; ++r) {
      float* s = S + r * nkp + j;
      float* ds = dS + r * nkp + j;
      const __m512 e = fexp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s), lv[r]));
      _mm512_mask_storeu_ps(s, k, e);
      _mm512_mask_storeu_ps(ds, k, _mm512_mul_ps(e, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, ds), dv[r])));
    }
  }
}
#endif

// ---- backward ---------------------------------------------------------------------------------

// One (q-tile, k-tile) pair of the backward for the q rows held in w.qs (pre-scaled), w.dO,
// w.lse, w.di and the keys in w.kt / w.vt (and w.kr when dq uses rows). Accumulates
// dKt += dS^T Qs and dVt += Pd^T dO (when acc_kv) and dq += dS K (when acc_q; unscaled).
// The q side of a backward tile (see bwd_load_q) and the k side (see bwd_load_kv).
struct QSide {
  float *qs, *dO, *qst, *dot_t, *lse, *di;
};
struct KSide {
  const float *kt, *vt, *kr;
};

QSide q_side_of(Scratch& w) {
  return {w.qs.data(), w.dO.data(), w.qst.data(), w.dot_t.data(), w.lse.data(), w.di.data()};
}
KSide k_side_of(Scratch& w) { return {w.kt.data(), w.vt.data(), w.kr.data()}; }

void bwd_block(const Ctx& c, Scratch& w, int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t k0, int64_t nk,
               int64_t nkp, const MaskSpec& mask, bool acc_kv, bool acc_q, bool k_rows, int64_t ldk,
               const QSide& Q, const KSide& K, float* dqbuf) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t D = p.D, Dv = p.Dv;
  float* ks = w.ks.data();
  for (int64_t r0 = 0; r0 < nq; r0 += kR) {
    // scores -> P -> P with dropout, and dP -> dS: kept for the whole q-tile when dK / dV follow.
    float* S = acc_kv ? w.pfull.data() + r0 * nkp : w.s.data();
    float* dS = acc_kv ? w.dsfull.data() + r0 * nkp : w.s2.data();
    gemm_rows_t(Q.qs + r0 * D, D, D, K.kt, nkp, S);
    gemm_rows_t(Q.dO + r0 * Dv, Dv, Dv, K.vt, nkp, dS);
    const int64_t nr = std::min(kR, nq - r0);
    bool any = false, rows_done = false;
#ifdef PYOPS_TA_AVX512
    if (g_avx512 && !c.dropout && nr == kR && Q.lse[r0] != kNegInf && Q.lse[r0 + 1] != kNegInf &&
        Q.lse[r0 + 2] != kNegInf && Q.lse[r0 + 3] != kNegInf) {
      for (int64_t r = 0; r < kR; ++r) mask.apply(r0 + r, S + r * nkp, nk, nkp);
      bwd_rows4_512(S, dS, nkp, Q.lse + r0, Q.di + r0);
      any = rows_done = true;
    }
#endif
    for (int64_t r = 0; r < kR && !rows_done; ++r) {
      float* s = S + r * nkp;
      float* ds = dS + r * nkp;
      const int64_t i = r0 + r;
      if (r >= nr || Q.lse[i] == kNegInf) {
        std::fill(s, s + nkp, 0.f);
        std::fill(ds, ds + nkp, 0.f);
        continue;
      }
      any = true;
      mask.apply(i, s, nk, nkp);
      const float li = Q.lse[i], di = Q.di[i];
      exp_sub_wide(s, li, nkp);
      if (c.dropout) {
        c.keep_row(b, h, q0 + i, k0, nk, nkp, ks);
        for (int64_t j = 0; j < nkp; ++j) {
          const float dp = ds[j] * ks[j];
          ds[j] = s[j] * (dp - di);
          s[j] *= ks[j];
        }
      } else {
        for (int64_t j = 0; j < nkp; ++j) ds[j] = s[j] * (ds[j] - di);
      }
    }
    if (!any) continue;
    if (acc_q) {
      float* dq = dqbuf + r0 * ldk;
      if (k_rows) {
        gemm_rows_acc(dS, nkp, nk, K.kr, ldk, dq);
      } else {
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t d = 0; d < D; ++d) dq[r * ldk + d] += dot8(dS + r * nkp, K.kt + d * nkp, nkp);
      }
    }
  }
  if (acc_kv) {  // dVt += dO^T P, dKt += Qs^T dS over the q-tile's rows (padded rows are zero)
    const int64_t nqp = round_up(nq, kR);
    for (int64_t c0 = 0; c0 < Dv; c0 += kR)
      gemm_rows_t(Q.dot_t + c0 * nqp, nqp, nqp, w.pfull.data(), nkp, w.dvt.data() + c0 * nkp, true);
    for (int64_t d0 = 0; d0 < D; d0 += kR)
      gemm_rows_t(Q.qst + d0 * nqp, nqp, nqp, w.dsfull.data(), nkp, w.dkt.data() + d0 * nkp, true);
  }
}

// Loads the q-side rows [q0, q0 + nq) of head (b, h) for the backward: Qs, dO, lse and
// D_i = rowsum(dO * O) (O includes dropout, so this is sum_j P_ij * dP'_ij).
template <typename T>
void bwd_load_q(const Ctx& c, Scratch& w, int64_t b, int64_t h, int64_t q0, int64_t nq, const T* out,
                const T* dout, const float* lse, const QSide& Q) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t row0 = (b * p.Hq + h) * p.Lq + q0;
  const int64_t nqp = round_up(nq, kR);
  load_rows(static_cast<const T*>(p.q) + row0 * p.D, nq, p.D, p.scale, Q.qs, nqp);
  load_rows(dout + row0 * p.Dv, nq, p.Dv, 1.f, Q.dO, nqp);
  // Qs^T and dO^T ([round4(D), nqp], rows past D zero) for the dK / dV products.
  const int64_t D4 = round_up(p.D, kR), Dv4 = round_up(p.Dv, kR);
  std::memset(Q.qst, 0, sizeof(float) * D4 * nqp);
  std::memset(Q.dot_t, 0, sizeof(float) * Dv4 * nqp);
  for (int64_t r = 0; r < nq; ++r) {
    for (int64_t d = 0; d < p.D; ++d) Q.qst[d * nqp + r] = Q.qs[r * p.D + d];
    for (int64_t cc = 0; cc < p.Dv; ++cc) Q.dot_t[cc * nqp + r] = Q.dO[r * p.Dv + cc];
  }
  float* orow = w.acc.data();
  for (int64_t i = 0; i < nq; ++i) {
    Q.lse[i] = lse[row0 + i];
    const float* o = as_float_tile(out + (row0 + i) * p.Dv, orow, p.Dv);
    Q.di[i] = dot_any(Q.dO + i * p.Dv, o, p.Dv);
  }
}

template <typename T>
void bwd_load_kv(const TaskAttentionProblem& p, Scratch& w, int64_t b, int64_t hk, int64_t k0, int64_t nk,
                 int64_t nkp, bool k_rows, int64_t ldk) {
  const T* k = static_cast<const T*>(p.k) + ((b * p.Hkv + hk) * p.Lk + k0) * p.D;
  const T* v = static_cast<const T*>(p.v) + ((b * p.Hkv + hk) * p.Lk + k0) * p.Dv;
  load_transposed(k, nk, p.D, w.kt.data(), nkp);
  load_transposed(v, nk, p.Dv, w.vt.data(), nkp);
  if (k_rows) load_rows_padded(k, nk, p.D, w.kr.data(), ldk);
}

template <typename T>
void bwd_store_dq(const TaskAttentionProblem& p, float* dqbuf, int64_t b, int64_t h, int64_t q0, int64_t nq,
                  int64_t ldk, T* dq) {
  const int64_t row0 = (b * p.Hq + h) * p.Lq + q0;
  for (int64_t i = 0; i < nq; ++i) {
    float* r = dqbuf + i * ldk;
    for (int64_t d = 0; d < p.D; ++d) r[d] *= p.scale;
    store_row(r, dq + (row0 + i) * p.D, p.D);
  }
}

}  // namespace

// Short path backward: item = batch row b (all kv heads) or (b, kv head).
template <typename T>
void backward_short_item(const Ctx& c, int64_t item, bool per_head, const T* out, const T* dout,
                         const float* lse, T* dq, T* dk, T* dv) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t b = per_head ? item / p.Hkv : item;
  const int64_t hk_lo = per_head ? item % p.Hkv : 0, hk_hi = per_head ? hk_lo + 1 : p.Hkv;
  Scratch& w = scratch();
  size_scratch(p, w, p.Lq, p.Lk, true);
  const int64_t nk = p.Lk, nkp = round_up(std::max<int64_t>(nk, 1), kW);
  const bool k_rows = p.D >= 16;
  const int64_t ldk = round_up(std::max<int64_t>(p.D, 1), kW);
  const float* bias = short_bias(c, w, b, nkp);
  MaskSpec ms;
  ms.bias = bias;
  for (int64_t hk = hk_lo; hk < hk_hi; ++hk) {
    bwd_load_kv<T>(p, w, b, hk, 0, nk, nkp, k_rows, ldk);
    std::fill(w.dkt.begin(), w.dkt.begin() + round_up(p.D, kR) * nkp, 0.f);
    std::fill(w.dvt.begin(), w.dvt.begin() + round_up(p.Dv, kR) * nkp, 0.f);
    for (int64_t h = hk * c.rep; h < (hk + 1) * c.rep; ++h) {
      bwd_load_q(c, w, b, h, 0, p.Lq, out, dout, lse, q_side_of(w));
      std::fill(w.dq.begin(), w.dq.begin() + round_up(p.Lq, kR) * ldk, 0.f);
      bwd_block(c, w, b, h, 0, p.Lq, 0, nk, nkp, ms, true, true, k_rows, ldk, q_side_of(w), k_side_of(w),
                w.dq.data());
      bwd_store_dq(p, w.dq.data(), b, h, 0, p.Lq, ldk, dq);
    }
    const int64_t kv0 = (b * p.Hkv + hk) * p.Lk;
    store_transposed(w.dkt.data(), nkp, nk, p.D, 1.f, dk + kv0 * p.D);
    store_transposed(w.dvt.data(), nkp, nk, p.Dv, 1.f, dv + kv0 * p.Dv);
  }
}

// Flash backward, key-centric pass: item = (b, kv head, k-tile) -> dk, dv of that tile.
template <typename T>
void backward_kv_item(const Ctx& c, int64_t item, const T* out, const T* dout, const float* lse, T* dk, T* dv) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t kt = item % c.nkt, bhk = item / c.nkt, hk = bhk % p.Hkv, b = bhk / p.Hkv;
  const int64_t k0 = kt * kBK, nk = std::min(kBK, p.Lk - k0), nkp = round_up(nk, kW);
  Scratch& w = scratch();
  size_scratch(p, w, kBQ, kBK, true);
  const int64_t ldk = round_up(std::max<int64_t>(p.D, 1), kW);
  std::fill(w.dkt.begin(), w.dkt.begin() + round_up(p.D, kR) * nkp, 0.f);
  std::fill(w.dvt.begin(), w.dvt.begin() + round_up(p.Dv, kR) * nkp, 0.f);
  bool loaded = false;
  for (int64_t h = hk * c.rep; h < (hk + 1) * c.rep; ++h) {
    for (int64_t qt = 0; qt < c.nqt; ++qt) {
      const int64_t q0 = qt * kBQ, nq = std::min(kBQ, p.Lq - q0);
      const TileMask tm = classify(c, b, qt, q0, nq, kt, k0, nk);
      if (tm.skip) continue;
      if (!loaded) {
        bwd_load_kv<T>(p, w, b, hk, k0, nk, nkp, false, ldk);
        loaded = true;
      }
      bwd_load_q(c, w, b, h, q0, nq, out, dout, lse, q_side_of(w));
      MaskSpec ms;
      ms.full = tm.full;
      ms.qrow = c.qrow_of(b) + q0;
      ms.kbit = c.kbit_of(b) + k0;
      ms.q0 = q0;
      ms.k0 = k0;
      ms.causal = p.causal;
      bwd_block(c, w, b, h, q0, nq, k0, nk, nkp, ms, true, false, false, ldk, q_side_of(w), k_side_of(w), nullptr);
    }
  }
  const int64_t kv0 = (b * p.Hkv + hk) * p.Lk + k0;
  store_transposed(w.dkt.data(), nkp, nk, p.D, 1.f, dk + kv0 * p.D);
  store_transposed(w.dvt.data(), nkp, nk, p.Dv, 1.f, dv + kv0 * p.Dv);
}

// Flash backward, query-centric pass: item = (b, h, q-tile) -> dq of that tile.
template <typename T>
void backward_q_item(const Ctx& c, int64_t item, const T* out, const T* dout, const float* lse, T* dq) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t qt = item % c.nqt, bh = item / c.nqt, h = bh % p.Hq, b = bh / p.Hq, hk = h / c.rep;
  const int64_t q0 = qt * kBQ, nq = std::min(kBQ, p.Lq - q0);
  Scratch& w = scratch();
  size_scratch(p, w, kBQ, kBK, true);
  const bool k_rows = p.D >= 16;
  const int64_t ldk = round_up(std::max<int64_t>(p.D, 1), kW);
  std::fill(w.dq.begin(), w.dq.begin() + round_up(nq, kR) * ldk, 0.f);
  bool loaded = false;
  for (int64_t kt = 0; kt < c.nkt; ++kt) {
    const int64_t k0 = kt * kBK, nk = std::min(kBK, p.Lk - k0), nkp = round_up(nk, kW);
    const TileMask tm = classify(c, b, qt, q0, nq, kt, k0, nk);
    if (tm.skip) continue;
    if (!loaded) {
      bwd_load_q(c, w, b, h, q0, nq, out, dout, lse, q_side_of(w));
      loaded = true;
    }
    bwd_load_kv<T>(p, w, b, hk, k0, nk, nkp, k_rows, ldk);
    MaskSpec ms;
    ms.full = tm.full;
    ms.qrow = c.qrow_of(b) + q0;
    ms.kbit = c.kbit_of(b) + k0;
    ms.q0 = q0;
    ms.k0 = k0;
    ms.causal = p.causal;
    bwd_block(c, w, b, h, q0, nq, k0, nk, nkp, ms, false, true, k_rows, ldk, q_side_of(w), k_side_of(w),
              w.dq.data());
  }
  bwd_store_dq(p, w.dq.data(), b, h, q0, nq, ldk, dq);
}

// Flash backward, fused: item = (b, kv head) -> dk, dv of every k-tile and dq of every query
// head that reads it. The q side of each (head, q-tile) is loaded once per item, each k-tile
// once, and dS is used for dK and dQ alike (no second pass that recomputes P and dP). The sums
// run in the same order as the two-pass split (dK / dV of a k-tile over (head, q-tile); dQ of a
// q-tile over the k-tiles in order), so both give the same bits.
template <typename T>
void backward_fused_item(const Ctx& c, int64_t item, const T* out, const T* dout, const float* lse, T* dq, T* dk,
                         T* dv) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t hk = item % p.Hkv, b = item / p.Hkv;
  Scratch& w = scratch();
  size_scratch(p, w, kBQ, kBK, true);
  const bool k_rows = p.D >= 16;
  const int64_t ldk = round_up(std::max<int64_t>(p.D, 1), kW);
  const int64_t D1 = std::max<int64_t>(p.D, 1), Dv1 = std::max<int64_t>(p.Dv, 1);
  const int64_t D4 = round_up(D1, kR), Dv4 = round_up(Dv1, kR);
  const int64_t tq = kBQ * D1 + kBQ * Dv1 + D4 * kBQ + Dv4 * kBQ + 2 * kBQ;  // floats per q-side tile
  const int64_t ntq = c.rep * c.nqt;
  Scratch::grow(w.qpack, ntq * tq);
  Scratch::grow(w.dqall, ntq * kBQ * ldk);
  Scratch::grow(w.qloaded, ntq);
  std::fill(w.qloaded.begin(), w.qloaded.begin() + ntq, 0.f);
  std::fill(w.dqall.begin(), w.dqall.begin() + ntq * kBQ * ldk, 0.f);
  auto q_side = [&](int64_t t) {
    float* base = w.qpack.data() + t * tq;
    QSide Q;
    Q.qs = base;
    Q.dO = Q.qs + kBQ * D1;
    Q.qst = Q.dO + kBQ * Dv1;
    Q.dot_t = Q.qst + D4 * kBQ;
    Q.lse = Q.dot_t + Dv4 * kBQ;
    Q.di = Q.lse + kBQ;
    return Q;
  };
  for (int64_t kt = 0; kt < c.nkt; ++kt) {
    const int64_t k0 = kt * kBK, nk = std::min(kBK, p.Lk - k0), nkp = round_up(nk, kW);
    bool loaded = false;
    for (int64_t hr = 0; hr < c.rep; ++hr) {
      const int64_t h = hk * c.rep + hr;
      for (int64_t qt = 0; qt < c.nqt; ++qt) {
        const int64_t q0 = qt * kBQ, nq = std::min(kBQ, p.Lq - q0);
        const TileMask tm = classify(c, b, qt, q0, nq, kt, k0, nk);
        if (tm.skip) continue;
        if (!loaded) {
          bwd_load_kv<T>(p, w, b, hk, k0, nk, nkp, k_rows, ldk);
          std::fill(w.dkt.begin(), w.dkt.begin() + round_up(p.D, kR) * nkp, 0.f);
          std::fill(w.dvt.begin(), w.dvt.begin() + round_up(p.Dv, kR) * nkp, 0.f);
          loaded = true;
        }
        const int64_t t = hr * c.nqt + qt;
        const QSide Q = q_side(t);
        if (w.qloaded[t] == 0.f) {
          bwd_load_q(c, w, b, h, q0, nq, out, dout, lse, Q);
          w.qloaded[t] = 1.f;
        }
        MaskSpec ms;
        ms.full = tm.full;
        ms.qrow = c.qrow_of(b) + q0;
        ms.kbit = c.kbit_of(b) + k0;
        ms.q0 = q0;
        ms.k0 = k0;
        ms.causal = p.causal;
        bwd_block(c, w, b, h, q0, nq, k0, nk, nkp, ms, true, true, k_rows, ldk, Q, k_side_of(w),
                  w.dqall.data() + t * kBQ * ldk);
      }
    }
    const int64_t kv0 = (b * p.Hkv + hk) * p.Lk + k0;
    if (loaded) {
      store_transposed(w.dkt.data(), nkp, nk, p.D, 1.f, dk + kv0 * p.D);
      store_transposed(w.dvt.data(), nkp, nk, p.Dv, 1.f, dv + kv0 * p.Dv);
    } else {  // no query reads this k-tile
      const T zero = from_float<T>(0.f);
      std::fill(dk + kv0 * p.D, dk + (kv0 + nk) * p.D, zero);
      std::fill(dv + kv0 * p.Dv, dv + (kv0 + nk) * p.Dv, zero);
    }
  }
  for (int64_t hr = 0; hr < c.rep; ++hr)
    for (int64_t qt = 0; qt < c.nqt; ++qt) {
      const int64_t q0 = qt * kBQ, nq = std::min(kBQ, p.Lq - q0);
      bwd_store_dq(p, w.dqall.data() + (hr * c.nqt + qt) * kBQ * ldk, b, hk * c.rep + hr, q0, nq, ldk, dq);
    }
}

#define PYOPS_TA_BACKWARD(T)                                                                            \
  template void backward_short_item<T>(const Ctx&, int64_t, bool, const T*, const T*, const float*, T*, T*, T*); \
  template void backward_kv_item<T>(const Ctx&, int64_t, const T*, const T*, const float*, T*, T*);              \
  template void backward_q_item<T>(const Ctx&, int64_t, const T*, const T*, const float*, T*);                   \
  template void backward_fused_item<T>(const Ctx&, int64_t, const T*, const T*, const float*, T*, T*, T*);
PYOPS_TA_BACKWARD(float)
PYOPS_TA_BACKWARD(half_bits)
PYOPS_TA_BACKWARD(bf16_bits)
#undef PYOPS_TA_BACKWARD

}  // namespace task_attention_impl
}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
