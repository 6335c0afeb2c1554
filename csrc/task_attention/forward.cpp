// Task-masked attention forward on the row kernels, one translation unit per ISA (see
// CMakeLists.txt): the flash path (64 x 64 tiles over the packed K / V, online softmax) and the
// short path's whole-block rows for head dims above kLaneMaxDim. The choice between the paths is
// in task_attention.cpp.
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

// ---- forward ----------------------------------------------------------------------------------

#ifdef PYOPS_TA_AVX512
// The online-softmax step of fwd_block for kR = 4 full rows at once (no dropout): the rows'
// dependency chains (max, exp, sum) interleave instead of running one after the other. Each row
// gets the same operations as the one-row path (exact max; fexp16 = fexp8 element-wise; the
// eight-lane sums in the same order). Returns false, changing nothing, when a row has nothing
// allowed so far (the caller then takes the one-row path).
__attribute__((target("avx512f"))) static bool softmax4_512(float* S, int64_t nkp, float* m, float* l, float* acc,
                                                            int64_t ldv) {
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  __m512 mx[4] = {ninf, ninf, ninf, ninf};
  for (int64_t j = 0; j < nkp; j += 16) {
    const __mmask16 k = j + 16 <= nkp ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
    for (int r = 0; r < 4; ++r) mx[r] = _mm512_max_ps(mx[r], _mm512_mask_loadu_ps(ninf, k, S + r * nkp + j));
  }
  float mnew[4];
  for (int r = 0; r < 4; ++r) {
    const float x = _mm512_reduce_max_ps(mx[r]);
    mnew[r] = x > m[r] ? x : m[r];
    if (mnew[r] == kNegInf) return false;
  }
  __m512 mv[4];
  __m256 ls[4];
  for (int r = 0; r < 4; ++r) {
    mv[r] = _mm512_set1_ps(mnew[r]);
    ls[r] = _mm256_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 16 <= nkp; j += 16)
    for (int r = 0; r < 4; ++r) {
      float* s = S + r * nkp + j;
      const __m512 e = fexp16(_mm512_sub_ps(_mm512_loadu_ps(s), mv[r]));
      _mm512_storeu_ps(s, e);
      ls[r] = _mm256_add_ps(ls[r], _mm512_castps512_ps256(e));
      ls[r] = _mm256_add_ps(ls[r], _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
    }
  if (j < nkp)
    for (int r = 0; r < 4; ++r) {
      float* s = S + r * nkp + j;
      const __m512 e = fexp16(_mm512_sub_ps(_mm512_maskz_loadu_ps((__mmask16)0x00FF, s), mv[r]));
      _mm512_mask_storeu_ps(s, (__mmask16)0x00FF, e);
      ls[r] = _mm256_add_ps(ls[r], _mm512_castps512_ps256(e));
    }
  for (int r = 0; r < 4; ++r) {
    alignas(32) float t[kW];
    _mm256_store_ps(t, ls[r]);
    const float rowsum = hsum(t);
    const float alpha = m[r] == kNegInf ? 0.f : fexp(m[r] - mnew[r]);
    l[r] = l[r] * alpha + rowsum;
    m[r] = mnew[r];
    if (alpha != 1.f) {
      float* a = acc + r * ldv;
      const __m512 av = _mm512_set1_ps(alpha);
      for (int64_t t2 = 0; t2 < ldv; t2 += 16) {
        const __mmask16 k = t2 + 16 <= ldv ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
        _mm512_mask_storeu_ps(a + t2, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, a + t2), av));
      }
    }
  }
  return true;
}
#endif


