// Vector math of the task-attention CPU kernels, private to csrc/task_attention/: tile sizes, the
// exp / log approximations, fixed-lane reductions, the eight-lane V8 type, the AVX-512 variants
// chosen at run time inside the AVX2 build, and the register-blocked products. Every translation
// unit of the family is compiled once per ISA, so these inline helpers live in
// pyops::isa_<isa>::task_attention_impl and each build keeps its own copies.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/isa.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace task_attention_impl {

// Flash tile sizes: a 64 x 64 fp32 score block is 16 KiB, the q/k/v tiles at D = 64 another
// 48 KiB together: the working set of one item stays in L2, a row of it in L1.
constexpr int64_t kBQ = 64;
constexpr int64_t kBK = 64;
constexpr int64_t kR = 4;  // query rows per register block
constexpr int kW = 8;      // lanes of the vector loops (one AVX2 register of fp32)
constexpr uint32_t kDropoutStream = 0x5441534Bu;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// exp(x) for x <= 0 in fp32: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), exp(r) by
// its degree-6 Taylor polynomial (truncation < 1.3e-7 relative), times 2^n built in the exponent
// bits; 0 for x < -87 (and -inf). Branch-free so that loops over it vectorise.
inline float fexp(float x) {
  const float xc = x < -87.f ? -87.f : x;
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.f / 720.f;
  y = y * r + 1.f / 120.f;
  y = y * r + 1.f / 24.f;
  y = y * r + 1.f / 6.f;
  y = y * r + 0.5f;
  y = y * r + 1.f;
  y = y * r + 1.f;
  const int32_t e = ((int32_t)n + 127) << 23;
  float s;
  std::memcpy(&s, &e, 4);
  return x < -87.f ? 0.f : y * s;
}

// Reductions over n elements, n a multiple of kW, in kW fixed lanes.
inline float hsum(const float* l) { return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])); }

inline float dot8(const float* __restrict a, const float* __restrict b, int64_t n) {
  float l[kW] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t j = 0; j < n; j += kW)
    for (int t = 0; t < kW; ++t) l[t] += a[j + t] * b[j + t];
  return hsum(l);
}

inline float sum8(const float* a, int64_t n) {
  float l[kW] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t j = 0; j < n; j += kW)
    for (int t = 0; t < kW; ++t) l[t] += a[j + t];
  return hsum(l);
}

inline float max8(const float* a, int64_t n) {
#if defined(__AVX2__)
  __m256 l = _mm256_set1_ps(kNegInf);
  for (int64_t j = 0; j < n; j += kW) l = _mm256_max_ps(l, _mm256_loadu_ps(a + j));
  alignas(32) float t[kW];
  _mm256_store_ps(t, l);
  const float* lp = t;
#else
  float lp[kW];
  for (int t = 0; t < kW; ++t) lp[t] = kNegInf;
  for (int64_t j = 0; j < n; j += kW)
    for (int t = 0; t < kW; ++t) lp[t] = a[j + t] > lp[t] ? a[j + t] : lp[t];
#endif
  float m = kNegInf;
  for (int t = 0; t < kW; ++t) m = lp[t] > m ? lp[t] : m;
  return m;
}

#if defined(__AVX2__) && defined(__FMA__)
// fexp on eight lanes (the same steps; GCC does not if-convert the scalar version's float
// comparisons under the default -ftrapping-math, so its loops would stay scalar).
inline __m256 fexp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 xc = _mm256_max_ps(x, lo);
  const __m256 magic = _mm256_set1_ps(12582912.f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic), magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.f / 720.f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 120.f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 24.f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 6.f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}
#endif

// s[j] = fexp(s[j] - m) for j < n (a multiple of kW).
inline void exp_sub(float* s, float m, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 mv = _mm256_set1_ps(m);
  for (int64_t j = 0; j < n; j += kW) _mm256_storeu_ps(s + j, fexp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv)));
#else
  for (int64_t j = 0; j < n; ++j) s[j] = fexp(s[j] - m);
#endif
}

