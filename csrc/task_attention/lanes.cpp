// Task-masked attention on the query-lane kernels, one translation unit per ISA (see
// CMakeLists.txt): the short path for head dims up to kLaneMaxDim, forward and backward, eight
// query rows per vector (sixteen rows, or sixteen keys in the backward, where AVX-512 is chosen
// at run time). The choice between the paths is in task_attention.cpp.
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

// ---- short path, query-lane kernels (small head dims) -------------------------------------------
//
// For head dims up to kLaneMaxDim (MultiTab-Net: 4-16) the row kernels (forward.cpp, backward.cpp)
// spend most of their time on per-row overhead (horizontal sums, scalar bookkeeping). Here eight query rows ride in
// the eight lanes of a vector instead: a key j costs D + Dv lane-wise FMAs with K[j, :] and V[j, :]
// broadcast, and no reduction crosses lanes until a row block is done. dK and dV are accumulated
// per lane ([Lk, D, 8]) and summed over the lanes once per (batch row, kv head), in a fixed order.

namespace {

// Transposed bias for the lane kernels: [nblk, Lk, lanes] of 0 / -inf, row i = blk * lanes + t at
// [blk, j, t] (rows past Lq: -inf), so a key's bias for a block of rows is one vector load;
// cached per thread and call like short_bias (one layout per call).
const float* short_bias_lanes(const Ctx& c, Scratch& w, int64_t b, int64_t lanes, int64_t nblk) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t row = c.qgr(b) * (p.B + 1) + c.kgr(b);
  if (w.bias_call == c.call_id && w.bias_row == row) return w.bias.data();
  Scratch::grow(w.bias, std::max<int64_t>(nblk * p.Lk * lanes, 1));
  const uint64_t* qr = c.qrow_of(b);
  const uint64_t* kb = c.kbit_of(b);
  for (int64_t blk = 0; blk < nblk; ++blk)
    for (int64_t j = 0; j < p.Lk; ++j)
      for (int64_t t = 0; t < lanes; ++t) {
        const int64_t i = blk * lanes + t;
        const bool ok = i < p.Lq && (qr[i] & kb[j]) != 0 && (!p.causal || j <= i);
        w.bias[(blk * p.Lk + j) * lanes + t] = ok ? 0.f : kNegInf;
      }
  w.bias_call = c.call_id;
  w.bias_row = row;
  return w.bias.data();
}

// The eight-lane layout's blocks, an even count: the forward reads them in pairs.
inline int64_t lane_blocks8(const TaskAttentionProblem& p) { return round_up((p.Lq + kW - 1) / kW, 2); }

// Dropout scales of rows i0..i0+7 (lanes) at key j.
inline V8 keep_lanes(const Ctx& c, int64_t b, int64_t h, int64_t i0, int64_t j) {
  alignas(32) float ks[kW];
  const uint32_t c2 = (uint32_t)(b * c.p->Hq + h);
  for (int t = 0; t < kW; ++t) {
    const Philox4 r = philox4x32_10((uint32_t)j, (uint32_t)(i0 + t), c2, kDropoutStream, c.seed_lo, c.seed_hi);
    ks[t] = philox_uniform(r.v[0]) >= c.p->dropout_p ? c.keep_scale : 0.f;
  }
  return vload(ks);
}

// Lanes t < n of rows i0 + t of a [L, W] array, transposed to dst[w][t] (times scale; zero lanes
// past n).
template <typename T>
void load_lanes(const T* src, int64_t n, int64_t W, float scale, float* dst) {
  if (n == kW) {
    for (int64_t t = 0; t < kW; ++t)
      for (int64_t d = 0; d < W; ++d) dst[d * kW + t] = scale * to_float(src[t * W + d]);
    return;
  }
  for (int64_t d = 0; d < W; ++d)
    for (int64_t t = 0; t < kW; ++t) dst[d * kW + t] = t < n ? scale * to_float(src[t * W + d]) : 0.f;
}

}  // namespace


