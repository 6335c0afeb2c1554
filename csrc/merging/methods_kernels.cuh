// CUDA kernels of `pyops.merge` for ties, dare / dare_linear, dare_ties, breadcrumbs, della /
// della_linear and consensus (forward),
// written against common/simt.h so that the same source runs on a GPU (merging/methods.cu) and, for
// tests on machines without one, on host threads (tests/merging/test_methods_cuda_emulated.py).
//
// Semantics: merging/methods.h, operation for operation; the C++ CPU kernels are the bit-level
// reference these kernels are tested against (every product and sum rounded separately, tasks
// summed i = 0..N-1 from 0, the exact per-block TIES threshold).
//
// Work layout
// -----------
// * TIES threshold of (block b, task i): the k-th largest key |tau_i| (fp32 bits & 0x7fffffff,
//   monotone for non-negative floats), k = max(1, floor(density_i * len_b)), by a radix select over
//   three digits (bits 30..20, 19..9, 8..0). Each digit pass histograms the keys that match the
//   prefix chosen so far; the bucket holding the need-th largest key extends the prefix. After the
//   third pass the prefix is the threshold itself: exact, whatever the data (ties, zeros, NaN
//   keys), and independent of the grid, since histogram counts are integers.
//   - many blocks (n_blocks >= kCtaBlocks): one CTA owns a block and runs the three passes over
//     it with a shared-memory histogram (select_blocks);
//   - few blocks (a whole tensor, a few large chunks): each pass spreads the block over many CTAs
//     (select_count: work items of kItem elements, shared histograms flushed into a global
//     [n_blocks, n, kBins] histogram with integer atomics), then select_pick finds the bucket per
//     (block, task) and clears the histogram for the next pass.
// * The combine (every method): one thread per group of 4 consecutive elements, which is also one
//   Philox4x32-10 call per task for DARE (counter (g lo, g hi, i, name_hash), g = j >> 2, word
//   j & 3, key (seed lo, seed hi): common/philox.h). The first kRegTasks tasks' trimmed values stay
//   in registers for the election; further tasks are recomputed (the same operations, so the same
//   bits).
// * Breadcrumbs / DELLA take each element's ascending rank of |tau_i| in its block as an input
//   ([n, numel] int32, from a stable device sort: kernels/merging/ranks.py) and form the keep
//   multiplier from it in the combine, with the CPU kernels' operations (rank_multipliers).
//
// The device code is in four parts, included below in this order: methods_kernels_common.cuh
// (sizes, arguments, shared device helpers), methods_kernels_select.cuh (TIES thresholds),
// methods_kernels_combine.cuh (the forward) and methods_kernels_backward.cuh; this file holds the
// host side (workspace layout, checks, the sequence of launches through a launcher: a CUDA stream
// in methods.cu, host threads in the emulated tests).
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/philox.h"
#include "common/simt.h"
#include "common/status.h"
#include "merging/methods_kernels_backward.cuh"
#include "merging/methods_kernels_combine.cuh"
#include "merging/methods_kernels_common.cuh"
#include "merging/methods_kernels_select.cuh"

