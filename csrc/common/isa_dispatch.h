// Run-time ISA choice shared by every family's dispatch (csrc/cpu/dispatch.cpp owns the flag).
//
// A family's kernel file defines its entry points twice, in pyops::isa_base and pyops::isa_avx2
// (PYOPS_ISA_KERNEL_NS); its binding file (csrc/bind/<family>.cpp) calls
// PYOPS_ISA_CALL(fn, args...) to reach the build the CPU supports.
#pragma once

namespace pyops {
// True when the AVX2+FMA+F16C build is selected (CPU support, PYOPS_CPU_ISA, _C.set_isa).
bool use_avx2();
}  // namespace pyops

#if PYOPS_HAVE_AVX2
#define PYOPS_ISA_CALL(fn, ...) \
  (::pyops::use_avx2() ? ::pyops::isa_avx2::fn(__VA_ARGS__) : ::pyops::isa_base::fn(__VA_ARGS__))
#else
#define PYOPS_ISA_CALL(fn, ...) (::pyops::isa_base::fn(__VA_ARGS__))
#endif
