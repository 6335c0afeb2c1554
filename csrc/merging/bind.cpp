// pyops._C bindings of the merging family (merging/task_arithmetic.h, methods.h, interpolate.h,
// fusion.h). Thin: integers become pointers, the GIL is released around the kernel, a Status
// becomes ValueError (bad argument / index) or RuntimeError, and PYOPS_ISA_CALL picks the baseline
// or AVX2 build of the kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/bind_util.h"
#include "common/isa_dispatch.h"
#include "merging/fusion.h"
#include "merging/interpolate.h"
#include "merging/methods.h"
#include "merging/task_arithmetic.h"

namespace py = pybind11;

namespace {

using pyops::DType;
using pyops::Status;

using pyops::bind::as_pointers;
using pyops::bind::raise_if_error;
using pyops::bind::to_dtype;

pyops::TaskArithmeticProblem make_problem(uintptr_t base, const std::vector<const void*>& deltas,
                                          int in_dtype, uintptr_t coeffs, int64_t coeff_stride_n,
                                          int64_t coeff_stride_block, int64_t numel,
                                          int64_t block_size, bool from_models) {
  pyops::TaskArithmeticProblem p;
  p.base = reinterpret_cast<const void*>(base);
  p.deltas = deltas.data();
  p.n = (int64_t)deltas.size();
  p.in_dtype = to_dtype(in_dtype, "in_dtype");
  p.coeffs = reinterpret_cast<const float*>(coeffs);
  p.coeff_stride_n = coeff_stride_n;
  p.coeff_stride_block = coeff_stride_block;
  p.numel = numel;
  p.block_size = block_size;
  p.from_models = from_models;
  return p;
}

void task_arithmetic_forward(uintptr_t out, int out_dtype, uintptr_t base,
                             const std::vector<uintptr_t>& deltas, int in_dtype, uintptr_t coeffs,
                             int64_t coeff_stride_n, int64_t coeff_stride_block, int64_t numel,
                             int64_t block_size, bool from_models, int n_threads) {
  const DType od = to_dtype(out_dtype, "out_dtype");
  const auto dptr = as_pointers<const void*>(deltas);
  const auto p = make_problem(base, dptr, in_dtype, coeffs, coeff_stride_n, coeff_stride_block,
                              numel, block_size, from_models);
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(task_arithmetic_forward, p, reinterpret_cast<void*>(out), od, n_threads);
  }
  raise_if_error(st);
}

void task_arithmetic_backward(uintptr_t grad, int grad_dtype, uintptr_t base,
                              const std::vector<uintptr_t>& deltas, int in_dtype, uintptr_t coeffs,
                              int64_t coeff_stride_n, int64_t coeff_stride_block, int64_t numel,
                              int64_t block_size, bool from_models, uintptr_t grad_base,
                              const std::vector<uintptr_t>& grad_deltas, uintptr_t grad_coeffs,
                              int n_threads) {
  const DType gd = to_dtype(grad_dtype, "grad_dtype");
  if (!grad_deltas.empty() && grad_deltas.size() != deltas.size())
    throw py::value_error("grad_deltas: expected " + std::to_string(deltas.size()) +
                          " pointers or none, got " + std::to_string(grad_deltas.size()));
  const auto dptr = as_pointers<const void*>(deltas);
  const auto gdptr = as_pointers<void*>(grad_deltas);
  const auto p = make_problem(base, dptr, in_dtype, coeffs, coeff_stride_n, coeff_stride_block,
                              numel, block_size, from_models);
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(task_arithmetic_backward, p, reinterpret_cast<const void*>(grad), gd,
                        reinterpret_cast<void*>(grad_base), gdptr.empty() ? nullptr : gdptr.data(),
                        reinterpret_cast<float*>(grad_coeffs), n_threads);
  }
  raise_if_error(st);
}

// ---- merge methods (merging/methods.h) ----

