// The per-ISA inline namespace for header-defined helpers.
//
// The CPU kernels are compiled twice (baseline and AVX2+FMA+F16C) into one module. Inline
// functions from shared headers would otherwise be emitted in both objects under the same
// mangled name, and the linker would keep one of them for both: the baseline path could then run
// an AVX2 copy (SIGILL on older CPUs), or the two bodies could differ (an ODR violation). Helpers
// that compile differently per ISA live in `pyops::per_isa_<isa>`, an inline namespace, so each
// object keeps its own copies and callers need not name it.
#pragma once

#define PYOPS_PER_ISA_CAT2(x) per_isa_##x
#define PYOPS_PER_ISA_CAT(x) PYOPS_PER_ISA_CAT2(x)
#if defined(PYOPS_ISA)
#define PYOPS_PER_ISA_NS PYOPS_PER_ISA_CAT(PYOPS_ISA)
#else
#define PYOPS_PER_ISA_NS per_isa_generic
#endif

// The namespace a per-ISA kernel file defines its entry points in (isa_base, isa_avx2), which
// common/isa_dispatch.cpp chooses between at run time.
#define PYOPS_ISA_NS_CAT2(x) isa_##x
#define PYOPS_ISA_NS_CAT(x) PYOPS_ISA_NS_CAT2(x)
#define PYOPS_ISA_KERNEL_NS PYOPS_ISA_NS_CAT(PYOPS_ISA)
