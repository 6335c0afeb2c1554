// CPU kernels of the interpolating merge methods (merging/interpolate.h), one translation unit per
// ISA (see CMakeLists.txt).
//
// Floating-point contraction is off for this file: every a * b + c rounds twice, as the
// reference's separate torch ops do.
// -fno-trapping-math only declares FP exception flags unobservable, which lets GCC if-convert
// (and so vectorise) the clamps and masked selects; it changes no value.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/convert.h"
#include "common/isa.h"
#include "common/thread_pool.h"
#include "merging/interpolate.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace {

// Elements per tile (the fp32 stack / scratch buffers) and per work item of one vector: the split
// into items depends on the sizes alone, so sums are the same bits for every thread count.
constexpr int64_t kTile = 256;
constexpr int64_t kChunk = int64_t(1) << 16;

// sum_k x[k] * y[k] in double, eight independent lanes (order fixed by len alone).
inline double dot_double(const float* x, const float* y, int64_t len) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= len; k += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += (double)x[k + l] * (double)y[k + l];
  for (; k < len; ++k) lanes[0] += (double)x[k] * (double)y[k];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// fp32 values of elements [k0, k0 + len) of vector v: a pointer into src (fp32, contiguous) or buf.
template <typename T>
inline const float* load(const T* src, const VectorLayout& L, int64_t v, int64_t k0, int64_t len, float* buf) {
  const int64_t start = v * L.vector_stride + k0 * L.element_stride;
  if (L.element_stride == 1) return as_float_tile(src + start, buf, len);
  for (int64_t k = 0; k < len; ++k) buf[k] = to_float(src[start + k * L.element_stride]);
  return buf;
}

template <typename O>
inline void store(const float* acc, O* dst, const VectorLayout& L, int64_t v, int64_t k0, int64_t len) {
  const int64_t start = v * L.vector_stride + k0 * L.element_stride;
  if (L.element_stride == 1) {
    store_tile(acc, dst + start, len);
    return;
  }
  for (int64_t k = 0; k < len; ++k) dst[start + k * L.element_stride] = from_float<O>(acc[k]);
}

// The work items of a layout: (vector, chunk) pairs, or runs of whole short vectors.
struct Items {
  int64_t chunks_per_vector = 1;  // > 1: one item per (vector, chunk)
  int64_t vectors_per_item = 1;   // chunks_per_vector == 1: this many whole vectors per item
  int64_t count = 0;
  explicit Items(const VectorLayout& L) {
    chunks_per_vector = std::max<int64_t>(1, (L.length + kChunk - 1) / kChunk);
    if (chunks_per_vector == 1) {
      vectors_per_item = std::max<int64_t>(1, kChunk / std::max<int64_t>(L.length, 1));
      count = (L.n_vectors + vectors_per_item - 1) / vectors_per_item;
    } else {
      count = L.n_vectors * chunks_per_vector;
    }
  }
  // Calls fn(v, chunk, k_lo, k_hi) for every piece of item `item`.
  template <typename Fn>
  void for_pieces(const VectorLayout& L, int64_t item, Fn&& fn) const {
    if (chunks_per_vector > 1) {
      const int64_t v = item / chunks_per_vector, c = item % chunks_per_vector;
      fn(v, c, c * kChunk, std::min(L.length, (c + 1) * kChunk));
      return;
    }
    const int64_t v_end = std::min(L.n_vectors, (item + 1) * vectors_per_item);
    for (int64_t v = item * vectors_per_item; v < v_end; ++v) fn(v, int64_t(0), int64_t(0), L.length);
  }
};

Status check_layout(const VectorLayout& L, int64_t n) {
  if (n < 1) return Status::invalid("inputs: expected at least one input, got " + std::to_string(n));
  if (L.n_vectors < 0 || L.length < 0 || L.vector_stride < 0 || L.element_stride < 1)
    return Status::invalid("layout: expected n_vectors >= 0, length >= 0, vector_stride >= 0, element_stride >= 1");
  return Status::ok();
}

Status check_inputs(const void* const* inputs, int64_t n) {
  if (inputs == nullptr) return Status::invalid("inputs is a null pointer");
  for (int64_t i = 0; i < n; ++i)
    if (inputs[i] == nullptr) return Status::invalid("input " + std::to_string(i) + " is a null pointer");
  return Status::ok();
}

