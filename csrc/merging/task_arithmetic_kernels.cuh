// Block-wise task arithmetic: the device code of the hand-written CUDA kernels (torch-free:
// docs/design.md#the-native-core-is-torch-free), included by task_arithmetic.cu alone. Semantics: merging/task_arithmetic.h, restated in
// merging/task_arithmetic_cuda.h.
//
// Layout of the work
// ------------------
// A "pack" is V = 16 / sizeof(in dtype) consecutive elements starting at a multiple of V
// (4 for fp32, 8 for fp16/bf16), i.e. one 16-byte load of base and of each delta. When every
// pointer a kernel touches is 16-byte aligned (checked once per thread at kernel start; the delta
// pointers live on the device, so the host cannot check them), full packs use vector loads and
// stores; otherwise, and for partial packs, the same arithmetic runs element by element.
//
// * Forward, and the backward when no coefficient gradient is wanted, are element-wise:
//   grid-stride over packs. Each thread tracks the block of its pack incrementally
//   (BlockCursor: one division per thread, then add/compare per step), so the coefficient
//   lookup is one load per task per pack; a pack that straddles a block boundary walks its
//   elements. With coeff_stride_block == 0 the block structure is irrelevant to these outputs and
//   the whole tensor is treated as one block.
// * The backward with a coefficient gradient runs one pass over grad that writes grad_base,
//   grad_deltas and reduces sum(grad * delta_i) per block, in groups of kGroup tasks (a second
//   group re-reads grad and base). The reduction is deterministic (no float atomics) and its
//   bits depend only on the sizes, never on the grid size, the device or the pointer alignment:
//   - block_size >= kLargeMin: work items are (block, chunk of kChunk elements) pieces; one CTA
//     reduces an item in a fixed order (thread -> packs, warp xor-tree, warps in index order).
//     When a block spans several items, stage 1 writes per-(item, task) partial sums (double)
//     into the caller's workspace and stage 2 adds them in item order.
//   - block_size < kLargeMin: G lanes (a power of two <= 32) own one whole block each and reduce
//     it with a G-wide xor tree; the result goes straight to grad_coeffs (no workspace).
//   In both, each rank visits its packs in increasing order and the elements of a pack in
//   increasing order, with one fmaf per element: the vector and the scalar paths perform the
//   identical sequence of operations.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pyops {
namespace cuda_task_arithmetic {


constexpr int kThreads = 256;                 // threads per CTA, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 8;                     // tasks reduced per pass over grad in the backward
constexpr int kBatch = 4;                     // delta loads issued together
static_assert(kGroup % kBatch == 0, "kGroup must be a multiple of kBatch");
constexpr int64_t kChunk = 16384;             // elements per work item (large-block backward)
constexpr int64_t kLargeMin = 4096;           // block sizes >= this use the CTA-per-item backward

// ---- dtypes: storage type and fp32 conversion (codes as in common/dtype.h) -------------------
struct F32 {
  using S = float;
  __device__ __forceinline__ static float to_f(S x) { return x; }
  __device__ __forceinline__ static S from_f(float f) { return f; }
};
struct F16 {
  using S = unsigned short;
  __device__ __forceinline__ static float to_f(S x) { return __half2float(__ushort_as_half(x)); }
  __device__ __forceinline__ static S from_f(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
};
struct BF16 {
  using S = unsigned short;
  __device__ __forceinline__ static float to_f(S x) {
    return __bfloat162float(__ushort_as_bfloat16(x));
  }
  __device__ __forceinline__ static S from_f(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

// Loads and stores go through the ld.global / st.global intrinsics: the delta pointers come out
// of an integer array, so the compiler could not otherwise prove they are global (it would emit
// generic ld/st). Inputs are read with __ldg (ld.global.nc). Every element of an output is
// written by the thread that read the inputs at that index, after those reads, so the forward
// may write `out` exactly over `base` or a delta (in place); partial overlaps are not supported,
// and the backward's outputs must not overlap grad (grad is re-read for tasks beyond kGroup).
//
// Vector path: W elements (W = 4 or 8) moved as W * sizeof(S) / 4 32-bit words in 16-byte (or
// 8-byte) accesses, so that only 16-byte alignment of the pointer is needed; element e of a
// 2-byte type is the low (e even) or high (e odd) half of word e / 2 (little endian).
template <int NW>
__device__ __forceinline__ void ldg_words(const void* p, unsigned (&w)[NW]) {
  if constexpr (NW % 4 == 0) {
#pragma unroll
    for (int q = 0; q < NW / 4; ++q) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + q);
      w[4 * q] = v.x;
      w[4 * q + 1] = v.y;
      w[4 * q + 2] = v.z;
      w[4 * q + 3] = v.w;
    }
  } else {
    static_assert(NW == 2, "unsupported pack size");
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x;
    w[1] = v.y;
  }
}

template <int NW>
__device__ __forceinline__ void stg_words(void* p, const unsigned (&w)[NW]) {
  if constexpr (NW % 4 == 0) {
#pragma unroll
    for (int q = 0; q < NW / 4; ++q)
      __stwb(reinterpret_cast<uint4*>(p) + q,
             make_uint4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]));
  } else {
    static_assert(NW == 2, "unsupported pack size");
    __stwb(reinterpret_cast<uint2*>(p), make_uint2(w[0], w[1]));
  }
}

