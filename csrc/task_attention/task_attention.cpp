// CPU kernels for task-masked attention (cpu/task_attention.h). This file is compiled once per
// ISA (see CMakeLists.txt); PYOPS_ISA names the namespace the build goes into.
//
// Layout of the computation. Every score block is computed on fp32 tiles: queries pre-scaled by
// `scale` (rows padded to a multiple of kR), keys and values transposed ([D, nkp] and [Dv, nkp],
// nkp = key count rounded up to 8, zero padded), so that the inner loops run over keys in
// 8-lane chunks that the compiler vectorises without -ffast-math. Reductions (row max, row sum,
// dot products) use 8 fixed lanes: their order depends only on the sizes.
//
// Masking. Every query position gets a 64-bit mask of the kv groups it may attend (0 for
// padding), every key a one-hot bit of its group (0 for padding): (qrow & kbit) != 0 is the
// group rule. Flash tiles keep the OR and AND of qrow over a q-tile and the OR of kbit over a
// k-tile: a pair of tiles with (q_or & k_or) == 0 is skipped, one with k_or inside q_and (no
// padding key, not crossing the causal diagonal) skips the per-element test. The short path
// instead builds an additive 0 / -inf bias for the whole block once per batch row.
#include <algorithm>
#include <atomic>
#include <cmath>
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
#include "cpu/task_attention.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace {

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
__attribute__((target("avx512f"))) static void gemm_rows_t_512(const float* __restrict A, int64_t lda, int64_t K,
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

__attribute__((target("avx512f"))) static void gemm_rows_acc_512(const float* __restrict P, int64_t nkp, int64_t nk,
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

static const bool g_avx512 = __builtin_cpu_supports("avx512f") && !std::getenv("PYOPS_TA_NO_AVX512");
#endif

#ifdef PYOPS_TA_AVX512
// fexp8 on sixteen lanes (the same steps, element by element: the same bits).
__attribute__((target("avx512f"))) static inline __m512 fexp16(__m512 x) {
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
// costs a microcode assist per lane, which made a first version that let scalef underflow 5x
// slower on masked scores. Not bit-identical to fexp8 (the flash kernels keep fexp16 for that);
// the short path's forward and backward both use it.
__attribute__((target("avx512f"))) static inline __m512 fexp16_short(__m512 x) {
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
__attribute__((target("avx512f"))) static float exp_sub_sum_512(float* s, float m, int64_t n) {
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
__attribute__((target("avx512f"))) static void exp_sub_512(float* s, float m, int64_t n) {
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

// ---- tile loads / stores ----------------------------------------------------------------------

// dst[r, d] = scale * src[r, d] for r < n, d < W (ld W); rows n..rows_pad zero.
template <typename T>
void load_rows(const T* src, int64_t n, int64_t W, float scale, float* dst, int64_t rows_pad) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < W; ++d) dst[r * W + d] = scale * to_float(src[r * W + d]);
  std::fill(dst + n * W, dst + rows_pad * W, 0.f);
}

// dst[r, d] = src[r, d] for r < n, d < W, with leading dimension ldd >= W (columns zero padded).
template <typename T>
void load_rows_padded(const T* src, int64_t n, int64_t W, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t d = 0; d < W; ++d) dst[r * ldd + d] = to_float(src[r * W + d]);
    for (int64_t d = W; d < ldd; ++d) dst[r * ldd + d] = 0.f;
  }
}

// dst[d, j] = src[j, d] for j < n, d < W (dst leading dimension np, columns n..np zero).
template <typename T>
void load_transposed(const T* src, int64_t n, int64_t W, float* dst, int64_t np) {
  for (int64_t d = 0; d < W; ++d) std::fill(dst + d * np + n, dst + (d + 1) * np, 0.f);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < W; ++d) dst[d * np + j] = to_float(src[j * W + d]);
}

template <typename T>
void store_row(const float* src, T* dst, int64_t n) {
  store_tile(src, dst, n);
}

// dst[j, d] = scale * src[d, j] (src leading dimension np).
template <typename T>
void store_transposed(const float* src, int64_t np, int64_t n, int64_t W, float scale, T* dst) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < W; ++d) dst[j * W + d] = from_float<T>(scale * src[d * np + j]);
}

