// make_cuda_backend for builds without a CUDA compiler: the backend is absent and says so.
#include "kvfabric/backend/cuda_backend.h"

namespace kvfabric {

Result<std::unique_ptr<Backend>> make_cuda_backend(const CudaBackendOptions&) {
  return Status(
      ErrorCode::kUnimplemented,
      "kvfabric was built without CUDA (no nvcc at configure time, or KVF_ENABLE_CUDA=OFF)");
}

bool cuda_backend_built() {
  return false;
}

Result<std::vector<CudaDeviceInfo>> cuda_devices() {
  return Status(ErrorCode::kUnimplemented, "kvfabric was built without CUDA");
}

}  // namespace kvfabric
