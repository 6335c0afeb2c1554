// pyops._C bindings of the task_attention family (placeholder until its kernels land).
#include <pybind11/pybind11.h>

namespace pyops {
void bind_task_attention(pybind11::module_& m) { (void)m; }
}  // namespace pyops