// DT / DVT: compile-time head dims (0: use p.D / p.Dv). Sixteen query rows per block (two
// vectors) share every broadcast of K[j, :] and V[j, :].
template <int DT, int DVT, typename T>
void forward_lanes_item(const Ctx& c, int64_t item, bool per_head, T* out, float* lse) {
  constexpr int64_t kRows = 2 * kW;
  const TaskAttentionProblem& p = *c.p;
  const int64_t D = DT ? DT : p.D, Dv = DVT ? DVT : p.Dv, Lq = p.Lq, Lk = p.Lk;
  const int64_t b = per_head ? item / p.Hkv : item;
  const int64_t hk_lo = per_head ? item % p.Hkv : 0, hk_hi = per_head ? hk_lo + 1 : p.Hkv;
  Scratch& w = scratch();
  Scratch::grow(w.s, std::max<int64_t>(Lk, 1) * kRows);
  Scratch::grow(w.kr, std::max<int64_t>(Lk * D, 1));
  Scratch::grow(w.vr, std::max<int64_t>(Lk * Dv, 1));
  Scratch::grow(w.acc, kRows * (kLaneMaxDim + 2));
  const float* biasT = short_bias_lanes(c, w, b, kW, lane_blocks8(p));
  float* S = w.s.data();
  alignas(32) float qt[2][kLaneMaxDim * kW];
  alignas(32) float tmp[kLaneMaxDim];
  for (int64_t hk = hk_lo; hk < hk_hi; ++hk) {
    const T* k = static_cast<const T*>(p.k) + (b * p.Hkv + hk) * Lk * D;
    const T* v = static_cast<const T*>(p.v) + (b * p.Hkv + hk) * Lk * Dv;
    const float* K = as_float_tile(k, w.kr.data(), Lk * D);
    const float* V = as_float_tile(v, w.vr.data(), Lk * Dv);
    for (int64_t h = hk * c.rep; h < (hk + 1) * c.rep; ++h) {
      const T* q = static_cast<const T*>(p.q) + (b * p.Hq + h) * Lq * D;
      const int64_t row0 = (b * p.Hq + h) * Lq;
      for (int64_t i0 = 0; i0 < Lq; i0 += kRows) {
        const int64_t nr = std::min<int64_t>(kRows, Lq - i0);
        load_lanes(q + i0 * D, std::min<int64_t>(nr, kW), D, p.scale, qt[0]);
        load_lanes(q + (i0 + kW) * D, std::max<int64_t>(nr - kW, 0), D, p.scale, qt[1]);
        const float* bt0 = biasT + (i0 / kW) * Lk * kW;
        const float* bt1 = bt0 + Lk * kW;
        V8 m0 = vset(kNegInf), m1 = vset(kNegInf);
        for (int64_t j = 0; j < Lk; ++j) {
          V8 s0 = vload(bt0 + j * kW), s1 = vload(bt1 + j * kW);
          const float* kj = K + j * D;
          for (int64_t d = 0; d < D; ++d) {
            const V8 kd = vset(kj[d]);
            s0 = vfma(vload(qt[0] + d * kW), kd, s0);
            s1 = vfma(vload(qt[1] + d * kW), kd, s1);
          }
          vstore(S + j * kRows, s0);
          vstore(S + j * kRows + kW, s1);
          m0 = vmax(m0, s0);
          m1 = vmax(m1, s1);
        }
        alignas(32) float mv[kRows];
        vstore(mv, m0);
        vstore(mv + kW, m1);
        for (int64_t t = 0; t < kRows; ++t) mv[t] = mv[t] == kNegInf ? 0.f : mv[t];  // empty rows: p = 0
        const V8 ms0 = vload(mv), ms1 = vload(mv + kW);
        V8 l0 = vset(0.f), l1 = vset(0.f);
        V8 acc0[DVT ? DVT : kLaneMaxDim], acc1[DVT ? DVT : kLaneMaxDim];
        for (int64_t cc = 0; cc < Dv; ++cc) acc0[cc] = acc1[cc] = vset(0.f);
        for (int64_t j = 0; j < Lk; ++j) {
          V8 p0 = vexp(vsub(vload(S + j * kRows), ms0));
          V8 p1 = vexp(vsub(vload(S + j * kRows + kW), ms1));
          l0 = vadd(l0, p0);
          l1 = vadd(l1, p1);
          if (c.dropout) {
            p0 = vmul(p0, keep_lanes(c, b, h, i0, j));
            p1 = vmul(p1, keep_lanes(c, b, h, i0 + kW, j));
          }
          const float* vj = V + j * Dv;
          for (int64_t cc = 0; cc < Dv; ++cc) {
            const V8 vc = vset(vj[cc]);
            acc0[cc] = vfma(p0, vc, acc0[cc]);
            acc1[cc] = vfma(p1, vc, acc1[cc]);
          }
        }
        alignas(32) float lv[kRows], lrow[kRows];
        float* av = w.acc.data();
        vstore(lrow, l0);
        vstore(lrow + kW, l1);
        for (int64_t t = 0; t < kRows; ++t) lv[t] = lrow[t];
        for (int64_t cc = 0; cc < Dv; ++cc) {
          vstore(av + cc * kRows, acc0[cc]);
          vstore(av + cc * kRows + kW, acc1[cc]);
        }
        alignas(32) float logl[kRows];
        for (int64_t t = 0; t < kRows; ++t) lv[t] = lv[t] > 0.f ? lv[t] : 1.f;  // empty rows: no log of 0
        for (int64_t t = 0; t < kRows; t += kW) log_lanes(lv + t, logl + t);
        for (int64_t t = 0; t < nr; ++t) {
          if (lrow[t] > 0.f) {
            const float inv = 1.f / lrow[t];
            for (int64_t cc = 0; cc < Dv; ++cc) tmp[cc] = av[cc * kRows + t] * inv;
            lse[row0 + i0 + t] = mv[t] + logl[t];
          } else {
            for (int64_t cc = 0; cc < Dv; ++cc) tmp[cc] = 0.f;
            lse[row0 + i0 + t] = kNegInf;
          }
          store_row(tmp, out + (row0 + i0 + t) * Dv, Dv);
        }
      }
    }
  }
}

