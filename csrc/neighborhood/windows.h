// Windows, work items and gathers of the neighbourhood-attention CPU kernels, private to
// csrc/neighborhood/: the per-dimension window tables, the argument checks, the problem context,
// the gathers of key / query boxes into fp32 scratch and the score finish shared by the forward
// and the backward.
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
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "common/convert.h"
#include "common/isa.h"
#include "neighborhood/neighborhood.h"
#include "neighborhood/vector_math.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace neighborhood_impl {

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

inline Status build_dim(Dim& dm, int64_t S, int64_t k, int64_t s, int64_t d, bool causal, int64_t tile) {
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

inline Status check(const NAShape& p) {
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
inline void gather_scalar(const Ctx& cx, const float* src, int64_t b, int64_t h, const Box& bx, int64_t ld,
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
inline Scratch& scratch() {
  thread_local Scratch s;
  return s;
}
inline const float** grow(std::vector<const float*>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
  return v.data();
}

// Box of keys needed by an item's queries.
inline Box key_box(const Ctx::Item& it) {
  Box bx;
  for (int i = 0; i < 3; ++i) {
    bx.g[i] = it.c[i]->g;
    bx.lo[i] = it.c[i]->kb0;
    bx.n[i] = it.c[i]->kb1 - it.c[i]->kb0;
  }
  return bx;
}

// Box of queries attending an item's keys.
inline Box query_box(const Ctx::Item& it) {
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

}  // namespace neighborhood_impl
}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
