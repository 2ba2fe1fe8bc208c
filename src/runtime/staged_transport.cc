// The host-staged transport: sent blocks are copied from the backend's memory into one pinned
// host staging buffer, the host transport exchanges the staged copies, and received blocks are
// copied back. Runs of adjacent blocks move as one copy (a pool's blocks are usually allocated
// in runs), and each direction waits for the backend once rather than once per copy.
#include "kvfabric/runtime/staged_transport.h"

#include <string>
#include <vector>

#include "kvfabric/transport/host_controlled_transport.h"
#include "transport/batch_check.h"

namespace kvfabric {
namespace {

using detail::align_up;
using detail::kStagingGranule;
using detail::kStagingRegionAlign;

class HostStagedTransport final : public HostControlledTransport {
 public:
  HostStagedTransport(Transport& host, Backend& backend)
      : HostControlledTransport(host),
        backend_(backend),
        name_(std::string(host.name()) + " (staged through pinned host memory)"),
        who_(std::string(host.name()) + " transport " + to_string(host.rank()) + " (staged)") {}

  Status reserve(uint64_t bytes) {
    if (bytes <= staging_.bytes()) return ok_status();
    const uint64_t size = align_up(bytes, kStagingGranule);
    staging_.reset();  // freed first: the old and the new buffer are never both held
    auto arena = backend_.allocate_arena(size, Tier::kHost);
    if (!arena.ok()) {
      return Status(arena.status().code(),
                    who_ + ": cannot allocate " + std::to_string(size) +
                        " bytes of pinned host memory to stage blocks through (" +
                        std::string(backend_.name()) + " backend): " + arena.status().message());
    }
    staging_ = std::move(arena).value();
    return ok_status();
  }

  std::string_view name() const override { return name_; }

  Status exchange_blocks(std::span<const BlockBatch> sends,
                         std::span<const BlockBatch> recvs) override {
    // The rules on the callers' addresses: a refused exchange copies and sends nothing.
    KVF_RETURN_IF_ERROR(detail::check_exchange(who_, rank(), world_size(), sends, recvs));
    KVF_ASSIGN_OR_RETURN(const uint64_t bytes, lay_out(sends, recvs));
    KVF_RETURN_IF_ERROR(reserve(bytes));

    // Regions in list order: the sends', then the receives'.
    uint8_t* region = staging_.data();
    staged_sends_.resize(sends.size());
    staged_recvs_.resize(recvs.size());
    send_blocks_.resize(sends.size());
    recv_blocks_.resize(recvs.size());
    for (size_t b = 0; b < sends.size(); ++b)
      region = stage_batch(sends[b], region, send_blocks_[b], staged_sends_[b]);
    for (size_t b = 0; b < recvs.size(); ++b)
      region = stage_batch(recvs[b], region, recv_blocks_[b], staged_recvs_[b]);

    for (size_t b = 0; b < sends.size(); ++b)
      KVF_RETURN_IF_ERROR(copy_runs(b, sends[b], send_blocks_[b], /*download=*/true));
    KVF_RETURN_IF_ERROR(wait("copying the sent blocks into the staging buffer"));

    KVF_RETURN_IF_ERROR(control().exchange_blocks(staged_sends_, staged_recvs_));

    for (size_t b = 0; b < recvs.size(); ++b)
      KVF_RETURN_IF_ERROR(copy_runs(b, recvs[b], recv_blocks_[b], /*download=*/false));
    return wait("copying the received blocks out of the staging buffer");
  }

 private:
  // Staging bytes the exchange needs (every batch's region, aligned).
  Result<uint64_t> lay_out(std::span<const BlockBatch> sends,
                           std::span<const BlockBatch> recvs) const {
    uint64_t total = 0;
    for (const std::span<const BlockBatch> list : {sends, recvs}) {
      for (const BlockBatch& batch : list) {
        const uint64_t region = align_up(detail::batch_bytes(batch), kStagingRegionAlign);
        if (region < detail::batch_bytes(batch) || total + region < total) {
          return invalid_argument(who_ + ": the exchange's blocks overflow 64 bits of staging");
        }
        total += region;
      }
    }
    return total;
  }

  // Points `staged` (peer, size, `blocks`) at consecutive blocks of the region at `region`;
  // returns where the next region starts.
  static uint8_t* stage_batch(const BlockBatch& batch, uint8_t* region,
                              std::vector<uint8_t*>& blocks, BlockBatch& staged) {
    blocks.resize(batch.blocks.size());
    for (size_t i = 0; i < blocks.size(); ++i)
      blocks[i] = region + i * batch.block_bytes;
    staged = BlockBatch{batch.peer, blocks, batch.block_bytes};
    return region + align_up(detail::batch_bytes(batch), kStagingRegionAlign);
  }

  // Copies batch `index` between its blocks and their staged copies (into the staging buffer
  // when `download`: a sent batch; out of it otherwise: a received one), one copy per run of blocks
  // adjacent in the backend's memory; the staged copies are adjacent by construction.
  Status copy_runs(size_t index, const BlockBatch& batch, const std::vector<uint8_t*>& staged,
                   bool download) {
    const uint64_t size = batch.block_bytes;
    for (size_t first = 0; first < batch.blocks.size();) {
      size_t end = first + 1;
      while (end < batch.blocks.size() && batch.blocks[end] == batch.blocks[end - 1] + size)
        ++end;
      const uint64_t bytes = (end - first) * size;
      const Status copied = download
                                ? backend_.copy_bytes(staged[first], batch.blocks[first], bytes)
                                : backend_.copy_bytes(batch.blocks[first], staged[first], bytes);
      if (!copied.ok()) {
        return Status(copied.code(), who_ + ": " + detail::describe_batch(download, index, batch) +
                                         ": copying blocks " + std::to_string(first) + ".." +
                                         std::to_string(end - 1) +
                                         (download ? " into" : " out of") +
                                         " the staging buffer failed: " + copied.message());
      }
      first = end;
    }
    return ok_status();
  }

  Status wait(std::string_view what) {
    const Status s = backend_.synchronize();
    if (s.ok()) return s;
    return Status(s.code(), who_ + ": " + std::string(what) + " failed: " + s.message());
  }

  Backend& backend_;
  const std::string name_;
  const std::string who_;  // how errors name this rank's transport
  KvArena staging_;        // pinned host memory, kept between exchanges
  // The staged batches of the current exchange; kept so their capacity is reused.
  std::vector<BlockBatch> staged_sends_, staged_recvs_;
  std::vector<std::vector<uint8_t*>> send_blocks_, recv_blocks_;
};

}  // namespace

Result<std::unique_ptr<Transport>> make_host_staged_transport(Transport& host, Backend& backend) {
  auto transport = std::make_unique<HostStagedTransport>(host, backend);
  // The first granule now: a rank without pinned memory fails at start, not at its first move.
  KVF_RETURN_IF_ERROR(transport->reserve(kStagingGranule));
  return std::unique_ptr<Transport>(std::move(transport));
}

}  // namespace kvfabric