template <int DT, int DVT, typename T>
void backward_lanes_item(const Ctx& c, int64_t item, bool per_head, const T* out, const T* dout,
                         const float* lse, T* dq, T* dk, T* dv) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t D = DT ? DT : p.D, Dv = DVT ? DVT : p.Dv, Lq = p.Lq, Lk = p.Lk;
  const int64_t b = per_head ? item / p.Hkv : item;
  const int64_t hk_lo = per_head ? item % p.Hkv : 0, hk_hi = per_head ? hk_lo + 1 : p.Hkv;
  Scratch& w = scratch();
  Scratch::grow(w.kr, std::max<int64_t>(Lk * D, 1));
  Scratch::grow(w.vr, std::max<int64_t>(Lk * Dv, 1));
  Scratch::grow(w.dkt, std::max<int64_t>(Lk * D * kW, 1));
  Scratch::grow(w.dvt, std::max<int64_t>(Lk * Dv * kW, 1));
  Scratch::grow(w.acc, std::max<int64_t>(Dv, 1));
  Scratch::grow(w.dO, std::max<int64_t>(Lk * std::max(D, Dv), 1));
  const float* biasT = short_bias_lanes(c, w, b, kW, lane_blocks8(p));  // (dO: the lane sums of dK / dV)
  alignas(32) float qt[kLaneMaxDim * kW];
  alignas(32) float dot[kLaneMaxDim * kW];
  alignas(32) float tmp[kLaneMaxDim];
  for (int64_t hk = hk_lo; hk < hk_hi; ++hk) {
    const T* k = static_cast<const T*>(p.k) + (b * p.Hkv + hk) * Lk * D;
    const T* v = static_cast<const T*>(p.v) + (b * p.Hkv + hk) * Lk * Dv;
    const float* K = as_float_tile(k, w.kr.data(), Lk * D);
    const float* V = as_float_tile(v, w.vr.data(), Lk * Dv);
    float* dKp = w.dkt.data();
    float* dVp = w.dvt.data();
    std::memset(dKp, 0, sizeof(float) * Lk * D * kW);
    std::memset(dVp, 0, sizeof(float) * Lk * Dv * kW);
    for (int64_t h = hk * c.rep; h < (hk + 1) * c.rep; ++h) {
      const int64_t row0 = (b * p.Hq + h) * Lq;
      const T* q = static_cast<const T*>(p.q) + row0 * D;
      for (int64_t i0 = 0; i0 < Lq; i0 += kW) {
        const int64_t nr = std::min<int64_t>(kW, Lq - i0);
        load_lanes(q + i0 * D, nr, D, p.scale, qt);
        load_lanes(dout + (row0 + i0) * Dv, nr, Dv, 1.f, dot);
        alignas(32) float lsev[kW], div[kW];
        for (int64_t t = 0; t < kW; ++t) {
          const float x = t < nr ? lse[row0 + i0 + t] : kNegInf;
          lsev[t] = x == kNegInf ? std::numeric_limits<float>::infinity() : x;  // p = exp(s - inf) = 0
          float di = 0.f;
          if (t < nr) {
            const float* o = as_float_tile(out + (row0 + i0 + t) * Dv, w.acc.data(), Dv);
            for (int64_t cc = 0; cc < Dv; ++cc) di += dot[cc * kW + t] * o[cc];
          }
          div[t] = di;
        }
        const V8 lsv = vload(lsev), Di = vload(div);
        const float* bt = biasT + (i0 / kW) * Lk * kW;
        V8 dqa[DT ? DT : kLaneMaxDim];
        for (int64_t d = 0; d < D; ++d) dqa[d] = vset(0.f);
        for (int64_t j = 0; j < Lk; ++j) {
          const float* kj = K + j * D;
          const float* vj = V + j * Dv;
          V8 s = vload(bt + j * kW);
          for (int64_t d = 0; d < D; ++d) s = vfma(vload(qt + d * kW), vset(kj[d]), s);
          const V8 pj = vexp(vsub(s, lsv));
          V8 dp = vset(0.f);
          for (int64_t cc = 0; cc < Dv; ++cc) dp = vfma(vload(dot + cc * kW), vset(vj[cc]), dp);
          V8 pd = pj;
          if (c.dropout) {
            const V8 ks = keep_lanes(c, b, h, i0, j);
            dp = vmul(dp, ks);
            pd = vmul(pj, ks);
          }
          const V8 ds = vmul(pj, vsub(dp, Di));
          float* dkj = dKp + j * D * kW;
          for (int64_t d = 0; d < D; ++d) {
            dqa[d] = vfma(ds, vset(kj[d]), dqa[d]);
            vstore(dkj + d * kW, vfma(ds, vload(qt + d * kW), vload(dkj + d * kW)));
          }
          float* dvj = dVp + j * Dv * kW;
          for (int64_t cc = 0; cc < Dv; ++cc)
            vstore(dvj + cc * kW, vfma(pd, vload(dot + cc * kW), vload(dvj + cc * kW)));
        }
        alignas(32) float dqv[kLaneMaxDim * kW];
        for (int64_t d = 0; d < D; ++d) vstore(dqv + d * kW, dqa[d]);
        for (int64_t t = 0; t < nr; ++t) {
          for (int64_t d = 0; d < D; ++d) tmp[d] = p.scale * dqv[d * kW + t];
          store_row(tmp, dq + (row0 + i0 + t) * D, D);
        }
      }
    }
    // Sum the lanes: dk[j, d] = sum_t dKp[j, d, t] (dK already carries the scale through Qs).
    const int64_t kv0 = (b * p.Hkv + hk) * Lk;
    float* red = w.dO.data();
    lane_sums(dKp, Lk * D, red);
    store_row(red, dk + kv0 * D, Lk * D);
    lane_sums(dVp, Lk * Dv, red);
    store_row(red, dv + kv0 * Dv, Lk * Dv);
  }
}

