// Fused expert routing on CUDA (torch-free; docs/design.md#the-native-core-is-torch-free). Contract: moe/routing_cuda.h.
//
// Three kernels and no float atomics, so the result is deterministic and equal, bit for bit, to
// the CPU kernel (moe/routing.cpp):
//
// 1. topk_kernel: one thread per token, tiles of kTile tokens per CTA. The thread reads its row
//    (max, then exp and an 8-lane sum: lane e mod 8 adds in increasing e, lanes combined as
//    ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)), exactly the CPU's vector lanes), then selects the top k
//    keys by insertion (strictly larger keys enter; equal keys stay behind: lower expert index
//    first). The insertion buffer is the token's own output rows (keys in `weights`, ids in
//    `experts`), so any k works; weights are recomputed from the logits at the end. With groups
//    (n_group G > 0) the thread first scores its G groups (top1 + top2 key, into a T * G
//    workspace row), keeps the M best (M sweeps, ties to the lower group index, flags in a second
//    T * G row), and the insertion skips the experts of the other groups. Every
//    floating-point operation is an explicit _rn intrinsic (never contracted into an fma), with
//    the CPU's constants and order. Each CTA counts its tile's assignments per expert with
//    integer atomics into hist[tile][e] (exact, order-independent).
// 2. scan_kernel (one CTA): hist[tile][e] becomes the first write position of the tile's
//    assignments to expert e: offsets[e] + the counts of the earlier tiles. offsets[E] carries
//    the NaN/inf report (routing_cuda.h).
// 3. scatter_kernel: one warp per tile walks the tile's assignments a = t*k + j in increasing
//    order, 32 at a time; __match_any_sync ranks equal experts among lower lanes, so order[] gets
//    a stable counting sort; capacity flags come from the position within the expert's slice.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "moe/routing_cuda.h"
#include "moe/route_args.h"

