// Task-masked attention CPU entry points (task_attention/task_attention.h), one translation unit
// per ISA (see CMakeLists.txt): argument checks, the group masks and flash tile summaries, and the
// choice of code path by the sizes alone (forward.cpp, backward.cpp, lanes.cpp hold the paths).
//
// Layout of the computation. Every score block is computed on fp32 tiles: queries pre-scaled by
// `scale` (rows padded to a multiple of kR), keys and values transposed ([D, nkp] and [Dv, nkp],
// nkp = key count rounded up to 8, zero padded), so that the inner loops run over keys in
// 8-lane chunks that the compiler vectorises without -ffast-math. Reductions (row max, row sum,
// dot products) use 8 fixed lanes: their order depends only on the sizes.
//
// Masking. Every query position gets a 64-bit mask of the kv groups it may attend (0 for
// padding), every key a one-hot bit of its group (0 for padding): (qrow & kbit) != 0 is the
// group rule. Flash tiles keep the OR and AND of qrow over a q-tile and the OR of kbit over a
// k-tile: a pair of tiles with (q_or & k_or) == 0 is skipped, one with k_or inside q_and (no
// padding key, not crossing the causal diagonal) skips the per-element test. The short path
// instead builds an additive 0 / -inf bias for the whole block once per batch row.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/convert.h"
#include "common/isa.h"
#include "common/philox.h"
#include "common/thread_pool.h"
#include "task_attention/task_attention.h"
#include "task_attention/tiles.h"
#include "task_attention/vector_math.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace task_attention_impl {

namespace {

// Numbers the calls: the per-thread caches of the short path's mask bias are keyed by it (tiles.h).
std::atomic<uint64_t> g_call_id{1};

// Which lane kernel instance runs: compile-time dims for the common square head sizes.
template <typename T, typename Fn>
void with_lane_dims(int64_t D, int64_t Dv, Fn&& fn) {
  if (D == Dv && D == 4) return fn(std::integral_constant<int, 4>{});
  if (D == Dv && D == 8) return fn(std::integral_constant<int, 8>{});
  if (D == Dv && D == 16) return fn(std::integral_constant<int, 16>{});
  return fn(std::integral_constant<int, 0>{});
}

bool lanes_fit(const TaskAttentionProblem& p) { return p.D <= kLaneMaxDim && p.Dv <= kLaneMaxDim; }

// ---- checks and setup -------------------------------------------------------------------------

Status check(const TaskAttentionProblem& p) {
  auto bad = [](const std::string& m) { return Status::invalid("task_attention: " + m); };
  if (p.B < 0 || p.Hq < 0 || p.Lq < 0 || p.Lk < 0 || p.D < 0 || p.Dv < 0)
    return bad("sizes must be >= 0, got B=" + std::to_string(p.B) + " Hq=" + std::to_string(p.Hq) +
               " Lq=" + std::to_string(p.Lq) + " Lk=" + std::to_string(p.Lk) + " D=" + std::to_string(p.D) +
               " Dv=" + std::to_string(p.Dv));
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0)
    return bad("Hq must be a multiple of Hkv > 0, got Hq=" + std::to_string(p.Hq) + " Hkv=" + std::to_string(p.Hkv));
  if (p.G < 0) return bad("G must be >= 0, got " + std::to_string(p.G));
  if (p.G > kTaskAttentionMaxGroups)
    return bad("the CPU kernel supports at most " + std::to_string(kTaskAttentionMaxGroups) + " groups, got G=" +
               std::to_string(p.G));
  if (p.q_groups_bstride != 0 && p.q_groups_bstride != p.Lq)
    return bad("q_groups_bstride must be 0 or Lq=" + std::to_string(p.Lq) + ", got " +
               std::to_string(p.q_groups_bstride));
  if (p.kv_groups_bstride != 0 && p.kv_groups_bstride != p.Lk)
    return bad("kv_groups_bstride must be 0 or Lk=" + std::to_string(p.Lk) + ", got " +
               std::to_string(p.kv_groups_bstride));
  if (!(p.dropout_p >= 0.f && p.dropout_p < 1.f))
    return bad("dropout_p must be in [0, 1), got " + std::to_string(p.dropout_p));
  if (!std::isfinite(p.scale)) return bad("scale must be finite, got " + std::to_string(p.scale));
  if (!valid_dtype((int)p.dtype)) return bad("unknown dtype code " + std::to_string((int)p.dtype));
  return Status::ok();
}