#ifdef PYOPS_TA_AVX512
// Four columns a, b, c, e of sixteen rows, stored as the first n rows of a row-major [16, 4] block
// (a 4 x 16 transpose in registers: in-lane unpacks, then 128-bit blocks; no scatter).
__attribute__((target("avx512f"))) static inline void store_rows4x16(float* dst, int64_t n, __m512 a, __m512 b,
                                                                      __m512 c, __m512 e) {
  const __m512 t0 = _mm512_unpacklo_ps(a, b), t1 = _mm512_unpackhi_ps(a, b);
  const __m512 t2 = _mm512_unpacklo_ps(c, e), t3 = _mm512_unpackhi_ps(c, e);
  const __m512 u0 = _mm512_shuffle_ps(t0, t2, 0x44), u1 = _mm512_shuffle_ps(t0, t2, 0xEE);  // rows 4k, 4k+1
  const __m512 u2 = _mm512_shuffle_ps(t1, t3, 0x44), u3 = _mm512_shuffle_ps(t1, t3, 0xEE);  // rows 4k+2, 4k+3
  const __m512 v0 = _mm512_shuffle_f32x4(u0, u1, 0x44), v1 = _mm512_shuffle_f32x4(u2, u3, 0x44);
  const __m512 v2 = _mm512_shuffle_f32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_f32x4(u2, u3, 0xEE);
  const __m512 out[4] = {_mm512_shuffle_f32x4(v0, v1, 0x88), _mm512_shuffle_f32x4(v0, v1, 0xDD),
                         _mm512_shuffle_f32x4(v2, v3, 0x88), _mm512_shuffle_f32x4(v2, v3, 0xDD)};
  for (int k = 0; k < 4; ++k) {
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(16, 4 * n - 16 * k));  // floats of rows < n
    if (valid == 0) break;
    _mm512_mask_storeu_ps(dst + 16 * k, (__mmask16)((1u << valid) - 1u), out[k]);
  }
}