template <typename T>
void gram_piece(const T* base, const void* const* inputs, int64_t n, const VectorLayout& L, int64_t v,
                int64_t lo, int64_t hi, double* part, std::vector<float>& rows) {
  alignas(64) float bbuf[kTile];
  for (int64_t q = 0; q < n * n; ++q) part[q] = 0.0;
  for (int64_t k0 = lo; k0 < hi; k0 += kTile) {
    const int64_t len = std::min(kTile, hi - k0);
    const float* bb = base ? load(base, L, v, k0, len, bbuf) : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      float* row = rows.data() + i * kTile;
      const float* x = load(static_cast<const T*>(inputs[i]), L, v, k0, len, row);
      if (bb) {
        for (int64_t k = 0; k < len; ++k) row[k] = x[k] - bb[k];
      } else if (x != row) {
        for (int64_t k = 0; k < len; ++k) row[k] = x[k];
      }
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i; j < n; ++j) part[i * n + j] += dot_double(rows.data() + i * kTile, rows.data() + j * kTile, len);
  }
}

template <typename T, typename O>
void combine_piece(const T* base, const void* const* inputs, int64_t n, const VectorLayout& L, int64_t v,
                   int64_t lo, int64_t hi, const float* coeffs, const float* divisor, O* out) {
  alignas(64) float acc[kTile];
  alignas(64) float bbuf[kTile];
  alignas(64) float xbuf[kTile];
  const float* c = coeffs + v * n;
  for (int64_t k0 = lo; k0 < hi; k0 += kTile) {
    const int64_t len = std::min(kTile, hi - k0);
    const float* bb = base ? load(base, L, v, k0, len, bbuf) : nullptr;
    for (int64_t k = 0; k < len; ++k) acc[k] = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float ci = c[i];
      const float* x = load(static_cast<const T*>(inputs[i]), L, v, k0, len, xbuf);
      if (bb) {
        for (int64_t k = 0; k < len; ++k) acc[k] += ci * (x[k] - bb[k]);
      } else {
        for (int64_t k = 0; k < len; ++k) acc[k] += ci * x[k];
      }
    }
    if (divisor) {
      const float d = divisor[v];
      for (int64_t k = 0; k < len; ++k) acc[k] = acc[k] / d;
    }
    if (bb)
      for (int64_t k = 0; k < len; ++k) acc[k] = bb[k] + acc[k];
    store(acc, out, L, v, k0, len);
  }
}

// The layout of mergekit's nuslerp_row_wise (the vectors along dim 0): vector v is column v of an
// [length, n_vectors] row-major matrix. Walking it vector by vector would stride through memory,
// so these passes take blocks of kCols adjacent columns and sweep the rows in order (each
// column's sums still run k = 0..length-1, so the result does not depend on the blocking).
constexpr int64_t kCols = 256;

inline bool column_layout(const VectorLayout& L) {
  return L.element_stride > 1 && L.vector_stride == 1 && L.element_stride == L.n_vectors;
}

template <typename T>
void gram_columns(const T* base, const void* const* inputs, int64_t n, const VectorLayout& L, int64_t c0,
                  int64_t c1, double* gram) {
  const int64_t w = c1 - c0, nn = n * n;
  std::vector<float> rows((size_t)(n * kCols));
  std::vector<double> acc((size_t)(nn * kCols), 0.0);  // [i * n + j][column]: contiguous per pair
  alignas(64) float bbuf[kCols];
  for (int64_t k = 0; k < L.length; ++k) {
    const int64_t start = k * L.element_stride + c0;
    const float* bb = base ? as_float_tile(base + start, bbuf, w) : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      float* row = rows.data() + i * kCols;
      const float* x = as_float_tile(static_cast<const T*>(inputs[i]) + start, row, w);
      if (bb) {
        for (int64_t v = 0; v < w; ++v) row[v] = x[v] - bb[v];
      } else if (x != row) {
        for (int64_t v = 0; v < w; ++v) row[v] = x[v];
      }
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i; j < n; ++j) {
        const float* xi = rows.data() + i * kCols;
        const float* xj = rows.data() + j * kCols;
        double* aij = acc.data() + (i * n + j) * kCols;
        for (int64_t v = 0; v < w; ++v) aij[v] += (double)xi[v] * (double)xj[v];
      }
  }
  for (int64_t v = 0; v < w; ++v)
    for (int64_t q = 0; q < nn; ++q) gram[(c0 + v) * nn + q] = acc[q * kCols + v];
}