Status null_check(const void* ptr, int64_t n, const char* name) {
  if (n > 0 && ptr == nullptr) return Status::invalid(std::string("task_attention: ") + name + " is a null pointer");
  return Status::ok();
}

// Validates the group ids and builds the masks (and the flash tile summaries).
Status setup(const TaskAttentionProblem& p, Ctx& c) {
  c.p = &p;
  c.rep = p.Hq / p.Hkv;
  c.short_path = p.Lq <= kTaskAttentionShortMax && p.Lk <= kTaskAttentionShortMax;
  c.call_id = g_call_id.fetch_add(1);
  c.dropout = p.dropout_p > 0.f;
  c.keep_scale = c.dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  c.seed_lo = (uint32_t)(p.seed & 0xffffffffu);
  c.seed_hi = (uint32_t)(p.seed >> 32);
  Status st;
  if (!(st = null_check(p.allow, p.G, "allow")).is_ok()) return st;
  std::vector<uint64_t> allow_row((size_t)std::max<int64_t>(p.G, 1), 0);
  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t t = 0; t < p.G; ++t)
      if (p.allow[g * p.G + t]) allow_row[g] |= uint64_t(1) << t;
  const int64_t nbq = p.q_groups_bstride ? p.B : 1, nbk = p.kv_groups_bstride ? p.B : 1;
  if (!(st = null_check(p.q_groups, nbq * p.Lq, "q_groups")).is_ok()) return st;
  if (!(st = null_check(p.kv_groups, nbk * p.Lk, "kv_groups")).is_ok()) return st;
  c.qrow.assign((size_t)(nbq * p.Lq), 0);
  c.kbit.assign((size_t)(nbk * p.Lk), 0);
  auto range_error = [&](const char* name, int32_t g, int64_t r, int64_t i, bool batched) {
    std::string where = batched ? "[" + std::to_string(r) + ", " + std::to_string(i) + "]" : "[" + std::to_string(i) + "]";
    return Status::invalid(std::string(name) + ": group id " + std::to_string(g) + " at " + where +
                           " is out of range: expected -1 (padding) or 0 <= id < G=" + std::to_string(p.G));
  };
  for (int64_t r = 0; r < nbq; ++r)
    for (int64_t i = 0; i < p.Lq; ++i) {
      const int32_t g = p.q_groups[r * p.q_groups_bstride + i];
      if (g < -1 || g >= p.G) return range_error("q_groups", g, r, i, p.q_groups_bstride != 0);
      c.qrow[r * p.Lq + i] = g < 0 ? 0 : allow_row[g];
    }
  for (int64_t r = 0; r < nbk; ++r)
    for (int64_t j = 0; j < p.Lk; ++j) {
      const int32_t g = p.kv_groups[r * p.kv_groups_bstride + j];
      if (g < -1 || g >= p.G) return range_error("kv_groups", g, r, j, p.kv_groups_bstride != 0);
      c.kbit[r * p.Lk + j] = g < 0 ? 0 : uint64_t(1) << g;
    }
  c.nqt = (p.Lq + kBQ - 1) / kBQ;
  c.nkt = (p.Lk + kBK - 1) / kBK;
  if (!c.short_path) {
    c.qor.assign((size_t)(nbq * c.nqt), 0);
    c.qand.assign((size_t)(nbq * c.nqt), ~uint64_t(0));
    c.kor.assign((size_t)(nbk * c.nkt), 0);
    c.kpad.assign((size_t)(nbk * c.nkt), 0);
    for (int64_t r = 0; r < nbq; ++r)
      for (int64_t i = 0; i < p.Lq; ++i) {
        const uint64_t m = c.qrow[r * p.Lq + i];
        c.qor[r * c.nqt + i / kBQ] |= m;
        c.qand[r * c.nqt + i / kBQ] &= m;
      }
    for (int64_t r = 0; r < nbk; ++r)
      for (int64_t j = 0; j < p.Lk; ++j) {
        const uint64_t m = c.kbit[r * p.Lk + j];
        c.kor[r * c.nkt + j / kBK] |= m;
        if (m == 0) c.kpad[r * c.nkt + j / kBK] = 1;
      }
  }
  return Status::ok();
}

