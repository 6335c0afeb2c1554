// Element types the native kernels accept, and scalar load/store with fp32 compute.
// The dtype codes are part of the binding ABI: pyops/_native.py maps torch dtypes to them.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/half.h"

namespace pyops {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline namespace PYOPS_PER_ISA_NS {

inline bool valid_dtype(int code) { return code >= 0 && code <= 2; }

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// Storage type for each dtype; arithmetic always happens in float.
template <DType D> struct Storage;
template <> struct Storage<DType::kFloat32> { using type = float; };
template <> struct Storage<DType::kFloat16> { using type = half_bits; };
template <> struct Storage<DType::kBFloat16> { using type = bf16_bits; };

inline float to_float(float x) { return x; }
inline float to_float(half_bits x) { return half_to_float(x); }
inline float to_float(bf16_bits x) { return bf16_to_float(x); }

template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline half_bits from_float<half_bits>(float x) { return float_to_half(x); }
template <> inline bf16_bits from_float<bf16_bits>(float x) { return float_to_bf16(x); }

// Calls fn.template operator()<T>() with T the storage type of `code`.
template <typename Fn>
inline auto dispatch_dtype(DType code, Fn&& fn) {
  switch (code) {
    case DType::kFloat16: return fn(half_bits{});
    case DType::kBFloat16: return fn(bf16_bits{});
    case DType::kFloat32:
    default: return fn(float{});
  }
}

}  // inline namespace PYOPS_PER_ISA_NS
}  // namespace pyops