// ---- problem context --------------------------------------------------------------------------

std::atomic<uint64_t> g_call_id{1};

struct Ctx {
  const TaskAttentionProblem* p = nullptr;
  int64_t rep = 1;          // query heads per kv head
  int64_t nqt = 0, nkt = 0;  // flash tiles
  std::vector<uint64_t> qrow, kbit;  // [q group rows, Lq], [kv group rows, Lk]
  std::vector<uint64_t> qor, qand, kor;
  std::vector<uint8_t> kpad;
  bool dropout = false;
  float keep_scale = 1.f;
  uint32_t seed_lo = 0, seed_hi = 0;
  uint64_t call_id = 0;
  bool short_path = false;

  int64_t qgr(int64_t b) const { return p->q_groups_bstride ? b : 0; }
  int64_t kgr(int64_t b) const { return p->kv_groups_bstride ? b : 0; }
  const uint64_t* qrow_of(int64_t b) const { return qrow.data() + qgr(b) * p->Lq; }
  const uint64_t* kbit_of(int64_t b) const { return kbit.data() + kgr(b) * p->Lk; }

  // Scale (0 or 1/(1-p)) of element (b, h, i, j0 + j) for j < nk; zero beyond up to nkp.
  void keep_row(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t nk, int64_t nkp, float* ks) const {
    const uint32_t c2 = (uint32_t)(b * p->Hq + h);
    const float thr = p->dropout_p;
    for (int64_t j = 0; j < nk; ++j) {
      const Philox4 r = philox4x32_10((uint32_t)(j0 + j), (uint32_t)i, c2, kDropoutStream, seed_lo, seed_hi);
      ks[j] = philox_uniform(r.v[0]) >= thr ? keep_scale : 0.f;
    }
    for (int64_t j = nk; j < nkp; ++j) ks[j] = 0.f;
  }
};

struct TileMask {
  bool skip = false;
  bool full = false;
};

TileMask classify(const Ctx& c, int64_t b, int64_t qt, int64_t q0, int64_t nq, int64_t kt, int64_t k0,
                  int64_t nk) {
  TileMask m;
  const int64_t qi = c.qgr(b) * c.nqt + qt, ki = c.kgr(b) * c.nkt + kt;
  const uint64_t qo = c.qor[qi], qa = c.qand[qi], ko = c.kor[ki];
  if ((qo & ko) == 0 || (c.p->causal && k0 > q0 + nq - 1)) {
    m.skip = true;
    return m;
  }
  m.full = !c.kpad[ki] && (ko & ~qa) == 0 && (!c.p->causal || k0 + nk - 1 <= q0);
  return m;
}

// How a block is masked: a precomputed 0 / -inf bias ([nq, nkp], the short path), no test at all
// (full tiles), or the per-element rule. Columns nk..nkp are always -inf.
struct MaskSpec {
  const float* bias = nullptr;
  bool full = false;
  const uint64_t* qrow = nullptr;  // at q0
  const uint64_t* kbit = nullptr;  // at k0
  int64_t q0 = 0, k0 = 0;
  bool causal = false;

  void apply(int64_t i, float* s, int64_t nk, int64_t nkp) const {
    if (bias) {
      const float* bi = bias + i * nkp;
      for (int64_t j = 0; j < nkp; ++j) s[j] += bi[j];
      return;
    }
    if (!full) {
      const uint64_t qm = qrow[i];
      const int64_t lim = causal ? q0 + i - k0 : nk;  // j <= lim allowed by causality
      for (int64_t j = 0; j < nk; ++j) {
        const bool ok = (qm & kbit[j]) != 0 && j <= lim;
        s[j] = ok ? s[j] : kNegInf;
      }
    }
    for (int64_t j = nk; j < nkp; ++j) s[j] = kNegInf;
  }
};

