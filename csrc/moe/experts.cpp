// The moe CPU kernels around the expert GEMMs (moe/moe.h), one translation unit per ISA (see
// CMakeLists.txt): gather, the activations and their gradients, combine and its gradient, and
// scatter_add, with `order` validated and inverted first.
//
// Floating-point contraction (a * b + c -> fma) is turned off for this file, as for routing.cpp:
// the AVX2 build would otherwise fuse where the baseline build cannot, and the activations and
// their gradients would differ in the last bit between the two builds (fp32_math.h is shared).
// no-trapping-math (values unchanged; only FP exception flags may differ) lets GCC if-convert
// the clamps and selects so that the exp/erf loops vectorise.
#if defined(__clang__)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/convert.h"
#include "common/isa.h"
#include "common/thread_pool.h"
#include "moe/fp32_math.h"
#include "moe/moe.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace moe_impl {

namespace {

// ---- SwiGLU on 16 lanes ----------------------------------------------------------------------
//
// The AVX2 build's loops run 8 lanes wide; on AVX-512 machines the SwiGLU tiles between the
// expert GEMMs run 16 wide: their exp is compute-bound, the rest is the memory traffic of the
// saved activations. Every lane performs exactly exp_f / sigmoid_f's operations in the same
// order (no contraction), so the results are the same bits as the 8-lane loops.
#if defined(__AVX2__) && defined(__GNUC__) && !defined(__clang__)
#define PYOPS_MOE_AVX512 1
const bool g_moe_avx512 =
    (__builtin_cpu_init(), __builtin_cpu_supports("avx512f")) && !std::getenv("PYOPS_MOE_NO_AVX512");

__attribute__((target("avx512f"))) inline __m512 pow2i16(__m512i n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
}

__attribute__((target("avx512f"))) inline __m512 exp16_f(__m512 x) {
  // max/min return their second operand when either is NaN: NaN passes through, as in exp_f.
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 nf = _mm512_sub_ps(_mm512_add_ps(t, _mm512_set1_ps(12582912.0f)), _mm512_set1_ps(12582912.0f));
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(nf, _mm512_set1_ps(0.693145751953125f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(nf, _mm512_set1_ps(1.42860682030941723212e-6f)));
  __m512 p = _mm512_set1_ps(1.98412698412698413e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.38888888888888889e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.33333333333333333e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.16666666666666667e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.66666666666666667e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(0.5f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
  const __m512i n = _mm512_cvttps_epi32(nf);
  const __m512i n1 = _mm512_srai_epi32(n, 1);
  return _mm512_mul_ps(_mm512_mul_ps(p, pow2i16(n1)), pow2i16(_mm512_sub_epi32(n, n1)));
}

__attribute__((target("avx512f"))) inline __m512 sigmoid16_f(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16_f(neg)));
}

inline __mmask16 tail_mask16(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

// out = silu(x) * y
__attribute__((target("avx512f"))) void swiglu_forward_512(const float* x, const float* y, float* out, int64_t len) {
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = tail_mask16(len - j);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + j);
    const __m512 yv = _mm512_maskz_loadu_ps(m, y + j);
    _mm512_mask_storeu_ps(out + j, m, _mm512_mul_ps(_mm512_mul_ps(xv, sigmoid16_f(xv)), yv));
  }
}

// oa = g * y * (s * (1 + x * (1 - s))), ob = g * (x * s), s = sigmoid(x); and h = (x * s) * y
// (the forward's value) when h is not null.
__attribute__((target("avx512f"))) void swiglu_backward_512(const float* x, const float* y, const float* g, float* oa,
                                                            float* ob, float* h, int64_t len) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = tail_mask16(len - j);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + j);
    const __m512 yv = _mm512_maskz_loadu_ps(m, y + j);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + j);
    const __m512 sv = sigmoid16_f(xv);
    const __m512 dsil = _mm512_mul_ps(sv, _mm512_add_ps(one, _mm512_mul_ps(xv, _mm512_sub_ps(one, sv))));
    _mm512_mask_storeu_ps(oa + j, m, _mm512_mul_ps(_mm512_mul_ps(gv, yv), dsil));
    const __m512 xs = _mm512_mul_ps(xv, sv);
    _mm512_mask_storeu_ps(ob + j, m, _mm512_mul_ps(gv, xs));
    if (h) _mm512_mask_storeu_ps(h + j, m, _mm512_mul_ps(xs, yv));
  }
}
#endif