// Short path work split: whole batch rows when there are plenty, else (b, kv head).
bool short_per_head(const TaskAttentionProblem& p, int n_threads) {
  return p.B < 8 * std::max(1, n_threads) && p.Hkv > 1;
}

}  // namespace
}  // namespace task_attention_impl

using namespace task_attention_impl;

Status task_attention_forward(const TaskAttentionProblem& p, void* out, float* lse, int n_threads) {
  Status st = check(p);
  if (!st.is_ok()) return st;
  const int64_t rows = p.B * p.Hq * p.Lq;
  if ((st = null_check(out, rows * p.Dv, "out")).is_ok() && (st = null_check(lse, rows, "lse")).is_ok() &&
      (st = null_check(p.q, rows * p.D, "q")).is_ok() && (st = null_check(p.k, p.B * p.Hkv * p.Lk * p.D, "k")).is_ok())
    st = null_check(p.v, p.B * p.Hkv * p.Lk * p.Dv, "v");
  if (!st.is_ok()) return st;
  Ctx c;
  st = setup(p, c);
  if (!st.is_ok()) return st;
  if (rows == 0) return Status::ok();
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* o = static_cast<T*>(out);
#ifdef PYOPS_TA_AVX512
    if constexpr (std::is_same<T, float>::value) {
      if (g_avx512 && c.short_path && lanes_fit(p) && !c.dropout && p.D == p.Dv &&
          (p.D == 4 || p.D == 8 || p.D == 16)) {
        const bool per_head = short_per_head(p, n_threads);
        auto run = [&](auto dd) {
          constexpr int DD = decltype(dd)::value;
          parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads,
                       [&](int64_t item) { forward_lanes16_item<DD>(c, item, per_head, o, lse); });
        };
        if (p.D == 4) run(std::integral_constant<int, 4>{});
        else if (p.D == 8) run(std::integral_constant<int, 8>{});
        else run(std::integral_constant<int, 16>{});
        return Status::ok();
      }
    }
#endif
    if (c.short_path && lanes_fit(p)) {
      const bool per_head = short_per_head(p, n_threads);
      with_lane_dims<T>(p.D, p.Dv, [&](auto dims) {
        constexpr int DD = decltype(dims)::value;
        parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads,
                     [&](int64_t item) { forward_lanes_item<DD, DD, T>(c, item, per_head, o, lse); });
      });
    } else if (c.short_path) {
      const bool per_head = short_per_head(p, n_threads);
      parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads,
                   [&](int64_t item) { forward_short_item<T>(c, item, per_head, o, lse); });
    } else {
      KVPack pk;
      const bool v_rows = p.Dv >= 16;
      const int64_t ldv = round_up(std::max<int64_t>(p.Dv, 1), kW);
      const int64_t ntile = p.B * p.Hkv * c.nkt;
      pk.kst = std::max<int64_t>(p.D, 1) * kBK;
      pk.vst = v_rows ? kBK * ldv : std::max<int64_t>(p.Dv, 1) * kBK;
      pk.k.reset(new float[(size_t)(ntile * pk.kst)]);
      pk.v.reset(new float[(size_t)(ntile * pk.vst)]);
      parallel_for(ntile, n_threads, [&](int64_t ti) { pack_kv_tile<T>(c, ti, v_rows, ldv, pk); });
      parallel_for(p.B * p.Hq * c.nqt, n_threads, [&](int64_t item) { forward_flash_item<T>(c, item, pk, o, lse); });
    }
    return Status::ok();
  });
}

