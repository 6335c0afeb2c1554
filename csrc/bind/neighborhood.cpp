// pyops._C bindings of the neighborhood family (placeholder until its kernels land).
#include <pybind11/pybind11.h>

namespace pyops {
void bind_neighborhood(pybind11::module_& m) { (void)m; }
}  // namespace pyops
