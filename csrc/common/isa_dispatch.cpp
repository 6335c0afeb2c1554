// Run-time choice between the per-ISA builds of the CPU kernels.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cpu/isa_dispatch.h"
#include "cpu/merge.h"
#include "cpu/task_merge.h"

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

Status task_arithmetic_forward(const TaskArithmeticProblem& p, void* out, DType out_dtype,
                               int n_threads) {
#if PYOPS_HAVE_AVX2
  if (g_use_avx2.load()) return isa_avx2::task_arithmetic_forward(p, out, out_dtype, n_threads);
#endif
  return isa_base::task_arithmetic_forward(p, out, out_dtype, n_threads);
}

Status task_arithmetic_backward(const TaskArithmeticProblem& p, const void* grad, DType grad_dtype,
                                void* grad_base, void* const* grad_deltas, float* grad_coeffs,
                                int n_threads) {
#if PYOPS_HAVE_AVX2
  if (g_use_avx2.load())
    return isa_avx2::task_arithmetic_backward(p, grad, grad_dtype, grad_base, grad_deltas,
                                              grad_coeffs, n_threads);
#endif
  return isa_base::task_arithmetic_backward(p, grad, grad_dtype, grad_base, grad_deltas,
                                            grad_coeffs, n_threads);
}

// ---- model merging (cpu/merge.h) ----

Status merge_forward(const MergeProblem& p, void* out, DType out_dtype, int n_threads) {
#if PYOPS_HAVE_AVX2
  if (g_use_avx2.load()) return isa_avx2::merge_forward(p, out, out_dtype, n_threads);
#endif
  return isa_base::merge_forward(p, out, out_dtype, n_threads);
}

Status merge_backward(const MergeProblem& p, const void* grad, DType grad_dtype, void* grad_base,
                      void* const* grad_deltas, float* grad_coeffs, int n_threads) {
  return PYOPS_ISA_CALL(merge_backward, p, grad, grad_dtype, grad_base, grad_deltas, grad_coeffs, n_threads);
}

Status task_vector_gram(const void* base, const void* const* deltas, int64_t n, DType in_dtype,
                        int64_t numel, bool from_models, double* gram, int n_threads) {
#if PYOPS_HAVE_AVX2
  if (g_use_avx2.load())
    return isa_avx2::task_vector_gram(base, deltas, n, in_dtype, numel, from_models, gram, n_threads);
#endif
  return isa_base::task_vector_gram(base, deltas, n, in_dtype, numel, from_models, gram, n_threads);
}

}  // namespace pyops
