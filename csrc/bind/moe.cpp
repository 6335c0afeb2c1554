// pyops._C bindings of the moe family (placeholder until its kernels land).
#include <pybind11/pybind11.h>

namespace pyops {
void bind_moe(pybind11::module_& m) { (void)m; }
}  // namespace pyops
