// Host build of the CUDA merge kernels (csrc/merging/methods_kernels.cuh) on the SIMT emulation of
// csrc/common/simt.h: every CTA runs as real threads with barriers, "device" pointers are host
// pointers. Built by tests/merging/test_methods_cuda_emulated.py with g++ -std=c++20
// -ffp-contract=off -fvisibility=hidden and loaded through ctypes. Hidden visibility matters: two
// builds with different sizes are loaded into one process, and the function-local statics that
// stand in for shared memory would otherwise be unified across them (GNU unique symbols).
#define PYOPS_SIMT_EMULATE 1

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "merging/methods_kernels.cuh"

namespace {

struct EmuLauncher {
  int max_grid;
  template <class A>
  pyops::Status launch(void (*kernel)(A), int64_t ctas, const A& args) {
    const int grid = (int)std::max<int64_t>(1, std::min<int64_t>(ctas, max_grid));
    pyops::simt::launch(kernel, grid, pyops::cuda_merge::kThreads, args);
    return pyops::Status::ok();
  }
  pyops::Status zero(void* p, int64_t bytes) {
    std::memset(p, 0, (size_t)bytes);
    return pyops::Status::ok();
  }
};

}  // namespace

static int report(const pyops::Status& st, char* err, int err_len) {
  if (st.is_ok()) return 0;
  if (err != nullptr && err_len > 0) {
    std::strncpy(err, st.message.c_str(), (size_t)err_len - 1);
    err[err_len - 1] = '\0';
  }
  return (int)st.code;
}

#define EMU_API __attribute__((visibility("default")))

extern "C" {

EMU_API int64_t emu_merge_workspace_bytes(int64_t numel, int64_t block_size, int64_t n, int method, int grad_coeffs) {
  return pyops::cuda_merge::layout(numel, block_size, n, method, grad_coeffs != 0).bytes;
}

EMU_API int emu_merge_threads() { return pyops::cuda_merge::kThreads; }

// Returns 0 on success; otherwise the status code, with the message in err[0..err_len).
EMU_API int emu_merge_forward(void* out, int out_dtype, const void* base, const void* delta_ptrs, int64_t n, int in_dtype,
                      const float* coeffs, int64_t coeff_stride_n, int64_t coeff_stride_block, const double* density,
                      int64_t numel, int64_t block_size, int from_models, int method, float lam, uint64_t seed,
                      uint32_t name_hash, int64_t k, float tall_lambda, double gamma, double epsilon,
                      const int32_t* ranks, int normalize, void* workspace, int64_t workspace_bytes, int max_grid,
                      char* err, int err_len) {
  pyops::cuda_merge::Problem p{out, out_dtype, base, delta_ptrs, n, in_dtype, coeffs, coeff_stride_n,
                               coeff_stride_block, density, numel, block_size, from_models != 0, method, lam, seed,
                               name_hash, k, tall_lambda, gamma, epsilon, ranks, normalize != 0, workspace,
                               workspace_bytes};
  EmuLauncher launcher{max_grid};
  return report(pyops::cuda_merge::run(p, launcher), err, err_len);
}

// The backward for the forward described by the same arguments (out / out_dtype unused).
EMU_API int emu_merge_backward(const void* grad, int grad_dtype, const void* base, const void* delta_ptrs, int64_t n,
                       int in_dtype, const float* coeffs, int64_t coeff_stride_n, int64_t coeff_stride_block,
                       const double* density, int64_t numel, int64_t block_size, int from_models, int method,
                       float lam, uint64_t seed, uint32_t name_hash, double gamma, double epsilon,
                       const int32_t* ranks, int normalize, void* grad_base, const void* grad_delta_ptrs,
                       float* grad_coeffs, void* workspace, int64_t workspace_bytes, int max_grid, char* err,
                       int err_len) {
  pyops::cuda_merge::Problem p{nullptr, 0, base, delta_ptrs, n, in_dtype, coeffs, coeff_stride_n,
                               coeff_stride_block, density, numel, block_size, from_models != 0, method, lam, seed,
                               name_hash, 1, 0.f, gamma, epsilon, ranks, normalize != 0, workspace,
                               workspace_bytes};
  const pyops::cuda_merge::BwdOutputs o{grad, grad_dtype, grad_base, grad_delta_ptrs, grad_coeffs};
  EmuLauncher launcher{max_grid};
  return report(pyops::cuda_merge::run_backward(p, o, launcher), err, err_len);
}

}  // extern "C"
