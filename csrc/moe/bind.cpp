// pyops._C bindings of the moe family (moe/moe.h). Thin: integers become pointers, the GIL is
// released around the kernel, a Status becomes ValueError (bad argument / index) or
// RuntimeError, and PYOPS_ISA_CALL picks the baseline or AVX2 build of the kernel.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/bind_util.h"
#include "common/isa_dispatch.h"
#include "moe/moe.h"

namespace py = pybind11;

namespace {

using pyops::DType;
using pyops::Status;

using pyops::bind::ptr;
using pyops::bind::run_released;
using pyops::bind::to_dtype;

void moe_route(uintptr_t logits, int dtype, int64_t T, int64_t E, int64_t k, int score,
               bool renormalize, uintptr_t bias, int64_t capacity, uintptr_t weights,
               uintptr_t experts, uintptr_t order, uintptr_t offsets, uintptr_t dropped,
               int n_threads, int64_t n_group, int64_t topk_group, float routed_scaling) {
  const DType dt = to_dtype(dtype, "dtype");
  run_released([&] {
    return PYOPS_ISA_CALL(moe_route, ptr<const void*>(logits), dt, T, E, k, score, renormalize,
                          ptr<const float*>(bias), capacity, n_group, topk_group,
                          routed_scaling, ptr<float*>(weights),
                          ptr<int32_t*>(experts), ptr<int64_t*>(order), ptr<int64_t*>(offsets),
                          ptr<uint8_t*>(dropped), n_threads);
  });
}

void moe_gather(uintptr_t x, uintptr_t order, int64_t k, int64_t T, int64_t d, uintptr_t rows,
                int dtype, int n_threads) {
  const DType dt = to_dtype(dtype, "dtype");
  run_released([&] {
    return PYOPS_ISA_CALL(moe_gather, ptr<const void*>(x), ptr<const int64_t*>(order), k, T, d,
                          ptr<void*>(rows), dt, n_threads);
  });
}

void moe_act_forward(uintptr_t a, uintptr_t b, uintptr_t h_out, int64_t n_rows, int64_t hdim,
                     int act, int dtype, int n_threads, float alpha, float limit) {
  const DType dt = to_dtype(dtype, "dtype");
  run_released([&] {
    return PYOPS_ISA_CALL(moe_act_forward, ptr<const void*>(a), ptr<const void*>(b),
                          ptr<void*>(h_out), n_rows, hdim, act, dt, n_threads, alpha, limit);
  });
}

void moe_act_backward(uintptr_t a, uintptr_t b, uintptr_t dh, uintptr_t da, uintptr_t db,
                      int64_t n_rows, int64_t hdim, int act, int dtype, int n_threads, uintptr_t h,
                      float alpha, float limit) {
  const DType dt = to_dtype(dtype, "dtype");
  run_released([&] {
    return PYOPS_ISA_CALL(moe_act_backward, ptr<const void*>(a), ptr<const void*>(b),
                          ptr<const void*>(dh), ptr<void*>(da), ptr<void*>(db), n_rows, hdim, act,
                          dt, n_threads, ptr<void*>(h), alpha, limit);
  });
}

void moe_combine(uintptr_t ys, uintptr_t order, uintptr_t weights, uintptr_t dropped, int64_t k,
                 int64_t T, int64_t d, uintptr_t y, int dtype, int n_threads) {
  const DType dt = to_dtype(dtype, "dtype");
  run_released([&] {
    return PYOPS_ISA_CALL(moe_combine, ptr<const void*>(ys), ptr<const int64_t*>(order),
                          ptr<const float*>(weights), ptr<const uint8_t*>(dropped), k, T, d,
                          ptr<void*>(y), dt, n_threads);
  });
}

void moe_combine_backward(uintptr_t dy, uintptr_t ys, uintptr_t order, uintptr_t weights,
                          uintptr_t dropped, int64_t k, int64_t T, int64_t d, uintptr_t dys,
                          uintptr_t dweights, int dtype, int n_threads) {
  const DType dt = to_dtype(dtype, "dtype");
  run_released([&] {
    return PYOPS_ISA_CALL(moe_combine_backward, ptr<const void*>(dy), ptr<const void*>(ys),
                          ptr<const int64_t*>(order), ptr<const float*>(weights),
                          ptr<const uint8_t*>(dropped), k, T, d, ptr<void*>(dys),
                          ptr<float*>(dweights), dt, n_threads);
  });
}

void moe_scatter_add(uintptr_t dxs, uintptr_t order, int64_t k, int64_t T, int64_t d, uintptr_t dx,
                     int dtype, int n_threads) {
  const DType dt = to_dtype(dtype, "dtype");
  run_released([&] {
    return PYOPS_ISA_CALL(moe_scatter_add, ptr<const void*>(dxs), ptr<const int64_t*>(order), k,
                          T, d, ptr<void*>(dx), dt, n_threads);
  });
}

}  // namespace

