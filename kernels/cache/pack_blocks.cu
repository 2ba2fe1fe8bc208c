// Packing scattered blocks into a contiguous staging buffer and unpacking them again, for the
// NCCL transport (src/transport/nccl): a whole exchange is one launch each way.
#include <algorithm>

#include "api.h"

namespace kvfabric::kernels {
namespace {

constexpr unsigned kSpanThreads = 256;
constexpr unsigned kMaxSlices = 64;

// grid (count, slices), block kSpanThreads: CTA (x, y) copies every gridDim.y-th stretch of
// kSpanThreads elements of op x, 16 bytes per element when source, destination and length are
// all 16-byte aligned (KV blocks are), byte by byte otherwise.
__global__ void span_copies_kernel(const SpanCopy* ops) {
  const SpanCopy op = ops[blockIdx.x];
  const uint64_t start = uint64_t{blockIdx.y} * blockDim.x + threadIdx.x;
  const uint64_t stride = uint64_t{gridDim.y} * blockDim.x;
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(op.src) | reinterpret_cast<uintptr_t>(op.dst) | op.bytes) &
       15) == 0;
  if (aligned) {
    const auto* src = reinterpret_cast<const uint4*>(op.src);
    auto* dst = reinterpret_cast<uint4*>(op.dst);
    const uint64_t words = op.bytes / 16;
    for (uint64_t i = start; i < words; i += stride)
      dst[i] = src[i];
  } else {
    for (uint64_t i = start; i < op.bytes; i += stride)
      op.dst[i] = op.src[i];
  }
}

}  // namespace

cudaError_t launch_span_copies(const SpanCopy* ops, uint32_t count, uint64_t max_bytes,
                               cudaStream_t stream) {
  if (count == 0 || max_bytes == 0) return cudaSuccess;
  // Enough CTAs per op that the largest one gets one element per thread, up to kMaxSlices.
  const uint64_t elements = (max_bytes + 15) / 16;
  const unsigned slices = static_cast<unsigned>(
      std::clamp<uint64_t>((elements + kSpanThreads - 1) / kSpanThreads, 1, kMaxSlices));
  span_copies_kernel<<<dim3(count, slices), kSpanThreads, 0, stream>>>(ops);
  return cudaGetLastError();
}

}  // namespace kvfabric::kernels