// Per-thread scratch, grown on demand (never shrunk), so work items do not allocate.
struct Scratch {
  std::vector<float> qs, dO, kt, vt, vr, kr, s, s2, ks, acc, m, l, lse, di, dkt, dvt, dq, bias;
  std::vector<float> pfull, dsfull, qst, dot_t;  // backward: a whole q-tile of P, dS; Qs^T, dO^T
  std::vector<float> qpack, dqall, qloaded;      // fused backward: q sides and dq of a (b, kv head)
  uint64_t bias_call = 0;
  int64_t bias_row = -1;
  static void grow(std::vector<float>& v, int64_t n) {
    if ((int64_t)v.size() < n) v.resize((size_t)n);
  }
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// The short path's bias for group row (b): [Lq, nkp] of 0 / -inf, cached per thread and call.
const float* short_bias(const Ctx& c, Scratch& w, int64_t b, int64_t nkp) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t row = c.qgr(b) * (p.B + 1) + c.kgr(b);  // identifies the (q row, kv row) pair
  if (w.bias_call == c.call_id && w.bias_row == row) return w.bias.data();
  Scratch::grow(w.bias, round_up(p.Lq, kR) * nkp);
  const uint64_t* qr = c.qrow_of(b);
  const uint64_t* kb = c.kbit_of(b);
  for (int64_t i = 0; i < p.Lq; ++i) {
    float* bi = w.bias.data() + i * nkp;
    const uint64_t qm = qr[i];
    for (int64_t j = 0; j < p.Lk; ++j) {
      const bool ok = (qm & kb[j]) != 0 && (!p.causal || j <= i);
      bi[j] = ok ? 0.f : kNegInf;
    }
    for (int64_t j = p.Lk; j < nkp; ++j) bi[j] = kNegInf;
  }
  w.bias_call = c.call_id;
  w.bias_row = row;
  return w.bias.data();
}

// ---- forward ----------------------------------------------------------------------------------

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

// Sizes every scratch buffer for blocks of up to bq queries and bk keys.
void size_scratch(const TaskAttentionProblem& p, Scratch& w, int64_t bq, int64_t bk, bool backward) {
  const int64_t bqp = round_up(bq, kR), bkp = round_up(std::max<int64_t>(bk, 1), kW);
  const int64_t Dp = round_up(std::max<int64_t>(p.D, 1), kW), Dvp = round_up(std::max<int64_t>(p.Dv, 1), kW);
  Scratch::grow(w.qs, bqp * std::max<int64_t>(p.D, 1));
  Scratch::grow(w.kt, std::max<int64_t>(p.D, 1) * bkp);
  Scratch::grow(w.vt, std::max<int64_t>(p.Dv, 1) * bkp);
  Scratch::grow(w.vr, bkp * Dvp);
  Scratch::grow(w.s, kR * bkp);
  Scratch::grow(w.s2, std::max(kR * bkp, Dvp + Dp));
  Scratch::grow(w.ks, bkp);
  Scratch::grow(w.acc, bqp * Dvp);
  Scratch::grow(w.m, bqp);
  Scratch::grow(w.l, bqp);
  if (backward) {
    Scratch::grow(w.dO, bqp * std::max<int64_t>(p.Dv, 1));
    Scratch::grow(w.kr, bkp * Dp);
    Scratch::grow(w.lse, bqp);
    Scratch::grow(w.di, bqp);
    const int64_t D4 = round_up(std::max<int64_t>(p.D, 1), kR), Dv4 = round_up(std::max<int64_t>(p.Dv, 1), kR);
    Scratch::grow(w.dkt, D4 * bkp);
    Scratch::grow(w.dvt, Dv4 * bkp);
    Scratch::grow(w.pfull, bqp * bkp);
    Scratch::grow(w.dsfull, bqp * bkp);
    Scratch::grow(w.qst, D4 * bqp);
    Scratch::grow(w.dot_t, Dv4 * bqp);
    Scratch::grow(w.dq, bqp * Dp);
  }
}