pyops::MergeProblem make_merge_problem(uintptr_t base, const std::vector<const void*>& deltas, int in_dtype,
                                       uintptr_t coeffs, int64_t coeff_stride_n, int64_t coeff_stride_block,
                                       const std::vector<double>& density, int64_t numel, int64_t block_size,
                                       bool from_models, int method, double lam, uint64_t seed, int64_t name_hash,
                                       int64_t k, double tall_lambda, bool normalize, double gamma,
                                       double epsilon) {
  if (density.size() != deltas.size())
    throw py::value_error("density: expected " + std::to_string(deltas.size()) + " values (one per task), got " +
                          std::to_string(density.size()));
  if (name_hash < 0 || name_hash > 0xffffffffLL)
    throw py::value_error("name_hash: expected a 32-bit unsigned value, got " + std::to_string(name_hash));
  pyops::MergeProblem p;
  static_cast<pyops::TaskArithmeticProblem&>(p) = make_problem(
      base, deltas, in_dtype, coeffs, coeff_stride_n, coeff_stride_block, numel, block_size, from_models);
  p.density = density.data();
  p.method = method;
  p.lam = (float)lam;
  p.seed = seed;
  p.name_hash = (uint32_t)name_hash;
  p.k = k;
  p.tall_lambda = (float)tall_lambda;
  p.normalize = normalize;
  p.gamma = gamma;
  p.epsilon = epsilon;
  return p;
}

void merge_forward(uintptr_t out, int out_dtype, uintptr_t base, const std::vector<uintptr_t>& deltas,
                   int in_dtype, uintptr_t coeffs, int64_t coeff_stride_n, int64_t coeff_stride_block,
                   const std::vector<double>& density, int64_t numel, int64_t block_size, bool from_models,
                   int method, double lam, uint64_t seed, int64_t name_hash, int64_t k, double tall_lambda,
                   bool normalize, double gamma, double epsilon, int n_threads) {
  const DType od = to_dtype(out_dtype, "out_dtype");
  const auto dptr = as_pointers<const void*>(deltas);
  const auto p = make_merge_problem(base, dptr, in_dtype, coeffs, coeff_stride_n, coeff_stride_block, density, numel,
                                    block_size, from_models, method, lam, seed, name_hash, k, tall_lambda, normalize,
                                    gamma, epsilon);
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(merge_forward, p, reinterpret_cast<void*>(out), od, n_threads);
  }
  raise_if_error(st);
}

void merge_backward(uintptr_t grad, int grad_dtype, uintptr_t base, const std::vector<uintptr_t>& deltas,
                    int in_dtype, uintptr_t coeffs, int64_t coeff_stride_n, int64_t coeff_stride_block,
                    const std::vector<double>& density, int64_t numel, int64_t block_size, bool from_models,
                    int method, double lam, uint64_t seed, int64_t name_hash, int64_t k, double tall_lambda,
                    bool normalize, double gamma, double epsilon, uintptr_t grad_base,
                    const std::vector<uintptr_t>& grad_deltas, uintptr_t grad_coeffs, int n_threads) {
  const DType gd = to_dtype(grad_dtype, "grad_dtype");
  if (!grad_deltas.empty() && grad_deltas.size() != deltas.size())
    throw py::value_error("grad_deltas: expected " + std::to_string(deltas.size()) + " pointers or none, got " +
                          std::to_string(grad_deltas.size()));
  const auto dptr = as_pointers<const void*>(deltas);
  const auto gdptr = as_pointers<void*>(grad_deltas);
  const auto p = make_merge_problem(base, dptr, in_dtype, coeffs, coeff_stride_n, coeff_stride_block, density, numel,
                                    block_size, from_models, method, lam, seed, name_hash, k, tall_lambda, normalize,
                                    gamma, epsilon);
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(merge_backward, p, reinterpret_cast<const void*>(grad), gd,
                        reinterpret_cast<void*>(grad_base), gdptr.empty() ? nullptr : gdptr.data(),
                        reinterpret_cast<float*>(grad_coeffs), n_threads);
  }
  raise_if_error(st);
}

std::vector<double> task_vector_gram(uintptr_t base, const std::vector<uintptr_t>& deltas, int in_dtype,
                                     int64_t numel, bool from_models, int n_threads) {
  const DType id = to_dtype(in_dtype, "in_dtype");
  const auto dptr = as_pointers<const void*>(deltas);
  std::vector<double> gram(dptr.size() * dptr.size());
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(task_vector_gram, reinterpret_cast<const void*>(base), dptr.data(),
                        (int64_t)dptr.size(), id, numel, from_models, gram.data(), n_threads);
  }
  raise_if_error(st);
  return gram;
}