template <class T, int W, bool VEC>
__device__ __forceinline__ void load(const typename T::S* p, float (&x)[W]) {
  using S = typename T::S;
  if constexpr (VEC) {
    static_assert(W == 4 || W == 8, "vector packs hold 4 or 8 elements");
    constexpr int NW = W * int(sizeof(S)) / 4;
    unsigned w[NW];
    ldg_words<NW>(p, w);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      if constexpr (sizeof(S) == 4)
        x[e] = T::to_f(__uint_as_float(w[e]));
      else
        x[e] = T::to_f(static_cast<S>((w[e >> 1] >> ((e & 1) * 16)) & 0xffffu));
    }
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) x[e] = T::to_f(__ldg(p + e));
  }
}

template <class T, int W, bool VEC>
__device__ __forceinline__ void store(typename T::S* p, const float (&x)[W]) {
  using S = typename T::S;
  if constexpr (VEC) {
    static_assert(W == 4 || W == 8, "vector packs hold 4 or 8 elements");
    constexpr int NW = W * int(sizeof(S)) / 4;
    unsigned w[NW];
#pragma unroll
    for (int k = 0; k < NW; ++k) {
      if constexpr (sizeof(S) == 4) {
        w[k] = __float_as_uint(T::from_f(x[k]));
      } else {
        w[k] = static_cast<unsigned>(T::from_f(x[2 * k])) |
               (static_cast<unsigned>(T::from_f(x[2 * k + 1])) << 16);
      }
    }
    stg_words<NW>(p, w);
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) __stwb(p + e, T::from_f(x[e]));
  }
}

// Entry i of a device array of int64 device addresses.
__device__ __forceinline__ uintptr_t addr_at(const long long* arr, int64_t i) {
  return static_cast<uintptr_t>(__ldg(arr + i));
}