// Dot product of any length (lanes + tail).
inline float dot_any(const float* a, const float* b, int64_t n) {
  float l[kW] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + kW <= n; j += kW)
    for (int t = 0; t < kW; ++t) l[t] += a[j + t] * b[j + t];
  for (; j < n; ++j) l[0] += a[j] * b[j];
  return hsum(l);
}

// Eight-lane vectors: AVX2 intrinsics in the AVX2 build (the compiler's own vectorisation of
// small fixed-size loops proved unreliable for these register-blocked kernels), plain loops in
// the portable one.
#if defined(__AVX2__) && defined(__FMA__)
struct V8 {
  __m256 v;
};
inline V8 vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void vstore(float* p, V8 a) { _mm256_storeu_ps(p, a.v); }
inline V8 vset(float x) { return {_mm256_set1_ps(x)}; }
inline V8 vadd(V8 a, V8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline V8 vsub(V8 a, V8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline V8 vmul(V8 a, V8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline V8 vfma(V8 a, V8 b, V8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }  // a * b + c
inline V8 vmax(V8 a, V8 b) { return {_mm256_max_ps(a.v, b.v)}; }
inline V8 vexp(V8 a) { return {fexp8(a.v)}; }
#else
struct V8 {
  float v[kW];
};
inline V8 vload(const float* p) { V8 r; for (int t = 0; t < kW; ++t) r.v[t] = p[t]; return r; }
inline void vstore(float* p, V8 a) { for (int t = 0; t < kW; ++t) p[t] = a.v[t]; }
inline V8 vset(float x) { V8 r; for (int t = 0; t < kW; ++t) r.v[t] = x; return r; }
inline V8 vadd(V8 a, V8 b) { for (int t = 0; t < kW; ++t) a.v[t] += b.v[t]; return a; }
inline V8 vsub(V8 a, V8 b) { for (int t = 0; t < kW; ++t) a.v[t] -= b.v[t]; return a; }
inline V8 vmul(V8 a, V8 b) { for (int t = 0; t < kW; ++t) a.v[t] *= b.v[t]; return a; }
inline V8 vfma(V8 a, V8 b, V8 c) { for (int t = 0; t < kW; ++t) c.v[t] += a.v[t] * b.v[t]; return c; }
inline V8 vmax(V8 a, V8 b) { for (int t = 0; t < kW; ++t) a.v[t] = b.v[t] > a.v[t] ? b.v[t] : a.v[t]; return a; }
inline V8 vexp(V8 a) { for (int t = 0; t < kW; ++t) a.v[t] = fexp(a.v[t]); return a; }
#endif

// log(x) for x > 0 (normal) on eight lanes, Cephes-style: x = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// a degree-9 polynomial in m - 1 (~1 ulp). Used for the lse of eight rows at once.
inline void log_lanes(const float* x, float* out) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 v = _mm256_loadu_ps(x);
  const __m256i bits = _mm256_castps_si256(v);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f000000)));  // [0.5, 1)
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.f)));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.f));
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  __m256 r = _mm256_add_ps(m, y);
  r = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), r);
  _mm256_storeu_ps(out, r);
#else
  for (int t = 0; t < kW; ++t) out[t] = std::log(x[t]);
#endif
}

// dst[g] = sum of the eight lanes of src[g * 8 .. g * 8 + 8) for g < n (fixed order per build).
inline void lane_sums(const float* src, int64_t n, float* dst) {
  int64_t g = 0;
#if defined(__AVX2__)
  for (; g + kW <= n; g += kW) {
    const float* s = src + g * kW;
    const __m256 h01 = _mm256_hadd_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(s + 8));
    const __m256 h23 = _mm256_hadd_ps(_mm256_loadu_ps(s + 16), _mm256_loadu_ps(s + 24));
    const __m256 h45 = _mm256_hadd_ps(_mm256_loadu_ps(s + 32), _mm256_loadu_ps(s + 40));
    const __m256 h67 = _mm256_hadd_ps(_mm256_loadu_ps(s + 48), _mm256_loadu_ps(s + 56));
    const __m256 a = _mm256_hadd_ps(h01, h23);  // lanes: 0 1 2 3 (low halves) | 0 1 2 3 (high halves)
    const __m256 b = _mm256_hadd_ps(h45, h67);  // lanes: 4 5 6 7 | 4 5 6 7
    const __m256 lo = _mm256_permute2f128_ps(a, b, 0x20), hi = _mm256_permute2f128_ps(a, b, 0x31);
    _mm256_storeu_ps(dst + g, _mm256_add_ps(lo, hi));
  }