// Packed K / V tiles of the flash forward, built once per call: tile (b, kv head, k-tile) holds
// K^T ([D, nkp]) and V as rows ([nk, ldv]) or transposed ([Dv, nkp]), exactly what the per-pair
// loads used to build, so the q-tiles that share a k-tile no longer re-transpose it.
struct KVPack {
  std::unique_ptr<float[]> k, v;
  int64_t kst = 0, vst = 0;
};

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

// ---- short path, query-lane kernels (small head dims) -------------------------------------------
//
// For head dims up to kLaneMaxDim (MultiTab-Net: 4-16) the row kernels above spend most of their
// time on per-row overhead (horizontal sums, scalar bookkeeping). Here eight query rows ride in
// the eight lanes of a vector instead: a key j costs D + Dv lane-wise FMAs with K[j, :] and V[j, :]
// broadcast, and no reduction crosses lanes until a row block is done. dK and dV are accumulated
// per lane ([Lk, D, 8]) and summed over the lanes once per (batch row, kv head), in a fixed order.

constexpr int64_t kLaneMaxDim = 32;


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

// Which lane kernel instance runs: compile-time dims for the common square head sizes.
template <typename T, typename Fn>
void with_lane_dims(int64_t D, int64_t Dv, Fn&& fn) {
  if (D == Dv && D == 4) return fn(std::integral_constant<int, 4>{});
  if (D == Dv && D == 8) return fn(std::integral_constant<int, 8>{});
  if (D == Dv && D == 16) return fn(std::integral_constant<int, 16>{});
  return fn(std::integral_constant<int, 0>{});
}

bool lanes_fit(const TaskAttentionProblem& p) { return p.D <= kLaneMaxDim && p.Dv <= kLaneMaxDim; }

// ---- checks and setup -------------------------------------------------------------------------

Status check(const TaskAttentionProblem& p) {
  auto bad = [](const std::string& m) { return Status::invalid("task_attention: " + m); };
  if (p.B < 0 || p.Hq < 0 || p.Lq < 0 || p.Lk < 0 || p.D < 0 || p.Dv < 0)
    return bad("sizes must be >= 0, got B=" + std::to_string(p.B) + " Hq=" + std::to_string(p.Hq) +
               " Lq=" + std::to_string(p.Lq) + " Lk=" + std::to_string(p.Lk) + " D=" + std::to_string(p.D) +
               " Dv=" + std::to_string(p.Dv));
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0)
    return bad("Hq must be a multiple of Hkv > 0, got Hq=" + std::to_string(p.Hq) + " Hkv=" + std::to_string(p.Hkv));
  if (p.G < 0) return bad("G must be >= 0, got " + std::to_string(p.G));
  if (p.G > kTaskAttentionMaxGroups)
    return bad("the CPU kernel supports at most " + std::to_string(kTaskAttentionMaxGroups) + " groups, got G=" +
               std::to_string(p.G));
  if (p.q_groups_bstride != 0 && p.q_groups_bstride != p.Lq)
    return bad("q_groups_bstride must be 0 or Lq=" + std::to_string(p.Lq) + ", got " +
               std::to_string(p.q_groups_bstride));
  if (p.kv_groups_bstride != 0 && p.kv_groups_bstride != p.Lk)
    return bad("kv_groups_bstride must be 0 or Lk=" + std::to_string(p.Lk) + ", got " +
               std::to_string(p.kv_groups_bstride));
  if (!(p.dropout_p >= 0.f && p.dropout_p < 1.f))
    return bad("dropout_p must be in [0, 1), got " + std::to_string(p.dropout_p));
  if (!std::isfinite(p.scale)) return bad("scale must be finite, got " + std::to_string(p.scale));
  if (!valid_dtype((int)p.dtype)) return bad("unknown dtype code " + std::to_string((int)p.dtype));
  return Status::ok();
}

