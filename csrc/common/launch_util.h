// Host-side helpers shared by the CUDA kernel files: a runtime error as a Status, and the number of
// CTAs of a kernel that fit on the current device at once (the grid of a grid-stride kernel).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "common/status.h"

namespace pyops {
namespace cuda_ops {

// Turns a failed runtime call into a Status, and resets the runtime's last-error state so that
// a non-sticky error is not reported a second time by whoever calls cudaGetLastError next.
inline Status cuda_error(const std::string& what, cudaError_t e) {
  (void)cudaGetLastError();
  return Status{StatusCode::kInternal, what + ": " + cudaGetErrorString(e)};
}

// Resident CTAs of `kernel` at `threads` per CTA on the current device (SMs x CTAs per SM),
// cached per (kernel, device).
inline Status grid_limit(const void* kernel, int threads, int64_t* limit) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return cuda_error("cudaGetDevice", e);
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int64_t> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find({kernel, dev});
    if (it != cache.end()) {
      *limit = it->second;
      return Status::ok();
    }
  }
  int sms = 0, per_sm = 0;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return cuda_error("cudaDeviceGetAttribute", e);
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  if (e != cudaSuccess) return cuda_error("cudaOccupancyMaxActiveBlocksPerMultiprocessor", e);
  *limit = (int64_t)std::max(sms, 1) * std::max(per_sm, 1);
  std::lock_guard<std::mutex> lock(mu);
  cache[{kernel, dev}] = *limit;
  return Status::ok();
}

}  // namespace cuda_ops
}  // namespace pyops