#endif
  for (; g < n; ++g) dst[g] = hsum(src + g * kW);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__GNUC__) && defined(__x86_64__)
// AVX-512 versions of the two register-blocked products, chosen at run time inside the AVX2
// build. Each output element is the same chain of fused multiply-adds in the same order as in
// the eight-lane kernels (only more of them run side by side), so the results are bit-identical
// to the AVX2 kernels: the choice never changes an answer.
#define PYOPS_TA_AVX512 1
__attribute__((target("avx512f"))) inline void gemm_rows_t_512(const float* __restrict A, int64_t lda, int64_t K,
                                                               const float* __restrict Bt, int64_t nkp,
                                                               float* __restrict S, bool accumulate) {
  const float* A0 = A;
  const float* A1 = A + lda;
  const float* A2 = A + 2 * lda;
  const float* A3 = A + 3 * lda;
  float* S0 = S;
  float* S1 = S + nkp;
  float* S2 = S + 2 * nkp;
  float* S3 = S + 3 * nkp;
  int64_t j0 = 0;
  for (; j0 + 64 <= nkp; j0 += 64) {
    __m512 a[4][4];
    for (int t = 0; t < 4; ++t) {
      a[0][t] = accumulate ? _mm512_loadu_ps(S0 + j0 + 16 * t) : _mm512_setzero_ps();
      a[1][t] = accumulate ? _mm512_loadu_ps(S1 + j0 + 16 * t) : _mm512_setzero_ps();
      a[2][t] = accumulate ? _mm512_loadu_ps(S2 + j0 + 16 * t) : _mm512_setzero_ps();
      a[3][t] = accumulate ? _mm512_loadu_ps(S3 + j0 + 16 * t) : _mm512_setzero_ps();
    }
    for (int64_t d = 0; d < K; ++d) {
      const float* bp = Bt + d * nkp + j0;
      const __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
      const __m512 b2 = _mm512_loadu_ps(bp + 32), b3 = _mm512_loadu_ps(bp + 48);
      __m512 x = _mm512_set1_ps(A0[d]);
      a[0][0] = _mm512_fmadd_ps(x, b0, a[0][0]); a[0][1] = _mm512_fmadd_ps(x, b1, a[0][1]);
      a[0][2] = _mm512_fmadd_ps(x, b2, a[0][2]); a[0][3] = _mm512_fmadd_ps(x, b3, a[0][3]);
      x = _mm512_set1_ps(A1[d]);
      a[1][0] = _mm512_fmadd_ps(x, b0, a[1][0]); a[1][1] = _mm512_fmadd_ps(x, b1, a[1][1]);
      a[1][2] = _mm512_fmadd_ps(x, b2, a[1][2]); a[1][3] = _mm512_fmadd_ps(x, b3, a[1][3]);
      x = _mm512_set1_ps(A2[d]);
      a[2][0] = _mm512_fmadd_ps(x, b0, a[2][0]); a[2][1] = _mm512_fmadd_ps(x, b1, a[2][1]);
      a[2][2] = _mm512_fmadd_ps(x, b2, a[2][2]); a[2][3] = _mm512_fmadd_ps(x, b3, a[2][3]);
      x = _mm512_set1_ps(A3[d]);
      a[3][0] = _mm512_fmadd_ps(x, b0, a[3][0]); a[3][1] = _mm512_fmadd_ps(x, b1, a[3][1]);
      a[3][2] = _mm512_fmadd_ps(x, b2, a[3][2]); a[3][3] = _mm512_fmadd_ps(x, b3, a[3][3]);
    }
    for (int t = 0; t < 4; ++t) {
      _mm512_storeu_ps(S0 + j0 + 16 * t, a[0][t]);
      _mm512_storeu_ps(S1 + j0 + 16 * t, a[1][t]);
      _mm512_storeu_ps(S2 + j0 + 16 * t, a[2][t]);
      _mm512_storeu_ps(S3 + j0 + 16 * t, a[3][t]);
    }
  }
  for (; j0 < nkp; j0 += 16) {  // 16 columns, or the last 8 (nkp is a multiple of 8)
    const __mmask16 m = j0 + 16 <= nkp ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
    __m512 a0 = accumulate ? _mm512_maskz_loadu_ps(m, S0 + j0) : _mm512_setzero_ps();
    __m512 a1 = accumulate ? _mm512_maskz_loadu_ps(m, S1 + j0) : _mm512_setzero_ps();
    __m512 a2 = accumulate ? _mm512_maskz_loadu_ps(m, S2 + j0) : _mm512_setzero_ps();
    __m512 a3 = accumulate ? _mm512_maskz_loadu_ps(m, S3 + j0) : _mm512_setzero_ps();
    for (int64_t d = 0; d < K; ++d) {
      const __m512 b0 = _mm512_maskz_loadu_ps(m, Bt + d * nkp + j0);
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(A0[d]), b0, a0);
      a1 = _mm512_fmadd_ps(_mm512_set1_ps(A1[d]), b0, a1);
      a2 = _mm512_fmadd_ps(_mm512_set1_ps(A2[d]), b0, a2);
      a3 = _mm512_fmadd_ps(_mm512_set1_ps(A3[d]), b0, a3);
    }
    _mm512_mask_storeu_ps(S0 + j0, m, a0);
    _mm512_mask_storeu_ps(S1 + j0, m, a1);
    _mm512_mask_storeu_ps(S2 + j0, m, a2);
    _mm512_mask_storeu_ps(S3 + j0, m, a3);
  }
}