Status null_check(const void* ptr, int64_t n, const char* name) {
  if (n > 0 && ptr == nullptr) return Status::invalid(std::string("task_attention: ") + name + " is a null pointer");
  return Status::ok();
}

// Validates the group ids and builds the masks (and the flash tile summaries).
Status setup(const TaskAttentionProblem& p, Ctx& c) {
  c.p = &p;
  c.rep = p.Hq / p.Hkv;
  c.short_path = p.Lq <= kTaskAttentionShortMax && p.Lk <= kTaskAttentionShortMax;
  c.call_id = g_call_id.fetch_add(1);
  c.dropout = p.dropout_p > 0.f;
  c.keep_scale = c.dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  c.seed_lo = (uint32_t)(p.seed & 0xffffffffu);
  c.seed_hi = (uint32_t)(p.seed >> 32);
  Status st;
  if (!(st = null_check(p.allow, p.G, "allow")).is_ok()) return st;
  std::vector<uint64_t> allow_row((size_t)std::max<int64_t>(p.G, 1), 0);
  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t t = 0; t < p.G; ++t)
      if (p.allow[g * p.G + t]) allow_row[g] |= uint64_t(1) << t;
  const int64_t nbq = p.q_groups_bstride ? p.B : 1, nbk = p.kv_groups_bstride ? p.B : 1;
  if (!(st = null_check(p.q_groups, nbq * p.Lq, "q_groups")).is_ok()) return st;
  if (!(st = null_check(p.kv_groups, nbk * p.Lk, "kv_groups")).is_ok()) return st;
  c.qrow.assign((size_t)(nbq * p.Lq), 0);
  c.kbit.assign((size_t)(nbk * p.Lk), 0);
  auto range_error = [&](const char* name, int32_t g, int64_t r, int64_t i, bool batched) {
    std::string where = batched ? "[" + std::to_string(r) + ", " + std::to_string(i) + "]" : "[" + std::to_string(i) + "]";
    return Status::invalid(std::string(name) + ": group id " + std::to_string(g) + " at " + where +
                           " is out of range: expected -1 (padding) or 0 <= id < G=" + std::to_string(p.G));
  };
  for (int64_t r = 0; r < nbq; ++r)
    for (int64_t i = 0; i < p.Lq; ++i) {
      const int32_t g = p.q_groups[r * p.q_groups_bstride + i];
      if (g < -1 || g >= p.G) return range_error("q_groups", g, r, i, p.q_groups_bstride != 0);
      c.qrow[r * p.Lq + i] = g < 0 ? 0 : allow_row[g];
    }
  for (int64_t r = 0; r < nbk; ++r)
    for (int64_t j = 0; j < p.Lk; ++j) {
      const int32_t g = p.kv_groups[r * p.kv_groups_bstride + j];
      if (g < -1 || g >= p.G) return range_error("kv_groups", g, r, j, p.kv_groups_bstride != 0);
      c.kbit[r * p.Lk + j] = g < 0 ? 0 : uint64_t(1) << g;
    }
  c.nqt = (p.Lq + kBQ - 1) / kBQ;
  c.nkt = (p.Lk + kBK - 1) / kBK;
  if (!c.short_path) {
    c.qor.assign((size_t)(nbq * c.nqt), 0);
    c.qand.assign((size_t)(nbq * c.nqt), ~uint64_t(0));
    c.kor.assign((size_t)(nbk * c.nkt), 0);
    c.kpad.assign((size_t)(nbk * c.nkt), 0);
    for (int64_t r = 0; r < nbq; ++r)
      for (int64_t i = 0; i < p.Lq; ++i) {
        const uint64_t m = c.qrow[r * p.Lq + i];
        c.qor[r * c.nqt + i / kBQ] |= m;
        c.qand[r * c.nqt + i / kBQ] &= m;
      }
    for (int64_t r = 0; r < nbk; ++r)
      for (int64_t j = 0; j < p.Lk; ++j) {
        const uint64_t m = c.kbit[r * p.Lk + j];
        c.kor[r * c.nkt + j / kBK] |= m;
        if (m == 0) c.kpad[r * c.nkt + j / kBK] = 1;
      }
  }
  return Status::ok();
}

