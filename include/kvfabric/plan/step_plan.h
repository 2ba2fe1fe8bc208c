// The plan of one serving step: what every rank must do to its KV storage before the forward pass.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvfabric/block/token_copy.h"
#include "kvfabric/common/ids.h"
#include "kvfabric/common/status.h"

namespace kvfabric {

//! \brief One step's storage work (DESIGN.md §5), broadcast by the coordinator and executed by
//! every rank before the forward pass. All shards of a replica run the ops of their replica; a
//! migration runs between shard s of one replica and shard s of another. Block ids are per
//! replica (every shard of a replica uses the same id for the same logical block). A block holds
//! every layer of block_size tokens, or, for a sequence compacted per layer group (PyramidKV),
//! one layer group's layers of groups x block_size tokens: the same bytes, seen through the
//! group's view (layer_group_view()), so one allocator serves both. Token compression adds
//! compactions (copies, then renumbered tables) and requests for the attention scores the next
//! compaction needs.
//!
//! `ops` are in the order the coordinator decided them, and that order is their meaning: a block
//! freed by one op may be reused by a later one in the same step (a swapped-out sequence's blocks
//! take a newcomer's migrated prefix). Executors batch them in waves (plan_waves()): within a wave
//! no two ops touch the same block unless both only read it, so a wave runs as one batched call
//! per kind (swap-out, migrations, swap-in, copies) in that order.
struct StepPlan {
  //! The layer group of a table, copy or compaction that addresses every layer (whole blocks).
  static constexpr uint32_t kAllLayers = UINT32_MAX;

  enum class OpKind : uint8_t {
    kSwapOut,  //!< device block -> host (swap tier) block of `replica`
    kMigrate,  //!< device block of `replica` -> device block of `dst_replica`
    kSwapIn,   //!< host block -> device block of `replica`
    kCopy,     //!< token-range copy inside `replica`'s device pool (copy-on-write, compaction)
  };
  struct Op {
    OpKind kind = OpKind::kCopy;
    uint32_t replica = 0;      //!< where it runs; a migration's source
    uint32_t dst_replica = 0;  //!< a migration's destination (others: equal to replica)
    BlockId src;               //!< swap-out, migration: device; swap-in: host; copy: copy.src_block
    BlockId dst;               //!< swap-out: host; migration, swap-in: device; copy: copy.dst_block
    TokenCopy copy;            //!< copies only
    //! Copies only: the views a copy reads and writes, kAllLayers (whole blocks) or a layer
    //! group. A regrouping copy reads a whole block and writes the group's rows of the token
    //! into a block of the group's view; otherwise both are the same.
    uint32_t from_group = kAllLayers;
    uint32_t to_group = kAllLayers;

    static Op swap_out(uint32_t replica, BlockId device, BlockId host) {
      return {OpKind::kSwapOut, replica, replica, device, host, {}};
    }
    static Op swap_in(uint32_t replica, BlockId host, BlockId device) {
      return {OpKind::kSwapIn, replica, replica, host, device, {}};
    }
    static Op migrate(uint32_t src_replica, BlockId src, uint32_t dst_replica, BlockId dst) {
      return {OpKind::kMigrate, src_replica, dst_replica, src, dst, {}};
    }
    static Op token_copy(uint32_t replica, const TokenCopy& c, uint32_t group = kAllLayers) {
      return {OpKind::kCopy, replica, replica, c.src_block, c.dst_block, c, group, group};
    }
    //! Layer group `group`'s rows of whole-block tokens into the group's view.
    static Op regroup(uint32_t replica, const TokenCopy& c, uint32_t group) {
      return {OpKind::kCopy, replica, replica, c.src_block, c.dst_block, c, kAllLayers, group};
    }
    friend bool operator==(const Op&, const Op&) = default;
  };
  //! A sequence's block table as of this step (new or changed), on the replica that serves it.
  //! Its tokens [computed_tokens, num_tokens) are what this step's forward pass must fill: the
  //! ones before are in place once the plan's ops ran (cached, migrated, swapped back in, or
  //! computed in an earlier step). Every TP worker reads it from the plan, with no side channel.
  //!
  //! A table carries what changed: `blocks` are the table's blocks from index `first_block` on,
  //! and the first `first_block` are those of the sequence's previous table, unchanged (a decode
  //! step that fills a block adds one, and most steps add none). A sequence new to its replica
  //! (admitted, forked, swapped back in or moved there) comes whole, with first_block 0.
  //!
  //! A sequence compacted per layer group has a table per group (layer_group 0 .. groups - 1)
  //! instead of one of every layer: each counts the tokens its group keeps. When it first
  //! becomes one (or comes to a replica as one) the plan lists every group's table, whole.
  struct Table {
    SeqId seq;
    uint32_t replica = 0;
    uint64_t num_tokens = 0;
    uint64_t computed_tokens = 0;  //!< <= num_tokens
    uint32_t first_block = 0;
    std::vector<BlockId> blocks;
    uint32_t layer_group = kAllLayers;
    friend bool operator==(const Table&, const Table&) = default;
  };

