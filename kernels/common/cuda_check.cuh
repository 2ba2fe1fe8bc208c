// Converts CUDA runtime errors into Status values that name the call and the device.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "kvfabric/common/status.h"

#define KVF_CUDA_RETURN_IF_ERROR(call, device)                              \
  do {                                                                      \
    const cudaError_t kvf_cuda_err_ = (call);                               \
    if (kvf_cuda_err_ != cudaSuccess) {                                     \
      return ::kvfabric::Status(::kvfabric::ErrorCode::kInternal,           \
                                std::string(#call) + " failed on device " + \
                                    std::to_string(device) + ": " +         \
                                    cudaGetErrorString(kvf_cuda_err_));     \
    }                                                                       \
  } while (0)
