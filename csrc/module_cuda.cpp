// pyops._C_cuda, the CUDA module: the device count, then one bind_<stem>_cuda per op family with
// CUDA kernels (csrc/<stem>/bind_cuda.cpp). Compiled by the host C++ compiler: no CUDA header
// here. The bindings are thin: the Python op layer (pyops/<stem>/) validates, allocates and makes
// inputs contiguous; a binding converts integers to device pointers and a stream, releases the
// GIL around the launches and turns a Status into a Python exception.
#include <pybind11/pybind11.h>

#include "common/cuda_device.h"

namespace py = pybind11;

namespace pyops {
void bind_merging_cuda(py::module_& m);
void bind_moe_cuda(py::module_& m);
}  // namespace pyops

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyops CUDA kernels (torch-free; pointers are device addresses as ints)";
  m.def("device_count", &pyops::cuda_ops::device_count,
        "cudaGetDeviceCount, or 0 when no driver/device is usable. Never raises.");
  pyops::bind_merging_cuda(m);
  pyops::bind_moe_cuda(m);
}