// lanes[l] += x[i] * y[i] for i = l mod 8 (the tail goes to lane 0).
inline void dot_lanes(const float* x, const float* y, int64_t n, float (&lanes)[kLanes]) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[i + l] * y[i + l];
  for (; i < n; ++i) lanes[0] += x[i] * y[i];
}
// ---- inverse permutation of `order` (validated) -----------------------------------------------

Status check_order_range(const int64_t* order, int64_t n, int n_threads) {
  const int64_t items = (n + kElemItem - 1) / kElemItem;
  std::vector<int64_t> bad(items, -1);
  parallel_for(items, n_threads, [&](int64_t it) {
    const int64_t r1 = std::min(n, (it + 1) * kElemItem);
    for (int64_t r = it * kElemItem; r < r1; ++r)
      if (order[r] < 0 || order[r] >= n) {
        bad[it] = r;
        return;
      }
  });
  for (int64_t it = 0; it < items; ++it)
    if (bad[it] >= 0)
      return Status::out_of_range("order: entry " + std::to_string(bad[it]) + " is " +
                                  std::to_string(order[bad[it]]) + ", expected a value in [0, " +
                                  std::to_string(n) + ")");
  return Status::ok();
}

// pos[order[r]] = r; fails unless order is a permutation of [0, n).
Status invert_order(const int64_t* order, int64_t n, std::vector<int64_t>& pos, int n_threads) {
  Status st = check_order_range(order, n, n_threads);
  if (!st.is_ok()) return st;
  pos.assign(n, -1);
  int64_t* p = pos.data();
  const int64_t items = (n + kElemItem - 1) / kElemItem;
  parallel_for(items, n_threads, [&](int64_t it) {
    const int64_t r1 = std::min(n, (it + 1) * kElemItem);
    for (int64_t r = it * kElemItem; r < r1; ++r) __atomic_store_n(p + order[r], r, __ATOMIC_RELAXED);
  });
  std::vector<int64_t> missing(items, -1);
  parallel_for(items, n_threads, [&](int64_t it) {
    const int64_t a1 = std::min(n, (it + 1) * kElemItem);
    for (int64_t a = it * kElemItem; a < a1; ++a)
      if (p[a] < 0) {
        missing[it] = a;
        return;
      }
  });
  for (int64_t it = 0; it < items; ++it)
    if (missing[it] >= 0)
      return Status::invalid("order: is not a permutation of [0, " + std::to_string(n) +
                             "): assignment " + std::to_string(missing[it]) +
                             " is missing (another appears twice)");
  return Status::ok();
}

Status check_sizes(int64_t k, int64_t T, int64_t d) {
  if (k < 1) return Status::invalid("k: expected >= 1, got " + std::to_string(k));
  if (T < 0) return Status::invalid("T: expected >= 0, got " + std::to_string(T));
  if (d < 0) return Status::invalid("d: expected >= 0, got " + std::to_string(d));
  return Status::ok();
}

int64_t rows_per_item(int64_t d) { return std::max<int64_t>(1, kElemItem / std::max<int64_t>(d, 1)); }

}  // namespace
}  // namespace moe_impl

using namespace moe_impl;