// ---- interpolating methods (merging/interpolate.h) ----

pyops::VectorLayout make_layout(int64_t n_vectors, int64_t length, int64_t vector_stride, int64_t element_stride) {
  pyops::VectorLayout layout;
  layout.n_vectors = n_vectors;
  layout.length = length;
  layout.vector_stride = vector_stride;
  layout.element_stride = element_stride;
  return layout;
}

std::vector<double> vector_gram(uintptr_t base, const std::vector<uintptr_t>& inputs, int in_dtype,
                                int64_t n_vectors, int64_t length, int64_t vector_stride, int64_t element_stride,
                                int n_threads) {
  const DType id = to_dtype(in_dtype, "in_dtype");
  if (n_vectors < 0) throw py::value_error("n_vectors: expected >= 0, got " + std::to_string(n_vectors));
  const auto ptrs = as_pointers<const void*>(inputs);
  const auto layout = make_layout(n_vectors, length, vector_stride, element_stride);
  std::vector<double> gram((size_t)n_vectors * ptrs.size() * ptrs.size());
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(vector_gram, reinterpret_cast<const void*>(base), ptrs.data(), (int64_t)ptrs.size(), id,
                        layout, gram.data(), n_threads);
  }
  raise_if_error(st);
  return gram;
}

void vector_combine(uintptr_t out, int out_dtype, uintptr_t base, const std::vector<uintptr_t>& inputs,
                    int in_dtype, int64_t n_vectors, int64_t length, int64_t vector_stride, int64_t element_stride,
                    uintptr_t coeffs, uintptr_t divisor, int n_threads) {
  const DType od = to_dtype(out_dtype, "out_dtype");
  const DType id = to_dtype(in_dtype, "in_dtype");
  const auto ptrs = as_pointers<const void*>(inputs);
  const auto layout = make_layout(n_vectors, length, vector_stride, element_stride);
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(vector_combine, reinterpret_cast<const void*>(base), ptrs.data(), (int64_t)ptrs.size(),
                        id, layout, reinterpret_cast<const float*>(coeffs), reinterpret_cast<const float*>(divisor),
                        reinterpret_cast<void*>(out), od, n_threads);
  }
  raise_if_error(st);
}

void nearswap_forward(uintptr_t out, int out_dtype, uintptr_t base, uintptr_t model, int in_dtype, int64_t numel,
                      double t, int n_threads) {
  const DType od = to_dtype(out_dtype, "out_dtype");
  const DType id = to_dtype(in_dtype, "in_dtype");
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(nearswap_forward, reinterpret_cast<const void*>(base), reinterpret_cast<const void*>(model),
                        id, numel, (float)t, reinterpret_cast<void*>(out), od, n_threads);
  }
  raise_if_error(st);
}

std::vector<int64_t> ram_counts(uintptr_t base, const std::vector<uintptr_t>& inputs, int in_dtype, int64_t numel,
                                double epsilon, int n_threads) {
  const DType id = to_dtype(in_dtype, "in_dtype");
  const auto ptrs = as_pointers<const void*>(inputs);
  std::vector<int64_t> counts(2 * ptrs.size());
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(ram_counts, reinterpret_cast<const void*>(base), ptrs.data(), (int64_t)ptrs.size(), id,
                        numel, (float)epsilon, counts.data(), counts.data() + ptrs.size(), n_threads);
  }
  raise_if_error(st);
  return counts;
}

void ram_forward(uintptr_t out, int out_dtype, uintptr_t base, const std::vector<uintptr_t>& inputs, int in_dtype,
                 int64_t numel, double epsilon, uintptr_t lam, int n_threads) {
  const DType od = to_dtype(out_dtype, "out_dtype");
  const DType id = to_dtype(in_dtype, "in_dtype");
  const auto ptrs = as_pointers<const void*>(inputs);
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(ram_forward, reinterpret_cast<const void*>(base), ptrs.data(), (int64_t)ptrs.size(), id,
                        numel, (float)epsilon, reinterpret_cast<const float*>(lam), reinterpret_cast<void*>(out), od,
                        n_threads);
  }
  raise_if_error(st);
}

