// The device count of the CUDA module (common/cuda_device.h).
#include <cuda_runtime.h>

#include "common/cuda_device.h"

namespace pyops {
namespace cuda_ops {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the (non-sticky) error so it is not reported later
    return 0;
  }
  return count;
}

}  // namespace cuda_ops
}  // namespace pyops