// forward_lanes_item with the sixteen rows of a block in one AVX-512 vector (fp32, no dropout,
// compile-time D == Dv): every lane takes the same steps in the same order, so the same bits.
template <int DD>
__attribute__((target("avx512f"))) void forward_lanes16_item(const Ctx& c, int64_t item, bool per_head, float* out,
                                                              float* lse) {
  constexpr int64_t kRows = 2 * kW;
  const TaskAttentionProblem& p = *c.p;
  const int64_t Lq = p.Lq, Lk = p.Lk;
  const int64_t b = per_head ? item / p.Hkv : item;
  const int64_t hk_lo = per_head ? item % p.Hkv : 0, hk_hi = per_head ? hk_lo + 1 : p.Hkv;
  Scratch& w = scratch();
  Scratch::grow(w.s, std::max<int64_t>(Lk, 1) * kRows);
  Scratch::grow(w.acc, kRows * (kLaneMaxDim + 2));
  const float* bias16 = short_bias_lanes(c, w, b, kRows, (Lq + kRows - 1) / kRows);
  float* S = w.s.data();
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(DD));
  for (int64_t hk = hk_lo; hk < hk_hi; ++hk) {
    const float* K = static_cast<const float*>(p.k) + (b * p.Hkv + hk) * Lk * DD;
    const float* V = static_cast<const float*>(p.v) + (b * p.Hkv + hk) * Lk * DD;
    for (int64_t h = hk * c.rep; h < (hk + 1) * c.rep; ++h) {
      const float* q = static_cast<const float*>(p.q) + (b * p.Hq + h) * Lq * DD;
      const int64_t row0 = (b * p.Hq + h) * Lq;
      for (int64_t i0 = 0; i0 < Lq; i0 += kRows) {
        const int64_t nr = std::min<int64_t>(kRows, Lq - i0);
        const __mmask16 live = (__mmask16)((1u << nr) - 1u);
        const float* bt = bias16 + (i0 / kRows) * Lk * kRows;
        __m512 Q[DD];
        for (int d = 0; d < DD; ++d)  // lanes past Lq: 0, as load_lanes
          Q[d] = _mm512_mul_ps(_mm512_set1_ps(p.scale),
                               _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live,
                                                        _mm512_add_epi32(idx, _mm512_set1_epi32(d)), q + i0 * DD, 4));
        __m512 m = _mm512_set1_ps(kNegInf);
        for (int64_t j = 0; j < Lk; ++j) {
          __m512 s = _mm512_loadu_ps(bt + j * kRows);
          const float* kj = K + j * DD;
          for (int d = 0; d < DD; ++d) s = _mm512_fmadd_ps(Q[d], _mm512_set1_ps(kj[d]), s);
          _mm512_storeu_ps(S + j * kRows, s);
          m = _mm512_max_ps(m, s);
        }
        alignas(64) float mv[kRows];
        _mm512_store_ps(mv, m);
        for (int64_t t = 0; t < kRows; ++t) mv[t] = mv[t] == kNegInf ? 0.f : mv[t];  // empty rows: p = 0
        const __m512 ms = _mm512_load_ps(mv);
        __m512 l = _mm512_setzero_ps();
        __m512 acc[DD];
        for (int cc = 0; cc < DD; ++cc) acc[cc] = _mm512_setzero_ps();
        for (int64_t j = 0; j < Lk; ++j) {
          const __m512 pj = fexp16_short(_mm512_sub_ps(_mm512_loadu_ps(S + j * kRows), ms));
          l = _mm512_add_ps(l, pj);
          const float* vj = V + j * DD;
          for (int cc = 0; cc < DD; ++cc) acc[cc] = _mm512_fmadd_ps(pj, _mm512_set1_ps(vj[cc]), acc[cc]);
        }
        // 1 / l and the products lane-wise (IEEE division and product: the scalar epilogue's bits).
        alignas(64) float lv[kRows], logl[kRows];
        const __mmask16 nz = _mm512_cmp_ps_mask(l, _mm512_setzero_ps(), _CMP_GT_OQ);
        _mm512_store_ps(lv, _mm512_mask_blend_ps(nz, _mm512_set1_ps(1.f), l));  // empty rows: no log of 0
        for (int64_t t = 0; t < kRows; t += kW) log_lanes(lv + t, logl + t);
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_load_ps(lv));
        if constexpr (DD == 4) {  // an in-register transpose and contiguous stores, not four scatters
          store_rows4x16(out + (row0 + i0) * DD, nr, _mm512_maskz_mul_ps(nz, acc[0], inv),
                         _mm512_maskz_mul_ps(nz, acc[1], inv), _mm512_maskz_mul_ps(nz, acc[2], inv),
                         _mm512_maskz_mul_ps(nz, acc[3], inv));
        } else {
          for (int cc = 0; cc < DD; ++cc)
            _mm512_mask_i32scatter_ps(out + (row0 + i0) * DD, live, _mm512_add_epi32(idx, _mm512_set1_epi32(cc)),
                                      _mm512_maskz_mul_ps(nz, acc[cc], inv), 4);
        }
        _mm512_mask_storeu_ps(lse + row0 + i0, live,
                              _mm512_mask_blend_ps(nz, _mm512_set1_ps(kNegInf),
                                                   _mm512_add_ps(ms, _mm512_load_ps(logl))));
      }
    }
  }
}
#endif

