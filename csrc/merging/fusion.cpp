// CPU kernels of sce and arcee_fusion (merging/fusion.h), one translation unit per ISA (see
// CMakeLists.txt).
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
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/convert.h"
#include "common/isa.h"
#include "common/thread_pool.h"
#include "merging/fusion.h"

namespace pyops {
namespace PYOPS_ISA_KERNEL_NS {
namespace {

// Elements per tile (the fp32 stack buffers) and per work item of the flat passes: the split into
// items depends on the sizes alone, and every cross-item sum (doubles, integer counts) is taken in
// item order, so results are the same bits for every thread count.
constexpr int64_t kTile = 256;
constexpr int64_t kChunk = int64_t(1) << 16;

inline uint32_t bits_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// ---- exact order statistics: a radix select on 32-bit keys -------------------------------------

// For each of m ranks, the key at that ascending position of key(0..numel-1), with how many keys
// are below it and how many equal it. Three passes over the keys (digits of 11, 11 and 10 bits,
// high first); each counts, per rank, the keys that share the digits found so far for it (the
// first pass one histogram for all) into per-item histograms, summed in item order (integers:
// any order gives the same counts).
struct Selected {
  uint32_t key = 0;
  int64_t less = 0;
  int64_t equal = 0;
};

constexpr int kMaxRanks = 3;

template <typename KeyFn>
void radix_select(int64_t numel, const int64_t* ranks, int m, const KeyFn& key, int n_threads, Selected* sel) {
  constexpr int kShift[3] = {21, 10, 0};
  constexpr int kBits[3] = {11, 11, 10};
  const int64_t n_items = (numel + kChunk - 1) / kChunk;
  uint32_t prefix[kMaxRanks] = {0, 0, 0};
  uint32_t prefix_mask = 0;
  for (int g = 0; g < m; ++g) sel[g] = Selected{};
  std::vector<uint32_t> hist;
  std::vector<int64_t> total;
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = kShift[pass];
    const int64_t bins = int64_t(1) << kBits[pass];
    const uint32_t digit_mask = (uint32_t)(bins - 1);
    const int groups = pass == 0 ? 1 : m;  // no digit found yet: every rank counts every key
    const int64_t stride = groups * bins;
    hist.assign((size_t)(n_items * stride), 0u);  // <= kChunk per bin: fits 32 bits
    parallel_for(n_items, n_threads, [&](int64_t item) {
      uint32_t* h = hist.data() + item * stride;
      const int64_t hi = std::min(numel, (item + 1) * kChunk);
      if (groups == 1) {
        const uint32_t p0 = prefix[0];
        for (int64_t j = item * kChunk; j < hi; ++j) {
          const uint32_t k = key(j);
          if ((k & prefix_mask) == p0) ++h[(k >> shift) & digit_mask];
        }
        return;
      }
      for (int64_t j = item * kChunk; j < hi; ++j) {
        const uint32_t k = key(j);
        for (int g = 0; g < groups; ++g)
          if ((k & prefix_mask) == prefix[g]) ++h[g * bins + ((k >> shift) & digit_mask)];
      }
    });
    total.assign((size_t)stride, 0);
    for (int64_t item = 0; item < n_items; ++item)
      for (int64_t b = 0; b < stride; ++b) total[(size_t)b] += hist[(size_t)(item * stride + b)];
    for (int g = 0; g < m; ++g) {
      // The digit whose bin holds position ranks[g] (ranks[g] - less among the keys with its prefix).
      const int64_t* t = total.data() + (groups == 1 ? 0 : g) * bins;
      int64_t below = sel[g].less, b = 0;
      for (; b < bins - 1 && below + t[b] <= ranks[g]; ++b) below += t[b];
      sel[g].less = below;
      sel[g].equal = t[b];
      prefix[g] |= (uint32_t)b << shift;
    }
    prefix_mask |= digit_mask << shift;
  }
  for (int g = 0; g < m; ++g) sel[g].key = prefix[g];
}

// sce's ranking key of a variance: |var| descending is key descending; NaN ranks below +0 (the
// reference's stable sort of -|var| puts NaN last).
inline uint32_t var_key(float v) { return std::isnan(v) ? 0u : (bits_of(v) & 0x7fffffffu) + 1u; }

// arcee_fusion's ascending key of a value (torch.sort's order: NaN after +inf; -0 before +0,
// which only decides which zero is picked, a value that compares the same).
inline uint32_t ascending_key(float v) {
  if (std::isnan(v)) return 0xffffffffu;
  const uint32_t u = bits_of(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float from_ascending_key(uint32_t k) {
  if (k == 0xffffffffu) return std::numeric_limits<float>::quiet_NaN();
  return (k & 0x80000000u) ? float_of(k & 0x7fffffffu) : float_of(~k);
}

// ---- sce ---------------------------------------------------------------------------------------

// tau_i of elements [k0, k0 + len) into rows (n x kTile), fp32.
template <typename T>
void tau_tile(const T* base, const void* const* inputs, int64_t n, int64_t k0, int64_t len, float* rows,
              float* bb_out) {
  alignas(64) float xbuf[kTile];
  const float* bb = as_float_tile(base + k0, bb_out, len);
  if (bb != bb_out)
    for (int64_t k = 0; k < len; ++k) bb_out[k] = bb[k];
  for (int64_t i = 0; i < n; ++i) {
    float* row = rows + i * kTile;
    const float* x = as_float_tile(static_cast<const T*>(inputs[i]) + k0, xbuf, len);
    for (int64_t k = 0; k < len; ++k) row[k] = x[k] - bb_out[k];
  }
}

// The keep factor of sce's selection for one tile (1: kept, 0: dropped).
struct SceSelection {
  enum Mode { kAll, kNone, kTopK } mode = kAll;
  const float* var = nullptr;      // kTopK: the per-element variances
  uint32_t key = 0;                // kTopK: the k-th largest key
  int64_t need = 0;                // kTopK: how many of the keys equal to `key` are kept (lowest index first)
  const int64_t* tie_start = nullptr;  // kTopK: per item, the keys equal to `key` in earlier items

  // The running tie count at the start of work item `item`.
  int64_t ties_before(int64_t item) const { return mode == kTopK ? tie_start[item] : 0; }

  // keep[k] for elements [k0, k0 + len); `ties` counts the keys equal to `key` met so far in the
  // item (elements are visited in index order within an item).
  void fill(int64_t k0, int64_t len, int64_t& ties, float* keep) const {
    if (mode != kTopK) {
      const float f = mode == kAll ? 1.f : 0.f;
      for (int64_t k = 0; k < len; ++k) keep[k] = f;
      return;
    }
    for (int64_t k = 0; k < len; ++k) {
      const uint32_t kk = var_key(var[k0 + k]);
      bool kept = kk > key;
      if (kk == key) kept = ties++ < need;
      keep[k] = kept ? 1.f : 0.f;
    }
  }
};

template <typename T>
void sce_variance(const T* base, const void* const* inputs, int64_t n, int64_t numel, float* var,
                  int64_t* nonzero, int n_threads) {
  const int64_t n_items = (numel + kChunk - 1) / kChunk;
  parallel_for(n_items, n_threads, [&](int64_t item) {
    std::vector<float> rows((size_t)(n * kTile));
    alignas(64) float bb[kTile];
    int64_t nz = 0;
    const int64_t hi = std::min(numel, (item + 1) * kChunk);
    for (int64_t k0 = item * kChunk; k0 < hi; k0 += kTile) {
      const int64_t len = std::min(kTile, hi - k0);
      tau_tile(base, inputs, n, k0, len, rows.data(), bb);
      for (int64_t k = 0; k < len; ++k) {
        // Biased variance over the models, in double (torch.var(unbiased=False) of the fp32
        // tau to within its own rounding), rounded to fp32. An inf / NaN tau gives NaN.
        double mean = 0.0;
        for (int64_t i = 0; i < n; ++i) mean += (double)rows[(size_t)(i * kTile + k)];
        mean /= (double)n;
        double m2 = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          const double d = (double)rows[(size_t)(i * kTile + k)] - mean;
          m2 += d * d;
        }
        const float v = (float)(m2 / (double)n);
        var[k0 + k] = v;
        nz += v != 0.f ? 1 : 0;  // torch.count_nonzero: NaN counts
      }
    }
    nonzero[item] = nz;
  });
}

}  // namespace

Status sce_forward(const void* base, const void* const* inputs, int64_t n, DType in_dtype, int64_t numel,
                   double select_topk, void* out, DType out_dtype, int n_threads) {
  if (n < 1) return Status::invalid("inputs: expected at least one input, got " + std::to_string(n));
  if (numel < 0) return Status::invalid("numel: expected >= 0, got " + std::to_string(numel));
  if (numel == 0) return Status::ok();
  if (base == nullptr) return Status::invalid("base is a null pointer");
  if (out == nullptr) return Status::invalid("out is a null pointer");
  if (inputs == nullptr) return Status::invalid("inputs is a null pointer");
  for (int64_t i = 0; i < n; ++i)
    if (inputs[i] == nullptr) return Status::invalid("input " + std::to_string(i) + " is a null pointer");
  const int64_t n_items = (numel + kChunk - 1) / kChunk;

  // Pass 1 (0 < select_topk < 1): the variances, then the k-th largest |var| and its ties.
  SceSelection sel;
  std::vector<float> var;
  std::vector<int64_t> tie_start;
  if (select_topk <= 0.0) {
    sel.mode = SceSelection::kNone;
  } else if (select_topk < 1.0) {
    var.resize((size_t)numel);
    std::vector<int64_t> nonzero((size_t)n_items, 0);
    dispatch_dtype(in_dtype, [&](auto in_tag) {
      using T = decltype(in_tag);
      sce_variance<T>(static_cast<const T*>(base), inputs, n, numel, var.data(), nonzero.data(), n_threads);
      return 0;
    });
    int64_t count = 0;
    for (int64_t c : nonzero) count += c;
    // int(torch.count_nonzero(var) * select_topk): an int64 tensor times a Python float is an fp32
    // product of the fp32 operands, truncated.
    const float product = (float)count * (float)select_topk;
    const int64_t k = (int64_t)product;
    if (k <= 0) {
      sel.mode = SceSelection::kNone;
    } else {
      const float* v = var.data();
      const int64_t rank = numel - k;
      Selected s;
      radix_select(numel, &rank, 1, [v](int64_t j) { return var_key(v[j]); }, n_threads, &s);
      const int64_t greater = numel - s.less - s.equal;
      // Per item, how many keys equal the k-th are in earlier items: the ties kept are the
      // lowest-index ones.
      std::vector<int64_t> ties((size_t)n_items, 0);
      parallel_for(n_items, n_threads, [&](int64_t item) {
        int64_t c = 0;
        const int64_t hi = std::min(numel, (item + 1) * kChunk);
        for (int64_t j = item * kChunk; j < hi; ++j) c += var_key(v[j]) == s.key ? 1 : 0;
        ties[(size_t)item] = c;
      });
      tie_start.assign((size_t)n_items, 0);
      for (int64_t item = 1; item < n_items; ++item)
        tie_start[(size_t)item] = tie_start[(size_t)(item - 1)] + ties[(size_t)(item - 1)];
      sel.mode = SceSelection::kTopK;
      sel.var = v;
      sel.key = s.key;
      sel.need = k - greater;
      sel.tie_start = tie_start.data();
    }
  }

  // Pass 2: the weights' sums of squares, per item in double, summed in item order.
  std::vector<double> partial((size_t)(n_items * n), 0.0);
  dispatch_dtype(in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    parallel_for(n_items, n_threads, [&](int64_t item) {
      std::vector<float> rows((size_t)(n * kTile));
      alignas(64) float bb[kTile];
      alignas(64) float keep[kTile];
      int64_t ties = sel.ties_before(item);
      double* acc = partial.data() + item * n;
      const int64_t hi = std::min(numel, (item + 1) * kChunk);
      for (int64_t k0 = item * kChunk; k0 < hi; k0 += kTile) {
        const int64_t len = std::min(kTile, hi - k0);
        tau_tile(static_cast<const T*>(base), inputs, n, k0, len, rows.data(), bb);
        sel.fill(k0, len, ties, keep);
        for (int64_t i = 0; i < n; ++i) {
          const float* row = rows.data() + i * kTile;
          double s = 0.0;
          for (int64_t k = 0; k < len; ++k) {
            const float tm = row[k] * keep[k];
            s += (double)(tm * tm);
          }
          acc[i] += s;
        }
      }
    });
    return 0;
  });
  std::vector<float> w((size_t)n);
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t item = 0; item < n_items; ++item) s += partial[(size_t)(item * n + i)];
    w[(size_t)i] = (float)(s / (double)numel);
    total += w[(size_t)i];
  }
  // The reference's test is on the fp32 total (a NaN total fails it: every weight becomes NaN).
  if (std::fabs((double)total) < 1e-6) {
    for (int64_t i = 0; i < n; ++i) w[(size_t)i] = 1.f / (float)n;
  } else {
    for (int64_t i = 0; i < n; ++i) w[(size_t)i] = w[(size_t)i] / total;
  }

  // Pass 3: sign election, erase, weighted combine.
  dispatch_dtype(in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    return dispatch_dtype(out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      parallel_for(n_items, n_threads, [&](int64_t item) {
        std::vector<float> rows((size_t)(n * kTile));
        alignas(64) float bb[kTile];
        alignas(64) float keep[kTile];
        alignas(64) float acc[kTile];
        int64_t ties = sel.ties_before(item);
        const int64_t hi = std::min(numel, (item + 1) * kChunk);
        for (int64_t k0 = item * kChunk; k0 < hi; k0 += kTile) {
          const int64_t len = std::min(kTile, hi - k0);
          tau_tile(static_cast<const T*>(base), inputs, n, k0, len, rows.data(), bb);
          sel.fill(k0, len, ties, keep);
          for (int64_t i = 0; i < n; ++i) {
            float* row = rows.data() + i * kTile;
            for (int64_t k = 0; k < len; ++k) row[k] = row[k] * keep[k];
          }
          for (int64_t k = 0; k < len; ++k) {
            float sum = 0.f;
            for (int64_t i = 0; i < n; ++i) sum += rows[(size_t)(i * kTile + k)];
            const float s = sum >= 0.f ? 1.f : -1.f;  // NaN: -1, as torch.where(sum >= 0, 1, -1)
            float num = 0.f, den = 0.f;
            for (int64_t i = 0; i < n; ++i) {
              const float tm = rows[(size_t)(i * kTile + k)];
              const float sg = tm > 0.f ? 1.f : (tm < 0.f ? -1.f : 0.f);  // 0 for +-0 and NaN: never s
              const float ew = w[(size_t)i] * (sg == s ? 1.f : 0.f);
              num += tm * ew;
              den += ew;
            }
            den = den < 1e-6f ? 1e-6f : den;  // clamp(min=1e-6): a NaN stays NaN
            acc[k] = bb[k] + num / den;
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

// ---- arcee_fusion ------------------------------------------------------------------------------

// max(v) with NaN propagating (torch.max, hence softmax, turns a row with a NaN into NaN).
inline float row_max(const float* v, int64_t len) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < len; ++k) {
    if (std::isnan(v[k])) return v[k];
    m = v[k] > m ? v[k] : m;
  }
  return m;
}

// e[k] = exp(v[k] - max) and the fp32 reciprocal of their sum (summed in double).
inline float softmax_numerators(const float* v, int64_t len, float* e) {
  const float m = row_max(v, len);
  double s = 0.0;
  for (int64_t k = 0; k < len; ++k) {
    e[k] = std::exp(v[k] - m);
    s += (double)e[k];
  }
  return 1.f / (float)s;
}

template <typename T>
void arcee_importance_rows(const T* base, const T* model, int64_t r0, int64_t r1, int64_t row_len, float* imp,
                           std::vector<float>& buf) {
  float* xb = buf.data();
  float* bv = xb + row_len;
  float* ex = bv + row_len;
  float* eb = ex + row_len;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * row_len;
    for (int64_t k = 0; k < row_len; ++k) {
      xb[k] = to_float(model[off + k]);
      bv[k] = to_float(base[off + k]);
    }
    const float rx = softmax_numerators(xb, row_len, ex);
    const float rb = softmax_numerators(bv, row_len, eb);
    double kl = 0.0;
    for (int64_t k = 0; k < row_len; ++k) {
      const float p = ex[k] * rx + 1e-8f;
      const float q = eb[k] * rb + 1e-8f;
      kl += (double)(p * std::log(p / q));
    }
    const float klf = (float)kl;
    for (int64_t k = 0; k < row_len; ++k) imp[off + k] = std::fabs(xb[k] - bv[k]) * klf;
  }
}

}  // namespace

Status arcee_fusion_forward(const void* base, const void* model, DType in_dtype, int64_t n_rows, int64_t row_len,
                            void* out, DType out_dtype, float* threshold, int n_threads) {
  if (n_rows < 0) return Status::invalid("n_rows: expected >= 0, got " + std::to_string(n_rows));
  if (row_len < 0) return Status::invalid("row_len: expected >= 0, got " + std::to_string(row_len));
  if (row_len > 0 && n_rows > std::numeric_limits<int64_t>::max() / row_len)
    return Status::invalid("n_rows * row_len overflows int64");
  if (threshold != nullptr) *threshold = std::numeric_limits<float>::quiet_NaN();
  const int64_t numel = n_rows * row_len;
  if (numel == 0) return Status::ok();
  if (base == nullptr || model == nullptr || out == nullptr)
    return Status::invalid("base, model or out is a null pointer");

  // Pass 1: the importance of every element, whole rows per work item.
  std::vector<float> imp((size_t)numel);
  const int64_t rows_per_item = std::max<int64_t>(1, kChunk / row_len);
  const int64_t row_items = (n_rows + rows_per_item - 1) / rows_per_item;
  dispatch_dtype(in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    parallel_for(row_items, n_threads, [&](int64_t item) {
      std::vector<float> buf((size_t)(4 * row_len));
      const int64_t r0 = item * rows_per_item, r1 = std::min(n_rows, r0 + rows_per_item);
      arcee_importance_rows(static_cast<const T*>(base), static_cast<const T*>(model), r0, r1, row_len, imp.data(),
                            buf);
    });
    return 0;
  });

  // The quartiles: the reference's indices (torch's fp32 products q * (n - 1), truncated), exact
  // order statistics of the importance.
  const float span = (float)(numel - 1);
  const float fractions[3] = {0.25f, 0.5f, 0.75f};
  int64_t idx[3];
  for (int j = 0; j < 3; ++j) idx[j] = std::min(std::max<int64_t>((int64_t)(fractions[j] * span), 0), numel - 1);
  const float* iv = imp.data();
  Selected s[3];
  radix_select(numel, idx, 3, [iv](int64_t e) { return ascending_key(iv[e]); }, n_threads, s);
  float quart[3];
  for (int j = 0; j < 3; ++j) quart[j] = from_ascending_key(s[j].key);
  float spread = quart[2] - quart[0];
  spread = 1.5f * spread;
  const float thr = quart[1] + spread;
  if (threshold != nullptr) *threshold = thr;

  // Pass 2: out = base + (x - base) * [importance >= thr].
  const int64_t n_items = (numel + kChunk - 1) / kChunk;
  dispatch_dtype(in_dtype, [&](auto in_tag) {
    using T = decltype(in_tag);
    return dispatch_dtype(out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      parallel_for(n_items, n_threads, [&](int64_t item) {
        alignas(64) float xbuf[kTile];
        alignas(64) float bbuf[kTile];
        alignas(64) float acc[kTile];
        const int64_t hi = std::min(numel, (item + 1) * kChunk);
        for (int64_t k0 = item * kChunk; k0 < hi; k0 += kTile) {
          const int64_t len = std::min(kTile, hi - k0);
          const float* x = as_float_tile(static_cast<const T*>(model) + k0, xbuf, len);
          const float* b = as_float_tile(static_cast<const T*>(base) + k0, bbuf, len);
          for (int64_t k = 0; k < len; ++k) {
            const float m = iv[k0 + k] >= thr ? 1.f : 0.f;  // NaN importance or threshold: 0
            acc[k] = b[k] + (x[k] - b[k]) * m;
          }
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