Status moe_gather(const void* x, const int64_t* order, int64_t k, int64_t T, int64_t d, void* rows,
                  DType dtype, int n_threads) {
  Status st = check_sizes(k, T, d);
  if (!st.is_ok()) return st;
  const int64_t n = T * k;
  if (n == 0) return Status::ok();
  if (x == nullptr || order == nullptr || rows == nullptr) return Status::invalid("moe_gather: null data pointer");
  st = check_order_range(order, n, n_threads);
  if (!st.is_ok()) return st;
  if (d == 0) return Status::ok();
  const size_t esz = dtype == DType::kFloat32 ? 4 : 2;
  const int64_t per = rows_per_item(d);
  const int64_t items = (n + per - 1) / per;
  const char* src = static_cast<const char*>(x);
  char* dst = static_cast<char*>(rows);
  parallel_for(items, n_threads, [&](int64_t it) {
    const int64_t r1 = std::min(n, (it + 1) * per);
    for (int64_t r = it * per; r < r1; ++r)
      std::memcpy(dst + (size_t)(r * d) * esz, src + (size_t)((order[r] / k) * d) * esz, (size_t)d * esz);
  });
  return Status::ok();
}

namespace {

// h = act(x[, y]) over one fp32 tile (y: the GLU activations' second input; alpha and limit:
// swiglu_oai's).
inline void act_forward_tile(MoeAct act, const float* x, const float* y, float* out, int64_t len, float alpha,
                             float limit) {
  switch (act) {
    case MoeAct::kSwigluOai:
      for (int64_t j = 0; j < len; ++j) out[j] = swiglu_oai_f(x[j], y[j], alpha, limit);
      break;
    case MoeAct::kSwiglu:
#ifdef PYOPS_MOE_AVX512
      if (g_moe_avx512) {
        swiglu_forward_512(x, y, out, len);
        break;
      }
#endif
      for (int64_t j = 0; j < len; ++j) out[j] = silu_f(x[j]) * y[j];
      break;
    case MoeAct::kGeglu:
      for (int64_t j = 0; j < len; ++j) out[j] = gelu_f(x[j]) * y[j];
      break;
    case MoeAct::kGelu:
      for (int64_t j = 0; j < len; ++j) out[j] = gelu_f(x[j]);
      break;
    case MoeAct::kSilu:
      for (int64_t j = 0; j < len; ++j) out[j] = silu_f(x[j]);
      break;
    case MoeAct::kRelu:
      for (int64_t j = 0; j < len; ++j) out[j] = x[j] < 0.0f ? 0.0f : x[j];
      break;
  }
}

}  // namespace

Status moe_act_forward(const void* a, const void* b, void* h, int64_t n_rows, int64_t hdim, int act,
                       DType dtype, int n_threads, float alpha, float limit) {
  if (act < 0 || act > 5)
    return Status::invalid("act: expected 0..5 (swiglu, geglu, gelu, silu, relu, swiglu_oai), got " + std::to_string(act));
  if (n_rows < 0 || hdim < 0) return Status::invalid("moe_act_forward: negative size");
  const bool glu = moe_act_is_glu(act);
  const int64_t n = n_rows * hdim;
  if (n == 0) return Status::ok();
  if (a == nullptr || h == nullptr || (glu && b == nullptr)) return Status::invalid("moe_act_forward: null data pointer");
  const int64_t items = (n + kElemItem - 1) / kElemItem;
#ifdef PYOPS_MOE_AVX512
  if (g_moe_avx512 && dtype == DType::kFloat32 && (MoeAct)act == MoeAct::kSwiglu) {
    // fp32 needs no conversion tiles: the 16-lane loop reads and writes the arrays in place, with
    // the same bits (copies through L1 tiles would add memory traffic to a memory-bound pass).
    const float* A = static_cast<const float*>(a);
    const float* B = static_cast<const float*>(b);
    float* H = static_cast<float*>(h);
    parallel_for(items, n_threads, [&](int64_t it) {
      const int64_t i0 = it * kElemItem;
      swiglu_forward_512(A + i0, B + i0, H + i0, std::min(n, i0 + kElemItem) - i0);
    });
    return Status::ok();
  }
#endif
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* A = static_cast<const S*>(a);
    const S* B = static_cast<const S*>(b);
    S* H = static_cast<S*>(h);
    parallel_for(items, n_threads, [&](int64_t it) {
      alignas(64) float abuf[kTile], bbuf[kTile], out[kTile];
      const int64_t i1 = std::min(n, (it + 1) * kElemItem);
      for (int64_t i0 = it * kElemItem; i0 < i1; i0 += kTile) {
        const int64_t len = std::min(kTile, i1 - i0);
        const float* x = as_float_tile(A + i0, abuf, len);
        const float* y = glu ? as_float_tile(B + i0, bbuf, len) : nullptr;
        act_forward_tile((MoeAct)act, x, y, out, len, alpha, limit);
        store_tile(out, H + i0, len);
      }
    });
    return 0;
  });
  return Status::ok();
}

