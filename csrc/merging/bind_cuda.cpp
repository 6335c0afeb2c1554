// pyops._C_cuda bindings of the merging family (merging/task_arithmetic_cuda.h,
// merging/methods_cuda.h). Compiled by the host C++ compiler: no CUDA header here. Every pointer
// is a Python int holding a device address, `stream` a cudaStream_t as an int
// (torch.cuda.current_stream().cuda_stream); kernels run on the current CUDA device, which the
// caller sets to the tensors' device. The GIL is released around the launches and a Status
// becomes ValueError / RuntimeError (CUDA errors).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/bind_util.h"
#include "merging/methods_cuda.h"
#include "merging/task_arithmetic_cuda.h"

namespace py = pybind11;

namespace {

using pyops::Status;
using pyops::bind::ptr;
using pyops::bind::raise_if_error;

void task_arithmetic_forward(uintptr_t out, int out_dtype, uintptr_t base, uintptr_t delta_ptrs,
                             int64_t n, int in_dtype, uintptr_t coeffs, int64_t coeff_stride_n,
                             int64_t coeff_stride_block, int64_t numel, int64_t block_size,
                             bool from_models, uintptr_t stream) {
  Status st;
  {
    py::gil_scoped_release release;
    st = pyops::cuda_ops::task_arithmetic_forward(
        ptr<void*>(out), out_dtype, ptr<const void*>(base), ptr<const void*>(delta_ptrs),
        n, in_dtype, ptr<const void*>(coeffs), coeff_stride_n, coeff_stride_block, numel,
        block_size, from_models, ptr<void*>(stream));
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
        ptr<const void*>(grad), grad_dtype, ptr<const void*>(base),
        ptr<const void*>(delta_ptrs), n, in_dtype, ptr<const void*>(coeffs), coeff_stride_n,
        coeff_stride_block, numel, block_size, from_models, ptr<void*>(grad_base),
        ptr<const void*>(grad_delta_ptrs), ptr<void*>(grad_coeffs), ptr<void*>(workspace),
        workspace_bytes, ptr<void*>(stream));
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
        ptr<const void*>(grad), grad_dtype, ptr<const void*>(base), ptr<const void*>(delta_ptrs), n,
        in_dtype, ptr<const void*>(coeffs), coeff_stride_n, coeff_stride_block, ptr<const void*>(density),
        numel, block_size, from_models, method, lam, seed, name_hash, gamma, epsilon, ptr<const void*>(ranks),
        normalize, ptr<void*>(grad_base), ptr<const void*>(grad_delta_ptrs), ptr<void*>(grad_coeffs),
        ptr<void*>(workspace), workspace_bytes, ptr<void*>(stream));
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
        ptr<void*>(out), out_dtype, ptr<const void*>(base), ptr<const void*>(delta_ptrs), n, in_dtype,
        ptr<const void*>(coeffs), coeff_stride_n, coeff_stride_block, ptr<const void*>(density), numel,
        block_size, from_models, method, lam, seed, name_hash, k, tall_lambda, gamma, epsilon,
        ptr<const void*>(ranks), normalize, ptr<void*>(workspace), workspace_bytes, ptr<void*>(stream));
  }
  raise_if_error(st);
}

}  // namespace

namespace pyops {
void bind_merging_cuda(py::module_& m) {
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
        "pyops.merge backward with the masks held fixed (all methods but consensus; merging/methods_cuda.h).\n"
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
        "(merging/methods_cuda.h). delta_ptrs, density and ranks (0 but for 4-6) are device arrays.");
}
}  // namespace pyops
