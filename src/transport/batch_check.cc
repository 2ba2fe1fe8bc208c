#include "transport/batch_check.h"

#include <algorithm>
#include <climits>
#include <limits>
#include <tuple>
#include <vector>

namespace kvfabric::detail {
namespace {

// One block's byte range, and where it came from (for the error message).
struct Extent {
  uintptr_t begin;
  uintptr_t end;
  bool send;
  uint32_t batch;
  uint32_t block;
};

std::string describe_extent(const Extent& e, std::span<const BlockBatch> sends,
                            std::span<const BlockBatch> recvs) {
  const BlockBatch& batch = e.send ? sends[e.batch] : recvs[e.batch];
  return describe_batch(e.send, e.batch, batch) + " block " + std::to_string(e.block) + " [" +
         std::to_string(e.begin) + ", +" + std::to_string(batch.block_bytes) + ")";
}

Status check_batch(std::string_view who, int world_size, bool send, size_t index,
                   const BlockBatch& batch) {
  const std::string prefix = std::string(who) + ": " + describe_batch(send, index, batch);
  if (batch.peer.value < 0 || batch.peer.value >= world_size) {
    return invalid_argument(prefix + ": peer out of range (world size " +
                            std::to_string(world_size) + ", ranks R0..R" +
                            std::to_string(world_size - 1) + ")");
  }
  if (batch.blocks.empty()) return ok_status();
  if (batch.block_bytes == 0) {
    return invalid_argument(prefix + ": " + std::to_string(batch.blocks.size()) +
                            " blocks of 0 bytes");
  }
  if (batch.blocks.size() > static_cast<size_t>(INT_MAX)) {
    return invalid_argument(prefix + ": " + std::to_string(batch.blocks.size()) +
                            " blocks (at most 2^31 - 1 per batch)");
  }
  if (batch.block_bytes > std::numeric_limits<uint64_t>::max() / batch.blocks.size()) {
    return invalid_argument(prefix + ": " + std::to_string(batch.blocks.size()) + " blocks of " +
                            std::to_string(batch.block_bytes) + " bytes overflow 64 bits");
  }
  for (size_t i = 0; i < batch.blocks.size(); ++i) {
    const auto begin = reinterpret_cast<uintptr_t>(batch.blocks[i]);
    if (begin == 0) return invalid_argument(prefix + ": block " + std::to_string(i) + " is null");
    if (batch.block_bytes > std::numeric_limits<uintptr_t>::max() - begin) {
      return invalid_argument(prefix + ": block " + std::to_string(i) +
                              " runs past the end of the address space");
    }
  }
  return ok_status();
}

}  // namespace

std::string describe_batch(bool send, size_t index, const BlockBatch& batch) {
  return std::string(send ? "send batch " : "recv batch ") + std::to_string(index) +
         (send ? " to " : " from ") + to_string(batch.peer) + " (" +
         std::to_string(batch.blocks.size()) + " blocks of " + std::to_string(batch.block_bytes) +
         " bytes)";
}

Status check_exchange(std::string_view who, RankId self, int world_size,
                      std::span<const BlockBatch> sends, std::span<const BlockBatch> recvs) {
  for (size_t i = 0; i < sends.size(); ++i)
    KVF_RETURN_IF_ERROR(check_batch(who, world_size, true, i, sends[i]));
  for (size_t i = 0; i < recvs.size(); ++i)
    KVF_RETURN_IF_ERROR(check_batch(who, world_size, false, i, recvs[i]));

  // Batches to and from this rank itself pair up in list order; both sides are known here.
  std::vector<size_t> self_sends, self_recvs;
  for (size_t i = 0; i < sends.size(); ++i)
    if (sends[i].peer == self) self_sends.push_back(i);
  for (size_t i = 0; i < recvs.size(); ++i)
    if (recvs[i].peer == self) self_recvs.push_back(i);
  if (self_sends.size() != self_recvs.size()) {
    return invalid_argument(std::string(who) + ": sends " + std::to_string(self_sends.size()) +
                            " batches to itself but receives " + std::to_string(self_recvs.size()) +
                            " from itself");
  }
  for (size_t k = 0; k < self_sends.size(); ++k) {
    const BlockBatch& s = sends[self_sends[k]];
    const BlockBatch& r = recvs[self_recvs[k]];
    if (s.blocks.size() != r.blocks.size() || batch_bytes(s) != batch_bytes(r) ||
        (!s.blocks.empty() && s.block_bytes != r.block_bytes)) {
      return invalid_argument(std::string(who) + ": " + describe_batch(true, self_sends[k], s) +
                              " does not match its " + describe_batch(false, self_recvs[k], r));
    }
  }

  // Received blocks must not overlap each other or a sent block. Sorting by start, an extent
  // overlaps an earlier one iff it starts before the largest end seen so far; tracking that
  // maximum over received extents and over all extents finds every overlap involving a
  // received block.
  std::vector<Extent> extents;
  for (const bool send : {true, false}) {
    const std::span<const BlockBatch> list = send ? sends : recvs;
    for (size_t b = 0; b < list.size(); ++b) {
      for (size_t i = 0; i < list[b].blocks.size(); ++i) {
        const auto begin = reinterpret_cast<uintptr_t>(list[b].blocks[i]);
        extents.push_back({begin, begin + list[b].block_bytes, send, static_cast<uint32_t>(b),
                           static_cast<uint32_t>(i)});
      }
    }
  }
  std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) {
    // Fully ordered, so the overlap reported is the same on every run.
    return std::tie(a.begin, a.send, a.batch, a.block) <
           std::tie(b.begin, b.send, b.batch, b.block);
  });
  const Extent* max_all = nullptr;
  const Extent* max_recv = nullptr;
  for (const Extent& e : extents) {
    const Extent* other = nullptr;
    if (max_recv != nullptr && e.begin < max_recv->end) {
      other = max_recv;
    } else if (!e.send && max_all != nullptr && e.begin < max_all->end) {
      other = max_all;
    }
    if (other != nullptr) {
      return invalid_argument(std::string(who) + ": " + describe_extent(e, sends, recvs) +
                              " overlaps " + describe_extent(*other, sends, recvs) +
                              " (received blocks may not overlap any other block)");
    }
    if (max_all == nullptr || e.end > max_all->end) max_all = &e;
    if (!e.send && (max_recv == nullptr || e.end > max_recv->end)) max_recv = &e;
  }
  return ok_status();
}

}  // namespace kvfabric::detail
