// pyops._C, the CPU module: the run-time ISA switch and the thread count, then one bind_<stem> per
// op family (csrc/<stem>/bind.cpp). The bindings are thin: the Python op layer (pyops/<stem>/)
// validates, allocates and makes inputs contiguous; a binding converts integers to pointers,
// releases the GIL, reaches the per-ISA kernel through PYOPS_ISA_CALL and turns a Status into a
// Python exception.
#include <pybind11/pybind11.h>

#include <string>

#include "common/isa_dispatch.h"
#include "common/thread_pool.h"

namespace py = pybind11;

namespace pyops {
void bind_merging(py::module_& m);
void bind_task_attention(py::module_& m);
void bind_neighborhood(py::module_& m);
void bind_moe(py::module_& m);
}  // namespace pyops

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyops CPU kernels (torch-free; see pyops/<family>/ops.py for the operators)";
  m.def("active_isa", &pyops::active_isa, "Instruction set the CPU kernels dispatch to.");
  m.def("set_isa", [](const std::string& name) { return pyops::set_isa(name.c_str()); },
        py::arg("name"), "Force 'base', 'avx2' or 'auto'; returns False if unavailable.");
  m.def("hardware_threads", &pyops::hardware_threads);
  pyops::bind_merging(m);
  pyops::bind_task_attention(m);
  pyops::bind_neighborhood(m);
  pyops::bind_moe(m);
}