template <typename T, typename O>
void combine_columns(const T* base, const void* const* inputs, int64_t n, const VectorLayout& L, int64_t c0,
                     int64_t c1, const float* coeffs, const float* divisor, O* out) {
  const int64_t w = c1 - c0;
  std::vector<float> ct((size_t)(n * kCols));  // the block's coefficients, task-major
  for (int64_t i = 0; i < n; ++i)
    for (int64_t v = 0; v < w; ++v) ct[i * kCols + v] = coeffs[(c0 + v) * n + i];
  alignas(64) float acc[kCols];
  alignas(64) float bbuf[kCols];
  alignas(64) float xbuf[kCols];
  for (int64_t k = 0; k < L.length; ++k) {
    const int64_t start = k * L.element_stride + c0;
    const float* bb = base ? as_float_tile(base + start, bbuf, w) : nullptr;
    for (int64_t v = 0; v < w; ++v) acc[v] = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float* c = ct.data() + i * kCols;
      const float* x = as_float_tile(static_cast<const T*>(inputs[i]) + start, xbuf, w);
      if (bb) {
        for (int64_t v = 0; v < w; ++v) acc[v] += c[v] * (x[v] - bb[v]);
      } else {
        for (int64_t v = 0; v < w; ++v) acc[v] += c[v] * x[v];
      }
    }
    if (divisor)
      for (int64_t v = 0; v < w; ++v) acc[v] = acc[v] / divisor[c0 + v];
    if (bb)
      for (int64_t v = 0; v < w; ++v) acc[v] = bb[v] + acc[v];
    store_tile(acc, out + start, w);
  }
}

}  // namespace

Status vector_gram(const void* base, const void* const* inputs, int64_t n, DType in_dtype, const VectorLayout& L,
                   double* gram, int n_threads) {
  Status st = check_layout(L, n);
  if (!st.is_ok()) return st;
  if (gram == nullptr) return Status::invalid("gram is a null pointer");
  const int64_t nn = n * n;
  for (int64_t q = 0; q < L.n_vectors * nn; ++q) gram[q] = 0.0;
  if (L.n_vectors == 0 || L.length == 0) return Status::ok();
  st = check_inputs(inputs, n);
  if (!st.is_ok()) return st;
  if (column_layout(L)) {
    dispatch_dtype(in_dtype, [&](auto in_tag) {
      using T = decltype(in_tag);
      parallel_for((L.n_vectors + kCols - 1) / kCols, n_threads, [&](int64_t item) {
        const int64_t c0 = item * kCols, c1 = std::min(L.n_vectors, c0 + kCols);
        gram_columns<T>(static_cast<const T*>(base), inputs, n, L, c0, c1, gram);
      });
      return 0;
    });
    for (int64_t v = 0; v < L.n_vectors; ++v)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < i; ++j) gram[v * nn + i * n + j] = gram[v * nn + j * n + i];
    return Status::ok();
  }
  const Items items(L);
  // One partial Gram matrix per (vector, chunk), summed in chunk order below.
  std::vector<double> partial(items.chunks_per_vector > 1 ? (size_t)(items.count * nn) : 0);
  dispatch_dtype(in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    parallel_for(items.count, n_threads, [&](int64_t item) {
      std::vector<float> rows((size_t)(n * kTile));
      items.for_pieces(L, item, [&](int64_t v, int64_t c, int64_t lo, int64_t hi) {
        double* part = items.chunks_per_vector > 1 ? partial.data() + (v * items.chunks_per_vector + c) * nn
                                                   : gram + v * nn;
        gram_piece<T>(static_cast<const T*>(base), inputs, n, L, v, lo, hi, part, rows);
      });
    });
    return 0;
  });
  for (int64_t v = 0; v < L.n_vectors; ++v) {
    double* g = gram + v * nn;
    if (items.chunks_per_vector > 1)
      for (int64_t c = 0; c < items.chunks_per_vector; ++c) {
        const double* part = partial.data() + (v * items.chunks_per_vector + c) * nn;
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = i; j < n; ++j) g[i * n + j] += part[i * n + j];
      }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < i; ++j) g[i * n + j] = g[j * n + i];
  }
  return Status::ok();
}