  //! Positions [first, first + count) of a sequence.
  struct TokenRange {
    uint64_t first = 0;
    uint64_t count = 0;
    friend bool operator==(const TokenRange&, const TokenRange&) = default;
  };
  //! A sequence the coordinator compacted in this step (token compression): the plan's copies
  //! moved the tokens it keeps, and its table (listed too) holds them. `kept` are the positions
  //! (numbered before the compaction, disjoint) that stay, in their new order: the i-th kept
  //! token is now at position i. The order is not always ascending: H2O and SnapKV fill the
  //! dropped slots with later tokens, so that only those move. The engine renumbers what it
  //! keeps per token (its positions, the ranks' attention scores) the same way.
  //! A compaction per layer group (PyramidKV) lists one per group, each with the group's table.
  struct Compaction {
    SeqId seq;
    uint32_t replica = 0;
    uint64_t tokens_before = 0;
    std::vector<TokenRange> kept;
    uint32_t layer_group = kAllLayers;
    [[nodiscard]] uint64_t tokens_after() const;
    friend bool operator==(const Compaction&, const Compaction&) = default;
  };
  //! A sequence whose attention scores the coordinator needs to compact it: after running this
  //! plan, every shard of `replica` sends its accumulated scores of `seq` with its report
  //! (RankCache::accumulate_attention), and the root sums them.
  struct ScoreRequest {
    SeqId seq;
    uint32_t replica = 0;
    friend bool operator==(const ScoreRequest&, const ScoreRequest&) = default;
  };

  uint64_t step = 0;
  std::vector<Op> ops;
  std::vector<Table> tables;
  std::vector<SeqId> released;   //!< sequences whose tables are gone (freed, swapped, preempted)
  std::vector<SeqId> preempted;  //!< released sequences the engine must recompute from scratch
  std::vector<Compaction> compactions;
  std::vector<ScoreRequest> score_requests;

  [[nodiscard]] bool empty() const {
    return ops.empty() && tables.empty() && released.empty() && preempted.empty() &&
           compactions.empty() && score_requests.empty();
  }
  [[nodiscard]] size_t count(OpKind kind) const;

  //! Compact binary form (little endian, versioned) for the broadcast.
  [[nodiscard]] std::vector<uint8_t> serialize() const;
  //! Parses serialize() output; malformed or truncated bytes are a ParseError naming the field.
  static Result<StepPlan> deserialize(std::span<const uint8_t> bytes);

  //! Why `op` cannot mean an op whatever the pools (a copy reading one layer group and writing
  //! another, a non-copy naming a layer group, a non-migration naming another replica), or ""
  //! when it can. deserialize() refuses such ops, and so does a rank executing a built plan.
  static std::string op_problem(const Op& op);
  //! Why `c`'s kept ranges cannot mean a compaction (empty, outside tokens_before, overlapping,
  //! moving a token to a later slot), or "" when they can.
  static std::string compaction_problem(const Compaction& c);

  friend bool operator==(const StepPlan&, const StepPlan&) = default;
};

//! \brief `table` (the sequence's blocks as of its previous plan table; empty if none) updated
//! by `change`: its first change.first_block blocks stay and change.blocks follow.
//! InvalidArgument (nothing changes) when `table` holds fewer than change.first_block blocks.
Status apply_table_change(std::vector<BlockId>& table, const StepPlan::Table& change);

//! \brief The wave of each op of `ops` (same length): the earliest wave after every earlier op
//! it conflicts with (the same block of the same replica and tier, one of them writing). Copies
//! run in list order inside a wave, so a copy may share a wave with the copies it depends on.
//! Every rank computes the same waves from the same plan, which keeps migrations paired.
std::vector<uint32_t> plan_waves(std::span<const StepPlan::Op> ops);

}  // namespace kvfabric