Status moe_act_backward(const void* a, const void* b, const void* dh, void* da, void* db,
                        int64_t n_rows, int64_t hdim, int act, DType dtype, int n_threads, void* h, float alpha,
                        float limit) {
  if (act < 0 || act > 5)
    return Status::invalid("act: expected 0..5 (swiglu, geglu, gelu, silu, relu, swiglu_oai), got " + std::to_string(act));
  if (n_rows < 0 || hdim < 0) return Status::invalid("moe_act_backward: negative size");
  const bool glu = moe_act_is_glu(act);
  const int64_t n = n_rows * hdim;
  if (n == 0) return Status::ok();
  if (a == nullptr || dh == nullptr || da == nullptr || (glu && (b == nullptr || db == nullptr)))
    return Status::invalid("moe_act_backward: null data pointer");
  const int64_t items = (n + kElemItem - 1) / kElemItem;
#ifdef PYOPS_MOE_AVX512
  if (g_moe_avx512 && dtype == DType::kFloat32 && (MoeAct)act == MoeAct::kSwiglu) {
    // As in moe_act_forward: fp32 in place, no tiles.
    const float* A = static_cast<const float*>(a);
    const float* B = static_cast<const float*>(b);
    const float* G = static_cast<const float*>(dh);
    float* DA = static_cast<float*>(da);
    float* DB = static_cast<float*>(db);
    float* H = static_cast<float*>(h);
    parallel_for(items, n_threads, [&](int64_t it) {
      const int64_t i0 = it * kElemItem;
      swiglu_backward_512(A + i0, B + i0, G + i0, DA + i0, DB + i0, H ? H + i0 : nullptr,
                          std::min(n, i0 + kElemItem) - i0);
    });
    return Status::ok();
  }
#endif
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* A = static_cast<const S*>(a);
    const S* B = static_cast<const S*>(b);
    const S* G = static_cast<const S*>(dh);
    S* DA = static_cast<S*>(da);
    S* DB = static_cast<S*>(db);
    S* H = static_cast<S*>(h);
    parallel_for(items, n_threads, [&](int64_t it) {
      alignas(64) float abuf[kTile], bbuf[kTile], gbuf[kTile], oa[kTile], ob[kTile], oh[kTile];
      const int64_t i1 = std::min(n, (it + 1) * kElemItem);
      for (int64_t i0 = it * kElemItem; i0 < i1; i0 += kTile) {
        const int64_t len = std::min(kTile, i1 - i0);
        const float* x = as_float_tile(A + i0, abuf, len);
        const float* g = as_float_tile(G + i0, gbuf, len);
        bool h_done = false;  // the SwiGLU loops write h themselves (x·s is shared with db)
        switch ((MoeAct)act) {
          case MoeAct::kSwiglu: {
            const float* y = as_float_tile(B + i0, bbuf, len);
#ifdef PYOPS_MOE_AVX512
            if (g_moe_avx512) {
              swiglu_backward_512(x, y, g, oa, ob, H ? oh : nullptr, len);
              h_done = true;
              break;
            }
#endif
            for (int64_t j = 0; j < len; ++j) {
              const float s = sigmoid_f(x[j]);
              const float xs = x[j] * s;
              oa[j] = g[j] * y[j] * (s * (1.0f + x[j] * (1.0f - s)));
              ob[j] = g[j] * xs;
              oh[j] = xs * y[j];
            }
            h_done = true;
            break;
          }
          case MoeAct::kSwigluOai: {
            const float* y = as_float_tile(B + i0, bbuf, len);
            for (int64_t j = 0; j < len; ++j) {
              // gate: g = min(x, limit) (gradient where x <= limit); up: u = clamp(y, ±limit)
              const bool gate_in = x[j] <= limit;
              const float gx = gate_in ? x[j] : limit;
              const bool up_in = y[j] >= -limit && y[j] <= limit;
              const float u1 = (up_in ? y[j] : (y[j] < -limit ? -limit : limit)) + 1.0f;
              const float s = sigmoid_f(alpha * gx);
              const float glu_v = gx * s;
              oa[j] = gate_in ? g[j] * u1 * (s + gx * alpha * s * (1.0f - s)) : 0.0f;
              ob[j] = up_in ? g[j] * glu_v : 0.0f;
              oh[j] = u1 * glu_v;
            }
            h_done = true;
            break;
          }
          case MoeAct::kGeglu: {
            const float* y = as_float_tile(B + i0, bbuf, len);
            for (int64_t j = 0; j < len; ++j) {
              oa[j] = g[j] * y[j] * gelu_grad_f(x[j]);
              ob[j] = g[j] * gelu_f(x[j]);
            }
            break;
          }
          case MoeAct::kGelu:
            for (int64_t j = 0; j < len; ++j) oa[j] = g[j] * gelu_grad_f(x[j]);
            break;
          case MoeAct::kSilu:
            for (int64_t j = 0; j < len; ++j) oa[j] = g[j] * silu_grad_f(x[j]);
            break;
          case MoeAct::kRelu:
            for (int64_t j = 0; j < len; ++j) oa[j] = x[j] > 0.0f ? g[j] : 0.0f;
            break;
        }
        store_tile(oa, DA + i0, len);
        if (glu) store_tile(ob, DB + i0, len);
        if (H) {
          if (!h_done)
            act_forward_tile((MoeAct)act, x, glu ? as_float_tile(B + i0, bbuf, len) : nullptr, oh, len, alpha, limit);
          store_tile(oh, H + i0, len);
        }
      }
    });
    return 0;
  });
  return Status::ok();
}