__attribute__((target("avx512f"))) inline void gemm_rows_acc_512(const float* __restrict P, int64_t nkp, int64_t nk,
                                                                 const float* __restrict V, int64_t ldv,
                                                                 float* __restrict C) {
  const float* P0 = P;
  const float* P1 = P + nkp;
  const float* P2 = P + 2 * nkp;
  const float* P3 = P + 3 * nkp;
  float* C0 = C;
  float* C1 = C + ldv;
  float* C2 = C + 2 * ldv;
  float* C3 = C + 3 * ldv;
  int64_t c0 = 0;
  for (; c0 + 64 <= ldv; c0 += 64) {
    __m512 a[4][4];
    for (int t = 0; t < 4; ++t) {
      a[0][t] = _mm512_loadu_ps(C0 + c0 + 16 * t);
      a[1][t] = _mm512_loadu_ps(C1 + c0 + 16 * t);
      a[2][t] = _mm512_loadu_ps(C2 + c0 + 16 * t);
      a[3][t] = _mm512_loadu_ps(C3 + c0 + 16 * t);
    }
    for (int64_t j = 0; j < nk; ++j) {
      const float* vp = V + j * ldv + c0;
      const __m512 v0 = _mm512_loadu_ps(vp), v1 = _mm512_loadu_ps(vp + 16);
      const __m512 v2 = _mm512_loadu_ps(vp + 32), v3 = _mm512_loadu_ps(vp + 48);
      __m512 x = _mm512_set1_ps(P0[j]);
      a[0][0] = _mm512_fmadd_ps(x, v0, a[0][0]); a[0][1] = _mm512_fmadd_ps(x, v1, a[0][1]);
      a[0][2] = _mm512_fmadd_ps(x, v2, a[0][2]); a[0][3] = _mm512_fmadd_ps(x, v3, a[0][3]);
      x = _mm512_set1_ps(P1[j]);
      a[1][0] = _mm512_fmadd_ps(x, v0, a[1][0]); a[1][1] = _mm512_fmadd_ps(x, v1, a[1][1]);
      a[1][2] = _mm512_fmadd_ps(x, v2, a[1][2]); a[1][3] = _mm512_fmadd_ps(x, v3, a[1][3]);
      x = _mm512_set1_ps(P2[j]);
      a[2][0] = _mm512_fmadd_ps(x, v0, a[2][0]); a[2][1] = _mm512_fmadd_ps(x, v1, a[2][1]);
      a[2][2] = _mm512_fmadd_ps(x, v2, a[2][2]); a[2][3] = _mm512_fmadd_ps(x, v3, a[2][3]);
      x = _mm512_set1_ps(P3[j]);
      a[3][0] = _mm512_fmadd_ps(x, v0, a[3][0]); a[3][1] = _mm512_fmadd_ps(x, v1, a[3][1]);
      a[3][2] = _mm512_fmadd_ps(x, v2, a[3][2]); a[3][3] = _mm512_fmadd_ps(x, v3, a[3][3]);
    }
    for (int t = 0; t < 4; ++t) {
      _mm512_storeu_ps(C0 + c0 + 16 * t, a[0][t]);
      _mm512_storeu_ps(C1 + c0 + 16 * t, a[1][t]);
      _mm512_storeu_ps(C2 + c0 + 16 * t, a[2][t]);
      _mm512_storeu_ps(C3 + c0 + 16 * t, a[3][t]);
    }
  }
  for (; c0 < ldv; c0 += 16) {  // ldv is a multiple of 8
    const __mmask16 m = c0 + 16 <= ldv ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
    __m512 a0 = _mm512_maskz_loadu_ps(m, C0 + c0), a1 = _mm512_maskz_loadu_ps(m, C1 + c0);
    __m512 a2 = _mm512_maskz_loadu_ps(m, C2 + c0), a3 = _mm512_maskz_loadu_ps(m, C3 + c0);
    for (int64_t j = 0; j < nk; ++j) {
      const __m512 v0 = _mm512_maskz_loadu_ps(m, V + j * ldv + c0);
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(P0[j]), v0, a0);
      a1 = _mm512_fmadd_ps(_mm512_set1_ps(P1[j]), v0, a1);
      a2 = _mm512_fmadd_ps(_mm512_set1_ps(P2[j]), v0, a2);
      a3 = _mm512_fmadd_ps(_mm512_set1_ps(P3[j]), v0, a3);
    }
    _mm512_mask_storeu_ps(C0 + c0, m, a0);
    _mm512_mask_storeu_ps(C1 + c0, m, a1);
    _mm512_mask_storeu_ps(C2 + c0, m, a2);
    _mm512_mask_storeu_ps(C3 + c0, m, a3);
  }
}