// The task term: delta_i, or finetuned_i - base.
template <bool FM>
__device__ __forceinline__ float task_term(float x, float b) {
  if constexpr (FM) {
    return x - b;
  } else {
    return x;
  }
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Block index of element j and its offset in the block, advanced by a fixed step without
// dividing again (0 <= r < bs throughout).
struct BlockCursor {
  int64_t b, r, q, s, bs;
  __device__ BlockCursor(int64_t j, int64_t step, int64_t bs_)
      : b(j / bs_), r(j % bs_), q(step / bs_), s(step % bs_), bs(bs_) {}
  __device__ __forceinline__ void advance() {
    b += q;
    r += s;
    if (r >= bs) {
      r -= bs;
      ++b;
    }
  }
};

// ---- kernel arguments (passed by value) ------------------------------------------------------
struct FwdArgs {
  void* out;
  const void* base;
  const long long* deltas;  // n device addresses
  int64_t n;
  const float* coeffs;
  int64_t sn, sb;           // coefficient strides (task, block)
  int64_t numel, bs;        // bs: effective block size, 1 <= bs
};

struct BwdArgs {
  const void* grad;
  const void* base;
  const long long* deltas;
  int64_t n;
  const float* coeffs;
  int64_t sn, sb;
  int64_t numel, bs, n_blocks;
  void* grad_base;                 // may be null
  const long long* grad_deltas;    // may be null: n device addresses
  float* grad_coeffs;              // may be null (element-wise kernel only)
  double* ws;                      // large-block backward with items_per_block > 1, else null
  int64_t items_per_block, n_items;
  int group;                       // small-block backward: lanes per block
};

// ---- element-wise kernels (forward; backward without coefficient gradient) ------------------
// Op::pack<W, VEC, UNI>(a, j0, coff) handles elements [j0, j0 + W); coff[e] = block(j0+e) * sb
// (with UNI all elements are in one block and only coff[0] is read).

template <class TI, class TO, bool FM>
struct FwdOp {
  using Args = FwdArgs;
  using SI = typename TI::S;
  using SO = typename TO::S;
  static constexpr int V = 16 / int(sizeof(SI));

  __device__ static uintptr_t ptr_bits(const Args& a) {
    uintptr_t bits = reinterpret_cast<uintptr_t>(a.out) | reinterpret_cast<uintptr_t>(a.base);
    for (int64_t i = 0; i < a.n; ++i) bits |= addr_at(a.deltas, i);
    return bits;
  }

  template <int W, bool VEC, bool UNI>
  __device__ __forceinline__ static void pack(const Args& a, int64_t j0,
                                              const int64_t (&coff)[W]) {
    float bb[W], acc[W];
    load<TI, W, VEC>(static_cast<const SI*>(a.base) + j0, bb);
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = bb[e];
    for (int64_t i0 = 0; i0 < a.n; i0 += kBatch) {
      const int cnt = (int)imin(kBatch, a.n - i0);
      // Issue the loads of the whole batch before the first use, so that they are in flight
      // together instead of one DRAM latency per task.
      float x[kBatch][W];
      float cu[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        cu[k] = 0.f;
        if (k < cnt) {
          load<TI, W, VEC>(reinterpret_cast<const SI*>(addr_at(a.deltas, i0 + k)) + j0, x[k]);
          if constexpr (UNI) cu[k] = __ldg(a.coeffs + (i0 + k) * a.sn + coff[0]);
        }
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        if (k < cnt) {
          const float* ci = a.coeffs + (i0 + k) * a.sn;
#pragma unroll
          for (int e = 0; e < W; ++e) {
            const float c = UNI ? cu[k] : __ldg(ci + coff[e]);
            acc[e] = fmaf(c, task_term<FM>(x[k][e], bb[e]), acc[e]);
          }
        }
      }
    }
    store<TO, W, VEC>(static_cast<SO*>(a.out) + j0, acc);
  }
};

template <class TI, class TG, bool FM>
struct BwdElemOp {
  using Args = BwdArgs;
  using SI = typename TI::S;
  using SG = typename TG::S;
  static constexpr int V = 16 / int(sizeof(SI));

  __device__ static uintptr_t ptr_bits(const Args& a) {
    uintptr_t bits = reinterpret_cast<uintptr_t>(a.grad) | reinterpret_cast<uintptr_t>(a.grad_base);
    if (a.grad_deltas != nullptr)
      for (int64_t i = 0; i < a.n; ++i) bits |= addr_at(a.grad_deltas, i);
    return bits;
  }

  template <int W, bool VEC, bool UNI>
  __device__ __forceinline__ static void pack(const Args& a, int64_t j0,
                                              const int64_t (&coff)[W]) {
    float g[W];
    load<TG, W, VEC>(static_cast<const SG*>(a.grad) + j0, g);
    if (a.grad_base != nullptr) {
      float o[W];
      if constexpr (FM) {
        float csum[W];
#pragma unroll
        for (int e = 0; e < W; ++e) csum[e] = 0.f;
        for (int64_t i = 0; i < a.n; ++i) {
          const float* ci = a.coeffs + i * a.sn;
#pragma unroll
          for (int e = 0; e < W; ++e) csum[e] += __ldg(ci + (UNI ? coff[0] : coff[e]));
        }
#pragma unroll
        for (int e = 0; e < W; ++e) o[e] = (1.f - csum[e]) * g[e];
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) o[e] = g[e];
      }
      store<TI, W, VEC>(static_cast<SI*>(a.grad_base) + j0, o);
    }
    if (a.grad_deltas != nullptr) {
#pragma unroll 4
      for (int64_t i = 0; i < a.n; ++i) {
        SI* gd = reinterpret_cast<SI*>(addr_at(a.grad_deltas, i)) + j0;
        const float* ci = a.coeffs + i * a.sn;
        float o[W];
#pragma unroll
        for (int e = 0; e < W; ++e) o[e] = __ldg(ci + (UNI ? coff[0] : coff[e])) * g[e];
        store<TI, W, VEC>(gd, o);
      }
    }
  }
};

