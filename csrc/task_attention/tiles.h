// Tiles, masks and per-thread scratch of the task-attention CPU kernels, private to
// csrc/task_attention/: loads and stores between the storage dtype and fp32 tiles, the problem
// context (group masks, flash tile summaries, dropout), tile classification, the short path's
// mask bias, and the work item of every code path (defined in forward.cpp, backward.cpp and
// lanes.cpp, explicitly instantiated there for the three storage types).
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/convert.h"
#include "common/isa.h"
#include "common/philox.h"
#include "task_attention/task_attention.h"
#include "task_attention/vector_math.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace task_attention_impl {

// ---- tile loads / stores ----------------------------------------------------------------------

// dst[r, d] = scale * src[r, d] for r < n, d < W (ld W); rows n..rows_pad zero.
template <typename T>
void load_rows(const T* src, int64_t n, int64_t W, float scale, float* dst, int64_t rows_pad) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < W; ++d) dst[r * W + d] = scale * to_float(src[r * W + d]);
  std::fill(dst + n * W, dst + rows_pad * W, 0.f);
}

// dst[r, d] = src[r, d] for r < n, d < W, with leading dimension ldd >= W (columns zero padded).
template <typename T>
void load_rows_padded(const T* src, int64_t n, int64_t W, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t d = 0; d < W; ++d) dst[r * ldd + d] = to_float(src[r * W + d]);
    for (int64_t d = W; d < ldd; ++d) dst[r * ldd + d] = 0.f;
  }
}

// dst[d, j] = src[j, d] for j < n, d < W (dst leading dimension np, columns n..np zero).
template <typename T>
void load_transposed(const T* src, int64_t n, int64_t W, float* dst, int64_t np) {
  for (int64_t d = 0; d < W; ++d) std::fill(dst + d * np + n, dst + (d + 1) * np, 0.f);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < W; ++d) dst[d * np + j] = to_float(src[j * W + d]);
}

template <typename T>
void store_row(const float* src, T* dst, int64_t n) {
  store_tile(src, dst, n);
}

// dst[j, d] = scale * src[d, j] (src leading dimension np).
template <typename T>
void store_transposed(const float* src, int64_t np, int64_t n, int64_t W, float scale, T* dst) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < W; ++d) dst[j * W + d] = from_float<T>(scale * src[d * np + j]);
}

// ---- problem context --------------------------------------------------------------------------

struct Ctx {
  const TaskAttentionProblem* p = nullptr;
  int64_t rep = 1;          // query heads per kv head
  int64_t nqt = 0, nkt = 0;  // flash tiles
  std::vector<uint64_t> qrow, kbit;  // [q group rows, Lq], [kv group rows, Lk]
  std::vector<uint64_t> qor, qand, kor;
  std::vector<uint8_t> kpad;
  bool dropout = false;
  float keep_scale = 1.f;
  uint32_t seed_lo = 0, seed_hi = 0;
  uint64_t call_id = 0;
  bool short_path = false;

  int64_t qgr(int64_t b) const { return p->q_groups_bstride ? b : 0; }
  int64_t kgr(int64_t b) const { return p->kv_groups_bstride ? b : 0; }
  const uint64_t* qrow_of(int64_t b) const { return qrow.data() + qgr(b) * p->Lq; }
  const uint64_t* kbit_of(int64_t b) const { return kbit.data() + kgr(b) * p->Lk; }

  // Scale (0 or 1/(1-p)) of element (b, h, i, j0 + j) for j < nk; zero beyond up to nkp.
  void keep_row(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t nk, int64_t nkp, float* ks) const {
    const uint32_t c2 = (uint32_t)(b * p->Hq + h);
    const float thr = p->dropout_p;
    for (int64_t j = 0; j < nk; ++j) {
      const Philox4 r = philox4x32_10((uint32_t)(j0 + j), (uint32_t)i, c2, kDropoutStream, seed_lo, seed_hi);
      ks[j] = philox_uniform(r.v[0]) >= thr ? keep_scale : 0.f;
    }
    for (int64_t j = nk; j < nkp; ++j) ks[j] = 0.f;
  }
};

struct TileMask {
  bool skip = false;
  bool full = false;
};