inline const bool g_avx512 = __builtin_cpu_supports("avx512f") && !std::getenv("PYOPS_TA_NO_AVX512");
#endif

#ifdef PYOPS_TA_AVX512
// fexp8 on sixteen lanes (the same steps, element by element: the same bits).
__attribute__((target("avx512f"))) inline __m512 fexp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.f);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  const __m512 xc = _mm512_max_ps(x, lo);
  const __m512 magic = _mm512_set1_ps(12582912.f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), magic), magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.f / 720.f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 120.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 24.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 6.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  // y * 2^n in one step: n is an integer in [-126, 128) after the clamp, so this is the same
  // correctly rounded product as fexp8's multiply by the constructed 2^n.
  return _mm512_maskz_scalef_ps((__mmask16)~underflow, y, n);
}

// exp(x) for the short-path AVX-512 kernels, eleven operations instead of fexp16's thirteen (they
// are bound by vector-port throughput, and exp is the largest part of their work):
// - one-constant reduction r = x - n*ln2 in a single FMA (error |n| * 1.9e-9, below an ulp of
//   the result for every x > -30, where the result matters);
// - a degree-5 minimax polynomial with c0 = 1 on [-ln2/2, ln2/2] (relative error 1.5e-7 in fp32
//   Horner, against fexp8's 2.1e-7).
// Below -87 the lanes are zeroed by mask, never computed: an underflowing (subnormal) product
// costs a microcode assist per lane, which would dominate the run time on masked scores. Not
// bit-identical to fexp8 (the flash kernels keep fexp16 for that); the short path's forward and
// backward both use it.
__attribute__((target("avx512f"))) inline __m512 fexp16_short(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  const __m512 xc = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), xc);
  __m512 y = _mm512_set1_ps(8.2902722061e-3f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1898161173e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6667638719e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.9999147654e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(9.9999970198e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(keep, y, n);
}

// s[j] = fexp(s[j] - m) for j < n (a multiple of kW); returns sum8 of the result (the same
// eight lanes, each summed in the same order).
__attribute__((target("avx512f"))) inline float exp_sub_sum_512(float* s, float m, int64_t n) {
  const __m512 mv = _mm512_set1_ps(m);
  __m256 l = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = fexp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv));
    _mm512_storeu_ps(s + j, e);
    l = _mm256_add_ps(l, _mm512_castps512_ps256(e));
    l = _mm256_add_ps(l, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
  }
  if (j < n) {
    const __m512 e = fexp16(_mm512_sub_ps(_mm512_maskz_loadu_ps((__mmask16)0x00FF, s + j), mv));
    _mm512_mask_storeu_ps(s + j, (__mmask16)0x00FF, e);
    l = _mm256_add_ps(l, _mm512_castps512_ps256(e));
  }
  alignas(32) float t[kW];
  _mm256_store_ps(t, l);
  return hsum(t);
}
#endif