template <class Op>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(const typename Op::Args a) {
  constexpr int V = Op::V;
  const bool vec = (Op::ptr_bits(a) & 15u) == 0;
  const int64_t n_packs = (a.numel + V - 1) / V;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  int64_t p = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (p >= n_packs) return;
  BlockCursor cur(p * V, stride * V, a.bs);
  for (; p < n_packs; p += stride, cur.advance()) {
    const int64_t j0 = p * V;
    int64_t coff[V];
    if (j0 + V <= a.numel) {
      if (cur.r + V <= a.bs) {  // the whole pack lies in block cur.b
#pragma unroll
        for (int e = 0; e < V; ++e) coff[e] = cur.b * a.sb;
        if (vec)
          Op::template pack<V, true, true>(a, j0, coff);
        else
          Op::template pack<V, false, true>(a, j0, coff);
      } else {                  // the pack straddles one or more block boundaries
        int64_t b = cur.b, r = cur.r;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          coff[e] = b * a.sb;
          if (++r == a.bs) {
            r = 0;
            ++b;
          }
        }
        if (vec)
          Op::template pack<V, true, false>(a, j0, coff);
        else
          Op::template pack<V, false, false>(a, j0, coff);
      }
    } else {                    // the last, partial pack of the tensor
      int64_t b = cur.b, r = cur.r;
      for (int e = 0; e < V && j0 + e < a.numel; ++e) {
        const int64_t c1[1] = {b * a.sb};
        Op::template pack<1, false, true>(a, j0 + e, c1);
        if (++r == a.bs) {
          r = 0;
          ++b;
        }
      }
    }
  }
}

// ---- backward with the coefficient gradient --------------------------------------------------

// Elements [j0, j0 + W), all in one block: writes grad_base (when do_base) and the grad_deltas of
// tasks i0 .. i0+cnt-1, and adds grad * term_i to dot[k] (k = i - i0), element by element.
template <class TI, class TG, bool FM, int W, bool VEC>
__device__ __forceinline__ void bwd_pack(const BwdArgs& a, int64_t j0, int64_t i0, int cnt,
                                         const float (&c)[kGroup], float scale, bool do_base,
                                         float (&dot)[kGroup]) {
  using SI = typename TI::S;
  using SG = typename TG::S;
  float g[W], bb[W];
  load<TG, W, VEC>(static_cast<const SG*>(a.grad) + j0, g);
  if constexpr (FM) {
    load<TI, W, VEC>(static_cast<const SI*>(a.base) + j0, bb);
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) bb[e] = 0.f;
  }
  if (do_base) {
    float o[W];
#pragma unroll
    for (int e = 0; e < W; ++e) o[e] = scale * g[e];
    store<TI, W, VEC>(static_cast<SI*>(a.grad_base) + j0, o);
  }
  const bool do_deltas = a.grad_deltas != nullptr;