// Short path work split: whole batch rows when there are plenty, else (b, kv head).
bool short_per_head(const TaskAttentionProblem& p, int n_threads) {
  return p.B < 8 * std::max(1, n_threads) && p.Hkv > 1;
}

}  // namespace

Status task_attention_forward(const TaskAttentionProblem& p, void* out, float* lse, int n_threads) {
  Status st = check(p);
  if (!st.is_ok()) return st;
  const int64_t rows = p.B * p.Hq * p.Lq;
  if ((st = null_check(out, rows * p.Dv, "out")).is_ok() && (st = null_check(lse, rows, "lse")).is_ok() &&
      (st = null_check(p.q, rows * p.D, "q")).is_ok() && (st = null_check(p.k, p.B * p.Hkv * p.Lk * p.D, "k")).is_ok())
    st = null_check(p.v, p.B * p.Hkv * p.Lk * p.Dv, "v");
  if (!st.is_ok()) return st;
  Ctx c;
  st = setup(p, c);
  if (!st.is_ok()) return st;
  if (rows == 0) return Status::ok();
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* o = static_cast<T*>(out);
#ifdef PYOPS_TA_AVX512
    if constexpr (std::is_same<T, float>::value) {
      if (g_avx512 && c.short_path && lanes_fit(p) && !c.dropout && p.D == p.Dv &&
          (p.D == 4 || p.D == 8 || p.D == 16)) {
        const bool per_head = short_per_head(p, n_threads);
        auto run = [&](auto dd) {
          constexpr int DD = decltype(dd)::value;
          parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads,
                       [&](int64_t item) { forward_lanes16_item<DD>(c, item, per_head, o, lse); });
        };
        if (p.D == 4) run(std::integral_constant<int, 4>{});
        else if (p.D == 8) run(std::integral_constant<int, 8>{});
        else run(std::integral_constant<int, 16>{});
        return Status::ok();
      }
    }
#endif
    if (c.short_path && lanes_fit(p)) {
      const bool per_head = short_per_head(p, n_threads);
      with_lane_dims<T>(p.D, p.Dv, [&](auto dims) {
        constexpr int DD = decltype(dims)::value;
        parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads,
                     [&](int64_t item) { forward_lanes_item<DD, DD, T>(c, item, per_head, o, lse); });
      });
    } else if (c.short_path) {
      const bool per_head = short_per_head(p, n_threads);
      parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads,
                   [&](int64_t item) { forward_short_item<T>(c, item, per_head, o, lse); });
    } else {
      KVPack pk;
      const bool v_rows = p.Dv >= 16;
      const int64_t ldv = round_up(std::max<int64_t>(p.Dv, 1), kW);
      const int64_t ntile = p.B * p.Hkv * c.nkt;
      pk.kst = std::max<int64_t>(p.D, 1) * kBK;
      pk.vst = v_rows ? kBK * ldv : std::max<int64_t>(p.Dv, 1) * kBK;
      pk.k.reset(new float[(size_t)(ntile * pk.kst)]);
      pk.v.reset(new float[(size_t)(ntile * pk.vst)]);
      parallel_for(ntile, n_threads, [&](int64_t ti) { pack_kv_tile<T>(c, ti, v_rows, ldv, pk); });
      parallel_for(p.B * p.Hq * c.nqt, n_threads, [&](int64_t item) { forward_flash_item<T>(c, item, pk, o, lse); });
    }
    return Status::ok();
  });
}