Status moe_combine(const void* ys, const int64_t* order, const float* weights, const uint8_t* dropped,
                   int64_t k, int64_t T, int64_t d, void* y, DType dtype, int n_threads) {
  Status st = check_sizes(k, T, d);
  if (!st.is_ok()) return st;
  const int64_t n = T * k;
  if (n == 0) return Status::ok();
  if (ys == nullptr || order == nullptr || weights == nullptr || y == nullptr)
    return Status::invalid("moe_combine: null data pointer");
  std::vector<int64_t> pos;
  st = invert_order(order, n, pos, n_threads);
  if (!st.is_ok()) return st;
  if (d == 0) return Status::ok();
  const int64_t per = rows_per_item(d);
  const int64_t items = (T + per - 1) / per;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* Y = static_cast<const S*>(ys);
    S* out = static_cast<S*>(y);
    parallel_for(items, n_threads, [&](int64_t it) {
      alignas(64) float acc[kTile], buf[kTile];
      const int64_t t1 = std::min(T, (it + 1) * per);
      for (int64_t t = it * per; t < t1; ++t)
        for (int64_t c0 = 0; c0 < d; c0 += kTile) {
          const int64_t len = std::min(kTile, d - c0);
          for (int64_t i = 0; i < len; ++i) acc[i] = 0.0f;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t a = t * k + j;
            if (dropped && dropped[a]) continue;
            const float w = weights[a];
            const float* row = as_float_tile(Y + pos[a] * d + c0, buf, len);
            for (int64_t i = 0; i < len; ++i) acc[i] += w * row[i];
          }
          store_tile(acc, out + t * d + c0, len);
        }
    });
    return 0;
  });
  return Status::ok();
}

