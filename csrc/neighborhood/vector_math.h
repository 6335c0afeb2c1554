// Vector math of the neighbourhood-attention CPU kernels, private to csrc/neighborhood/: the
// eight-lane V8 type (AVX2+FMA intrinsics or plain arrays), exp, the chunk constants and strides,
// and the micro-kernels (scores of a query against rows of keys, weighted sums of value rows).
// Every translation unit of the family is compiled once per ISA, so these inline helpers live in
// pyops::isa_<isa>::neighborhood_impl and each build keeps its own copies.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "common/isa.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace neighborhood_impl {

// ------------------------------------------------------------------------------------------------
// 8-lane fp32 vectors: AVX2+FMA intrinsics, or plain arrays in the baseline build.
// ------------------------------------------------------------------------------------------------
#if defined(__AVX2__) && defined(__FMA__)
struct V8 {
  __m256 v;
};
inline V8 vzero() { return {_mm256_setzero_ps()}; }
inline V8 vset1(float x) { return {_mm256_set1_ps(x)}; }
inline V8 vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void vstore(float* p, V8 a) { _mm256_storeu_ps(p, a.v); }
inline V8 vfma(V8 a, V8 b, V8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline V8 vadd(V8 a, V8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline V8 vsub(V8 a, V8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline V8 vmul(V8 a, V8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline V8 vmax(V8 a, V8 b) { return {_mm256_max_ps(a.v, b.v)}; }
inline V8 vmin(V8 a, V8 b) { return {_mm256_min_ps(a.v, b.v)}; }
inline V8 vfloor(V8 a) { return {_mm256_floor_ps(a.v)}; }
// 2^n for integral n in [-127, 127] held as floats (exponent-field construction).
inline V8 vexp2i(V8 n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_castsi256_ps(e)};
}
inline float vhmax(V8 a) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
inline float vhsum(V8 a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
#else
struct V8 {
  float x[8];
};
inline V8 vzero() { return V8{{0, 0, 0, 0, 0, 0, 0, 0}}; }
inline V8 vset1(float a) { return V8{{a, a, a, a, a, a, a, a}}; }
inline V8 vload(const float* p) {
  V8 r;
  for (int l = 0; l < 8; ++l) r.x[l] = p[l];
  return r;
}
inline void vstore(float* p, V8 a) {
  for (int l = 0; l < 8; ++l) p[l] = a.x[l];
}
#define PYOPS_NA_V8_BINOP(name, expr)            \
  inline V8 name(V8 a, V8 b) {                   \
    V8 r;                                        \
    for (int l = 0; l < 8; ++l) r.x[l] = (expr); \
    return r;                                    \
  }
PYOPS_NA_V8_BINOP(vadd, a.x[l] + b.x[l])
PYOPS_NA_V8_BINOP(vsub, a.x[l] - b.x[l])
PYOPS_NA_V8_BINOP(vmul, a.x[l] * b.x[l])
PYOPS_NA_V8_BINOP(vmax, a.x[l] > b.x[l] ? a.x[l] : b.x[l])
PYOPS_NA_V8_BINOP(vmin, a.x[l] < b.x[l] ? a.x[l] : b.x[l])
#undef PYOPS_NA_V8_BINOP
inline V8 vfma(V8 a, V8 b, V8 c) {
  V8 r;
  for (int l = 0; l < 8; ++l) r.x[l] = a.x[l] * b.x[l] + c.x[l];
  return r;
}
inline V8 vfloor(V8 a) {
  V8 r;
  for (int l = 0; l < 8; ++l) r.x[l] = std::floor(a.x[l]);
  return r;
}
inline V8 vexp2i(V8 n) {
  V8 r;
  for (int l = 0; l < 8; ++l) {
    const uint32_t bits = (uint32_t)((int32_t)n.x[l] + 127) << 23;
    std::memcpy(&r.x[l], &bits, 4);
  }
  return r;
}
inline float vhmax(V8 a) {
  float m = a.x[0];
  for (int l = 1; l < 8; ++l) m = a.x[l] > m ? a.x[l] : m;
  return m;
}
inline float vhsum(V8 a) {
  return ((a.x[0] + a.x[4]) + (a.x[2] + a.x[6])) + ((a.x[1] + a.x[5]) + (a.x[3] + a.x[7]));
}
#endif

// exp(x) for x <= 0 (scores minus their maximum or logsumexp); Cephes-style range reduction and
// degree-6 polynomial, ~1 ulp. Arguments below -87.3 give 0 or a tiny normal number.
inline V8 vexp(V8 x) {
  x = vmax(x, vset1(-87.3f));
  x = vmin(x, vset1(88.0f));
  const V8 fx = vfloor(vfma(x, vset1(1.44269504088896341f), vset1(0.5f)));
  x = vfma(fx, vset1(-0.693359375f), x);
  x = vfma(fx, vset1(2.12194440e-4f), x);
  V8 y = vset1(1.9875691500e-4f);
  y = vfma(y, x, vset1(1.3981999507e-3f));
  y = vfma(y, x, vset1(8.3334519073e-3f));
  y = vfma(y, x, vset1(4.1665795894e-2f));
  y = vfma(y, x, vset1(1.6666665459e-1f));
  y = vfma(y, x, vset1(5.0000001201e-1f));
  y = vfma(y, vmul(x, x), vadd(x, vset1(1.f)));
  return vmul(y, vexp2i(fx));
}

constexpr float kMasked = -1e30f;  // score of a padding lane: exp(kMasked - m) == 0
constexpr int64_t kTile[3] = {1, 8, 64};  // target chunk lengths per dimension (in-group)
constexpr int64_t kQuerySlices = 128;      // backward: query-centric work split (fixed, sizes only)

inline int64_t round8(int64_t n) { return (n + 7) & ~int64_t(7); }

// Strides of the transposed scratch ([row][c][lane]): the lane stride is an odd number of 64-byte
// lines with room for a vector read past the last lane, and the row stride is an odd number of lines
// as well. A power-of-two stride would put a window's D lines of every row into a few L1 sets.
inline int64_t lane_ld(int64_t n) {
  int64_t lines = (n + 8 + 15) / 16;
  if (lines % 2 == 0) ++lines;
  return 16 * lines;
}
inline int64_t row_ld(int64_t width, int64_t ld) {
  int64_t lines = (width * ld + 15) / 16;
  if (lines % 2 == 0) ++lines;
  return 16 * lines;
}

// ------------------------------------------------------------------------------------------------
// Micro-kernels.
// ------------------------------------------------------------------------------------------------

// out[r][8v + l] = sum_d x[d] * rows[r][d * stride + 8v + l] for r < R, v < NV.
template <int R, int NV>
inline void dot_rows_kernel(const float* x, int64_t D, const float* const* rows, int64_t stride,
                            float* const* out, int64_t voff) {
  V8 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    const V8 xb = vset1(x[d]);
    for (int r = 0; r < R; ++r) {
      const float* p = rows[r] + d * stride + voff;
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(xb, vload(p + 8 * v), acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(out[r] + voff + 8 * v, acc[r][v]);
}

// Scores of one vector x [D] against n_rows rows of transposed data (rows[r][d * stride + l],
// l < W = 8 * nv): sc[r * W + l]. Blocks of up to 8 accumulators, so that the FMA chains over D
// overlap (one chain would wait on the FMA latency at every step).
template <int NV>
void dot_rows_tail(int64_t n, const float* x, int64_t D, const float* const* rows, int64_t stride,
                   float* const* outs, int64_t voff) {
  switch (n) {
    case 1: dot_rows_kernel<1, NV>(x, D, rows, stride, outs, voff); break;
    case 2: dot_rows_kernel<2, NV>(x, D, rows, stride, outs, voff); break;
    case 3: dot_rows_kernel<3, NV>(x, D, rows, stride, outs, voff); break;
    case 4: dot_rows_kernel<4, NV>(x, D, rows, stride, outs, voff); break;
    case 5: dot_rows_kernel<5, NV>(x, D, rows, stride, outs, voff); break;
    case 6: dot_rows_kernel<6, NV>(x, D, rows, stride, outs, voff); break;
    case 7: dot_rows_kernel<7, NV>(x, D, rows, stride, outs, voff); break;
    default: dot_rows_kernel<8, NV>(x, D, rows, stride, outs, voff); break;
  }
}

inline void dot_rows(const float* x, int64_t D, const float* const* rows, int64_t n_rows, int64_t stride,
                     int64_t nv, float* sc, int64_t W, const float** out_ptrs_scratch) {
  float** outs = const_cast<float**>(reinterpret_cast<const float**>(out_ptrs_scratch));
  for (int64_t r = 0; r < n_rows; ++r) outs[r] = sc + r * W;
  if (nv == 1) {
    for (int64_t r = 0; r < n_rows; r += 8)
      dot_rows_tail<1>(std::min<int64_t>(8, n_rows - r), x, D, rows + r, stride, outs + r, 0);
    return;
  }
  if (nv == 2) {
    for (int64_t r = 0; r < n_rows; r += 4) {
      const int64_t n = std::min<int64_t>(4, n_rows - r);
      if (n == 4) dot_rows_kernel<4, 2>(x, D, rows + r, stride, outs + r, 0);
      else if (n == 3) dot_rows_kernel<3, 2>(x, D, rows + r, stride, outs + r, 0);
      else if (n == 2) dot_rows_kernel<2, 2>(x, D, rows + r, stride, outs + r, 0);
      else dot_rows_kernel<1, 2>(x, D, rows + r, stride, outs + r, 0);
    }
    return;
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t v0 = 0; v0 < nv; v0 += 8) {
      const int64_t nc = std::min<int64_t>(8, nv - v0);
      const int64_t voff = 8 * v0;
      switch (nc) {
        case 1: dot_rows_kernel<1, 1>(x, D, rows + r, stride, outs + r, voff); break;
        case 2: dot_rows_kernel<1, 2>(x, D, rows + r, stride, outs + r, voff); break;
        case 3: dot_rows_kernel<1, 3>(x, D, rows + r, stride, outs + r, voff); break;
        case 4: dot_rows_kernel<1, 4>(x, D, rows + r, stride, outs + r, voff); break;
        case 5: dot_rows_kernel<1, 5>(x, D, rows + r, stride, outs + r, voff); break;
        case 6: dot_rows_kernel<1, 6>(x, D, rows + r, stride, outs + r, voff); break;
        case 7: dot_rows_kernel<1, 7>(x, D, rows + r, stride, outs + r, voff); break;
        default: dot_rows_kernel<1, 8>(x, D, rows + r, stride, outs + r, voff); break;
      }
    }
  }
}

// acc[c] (NC vectors at column offset coff) = sum_r sum_{l < n} w[r * W + l] * rows[r][l * ld + coff + 8c].
template <int NC>
inline void wsum_kernel(const float* w, int64_t W, int64_t n_rows, int64_t n, const float* const* rows,
                        int64_t ld, int64_t coff, float* acc) {
  V8 a[NC], b[NC];
  for (int c = 0; c < NC; ++c) a[c] = b[c] = vzero();
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* wr = w + r * W;
    const float* base = rows[r] + coff;
    int64_t l = 0;
    for (; l + 2 <= n; l += 2) {
      const V8 p0 = vset1(wr[l]), p1 = vset1(wr[l + 1]);
      const float* x0 = base + l * ld;
      const float* x1 = x0 + ld;
      for (int c = 0; c < NC; ++c) a[c] = vfma(p0, vload(x0 + 8 * c), a[c]);
      for (int c = 0; c < NC; ++c) b[c] = vfma(p1, vload(x1 + 8 * c), b[c]);
    }
    if (l < n) {
      const V8 p0 = vset1(wr[l]);
      const float* x0 = base + l * ld;
      for (int c = 0; c < NC; ++c) a[c] = vfma(p0, vload(x0 + 8 * c), a[c]);
    }
  }
  for (int c = 0; c < NC; ++c) vstore(acc + coff + 8 * c, vadd(a[c], b[c]));
}

// acc[0 .. 8 * nvec) = sum_r sum_{l < n} w[r * W + l] * rows[r][l * ld + ...].
inline void wsum(const float* w, int64_t W, int64_t n_rows, int64_t n, const float* const* rows, int64_t ld,
                 int64_t nvec, float* acc) {
  for (int64_t c0 = 0; c0 < nvec; c0 += 4) {
    const int64_t nc = std::min<int64_t>(4, nvec - c0);
    switch (nc) {
      case 1: wsum_kernel<1>(w, W, n_rows, n, rows, ld, 8 * c0, acc); break;
      case 2: wsum_kernel<2>(w, W, n_rows, n, rows, ld, 8 * c0, acc); break;
      case 3: wsum_kernel<3>(w, W, n_rows, n, rows, ld, 8 * c0, acc); break;
      default: wsum_kernel<4>(w, W, n_rows, n, rows, ld, 8 * c0, acc); break;
    }
  }
}

}  // namespace neighborhood_impl
}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