Status vector_combine(const void* base, const void* const* inputs, int64_t n, DType in_dtype, const VectorLayout& L,
                      const float* coeffs, const float* divisor, void* out, DType out_dtype, int n_threads) {
  Status st = check_layout(L, n);
  if (!st.is_ok()) return st;
  if (L.n_vectors == 0 || L.length == 0) return Status::ok();
  st = check_inputs(inputs, n);
  if (!st.is_ok()) return st;
  if (coeffs == nullptr || out == nullptr) return Status::invalid("coeffs or out is a null pointer");
  if (column_layout(L)) {
    dispatch_dtype(in_dtype, [&](auto in_tag) {
      using T = decltype(in_tag);
      return dispatch_dtype(out_dtype, [&](auto out_tag) {
        using O = decltype(out_tag);
        parallel_for((L.n_vectors + kCols - 1) / kCols, n_threads, [&](int64_t item) {
          const int64_t c0 = item * kCols, c1 = std::min(L.n_vectors, c0 + kCols);
          combine_columns<T, O>(static_cast<const T*>(base), inputs, n, L, c0, c1, coeffs, divisor,
                                static_cast<O*>(out));
        });
        return 0;
      });
    });
    return Status::ok();
  }
  const Items items(L);
  dispatch_dtype(in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    return dispatch_dtype(out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      parallel_for(items.count, n_threads, [&](int64_t item) {
        items.for_pieces(L, item, [&](int64_t v, int64_t, int64_t lo, int64_t hi) {
          combine_piece<T, O>(static_cast<const T*>(base), inputs, n, L, v, lo, hi, coeffs, divisor,
                              static_cast<O*>(out));
        });
      });
      return 0;
    });
  });
  return Status::ok();
}

Status nearswap_forward(const void* base, const void* model, DType in_dtype, int64_t numel, float t, void* out,
                        DType out_dtype, int n_threads) {
  if (numel < 0) return Status::invalid("numel must be >= 0, got " + std::to_string(numel));
  if (numel == 0) return Status::ok();
  if (base == nullptr || model == nullptr || out == nullptr)
    return Status::invalid("base, model or out is a null pointer");
  const int64_t n_items = (numel + kChunk - 1) / kChunk;
  dispatch_dtype(in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    return dispatch_dtype(out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      parallel_for(n_items, n_threads, [&](int64_t item) {
        alignas(64) float abuf[kTile];
        alignas(64) float bbuf[kTile];
        alignas(64) float acc[kTile];
        const int64_t hi = std::min(numel, (item + 1) * kChunk);
        for (int64_t k0 = item * kChunk; k0 < hi; k0 += kTile) {
          const int64_t len = std::min(kTile, hi - k0);
          const float* a = as_float_tile(static_cast<const T*>(base) + k0, abuf, len);
          const float* b = as_float_tile(static_cast<const T*>(model) + k0, bbuf, len);
          for (int64_t k = 0; k < len; ++k) {
            float d = std::fabs(a[k] - b[k]);
            d = d < 1e-6f ? 1e-6f : d;  // clamp(min=1e-6): a NaN stays NaN
            float w = t / d;
            w = w < 0.f ? 0.f : w;      // clamp(0, 1): a NaN stays NaN
            w = w > 1.f ? 1.f : w;
            acc[k] = w * b[k] + (1.f - w) * a[k];
          }
          store_tile(acc, static_cast<O*>(out) + k0, len);
        }
      });
      return 0;
    });
  });
  return Status::ok();
}

namespace {

// tau_i of elements [k0, k0 + len) into rows (n x kTile) and the contributor count per element.
template <typename T>
void ram_tile(const T* base, const void* const* inputs, int64_t n, int64_t k0, int64_t len, float epsilon,
              float* rows, int32_t* count) {
  alignas(64) float bbuf[kTile];
  alignas(64) float xbuf[kTile];
  const float* bb = as_float_tile(base + k0, bbuf, len);
  for (int64_t k = 0; k < len; ++k) count[k] = 0;
  for (int64_t i = 0; i < n; ++i) {
    float* row = rows + i * kTile;
    const float* x = as_float_tile(static_cast<const T*>(inputs[i]) + k0, xbuf, len);
    for (int64_t k = 0; k < len; ++k) {
      row[k] = x[k] - bb[k];
      count[k] += std::fabs(row[k]) > epsilon ? 1 : 0;
    }
  }
}

Status check_ram(const void* base, const void* const* inputs, int64_t n, int64_t numel) {
  if (n < 1) return Status::invalid("inputs: expected at least one input, got " + std::to_string(n));
  if (numel < 0) return Status::invalid("numel must be >= 0, got " + std::to_string(numel));
  if (numel > 0 && base == nullptr) return Status::invalid("base is a null pointer");
  return numel > 0 ? check_inputs(inputs, n) : Status::ok();
}

}  // namespace