// ---- sce and arcee_fusion (merging/fusion.h) ----

void check_threads(int n_threads) {
  if (n_threads < 1) throw py::value_error("n_threads: expected >= 1, got " + std::to_string(n_threads));
}

void sce_forward(uintptr_t out, int out_dtype, uintptr_t base, const std::vector<uintptr_t>& inputs, int in_dtype,
                 int64_t numel, double select_topk, int n_threads) {
  const DType od = to_dtype(out_dtype, "out_dtype");
  const DType id = to_dtype(in_dtype, "in_dtype");
  if (inputs.empty()) throw py::value_error("inputs: expected at least one model's address, got none");
  if (numel < 0) throw py::value_error("numel: expected >= 0, got " + std::to_string(numel));
  check_threads(n_threads);
  if (numel > 0) {
    if (out == 0) throw py::value_error("out: expected an address, got 0");
    if (base == 0) throw py::value_error("base: expected an address, got 0");
    for (size_t i = 0; i < inputs.size(); ++i)
      if (inputs[i] == 0) throw py::value_error("inputs[" + std::to_string(i) + "]: expected an address, got 0");
  }
  const auto ptrs = as_pointers<const void*>(inputs);
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(sce_forward, reinterpret_cast<const void*>(base), ptrs.data(), (int64_t)ptrs.size(), id,
                        numel, select_topk, reinterpret_cast<void*>(out), od, n_threads);
  }
  raise_if_error(st);
}

double arcee_fusion_forward(uintptr_t out, int out_dtype, uintptr_t base, uintptr_t model, int in_dtype,
                            int64_t n_rows, int64_t row_len, int n_threads) {
  const DType od = to_dtype(out_dtype, "out_dtype");
  const DType id = to_dtype(in_dtype, "in_dtype");
  if (n_rows < 0) throw py::value_error("n_rows: expected >= 0, got " + std::to_string(n_rows));
  if (row_len < 0) throw py::value_error("row_len: expected >= 0, got " + std::to_string(row_len));
  check_threads(n_threads);
  if (n_rows > 0 && row_len > 0) {
    if (out == 0) throw py::value_error("out: expected an address, got 0");
    if (base == 0) throw py::value_error("base: expected an address, got 0");
    if (model == 0) throw py::value_error("model: expected an address, got 0");
  }
  float threshold = 0.f;
  Status st;
  {
    py::gil_scoped_release release;
    st = PYOPS_ISA_CALL(arcee_fusion_forward, reinterpret_cast<const void*>(base),
                        reinterpret_cast<const void*>(model), id, n_rows, row_len, reinterpret_cast<void*>(out), od,
                        &threshold, n_threads);
  }
  raise_if_error(st);
  return (double)threshold;
}

}  // namespace

