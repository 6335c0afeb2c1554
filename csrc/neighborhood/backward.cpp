// Neighbourhood-attention CPU backward (neighborhood/neighborhood.h), one translation unit per ISA
// (see CMakeLists.txt): delta = rowsum(dout * out); dq (and the drpb partials) query-centric in a
// fixed number of slices; dk and dv key-centric over the inverse windows. No atomics.
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
#include "neighborhood/neighborhood.h"
#include "neighborhood/vector_math.h"
#include "neighborhood/windows.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace neighborhood_impl {

namespace {

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
}  // namespace neighborhood_impl

using namespace neighborhood_impl;

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
