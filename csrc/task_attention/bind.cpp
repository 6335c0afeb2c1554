// pyops._C bindings of the task_attention family (task_attention/task_attention.h): pointers arrive as
// Python ints, the GIL is released around the kernels, a Status becomes ValueError (bad input,
// e.g. a group id out of range) or RuntimeError, and PYOPS_ISA_CALL picks the per-ISA build.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/bind_util.h"
#include "common/isa_dispatch.h"
#include "task_attention/task_attention.h"

namespace py = pybind11;

namespace pyops {
namespace {

using bind::raise_if_error;

// The seed as its 64 bits: Python may hand over a negative int64 (two's complement is kept).
uint64_t seed_bits(const py::int_& seed) {
  const unsigned long long v = PyLong_AsUnsignedLongLongMask(seed.ptr());
  if (v == (unsigned long long)-1 && PyErr_Occurred()) throw py::error_already_set();
  return (uint64_t)v;
}

TaskAttentionProblem make_problem(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t q_groups,
                                  uintptr_t kv_groups, uintptr_t allow, int64_t B, int64_t Hq,
                                  int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv, int64_t G,
                                  int64_t q_groups_bstride, int64_t kv_groups_bstride, bool causal,
                                  double scale, double dropout_p, const py::int_& seed, int dtype) {
  bind::to_dtype(dtype, "task_attention: dtype");
  TaskAttentionProblem p;
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.q_groups = reinterpret_cast<const int32_t*>(q_groups);
  p.kv_groups = reinterpret_cast<const int32_t*>(kv_groups);
  p.allow = reinterpret_cast<const uint8_t*>(allow);
  p.B = B;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.Lq = Lq;
  p.Lk = Lk;
  p.D = D;
  p.Dv = Dv;
  p.G = G;
  p.q_groups_bstride = q_groups_bstride;
  p.kv_groups_bstride = kv_groups_bstride;
  p.causal = causal;
  p.scale = (float)scale;
  p.dropout_p = (float)dropout_p;
  p.seed = seed_bits(seed);
  p.dtype = static_cast<DType>(dtype);
  return p;
}

void forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t q_groups,
             uintptr_t kv_groups, uintptr_t allow, int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq,
             int64_t Lk, int64_t D, int64_t Dv, int64_t G, int64_t q_groups_bstride,
             int64_t kv_groups_bstride, bool causal, double scale, double dropout_p,
             const py::int_& seed, int dtype, int n_threads) {
  const TaskAttentionProblem p = make_problem(q, k, v, q_groups, kv_groups, allow, B, Hq, Hkv, Lq, Lk, D,
                                              Dv, G, q_groups_bstride, kv_groups_bstride, causal, scale,
                                              dropout_p, seed, dtype);
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(task_attention_forward, p, reinterpret_cast<void*>(out),
                        reinterpret_cast<float*>(lse), n_threads);
  }
  raise_if_error(st);
}

void backward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t dout, uintptr_t lse,
              uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t q_groups, uintptr_t kv_groups,
              uintptr_t allow, int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D,
              int64_t Dv, int64_t G, int64_t q_groups_bstride, int64_t kv_groups_bstride, bool causal,
              double scale, double dropout_p, const py::int_& seed, int dtype, int n_threads) {
  const TaskAttentionProblem p = make_problem(q, k, v, q_groups, kv_groups, allow, B, Hq, Hkv, Lq, Lk, D,
                                              Dv, G, q_groups_bstride, kv_groups_bstride, causal, scale,
                                              dropout_p, seed, dtype);
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(task_attention_backward, p, reinterpret_cast<const void*>(out),
                        reinterpret_cast<const void*>(dout), reinterpret_cast<const float*>(lse),
                        reinterpret_cast<void*>(dq), reinterpret_cast<void*>(dk),
                        reinterpret_cast<void*>(dv), n_threads);
  }
  raise_if_error(st);
}

}  // namespace

void bind_task_attention(py::module_& m) {
  m.def("task_attention_max_groups", []() { return kTaskAttentionMaxGroups; },
        "Most groups (G) the CPU task-attention kernels take.");
  m.def("task_attention_short_max", []() { return kTaskAttentionShortMax; },
        "Sequence length up to which the whole-block (short sequence) path runs.");
  m.def("task_attention_forward", &forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("q_groups"), py::arg("kv_groups"), py::arg("allow"), py::arg("B"),
        py::arg("Hq"), py::arg("Hkv"), py::arg("Lq"), py::arg("Lk"), py::arg("D"), py::arg("Dv"),
        py::arg("G"), py::arg("q_groups_bstride"), py::arg("kv_groups_bstride"), py::arg("causal"),
        py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("dtype"), py::arg("n_threads"),
        "Task-masked attention forward: writes out [B,Hq,Lq,Dv] and lse [B,Hq,Lq] (fp32).");
  m.def("task_attention_backward", &backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("dout"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("q_groups"),
        py::arg("kv_groups"), py::arg("allow"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Lq"),
        py::arg("Lk"), py::arg("D"), py::arg("Dv"), py::arg("G"), py::arg("q_groups_bstride"),
        py::arg("kv_groups_bstride"), py::arg("causal"), py::arg("scale"), py::arg("dropout_p"),
        py::arg("seed"), py::arg("dtype"), py::arg("n_threads"),
        "Task-masked attention backward: writes dq, dk, dv (dk/dv summed over each kv head's query heads).");
}

}  // namespace pyops
