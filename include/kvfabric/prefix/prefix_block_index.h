// The block-granular prefix index of one paged pool (automatic prefix caching).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "kvfabric/block/block_retainer.h"
#include "kvfabric/common/status.h"
#include "kvfabric/prefix/radix_tree.h"

namespace kvfabric {

//! Where a placement's blocks are stored.
enum class StorageTier : uint8_t {
  kDevice,  //!< GPU memory (host memory for the CPU backend)
  kHost,    //!< the host swap tier
};
std::string_view storage_tier_name(StorageTier tier);

//! \brief Where one radix node's blocks live: a replica, a tier, and one block per `block_size`
//! tokens of the node's edge (the last one partly filled when the node ends a key mid-block).
//! An index of one pool records that pool's location; a coordinator's tree can keep one per
//! replica.
struct BlockPlacement {
  uint32_t replica = 0;
  StorageTier tier = StorageTier::kDevice;
  std::vector<BlockId> blocks;

  friend bool operator==(const BlockPlacement&, const BlockPlacement&) = default;
};

//! How a node's placement splits with its edge; the tree weighs a node by its block count.
struct BlockPlacementTraits {
  size_t bytes(const BlockPlacement& p) const { return p.blocks.size(); }
  std::optional<BlockPlacement> split_front(BlockPlacement& p, size_t units) const;
};

//! \brief Settings of a PrefixBlockIndex.
struct PrefixIndexOptions {
  //! Tokens per block. 0 = the pool's (PagedPrefixCache); a standalone index needs a value.
  uint32_t block_size = 0;
  RadixEvictionOrder order = RadixEvictionOrder::kLru;
  //! Also index a sequence's partly filled last block, which then matches only a query ending
  //! with exactly the same tokens (a repeated prompt). The block is shared like any cached
  //! block, so the sequence that next writes into it copies it first (copy-on-write). Off by
  //! default: like vLLM and SGLang, only full blocks are cached.
  bool cache_partial_blocks = false;
  //! Where this index's blocks live (recorded in every node's placement).
  uint32_t replica = 0;
  StorageTier tier = StorageTier::kDevice;
  //! Bytes of one block on this rank, for the bytes statistic (PagedKvCache::block_memory_bytes).
  size_t block_bytes = 0;
};

//! \brief Counters of a PrefixBlockIndex. A lookup is one match() call.
struct PrefixIndexStats {
  uint64_t lookups = 0;
  uint64_t lookup_tokens = 0;  //!< tokens of all looked-up queries
  uint64_t hit_tokens = 0;     //!< of those, tokens served from cached blocks
  uint64_t hit_blocks = 0;
  uint64_t insertions = 0;       //!< insert() calls
  uint64_t inserted_blocks = 0;  //!< blocks newly indexed
  uint64_t evictions = 0;        //!< nodes (or trailing parts of nodes) evicted
  uint64_t evicted_blocks = 0;

  //! hit tokens / looked-up tokens (0 before the first lookup).
  [[nodiscard]] double hit_ratio() const {
    return lookup_tokens == 0
               ? 0.0
               : static_cast<double>(hit_tokens) / static_cast<double>(lookup_tokens);
  }
};

//! \brief A cached prefix: the query's first `tokens` tokens live in `blocks` (whole blocks,
//! except a partly filled last block that ends exactly where the query ends).
struct PrefixMatch {
  size_t tokens = 0;
  std::vector<BlockId> blocks;
  //! How many of `blocks` are idle now (no sequence uses them); sharing them makes them used.
  size_t idle_blocks = 0;
};

//! \brief The block-granular prefix index of one paged pool, as SGLang's radix cache with a page
//! size above 1 and vLLM's automatic prefix caching: a RadixTree at block granularity whose
//! nodes hold the blocks of their edge.
//!
//! - match() returns the blocks of the longest cached prefix of a prompt; the block manager
//!   shares them by reference (PagedKvCache::allocate_shared), so a hit copies nothing.
//! - insert() indexes a sequence's full blocks after prefill; the caller takes one reference on
//!   each newly indexed block (PagedKvCache::retain_block).
//! - As a BlockRetainer it learns when a cached block loses its last sequence (it is then idle)
//!   or gains one, and gives idle blocks back, least recently used leaf first (or lowest
//!   priority), trimming a leaf from its end, when the pool runs short.
//!
//! A node is pinned once per block of it that some sequence uses, so only nodes whose blocks
//! are all idle can be evicted (after their descendants). idle_blocks() is exact: the blocks of
//! unpinned nodes. Not thread-safe.
class PrefixBlockIndex final : public BlockRetainer {
 public:
  //! Host memory per block of the pool (the node holding it and the node it is pinned at).
  static constexpr uint64_t kBytesPerBlock = 2 * sizeof(RadixNodeId);

  //! An index for a pool of `num_blocks` blocks (ids 0 .. num_blocks - 1). InvalidArgument for a
  //! block size of 0.
  static Result<std::unique_ptr<PrefixBlockIndex>> create(const PrefixIndexOptions& options,
                                                          uint32_t num_blocks);

