// Neighbourhood attention (NATTEN semantics, heads-last layout): CPU kernels (torch-free).
//
// The kernels are always 3D; 1D and 2D problems come in with leading spatial extents of 1
// (kernel 1, stride 1, dilation 1, non-causal). Per spatial dimension, independently
// (docs/neighborhood.md "Definition"): dilation d puts position x in group x mod d with
// in-group index i = x / d and group length L; with left = k / 2,
//   non-causal: leader = min((i / s) * s + s / 2, L - 1),
//               window [start, start + k), start = clamp(leader - left, 0, L - k);
//   causal:     leader = min((i / s) * s + s - 1, L - 1), window [max(leader - k + 1, 0), i].
// A key attends when it is inside the window in every dimension (in-group coordinates, same
// group). scores = scale * q.k + rpb[h, (j0 - i0) + k0 - 1, (j1 - i1) + k1 - 1, (j2 - i2) + k2 - 1],
// out = softmax(scores) . v, lse = logsumexp(scores) (natural log).
//
// Layouts (all contiguous): q, k [B, S0, S1, S2, H, D]; v, out, dout [B, S0, S1, S2, H, Dv];
// lse [B, S0, S1, S2, H] fp32; rpb, drpb [H, 2k0-1, 2k1-1, 2k2-1] fp32. q/k/v/out/dout and the
// gradients dq/dk/dv are in `dtype`; arithmetic is fp32. The split into work items depends only
// on the sizes, so results are bit-identical for every thread count; dk/dv are computed
// key-centric (each key loops over the queries whose windows contain it): no atomics.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace pyops {

struct NAShape {
  int64_t B = 0, H = 0, D = 0, Dv = 0;
  int64_t S[3] = {1, 1, 1};
  int64_t kernel[3] = {1, 1, 1};
  int64_t stride[3] = {1, 1, 1};
  int64_t dilation[3] = {1, 1, 1};
  int64_t causal[3] = {0, 0, 0};
  bool has_rpb = false;
  double scale = 1.0;
  DType dtype = DType::kFloat32;
};

// Per-ISA implementations (forward.cpp, backward.cpp), chosen by PYOPS_ISA_CALL.
#define PYOPS_NA_DECLARE                                                                     \
  Status na_forward(const NAShape& p, const void* q, const void* k, const void* v, void* out,  \
                    float* lse, const float* rpb, int n_threads);                              \
  Status na_backward(const NAShape& p, const void* q, const void* k, const void* v,            \
                     const void* out, const void* dout, const float* lse, const float* rpb,    \
                     void* dq, void* dk, void* dv, float* drpb, int n_threads);
namespace isa_base {
PYOPS_NA_DECLARE
}  // namespace isa_base
namespace isa_avx2 {
PYOPS_NA_DECLARE
}  // namespace isa_avx2
#undef PYOPS_NA_DECLARE

}  // namespace pyops
