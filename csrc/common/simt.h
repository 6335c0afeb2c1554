// A thin SIMT layer so that a CUDA kernel can be written once and run two ways:
//
// * compiled by nvcc (the default): the names below are the CUDA built-ins;
// * compiled by a host C++20 compiler with PYOPS_SIMT_EMULATE defined: every CTA runs as
//   blockDim real std::threads that meet at a barrier for each sync(), its shared arrays are
//   function-local statics (CTAs run one after another), and atomics are GCC atomics.
//
// The emulation exists for tests on machines without a GPU (tests/merging/test_methods_cuda_emulated.py):
// the kernels' indexing, barriers, shared-memory protocol, workspace use and arithmetic run for
// real, concurrently, against the C++ CPU kernels. What it cannot show is speed, coalescing or
// anything about the hardware. Kernels written against this layer use no warp intrinsics (no
// shuffles, ballots or implicit warp synchrony): every exchange goes through shared memory and
// sync(), which both targets honour.
//
// Floating point: fmul / fadd / fdiv round each operation (never contracted into an FMA), so the
// kernels reproduce the CPU kernels' bits; the emulation must be built with -ffp-contract=off.
#pragma once
#include <cstdint>

#if defined(PYOPS_SIMT_EMULATE)

#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "common/half.h"

#define PYOPS_KERNEL inline
#define PYOPS_DEVICE inline
#define PYOPS_SHARED static

namespace pyops {
namespace simt {

// A generation-counting barrier (mutex + condition variable): simple enough to be obviously
// right, which matters more here than speed.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != gen; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  uint64_t generation_ = 0;
};

struct ThreadCtx {
  int tid = 0, bid = 0, bdim = 1, gdim = 1;
  Barrier* bar = nullptr;
};
inline thread_local ThreadCtx g_ctx;

inline int tid() { return g_ctx.tid; }
inline int bid() { return g_ctx.bid; }
inline int bdim() { return g_ctx.bdim; }
inline int gdim() { return g_ctx.gdim; }
inline void sync() { g_ctx.bar->arrive_and_wait(); }
inline uint32_t atomic_add(uint32_t* p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

inline float fmul(float a, float b) { return a * b; }
inline float fadd(float a, float b) { return a + b; }
inline float fsub(float a, float b) { return a - b; }
inline float fdiv(float a, float b) { return a / b; }
inline uint32_t float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct F32 {
  using S = float;
  static float to_f(S x) { return x; }
  static S from_f(float f) { return f; }
};
struct F16 {
  using S = uint16_t;
  static float to_f(S x) {
    half_bits h;
    std::memcpy(&h, &x, 2);
    return half_to_float(h);
  }
  static S from_f(float f) {
    const half_bits h = float_to_half(f);
    S x;
    std::memcpy(&x, &h, 2);
    return x;
  }
};
struct BF16 {
  using S = uint16_t;
  static float to_f(S x) {
    bf16_bits b;
    std::memcpy(&b, &x, 2);
    return bf16_to_float(b);
  }
  static S from_f(float f) {
    const bf16_bits b = float_to_bf16(f);
    S x;
    std::memcpy(&x, &b, 2);
    return x;
  }
};

// Runs kernel(args) on `grid` CTAs of `block` threads: `block` threads each walk the CTAs in
// order, with a barrier between CTAs (a CTA's statics are reused by the next one).
template <class A>
void launch(void (*kernel)(A), int grid, int block, const A& args) {
  Barrier bar(block);
  std::vector<std::thread> threads;
  threads.reserve((size_t)block);
  for (int t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      for (int b = 0; b < grid; ++b) {
        g_ctx = ThreadCtx{t, b, block, grid, &bar};
        kernel(args);
        bar.arrive_and_wait();
      }
    });
  }
  for (auto& th : threads) th.join();
}

}  // namespace simt
}  // namespace pyops

#else  // nvcc

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define PYOPS_KERNEL __global__
#define PYOPS_DEVICE __device__ __forceinline__
#define PYOPS_SHARED __shared__

namespace pyops {
namespace simt {

PYOPS_DEVICE int tid() { return (int)threadIdx.x; }
PYOPS_DEVICE int bid() { return (int)blockIdx.x; }
PYOPS_DEVICE int bdim() { return (int)blockDim.x; }
PYOPS_DEVICE int gdim() { return (int)gridDim.x; }
PYOPS_DEVICE void sync() { __syncthreads(); }
PYOPS_DEVICE uint32_t atomic_add(uint32_t* p, uint32_t v) { return atomicAdd(p, v); }

PYOPS_DEVICE float fmul(float a, float b) { return __fmul_rn(a, b); }
PYOPS_DEVICE float fadd(float a, float b) { return __fadd_rn(a, b); }
PYOPS_DEVICE float fsub(float a, float b) { return __fsub_rn(a, b); }
PYOPS_DEVICE float fdiv(float a, float b) { return __fdiv_rn(a, b); }
PYOPS_DEVICE uint32_t float_as_uint(float f) { return __float_as_uint(f); }
PYOPS_DEVICE float uint_as_float(uint32_t u) { return __uint_as_float(u); }

struct F32 {
  using S = float;
  PYOPS_DEVICE static float to_f(S x) { return x; }
  PYOPS_DEVICE static S from_f(float f) { return f; }
};
struct F16 {
  using S = unsigned short;
  PYOPS_DEVICE static float to_f(S x) { return __half2float(__ushort_as_half(x)); }
  PYOPS_DEVICE static S from_f(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
struct BF16 {
  using S = unsigned short;
  PYOPS_DEVICE static float to_f(S x) { return __bfloat162float(__ushort_as_bfloat16(x)); }
  PYOPS_DEVICE static S from_f(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

}  // namespace simt
}  // namespace pyops

#endif
