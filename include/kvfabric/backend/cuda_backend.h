// The CUDA backend: device arenas, a pinned host swap tier and the kernels in kernels/.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvfabric/backend/backend.h"

namespace kvfabric {

struct CudaBackendOptions {
  int device = 0;
  //! append_kv refuses NaN/Inf inputs and values the pool's format would store as infinity or
  //! NaN. The check reads the inputs on the GPU and waits for the answer before writing (one
  //! host-device synchronization per append); turn it off only for inputs known to be finite.
  bool check_finite = true;
  //! The attention calls refuse NaN/Inf queries too (the CPU backend always does). Off by default:
  //! the check would add a host-device synchronization to every attention call (every layer of
  //! every step), which the asynchronous launches exist to avoid; a bad query only spoils its own
  //! outputs, never the cache.
  bool check_finite_queries = false;
};

//! A backend on one CUDA device. Unavailable when there is no usable device, Unimplemented when
//! kvfabric was built without CUDA.
Result<std::unique_ptr<Backend>> make_cuda_backend(const CudaBackendOptions& options = {});

//! Whether this build contains the CUDA backend.
bool cuda_backend_built();

struct CudaDeviceInfo {
  int ordinal = 0;  //!< among the visible devices (after CUDA_VISIBLE_DEVICES)
  std::string name;
  uint64_t memory_bytes = 0;
};
//! The CUDA devices this process sees. Unavailable with the CUDA error string when there is no
//! driver or no device; Unimplemented when kvfabric was built without CUDA.
Result<std::vector<CudaDeviceInfo>> cuda_devices();

}  // namespace kvfabric
