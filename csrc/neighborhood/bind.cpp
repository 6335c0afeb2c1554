// pyops._C bindings of the neighbourhood-attention family (neighborhood/neighborhood.h).
// Thin: integers to pointers, the GIL released around the kernel, Status -> ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/bind_util.h"
#include "common/isa_dispatch.h"
#include "neighborhood/neighborhood.h"

namespace py = pybind11;

namespace pyops {
namespace {

using bind::raise_if_error;

NAShape make_shape(int64_t B, int64_t S0, int64_t S1, int64_t S2, int64_t H, int64_t D, int64_t Dv,
                   int64_t k0, int64_t k1, int64_t k2, int64_t s0, int64_t s1, int64_t s2, int64_t d0,
                   int64_t d1, int64_t d2, int64_t c0, int64_t c1, int64_t c2, bool has_rpb,
                   double scale, int dtype) {
  bind::to_dtype(dtype, "dtype");
  NAShape p;
  p.B = B;
  p.H = H;
  p.D = D;
  p.Dv = Dv;
  const int64_t S[3] = {S0, S1, S2}, K[3] = {k0, k1, k2}, St[3] = {s0, s1, s2}, Di[3] = {d0, d1, d2},
                C[3] = {c0, c1, c2};
  for (int i = 0; i < 3; ++i) {
    p.S[i] = S[i];
    p.kernel[i] = K[i];
    p.stride[i] = St[i];
    p.dilation[i] = Di[i];
    p.causal[i] = C[i];
  }
  p.has_rpb = has_rpb;
  p.scale = scale;
  p.dtype = static_cast<DType>(dtype);
  return p;
}

template <typename P>
P ptr(uintptr_t x) {
  return reinterpret_cast<P>(x);
}

void na_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t rpb,
                int64_t B, int64_t S0, int64_t S1, int64_t S2, int64_t H, int64_t D, int64_t Dv,
                int64_t k0, int64_t k1, int64_t k2, int64_t s0, int64_t s1, int64_t s2, int64_t d0,
                int64_t d1, int64_t d2, int64_t c0, int64_t c1, int64_t c2, bool has_rpb, double scale,
                int dtype, int n_threads) {
  const NAShape p = make_shape(B, S0, S1, S2, H, D, Dv, k0, k1, k2, s0, s1, s2, d0, d1, d2, c0, c1, c2,
                               has_rpb, scale, dtype);
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(na_forward, p, ptr<const void*>(q), ptr<const void*>(k), ptr<const void*>(v),
                        ptr<void*>(out), ptr<float*>(lse), ptr<const float*>(rpb), n_threads);
  }
  raise_if_error(st);
}

void na_backward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t dout, uintptr_t lse,
                 uintptr_t rpb, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t drpb, int64_t B,
                 int64_t S0, int64_t S1, int64_t S2, int64_t H, int64_t D, int64_t Dv, int64_t k0,
                 int64_t k1, int64_t k2, int64_t s0, int64_t s1, int64_t s2, int64_t d0, int64_t d1,
                 int64_t d2, int64_t c0, int64_t c1, int64_t c2, bool has_rpb, double scale, int dtype,
                 int n_threads) {
  const NAShape p = make_shape(B, S0, S1, S2, H, D, Dv, k0, k1, k2, s0, s1, s2, d0, d1, d2, c0, c1, c2,
                               has_rpb, scale, dtype);
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(na_backward, p, ptr<const void*>(q), ptr<const void*>(k), ptr<const void*>(v),
                        ptr<const void*>(out), ptr<const void*>(dout), ptr<const float*>(lse),
                        ptr<const float*>(rpb), ptr<void*>(dq), ptr<void*>(dk), ptr<void*>(dv),
                        ptr<float*>(drpb), n_threads);
  }
  raise_if_error(st);
}

}  // namespace

void bind_neighborhood(py::module_& m) {
  m.def("na_forward", &na_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("rpb"), py::arg("B"), py::arg("S0"), py::arg("S1"), py::arg("S2"), py::arg("H"), py::arg("D"),
        py::arg("Dv"), py::arg("k0"), py::arg("k1"), py::arg("k2"), py::arg("s0"), py::arg("s1"),
        py::arg("s2"), py::arg("d0"), py::arg("d1"), py::arg("d2"), py::arg("c0"), py::arg("c1"),
        py::arg("c2"), py::arg("has_rpb"), py::arg("scale"), py::arg("dtype"), py::arg("n_threads"),
        "Neighbourhood attention forward (3D, heads-last): writes out [B,S0,S1,S2,H,Dv] and lse "
        "[B,S0,S1,S2,H] fp32.");
  m.def("na_backward", &na_backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("dout"), py::arg("lse"), py::arg("rpb"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("drpb"), py::arg("B"), py::arg("S0"), py::arg("S1"), py::arg("S2"), py::arg("H"),
        py::arg("D"), py::arg("Dv"), py::arg("k0"), py::arg("k1"), py::arg("k2"), py::arg("s0"),
        py::arg("s1"), py::arg("s2"), py::arg("d0"), py::arg("d1"), py::arg("d2"), py::arg("c0"),
        py::arg("c1"), py::arg("c2"), py::arg("has_rpb"), py::arg("scale"), py::arg("dtype"),
        py::arg("n_threads"),
        "Neighbourhood attention backward: writes dq, dk, dv (and drpb fp32 when has_rpb); "
        "deterministic for any n_threads.");
}

}  // namespace pyops