// One (q-tile, k-tile) step of the online softmax for query rows [0, nq) of the tile held in w.qs
// (pre-scaled, rows padded to kR): updates w.m, w.l and w.acc (rows of ldv floats).
void fwd_block(const Ctx& c, Scratch& w, int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t k0,
               int64_t nk, int64_t nkp, const MaskSpec& mask, bool v_rows, int64_t ldv, const float* Kt,
               const float* Vr, const float* Vt) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t D = p.D, Dv = p.Dv;
  float* S = w.s.data();
  float* ks = w.ks.data();
  for (int64_t r0 = 0; r0 < nq; r0 += kR) {
    gemm_rows_t(w.qs.data() + r0 * D, D, D, Kt, nkp, S);
    const int64_t nr = std::min(kR, nq - r0);
    for (int64_t r = 0; r < nr; ++r) mask.apply(r0 + r, S + r * nkp, nk, nkp);
#ifdef PYOPS_TA_AVX512
    const bool rows_done = g_avx512 && !c.dropout && nr == kR &&
                           softmax4_512(S, nkp, w.m.data() + r0, w.l.data() + r0, w.acc.data() + r0 * ldv, ldv);
#else
    const bool rows_done = false;
#endif
    for (int64_t r = 0; r < kR && !rows_done; ++r) {
      float* s = S + r * nkp;
      const int64_t i = r0 + r;
      if (r >= nr) {
        std::fill(s, s + nkp, 0.f);
        continue;
      }
      const float mx = max8(s, nkp);
      const float mold = w.m[i];
      const float mnew = mx > mold ? mx : mold;
      if (mnew == kNegInf) {  // nothing allowed in this row so far
        std::fill(s, s + nkp, 0.f);
        continue;
      }
      const float rowsum = exp_sub_sum(s, mnew, nkp);
      const float alpha = mold == kNegInf ? 0.f : fexp(mold - mnew);
      w.l[i] = w.l[i] * alpha + rowsum;
      w.m[i] = mnew;
      if (alpha != 1.f) {
        float* a = w.acc.data() + i * ldv;
        for (int64_t t = 0; t < ldv; ++t) a[t] *= alpha;
      }
      if (c.dropout) {
        c.keep_row(b, h, q0 + i, k0, nk, nkp, ks);
        for (int64_t j = 0; j < nkp; ++j) s[j] *= ks[j];
      }
    }
    float* acc = w.acc.data() + r0 * ldv;
    if (v_rows) {
      gemm_rows_acc(S, nkp, nk, Vr, ldv, acc);
    } else {
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t cc = 0; cc < Dv; ++cc) acc[r * ldv + cc] += dot8(S + r * nkp, Vt + cc * nkp, nkp);
    }
  }
}

// Writes out rows [q0, q0 + nq) and their lse from w.acc / w.l.
template <typename T>
void fwd_finish(const Ctx& c, Scratch& w, int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t ldv, T* out,
                float* lse) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t row0 = (b * p.Hq + h) * p.Lq + q0;
  float* tmp = w.s2.data();
  for (int64_t i = 0; i < nq; ++i) {
    const float l = w.l[i];
    const float* a = w.acc.data() + i * ldv;
    if (l > 0.f) {
      const float inv = 1.f / l;
      for (int64_t t = 0; t < p.Dv; ++t) tmp[t] = a[t] * inv;
      lse[row0 + i] = w.m[i] + std::log(l);
    } else {
      for (int64_t t = 0; t < p.Dv; ++t) tmp[t] = 0.f;
      lse[row0 + i] = kNegInf;
    }
    store_row(tmp, out + (row0 + i) * p.Dv, p.Dv);
  }
}

}  // namespace

template <typename T>
void pack_kv_tile(const Ctx& c, int64_t ti, bool v_rows, int64_t ldv, KVPack& pk) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t kt = ti % c.nkt, bhk = ti / c.nkt;
  const int64_t k0 = kt * kBK, nk = std::min(kBK, p.Lk - k0), nkp = round_up(nk, kW);
  const T* k = static_cast<const T*>(p.k) + (bhk * p.Lk + k0) * p.D;
  const T* v = static_cast<const T*>(p.v) + (bhk * p.Lk + k0) * p.Dv;
  load_transposed(k, nk, p.D, pk.k.get() + ti * pk.kst, nkp);
  if (v_rows)
    load_rows_padded(v, nk, p.Dv, pk.v.get() + ti * pk.vst, ldv);
  else
    load_transposed(v, nk, p.Dv, pk.v.get() + ti * pk.vst, nkp);
}

