// The run-time ISA choice shared by every family (common/isa_dispatch.cpp owns the flag).
//
// A family's kernel sources define their entry points twice, in pyops::isa_base and
// pyops::isa_avx2 (PYOPS_ISA_KERNEL_NS, common/isa.h); its binding (csrc/<stem>/bind.cpp) reaches
// the build the CPU supports with PYOPS_ISA_CALL(fn, args...), the one dispatch macro.
#pragma once

namespace pyops {
// True when the AVX2+FMA+F16C build is selected (CPU support, PYOPS_CPU_ISA, _C.set_isa).
bool use_avx2();
// Name of the instruction set the dispatch uses ("avx2" or "base").
const char* active_isa();
// Forces "base", "avx2" or "auto" (the best the CPU supports); false if unknown or unavailable.
bool set_isa(const char* name);
}  // namespace pyops

#if PYOPS_HAVE_AVX2
#define PYOPS_ISA_CALL(fn, ...) \
  (::pyops::use_avx2() ? ::pyops::isa_avx2::fn(__VA_ARGS__) : ::pyops::isa_base::fn(__VA_ARGS__))
#else
#define PYOPS_ISA_CALL(fn, ...) (::pyops::isa_base::fn(__VA_ARGS__))
#endif
