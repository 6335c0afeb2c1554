// Tile conversions between storage dtypes and fp32 for the CPU kernels. The kernels compute on
// fp32 tiles in L1; these helpers move a tile in or out. Under F16C (the AVX2 build) fp16 goes
// through vcvtph2ps / vcvtps2ph eight lanes at a time: GCC does not vectorise the scalar
// _Float16 conversions by itself, and fp16 would otherwise run at half the speed of bf16.
#pragma once
#include <cstdint>

#include "common/dtype.h"

#if defined(__F16C__) && defined(__AVX__) && PYOPS_HAVE_FLOAT16
#include <immintrin.h>
#define PYOPS_F16C_TILES 1
#else
#define PYOPS_F16C_TILES 0
#endif

namespace pyops {
inline namespace PYOPS_PER_ISA_NS {

// fp32 view of n elements: the source itself for float, else widened into buf.
inline const float* as_float_tile(const float* src, float* /*buf*/, int64_t /*n*/) { return src; }

inline const float* as_float_tile(const bf16_bits* src, float* buf, int64_t n) {
  for (int64_t j = 0; j < n; ++j) buf[j] = bf16_to_float(src[j]);
  return buf;
}

inline const float* as_float_tile(const half_bits* src, float* buf, int64_t n) {
  int64_t j = 0;
#if PYOPS_F16C_TILES
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(buf + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
#endif
  for (; j < n; ++j) buf[j] = half_to_float(src[j]);
  return buf;
}

inline void store_tile(const float* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
}

inline void store_tile(const float* src, bf16_bits* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16(src[j]);
}

inline void store_tile(const float* src, half_bits* dst, int64_t n) {
  int64_t j = 0;
#if PYOPS_F16C_TILES
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; j < n; ++j) dst[j] = float_to_half(src[j]);
}

// Stores that bypass the cache (non-temporal), for outputs far larger than the last-level cache:
// a regular store first reads the destination line (read-for-ownership), so a streaming kernel
// that writes one tensor and reads N + 1 moves N + 3 tensors instead of N + 2. Falls back to
// store_tile where the destination is not 32-byte aligned or the ISA lacks the instructions.
// Callers must issue stream_fence() before other threads may read what was written.
inline void stream_tile(const float* src, float* dst, int64_t n) {
#if PYOPS_F16C_TILES
  if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
    for (; j < n; ++j) dst[j] = src[j];
    return;
  }
#endif
  store_tile(src, dst, n);
}

inline void stream_tile(const float* src, half_bits* dst, int64_t n) {
#if PYOPS_F16C_TILES
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + j),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; j < n; ++j) dst[j] = float_to_half(src[j]);
    return;
  }
#endif
  store_tile(src, dst, n);
}

inline void stream_tile(const float* src, bf16_bits* dst, int64_t n) { store_tile(src, dst, n); }

inline void stream_fence() {
#if PYOPS_F16C_TILES
  _mm_sfence();
#endif
}

}  // inline namespace PYOPS_PER_ISA_NS
}  // namespace pyops