inline TileMask classify(const Ctx& c, int64_t b, int64_t qt, int64_t q0, int64_t nq, int64_t kt,
                         int64_t k0, int64_t nk) {
  TileMask m;
  const int64_t qi = c.qgr(b) * c.nqt + qt, ki = c.kgr(b) * c.nkt + kt;
  const uint64_t qo = c.qor[qi], qa = c.qand[qi], ko = c.kor[ki];
  if ((qo & ko) == 0 || (c.p->causal && k0 > q0 + nq - 1)) {
    m.skip = true;
    return m;
  }
  m.full = !c.kpad[ki] && (ko & ~qa) == 0 && (!c.p->causal || k0 + nk - 1 <= q0);
  return m;
}

// How a block is masked: a precomputed 0 / -inf bias ([nq, nkp], the short path), no test at all
// (full tiles), or the per-element rule. Columns nk..nkp are always -inf.
struct MaskSpec {
  const float* bias = nullptr;
  bool full = false;
  const uint64_t* qrow = nullptr;  // at q0
  const uint64_t* kbit = nullptr;  // at k0
  int64_t q0 = 0, k0 = 0;
  bool causal = false;

  void apply(int64_t i, float* s, int64_t nk, int64_t nkp) const {
    if (bias) {
      const float* bi = bias + i * nkp;
      for (int64_t j = 0; j < nkp; ++j) s[j] += bi[j];
      return;
    }
    if (!full) {
      const uint64_t qm = qrow[i];
      const int64_t lim = causal ? q0 + i - k0 : nk;  // j <= lim allowed by causality
      for (int64_t j = 0; j < nk; ++j) {
        const bool ok = (qm & kbit[j]) != 0 && j <= lim;
        s[j] = ok ? s[j] : kNegInf;
      }
    }
    for (int64_t j = nk; j < nkp; ++j) s[j] = kNegInf;
  }
};

// Per-thread scratch, grown on demand (never shrunk), so work items do not allocate.
struct Scratch {
  std::vector<float> qs, dO, kt, vt, vr, kr, s, s2, ks, acc, m, l, lse, di, dkt, dvt, dq, bias;
  std::vector<float> pfull, dsfull, qst, dot_t;  // backward: a whole q-tile of P, dS; Qs^T, dO^T
  std::vector<float> qpack, dqall, qloaded;      // fused backward: q sides and dq of a (b, kv head)
  uint64_t bias_call = 0;
  int64_t bias_row = -1;
  static void grow(std::vector<float>& v, int64_t n) {
    if ((int64_t)v.size() < n) v.resize((size_t)n);
  }
};

inline Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// The short path's bias for group row (b): [Lq, nkp] of 0 / -inf, cached per thread and call.
inline const float* short_bias(const Ctx& c, Scratch& w, int64_t b, int64_t nkp) {
  const TaskAttentionProblem& p = *c.p;
  const int64_t row = c.qgr(b) * (p.B + 1) + c.kgr(b);  // identifies the (q row, kv row) pair
  if (w.bias_call == c.call_id && w.bias_row == row) return w.bias.data();
  Scratch::grow(w.bias, round_up(p.Lq, kR) * nkp);
  const uint64_t* qr = c.qrow_of(b);
  const uint64_t* kb = c.kbit_of(b);
  for (int64_t i = 0; i < p.Lq; ++i) {
    float* bi = w.bias.data() + i * nkp;
    const uint64_t qm = qr[i];
    for (int64_t j = 0; j < p.Lk; ++j) {
      const bool ok = (qm & kb[j]) != 0 && (!p.causal || j <= i);
      bi[j] = ok ? 0.f : kNegInf;
    }
    for (int64_t j = p.Lk; j < nkp; ++j) bi[j] = kNegInf;
  }
  w.bias_call = c.call_id;
  w.bias_row = row;
  return w.bias.data();
}

