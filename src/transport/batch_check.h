// Checks shared by every transport: what exchange_blocks refuses before it moves anything
// (transport.h lists the rules), the byte totals the transports size their messages with, and
// the layout of their staging buffers.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "kvfabric/transport/transport.h"

namespace kvfabric::detail {

//! Bytes a batch moves: its block count times its block size (0 for a batch without blocks).
inline uint64_t batch_bytes(const BlockBatch& batch) {
  return batch.blocks.empty() ? 0 : batch.blocks.size() * batch.block_bytes;
}

//! Staging buffers (NCCL's device staging, the host-staged transport's pinned one) give each
//! batch a region starting on this boundary (cache lines, DMA) ...
inline constexpr uint64_t kStagingRegionAlign = 256;
//! ... and start at, and grow in steps of, this size.
inline constexpr uint64_t kStagingGranule = uint64_t{1} << 20;

inline uint64_t align_up(uint64_t n, uint64_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

//! "send batch 2 to R3" / "recv batch 0 from R1": how error messages name a batch.
std::string describe_batch(bool send, size_t index, const BlockBatch& batch);

//! InvalidArgument (prefixed with `who`, e.g. "mpi transport R2") when `sends`/`recvs` break a
//! rule of Transport::exchange_blocks; OK otherwise. Reads only the batches.
Status check_exchange(std::string_view who, RankId self, int world_size,
                      std::span<const BlockBatch> sends, std::span<const BlockBatch> recvs);

}  // namespace kvfabric::detail
