#include "common/device_probe.h"

#include <cuda_runtime.h>

#include <string>

#include "common/cuda_check.cuh"

namespace kvfabric::kernels {
namespace {

// out: [n]
__global__ void probe_kernel(float* out, int n, float scale) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<float>(i) * scale;
}

}  // namespace

Result<std::vector<DeviceInfo>> list_devices() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return Status(ErrorCode::kUnavailable,
                  std::string("no usable CUDA device: ") + cudaGetErrorString(err));
  }
  if (count == 0) return Status(ErrorCode::kUnavailable, "no CUDA device is visible");
  std::vector<DeviceInfo> devices;
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    KVF_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, d), d);
    devices.push_back(DeviceInfo{d, prop.name, prop.major, prop.minor, prop.totalGlobalMem});
  }
  return devices;
}

Result<std::vector<float>> run_probe_kernel(int device, int n, float scale) {
  if (n <= 0) return invalid_argument("probe kernel needs n > 0 (got " + std::to_string(n) + ")");
  KVF_CUDA_RETURN_IF_ERROR(cudaSetDevice(device), device);
  float* buffer = nullptr;
  KVF_CUDA_RETURN_IF_ERROR(cudaMalloc(&buffer, sizeof(float) * n), device);
  probe_kernel<<<(n + 255) / 256, 256>>>(buffer, n, scale);
  std::vector<float> host(n);
  const cudaError_t launch = cudaGetLastError();
  const cudaError_t copy =
      cudaMemcpy(host.data(), buffer, sizeof(float) * n, cudaMemcpyDeviceToHost);
  cudaFree(buffer);
  KVF_CUDA_RETURN_IF_ERROR(launch, device);
  KVF_CUDA_RETURN_IF_ERROR(copy, device);
  return host;
}

}  // namespace kvfabric::kernels