// Sizes every scratch buffer for blocks of up to bq queries and bk keys.
inline void size_scratch(const TaskAttentionProblem& p, Scratch& w, int64_t bq, int64_t bk,
                         bool backward) {
  const int64_t bqp = round_up(bq, kR), bkp = round_up(std::max<int64_t>(bk, 1), kW);
  const int64_t Dp = round_up(std::max<int64_t>(p.D, 1), kW), Dvp = round_up(std::max<int64_t>(p.Dv, 1), kW);
  Scratch::grow(w.qs, bqp * std::max<int64_t>(p.D, 1));
  Scratch::grow(w.kt, std::max<int64_t>(p.D, 1) * bkp);
  Scratch::grow(w.vt, std::max<int64_t>(p.Dv, 1) * bkp);
  Scratch::grow(w.vr, bkp * Dvp);
  Scratch::grow(w.s, kR * bkp);
  Scratch::grow(w.s2, std::max(kR * bkp, Dvp + Dp));
  Scratch::grow(w.ks, bkp);
  Scratch::grow(w.acc, bqp * Dvp);
  Scratch::grow(w.m, bqp);
  Scratch::grow(w.l, bqp);
  if (backward) {
    Scratch::grow(w.dO, bqp * std::max<int64_t>(p.Dv, 1));
    Scratch::grow(w.kr, bkp * Dp);
    Scratch::grow(w.lse, bqp);
    Scratch::grow(w.di, bqp);
    const int64_t D4 = round_up(std::max<int64_t>(p.D, 1), kR), Dv4 = round_up(std::max<int64_t>(p.Dv, 1), kR);
    Scratch::grow(w.dkt, D4 * bkp);
    Scratch::grow(w.dvt, Dv4 * bkp);
    Scratch::grow(w.pfull, bqp * bkp);
    Scratch::grow(w.dsfull, bqp * bkp);
    Scratch::grow(w.qst, D4 * bqp);
    Scratch::grow(w.dot_t, Dv4 * bqp);
    Scratch::grow(w.dq, bqp * Dp);
  }
}

// Packed K / V tiles of the flash forward, built once per call: tile (b, kv head, k-tile) holds
// K^T ([D, nkp]) and V as rows ([nk, ldv]) or transposed ([Dv, nkp]), so every q-tile that reads
// a k-tile shares one transposed copy of it.
struct KVPack {
  std::unique_ptr<float[]> k, v;
  int64_t kst = 0, vst = 0;
};

// Head dims up to this take the query-lane kernels of the short path (lanes.cpp).
constexpr int64_t kLaneMaxDim = 32;

// ---- work items -------------------------------------------------------------------------------
// One per code path; task_attention.cpp runs them with parallel_for.

// forward.cpp
template <typename T>
void pack_kv_tile(const Ctx& c, int64_t ti, bool v_rows, int64_t ldv, KVPack& pk);
template <typename T>
void forward_flash_item(const Ctx& c, int64_t item, const KVPack& pk, T* out, float* lse);
template <typename T>
void forward_short_item(const Ctx& c, int64_t item, bool per_head, T* out, float* lse);

// backward.cpp
template <typename T>
void backward_short_item(const Ctx& c, int64_t item, bool per_head, const T* out, const T* dout,
                         const float* lse, T* dq, T* dk, T* dv);
template <typename T>
void backward_kv_item(const Ctx& c, int64_t item, const T* out, const T* dout, const float* lse, T* dk, T* dv);
template <typename T>
void backward_q_item(const Ctx& c, int64_t item, const T* out, const T* dout, const float* lse, T* dq);
template <typename T>
void backward_fused_item(const Ctx& c, int64_t item, const T* out, const T* dout, const float* lse, T* dq, T* dk,
                         T* dv);

// lanes.cpp
template <int DT, int DVT, typename T>
void forward_lanes_item(const Ctx& c, int64_t item, bool per_head, T* out, float* lse);
template <int DT, int DVT, typename T>
void backward_lanes_item(const Ctx& c, int64_t item, bool per_head, const T* out, const T* dout,
                         const float* lse, T* dq, T* dk, T* dv);
#ifdef PYOPS_TA_AVX512
template <int DD>
__attribute__((target("avx512f"))) void forward_lanes16_item(const Ctx& c, int64_t item, bool per_head, float* out,
                                                              float* lse);
template <int DD, int NKB>
__attribute__((target("avx512f"))) void backward_keylanes16_item(const Ctx& c, int64_t item, bool per_head,
                                                                  const float* out, const float* dout,
                                                                  const float* lse, float* dq, float* dk,
                                                                  float* dv);
#endif

}  // namespace task_attention_impl
}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
