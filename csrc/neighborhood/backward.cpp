// CPU kernels for neighbourhood attention (see cpu/neighborhood.h for the definition). This file
// is compiled once per ISA (CMakeLists.txt); PYOPS_ISA names the namespace the build goes into.
//
// Plan. Per spatial dimension, small tables hold every query's window (start, length) and every
// key's inverse window (the contiguous range of queries whose windows contain it). Positions are
// split into chunks inside one dilation group; a work item is (b, h, chunk0, chunk1, chunk2).
// An item gathers the box of keys its queries need into fp32 scratch (K transposed so that
// scores for consecutive keys along the last dimension are one vector, V row-major so that P.V
// is a vector accumulation over Dv), then runs every query of the chunk against it: scores,
// softmax over the window, P.V. The backward recomputes P from the saved logsumexp: dq (and
// drpb, per-item partials reduced in a fixed order) query-centric; dk and dv key-centric over the
// inverse windows, with the queries' box gathered the same way. Nothing depends on which thread
// runs an item.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "common/convert.h"
#include "common/isa.h"
#include "common/thread_pool.h"
#include "cpu/neighborhood.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace {

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

void dot_rows(const float* x, int64_t D, const float* const* rows, int64_t n_rows, int64_t stride,
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
void wsum(const float* w, int64_t W, int64_t n_rows, int64_t n, const float* const* rows, int64_t ld,
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

// ------------------------------------------------------------------------------------------------
// Per-dimension window tables.
// ------------------------------------------------------------------------------------------------

struct Chunk {
  int64_t g = 0, i0 = 0, i1 = 0;   // group and in-group range [i0, i1) of the chunk's positions
  int64_t kb0 = 0, kb1 = 0;        // in-group keys the chunk's queries attend: [kb0, kb1)
  int64_t qb0 = 0, qb1 = 0;        // in-group queries attending the chunk's keys: [qb0, qb1)
};

struct Dim {
  int64_t S = 1, k = 1, s = 1, d = 1;
  bool causal = false;
  std::vector<int64_t> ws, wn;    // per query position x: in-group window start and length
  std::vector<int64_t> ilo, ihi;  // per key position y: in-group queries [ilo, ihi) attending it
  std::vector<Chunk> chunks;
  int64_t max_wn = 1, max_inv = 1, max_kbox = 1, max_qbox = 1;

  int64_t group_len(int64_t g) const { return (S - g + d - 1) / d; }
  int64_t pos(int64_t g, int64_t i) const { return g + d * i; }
};

Status build_dim(Dim& dm, int64_t S, int64_t k, int64_t s, int64_t d, bool causal, int64_t tile) {
  dm.S = S;
  dm.k = k;
  dm.s = s;
  dm.d = d;
  dm.causal = causal;
  dm.ws.assign(S, 0);
  dm.wn.assign(S, 0);
  dm.ilo.assign(S, std::numeric_limits<int64_t>::max());
  dm.ihi.assign(S, -1);
  std::vector<int64_t> count(S, 0);
  const int64_t left = k / 2;
  for (int64_t x = 0; x < S; ++x) {
    const int64_t g = x % d, i = x / d, L = dm.group_len(g);
    int64_t start, len;
    if (!causal) {
      const int64_t leader = std::min((i / s) * s + s / 2, L - 1);
      start = std::min(std::max<int64_t>(leader - left, 0), L - k);
      len = k;
    } else {
      const int64_t leader = std::min((i / s) * s + s - 1, L - 1);
      start = std::max<int64_t>(leader - k + 1, 0);
      len = i - start + 1;
    }
    if (start < 0 || len < 1 || start + len > L || i - start > k - 1 || start + len - 1 - i > k - 1)
      return Status{StatusCode::kInternal, "neighborhood attention: inconsistent window table"};
    dm.ws[x] = start;
    dm.wn[x] = len;
    for (int64_t t = 0; t < len; ++t) {
      const int64_t y = dm.pos(g, start + t);
      dm.ilo[y] = std::min(dm.ilo[y], i);
      dm.ihi[y] = std::max(dm.ihi[y], i + 1);
      ++count[y];
    }
  }
  dm.max_wn = 1;
  dm.max_inv = 1;
  for (int64_t y = 0; y < S; ++y) {
    if (count[y] == 0) {
      dm.ilo[y] = dm.ihi[y] = 0;
    } else if (count[y] != dm.ihi[y] - dm.ilo[y]) {
      return Status{StatusCode::kInternal, "neighborhood attention: non-contiguous inverse window"};
    }
    dm.max_inv = std::max(dm.max_inv, dm.ihi[y] - dm.ilo[y]);
    dm.max_wn = std::max(dm.max_wn, dm.wn[y]);
  }
  dm.chunks.clear();
  dm.max_kbox = dm.max_qbox = 1;
  for (int64_t g = 0; g < d; ++g) {
    const int64_t L = dm.group_len(g);
    const int64_t n = (L + tile - 1) / tile;
    const int64_t len = (L + n - 1) / n;
    for (int64_t i0 = 0; i0 < L; i0 += len) {
      Chunk c;
      c.g = g;
      c.i0 = i0;
      c.i1 = std::min(i0 + len, L);
      c.kb0 = std::numeric_limits<int64_t>::max();
      c.kb1 = 0;
      c.qb0 = std::numeric_limits<int64_t>::max();
      c.qb1 = 0;
      for (int64_t i = c.i0; i < c.i1; ++i) {
        const int64_t x = dm.pos(g, i);
        c.kb0 = std::min(c.kb0, dm.ws[x]);
        c.kb1 = std::max(c.kb1, dm.ws[x] + dm.wn[x]);
        if (dm.ihi[x] > dm.ilo[x]) {
          c.qb0 = std::min(c.qb0, dm.ilo[x]);
          c.qb1 = std::max(c.qb1, dm.ihi[x]);
        }
      }
      if (c.qb1 == 0) c.qb0 = 0;
      dm.max_kbox = std::max(dm.max_kbox, c.kb1 - c.kb0);
      dm.max_qbox = std::max(dm.max_qbox, c.qb1 - c.qb0);
      dm.chunks.push_back(c);
    }
  }
  return Status::ok();
}

// ------------------------------------------------------------------------------------------------
// Problem checks and shared context.
// ------------------------------------------------------------------------------------------------

Status check(const NAShape& p) {
  auto bad = [](const std::string& m) { return Status::invalid("neighborhood attention: " + m); };
  if (p.B < 0) return bad("batch size B must be >= 0, got " + std::to_string(p.B));
  if (p.H < 1) return bad("number of heads H must be >= 1, got " + std::to_string(p.H));
  if (p.D < 1) return bad("head dimension D must be >= 1, got " + std::to_string(p.D));
  if (p.Dv < 1) return bad("value head dimension Dv must be >= 1, got " + std::to_string(p.Dv));
  if (!std::isfinite(p.scale)) return bad("scale must be finite");
  const int64_t kMax = int64_t(1) << 31;
  if (p.H > kMax || p.D > kMax || p.Dv > kMax) return bad("H, D or Dv is too large");
  double total = (double)std::max<int64_t>(p.B, 1) * p.H * std::max(p.D, p.Dv);
  for (int i = 0; i < 3; ++i) {
    const std::string n = std::to_string(i);
    const int64_t S = p.S[i], k = p.kernel[i], s = p.stride[i], d = p.dilation[i];
    if (S < 1) return bad("spatial extent S" + n + " must be >= 1, got " + std::to_string(S));
    if (S > kMax) return bad("spatial extent S" + n + " is too large");
    total *= (double)S;
    if (k < 1) return bad("kernel_size[" + n + "] must be >= 1, got " + std::to_string(k));
    if (d < 1) return bad("dilation[" + n + "] must be >= 1, got " + std::to_string(d));
    if (s < 1) return bad("stride[" + n + "] must be >= 1, got " + std::to_string(s));
    if (s > k)
      return bad("stride[" + n + "]=" + std::to_string(s) + " is larger than kernel_size[" + n + "]=" +
                 std::to_string(k));
    if (k > S || d > S || k * d > S)
      return bad("kernel_size[" + n + "]=" + std::to_string(k) + " times dilation[" + n + "]=" +
                 std::to_string(d) + " is larger than the spatial extent S" + n + "=" + std::to_string(S));
    if (p.causal[i] != 0 && p.causal[i] != 1)
      return bad("causal flag c" + n + " must be 0 or 1, got " + std::to_string(p.causal[i]));
  }
  if (total > 9.0e18) return bad("problem is too large");
  return Status::ok();
}

struct Ctx {
  const NAShape* p = nullptr;
  Dim dim[3];
  int64_t n_chunks[3] = {1, 1, 1};
  int64_t n_items = 0;
  int64_t R[3] = {1, 1, 1};  // rpb extents 2k - 1
  int64_t rpb_size = 1;      // per head
  float scale = 1.f;

  Status init(const NAShape& shape) {
    p = &shape;
    for (int i = 0; i < 3; ++i) {
      Status st = build_dim(dim[i], shape.S[i], shape.kernel[i], shape.stride[i], shape.dilation[i],
                            shape.causal[i] != 0, kTile[i]);
      if (!st.is_ok()) return st;
      n_chunks[i] = (int64_t)dim[i].chunks.size();
      R[i] = 2 * shape.kernel[i] - 1;
    }
    rpb_size = R[0] * R[1] * R[2];
    n_items = shape.B * shape.H * n_chunks[0] * n_chunks[1] * n_chunks[2];
    scale = (float)shape.scale;
    return Status::ok();
  }

  struct Item {
    int64_t b, h;
    const Chunk* c[3];
  };
  Item item(int64_t it) const {
    Item r;
    const int64_t c2 = it % n_chunks[2];
    it /= n_chunks[2];
    const int64_t c1 = it % n_chunks[1];
    it /= n_chunks[1];
    const int64_t c0 = it % n_chunks[0];
    it /= n_chunks[0];
    r.h = it % p->H;
    r.b = it / p->H;
    r.c[0] = &dim[0].chunks[c0];
    r.c[1] = &dim[1].chunks[c1];
    r.c[2] = &dim[2].chunks[c2];
    return r;
  }
  // Flat token index of (b, y0, y1, y2).
  int64_t token(int64_t b, int64_t y0, int64_t y1, int64_t y2) const {
    return ((b * p->S[0] + y0) * p->S[1] + y1) * p->S[2] + y2;
  }
};

#if defined(__AVX2__) && defined(__FMA__)
// dst[c * ld + t] = rows[t][c0 + c] for t, c < 8.
inline void transpose8x8(const float* const* rows, int64_t c0, float* dst, int64_t ld) {
  __m256 r0 = _mm256_loadu_ps(rows[0] + c0), r1 = _mm256_loadu_ps(rows[1] + c0);
  __m256 r2 = _mm256_loadu_ps(rows[2] + c0), r3 = _mm256_loadu_ps(rows[3] + c0);
  __m256 r4 = _mm256_loadu_ps(rows[4] + c0), r5 = _mm256_loadu_ps(rows[5] + c0);
  __m256 r6 = _mm256_loadu_ps(rows[6] + c0), r7 = _mm256_loadu_ps(rows[7] + c0);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(dst + 0 * ld, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

// Box of in-group positions [lo[i], lo[i] + n[i]) of group g[i] per dimension.
struct Box {
  int64_t g[3], lo[3], n[3];
};

// Gathers a [box][H][width] tensor's head h into fp32 scratch:
//   transposed:  dst[(j0 * n1 + j1) * rs + c * ld + j2]   (ld >= n2; lanes n2..ld zeroed)
//   row-major:   dst[((j0 * n1 + j1) * n2 + j2) * ld + c]      (ld >= width; columns zeroed)
inline std::vector<float>& scratch_tile() {
  thread_local std::vector<float> tile;
  return tile;
}
inline float* grow(std::vector<float>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
  return v.data();
}

template <typename T>
void gather_box(const Ctx& cx, const T* src, int64_t width, int64_t b, int64_t h, const Box& bx,
                bool transposed, int64_t ld, float* dst, int64_t rs = 0) {
  const NAShape& p = *cx.p;
  const int64_t n0 = bx.n[0], n1 = bx.n[1], n2 = bx.n[2];
  for (int64_t j0 = 0; j0 < n0; ++j0) {
    const int64_t y0 = cx.dim[0].pos(bx.g[0], bx.lo[0] + j0);
    for (int64_t j1 = 0; j1 < n1; ++j1) {
      const int64_t y1 = cx.dim[1].pos(bx.g[1], bx.lo[1] + j1);
      const int64_t row = j0 * n1 + j1;
      if (transposed) {
        float* o = dst + row * rs;
        int64_t j2 = 0;
#if defined(__AVX2__) && defined(__FMA__)
        // Blocks of 8 tokens: widen each token's row to fp32 (in place for float), then write
        // 8 x 8 transposed tiles.
        const float* rp[8];
        float* tile = grow(scratch_tile(), 8 * round8(width));
        for (; j2 + 8 <= n2; j2 += 8) {
          for (int t = 0; t < 8; ++t) {
            const int64_t y2 = cx.dim[2].pos(bx.g[2], bx.lo[2] + j2 + t);
            rp[t] = as_float_tile(src + (cx.token(b, y0, y1, y2) * p.H + h) * width, tile + t * round8(width), width);
          }
          int64_t c = 0;
          for (; c + 8 <= width; c += 8) transpose8x8(rp, c, o + c * ld + j2, ld);
          for (; c < width; ++c)
            for (int t = 0; t < 8; ++t) o[c * ld + j2 + t] = rp[t][c];
        }
#endif
        for (; j2 < n2; ++j2) {
          const int64_t y2 = cx.dim[2].pos(bx.g[2], bx.lo[2] + j2);
          const T* s = src + (cx.token(b, y0, y1, y2) * p.H + h) * width;
          for (int64_t c = 0; c < width; ++c) o[c * ld + j2] = to_float(s[c]);
        }
        for (int64_t c = 0; c < width; ++c)
          for (int64_t j2 = n2; j2 < ld; ++j2) o[c * ld + j2] = 0.f;
      } else {
        for (int64_t j2 = 0; j2 < n2; ++j2) {
          const int64_t y2 = cx.dim[2].pos(bx.g[2], bx.lo[2] + j2);
          const T* s = src + (cx.token(b, y0, y1, y2) * p.H + h) * width;
          float* o = dst + (row * n2 + j2) * ld;
          for (int64_t c = 0; c < width; ++c) o[c] = to_float(s[c]);
          for (int64_t c = width; c < ld; ++c) o[c] = 0.f;
        }
      }
    }
  }
}

// Gathers a per-token fp32 scalar [B, S, H] (lse, delta) of head h: dst[(j0 * n1 + j1) * ld + j2].
void gather_scalar(const Ctx& cx, const float* src, int64_t b, int64_t h, const Box& bx, int64_t ld,
                   float* dst) {
  const NAShape& p = *cx.p;
  for (int64_t j0 = 0; j0 < bx.n[0]; ++j0) {
    const int64_t y0 = cx.dim[0].pos(bx.g[0], bx.lo[0] + j0);
    for (int64_t j1 = 0; j1 < bx.n[1]; ++j1) {
      const int64_t y1 = cx.dim[1].pos(bx.g[1], bx.lo[1] + j1);
      float* o = dst + (j0 * bx.n[1] + j1) * ld;
      for (int64_t j2 = 0; j2 < bx.n[2]; ++j2) {
        const int64_t y2 = cx.dim[2].pos(bx.g[2], bx.lo[2] + j2);
        o[j2] = src[cx.token(b, y0, y1, y2) * p.H + h];
      }
      for (int64_t j2 = bx.n[2]; j2 < ld; ++j2) o[j2] = 0.f;
    }
  }
}

// fp32 view of a row: the row itself for float, else widened into buf.
template <typename T>
inline const float* load_row(const T* src, int64_t n, float* buf) {
  return as_float_tile(src, buf, n);
}

// dst[c] = mul * acc[c] for c < n (acc is padded to a multiple of 8 and may be overwritten).
inline void store_row(float* acc, float* dst, int64_t n, float mul) {
  const V8 m = vset1(mul);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) vstore(dst + c, vmul(vload(acc + c), m));
  for (; c < n; ++c) dst[c] = acc[c] * mul;
}
template <typename T>
inline void store_row(float* acc, T* dst, int64_t n, float mul) {
  const V8 m = vset1(mul);
  for (int64_t c = 0; c < n; c += 8) vstore(acc + c, vmul(vload(acc + c), m));
  store_tile(acc, dst, n);
}

// Thread-local scratch, grown outside the hot loops and reused across items and calls.
struct Scratch {
  std::vector<float> a, b, c, d, e, f;  // gathered boxes
  std::vector<float> sc, sc2, x, y, acc, acc2;
  std::vector<const float*> rows, rows2, outs;
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}
inline const float** grow(std::vector<const float*>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
  return v.data();
}

// Box of keys needed by an item's queries.
Box key_box(const Ctx::Item& it) {
  Box bx;
  for (int i = 0; i < 3; ++i) {
    bx.g[i] = it.c[i]->g;
    bx.lo[i] = it.c[i]->kb0;
    bx.n[i] = it.c[i]->kb1 - it.c[i]->kb0;
  }
  return bx;
}

// Box of queries attending an item's keys.
Box query_box(const Ctx::Item& it) {
  Box bx;
  for (int i = 0; i < 3; ++i) {
    bx.g[i] = it.c[i]->g;
    bx.lo[i] = it.c[i]->qb0;
    bx.n[i] = it.c[i]->qb1 - it.c[i]->qb0;
  }
  return bx;
}

// Adds scale and rpb to raw dot products and masks the padding lanes, for one query's rows.
// Window rows are (t0, t1) in [0, n0) x [0, n1), lanes l < n2 along the last dimension.
inline void finish_scores(float* sc, int64_t W, int64_t n0, int64_t n1, int64_t n2, float scale,
                          const float* rpb_h, const int64_t* roff, const int64_t* R) {
  for (int64_t t0 = 0; t0 < n0; ++t0)
    for (int64_t t1 = 0; t1 < n1; ++t1) {
      float* s = sc + (t0 * n1 + t1) * W;
      if (rpb_h) {
        const float* rr = rpb_h + ((roff[0] + t0) * R[1] + (roff[1] + t1)) * R[2] + roff[2];
        for (int64_t l = 0; l < n2; ++l) s[l] = s[l] * scale + rr[l];
      } else {
        for (int64_t l = 0; l < n2; ++l) s[l] *= scale;
      }
      for (int64_t l = n2; l < W; ++l) s[l] = kMasked;
    }
}

// ------------------------------------------------------------------------------------------------
// Forward.
// ------------------------------------------------------------------------------------------------

template <typename T>
void forward_item(const Ctx& cx, int64_t item, const T* q, const T* k, const T* v, T* out, float* lse,
                  const float* rpb) {
  const NAShape& p = *cx.p;
  const Ctx::Item it = cx.item(item);
  const int64_t D = p.D, Dv = p.Dv, Dvp = round8(Dv), H = p.H;
  const Box kb = key_box(it);
  const int64_t n1 = kb.n[1], n2 = kb.n[2], n2p = lane_ld(n2), rk = row_ld(D, n2p);
  Scratch& s = scratch();
  float* KT = grow(s.a, kb.n[0] * n1 * rk);
  float* Vn = grow(s.b, kb.n[0] * n1 * n2 * Dvp);
  gather_box(cx, k, D, it.b, it.h, kb, true, n2p, KT, rk);
  gather_box(cx, v, Dv, it.b, it.h, kb, false, Dvp, Vn);
  const int64_t Wmax = round8(cx.dim[2].max_wn);
  const int64_t rows_max = cx.dim[0].max_wn * cx.dim[1].max_wn;
  float* sc = grow(s.sc, rows_max * Wmax);
  float* xq = grow(s.x, D);
  float* acc = grow(s.acc, Dvp);
  const float** krows = grow(s.rows, rows_max);
  const float** vrows = grow(s.rows2, rows_max);
  const float** outs = grow(s.outs, rows_max);
  const float* rpb_h = rpb ? rpb + it.h * cx.rpb_size : nullptr;
  const Dim &d0 = cx.dim[0], &d1 = cx.dim[1], &d2 = cx.dim[2];
  for (int64_t i0 = it.c[0]->i0; i0 < it.c[0]->i1; ++i0) {
    const int64_t x0 = d0.pos(kb.g[0], i0);
    const int64_t w0 = d0.ws[x0] - kb.lo[0], m0 = d0.wn[x0];
    for (int64_t i1 = it.c[1]->i0; i1 < it.c[1]->i1; ++i1) {
      const int64_t x1 = d1.pos(kb.g[1], i1);
      const int64_t w1 = d1.ws[x1] - kb.lo[1], m1 = d1.wn[x1];
      const int64_t rows = m0 * m1;
      for (int64_t i2 = it.c[2]->i0; i2 < it.c[2]->i1; ++i2) {
        const int64_t x2 = d2.pos(kb.g[2], i2);
        const int64_t w2 = d2.ws[x2] - kb.lo[2], m2 = d2.wn[x2];
        const int64_t nv = (m2 + 7) / 8, W = 8 * nv;
        const int64_t tok = cx.token(it.b, x0, x1, x2) * H + it.h;
        const float* xqv = load_row(q + tok * D, D, xq);
        for (int64_t t0 = 0; t0 < m0; ++t0)
          for (int64_t t1 = 0; t1 < m1; ++t1) {
            const int64_t r = t0 * m1 + t1, brow = (w0 + t0) * n1 + (w1 + t1);
            krows[r] = KT + brow * rk + w2;
            vrows[r] = Vn + (brow * n2 + w2) * Dvp;
          }
        dot_rows(xqv, D, krows, rows, n2p, nv, sc, W, outs);
        const int64_t roff[3] = {d0.ws[x0] - i0 + p.kernel[0] - 1, d1.ws[x1] - i1 + p.kernel[1] - 1,
                                 d2.ws[x2] - i2 + p.kernel[2] - 1};
        finish_scores(sc, W, m0, m1, m2, cx.scale, rpb_h, roff, cx.R);
        const int64_t n = rows * W;
        V8 mv = vset1(kMasked);
        for (int64_t j = 0; j < n; j += 8) mv = vmax(mv, vload(sc + j));
        const float m = vhmax(mv);
        const V8 mb = vset1(m);
        V8 sum = vzero();
        for (int64_t j = 0; j < n; j += 8) {
          const V8 e = vexp(vsub(vload(sc + j), mb));
          vstore(sc + j, e);
          sum = vadd(sum, e);
        }
        const float l = vhsum(sum);
        wsum(sc, W, rows, m2, vrows, Dvp, Dvp / 8, acc);
        store_row(acc, out + tok * Dv, Dv, 1.f / l);
        lse[tok] = m + std::log(l);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward.
// ------------------------------------------------------------------------------------------------

// delta[tok] = sum_c dout[tok, c] * out[tok, c] (fp32), items over (b, y0, y1) rows.
template <typename T>
void delta_row(const Ctx& cx, int64_t row, const T* out, const T* dout, float* delta) {
  const NAShape& p = *cx.p;
  Scratch& s = scratch();
  const int64_t Dv = p.Dv;
  float* abuf = grow(s.x, Dv);
  float* bbuf = grow(s.y, Dv);
  const int64_t n = p.S[2] * p.H;
  for (int64_t t = row * n; t < (row + 1) * n; ++t) {
    const float* a = load_row(out + t * Dv, Dv, abuf);
    const float* b = load_row(dout + t * Dv, Dv, bbuf);
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t c = 0;
    for (; c + 8 <= Dv; c += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += a[c + l] * b[c + l];
    for (; c < Dv; ++c) lanes[0] += a[c] * b[c];
    delta[t] = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
  }
}

// Query-centric: dq = scale * sum_j dS_ij k_j and the item's drpb partial (sum of dS per offset).
template <typename T>
void backward_query_item(const Ctx& cx, int64_t item, const T* q, const T* k, const T* v, const T* dout,
                         const float* lse, const float* delta, const float* rpb, T* dq, float* drpb_part) {
  const NAShape& p = *cx.p;
  const Ctx::Item it = cx.item(item);
  const int64_t D = p.D, Dv = p.Dv, Dp = round8(D), H = p.H;
  const Box kb = key_box(it);
  const int64_t n1 = kb.n[1], n2 = kb.n[2], n2p = lane_ld(n2), rk = row_ld(D, n2p), rv = row_ld(Dv, n2p);
  const int64_t nbox = kb.n[0] * n1;
  Scratch& s = scratch();
  float* KT = grow(s.a, nbox * rk);
  float* VT = grow(s.b, nbox * rv);
  float* Kn = grow(s.c, nbox * n2 * Dp);
  gather_box(cx, k, D, it.b, it.h, kb, true, n2p, KT, rk);
  gather_box(cx, v, Dv, it.b, it.h, kb, true, n2p, VT, rv);
  gather_box(cx, k, D, it.b, it.h, kb, false, Dp, Kn);
  const int64_t Wmax = round8(cx.dim[2].max_wn);
  const int64_t rows_max = cx.dim[0].max_wn * cx.dim[1].max_wn;
  float* sc = grow(s.sc, rows_max * Wmax);
  float* dp = grow(s.sc2, rows_max * Wmax);
  float* xq = grow(s.x, D);
  float* xdo = grow(s.y, Dv);
  float* acc = grow(s.acc, Dp);
  const float** krows = grow(s.rows, rows_max);
  const float** vrows = grow(s.rows2, rows_max);
  const float** outs = grow(s.outs, rows_max);
  thread_local std::vector<const float*> knrows_tl;
  if ((int64_t)knrows_tl.size() < rows_max) knrows_tl.resize(rows_max);
  const float** knrows = knrows_tl.data();
  const float* rpb_h = rpb ? rpb + it.h * cx.rpb_size : nullptr;
  const Dim &d0 = cx.dim[0], &d1 = cx.dim[1], &d2 = cx.dim[2];
  const float scale = cx.scale;
  for (int64_t i0 = it.c[0]->i0; i0 < it.c[0]->i1; ++i0) {
    const int64_t x0 = d0.pos(kb.g[0], i0);
    const int64_t w0 = d0.ws[x0] - kb.lo[0], m0 = d0.wn[x0];
    for (int64_t i1 = it.c[1]->i0; i1 < it.c[1]->i1; ++i1) {
      const int64_t x1 = d1.pos(kb.g[1], i1);
      const int64_t w1 = d1.ws[x1] - kb.lo[1], m1 = d1.wn[x1];
      const int64_t rows = m0 * m1;
      for (int64_t i2 = it.c[2]->i0; i2 < it.c[2]->i1; ++i2) {
        const int64_t x2 = d2.pos(kb.g[2], i2);
        const int64_t w2 = d2.ws[x2] - kb.lo[2], m2 = d2.wn[x2];
        const int64_t nv = (m2 + 7) / 8, W = 8 * nv;
        const int64_t tok = cx.token(it.b, x0, x1, x2) * H + it.h;
        const float* xqv = load_row(q + tok * D, D, xq);
        const float* xdov = load_row(dout + tok * Dv, Dv, xdo);
        for (int64_t t0 = 0; t0 < m0; ++t0)
          for (int64_t t1 = 0; t1 < m1; ++t1) {
            const int64_t r = t0 * m1 + t1, brow = (w0 + t0) * n1 + (w1 + t1);
            krows[r] = KT + brow * rk + w2;
            vrows[r] = VT + brow * rv + w2;
            knrows[r] = Kn + (brow * n2 + w2) * Dp;
          }
        dot_rows(xqv, D, krows, rows, n2p, nv, sc, W, outs);
        dot_rows(xdov, Dv, vrows, rows, n2p, nv, dp, W, outs);
        const int64_t roff[3] = {d0.ws[x0] - i0 + p.kernel[0] - 1, d1.ws[x1] - i1 + p.kernel[1] - 1,
                                 d2.ws[x2] - i2 + p.kernel[2] - 1};
        finish_scores(sc, W, m0, m1, m2, scale, rpb_h, roff, cx.R);
        const V8 lb = vset1(lse[tok]), db = vset1(delta[tok]);
        const int64_t n = rows * W;
        for (int64_t j = 0; j < n; j += 8) {
          const V8 pr = vexp(vsub(vload(sc + j), lb));
          vstore(sc + j, vmul(pr, vsub(vload(dp + j), db)));  // dS (0 on padding lanes)
        }
        if (drpb_part) {
          for (int64_t t0 = 0; t0 < m0; ++t0)
            for (int64_t t1 = 0; t1 < m1; ++t1) {
              float* o = drpb_part + ((roff[0] + t0) * cx.R[1] + (roff[1] + t1)) * cx.R[2] + roff[2];
              const float* ds = sc + (t0 * m1 + t1) * W;
              for (int64_t l = 0; l < m2; ++l) o[l] += ds[l];
            }
        }
        wsum(sc, W, rows, m2, knrows, Dp, Dp / 8, acc);
        store_row(acc, dq + tok * D, D, scale);
      }
    }
  }
}

// Key-centric: for each key j of the item, over the queries i whose windows contain it,
// dv_j = sum_i P_ij dO_i and dk_j = scale * sum_i dS_ij q_i.
template <typename T>
void backward_key_item(const Ctx& cx, int64_t item, const T* q, const T* k, const T* v, const T* dout,
                       const float* lse, const float* delta, const float* rpb, T* dk, T* dv) {
  const NAShape& p = *cx.p;
  const Ctx::Item it = cx.item(item);
  const int64_t D = p.D, Dv = p.Dv, Dp = round8(D), Dvp = round8(Dv), H = p.H;
  const Box qb = query_box(it);
  const int64_t n1 = qb.n[1], n2 = qb.n[2], n2p = lane_ld(n2), rq = row_ld(D, n2p), ro = row_ld(Dv, n2p);
  const int64_t nbox = qb.n[0] * n1;
  Scratch& s = scratch();
  float* QT = grow(s.a, nbox * rq);
  float* OT = grow(s.b, nbox * ro);
  float* Qn = grow(s.c, nbox * n2 * Dp);
  float* On = grow(s.d, nbox * n2 * Dvp);
  float* LS = grow(s.e, nbox * n2p);
  float* DL = grow(s.f, nbox * n2p);
  if (nbox * n2 > 0) {
    gather_box(cx, q, D, it.b, it.h, qb, true, n2p, QT, rq);
    gather_box(cx, dout, Dv, it.b, it.h, qb, true, n2p, OT, ro);
    gather_box(cx, q, D, it.b, it.h, qb, false, Dp, Qn);
    gather_box(cx, dout, Dv, it.b, it.h, qb, false, Dvp, On);
    gather_scalar(cx, lse, it.b, it.h, qb, n2p, LS);
    gather_scalar(cx, delta, it.b, it.h, qb, n2p, DL);
  }
  const int64_t Wmax = round8(cx.dim[2].max_inv);
  const int64_t rows_max = cx.dim[0].max_inv * cx.dim[1].max_inv;
  float* sc = grow(s.sc, rows_max * Wmax);
  float* dp = grow(s.sc2, rows_max * Wmax);
  float* xk = grow(s.x, D);
  float* xv = grow(s.y, Dv);
  float* acc = grow(s.acc, Dp);
  float* acc2 = grow(s.acc2, Dvp);
  thread_local std::vector<const float*> ptr_tl;
  if ((int64_t)ptr_tl.size() < 6 * rows_max) ptr_tl.resize(6 * rows_max);
  const float** qrows = ptr_tl.data();
  const float** orows = qrows + rows_max;
  const float** qnrows = orows + rows_max;
  const float** onrows = qnrows + rows_max;
  const float** lrows = onrows + rows_max;
  const float** outs = lrows + rows_max;
  std::vector<const float*>& drows_tl = s.rows;
  const float** drows = grow(drows_tl, rows_max);
  const float* rpb_h = rpb ? rpb + it.h * cx.rpb_size : nullptr;
  const Dim &d0 = cx.dim[0], &d1 = cx.dim[1], &d2 = cx.dim[2];
  const float scale = cx.scale;
  for (int64_t j0 = it.c[0]->i0; j0 < it.c[0]->i1; ++j0) {
    const int64_t y0 = d0.pos(qb.g[0], j0);
    const int64_t u0 = d0.ilo[y0] - qb.lo[0], m0 = d0.ihi[y0] - d0.ilo[y0];
    for (int64_t j1 = it.c[1]->i0; j1 < it.c[1]->i1; ++j1) {
      const int64_t y1 = d1.pos(qb.g[1], j1);
      const int64_t u1 = d1.ilo[y1] - qb.lo[1], m1 = d1.ihi[y1] - d1.ilo[y1];
      const int64_t rows = m0 * m1;
      for (int64_t j2 = it.c[2]->i0; j2 < it.c[2]->i1; ++j2) {
        const int64_t y2 = d2.pos(qb.g[2], j2);
        const int64_t u2 = d2.ilo[y2] - qb.lo[2], m2 = d2.ihi[y2] - d2.ilo[y2];
        const int64_t tok = cx.token(it.b, y0, y1, y2) * H + it.h;
        if (rows == 0 || m2 == 0) {  // no query attends this key
          std::fill(acc, acc + Dp, 0.f);
          store_row(acc, dk + tok * D, D, 1.f);
          std::fill(acc2, acc2 + Dvp, 0.f);
          store_row(acc2, dv + tok * Dv, Dv, 1.f);
          continue;
        }
        const int64_t nv = (m2 + 7) / 8, W = 8 * nv;
        const float* xkv = load_row(k + tok * D, D, xk);
        const float* xvv = load_row(v + tok * Dv, Dv, xv);
        for (int64_t t0 = 0; t0 < m0; ++t0)
          for (int64_t t1 = 0; t1 < m1; ++t1) {
            const int64_t r = t0 * m1 + t1, brow = (u0 + t0) * n1 + (u1 + t1);
            qrows[r] = QT + brow * rq + u2;
            orows[r] = OT + brow * ro + u2;
            qnrows[r] = Qn + (brow * n2 + u2) * Dp;
            onrows[r] = On + (brow * n2 + u2) * Dvp;
            lrows[r] = LS + brow * n2p + u2;
            drows[r] = DL + brow * n2p + u2;
          }
        dot_rows(xkv, D, qrows, rows, n2p, nv, sc, W, outs);
        dot_rows(xvv, Dv, orows, rows, n2p, nv, dp, W, outs);
        // Query lane l of row (t0, t1) is in-group (ilo0 + t0, ilo1 + t1, ilo2 + l); the bias
        // offset (j - i) + k - 1 then decreases along the lanes.
        for (int64_t t0 = 0; t0 < m0; ++t0)
          for (int64_t t1 = 0; t1 < m1; ++t1) {
            const int64_t r = t0 * m1 + t1;
            float* srow = sc + r * W;
            float* drow = dp + r * W;
            const float* lr = lrows[r];
            const float* dr = drows[r];
            const float* rr = nullptr;
            if (rpb_h) {
              const int64_t a0 = j0 - (d0.ilo[y0] + t0) + p.kernel[0] - 1;
              const int64_t a1 = j1 - (d1.ilo[y1] + t1) + p.kernel[1] - 1;
              const int64_t a2 = j2 - d2.ilo[y2] + p.kernel[2] - 1;
              rr = rpb_h + (a0 * cx.R[1] + a1) * cx.R[2] + a2;  // lane l: rr[-l]
            }
            if (rr) {
              for (int64_t l = 0; l < m2; ++l) srow[l] = srow[l] * scale + rr[-l] - lr[l];
            } else {
              const V8 sv = vset1(scale);
              int64_t l = 0;
              for (; l + 8 <= m2; l += 8) vstore(srow + l, vsub(vmul(vload(srow + l), sv), vload(lr + l)));
              for (; l < m2; ++l) srow[l] = srow[l] * scale - lr[l];
            }
            for (int64_t l = m2; l < W; ++l) srow[l] = kMasked;
            for (int64_t l = 0; l < W; l += 8) {
              const V8 pr = vexp(vload(srow + l));
              vstore(srow + l, pr);
              // lanes past m2 read other queries' delta (or padding); pr is 0 there.
              vstore(drow + l, vmul(pr, vsub(vload(drow + l), vload(dr + l))));
            }
          }
        wsum(sc, W, rows, m2, onrows, Dvp, Dvp / 8, acc2);
        store_row(acc2, dv + tok * Dv, Dv, 1.f);
        wsum(dp, W, rows, m2, qnrows, Dp, Dp / 8, acc);
        store_row(acc, dk + tok * D, D, scale);
      }
    }
  }
}

}  // namespace

Status na_forward(const NAShape& p, const void* q, const void* k, const void* v, void* out, float* lse,
                  const float* rpb, int n_threads) {
  Status st = check(p);
  if (!st.is_ok()) return st;
  if (p.B == 0) return Status::ok();
  if (!q || !k || !v || !out || !lse) return Status::invalid("neighborhood attention: null data pointer");
  if (p.has_rpb && !rpb) return Status::invalid("neighborhood attention: has_rpb is set but rpb is a null pointer");
  Ctx cx;
  st = cx.init(p);
  if (!st.is_ok()) return st;
  const float* r = p.has_rpb ? rpb : nullptr;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(cx.n_items, n_threads, [&](int64_t item) {
      forward_item<T>(cx, item, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                      static_cast<T*>(out), lse, r);
    });
    return Status::ok();
  });
}

Status na_backward(const NAShape& p, const void* q, const void* k, const void* v, const void* out,
                   const void* dout, const float* lse, const float* rpb, void* dq, void* dk, void* dv,
                   float* drpb, int n_threads) {
  Status st = check(p);
  if (!st.is_ok()) return st;
  if (p.has_rpb && (!rpb || !drpb))
    return Status::invalid("neighborhood attention: has_rpb is set but rpb or drpb is a null pointer");
  Ctx cx;
  st = cx.init(p);
  if (!st.is_ok()) return st;
  if (p.B == 0) {
    if (p.has_rpb) std::fill(drpb, drpb + p.H * cx.rpb_size, 0.f);
    return Status::ok();
  }
  if (!q || !k || !v || !out || !dout || !lse || !dq || !dk || !dv)
    return Status::invalid("neighborhood attention: null data pointer");
  const float* r = p.has_rpb ? rpb : nullptr;
  const int64_t n_tokens = p.B * p.S[0] * p.S[1] * p.S[2];
  std::vector<float> delta((size_t)(n_tokens * p.H));
  // The query-centric work runs in a fixed number of slices (sizes only), each with its own
  // drpb partial [H, rpb_size]: memory stays bounded whatever the number of items.
  const int64_t n_slices = std::min<int64_t>(cx.n_items, kQuerySlices);
  std::vector<float> part;
  if (p.has_rpb) part.assign((size_t)(n_slices * p.H * cx.rpb_size), 0.f);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* tq = static_cast<const T*>(q);
    const T* tk = static_cast<const T*>(k);
    const T* tv = static_cast<const T*>(v);
    const T* tdo = static_cast<const T*>(dout);
    parallel_for(p.B * p.S[0] * p.S[1], n_threads, [&](int64_t row) {
      delta_row<T>(cx, row, static_cast<const T*>(out), tdo, delta.data());
    });
    // One pool run: tasks [0, n_slices) are query-centric slices (dq, drpb partials), each a
    // fixed contiguous range of items run in order into the slice's own drpb partial; tasks
    // [n_slices, n_slices + n_items) are key-centric items (dk, dv).
    parallel_for(n_slices + cx.n_items, n_threads, [&](int64_t task) {
      if (task < n_slices) {
        const int64_t lo = task * cx.n_items / n_slices, hi = (task + 1) * cx.n_items / n_slices;
        for (int64_t item = lo; item < hi; ++item)
          backward_query_item<T>(cx, item, tq, tk, tv, tdo, lse, delta.data(), r, static_cast<T*>(dq),
                                 r ? part.data() + (task * p.H + cx.item(item).h) * cx.rpb_size : nullptr);
      } else {
        backward_key_item<T>(cx, task - n_slices, tq, tk, tv, tdo, lse, delta.data(), r, static_cast<T*>(dk),
                             static_cast<T*>(dv));
      }
    });
    if (p.has_rpb) {
      // Fixed-order reduction of the slices' partials.
      for (int64_t e = 0; e < p.H * cx.rpb_size; ++e) {
        double acc = 0.0;
        for (int64_t sl = 0; sl < n_slices; ++sl) acc += part[(size_t)(sl * p.H * cx.rpb_size + e)];
        drpb[e] = (float)acc;
      }
    }
    return Status::ok();
  });
}

}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