namespace pyops {
namespace cuda_merge {

// ---- Host side: workspace and the sequence of launches -----------------------------------------

struct Problem {
  void* out;
  int out_dtype;             // 0 fp32, 1 fp16, 2 bf16 (common/dtype.h)
  const void* base;
  const void* delta_ptrs;    // device int64 array of n addresses
  int64_t n;
  int in_dtype;
  const float* coeffs;
  int64_t coeff_stride_n, coeff_stride_block;
  const double* density;     // device [n], fp64
  int64_t numel, block_size;
  bool from_models;
  int method;
  float lam;
  uint64_t seed;
  uint32_t name_hash;
  int64_t k;
  float tall_lambda;
  double gamma;
  double epsilon;
  const int32_t* ranks;      // device [n, numel]: breadcrumbs, della, della_linear
  bool normalize;
  void* workspace;
  int64_t workspace_bytes;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Layout {
  int64_t block_size = 1, n_blocks = 0;
  bool per_block = true;     // ties: one CTA per block
  int64_t thr_off = 0, hist_off = 0, state_off = 0, partial_off = 0, bytes = 0;
};

// The workspace: TIES thresholds (and the few-blocks selection's histograms and states); for a
// backward with grad_coeffs over blocks longer than kSerialMax, the per-item partial sums.
inline Layout layout(int64_t numel, int64_t block_size, int64_t n, int method, bool grad_coeffs = false) {
  Layout l;
  if (numel <= 0 || block_size <= 0 || n <= 0) return l;
  l.block_size = block_size < numel ? block_size : numel;
  l.n_blocks = (numel + l.block_size - 1) / l.block_size;
  l.per_block = l.n_blocks >= kCtaBlocks;
  const int64_t pairs = l.n_blocks * n;
  if (method == kTies) {
    l.thr_off = 0;
    l.bytes = round_up(pairs * (int64_t)sizeof(float), 256);
    if (!l.per_block) {
      l.hist_off = l.bytes;
      l.bytes += round_up(pairs * kBins * (int64_t)sizeof(uint32_t), 256);
      l.state_off = l.bytes;
      l.bytes += round_up(pairs * (int64_t)sizeof(SelState), 256);
    }
  }
  if (grad_coeffs && l.block_size > kSerialMax) {
    l.partial_off = l.bytes;
    l.bytes += round_up(pairs * ((l.block_size + kRedItem - 1) / kRedItem) * (int64_t)sizeof(double), 256);
  }
  return l;
}

// L: launch(kernel, ctas wanted, args) -> Status (the launcher may cap the grid: every kernel
// strides), zero(ptr, bytes) -> Status.
// TIES: the per-block thresholds into a.thr.
template <class L, class T, bool FM>
Status select_thresholds(Args a, const Layout& l, L& launcher) {
  if (l.per_block) return launcher.launch(&select_blocks<T, FM>, a.n_blocks, a);
  Status st = launcher.zero(a.hist, a.n_blocks * a.n * kBins * (int64_t)sizeof(uint32_t));
  const int64_t items = a.n_blocks * ((a.block_size + kItem - 1) / kItem);
  for (int p = 0; p < kPasses && st.is_ok(); ++p) {
    a.pass = p;
    st = launcher.launch(&select_count<T, FM>, items, a);
    if (st.is_ok()) st = launcher.launch(&select_pick, a.n_blocks * a.n, a);
  }
  return st;
}

template <class L, class T, class O, bool FM>
Status run_typed(const Args& a, const Layout& l, L& launcher) {
  if (a.method == kTies) {
    const Status st = select_thresholds<L, T, FM>(a, l, launcher);
    if (!st.is_ok()) return st;
  }
  return launcher.launch(&combine<T, O, FM>, ((a.numel + 3) / 4 + kThreads - 1) / kThreads, a);
}

// The backward's outputs (each may be null: not wanted) and its incoming gradient; the Problem
// describes the forward (its out / out_dtype are ignored).
struct BwdOutputs {
  const void* grad;          // [numel] in grad_dtype
  int grad_dtype;
  void* grad_base;           // [numel] in in_dtype
  const void* grad_delta_ptrs;  // device int64 array of n addresses of [numel] in in_dtype
  float* grad_coeffs;        // [n, n_blocks] fp32
};

inline Status check(const Problem& p, bool backward, bool grad_coeffs) {
  if (!implements(p.method))
    return Status::invalid("method: the CUDA merge kernels implement codes 1 (ties), 2 (dare), 3 (dare_ties), "
                           "4 (breadcrumbs), 5 (della), 6 (della_linear) and 7 (consensus), got " +
                           std::to_string(p.method));
  if (backward && p.method == kConsensus)
    return Status::invalid("method: consensus has no backward with masks held fixed (its mask depends on the "
                           "coefficients)");
  if (p.in_dtype < 0 || p.in_dtype > 2) return Status::invalid("in_dtype: unknown dtype code " + std::to_string(p.in_dtype));
  if (!backward && (p.out_dtype < 0 || p.out_dtype > 2))
    return Status::invalid("out_dtype: unknown dtype code " + std::to_string(p.out_dtype));
  if (p.numel < 0) return Status::invalid("numel: expected >= 0, got " + std::to_string(p.numel));
  if (p.block_size <= 0) return Status::invalid("block_size: expected > 0, got " + std::to_string(p.block_size));
  if (p.n < 1) return Status::invalid("n: expected at least one task vector, got " + std::to_string(p.n));
  if (p.method == kConsensus && (p.k < 1 || p.k > p.n))
    return Status::invalid("k: expected 1 <= k <= n = " + std::to_string(p.n) + ", got " + std::to_string(p.k));
  if (p.numel == 0) return Status::ok();
  if ((!backward && p.out == nullptr) || p.base == nullptr || p.delta_ptrs == nullptr || p.coeffs == nullptr ||
      p.density == nullptr)
    return Status::invalid("out, base, delta_ptrs, coeffs and density must be non-null device pointers");
  const bool ranked = p.method >= kBreadcrumbs && p.method <= kDellaLinear;
  if (ranked && p.ranks == nullptr)
    return Status::invalid("ranks: breadcrumbs and della need the [n, numel] int32 ranks (a null pointer)");
  const Layout l = layout(p.numel, p.block_size, p.n, p.method, backward && grad_coeffs);
  if (ranked && l.block_size >= (int64_t(1) << 31))
    return Status::invalid("block_size: ranks are int32, blocks must have fewer than 2**31 elements, got " +
                           std::to_string(l.block_size));
  if (p.method == kTies && l.block_size >= kMaxSelectLen)
    return Status::invalid("block_size: the CUDA TIES selection counts blocks of fewer than 2**32 elements, got " +
                           std::to_string(l.block_size));
  if (p.workspace_bytes < l.bytes || (l.bytes > 0 && p.workspace == nullptr))
    return Status::invalid("workspace: expected at least " + std::to_string(l.bytes) + " bytes, got " +
                           std::to_string(p.workspace_bytes));
  return Status::ok();
}

inline Args make_args(const Problem& p, const Layout& l) {
  char* ws = static_cast<char*>(p.workspace);
  Args a{};
  a.out = p.out;
  a.base = p.base;
  a.deltas = static_cast<const void* const*>(p.delta_ptrs);
  a.n = p.n;
  a.coeffs = p.coeffs;
  a.s_n = p.coeff_stride_n;
  a.s_b = p.coeff_stride_block;
  a.density = p.density;
  a.numel = p.numel;
  a.block_size = l.block_size;
  a.n_blocks = l.n_blocks;
  a.method = p.method;
  a.lam = p.lam;
  a.seed_lo = (uint32_t)p.seed;
  a.seed_hi = (uint32_t)(p.seed >> 32);
  a.name_hash = p.name_hash;
  a.k = p.k;
  a.tall_lambda = p.tall_lambda;
  a.gamma = p.gamma;
  a.epsilon = p.epsilon;
  a.ranks = p.ranks;
  a.normalize = p.normalize;
  a.thr = p.method == kTies ? reinterpret_cast<float*>(ws + l.thr_off) : nullptr;
  a.hist = p.method == kTies && !l.per_block ? reinterpret_cast<uint32_t*>(ws + l.hist_off) : nullptr;
  a.state = p.method == kTies && !l.per_block ? reinterpret_cast<SelState*>(ws + l.state_off) : nullptr;
  a.pass = 0;
  return a;
}

// Calls f(T-tag, G-tag or O-tag, FM) with the dtype codes resolved to types.
template <class F>
Status dispatch(int in_dtype, int second_dtype, bool fm, F&& f) {
  auto with_second = [&](auto t) -> Status {
    auto with_fm = [&](auto t2) -> Status {
      return fm ? f(t, t2, std::true_type{}) : f(t, t2, std::false_type{});
    };
    switch (second_dtype) {
      case 0: return with_fm(simt::F32{});
      case 1: return with_fm(simt::F16{});
      default: return with_fm(simt::BF16{});
    }
  };
  switch (in_dtype) {
    case 0: return with_second(simt::F32{});
    case 1: return with_second(simt::F16{});
    default: return with_second(simt::BF16{});
  }
}

template <class L>
Status run(const Problem& p, L& launcher) {
  Status st = check(p, false, false);
  if (!st.is_ok() || p.numel == 0) return st;
  const Layout l = layout(p.numel, p.block_size, p.n, p.method);
  const Args a = make_args(p, l);
  return dispatch(p.in_dtype, p.out_dtype, p.from_models, [&](auto t, auto o, auto fm) -> Status {
    return run_typed<L, decltype(t), decltype(o), decltype(fm)::value>(a, l, launcher);
  });
}

template <class L, class T, class G, bool FM>
Status run_backward_typed(const Args& a, const BwdArgs& bw, const Layout& l, L& launcher) {
  Status st;
  if (a.method == kTies) {
    st = select_thresholds<L, T, FM>(a, l, launcher);
    if (!st.is_ok()) return st;
  }
  const BwdKernelArgs k{a, bw};
  if (a.block_size <= kSerialMax)
    return launcher.launch(&backward_serial<T, G, FM>, (a.n_blocks + kThreads - 1) / kThreads, k);
  st = launcher.launch(&backward_items<T, G, FM>, a.n_blocks * ((a.block_size + kRedItem - 1) / kRedItem), k);
  if (!st.is_ok() || bw.grad_coeffs == nullptr) return st;
  return launcher.launch(&backward_finish, (a.n_blocks * a.n + kThreads - 1) / kThreads, k);
}

template <class L>
Status run_backward(const Problem& p, const BwdOutputs& o, L& launcher) {
  const bool want_coeffs = o.grad_coeffs != nullptr;
  Status st = check(p, true, want_coeffs);
  if (!st.is_ok() || p.numel == 0) return st;
  if (o.grad == nullptr) return Status::invalid("grad must be a non-null device pointer");
  if (o.grad_dtype < 0 || o.grad_dtype > 2)
    return Status::invalid("grad_dtype: unknown dtype code " + std::to_string(o.grad_dtype));
  const Layout l = layout(p.numel, p.block_size, p.n, p.method, want_coeffs);
  const Args a = make_args(p, l);
  BwdArgs bw{};
  bw.grad = o.grad;
  bw.grad_base = o.grad_base;
  bw.grad_deltas = static_cast<void* const*>(const_cast<void*>(o.grad_delta_ptrs));
  bw.grad_coeffs = o.grad_coeffs;
  bw.partial = want_coeffs && l.block_size > kSerialMax
                   ? reinterpret_cast<double*>(static_cast<char*>(p.workspace) + l.partial_off)
                   : nullptr;
  return dispatch(p.in_dtype, o.grad_dtype, p.from_models, [&](auto t, auto g, auto fm) -> Status {
    return run_backward_typed<L, decltype(t), decltype(g), decltype(fm)::value>(a, bw, l, launcher);
  });
}

}  // namespace cuda_merge
}  // namespace pyops