Status moe_combine_backward(const void* dy, const void* ys, const int64_t* order, const float* weights,
                            const uint8_t* dropped, int64_t k, int64_t T, int64_t d, void* dys,
                            float* dweights, DType dtype, int n_threads) {
  Status st = check_sizes(k, T, d);
  if (!st.is_ok()) return st;
  const int64_t n = T * k;
  if (n == 0) return Status::ok();
  if (dy == nullptr || order == nullptr || weights == nullptr || (dys == nullptr && dweights == nullptr) ||
      (dweights != nullptr && ys == nullptr))
    return Status::invalid("moe_combine_backward: null data pointer");
  std::vector<int64_t> pos;
  st = invert_order(order, n, pos, n_threads);
  if (!st.is_ok()) return st;
  const int64_t per = rows_per_item(d);
  const int64_t items = (T + per - 1) / per;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* DY = static_cast<const S*>(dy);
    const S* Y = static_cast<const S*>(ys);
    S* DYS = static_cast<S*>(dys);
    parallel_for(items, n_threads, [&](int64_t it) {
      alignas(64) float gbuf[kTile], buf[kTile], out[kTile];
      const int64_t t1 = std::min(T, (it + 1) * per);
      for (int64_t t = it * per; t < t1; ++t)
        for (int64_t j = 0; j < k; ++j) {
          const int64_t a = t * k + j;
          const int64_t r = pos[a];
          const bool drop = dropped && dropped[a];
          const float w = weights[a];
          float lanes[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          for (int64_t c0 = 0; c0 < d; c0 += kTile) {
            const int64_t len = std::min(kTile, d - c0);
            if (drop) {
              if (DYS) {
                for (int64_t i = 0; i < len; ++i) out[i] = 0.0f;
                store_tile(out, DYS + r * d + c0, len);
              }
              continue;
            }
            const float* g = as_float_tile(DY + t * d + c0, gbuf, len);
            if (DYS) {
              for (int64_t i = 0; i < len; ++i) out[i] = w * g[i];
              store_tile(out, DYS + r * d + c0, len);
            }
            if (dweights) dot_lanes(g, as_float_tile(Y + r * d + c0, buf, len), len, lanes);
          }
          if (dweights)
            dweights[a] = drop ? 0.0f
                               : ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                                     ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        }
    });
    return 0;
  });
  return Status::ok();
}

Status moe_scatter_add(const void* dxs, const int64_t* order, int64_t k, int64_t T, int64_t d, void* dx,
                       DType dtype, int n_threads) {
  Status st = check_sizes(k, T, d);
  if (!st.is_ok()) return st;
  const int64_t n = T * k;
  if (n == 0) return Status::ok();
  if (dxs == nullptr || order == nullptr || dx == nullptr) return Status::invalid("moe_scatter_add: null data pointer");
  std::vector<int64_t> pos;
  st = invert_order(order, n, pos, n_threads);
  if (!st.is_ok()) return st;
  if (d == 0) return Status::ok();
  const int64_t per = rows_per_item(d);
  const int64_t items = (T + per - 1) / per;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* X = static_cast<const S*>(dxs);
    S* out = static_cast<S*>(dx);
    parallel_for(items, n_threads, [&](int64_t it) {
      alignas(64) float acc[kTile], buf[kTile];
      const int64_t t1 = std::min(T, (it + 1) * per);
      for (int64_t t = it * per; t < t1; ++t)
        for (int64_t c0 = 0; c0 < d; c0 += kTile) {
          const int64_t len = std::min(kTile, d - c0);
          const float* row = as_float_tile(X + pos[t * k] * d + c0, buf, len);
          for (int64_t i = 0; i < len; ++i) acc[i] = row[i];
          for (int64_t j = 1; j < k; ++j) {
            row = as_float_tile(X + pos[t * k + j] * d + c0, buf, len);
            for (int64_t i = 0; i < len; ++i) acc[i] += row[i];
          }
          store_tile(acc, out + t * d + c0, len);
        }
    });
    return 0;
  });
  return Status::ok();
}

}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