#pragma unroll
  for (int kb = 0; kb < kGroup; kb += kBatch) {
    if (kb < cnt) {
      // All delta loads of the batch first (in flight together), then their uses.
      float x[kBatch][W];
#pragma unroll
      for (int k = 0; k < kBatch; ++k)
        if (kb + k < cnt)
          load<TI, W, VEC>(reinterpret_cast<const SI*>(addr_at(a.deltas, i0 + kb + k)) + j0, x[k]);
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int kk = kb + k;
        if (kk < cnt) {
          if (do_deltas) {
            float o[W];
#pragma unroll
            for (int e = 0; e < W; ++e) o[e] = c[kk] * g[e];
            store<TI, W, VEC>(reinterpret_cast<SI*>(addr_at(a.grad_deltas, i0 + kk)) + j0, o);
          }
#pragma unroll
          for (int e = 0; e < W; ++e)
            dot[kk] = fmaf(g[e], task_term<FM>(x[k][e], bb[e]), dot[kk]);
        }
      }
    }
  }
}

// Elements [lo, hi) of one block, shared by nranks cooperating threads: rank r takes the packs
// lo / V + r, + nranks, ... in increasing order (full packs vectorised when vec).
template <class TI, class TG, bool FM>
__device__ __forceinline__ void bwd_segment(const BwdArgs& a, bool vec, int64_t lo, int64_t hi,
                                            int rank, int nranks, int64_t i0, int cnt,
                                            const float (&c)[kGroup], float scale, bool do_base,
                                            float (&dot)[kGroup]) {
  constexpr int V = 16 / int(sizeof(typename TI::S));
  for (int64_t p = lo / V + rank; p * V < hi; p += nranks) {
    const int64_t j0 = p * V;
    if (j0 >= lo && j0 + V <= hi) {
      if (vec)
        bwd_pack<TI, TG, FM, V, true>(a, j0, i0, cnt, c, scale, do_base, dot);
      else
        bwd_pack<TI, TG, FM, V, false>(a, j0, i0, cnt, c, scale, do_base, dot);
    } else {
      for (int e = 0; e < V; ++e) {
        const int64_t j = j0 + e;
        if (j >= lo && j < hi) bwd_pack<TI, TG, FM, 1, false>(a, j, i0, cnt, c, scale, do_base, dot);
      }
    }
  }
}

template <bool FM>
__device__ uintptr_t bwd_ptr_bits(const BwdArgs& a) {
  uintptr_t bits = reinterpret_cast<uintptr_t>(a.grad) | reinterpret_cast<uintptr_t>(a.grad_base);
  if (FM) bits |= reinterpret_cast<uintptr_t>(a.base);
  for (int64_t i = 0; i < a.n; ++i) {
    bits |= addr_at(a.deltas, i);
    if (a.grad_deltas != nullptr) bits |= addr_at(a.grad_deltas, i);
  }
  return bits;
}

// 1 - sum_i c[i, b], summed in task order like the CPU kernel.
__device__ __forceinline__ float base_scale(const BwdArgs& a, int64_t b) {
  float s = 0.f;
  for (int64_t i = 0; i < a.n; ++i) s += __ldg(a.coeffs + i * a.sn + b * a.sb);
  return 1.f - s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;  // lane 0's value has a fixed order
}

// block_size >= kLargeMin: one CTA per (block, chunk) item, items grid-strided.
template <class TI, class TG, bool FM>
__global__ void __launch_bounds__(kThreads) bwd_large_kernel(const BwdArgs a) {
  __shared__ float red[kWarps][kGroup];
  const bool vec = (bwd_ptr_bits<FM>(a) & 15u) == 0;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  // item = b * items_per_block + chunk, tracked without dividing in the loop.
  BlockCursor cur(blockIdx.x, gridDim.x, a.items_per_block);
  for (int64_t item = blockIdx.x; item < a.n_items; item += gridDim.x, cur.advance()) {
    const int64_t b = cur.b;
    const int64_t chunk = cur.r;
    const int64_t lo = b * a.bs + chunk * kChunk;
    int64_t hi = imin(imin(lo + kChunk, (b + 1) * a.bs), a.numel);
    if (hi < lo) hi = lo;  // empty tail item of the last, shorter block: its partials are 0
    const bool do_base_any = a.grad_base != nullptr;
    const float scale = (FM && do_base_any) ? base_scale(a, b) : 1.f;
    for (int64_t i0 = 0; i0 < a.n; i0 += kGroup) {
      const int cnt = (int)imin(kGroup, a.n - i0);
      float c[kGroup], dot[kGroup];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        c[k] = k < cnt ? __ldg(a.coeffs + (i0 + k) * a.sn + b * a.sb) : 0.f;
        dot[k] = 0.f;
      }
      bwd_segment<TI, TG, FM>(a, vec, lo, hi, (int)threadIdx.x, kThreads, i0, cnt, c, scale,
                              do_base_any && i0 == 0, dot);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        if (k < cnt) {
          const float s = warp_sum(dot[k]);
          if (lane == 0) red[warp][k] = s;
        }
      }
      __syncthreads();
      if ((int)threadIdx.x < cnt) {
        float s = 0.f;
        for (int w = 0; w < kWarps; ++w) s += red[w][threadIdx.x];
        const int64_t i = i0 + threadIdx.x;
        if (a.ws != nullptr)
          a.ws[item * a.n + i] = (double)s;
        else
          a.grad_coeffs[i * a.n_blocks + b] = s;
      }
      __syncthreads();
    }
  }
}