namespace pyops {
void bind_merging(py::module_& m) {
  m.def("sce_forward", &sce_forward, py::arg("out"), py::arg("out_dtype"), py::arg("base"), py::arg("inputs"),
        py::arg("in_dtype"), py::arg("numel"), py::arg("select_topk"), py::arg("n_threads"),
        "mergekit's sce over the whole tensor: top-k variance selection, weights, sign erase, one rounding.");
  m.def("arcee_fusion_forward", &arcee_fusion_forward, py::arg("out"), py::arg("out_dtype"), py::arg("base"),
        py::arg("model"), py::arg("in_dtype"), py::arg("n_rows"), py::arg("row_len"), py::arg("n_threads"),
        "mergekit's arcee_fusion over n_rows x row_len (softmax rows); returns the fp32 threshold "
        "(NaN for an empty tensor).");
  m.def("ram_counts", &ram_counts, py::arg("base"), py::arg("inputs"), py::arg("in_dtype"), py::arg("numel"),
        py::arg("epsilon"), py::arg("n_threads"),
        "ramplus_tl's per-task shared and unique contributor counts: 2*N int64 (shared..., unique...).");
  m.def("ram_forward", &ram_forward, py::arg("out"), py::arg("out_dtype"), py::arg("base"), py::arg("inputs"),
        py::arg("in_dtype"), py::arg("numel"), py::arg("epsilon"), py::arg("lam"), py::arg("n_threads"),
        "mergekit's ram (lam = 0) or ramplus_tl (lam: N fp32 factors of the unique entries) per element.");
  m.def("vector_gram", &vector_gram, py::arg("base"), py::arg("inputs"), py::arg("in_dtype"), py::arg("n_vectors"),
        py::arg("length"), py::arg("vector_stride"), py::arg("element_stride"), py::arg("n_threads"),
        "Per-vector Gram matrices of the inputs (minus base when base != 0), n_vectors*N*N doubles.");
  m.def("vector_combine", &vector_combine, py::arg("out"), py::arg("out_dtype"), py::arg("base"), py::arg("inputs"),
        py::arg("in_dtype"), py::arg("n_vectors"), py::arg("length"), py::arg("vector_stride"),
        py::arg("element_stride"), py::arg("coeffs"), py::arg("divisor"), py::arg("n_threads"),
        "out = [base +] (sum_i coeffs[v, i] * x_i) [/ divisor[v]] per vector v, fp32, rounded once.");
  m.def("nearswap_forward", &nearswap_forward, py::arg("out"), py::arg("out_dtype"), py::arg("base"),
        py::arg("model"), py::arg("in_dtype"), py::arg("numel"), py::arg("t"), py::arg("n_threads"),
        "mergekit's nearswap per element: w = clamp(t / max(|a - b|, 1e-6), 0, 1), out = w b + (1 - w) a.");
  m.def("task_arithmetic_forward", &task_arithmetic_forward, py::arg("out"), py::arg("out_dtype"),
        py::arg("base"), py::arg("deltas"), py::arg("in_dtype"), py::arg("coeffs"),
        py::arg("coeff_stride_n"), py::arg("coeff_stride_block"), py::arg("numel"),
        py::arg("block_size"), py::arg("from_models"), py::arg("n_threads"));
  m.def("task_arithmetic_backward", &task_arithmetic_backward, py::arg("grad"),
        py::arg("grad_dtype"), py::arg("base"), py::arg("deltas"), py::arg("in_dtype"),
        py::arg("coeffs"), py::arg("coeff_stride_n"), py::arg("coeff_stride_block"),
        py::arg("numel"), py::arg("block_size"), py::arg("from_models"), py::arg("grad_base"),
        py::arg("grad_deltas"), py::arg("grad_coeffs"), py::arg("n_threads"));
  m.def("merge_forward", &merge_forward, py::arg("out"), py::arg("out_dtype"), py::arg("base"),
        py::arg("deltas"), py::arg("in_dtype"), py::arg("coeffs"), py::arg("coeff_stride_n"),
        py::arg("coeff_stride_block"), py::arg("density"), py::arg("numel"), py::arg("block_size"),
        py::arg("from_models"), py::arg("method"), py::arg("lam"), py::arg("seed"), py::arg("name_hash"),
        py::arg("k"), py::arg("tall_lambda"), py::arg("normalize"), py::arg("gamma"),
        py::arg("epsilon"), py::arg("n_threads"),
        "Fused merge forward (ties, dare, dare_ties, breadcrumbs, della, della_linear, consensus): "
        "out = base + lam * merged.");
  m.def("merge_backward", &merge_backward, py::arg("grad"), py::arg("grad_dtype"), py::arg("base"),
        py::arg("deltas"), py::arg("in_dtype"), py::arg("coeffs"), py::arg("coeff_stride_n"),
        py::arg("coeff_stride_block"), py::arg("density"), py::arg("numel"), py::arg("block_size"),
        py::arg("from_models"), py::arg("method"), py::arg("lam"), py::arg("seed"), py::arg("name_hash"),
        py::arg("k"), py::arg("tall_lambda"), py::arg("normalize"), py::arg("gamma"),
        py::arg("epsilon"), py::arg("grad_base"), py::arg("grad_deltas"), py::arg("grad_coeffs"),
        py::arg("n_threads"),
        "Merge backward with the masks held fixed (every method but consensus): grads to base, deltas, coeffs.");
  m.def("task_vector_gram", &task_vector_gram, py::arg("base"), py::arg("deltas"), py::arg("in_dtype"),
        py::arg("numel"), py::arg("from_models"), py::arg("n_threads"),
        "Gram matrix of the task vectors, N*N doubles row-major.");
}
}  // namespace pyops