Status task_attention_backward(const TaskAttentionProblem& p, const void* out, const void* dout, const float* lse,
                               void* dq, void* dk, void* dv, int n_threads) {
  Status st = check(p);
  if (!st.is_ok()) return st;
  const int64_t rows = p.B * p.Hq * p.Lq, kvrows = p.B * p.Hkv * p.Lk;
  const std::pair<const void*, int64_t> need[] = {
      {p.q, rows * p.D},  {p.k, kvrows * p.D}, {p.v, kvrows * p.Dv}, {out, rows * p.Dv}, {dout, rows * p.Dv},
      {lse, rows},        {dq, rows * p.D},    {dk, kvrows * p.D},   {dv, kvrows * p.Dv}};
  const char* names[] = {"q", "k", "v", "out", "dout", "lse", "dq", "dk", "dv"};
  for (int t = 0; t < 9; ++t)
    if (!(st = null_check(need[t].first, need[t].second, names[t])).is_ok()) return st;
  if (p.B == 0) return Status::ok();
  Ctx c;
  st = setup(p, c);
  if (!st.is_ok()) return st;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* o = static_cast<const T*>(out);
    const T* go = static_cast<const T*>(dout);
    T* gq = static_cast<T*>(dq);
    T* gk = static_cast<T*>(dk);
    T* gv = static_cast<T*>(dv);
    if (p.Lq == 0 || p.Hq == 0) {  // no query: dk, dv are zero
      const T zero = from_float<T>(0.f);
      std::fill(gk, gk + kvrows * p.D, zero);
      std::fill(gv, gv + kvrows * p.Dv, zero);
      return Status::ok();
    }
#ifdef PYOPS_TA_AVX512
    if constexpr (std::is_same<T, float>::value) {
      if (g_avx512 && c.short_path && !c.dropout && p.D == p.Dv && (p.D == 4 || p.D == 8)) {
        const bool per_head = short_per_head(p, n_threads);
        auto run = [&](auto dd, auto nkb) {
          constexpr int DD = decltype(dd)::value, NKB = decltype(nkb)::value;
          parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads, [&](int64_t item) {
            backward_keylanes16_item<DD, NKB>(c, item, per_head, o, go, lse, gq, gk, gv);
          });
        };
        // D = 4: two key vectors per sweep (their dK, dV and K, V fill the register file);
        // D = 8: one.
        if (p.D == 4) run(std::integral_constant<int, 4>{}, std::integral_constant<int, 2>{});
        else run(std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{});
        return Status::ok();
      }
    }
#endif
    if (c.short_path && lanes_fit(p)) {
      const bool per_head = short_per_head(p, n_threads);
      with_lane_dims<T>(p.D, p.Dv, [&](auto dims) {
        constexpr int DD = decltype(dims)::value;
        parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads, [&](int64_t item) {
          backward_lanes_item<DD, DD, T>(c, item, per_head, o, go, lse, gq, gk, gv);
        });
      });
    } else if (c.short_path) {
      const bool per_head = short_per_head(p, n_threads);
      parallel_for(per_head ? p.B * p.Hkv : p.B, n_threads, [&](int64_t item) {
        backward_short_item<T>(c, item, per_head, o, go, lse, gq, gk, gv);
      });
    } else if (p.B * p.Hkv >= 4 * std::max(1, n_threads)) {  // enough (b, kv head) items to share out
      parallel_for(p.B * p.Hkv, n_threads,
                   [&](int64_t item) { backward_fused_item<T>(c, item, o, go, lse, gq, gk, gv); });
    } else {
      parallel_for(p.B * p.Hkv * c.nkt, n_threads,
                   [&](int64_t item) { backward_kv_item<T>(c, item, o, go, lse, gk, gv); });
      parallel_for(p.B * p.Hq * c.nqt, n_threads,
                   [&](int64_t item) { backward_q_item<T>(c, item, o, go, lse, gq); });
    }
    return Status::ok();
  });
}

}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
