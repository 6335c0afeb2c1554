// Neighbourhood-attention CPU forward (neighborhood/neighborhood.h), one translation unit per ISA
// (see CMakeLists.txt): per work item, the key box gathered once, then scores, softmax over each
// query's window and P.V.
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

}  // namespace
}  // namespace neighborhood_impl

using namespace neighborhood_impl;

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

}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