Status ram_counts(const void* base, const void* const* inputs, int64_t n, DType in_dtype, int64_t numel,
                  float epsilon, int64_t* shared, int64_t* unique, int n_threads) {
  Status st = check_ram(base, inputs, n, numel);
  if (!st.is_ok()) return st;
  if (shared == nullptr || unique == nullptr) return Status::invalid("shared or unique is a null pointer");
  for (int64_t i = 0; i < n; ++i) shared[i] = unique[i] = 0;
  if (numel == 0) return Status::ok();
  const int64_t n_items = (numel + kChunk - 1) / kChunk;
  std::vector<int64_t> partial((size_t)(n_items * 2 * n), 0);  // integer sums: any order gives the same
  dispatch_dtype(in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    parallel_for(n_items, n_threads, [&](int64_t item) {
      std::vector<float> rows((size_t)(n * kTile));
      alignas(64) int32_t count[kTile];
      int64_t* sh = partial.data() + item * 2 * n;
      int64_t* un = sh + n;
      const int64_t hi = std::min(numel, (item + 1) * kChunk);
      for (int64_t k0 = item * kChunk; k0 < hi; k0 += kTile) {
        const int64_t len = std::min(kTile, hi - k0);
        ram_tile(static_cast<const T*>(base), inputs, n, k0, len, epsilon, rows.data(), count);
        for (int64_t i = 0; i < n; ++i) {
          const float* row = rows.data() + i * kTile;
          int64_t s = 0, u = 0;
          for (int64_t k = 0; k < len; ++k) {
            const bool nz = std::fabs(row[k]) > epsilon;
            s += nz && count[k] > 1 ? 1 : 0;
            u += nz && count[k] == 1 ? 1 : 0;
          }
          sh[i] += s;
          un[i] += u;
        }
      }
    });
    return 0;
  });
  for (int64_t item = 0; item < n_items; ++item)
    for (int64_t i = 0; i < n; ++i) {
      shared[i] += partial[(size_t)(item * 2 * n + i)];
      unique[i] += partial[(size_t)(item * 2 * n + n + i)];
    }
  return Status::ok();
}

Status ram_forward(const void* base, const void* const* inputs, int64_t n, DType in_dtype, int64_t numel,
                   float epsilon, const float* lam, void* out, DType out_dtype, int n_threads) {
  Status st = check_ram(base, inputs, n, numel);
  if (!st.is_ok()) return st;
  if (numel == 0) return Status::ok();
  if (out == nullptr) return Status::invalid("out is a null pointer");
  const int64_t n_items = (numel + kChunk - 1) / kChunk;
  dispatch_dtype(in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    return dispatch_dtype(out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      parallel_for(n_items, n_threads, [&](int64_t item) {
        std::vector<float> rows((size_t)(n * kTile));
        alignas(64) int32_t count[kTile];
        alignas(64) float acc[kTile];
        alignas(64) float bbuf[kTile];
        const int64_t hi = std::min(numel, (item + 1) * kChunk);
        for (int64_t k0 = item * kChunk; k0 < hi; k0 += kTile) {
          const int64_t len = std::min(kTile, hi - k0);
          ram_tile(static_cast<const T*>(base), inputs, n, k0, len, epsilon, rows.data(), count);
          for (int64_t k = 0; k < len; ++k) acc[k] = 0.f;
          for (int64_t i = 0; i < n; ++i) {
            const float* row = rows.data() + i * kTile;
            const float li = lam ? lam[i] : 1.f;
            for (int64_t k = 0; k < len; ++k) {
              const float tz = row[k] * (std::fabs(row[k]) > epsilon ? 1.f : 0.f);
              const float u = count[k] == 1 ? 1.f : 0.f, o = count[k] > 1 ? 1.f : 0.f;
              const float cc = (float)std::max<int32_t>(count[k], 1);
              const float uniq = lam ? (tz * u) * li : tz * u;
              acc[k] += uniq + (tz * o) / cc;
            }
          }
          const float* bb = as_float_tile(static_cast<const T*>(base) + k0, bbuf, len);
          for (int64_t k = 0; k < len; ++k) acc[k] = bb[k] + acc[k];
          store_tile(acc, static_cast<O*>(out) + k0, len);
        }
      });
      return 0;
    });
  });
  return Status::ok();
}

}  // namespace PYOPS_ISA_KERNEL_NS
}  // namespace pyops
