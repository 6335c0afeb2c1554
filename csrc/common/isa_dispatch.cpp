// The run-time ISA flag behind PYOPS_ISA_CALL (common/isa_dispatch.h): which of the per-ISA
// builds of the CPU kernels the bindings call.
#include "common/isa_dispatch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace pyops {
namespace {

bool cpu_has_avx2() {
#if PYOPS_HAVE_AVX2 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// PYOPS_CPU_ISA=base forces the portable build (used by the tests to cover both paths).
bool initial_use_avx2() {
  const char* env = std::getenv("PYOPS_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "base") == 0) return false;
  return cpu_has_avx2();
}

std::atomic<bool> g_use_avx2{initial_use_avx2()};

}  // namespace

bool use_avx2() { return g_use_avx2.load(); }

const char* active_isa() { return g_use_avx2.load() ? "avx2" : "base"; }

bool set_isa(const char* name) {
  if (std::strcmp(name, "base") == 0) {
    g_use_avx2.store(false);
    return true;
  }
  if (std::strcmp(name, "avx2") == 0 || std::strcmp(name, "auto") == 0) {
    const bool ok = cpu_has_avx2();
    if (std::strcmp(name, "avx2") == 0 && !ok) return false;
    g_use_avx2.store(ok);
    return true;
  }
  return false;
}

}  // namespace pyops