template <typename T>
void forward_flash_item(const Ctx& c, int64_t item, const KVPack& pk, T* out, float* lse) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t qt = item % c.nqt, bh = item / c.nqt, h = bh % p.Hq, b = bh / p.Hq, hk = h / c.rep;
  const int64_t q0 = qt * kBQ, nq = std::min(kBQ, p.Lq - q0);
  Scratch& w = scratch();
  size_scratch(p, w, kBQ, kBK, false);
  const bool v_rows = p.Dv >= 16;
  const int64_t ldv = round_up(std::max<int64_t>(p.Dv, 1), kW);
  std::fill(w.m.begin(), w.m.begin() + nq, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + nq, 0.f);
  std::fill(w.acc.begin(), w.acc.begin() + round_up(nq, kR) * ldv, 0.f);
  const T* q = static_cast<const T*>(p.q) + ((b * p.Hq + h) * p.Lq + q0) * p.D;
  bool loaded_q = false;
  for (int64_t kt = 0; kt < c.nkt; ++kt) {
    const int64_t k0 = kt * kBK, nk = std::min(kBK, p.Lk - k0), nkp = round_up(nk, kW);
    const TileMask tm = classify(c, b, qt, q0, nq, kt, k0, nk);
    if (tm.skip) continue;
    if (!loaded_q) {
      load_rows(q, nq, p.D, p.scale, w.qs.data(), round_up(nq, kR));
      loaded_q = true;
    }
    const int64_t ti = (b * p.Hkv + hk) * c.nkt + kt;
    const float* Kt = pk.k.get() + ti * pk.kst;
    const float* Vp = pk.v.get() + ti * pk.vst;
    MaskSpec ms;
    ms.full = tm.full;
    ms.qrow = c.qrow_of(b) + q0;
    ms.kbit = c.kbit_of(b) + k0;
    ms.q0 = q0;
    ms.k0 = k0;
    ms.causal = p.causal;
    fwd_block(c, w, b, h, q0, nq, k0, nk, nkp, ms, v_rows, ldv, Kt, Vp, Vp);
  }
  fwd_finish(c, w, b, h, q0, nq, ldv, out, lse);
}

// Short path: item = batch row b (all heads) or (b, kv head) when the batch is small.
template <typename T>
void forward_short_item(const Ctx& c, int64_t item, bool per_head, T* out, float* lse) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t b = per_head ? item / p.Hkv : item;
  const int64_t hk_lo = per_head ? item % p.Hkv : 0, hk_hi = per_head ? hk_lo + 1 : p.Hkv;
  Scratch& w = scratch();
  size_scratch(p, w, p.Lq, p.Lk, false);
  const int64_t nk = p.Lk, nkp = round_up(std::max<int64_t>(nk, 1), kW);
  const bool v_rows = p.Dv >= 16;
  const int64_t ldv = round_up(std::max<int64_t>(p.Dv, 1), kW);
  const float* bias = short_bias(c, w, b, nkp);
  MaskSpec ms;
  ms.bias = bias;
  for (int64_t hk = hk_lo; hk < hk_hi; ++hk) {
    const T* k = static_cast<const T*>(p.k) + (b * p.Hkv + hk) * p.Lk * p.D;
    const T* v = static_cast<const T*>(p.v) + (b * p.Hkv + hk) * p.Lk * p.Dv;
    load_transposed(k, nk, p.D, w.kt.data(), nkp);
    if (v_rows)
      load_rows_padded(v, nk, p.Dv, w.vr.data(), ldv);
    else
      load_transposed(v, nk, p.Dv, w.vt.data(), nkp);
    for (int64_t h = hk * c.rep; h < (hk + 1) * c.rep; ++h) {
      const T* q = static_cast<const T*>(p.q) + (b * p.Hq + h) * p.Lq * p.D;
      load_rows(q, p.Lq, p.D, p.scale, w.qs.data(), round_up(p.Lq, kR));
      std::fill(w.m.begin(), w.m.begin() + p.Lq, kNegInf);
      std::fill(w.l.begin(), w.l.begin() + p.Lq, 0.f);
      std::fill(w.acc.begin(), w.acc.begin() + round_up(p.Lq, kR) * ldv, 0.f);
      fwd_block(c, w, b, h, 0, p.Lq, 0, nk, nkp, ms, v_rows, ldv, w.kt.data(), w.vr.data(), w.vt.data());
      fwd_finish(c, w, b, h, 0, p.Lq, ldv, out, lse);
    }
  }
}

#define PYOPS_TA_FORWARD(T)                                                            \
  template void pack_kv_tile<T>(const Ctx&, int64_t, bool, int64_t, KVPack&);          \
  template void forward_flash_item<T>(const Ctx&, int64_t, const KVPack&, T*, float*); \
  template void forward_short_item<T>(const Ctx&, int64_t, bool, T*, float*);
PYOPS_TA_FORWARD(float)
PYOPS_TA_FORWARD(half_bits)
PYOPS_TA_FORWARD(bf16_bits)
#undef PYOPS_TA_FORWARD

}  // namespace task_attention_impl
}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
