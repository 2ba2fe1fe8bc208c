// Ranks of one process that exchange blocks through a shared mailbox: lets a unit test run a
// plan's migrations between two RankCaches (each executing on its own thread) without MPI.
// Only exchange_blocks carries data, which is all RankCache::execute uses; the collectives that
// would need every rank's input refuse, so a test that needs them fails loudly.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "kvfabric/transport/transport.h"

namespace kvfabric::testing {

//! What the ranks of one test have sent one another and not yet received.
class Mailbox {
 public:
  void post(int from, int to, const uint8_t* block, uint64_t bytes) {
    {
      std::lock_guard lock(mutex_);
      queues_[{from, to}].emplace_back(block, block + bytes);
    }
    arrived_.notify_all();
  }

  //! The next block `from` sent `to`, into `block`; an error after `timeout` or on a size
  //! that is not `bytes`.
  Status take(int from, int to, uint8_t* block, uint64_t bytes, std::chrono::seconds timeout) {
    std::unique_lock lock(mutex_);
    auto& queue = queues_[{from, to}];
    if (!arrived_.wait_for(lock, timeout, [&] { return !queue.empty(); })) {
      return Status(ErrorCode::kUnavailable, "mailbox: R" + std::to_string(to) +
                                                 " waited in vain for a block from R" +
                                                 std::to_string(from));
    }
    if (queue.front().size() != bytes) {
      return invalid_argument("mailbox: R" + std::to_string(from) + " sent " +
                              std::to_string(queue.front().size()) + " bytes, R" +
                              std::to_string(to) + " expects " + std::to_string(bytes));
    }
    std::memcpy(block, queue.front().data(), bytes);
    queue.pop_front();
    return ok_status();
  }

 private:
  std::mutex mutex_;
  std::condition_variable arrived_;
  std::map<std::pair<int, int>, std::deque<std::vector<uint8_t>>> queues_;  // (from, to)
};

class MailboxTransport final : public Transport {
 public:
  MailboxTransport(Mailbox& mailbox, int rank, int world_size)
      : mailbox_(&mailbox), rank_(rank), world_size_(world_size) {}

  std::string_view name() const override { return "mailbox"; }
  RankId rank() const override { return RankId{rank_}; }
  int world_size() const override { return world_size_; }

  Status exchange_blocks(std::span<const BlockBatch> sends,
                         std::span<const BlockBatch> recvs) override {
    for (const BlockBatch& batch : sends) {
      for (uint8_t* block : batch.blocks)
        mailbox_->post(rank_, batch.peer.value, block, batch.block_bytes);
    }
    for (const BlockBatch& batch : recvs) {
      for (uint8_t* block : batch.blocks) {
        KVF_RETURN_IF_ERROR(mailbox_->take(batch.peer.value, rank_, block, batch.block_bytes,
                                           std::chrono::seconds(30)));
      }
    }
    return ok_status();
  }

  Status broadcast(std::vector<uint8_t>&, RankId) override { return refused("broadcast"); }
  Status barrier() override { return refused("barrier"); }
  Status all_gather(uint64_t, std::vector<uint64_t>&) override { return refused("all_gather"); }
  Status gather(std::span<const uint8_t>, RankId, std::vector<std::vector<uint8_t>>&) override {
    return refused("gather");
  }
  void set_timeout(std::optional<std::chrono::milliseconds>) override {}

 private:
  static Status refused(const std::string& what) {
    return Status(ErrorCode::kInvalidOperation, "mailbox transport: " + what +
                                                    " needs every rank's input; it carries "
                                                    "blocks only");
  }

  Mailbox* mailbox_;
  int rank_, world_size_;
};

}  // namespace kvfabric::testing