#ifdef PYOPS_TA_AVX512
// The lane sums of four sixteen-lane vectors a, b, c, d, in lanes 0..3 of the result (a fixed
// tree: 128-bit halves, then quarters, then within each quarter).
__attribute__((target("avx512f"))) static inline __m128 sum4x16(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4E));
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));
  return _mm512_castps512_ps128(_mm512_maskz_compress_ps((__mmask16)0x1111, x));
}

// AVX-512 short-path backward for fp32, no dropout, compile-time D == Dv in {4, 8}: sixteen KEYS
// per vector. A query row's q, dO, lse and D_i are broadcast; dK and dV accumulate lane-wise in
// registers over all the rows (and all the query heads of the kv head), so no reduction crosses
// lanes for them; dQ of a row is the one lane sum (sum4x16, once per row and sweep). NKB key
// vectors are held per sweep (D = 4: two, i.e. Lk <= 32 in one sweep). Chosen by CPU features
// only (g_avx512): a fixed order of operations, so results never depend on the thread count.
template <int DD, int NKB>
__attribute__((target("avx512f"))) void backward_keylanes16_item(const Ctx& c, int64_t item, bool per_head,
                                                                  const float* out, const float* dout,
                                                                  const float* lse, float* dq, float* dk, float* dv) {
  static_assert(DD % 4 == 0, "sum4x16 folds four columns at a time");
  constexpr int64_t L = 16;
  const TaskAttentionProblem& p = *c.p;
  const int64_t Lq = p.Lq, Lk = p.Lk, rep = c.rep;
  const int64_t nkp = round_up(std::max<int64_t>(Lk, 1), L * NKB);  // bias row: -inf past Lk
  const int64_t b = per_head ? item / p.Hkv : item;
  const int64_t hk_lo = per_head ? item % p.Hkv : 0, hk_hi = per_head ? hk_lo + 1 : p.Hkv;
  Scratch& w = scratch();
  Scratch::grow(w.lse, rep * Lq);
  Scratch::grow(w.di, rep * Lq);
  const float* bias = short_bias(c, w, b, nkp);
  const __m512i kidx = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(DD));
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t hk = hk_lo; hk < hk_hi; ++hk) {
    const int64_t kv0 = (b * p.Hkv + hk) * Lk;
    const float* K = static_cast<const float*>(p.k) + kv0 * DD;
    const float* V = static_cast<const float*>(p.v) + kv0 * DD;
    // Per query head of this kv head: lse (+inf for rows with no key: p = 0) and D_i = dO_i . O_i.
    for (int64_t r = 0; r < rep; ++r) {
      const int64_t row0 = (b * p.Hq + hk * rep + r) * Lq;
      for (int64_t i = 0; i < Lq; ++i) {
        const float l = lse[row0 + i];
        w.lse[r * Lq + i] = l == kNegInf ? inf : l;
        float di = 0.f;
        for (int d = 0; d < DD; ++d) di += dout[(row0 + i) * DD + d] * out[(row0 + i) * DD + d];
        w.di[r * Lq + i] = di;
      }
    }
    for (int64_t kb0 = 0; kb0 * L < Lk; kb0 += NKB) {
      __m512 KT[NKB][DD], VT[NKB][DD], DK[NKB][DD], DV[NKB][DD];
      __mmask16 live[NKB];
      // K carries the softmax scale (s = q . (scale K), and dQ = dS (scale K) needs no rescaling);
      // dK = scale dS^T Q gets it when stored.
      const __m512 scale = _mm512_set1_ps(p.scale);
      for (int n = 0; n < NKB; ++n) {
        const int64_t j0 = (kb0 + n) * L, nr = std::max<int64_t>(0, std::min<int64_t>(L, Lk - j0));
        live[n] = (__mmask16)((1u << nr) - 1u);
        for (int d = 0; d < DD; ++d) {  // keys past Lk: 0 (their bias is -inf, so p = 0)
          const __m512i id = _mm512_add_epi32(kidx, _mm512_set1_epi32(d));
          KT[n][d] = nr ? _mm512_mul_ps(scale, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live[n], id,
                                                                         K + j0 * DD, 4))
                        : _mm512_setzero_ps();
          VT[n][d] = nr ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live[n], id, V + j0 * DD, 4)
                        : _mm512_setzero_ps();
          DK[n][d] = DV[n][d] = _mm512_setzero_ps();
        }
      }
      for (int64_t r = 0; r < rep; ++r) {
        const int64_t row0 = (b * p.Hq + hk * rep + r) * Lq;
        const float* qh = static_cast<const float*>(p.q) + row0 * DD;
        const float* go = dout + row0 * DD;
        const float* ls = w.lse.data() + r * Lq;
        const float* dis = w.di.data() + r * Lq;
        float* dqa = dq + row0 * DD;  // the output accumulates the sweeps
        for (int64_t i = 0; i < Lq; ++i) {
          const float* qi = qh + i * DD;
          const float* gi = go + i * DD;
          const __m512 lsev = _mm512_set1_ps(ls[i]), div = _mm512_set1_ps(dis[i]);
          const float* bi = bias + i * nkp + kb0 * L;
          __m512 DQ[DD];
          for (int d = 0; d < DD; ++d) DQ[d] = _mm512_setzero_ps();
          for (int n = 0; n < NKB; ++n) {
            __m512 s = _mm512_loadu_ps(bi + n * L);
            for (int d = 0; d < DD; ++d) s = _mm512_fmadd_ps(KT[n][d], _mm512_set1_ps(qi[d]), s);
            const __m512 pj = fexp16_short(_mm512_sub_ps(s, lsev));
            __m512 dp = _mm512_setzero_ps();
            for (int d = 0; d < DD; ++d) dp = _mm512_fmadd_ps(VT[n][d], _mm512_set1_ps(gi[d]), dp);
            const __m512 ds = _mm512_mul_ps(pj, _mm512_sub_ps(dp, div));
            for (int d = 0; d < DD; ++d) {
              DV[n][d] = _mm512_fmadd_ps(pj, _mm512_set1_ps(gi[d]), DV[n][d]);
              DK[n][d] = _mm512_fmadd_ps(ds, _mm512_set1_ps(qi[d]), DK[n][d]);
              DQ[d] = _mm512_fmadd_ps(ds, KT[n][d], DQ[d]);
            }
          }
          for (int d = 0; d < DD; d += 4) {
            __m128 sums = sum4x16(DQ[d], DQ[d + 1], DQ[d + 2], DQ[d + 3]);
            if (kb0 > 0) sums = _mm_add_ps(sums, _mm_loadu_ps(dqa + i * DD + d));
            _mm_storeu_ps(dqa + i * DD + d, sums);
          }
        }
      }
      for (int n = 0; n < NKB; ++n) {
        const int64_t j0 = (kb0 + n) * L;
        if (j0 >= Lk) break;
        if constexpr (DD == 4) {
          const int64_t nr = std::min<int64_t>(L, Lk - j0);
          store_rows4x16(dk + (kv0 + j0) * DD, nr, _mm512_mul_ps(scale, DK[n][0]), _mm512_mul_ps(scale, DK[n][1]),
                         _mm512_mul_ps(scale, DK[n][2]), _mm512_mul_ps(scale, DK[n][3]));
          store_rows4x16(dv + (kv0 + j0) * DD, nr, DV[n][0], DV[n][1], DV[n][2], DV[n][3]);
          continue;
        }
        for (int d = 0; d < DD; ++d) {
          const __m512i id = _mm512_add_epi32(kidx, _mm512_set1_epi32(d));
          _mm512_mask_i32scatter_ps(dk + (kv0 + j0) * DD, live[n], id, _mm512_mul_ps(scale, DK[n][d]), 4);
          _mm512_mask_i32scatter_ps(dv + (kv0 + j0) * DD, live[n], id, DV[n][d], 4);
        }
      }
    }
  }
}
#endif