namespace pyops {
namespace cuda_ops {
namespace {

constexpr int kTile = 256;  // tokens per CTA (topk) and per scatter warp; threads per topk CTA
constexpr int kScanThreads = 1024;
constexpr long long kNoBadToken = 0x7f7f7f7f7f7f7f7fLL;  // what cudaMemsetAsync(0x7f) leaves

struct RF32 {
  using S = float;
  __device__ __forceinline__ static float to_f(S x) { return x; }
};
struct RF16 {
  using S = __half;
  __device__ __forceinline__ static float to_f(S x) { return __half2float(x); }
};
struct RBF16 {
  using S = __nv_bfloat16;
  __device__ __forceinline__ static float to_f(S x) { return __bfloat162float(x); }
};

// exp_f of moe/fp32_math.h, operation for operation (see there for the derivation).
__device__ __forceinline__ float exp_rn(float x) {
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  const float t = __fmul_rn(x, 1.44269504088896341f);
  const float nf = __fsub_rn(__fadd_rn(t, 12582912.0f), 12582912.0f);
  float r = __fsub_rn(x, __fmul_rn(nf, 0.693145751953125f));
  r = __fsub_rn(r, __fmul_rn(nf, 1.42860682030941723212e-6f));
  float p = 1.98412698412698413e-4f;
  p = __fadd_rn(__fmul_rn(p, r), 1.38888888888888889e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 8.33333333333333333e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 4.16666666666666667e-2f);
  p = __fadd_rn(__fmul_rn(p, r), 1.66666666666666667e-1f);
  p = __fadd_rn(__fmul_rn(p, r), 0.5f);
  p = __fadd_rn(__fmul_rn(p, r), 1.0f);
  p = __fadd_rn(__fmul_rn(p, r), 1.0f);
  const int n = __float2int_rz(nf);  // nf is an integer in [-150, 128]
  const int n1 = n >> 1;
  const float s1 = __int_as_float((n1 + 127) << 23);
  const float s2 = __int_as_float((n - n1 + 127) << 23);
  return __fmul_rn(__fmul_rn(p, s1), s2);
}

struct RouteParams {
  const void* logits;
  int64_t T, E, k;
  int score;  // 0 softmax, 1 sigmoid
  bool renormalize;
  const float* bias;
  int64_t capacity;
  int64_t G, M;        // group-limited routing (G = 0: none)
  float scale;         // routed_scaling
  float* gscore;       // [T, G] group scores (G > 0)
  uint8_t* gkept;      // [T, G] kept flags (G > 0)
  float* weights;
  int32_t* experts;
  int64_t* order;
  int64_t* offsets;
  uint8_t* dropped;
  unsigned long long* hist;  // [n_tiles, E]: counts, then write cursors
  long long* bad_token;      // smallest token with a non-finite logit, or kNoBadToken
  int64_t n_tiles;
};

// Score of expert e for a row (softmax: m = row max, sum = the lane sum; sigmoid: unused).
template <class D>
__device__ __forceinline__ float score_of(const typename D::S* row, int64_t e, int score, float m,
                                          float sum) {
  const float z = D::to_f(row[e]);
  if (score == 0) return __fdiv_rn(exp_rn(__fsub_rn(z, m)), sum);
  return __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_rn(-z)));
}

template <class D>
__global__ void __launch_bounds__(kTile) topk_kernel(RouteParams p) {
  const int64_t t = (int64_t)blockIdx.x * kTile + threadIdx.x;
  if (t >= p.T) return;
  const int64_t E = p.E, k = p.k;
  const typename D::S* row = static_cast<const typename D::S*>(p.logits) + t * E;
  float* key = p.weights + t * k;  // the insertion buffer: keys here, ids in `experts`
  int32_t* idx = p.experts + t * k;
  unsigned long long* hist = p.hist + (int64_t)blockIdx.x * E;

  bool finite = true;
  float m = D::to_f(row[0]);
  for (int64_t e = 0; e < E; ++e) {
    const float z = D::to_f(row[e]);
    finite = finite && isfinite(z);
    m = m < z ? z : m;
  }
  if (!finite) {
    atomicMin(p.bad_token, (long long)t);
    for (int64_t j = 0; j < k; ++j) {  // keep every later index in range
      idx[j] = (int32_t)j;
      key[j] = 0.0f;
      atomicAdd(hist + j, 1ULL);
    }
    return;
  }
  float sum = 0.0f;
  if (p.score == 0) {
    float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t e = 0; e < E; ++e)
      lanes[e & 7] = __fadd_rn(lanes[e & 7], exp_rn(__fsub_rn(D::to_f(row[e]), m)));
    sum = __fadd_rn(__fadd_rn(__fadd_rn(lanes[0], lanes[1]), __fadd_rn(lanes[2], lanes[3])),
                    __fadd_rn(__fadd_rn(lanes[4], lanes[5]), __fadd_rn(lanes[6], lanes[7])));
  }
  const int64_t G = p.G, gsize = G > 0 ? E / G : E;
  uint8_t* kept = G > 0 ? p.gkept + t * G : nullptr;
  if (G > 0) {
    // Group scores: top1 + top2 of the group's keys (the keys below, bit for bit), top1 alone
    // for one-expert groups; then the M largest, ties to the lower group index (moe/routing.cpp).
    float* gs = p.gscore + t * G;
    for (int64_t g = 0; g < G; ++g) {
      float t1 = -__int_as_float(0x7f800000), t2 = t1;  // -inf
      for (int64_t e = g * gsize; e < (g + 1) * gsize; ++e) {
        float v = score_of<D>(row, e, p.score, m, sum);
        if (p.bias) v = __fadd_rn(v, __ldg(p.bias + e));
        const float lo = t1 < v ? t1 : v;
        t2 = t2 < lo ? lo : t2;
        t1 = t1 < v ? v : t1;
      }
      gs[g] = gsize == 1 ? t1 : __fadd_rn(t1, t2);
      kept[g] = 0;
    }
    for (int64_t j = 0; j < p.M; ++j) {
      int64_t best = -1;
      for (int64_t g = 0; g < G; ++g)
        if (!kept[g] && (best < 0 || gs[g] > gs[best])) best = g;
      kept[best] = 1;
    }
  }
  float kth = 0.0f;  // key[k - 1] once the buffer is full
  int64_t n = 0;     // keys inserted so far
  for (int64_t e = 0; e < E; ++e) {
    if (G > 0 && !kept[e / gsize]) continue;  // excluded: never chosen (k <= M * E / G kept)
    float v = score_of<D>(row, e, p.score, m, sum);
    if (p.bias) v = __fadd_rn(v, __ldg(p.bias + e));
    int64_t i;
    if (n < k) {
      i = n;
    } else {
      if (!(v > kth)) continue;
      i = k - 1;
    }
    ++n;
    while (i > 0 && key[i - 1] < v) {
      key[i] = key[i - 1];
      idx[i] = idx[i - 1];
      --i;
    }
    key[i] = v;
    idx[i] = (int32_t)e;
    if (n >= k) kth = key[k - 1];
  }
  // Weights: the selected experts' scores (recomputed: the same operations give the same bits),
  // renormalised in j order like the CPU.
  float wsum = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t e = idx[j];
    const float w = score_of<D>(row, e, p.score, m, sum);
    key[j] = w;
    wsum = __fadd_rn(wsum, w);
    atomicAdd(hist + e, 1ULL);
  }
  if (p.renormalize)
    for (int64_t j = 0; j < k; ++j) key[j] = __fdiv_rn(key[j], wsum);
  if (p.scale != 1.0f)
    for (int64_t j = 0; j < k; ++j) key[j] = __fmul_rn(key[j], p.scale);
}

