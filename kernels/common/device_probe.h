// Host-side questions about the CUDA devices, answerable without including CUDA headers.
#pragma once

#include <string>
#include <vector>

#include "kvfabric/common/status.h"

namespace kvfabric::kernels {

struct DeviceInfo {
  int ordinal = 0;
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  size_t memory_bytes = 0;
};

//! The CUDA devices this process can use; Unavailable (with the CUDA error string) when there is
//! no driver or no device, which is how gpu tests decide to skip.
Result<std::vector<DeviceInfo>> list_devices();

//! Runs one tiny kernel on `device` (out[i] = i * scale) and copies the result back: proves that
//! the toolchain's code runs on this driver and device. Errors name the device and CUDA error.
Result<std::vector<float>> run_probe_kernel(int device, int n, float scale);

}  // namespace kvfabric::kernels