#ifdef PYOPS_TA_AVX512
__attribute__((target("avx512f"))) inline void exp_sub_512(float* s, float m, int64_t n) {
  const __m512 mv = _mm512_set1_ps(m);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = j + 16 <= n ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
    _mm512_mask_storeu_ps(s + j, k, fexp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mv)));
  }
}
#endif

// exp_sub, sixteen lanes at a time where the machine has them (element-wise: the same bits).
inline void exp_sub_wide(float* s, float m, int64_t n) {
#ifdef PYOPS_TA_AVX512
  if (g_avx512) return exp_sub_512(s, m, n);
#endif
  exp_sub(s, m, n);
}

// exp_sub then sum8.
inline float exp_sub_sum(float* s, float m, int64_t n) {
#ifdef PYOPS_TA_AVX512
  if (g_avx512) return exp_sub_sum_512(s, m, n);
#endif
  exp_sub(s, m, n);
  return sum8(s, n);
}


// S[r, j] (+)= sum_d A[r, d] * Bt[d, j] for kR rows of A (leading dimension lda) and j < nkp
// (Bt leading dimension nkp); S has leading dimension nkp. 4 x 16 register blocks.
inline void gemm_rows_t(const float* __restrict A, int64_t lda, int64_t K, const float* __restrict Bt,
                        int64_t nkp, float* __restrict S, bool accumulate = false) {
#ifdef PYOPS_TA_AVX512
  if (g_avx512) return gemm_rows_t_512(A, lda, K, Bt, nkp, S, accumulate);
#endif
  int64_t j0 = 0;
  auto init = [&](int64_t r, int64_t j) { return accumulate ? vload(S + r * nkp + j) : vset(0.f); };
  for (; j0 + 2 * kW <= nkp; j0 += 2 * kW) {
    V8 a00 = init(0, j0), a01 = init(0, j0 + kW), a10 = init(1, j0), a11 = init(1, j0 + kW);
    V8 a20 = init(2, j0), a21 = init(2, j0 + kW), a30 = init(3, j0), a31 = init(3, j0 + kW);
    for (int64_t d = 0; d < K; ++d) {
      const V8 b0 = vload(Bt + d * nkp + j0), b1 = vload(Bt + d * nkp + j0 + kW);
      V8 x = vset(A[d]);
      a00 = vfma(x, b0, a00); a01 = vfma(x, b1, a01);
      x = vset(A[lda + d]);
      a10 = vfma(x, b0, a10); a11 = vfma(x, b1, a11);
      x = vset(A[2 * lda + d]);
      a20 = vfma(x, b0, a20); a21 = vfma(x, b1, a21);
      x = vset(A[3 * lda + d]);
      a30 = vfma(x, b0, a30); a31 = vfma(x, b1, a31);
    }
    vstore(S + j0, a00); vstore(S + j0 + kW, a01);
    vstore(S + nkp + j0, a10); vstore(S + nkp + j0 + kW, a11);
    vstore(S + 2 * nkp + j0, a20); vstore(S + 2 * nkp + j0 + kW, a21);
    vstore(S + 3 * nkp + j0, a30); vstore(S + 3 * nkp + j0 + kW, a31);
  }
  for (; j0 < nkp; j0 += kW) {
    V8 a0 = init(0, j0), a1 = init(1, j0), a2 = init(2, j0), a3 = init(3, j0);
    for (int64_t d = 0; d < K; ++d) {
      const V8 b0 = vload(Bt + d * nkp + j0);
      a0 = vfma(vset(A[d]), b0, a0);
      a1 = vfma(vset(A[lda + d]), b0, a1);
      a2 = vfma(vset(A[2 * lda + d]), b0, a2);
      a3 = vfma(vset(A[3 * lda + d]), b0, a3);
    }
    vstore(S + j0, a0); vstore(S + nkp + j0, a1); vstore(S + 2 * nkp + j0, a2); vstore(S + 3 * nkp + j0, a3);
  }
}

