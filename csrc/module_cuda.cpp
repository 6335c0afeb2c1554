// pyops._C_cuda: thin pybind11 bindings over the torch-free CUDA kernels (csrc/cuda/). Compiled
// by the host C++ compiler: no CUDA header here, only the plain declarations in
// cuda/task_merge_cuda.h. Every pointer is a Python int holding a device address, `stream` a
// cudaStream_t as an int (torch.cuda.current_stream().cuda_stream). Kernels run on the current
// CUDA device, which the caller must set to the tensors' device. The Python op layer validates,
// allocates and makes inputs contiguous; these functions only convert integers to pointers,
// release the GIL around the launches and turn a Status into ValueError / RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/merge_cuda.h"
#include "cuda/moe_cuda.h"
#include "cuda/task_merge_cuda.h"

namespace py = pybind11;

namespace {

using pyops::Status;

void raise_if_error(const Status& st) {
  if (st.is_ok()) return;
  if (st.code == pyops::StatusCode::kInvalidArgument || st.code == pyops::StatusCode::kOutOfRange)
    throw py::value_error(st.message);
  throw std::runtime_error(st.message);  // CUDA errors: RuntimeError
}

template <typename P>
P as_ptr(uintptr_t v) {
  return reinterpret_cast<P>(v);
}

void task_arithmetic_forward(uintptr_t out, int out_dtype, uintptr_t base, uintptr_t delta_ptrs,
                             int64_t n, int in_dtype, uintptr_t coeffs, int64_t coeff_stride_n,
                             int64_t coeff_stride_block, int64_t numel, int64_t block_size,
                             bool from_models, uintptr_t stream) {
  Status st;
  {
    py::gil_scoped_release release;
    st = pyops::cuda_ops::task_arithmetic_forward(
        as_ptr<void*>(out), out_dtype, as_ptr<const void*>(base), as_ptr<const void*>(delta_ptrs),
        n, in_dtype, as_ptr<const void*>(coeffs), coeff_stride_n, coeff_stride_block, numel,
        block_size, from_models, as_ptr<void*>(stream));
  }
  raise_if_error(st);
}

int64_t task_arithmetic_backward_workspace_bytes(int64_t numel, int64_t block_size, int64_t n) {
  int64_t bytes = 0;
  raise_if_error(
      pyops::cuda_ops::task_arithmetic_backward_workspace_bytes(numel, block_size, n, &bytes));
  return bytes;
}

void task_arithmetic_backward(uintptr_t grad, int grad_dtype, uintptr_t base, uintptr_t delta_ptrs,
                              int64_t n, int in_dtype, uintptr_t coeffs, int64_t coeff_stride_n,
                              int64_t coeff_stride_block, int64_t numel, int64_t block_size,
                              bool from_models, uintptr_t grad_base, uintptr_t grad_delta_ptrs,
                              uintptr_t grad_coeffs, uintptr_t workspace, int64_t workspace_bytes,
                              uintptr_t stream) {
  Status st;
  {
    py::gil_scoped_release release;
    st = pyops::cuda_ops::task_arithmetic_backward(
        as_ptr<const void*>(grad), grad_dtype, as_ptr<const void*>(base),
        as_ptr<const void*>(delta_ptrs), n, in_dtype, as_ptr<const void*>(coeffs), coeff_stride_n,
        coeff_stride_block, numel, block_size, from_models, as_ptr<void*>(grad_base),
        as_ptr<const void*>(grad_delta_ptrs), as_ptr<void*>(grad_coeffs), as_ptr<void*>(workspace),
        workspace_bytes, as_ptr<void*>(stream));
  }
  raise_if_error(st);
}

int64_t merge_workspace_bytes(int64_t numel, int64_t block_size, int64_t n, int method, bool grad_coeffs) {
  int64_t bytes = 0;
  raise_if_error(pyops::cuda_ops::merge_workspace_bytes(numel, block_size, n, method, grad_coeffs, &bytes));
  return bytes;
}

void merge_backward(uintptr_t grad, int grad_dtype, uintptr_t base, uintptr_t delta_ptrs, int64_t n, int in_dtype,
                    uintptr_t coeffs, int64_t coeff_stride_n, int64_t coeff_stride_block, uintptr_t density,
                    int64_t numel, int64_t block_size, bool from_models, int method, float lam, uint64_t seed,
                    uint32_t name_hash, double gamma, double epsilon, uintptr_t ranks, bool normalize,
                    uintptr_t grad_base, uintptr_t grad_delta_ptrs, uintptr_t grad_coeffs, uintptr_t workspace,
                    int64_t workspace_bytes, uintptr_t stream) {
  Status st;
  {
    py::gil_scoped_release release;
    st = pyops::cuda_ops::merge_backward(
        as_ptr<const void*>(grad), grad_dtype, as_ptr<const void*>(base), as_ptr<const void*>(delta_ptrs), n,
        in_dtype, as_ptr<const void*>(coeffs), coeff_stride_n, coeff_stride_block, as_ptr<const void*>(density),
        numel, block_size, from_models, method, lam, seed, name_hash, gamma, epsilon, as_ptr<const void*>(ranks),
        normalize, as_ptr<void*>(grad_base), as_ptr<const void*>(grad_delta_ptrs), as_ptr<void*>(grad_coeffs),
        as_ptr<void*>(workspace), workspace_bytes, as_ptr<void*>(stream));
  }
  raise_if_error(st);
}

void merge_forward(uintptr_t out, int out_dtype, uintptr_t base, uintptr_t delta_ptrs, int64_t n, int in_dtype,
                   uintptr_t coeffs, int64_t coeff_stride_n, int64_t coeff_stride_block, uintptr_t density,
                   int64_t numel, int64_t block_size, bool from_models, int method, float lam, uint64_t seed,
                   uint32_t name_hash, int64_t k, float tall_lambda, double gamma, double epsilon,
                   uintptr_t ranks, bool normalize, uintptr_t workspace, int64_t workspace_bytes,
                   uintptr_t stream) {
  Status st;
  {
    py::gil_scoped_release release;
    st = pyops::cuda_ops::merge_forward(
        as_ptr<void*>(out), out_dtype, as_ptr<const void*>(base), as_ptr<const void*>(delta_ptrs), n, in_dtype,
        as_ptr<const void*>(coeffs), coeff_stride_n, coeff_stride_block, as_ptr<const void*>(density), numel,
        block_size, from_models, method, lam, seed, name_hash, k, tall_lambda, gamma, epsilon,
        as_ptr<const void*>(ranks), normalize, as_ptr<void*>(workspace), workspace_bytes, as_ptr<void*>(stream));
  }
  raise_if_error(st);
}

void moe_route(uintptr_t logits, int dtype, int64_t T, int64_t E, int64_t k, int score,
               bool renormalize, uintptr_t bias, int64_t capacity, uintptr_t weights,
               uintptr_t experts, uintptr_t order, uintptr_t offsets, uintptr_t dropped,
               uintptr_t stream) {
  Status st;
  {
    py::gil_scoped_release release;
    st = pyops::cuda_ops::moe_route(as_ptr<const void*>(logits), dtype, T, E, k, score,
                                    renormalize, as_ptr<const void*>(bias), capacity,
                                    as_ptr<void*>(weights), as_ptr<void*>(experts),
                                    as_ptr<void*>(order), as_ptr<void*>(offsets),
                                    as_ptr<void*>(dropped), as_ptr<void*>(stream));
  }
  raise_if_error(st);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyops CUDA kernels (torch-free; pointers are device addresses as ints)";
  m.def("device_count", &pyops::cuda_ops::device_count,
        "cudaGetDeviceCount, or 0 when no driver/device is usable. Never raises.");
  m.def("task_arithmetic_forward", &task_arithmetic_forward, py::arg("out"), py::arg("out_dtype"),
        py::arg("base"), py::arg("delta_ptrs"), py::arg("n"), py::arg("in_dtype"),
        py::arg("coeffs"), py::arg("coeff_stride_n"), py::arg("coeff_stride_block"),
        py::arg("numel"), py::arg("block_size"), py::arg("from_models"), py::arg("stream"),
        "out = base + sum_i coeffs[i, block] * delta_i (delta_i = f_i - base when from_models).\n"
        "delta_ptrs: device int64 array of n device addresses.");
  m.def("task_arithmetic_backward_workspace_bytes", &task_arithmetic_backward_workspace_bytes,
        py::arg("numel"), py::arg("block_size"), py::arg("n"),
        "Device workspace (bytes, 8-byte aligned) task_arithmetic_backward needs when grad_coeffs "
        "is requested; 0 when none is needed.");
  m.def("task_arithmetic_backward", &task_arithmetic_backward, py::arg("grad"),
        py::arg("grad_dtype"), py::arg("base"), py::arg("delta_ptrs"), py::arg("n"),
        py::arg("in_dtype"), py::arg("coeffs"), py::arg("coeff_stride_n"),
        py::arg("coeff_stride_block"), py::arg("numel"), py::arg("block_size"),
        py::arg("from_models"), py::arg("grad_base"), py::arg("grad_delta_ptrs"),
        py::arg("grad_coeffs"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("stream"),
        "One pass over grad; grad_base, grad_delta_ptrs (device int64 array) and grad_coeffs\n"
        "([n, n_blocks] fp32) may each be 0 (not wanted). Deterministic.");
  m.def("merge_workspace_bytes", &merge_workspace_bytes, py::arg("numel"), py::arg("block_size"), py::arg("n"),
        py::arg("method"), py::arg("grad_coeffs") = false,
        "Device workspace (bytes) merge_forward (grad_coeffs=False) or merge_backward needs.");
  m.def("merge_backward", &merge_backward, py::arg("grad"), py::arg("grad_dtype"), py::arg("base"),
        py::arg("delta_ptrs"), py::arg("n"), py::arg("in_dtype"), py::arg("coeffs"), py::arg("coeff_stride_n"),
        py::arg("coeff_stride_block"), py::arg("density"), py::arg("numel"), py::arg("block_size"),
        py::arg("from_models"), py::arg("method"), py::arg("lam"), py::arg("seed"), py::arg("name_hash"),
        py::arg("gamma"), py::arg("epsilon"), py::arg("ranks"), py::arg("normalize"), py::arg("grad_base"),
        py::arg("grad_delta_ptrs"), py::arg("grad_coeffs"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("stream"),
        "pyops.merge backward with the masks held fixed (all methods but consensus; cuda/merge_cuda.h).\n"
        "grad_base, grad_delta_ptrs (device int64 array) and grad_coeffs ([n, n_blocks] fp32) may each\n"
        "be 0 (not wanted).");
  m.def("merge_forward", &merge_forward, py::arg("out"), py::arg("out_dtype"), py::arg("base"),
        py::arg("delta_ptrs"), py::arg("n"), py::arg("in_dtype"), py::arg("coeffs"), py::arg("coeff_stride_n"),
        py::arg("coeff_stride_block"), py::arg("density"), py::arg("numel"), py::arg("block_size"),
        py::arg("from_models"), py::arg("method"), py::arg("lam"), py::arg("seed"), py::arg("name_hash"),
        py::arg("k"), py::arg("tall_lambda"), py::arg("gamma"), py::arg("epsilon"), py::arg("ranks"),
        py::arg("normalize"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "pyops.merge forward for ties (1), dare (2), dare_ties (3), breadcrumbs (4), della (5),\n"
        "della_linear (6) and consensus (7), bit-identical to pyops._C.merge_forward\n"
        "(cuda/merge_cuda.h). delta_ptrs, density and ranks (0 but for 4-6) are device arrays.");
  m.def("moe_route", &moe_route, py::arg("logits"), py::arg("dtype"), py::arg("T"), py::arg("E"),
        py::arg("k"), py::arg("score"), py::arg("renormalize"), py::arg("bias"),
        py::arg("capacity"), py::arg("weights"), py::arg("experts"), py::arg("order"),
        py::arg("offsets"), py::arg("dropped"), py::arg("stream"),
        "Top-k routing on the GPU, bit-identical to pyops._C.moe_route (cuda/moe_cuda.h).\n"
        "Asynchronous: NaN/inf logits are reported through offsets[E] = -(t + 1) for the first\n"
        "such token t (normally offsets[E] == T * k); the caller must check it.");
}
