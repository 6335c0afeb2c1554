// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11): a
// counter-based generator. Every random choice in pyops (attention dropout, DARE drops) is a
// pure function of (key, counter), so the same bits come out on every backend, thread count
// and shard layout (docs/design.md#determinism). Usable from C++ and CUDA (host + device).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PYOPS_HD __host__ __device__ __forceinline__
#else
#define PYOPS_HD inline
#endif

namespace pyops {

struct Philox4 {
  uint32_t v[4];
};

PYOPS_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  hi = (uint32_t)(p >> 32);
  lo = (uint32_t)p;
}

// counter c0..c3, key k0..k1 -> four 32-bit words.
PYOPS_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c0, hi0, lo0);
    philox_mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return {{c0, c1, c2, c3}};
}

// Uniform float in [0, 1) from the top 24 bits of a word (exactly representable in fp32).
PYOPS_HD float philox_uniform(uint32_t word) { return (float)(word >> 8) * (1.0f / 16777216.0f); }

}  // namespace pyops
