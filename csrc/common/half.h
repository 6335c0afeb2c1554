// fp16 / bf16 <-> fp32 conversion without torch. Where the compiler has _Float16 (GCC >= 12 on
// x86-64 and aarch64), fp16 conversions go through it so that loops vectorise to vcvtph2ps /
// vcvtps2ph under F16C; otherwise a portable bit-level conversion (round to nearest even).
// bf16 is the upper half of an fp32: widening is a shift, narrowing rounds to nearest even and
// keeps NaNs quiet.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/isa.h"

namespace pyops {
inline namespace PYOPS_PER_ISA_NS {

#if defined(__FLT16_MAX__) && !defined(PYOPS_NO_FLOAT16)
#define PYOPS_HAVE_FLOAT16 1
using half_bits = _Float16;
inline float half_to_float(half_bits h) { return static_cast<float>(h); }
inline half_bits float_to_half(float f) { return static_cast<_Float16>(f); }
#else
#define PYOPS_HAVE_FLOAT16 0
struct half_bits { uint16_t x; };
inline float half_to_float(half_bits h) {
  const uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16;
  uint32_t exp = (h.x >> 10) & 0x1fu;
  uint32_t man = h.x & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113u;
    while ((man & 0x400u) == 0) { man <<= 1; --exp; }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline half_bits float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) return {(uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u))};
  if (abs >= 0x477ff000u) return {(uint16_t)(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {  // result is subnormal or zero
    float a;
    std::memcpy(&a, &abs, 4);
    const float scaled = a * 16777216.0f;  // 2^24: fp16 subnormal ulp becomes 1
    uint32_t m = (uint32_t)scaled;
    const float rem = scaled - (float)m;
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return {(uint16_t)(sign | m)};
  }
  const uint32_t lsb = (abs >> 13) & 1u;
  const uint32_t rounded = abs + 0xfffu + lsb;
  return {(uint16_t)(sign | ((rounded - 0x38000000u) >> 13))};
}
#endif

struct bf16_bits { uint16_t x; };

inline float bf16_to_float(bf16_bits b) {
  const uint32_t u = (uint32_t)b.x << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16_bits float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return {(uint16_t)(is_nan ? ((u >> 16) | 0x40u) : rounded)};
}

}  // inline namespace PYOPS_PER_ISA_NS
}  // namespace pyops