// block_size < kLargeMin: groups of G lanes own one block each. A warp takes 32/G consecutive
// blocks per step; the loop bounds are warp-uniform so every lane reaches the shuffles.
template <class TI, class TG, bool FM>
__global__ void __launch_bounds__(kThreads) bwd_small_kernel(const BwdArgs a) {
  const bool vec = (bwd_ptr_bits<FM>(a) & 15u) == 0;
  const int G = a.group;
  const int per_warp = 32 / G;
  const int lane = threadIdx.x & 31;
  const int rank = lane & (G - 1);
  const int sub = lane / G;
  const int64_t warp_id = ((int64_t)blockIdx.x * kThreads + threadIdx.x) >> 5;
  const int64_t n_warps = ((int64_t)gridDim.x * kThreads) >> 5;
  const bool do_base_any = a.grad_base != nullptr;
  for (int64_t wb = warp_id * per_warp; wb < a.n_blocks; wb += n_warps * per_warp) {
    const int64_t b = wb + sub;
    const bool active = b < a.n_blocks;
    const int64_t lo = active ? b * a.bs : 0;
    const int64_t hi = active ? imin(lo + a.bs, a.numel) : 0;
    const float scale = (FM && do_base_any && active) ? base_scale(a, b) : 1.f;
    for (int64_t i0 = 0; i0 < a.n; i0 += kGroup) {
      const int cnt = (int)imin(kGroup, a.n - i0);
      float c[kGroup], dot[kGroup];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        c[k] = (active && k < cnt) ? __ldg(a.coeffs + (i0 + k) * a.sn + b * a.sb) : 0.f;
        dot[k] = 0.f;
      }
      bwd_segment<TI, TG, FM>(a, vec, lo, hi, rank, G, i0, cnt, c, scale,
                              do_base_any && i0 == 0, dot);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        if (k < cnt) {
          for (int off = G >> 1; off > 0; off >>= 1)
            dot[k] += __shfl_xor_sync(0xffffffffu, dot[k], off);
          if (active && rank == 0) a.grad_coeffs[(i0 + k) * a.n_blocks + b] = dot[k];
        }
      }
    }
  }
}

// Stage 2 of the large-block backward: grad_coeffs[i, b] = sum over the block's items, in order.
__global__ void __launch_bounds__(kThreads)
    bwd_finish_kernel(const double* ws, float* grad_coeffs, int64_t n, int64_t n_blocks,
                      int64_t items_per_block) {
  const int64_t total = n * n_blocks;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  for (int64_t t = (int64_t)blockIdx.x * kThreads + threadIdx.x; t < total; t += stride) {
    const int64_t i = t / n_blocks;
    const int64_t b = t - i * n_blocks;
    const double* p = ws + b * items_per_block * n + i;
    double s = 0.0;
    for (int64_t k = 0; k < items_per_block; ++k) s += p[k * n];
    grad_coeffs[t] = (float)s;
  }
}

}  // namespace cuda_task_arithmetic
}  // namespace pyops