// C[r, c] += sum_{j < nk} P[r, j] * V[j, c] for kR rows; V rows have leading dimension ldv (a
// multiple of kW, zero padded), P leading dimension nkp, C leading dimension ldv.
inline void gemm_rows_acc(const float* __restrict P, int64_t nkp, int64_t nk, const float* __restrict V,
                          int64_t ldv, float* __restrict C) {
#ifdef PYOPS_TA_AVX512
  if (g_avx512) return gemm_rows_acc_512(P, nkp, nk, V, ldv, C);
#endif
  int64_t c0 = 0;
  for (; c0 + 2 * kW <= ldv; c0 += 2 * kW) {
    V8 a00 = vload(C + c0), a01 = vload(C + c0 + kW);
    V8 a10 = vload(C + ldv + c0), a11 = vload(C + ldv + c0 + kW);
    V8 a20 = vload(C + 2 * ldv + c0), a21 = vload(C + 2 * ldv + c0 + kW);
    V8 a30 = vload(C + 3 * ldv + c0), a31 = vload(C + 3 * ldv + c0 + kW);
    for (int64_t j = 0; j < nk; ++j) {
      const V8 v0 = vload(V + j * ldv + c0), v1 = vload(V + j * ldv + c0 + kW);
      V8 x = vset(P[j]);
      a00 = vfma(x, v0, a00); a01 = vfma(x, v1, a01);
      x = vset(P[nkp + j]);
      a10 = vfma(x, v0, a10); a11 = vfma(x, v1, a11);
      x = vset(P[2 * nkp + j]);
      a20 = vfma(x, v0, a20); a21 = vfma(x, v1, a21);
      x = vset(P[3 * nkp + j]);
      a30 = vfma(x, v0, a30); a31 = vfma(x, v1, a31);
    }
    vstore(C + c0, a00); vstore(C + c0 + kW, a01);
    vstore(C + ldv + c0, a10); vstore(C + ldv + c0 + kW, a11);
    vstore(C + 2 * ldv + c0, a20); vstore(C + 2 * ldv + c0 + kW, a21);
    vstore(C + 3 * ldv + c0, a30); vstore(C + 3 * ldv + c0 + kW, a31);
  }
  for (; c0 < ldv; c0 += kW) {
    V8 a0 = vload(C + c0), a1 = vload(C + ldv + c0), a2 = vload(C + 2 * ldv + c0), a3 = vload(C + 3 * ldv + c0);
    for (int64_t j = 0; j < nk; ++j) {
      const V8 v0 = vload(V + j * ldv + c0);
      a0 = vfma(vset(P[j]), v0, a0);
      a1 = vfma(vset(P[nkp + j]), v0, a1);
      a2 = vfma(vset(P[2 * nkp + j]), v0, a2);
      a3 = vfma(vset(P[3 * nkp + j]), v0, a3);
    }
    vstore(C + c0, a0); vstore(C + ldv + c0, a1); vstore(C + 2 * ldv + c0, a2); vstore(C + 3 * ldv + c0, a3);
  }
}

}  // namespace task_attention_impl
}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