// One CTA: per-expert running sums over the tiles, then the expert offsets.
__global__ void __launch_bounds__(kScanThreads) scan_kernel(RouteParams p) {
  const int64_t E = p.E;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    unsigned long long run = 0;
    for (int64_t b = 0; b < p.n_tiles; ++b) {
      const unsigned long long c = p.hist[b * E + e];
      p.hist[b * E + e] = run;
      run += c;
    }
    p.offsets[e + 1] = (int64_t)run;  // the count, for now
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t acc = 0;
    p.offsets[0] = 0;
    for (int64_t e = 0; e < E; ++e) {
      acc += p.offsets[e + 1];
      p.offsets[e + 1] = acc;
    }
    const long long bad = *p.bad_token;
    if (bad != kNoBadToken) p.offsets[E] = -(int64_t)bad - 1;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    const unsigned long long base = (unsigned long long)p.offsets[e];
    for (int64_t b = 0; b < p.n_tiles; ++b) p.hist[b * E + e] += base;
  }
}

// One warp per tile: stable scatter of the tile's assignments, 32 at a time.
__global__ void __launch_bounds__(32) scatter_kernel(RouteParams p) {
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x;
  const int64_t a0 = b * kTile * p.k;
  const int64_t a1 = min(p.T, (b + 1) * (int64_t)kTile) * p.k;
  unsigned long long* cur = p.hist + b * p.E;
  const unsigned lower = (1u << lane) - 1u;  // lanes below this one
  for (int64_t base = a0; base < a1; base += 32) {
    const int64_t a = base + lane;
    const bool valid = a < a1;
    const int e = valid ? p.experts[a] : -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);
    if (valid) {
      const int64_t pos = (int64_t)cur[e] + __popc(same & lower);
      p.order[pos] = a;
      p.dropped[a] = (uint8_t)(p.capacity >= 0 && pos - p.offsets[e] >= p.capacity);
    }
    __syncwarp();
    if (valid && (__ffs(same) - 1) == lane) cur[e] += (unsigned long long)__popc(same);
    __syncwarp();
  }
}

Status cuda_error(const std::string& what, cudaError_t e) {
  (void)cudaGetLastError();
  return Status{StatusCode::kInternal, "moe_route: " + what + ": " + cudaGetErrorString(e)};
}

}  // namespace

