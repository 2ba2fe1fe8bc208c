// Moving KV blocks and small control messages between the ranks of a kvfabric job.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvfabric/common/ids.h"
#include "kvfabric/common/status.h"

namespace kvfabric {

class Backend;

//! \brief Blocks to send to, or receive from, one peer: `blocks` are the addresses of equally
//! sized blocks (`block_bytes` each) in memory the transport can read or write (host memory for
//! the MPI and local transports, device memory for NCCL). The i-th sent block of a batch lands in
//! the i-th received block of the matching batch on the peer. A batch without blocks moves
//! nothing (its `block_bytes` is ignored); one with blocks needs `block_bytes` > 0 and no null
//! block.
struct BlockBatch {
  RankId peer;
  std::span<uint8_t* const> blocks;
  uint64_t block_bytes = 0;
};

//! \brief The communication a distributed kvfabric job needs (DESIGN.md §2, §5): batched block
//! transfers between ranks (one message per peer and batch, never one per block), broadcast of
//! plan bytes, a gather of reports to one rank, a barrier and an all-gather of small values. Every
//! call is collective or paired as its comment says; errors name this rank, the peer and the
//! MPI/NCCL error string.
//!
//! Timeouts (set_timeout): a call that has waited that long for its peers gives up with
//! Unavailable naming the ranks that do not answer. Messages still in flight cannot be withdrawn,
//! so a transport that timed out refuses every later call with the same error: the job must end.
class Transport {
 public:
  virtual ~Transport() = default;

  [[nodiscard]] virtual std::string_view name() const = 0;
  [[nodiscard]] virtual RankId rank() const = 0;
  [[nodiscard]] virtual int world_size() const = 0;

  //! Posts every receive and send of the batch at once and returns when all have completed.
  //! Ranks that exchange with each other call this in the same step with matching batches
  //! (same block count and size in each direction); a rank may appear in both lists.
  //!
  //! Rules every transport checks before it moves anything (a violation is InvalidArgument
  //! naming this rank, the batch and the peer, and nothing is sent or written):
  //! - every peer is a rank of the world, `[0, world_size())`;
  //! - a batch with blocks has `block_bytes` > 0, no null block, and fewer than 2^31 blocks;
  //! - no received block overlaps another received block or a sent block (sent blocks may
  //!   overlap each other: they are only read);
  //! - batches a rank sends to itself pair with its batches from itself in list order, with the
  //!   same block count and size.
  //! Several batches to (or from) the same peer pair with the peer's batches in list order.
  //! A mismatch between two ranks (different block counts or sizes) is reported by the receiver
  //! as an error naming both ranks and both sizes; a batch that has no counterpart on the peer
  //! at all cannot be detected locally and blocks, as an unmatched MPI receive does.
  virtual Status exchange_blocks(std::span<const BlockBatch> sends,
                                 std::span<const BlockBatch> recvs) = 0;
  //! Collective: on return every rank's `bytes` equals the root's (resized to its length).
  virtual Status broadcast(std::vector<uint8_t>& bytes, RankId root) = 0;
  //! Collective.
  virtual Status barrier() = 0;
  //! Collective: `out` receives `value` of every rank, in rank order.
  virtual Status all_gather(uint64_t value, std::vector<uint64_t>& out) = 0;
  //! Collective, point to point: `root` receives every rank's `bytes` (its own included) in rank
  //! order in `out`; the other ranks send theirs and leave `out` empty. Sent one message per rank,
  //! so a timeout on the root names exactly the ranks whose bytes did not arrive.
  virtual Status gather(std::span<const uint8_t> bytes, RankId root,
                        std::vector<std::vector<uint8_t>>& out) = 0;

  //! Bounds this rank's later blocking calls (see the class comment); nullopt, the default,
  //! waits for ever.
  virtual void set_timeout(std::optional<std::chrono::milliseconds> timeout) = 0;
  //! How messages name `rank`: "rank 3", with its host where the transport knows it
  //! ("rank 3 on node-b").
  [[nodiscard]] virtual std::string describe(RankId rank) const {
    return "rank " + std::to_string(rank.value);
  }
};

//! One process, world size 1 (rank R0): sends to itself are copied into its own receives with
//! memcpy, so its blocks must be host memory (or memory the host can address). broadcast,
//! barrier, all_gather and gather are trivial, and nothing ever waits (timeouts do not apply).
//! Useful for single-process runs and tests.
std::unique_ptr<Transport> make_local_transport();

}  // namespace kvfabric