Status task_attention_backward(const TaskAttentionProblem& p, const void* out, const void* dout, const float* lse,
                               void* dq, void* dk, void* dv, int n_threads) {
  Status st = check(p);
  if (!st.is_ok()) return st;
  const int64_t rows = p.B * p.Hq * p.Lq, kvrows = p.B * p.Hkv * p.Lk;
  const std::pair<const void*, int64_t> need[] = {
      {p.q, rows * p.D},  {p.k, kvrows * p.D}, {p.v, kvrows * p.Dv}, {out, rows * p.Dv}, {dout, rows * p.Dv},
      {lse, rows},        {dq, rows * p.D},    {dk, kvrows * p.D},   {dv, kvrows * p.Dv}};
  const char* names[] = {"q", "k", "v", "out", "dout", "lse", "dq", "dk", "dv"};
  for (int t = 0; t < 9; ++t)
    if (!(st = null_check(need[t].first, need[t].second, names[t])).is_ok()) return st;
  if (p.B == 0) return Status::ok();
  Ctx c;
  st = setup(p, c);
  if (!st.is_ok()) return st;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* o = static_cast<const T*>(out);
    const T* go = static_cast<const T*>(dout);
    T* gq = static_cast<T*>(dq);
    T* gk = static_cast<T*>(dk);
    T* gv = static_cast<T*>(dv);
    if (p.Lq == 0 || p.Hq == 0) {  // no query: dk, dv are zero
      const T zero = from_float<T>(0.f);
      std::fill(gk, gk + kvrows * p.D, zero);
      std::fill(gv, gv + kvrows * p.Dv, zero);
      return Status::ok();
    }
#ifdef PYOPS_TA_AVX512
    if constexpr (std::is_same<T, float>::value) {
      if (g_avx512 && c.short_path && !c.dropout && p.D == p.Dv && (p.D == 4 || p.D == 8)) {
        const bool per_head = short_per_head(p, n_threads);
        auto run = [&](auto dd, auto nkb) {
          constexpr int DD = decltype(dd)::value, NKB = decltype(nkb)::value;
          parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads, [&](int64_t item) {
            backward_keylanes16_item<DD, NKB>(c, item, per_head, o, go, lse, gq, gk, gv);
          });
        };
        // D = 4: two key vectors per sweep (their dK, dV and K, V fill the register file);
        // D = 8: one.
        if (p.D == 4) run(std::integral_constant<int, 4>{}, std::integral_constant<int, 2>{});
        else run(std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{});
        return Status::ok();
      }
    }
#endif
    if (c.short_path && lanes_fit(p)) {
      const bool per_head = short_per_head(p, n_threads);
      with_lane_dims<T>(p.D, p.Dv, [&](auto dims) {
        constexpr int DD = decltype(dims)::value;
        parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads, [&](int64_t item) {
          backward_lanes_item<DD, DD, T>(c, item, per_head, o, go, lse, gq, gk, gv);
        });
      });
    } else if (c.short_path) {
      const bool per_head = short_per_head(p, n_threads);
      parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads, [&](int64_t item) {
        backward_short_item<T>(c, item, per_head, o, go, lse, gq, gk, gv);
      });
    } else if (p.B * p.Hkv >= 4 * std::max(1, n_threads)) {  // enough (b, kv head) items to share out
      parallel_for(p.B * p.Hkv, n_threads,
                   [&](int64_t item) { backward_fused_item<T>(c, item, o, go, lse, gq, gk, gv); });
    } else {
      parallel_for(p.B * p.Hkv * c.nkt, n_threads,
                   [&](int64_t item) { backward_kv_item<T>(c, item, o, go, lse, gk, gv); });
      parallel_for(p.B * p.Hq * c.nqt, n_threads,
                   [&](int64_t item) { backward_q_item<T>(c, item, o, go, lse, gq); });
    }
    return Status::ok();
  });
}

}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