Status moe_route(const void* logits, int dtype, int64_t T, int64_t E, int64_t k, int score,
                 bool renormalize, const void* bias, int64_t capacity, int64_t n_group,
                 int64_t topk_group, float routed_scaling, void* weights, void* experts,
                 void* order, void* offsets, void* dropped, void* stream) {
  if (dtype < 0 || dtype > 2) return Status::invalid("dtype: unknown dtype code " + std::to_string(dtype));
  {
    Status st = moe_args::check_route(T, E, k, score, capacity, n_group, topk_group, routed_scaling);
    if (!st.is_ok()) return st;
  }
  if (offsets == nullptr) return Status::invalid("offsets: null pointer");
  if (T > 0 && (logits == nullptr || weights == nullptr || experts == nullptr || order == nullptr ||
                dropped == nullptr))
    return Status::invalid("moe_route: null data pointer");

  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  RouteParams p;
  p.logits = logits;
  p.T = T;
  p.E = E;
  p.k = k;
  p.score = score;
  p.renormalize = renormalize;
  p.bias = static_cast<const float*>(bias);
  p.capacity = capacity;
  p.G = n_group;
  p.M = topk_group;
  p.scale = routed_scaling;
  p.weights = static_cast<float*>(weights);
  p.experts = static_cast<int32_t*>(experts);
  p.order = static_cast<int64_t*>(order);
  p.offsets = static_cast<int64_t*>(offsets);
  p.dropped = static_cast<uint8_t*>(dropped);
  p.n_tiles = (T + kTile - 1) / kTile;

  // Workspace: hist [n_tiles * E], the bad-token flag, then (groups) scores [T, G] and flags [T, G].
  const size_t hist_bytes = (size_t)(p.n_tiles * E) * sizeof(unsigned long long);
  const size_t group_bytes = (size_t)(T * n_group) * (sizeof(float) + sizeof(uint8_t));
  void* ws = nullptr;
  cudaError_t err = cudaMallocAsync(&ws, hist_bytes + sizeof(long long) + group_bytes, s);
  if (err != cudaSuccess) return cuda_error("cudaMallocAsync", err);
  p.hist = static_cast<unsigned long long*>(ws);
  p.bad_token = reinterpret_cast<long long*>(static_cast<char*>(ws) + hist_bytes);
  p.gscore = reinterpret_cast<float*>(static_cast<char*>(ws) + hist_bytes + sizeof(long long));
  p.gkept = reinterpret_cast<uint8_t*>(p.gscore + T * n_group);
  Status st = Status::ok();
  do {
    if (hist_bytes) {
      err = cudaMemsetAsync(p.hist, 0, hist_bytes, s);
      if (err != cudaSuccess) { st = cuda_error("cudaMemsetAsync", err); break; }
    }
    err = cudaMemsetAsync(p.bad_token, 0x7f, sizeof(long long), s);
    if (err != cudaSuccess) { st = cuda_error("cudaMemsetAsync", err); break; }
    if (p.n_tiles > 0) {
      switch (dtype) {
        case 1: topk_kernel<RF16><<<(unsigned)p.n_tiles, kTile, 0, s>>>(p); break;
        case 2: topk_kernel<RBF16><<<(unsigned)p.n_tiles, kTile, 0, s>>>(p); break;
        default: topk_kernel<RF32><<<(unsigned)p.n_tiles, kTile, 0, s>>>(p); break;
      }
      err = cudaGetLastError();
      if (err != cudaSuccess) { st = cuda_error("launching topk_kernel", err); break; }
    }
    scan_kernel<<<1, kScanThreads, 0, s>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) { st = cuda_error("launching scan_kernel", err); break; }
    if (p.n_tiles > 0) {
      scatter_kernel<<<(unsigned)p.n_tiles, 32, 0, s>>>(p);
      err = cudaGetLastError();
      if (err != cudaSuccess) { st = cuda_error("launching scatter_kernel", err); break; }
    }
  } while (false);
  err = cudaFreeAsync(ws, s);
  if (st.is_ok() && err != cudaSuccess) st = cuda_error("cudaFreeAsync", err);
  return st;
}

}  // namespace cuda_ops
}  // namespace pyops
