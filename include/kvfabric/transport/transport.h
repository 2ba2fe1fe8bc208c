// Moving KV blocks and small control messages between the ranks of a kvfabric job.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "kvfabric/common/ids.h"
#include "kvfabric/common/status.h"

namespace kvfabric {

class Backend;

//! \brief Blocks to send to, or receive from, one peer: `blocks` are the addresses of equally
//! sized blocks (`block_bytes` each) in memory the transport can read or write (host memory for
//! the MPI transport, device memory for NCCL). The i-th sent block of a batch lands in the i-th
//! received block of the matching batch on the peer.
struct BlockBatch {
  RankId peer;
  std::span<uint8_t* const> blocks;
  uint64_t block_bytes = 0;
};

//! \brief The communication a distributed kvfabric job needs (DESIGN.md §2, §5): batched block
//! transfers between ranks (one message per peer and batch, never one per block), broadcast of
//! plan bytes, a barrier and an all-gather of small values. Every call is collective or paired as
//! its comment says; errors name this rank, the peer and the MPI/NCCL error string.
class Transport {
 public:
  virtual ~Transport() = default;

  [[nodiscard]] virtual std::string_view name() const = 0;
  [[nodiscard]] virtual RankId rank() const = 0;
  [[nodiscard]] virtual int world_size() const = 0;

  //! Posts every receive and send of the batch at once and returns when all have completed.
  //! Ranks that exchange with each other call this in the same step with matching batches
  //! (same block count and size in each direction); a rank may appear in both lists.
  virtual Status exchange_blocks(std::span<const BlockBatch> sends,
                                 std::span<const BlockBatch> recvs) = 0;
  //! Collective: on return every rank's `bytes` equals the root's (resized to its length).
  virtual Status broadcast(std::vector<uint8_t>& bytes, RankId root) = 0;
  //! Collective.
  virtual Status barrier() = 0;
  //! Collective: `out` receives `value` of every rank, in rank order.
  virtual Status all_gather(uint64_t value, std::vector<uint64_t>& out) = 0;
};

//! One process, world size 1: sends to itself are copied into its own receives.
std::unique_ptr<Transport> make_local_transport();

}  // namespace kvfabric
