// Fused top-k expert routing on the CPU (moe_route, moe/moe.h), one translation unit per ISA (see
// CMakeLists.txt): scores, keys and the top-k per token, then the stable expert order, offsets
// and capacity drops.
//
// Floating-point contraction (a * b + c -> fma) is turned off for this file: the AVX2 build
// would otherwise fuse where the baseline build cannot, and the routing weights would differ in
// the last bit between the two builds and from the CUDA kernel (moe/routing.cu), which
// repeats the routing arithmetic of this file operation for operation with _rn intrinsics.
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
#include "moe/route_args.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace moe_impl {

namespace {

// ---- routing ---------------------------------------------------------------------------------
//
// One token's row is held as E8 = ceil(E / 8) vectors of 8 floats (GCC/Clang vector extensions:
// AVX registers in the AVX2 build, pairs of SSE registers in the baseline build). The vector
// code performs exactly the scalar operations of exp_f lane by lane; padding lanes
// (e >= E) hold -FLT_MAX logits, contribute +0 to the softmax sum and -inf keys, so they never
// change a result nor get selected.

// The helpers taking and returning these vectors are internal and inlined: the baseline build's
// "AVX vector return without AVX enabled changes the ABI" note does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, const v8f& v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline v8i splat_i(int32_t x) { return v8i{x, x, x, x, x, x, x, x}; }
inline v8f pow2i8(const v8i& n) { return (v8f)((n + 127) << 23); }

// exp_f, lane-wise (same operations, same constants).
inline v8f exp8(const v8f& arg) {
  v8f x = arg;
  const v8f lo = splat(-104.0f), hi = splat(89.0f);
#if defined(__AVX2__)
  // The same selects as below, lane for lane (NaN included): max_ps(a, b) = a > b ? a : b,
  // min_ps(a, b) = a < b ? a : b; GCC emits compare + blend for the plain ternaries.
  x = (v8f)_mm256_max_ps((__m256)lo, (__m256)x);
  x = (v8f)_mm256_min_ps((__m256)hi, (__m256)x);
#else
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
#endif
  const v8f t = x * splat(1.44269504088896341f);
  const v8f nf = (t + splat(12582912.0f)) - splat(12582912.0f);
  v8f r = x - nf * splat(0.693145751953125f);
  r = r - nf * splat(1.42860682030941723212e-6f);
  v8f p = splat(1.98412698412698413e-4f);
  p = p * r + splat(1.38888888888888889e-3f);
  p = p * r + splat(8.33333333333333333e-3f);
  p = p * r + splat(4.16666666666666667e-2f);
  p = p * r + splat(1.66666666666666667e-1f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const v8i n = __builtin_convertvector(nf, v8i);
  const v8i n1 = n >> 1;
  return (p * pow2i8(n1)) * pow2i8(n - n1);
}

// Lane permutations for the horizontal reductions (a log-depth butterfly: every lane ends with
// the result, already splatted).
#if defined(__clang__)
#define PYOPS_SHUF8(v, a, b, c, d, e, f, g, h) __builtin_shufflevector(v, v, a, b, c, d, e, f, g, h)
#else
#define PYOPS_SHUF8(v, a, b, c, d, e, f, g, h) __builtin_shuffle(v, v8i{a, b, c, d, e, f, g, h})
#endif

inline v8f vmax8(const v8f& a, const v8f& b) { return a < b ? b : a; }
inline v8i vmin8(const v8i& a, const v8i& b) { return b < a ? b : a; }
inline v8f vmin8f(const v8f& a, const v8f& b) { return b < a ? b : a; }

inline v8f hmax8(const v8f& arg) {  // max is exact: the order does not matter
  v8f v = arg;
  v = vmax8(v, PYOPS_SHUF8(v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = vmax8(v, PYOPS_SHUF8(v, 2, 3, 0, 1, 6, 7, 4, 5));
  return vmax8(v, PYOPS_SHUF8(v, 1, 0, 3, 2, 5, 4, 7, 6));
}
inline v8i hmin8(const v8i& arg) {
  v8i v = arg;
  v = vmin8(v, PYOPS_SHUF8(v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = vmin8(v, PYOPS_SHUF8(v, 2, 3, 0, 1, 6, 7, 4, 5));
  return vmin8(v, PYOPS_SHUF8(v, 1, 0, 3, 2, 5, 4, 7, 6));
}

// The softmax denominator: lane l adds the exps of experts e = l mod 8 in increasing e (from
// +0), then the lanes combine as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
inline float hsum8(const v8f& v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

struct RouteArgs {
  int64_t T, E, k;
  int score;
  bool renormalize;
  const float* bias;
  float* weights;
  int32_t* experts;
  int64_t G, M;  // group-limited routing: G groups of E / G experts, M kept (G = 0: none)
  float scale;   // routed_scaling, applied to the weights after the renormalisation
};

inline v8i load8i(const int32_t* p) {
  v8i v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8i(int32_t* p, const v8i& v) { __builtin_memcpy(p, &v, sizeof(v)); }

struct RouteScratch {
  std::vector<float> z, s, q, bias, key, gs;
  std::vector<int32_t> idx;
  std::vector<uint8_t> kept;
  void size(int64_t Ep, int64_t k, int64_t G) {
    z.resize(Ep);
    s.resize(Ep);
    q.resize(Ep);
    bias.resize(Ep);
    key.resize(k);
    idx.resize(k);
    gs.resize(G);
    kept.resize(G);
  }
};

// Group-limited routing, one token: group score gs[g] = top1 + top2 of the keys q of group g's
// experts (top1 for groups of one expert), then the M groups of largest score, ties to the lower
// group index (M sweeps "largest score among the groups not yet kept, then its lowest index";
// scores may be +-inf for absurd biases, never NaN). kept[g] = 1 for those.
inline void pick_groups(const float* q, int64_t G, int64_t gsize, int64_t M, float* __restrict gs,
                        uint8_t* __restrict kept) {
  for (int64_t g = 0; g < G; ++g) {
    float t1 = -INFINITY, t2 = -INFINITY;
    for (int64_t e = g * gsize; e < (g + 1) * gsize; ++e) {
      const float v = q[e];
      const float lo = t1 < v ? t1 : v;  // min(t1, v) becomes a top-2 candidate
      t2 = t2 < lo ? lo : t2;
      t1 = t1 < v ? v : t1;
    }
    gs[g] = gsize == 1 ? t1 : t1 + t2;
    kept[g] = 0;
  }
  for (int64_t j = 0; j < M; ++j) {
    int64_t best = -1;
    for (int64_t g = 0; g < G; ++g)
      if (!kept[g] && (best < 0 || gs[g] > gs[best])) best = g;
    kept[best] = 1;
  }
}

// Largest k of q[0..Ep) (-inf padded), descending, equal keys: lower index first, for small k:
// k branch-free sweeps of "largest key, then its lowest index"; the chosen key is knocked out
// (-inf; real keys are finite). Costs k * E compares, but never mispredicts a branch.
constexpr int64_t kPassMaxK = 8;

void topk_passes(float* __restrict q, int64_t E8, int64_t k, int32_t* __restrict idx) {
  const v8i iota = {0, 1, 2, 3, 4, 5, 6, 7};
  const v8i none = splat_i(INT32_MAX);
  for (int64_t j = 0; j < k; ++j) {
    v8f m0 = load8(q), m1 = m0;
    for (int64_t i = 1; i + 1 < E8; i += 2) {
      m0 = vmax8(m0, load8(q + 8 * i));
      m1 = vmax8(m1, load8(q + 8 * i + 8));
    }
    if (E8 % 2 == 0) m0 = vmax8(m0, load8(q + 8 * (E8 - 1)));
    const v8f m = hmax8(vmax8(m0, m1));
    v8i best = none;
    for (int64_t i = 0; i < E8; ++i) best = vmin8(best, load8(q + 8 * i) == m ? iota + (int32_t)(8 * i) : none);
    const int32_t b = hmin8(best)[0];
    idx[j] = b;
    q[b] = -INFINITY;
  }
}

// Same result for any k: insertion into a descending buffer; a key enters only if strictly
// larger than the current k-th and goes after every equal key.
void topk_insertion(const float* __restrict q, int64_t E, int64_t k, float* __restrict key,
                    int32_t* __restrict idx) {
  for (int64_t e = 0; e < E; ++e) {
    const float v = q[e];
    int64_t i;
    if (e < k) {
      i = e;
    } else {
      if (!(v > key[k - 1])) continue;
      i = k - 1;
    }
    while (i > 0 && key[i - 1] < v) {
      key[i] = key[i - 1];
      idx[i] = idx[i - 1];
      --i;
    }
    key[i] = v;
    idx[i] = (int32_t)e;
  }
}

// Pass 1 for k <= kLaneMaxK, eight tokens at a time, one token per vector lane: the row block
// is transposed into zt[e][8] so that every expert is one v8f over the eight tokens. The
// arithmetic per token is that of the row code below, operation for operation: the same max,
// the same exp8, the softmax denominator accumulated in eight partial sums by e mod 8 in
// increasing e and combined in hsum8's order, the same division. The top k sit in k sorted
// registers per lane (descending); a key enters only when strictly larger, so equal keys keep
// the lower expert first -- the order topk_passes / topk_insertion produce. A partial last
// group repeats its last token in the spare lanes (never written back).
constexpr int64_t kLaneMaxK = 8;

struct LaneScratch {
  std::vector<float> zt, xt, row, gs;
  std::vector<int32_t> kept;
  void size(int64_t E, int64_t G) {
    if ((int64_t)zt.size() < 8 * E) {
      zt.resize(8 * E);
      xt.resize(8 * E);
    }
    if ((int64_t)row.size() < E) row.resize(E);
    if ((int64_t)gs.size() < 8 * G) {
      gs.resize(8 * G);
      kept.resize(8 * G);
    }
  }
};

// zt[8 e + l] = row t + min(l, nl - 1), expert e (as fp32).
template <typename T>
inline void transpose_rows(const T* logits, int64_t t, int nl, int64_t E, float* __restrict zt,
                           float* row, int64_t /*T*/) {
  for (int l = 0; l < 8; ++l) {
    const int64_t tt = t + std::min(l, nl - 1);
    const float* src = as_float_tile(logits + tt * E, row, E);
    for (int64_t e = 0; e < E; ++e) zt[8 * e + l] = src[e];
  }
}

#if defined(__AVX2__)
inline void transpose_rows(const float* logits, int64_t t, int nl, int64_t E, float* __restrict zt,
                           float* row, int64_t T) {
  if (E % 8 != 0) {
    for (int l = 0; l < 8; ++l) {
      const float* src = logits + (t + std::min(l, nl - 1)) * E;
      for (int64_t e = 0; e < E; ++e) zt[8 * e + l] = src[e];
    }
    return;
  }
  (void)row;
  const float* r[8];
  for (int l = 0; l < 8; ++l) r[l] = logits + (t + std::min(l, nl - 1)) * E;
  // The next group's 8 rows (contiguous): start their fetch while this one is transposed.
  if (t + 24 <= T) {  // prefetching never faults; stay inside the tensor anyway
    const char* nx = reinterpret_cast<const char*>(logits + (t + 16) * E);
    for (int64_t b = 0; b < 8 * E * 4; b += 64) _mm_prefetch(nx + b, _MM_HINT_T0);
  }
  for (int64_t e = 0; e < E; e += 8) {
    const __m256 a0 = _mm256_loadu_ps(r[0] + e), a1 = _mm256_loadu_ps(r[1] + e);
    const __m256 a2 = _mm256_loadu_ps(r[2] + e), a3 = _mm256_loadu_ps(r[3] + e);
    const __m256 a4 = _mm256_loadu_ps(r[4] + e), a5 = _mm256_loadu_ps(r[5] + e);
    const __m256 a6 = _mm256_loadu_ps(r[6] + e), a7 = _mm256_loadu_ps(r[7] + e);
    const __m256 b0 = _mm256_unpacklo_ps(a0, a1), b1 = _mm256_unpackhi_ps(a0, a1);
    const __m256 b2 = _mm256_unpacklo_ps(a2, a3), b3 = _mm256_unpackhi_ps(a2, a3);
    const __m256 b4 = _mm256_unpacklo_ps(a4, a5), b5 = _mm256_unpackhi_ps(a4, a5);
    const __m256 b6 = _mm256_unpacklo_ps(a6, a7), b7 = _mm256_unpackhi_ps(a6, a7);
    const __m256 c0 = _mm256_shuffle_ps(b0, b2, 0x44), c1 = _mm256_shuffle_ps(b0, b2, 0xEE);
    const __m256 c2 = _mm256_shuffle_ps(b1, b3, 0x44), c3 = _mm256_shuffle_ps(b1, b3, 0xEE);
    const __m256 c4 = _mm256_shuffle_ps(b4, b6, 0x44), c5 = _mm256_shuffle_ps(b4, b6, 0xEE);
    const __m256 c6 = _mm256_shuffle_ps(b5, b7, 0x44), c7 = _mm256_shuffle_ps(b5, b7, 0xEE);
    float* o = zt + 8 * e;
    _mm256_storeu_ps(o + 0, _mm256_permute2f128_ps(c0, c4, 0x20));
    _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(c1, c5, 0x20));
    _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(c2, c6, 0x20));
    _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(c3, c7, 0x20));
    _mm256_storeu_ps(o + 32, _mm256_permute2f128_ps(c0, c4, 0x31));
    _mm256_storeu_ps(o + 40, _mm256_permute2f128_ps(c1, c5, 0x31));
    _mm256_storeu_ps(o + 48, _mm256_permute2f128_ps(c2, c6, 0x31));
    _mm256_storeu_ps(o + 56, _mm256_permute2f128_ps(c3, c7, 0x31));
  }
}
#endif

template <int K, bool HasBias, typename T>
int64_t route_tile_lanes(const RouteArgs& a, const T* logits, int64_t t0, int64_t t1,
                         int64_t* counts, LaneScratch& w) {
  const int64_t E = a.E;
  float* __restrict zt = w.zt.data();
  float* __restrict xt = w.xt.data();
  float* row = w.row.data();
  float* __restrict gsc = w.gs.data();
  int32_t* __restrict kept = w.kept.data();
  const float* bias = a.bias;
  const int64_t G = a.G, gsize = G > 0 ? E / G : E;
  for (int64_t e = 0; e < E; ++e) counts[e] = 0;
  for (int64_t t = t0; t < t1; t += 8) {
    const int nl = (int)std::min<int64_t>(8, t1 - t);
    transpose_rows(logits, t, nl, E, zt, row, a.T);
    // Non-finite check (v * 0 is NaN only for NaN / inf), and the row maxima.
    v8f chk = splat(0.0f);
    v8f m = splat(-FLT_MAX);
    for (int64_t e = 0; e < E; ++e) {
      const v8f z = load8(zt + 8 * e);
      chk += z * splat(0.0f);
      m = vmax8(m, z);
    }
    for (int l = 0; l < nl; ++l)
      if (!(chk[l] == 0.0f)) return t + l;
    v8f sum;
    if (a.score == (int)MoeScore::kSoftmax) {
      v8f acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = splat(0.0f);
      int64_t e0 = 0;
      for (; e0 + 8 <= E; e0 += 8) {
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) {
          const v8f ex = exp8(load8(zt + 8 * (e0 + r)) - m);
          acc[r] += ex;
          store8(xt + 8 * (e0 + r), ex);
        }
      }
      for (int r = 0; e0 + r < E; ++r) {
        const v8f ex = exp8(load8(zt + 8 * (e0 + r)) - m);
        acc[r] += ex;
        store8(xt + 8 * (e0 + r), ex);
      }
      sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    } else {
      for (int64_t e = 0; e < E; ++e)
        store8(xt + 8 * e, splat(1.0f) / (splat(1.0f) + exp8(-load8(zt + 8 * e))));
      sum = splat(1.0f);
    }
    const bool softmax = a.score == (int)MoeScore::kSoftmax;
    if (G > 0) {
      // Group scores (top1 + top2 of the group's keys, the same keys as below), then the M
      // groups of largest score per lane, ties to the lower group index: kept[g] lanes all-ones.
      for (int64_t g = 0; g < G; ++g) {
        v8f t1 = splat(-INFINITY), t2 = splat(-INFINITY);
        for (int64_t e = g * gsize; e < (g + 1) * gsize; ++e) {
          v8f s = load8(xt + 8 * e);
          if (softmax) s = s / sum;
          const v8f q = HasBias ? s + splat(bias[e]) : s;
          t2 = vmax8(t2, vmin8f(t1, q));
          t1 = vmax8(t1, q);
        }
        store8(gsc + 8 * g, gsize == 1 ? t1 : t1 + t2);
        store8i(kept + 8 * g, splat_i(0));
      }
      const v8i none = splat_i(INT32_MAX);
      for (int64_t j = 0; j < a.M; ++j) {
        v8f m = splat(-INFINITY);
        for (int64_t g = 0; g < G; ++g) {
          const v8f v = load8i(kept + 8 * g) ? splat(-INFINITY) : load8(gsc + 8 * g);
          m = vmax8(m, v);
        }
        v8i best = none;
        for (int64_t g = 0; g < G; ++g) {
          const v8i cand = (load8(gsc + 8 * g) == m) & ~load8i(kept + 8 * g);
          best = vmin8(best, cand ? splat_i((int32_t)g) : none);
        }
        for (int64_t g = 0; g < G; ++g)
          store8i(kept + 8 * g, load8i(kept + 8 * g) | (best == splat_i((int32_t)g)));
      }
    }
    v8f key[K], wv[K];
    v8i idx[K];
    for (int j = 0; j < K; ++j) {
      key[j] = splat(-INFINITY);
      idx[j] = splat_i(0);
    }
    for (int64_t e = 0; e < E; ++e) {
      v8f s = load8(xt + 8 * e);
      if (softmax) s = s / sum;
      v8f q = HasBias ? s + splat(bias[e]) : s;
      // Excluded experts get a -inf key: never larger than a kept one (k <= M * E / G of them).
      if (G > 0) q = load8i(kept + 8 * (e / gsize)) ? q : splat(-INFINITY);
      const v8i ev = splat_i((int32_t)e);
      // Keys (finite, or -inf for an excluded expert; never -0 nor NaN): a max/min bubble; the
      // indices follow the masks.
      v8i gt[K];
      for (int j = 0; j < K; ++j) gt[j] = q > key[j];
      for (int j = K - 1; j > 0; --j) idx[j] = gt[j - 1] ? idx[j - 1] : (gt[j] ? ev : idx[j]);
      idx[0] = gt[0] ? ev : idx[0];
      v8f c = q;
      for (int j = 0; j < K; ++j) {
        const v8f hi = vmax8(key[j], c);
        c = vmin8f(key[j], c);
        key[j] = hi;
      }
    }
    if (HasBias) {  // the weights are the scores without the bias: s again, as above
      for (int j = 0; j < K; ++j)
        for (int l = 0; l < 8; ++l) {
          const float x = xt[8 * idx[j][l] + l];
          wv[j][l] = softmax ? x / sum[l] : x;
        }
    } else {
      for (int j = 0; j < K; ++j) wv[j] = key[j];
    }
    if (a.renormalize) {
      v8f rs = splat(0.f);
      for (int j = 0; j < K; ++j) rs += wv[j];
      for (int j = 0; j < K; ++j) wv[j] = wv[j] / rs;
    }
    if (a.scale != 1.0f)
      for (int j = 0; j < K; ++j) wv[j] = wv[j] * splat(a.scale);
    for (int l = 0; l < nl; ++l) {
      float* wt = a.weights + (t + l) * K;
      int32_t* et = a.experts + (t + l) * K;
      for (int j = 0; j < K; ++j) {
        wt[j] = wv[j][l];
        et[j] = idx[j][l];
        ++counts[idx[j][l]];
      }
    }
  }
  return -1;
}

// Pass 1 over tokens [t0, t1): scores, top-k, weights, experts and the tile's histogram
// counts[E]. Returns the first token with a non-finite logit, or -1.
template <typename T>
int64_t route_tile(const RouteArgs& a, const T* logits, int64_t t0, int64_t t1, int64_t* counts,
                   RouteScratch& w) {
  const int64_t E = a.E, k = a.k;
  const int64_t E8 = (E + 7) / 8;
  float* z = w.z.data();
  float* s = w.s.data();
  float* q = w.q.data();
  const float* bias = w.bias.data();
  int32_t* idx = w.idx.data();
  const v8i iota = {0, 1, 2, 3, 4, 5, 6, 7};
  const v8i last_valid = (iota + (int32_t)(8 * (E8 - 1))) < splat_i((int32_t)E);  // lanes e < E
  const v8f neg_inf = splat(-INFINITY);
  for (int64_t e = 0; e < E; ++e) counts[e] = 0;
  if (a.bias) {
    for (int64_t e = 0; e < E; ++e) w.bias[e] = a.bias[e];
    for (int64_t e = E; e < 8 * E8; ++e) w.bias[e] = 0.0f;
  }
  for (int64_t e = E; e < 8 * E8; ++e) z[e] = -FLT_MAX;
  for (int64_t t = t0; t < t1; ++t) {
    const float* src = as_float_tile(logits + t * E, z, E);
    if (src != z) std::memcpy(z, src, sizeof(float) * E);
    // Non-finite check: v * 0 is +-0 for finite v and NaN for NaN and +-inf.
    v8f chk = splat(0.0f);
    for (int64_t i = 0; i < E8; ++i) chk += load8(z + 8 * i) * splat(0.0f);
    if (!(hsum8(chk) == 0.0f)) return t;
    if (a.score == (int)MoeScore::kSoftmax) {
      v8f mv = load8(z);
      for (int64_t i = 1; i < E8; ++i) mv = vmax8(mv, load8(z + 8 * i));
      const v8f m = hmax8(mv);
      v8f acc = splat(0.0f);
      for (int64_t i = 0; i < E8; ++i) {
        v8f ex = exp8(load8(z + 8 * i) - m);
        if (i == E8 - 1) ex = last_valid ? ex : splat(0.0f);
        acc += ex;
        store8(s + 8 * i, ex);
      }
      const v8f sum = splat(hsum8(acc));
      for (int64_t i = 0; i < E8; ++i) store8(s + 8 * i, load8(s + 8 * i) / sum);
    } else {
      for (int64_t i = 0; i < E8; ++i)
        store8(s + 8 * i, splat(1.0f) / (splat(1.0f) + exp8(-load8(z + 8 * i))));
    }
    for (int64_t i = 0; i < E8; ++i) {
      v8f v = load8(s + 8 * i);
      if (a.bias) v = v + load8(bias + 8 * i);
      if (i == E8 - 1) v = last_valid ? v : neg_inf;
      store8(q + 8 * i, v);
    }
    if (a.G > 0) {  // excluded experts: -inf keys (k <= M * E / G kept ones, all finite)
      const int64_t gsize = E / a.G;
      pick_groups(q, a.G, gsize, a.M, w.gs.data(), w.kept.data());
      for (int64_t g = 0; g < a.G; ++g)
        if (!w.kept[g])
          for (int64_t e = g * gsize; e < (g + 1) * gsize; ++e) q[e] = -INFINITY;
    }
    if (k <= kPassMaxK)
      topk_passes(q, E8, k, idx);
    else
      topk_insertion(q, E, k, w.key.data(), idx);
    float* wt = a.weights + t * k;
    int32_t* et = a.experts + t * k;
    for (int64_t j = 0; j < k; ++j) {
      wt[j] = s[idx[j]];
      et[j] = idx[j];
      ++counts[idx[j]];
    }
    if (a.renormalize) {
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) sum += wt[j];
      for (int64_t j = 0; j < k; ++j) wt[j] = wt[j] / sum;
    }
    if (a.scale != 1.0f)
      for (int64_t j = 0; j < k; ++j) wt[j] = wt[j] * a.scale;
  }
  return -1;
}

}  // namespace
}  // namespace moe_impl

using namespace moe_impl;

Status moe_route(const void* logits, DType dtype, int64_t T, int64_t E, int64_t k, int score,
                 bool renormalize, const float* bias, int64_t capacity, int64_t n_group,
                 int64_t topk_group, float routed_scaling, float* weights, int32_t* experts,
                 int64_t* order, int64_t* offsets, uint8_t* dropped, int n_threads) {
  {
    Status st = moe_args::check_route(T, E, k, score, capacity, n_group, topk_group, routed_scaling);
    if (!st.is_ok()) return st;
  }
  if (offsets == nullptr) return Status::invalid("offsets: null pointer");
  if (T > 0 && (logits == nullptr || weights == nullptr || experts == nullptr || order == nullptr ||
                dropped == nullptr))
    return Status::invalid("moe_route: null data pointer");
  if (bias)
    for (int64_t e = 0; e < E; ++e)
      if (!std::isfinite(bias[e]))
        return Status::invalid("bias: contains NaN/inf at expert " + std::to_string(e));

  const int64_t n_tiles = (T + kRouteTile - 1) / kRouteTile;
  std::vector<int64_t> hist(n_tiles * E);  // per-tile counts, then per-tile write cursors
  std::vector<int64_t> first_bad(n_tiles, -1);
  const RouteArgs args{T, E, k, score, renormalize, bias, weights, experts, n_group, topk_group,
                       routed_scaling};
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* lg = static_cast<const S*>(logits);
    parallel_for(n_tiles, n_threads, [&](int64_t it) {
      const int64_t t0 = it * kRouteTile, t1 = std::min(T, (it + 1) * kRouteTile);
      int64_t* counts = hist.data() + it * E;
      if (k <= kLaneMaxK) {
        thread_local LaneScratch lanes;
        lanes.size(E, n_group);
        int64_t bad = -1;
        switch (k) {
#define PYOPS_ROUTE_K(KK) \
  case KK:                \
    bad = args.bias ? route_tile_lanes<KK, true, S>(args, lg, t0, t1, counts, lanes) \
                    : route_tile_lanes<KK, false, S>(args, lg, t0, t1, counts, lanes); \
    break;
          PYOPS_ROUTE_K(1) PYOPS_ROUTE_K(2) PYOPS_ROUTE_K(3) PYOPS_ROUTE_K(4)
          PYOPS_ROUTE_K(5) PYOPS_ROUTE_K(6) PYOPS_ROUTE_K(7) PYOPS_ROUTE_K(8)
#undef PYOPS_ROUTE_K
        }
        first_bad[it] = bad;
        return;
      }
      thread_local RouteScratch scratch;
      scratch.size(8 * ((E + 7) / 8), k, n_group);
      first_bad[it] = route_tile<S>(args, lg, t0, t1, counts, scratch);
    });
    return 0;
  });
  for (int64_t it = 0; it < n_tiles; ++it)
    if (first_bad[it] >= 0)
      return Status::invalid("logits: contains NaN/inf at token " + std::to_string(first_bad[it]));

  // Expert totals -> offsets; then each tile's count becomes its first write position.
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t run = offsets[e];
    for (int64_t it = 0; it < n_tiles; ++it) {
      const int64_t c = hist[it * E + e];
      hist[it * E + e] = run;
      run += c;
    }
    offsets[e + 1] = run;
  }

  // Pass 2: stable counting-sort scatter (token order within each tile, tiles in order).
  parallel_for(n_tiles, n_threads, [&](int64_t it) {
    // Local restrict copies: the stores into order must not force reloads of the captures.
    int64_t* __restrict cur = hist.data() + it * E;
    const int32_t* __restrict ex = experts;
    int64_t* __restrict ord = order;
    uint8_t* __restrict drop = dropped;
    const int64_t* __restrict off = offsets;
    const int64_t cap = capacity;
    const int64_t a0 = it * kRouteTile * k, a1 = std::min(T, (it + 1) * kRouteTile) * k;
    if (cap < 0) {
      for (int64_t a = a0; a < a1; ++a) ord[cur[ex[a]]++] = a;
      std::memset(drop + a0, 0, (size_t)(a1 - a0));
    } else {
      for (int64_t a = a0; a < a1; ++a) {
        const int32_t e = ex[a];
        const int64_t p = cur[e]++;
        ord[p] = a;
        drop[a] = (uint8_t)(p - off[e] >= cap);
      }
    }
  });
  return Status::ok();
}

}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