#define PYOPS_TA_LANES(DD, T)                                                                                 \
  template void forward_lanes_item<DD, DD, T>(const Ctx&, int64_t, bool, T*, float*);                        \
  template void backward_lanes_item<DD, DD, T>(const Ctx&, int64_t, bool, const T*, const T*, const float*, T*, \
                                               T*, T*);
#define PYOPS_TA_LANES_DTYPES(DD) \
  PYOPS_TA_LANES(DD, float) PYOPS_TA_LANES(DD, half_bits) PYOPS_TA_LANES(DD, bf16_bits)
// The head dims with_lane_dims (task_attention.cpp) picks: 4, 8, 16 at compile time, 0 = any.
PYOPS_TA_LANES_DTYPES(0)
PYOPS_TA_LANES_DTYPES(4)
PYOPS_TA_LANES_DTYPES(8)
PYOPS_TA_LANES_DTYPES(16)
#undef PYOPS_TA_LANES_DTYPES
#undef PYOPS_TA_LANES
#ifdef PYOPS_TA_AVX512
template void forward_lanes16_item<4>(const Ctx&, int64_t, bool, float*, float*);
template void forward_lanes16_item<8>(const Ctx&, int64_t, bool, float*, float*);
template void forward_lanes16_item<16>(const Ctx&, int64_t, bool, float*, float*);
template void backward_keylanes16_item<4, 2>(const Ctx&, int64_t, bool, const float*, const float*, const float*,
                                             float*, float*, float*);
template void backward_keylanes16_item<8, 1>(const Ctx&, int64_t, bool, const float*, const float*, const float*,
                                             float*, float*, float*);
#endif

}  // namespace task_attention_impl
}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