namespace pyops {
void bind_moe(py::module_& m) {
  m.def("moe_route", &moe_route, py::arg("logits"), py::arg("dtype"), py::arg("T"), py::arg("E"),
        py::arg("k"), py::arg("score"), py::arg("renormalize"), py::arg("bias"),
        py::arg("capacity"), py::arg("weights"), py::arg("experts"), py::arg("order"),
        py::arg("offsets"), py::arg("dropped"), py::arg("n_threads"), py::arg("n_group") = 0,
        py::arg("topk_group") = 0, py::arg("routed_scaling") = 1.0f,
        "Top-k routing of logits [T, E] (score 0 softmax / 1 sigmoid; bias fp32 [E] or 0;\n"
        "capacity -1 = none) into weights fp32 [T,k], experts int32 [T,k], order int64 [T*k]\n"
        "(assignments stably sorted by expert), offsets int64 [E+1], dropped uint8 [T,k].\n"
        "n_group G > 0: DeepSeek-V3 group-limited routing, the top k among the experts of the\n"
        "topk_group groups (of E/G consecutive experts) with the largest top-2 key sums (0: none).\n"
        "The weights are multiplied by routed_scaling (after the renormalisation).\n"
        "NaN/inf logits raise ValueError naming the first such token.");
  m.def("moe_gather", &moe_gather, py::arg("x"), py::arg("order"), py::arg("k"), py::arg("T"),
        py::arg("d"), py::arg("rows"), py::arg("dtype"), py::arg("n_threads"),
        "rows[r] = x[order[r] // k]  (rows [T*k, d]).");
  m.def("moe_act_forward", &moe_act_forward, py::arg("a"), py::arg("b"), py::arg("h_out"),
        py::arg("n_rows"), py::arg("hdim"), py::arg("act"), py::arg("dtype"), py::arg("n_threads"),
        py::arg("alpha") = 1.702f, py::arg("limit") = 7.0f,
        "h_out = gate(a) * b (act 0 swiglu, 1 geglu, 5 swiglu_oai with alpha, limit) or act(a)\n"
        "(2 gelu, 3 silu, 4 relu; b = 0).");
  m.def("moe_act_backward", &moe_act_backward, py::arg("a"), py::arg("b"), py::arg("dh"),
        py::arg("da"), py::arg("db"), py::arg("n_rows"), py::arg("hdim"), py::arg("act"),
        py::arg("dtype"), py::arg("n_threads"), py::arg("h") = 0, py::arg("alpha") = 1.702f,
        py::arg("limit") = 7.0f,
        "da (and db for the GLU activations; else b = db = 0) from dh; with h != 0 also the forward's\n"
        "h = act(a, b), from the same pass (the backward needs it for dW2 and does not save it).");
  m.def("moe_combine", &moe_combine, py::arg("ys"), py::arg("order"), py::arg("weights"),
        py::arg("dropped"), py::arg("k"), py::arg("T"), py::arg("d"), py::arg("y"),
        py::arg("dtype"), py::arg("n_threads"),
        "y[t] = sum_j [not dropped] weights[t,j] * ys[pos(t*k+j)], pos = inverse of order\n"
        "(dropped may be 0: none dropped).");
  m.def("moe_combine_backward", &moe_combine_backward, py::arg("dy"), py::arg("ys"),
        py::arg("order"), py::arg("weights"), py::arg("dropped"), py::arg("k"), py::arg("T"),
        py::arg("d"), py::arg("dys"), py::arg("dweights"), py::arg("dtype"), py::arg("n_threads"),
        "dys[pos(a)] = w[a] * dy[t]; dweights[t,j] = <dy[t], ys[pos(a)]> (fp32); 0 if dropped.\n"
        "Either output may be 0 (not wanted).");
  m.def("moe_scatter_add", &moe_scatter_add, py::arg("dxs"), py::arg("order"), py::arg("k"),
        py::arg("T"), py::arg("d"), py::arg("dx"), py::arg("dtype"), py::arg("n_threads"),
        "dx[t] = sum_j dxs[pos(t*k+j)] (j in order; dx fully written).");
}
}  // namespace pyops