  [[nodiscard]] const PrefixIndexOptions& options() const { return options_; }
  [[nodiscard]] uint32_t block_size() const { return options_.block_size; }

  //! The longest cached prefix of `tokens`; changes nothing and counts nothing.
  [[nodiscard]] PrefixMatch peek(std::span<const TokenId> tokens) const;
  //! peek() with the unit keys `tokens` already computed (a prompt looked up in several indexes).
  [[nodiscard]] PrefixMatch peek(const RadixKey& tokens) const;
  //! Same, as a lookup: counts it in the statistics, marks the matched path used now (LRU), and
  //! splits the last node where the match ends so that its unmatched rest stays evictable.
  PrefixMatch match(std::span<const TokenId> tokens);
  //! match() that first shows the result to `admit`; an error from it is returned and the lookup
  //! changes nothing (no split, no refresh, not counted). One walk of the tree either way.
  Result<PrefixMatch> match_if(std::span<const TokenId> tokens,
                               const std::function<Status(const PrefixMatch&)>& admit);
  Result<PrefixMatch> match_if(const RadixKey& tokens,
                               const std::function<Status(const PrefixMatch&)>& admit);

  //! Indexes the blocks of a sequence holding `tokens`: blocks[i] holds tokens [i * block_size,
  //! (i + 1) * block_size). Only full blocks are indexed (and the partly filled last one with
  //! cache_partial_blocks). Where the prefix is already cached, the cached blocks stay and the
  //! sequence's copies are not indexed. Raises the priority of the path to at least `priority`.
  //! Returns the newly indexed blocks: they count as used (the sequence holds them), and the
  //! caller must take a reference on each. Errors (nothing changes): too few blocks, a block id
  //! outside the pool, a new block that is already indexed or listed twice.
  Result<std::vector<BlockId>> insert(std::span<const TokenId> tokens,
                                      std::span<const BlockId> blocks, uint32_t priority = 0);
  //! insert() of a key that may be salted: its blocks match only keys of the same salt (those
  //! of its public range match every key with the same public tokens).
  Result<std::vector<BlockId>> insert(const RadixKey& key, std::span<const BlockId> blocks,
                                      uint32_t priority = 0);

  //! Where the blocks of the longest cached prefix of `tokens` live, one placement per node.
  [[nodiscard]] std::vector<BlockPlacement> placements(std::span<const TokenId> tokens) const;
  [[nodiscard]] std::vector<BlockPlacement> placements(const RadixKey& key) const;

  //! Forgets every block and returns them; the caller drops its references.
  std::vector<BlockId> clear();

  // BlockRetainer: called by the pool. A notification for a block the index does not hold in
  // the stated state is a broken pool-index invariant and aborts (KVF_CHECK).
  [[nodiscard]] size_t idle_blocks() const override { return tree_.evictable_bytes(); }
  std::vector<BlockId> release_idle(size_t count) override;
  void on_block_used(BlockId block) override;
  void on_block_idle(BlockId block) override;

  [[nodiscard]] const PrefixIndexStats& stats() const { return stats_; }
  //! Blocks in the index.
  [[nodiscard]] size_t cached_blocks() const { return tree_.bytes(); }
  //! Indexed blocks some sequence uses.
  [[nodiscard]] size_t used_blocks() const { return used_blocks_; }
  //! cached_blocks() * block_bytes.
  [[nodiscard]] size_t bytes() const { return cached_blocks() * options_.block_bytes; }
  [[nodiscard]] size_t node_count() const { return tree_.node_count(); }
  [[nodiscard]] bool is_indexed(BlockId block) const {
    return block.value < node_of_.size() && tree_.find(node_of_[block.value]) != nullptr;
  }

  //! Checks the tree and that every block maps back to its node and pins. For tests.
  [[nodiscard]] Status verify() const;

 private:
  using Tree = RadixTree<BlockPlacement, BlockPlacementTraits>;
  static constexpr RadixNodeId kNoNode{UINT32_MAX, UINT32_MAX};

  PrefixBlockIndex(const PrefixIndexOptions& options, uint32_t num_blocks);
  //! Points node_of_ at `node` for every block it holds (after a split moved them there).
  void adopt_blocks(RadixNodeId node);
  //! Collects the blocks of the path ending at `node`, plus the first `partial_blocks` of
  //! `partial`; counts those of unpinned nodes as idle.
  PrefixMatch collect(RadixNodeId node, std::optional<RadixNodeId> partial,
                      size_t partial_blocks) const;

  PrefixIndexOptions options_;
  Tree tree_;
  std::vector<RadixNodeId> node_of_;    // block -> node holding it (kNoNode: not indexed)
  std::vector<RadixNodeId> pinned_at_;  // block -> node pinned for its use (kNoNode: idle)
  size_t used_blocks_ = 0;
  PrefixIndexStats stats_;
};

}  // namespace kvfabric
