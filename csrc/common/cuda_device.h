// The device count of the CUDA module, declared without CUDA headers so that the host-compiled
// module_cuda.cpp can bind it (defined in common/cuda_device.cu).
#pragma once

namespace pyops {
namespace cuda_ops {

// cudaGetDeviceCount, or 0 on any error (no driver, no device). Never fails.
int device_count();

}  // namespace cuda_ops
}  // namespace pyops
