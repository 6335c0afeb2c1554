// pyops._C_cuda bindings of the moe family (moe/routing_cuda.h). Compiled by the host C++
// compiler: no CUDA header here. Pointers are device addresses as Python ints, `stream` a
// cudaStream_t as an int; the GIL is released around the launch and a Status becomes ValueError
// / RuntimeError (CUDA errors).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/bind_util.h"
#include "moe/routing_cuda.h"

namespace py = pybind11;

namespace {

using pyops::Status;
using pyops::bind::ptr;
using pyops::bind::raise_if_error;

void moe_route(uintptr_t logits, int dtype, int64_t T, int64_t E, int64_t k, int score,
               bool renormalize, uintptr_t bias, int64_t capacity, uintptr_t weights,
               uintptr_t experts, uintptr_t order, uintptr_t offsets, uintptr_t dropped,
               uintptr_t stream, int64_t n_group, int64_t topk_group, float routed_scaling) {
  Status st;
  {
    py::gil_scoped_release release;
    st = pyops::cuda_ops::moe_route(ptr<const void*>(logits), dtype, T, E, k, score,
                                    renormalize, ptr<const void*>(bias), capacity, n_group,
                                    topk_group, routed_scaling, ptr<void*>(weights), ptr<void*>(experts),
                                    ptr<void*>(order), ptr<void*>(offsets),
                                    ptr<void*>(dropped), ptr<void*>(stream));
  }
  raise_if_error(st);
}

}  // namespace

namespace pyops {
void bind_moe_cuda(py::module_& m) {
  m.def("moe_route", &moe_route, py::arg("logits"), py::arg("dtype"), py::arg("T"), py::arg("E"),
        py::arg("k"), py::arg("score"), py::arg("renormalize"), py::arg("bias"),
        py::arg("capacity"), py::arg("weights"), py::arg("experts"), py::arg("order"),
        py::arg("offsets"), py::arg("dropped"), py::arg("stream"), py::arg("n_group") = 0,
        py::arg("topk_group") = 0, py::arg("routed_scaling") = 1.0f,
        "Top-k routing on the GPU, bit-identical to pyops._C.moe_route (moe/routing_cuda.h);\n"
        "n_group / topk_group: DeepSeek-V3 group-limited routing (0: none), routed_scaling.\n"
        "Asynchronous: NaN/inf logits are reported through offsets[E] = -(t + 1) for the first\n"
        "such token t (normally offsets[E] == T * k); the caller must check it.");
}
}  // namespace pyops
