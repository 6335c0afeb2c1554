// fp32 math shared by the moe CPU kernels, private to csrc/moe/: work sizes, and exp / sigmoid /
// erf / gelu / silu written out operation for operation (routing.cu repeats the routing part
// bit for bit). The including translation unit starts with the floating-point pragma of
// routing.cpp (contraction off) before any #include.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/isa.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace moe_impl {

constexpr int64_t kRouteTile = 1024;   // tokens per routing work item (histogram granularity)
constexpr int64_t kTile = 512;         // fp32 elements per L1 tile (gather/combine/activations)
constexpr int64_t kElemItem = 32768;   // elements per work item of the element-wise kernels
constexpr int kLanes = 8;              // independent fp32 accumulators of the lane reductions

// ---- shared fp32 math (the routing part is mirrored exactly by routing.cu) --------------------

inline float pow2i(int32_t n) {  // 2^n for n in [-126, 127]
  const uint32_t bits = (uint32_t)(n + 127) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// exp(x) in fp32: x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite, two-part ln2), a degree-7
// Taylor polynomial for e^r (truncation < 1e-8 relative), and 2^n applied as two exact powers of
// two so that results in the subnormal range round once and large arguments overflow to inf.
// Straight-line, no table, no branch: vectorises, and CUDA can repeat it bit for bit.
inline float exp_f(float x) {
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  const float t = x * 1.44269504088896341f;
  const float nf = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  float r = x - nf * 0.693145751953125f;             // exact: ln2_hi has 16 significant bits
  r = r - nf * 1.42860682030941723212e-6f;
  float p = 1.98412698412698413e-4f;
  p = p * r + 1.38888888888888889e-3f;
  p = p * r + 8.33333333333333333e-3f;
  p = p * r + 4.16666666666666667e-2f;
  p = p * r + 1.66666666666666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t n = (int32_t)nf;  // [-150, 128]
  const int32_t n1 = n >> 1;
  return (p * pow2i(n1)) * pow2i(n - n1);
}

inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), odd extension.
inline float erf_f(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - (p * t) * exp_f(-(ax * ax));
  return std::copysign(y, x);
}

inline float gelu_f(float x) { return 0.5f * x * (1.0f + erf_f(x * 0.7071067811865476f)); }
inline float gelu_grad_f(float x) {
  return 0.5f * (1.0f + erf_f(x * 0.7071067811865476f)) +
         x * 0.3989422804014327f * exp_f(-0.5f * (x * x));
}
inline float silu_f(float x) { return x * sigmoid_f(x); }
inline float silu_grad_f(float x) {
  const float s = sigmoid_f(x);
  return s * (1.0f + x * (1.0f - s));
}

// GPT-OSS's clamped SwiGLU: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
inline float swiglu_oai_f(float gate, float up, float alpha, float limit) {
  const float g = gate > limit ? limit : gate;  // NaN stays NaN (torch.clamp's min/max do too)
  const float u = up < -limit ? -limit : (up > limit ? limit : up);
  return (u + 1.0f) * (g * sigmoid_f(alpha * g));
}

}  // namespace moe_impl
}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
