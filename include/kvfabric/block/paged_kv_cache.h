// The paged block manager: seed cbtop `PagedKvCache`, with its defects fixed (README "Seed API").
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <span>
#include <tuple>
#include <utility>
#include <vector>

#include "kvfabric/block/block_allocator.h"
#include "kvfabric/block/block_retainer.h"
#include "kvfabric/block/eviction_strategy.h"
#include "kvfabric/block/sequence_info.h"
#include "kvfabric/block/token_copy.h"
#include "kvfabric/common/block_layout.h"
#include "kvfabric/common/status.h"
#include "kvfabric/config/config.h"

namespace kvfabric {

//! \brief Where a live sequence's record sits in its PagedKvCache (find_slot()). A caller that
//! keeps its own per-sequence records (the coordinator) remembers it to skip the id lookup on
//! per-token paths; it stays the sequence's until the sequence is freed, and calls that take one
//! also take the SeqId and refuse a slot that holds another sequence.
struct SequenceSlot {
  uint32_t value = UINT32_MAX;
};

namespace detail {
class SequenceTable;
class VictimIndex;
struct CompactionPlan;
}  // namespace detail

//! \brief Block-level bookkeeping of one paged KV pool: which blocks each sequence's tokens live
//! in, reference counts for blocks shared by forks, eviction, and StreamingLLM compaction. It holds
//! no tensors; the copies a storage backend must perform (copy-on-write, compaction) are queued as
//! TokenCopy operations (pending_copies / take_pending_copies).
//!
//! Guarantees:
//! - Every sequence's table has exactly ceil(num_tokens / block_size) blocks.
//! - A write never lands in a block another sequence holds: appending into a shared, partly
//!   filled last block first copies it (copy-on-write).
//! - A failed call returns an error and changes nothing.
//! - Decisions are deterministic: a logical clock orders accesses; ties go to the lower SeqId.
//!
//! Threshold convention: the cache needs eviction when utilization() > threshold, and
//! evict_to_threshold(t) evicts until utilization() <= t.
//!
//! Prefix caching: with a BlockRetainer attached (the prefix module's index), a retained block
//! whose last sequence goes away stays *cached* instead of free; allocate_shared() builds a
//! sequence on cached or live blocks by reference; and any allocation that the free list cannot
//! cover first takes idle cached blocks back from the retainer. Every block is then exactly one
//! of free, cached (retained, no sequence) or used (some sequence holds it):
//! free_block_count() + cached_block_count() + used_block_count() == total_blocks(). Without a
//! retainer nothing is cached and the cache behaves as the seed's.
//!
//! Not thread-safe: one owner (the scheduler or coordinator) calls it.
class PagedKvCache {
 public:
  //! Seed-compatible: fp16 K and V of one layer with `num_heads` heads, so
  //! block_memory_bytes() == 2 * block_size * num_heads * head_dim * 2.
  //! Invalid arguments leave an empty cache whose init_status() says why (see create()).
  PagedKvCache(size_t num_blocks, size_t block_size, size_t num_heads, size_t head_dim);
  //! Sized from a validated config: the per-rank block layout (layers, local KV heads, KV dtype,
  //! quantization metadata), cache.num_blocks or memory_budget, and the eviction settings.
  explicit PagedKvCache(const Config& config);

  //! Checked construction: the error names the bad argument.
  static Result<PagedKvCache> create(size_t num_blocks, size_t block_size, size_t num_heads,
                                     size_t head_dim);
  static Result<PagedKvCache> create(const Config& config);

  PagedKvCache(PagedKvCache&&) noexcept;
  PagedKvCache& operator=(PagedKvCache&&) noexcept;
  ~PagedKvCache();

  //! OK, or why construction failed; every mutating call on such a cache returns this error.
  [[nodiscard]] const Status& init_status() const { return init_status_; }

  // Builders (seed style). An invalid value is logged and leaves the setting unchanged; use the
  // set_* forms to get the error. The threshold is clamped to [0, 1] as in the seed.
  PagedKvCache& with_eviction_strategy(EvictionStrategy strategy) &;
  PagedKvCache&& with_eviction_strategy(EvictionStrategy strategy) &&;
  PagedKvCache& with_eviction_threshold(double threshold) &;
  PagedKvCache&& with_eviction_threshold(double threshold) &&;

  //! Replaces the strategy and reorders the victim index. Errors on invalid parameters.
  Status set_eviction_strategy(EvictionStrategy strategy);
  //! Errors unless 0 <= threshold <= 1.
  Status set_eviction_threshold(double threshold);

  [[nodiscard]] size_t block_size() const { return layout_.block_size; }
  [[nodiscard]] size_t total_blocks() const { return allocator_.total(); }
  //! Blocks on the free list.
  [[nodiscard]] size_t free_block_count() const { return allocator_.free_count(); }
  //! Retained blocks no sequence holds, given back on demand (0 without a retainer).
  [[nodiscard]] size_t cached_block_count() const;
  //! Blocks some sequence holds (or the retainer cannot give back yet).
  [[nodiscard]] size_t used_block_count() const {
    return allocator_.used_count() - cached_block_count();
  }
  //! What an allocation can take: free + cached.
  [[nodiscard]] size_t available_block_count() const {
    return free_block_count() + cached_block_count();
  }
  //! used / total, 0 for an empty pool. Cached blocks do not count: they are not pressure.
  [[nodiscard]] double utilization() const;
  //! Bytes of one block on this rank (BlockLayout::block_bytes).
  [[nodiscard]] size_t block_memory_bytes() const { return layout_.block_bytes(); }
  [[nodiscard]] size_t total_memory_bytes() const { return total_blocks() * block_memory_bytes(); }
  [[nodiscard]] size_t used_memory_bytes() const {
    return used_block_count() * block_memory_bytes();
  }
  //! utilization() > eviction_threshold().
  [[nodiscard]] bool needs_eviction() const;
  [[nodiscard]] double eviction_threshold() const { return threshold_; }
  [[nodiscard]] size_t num_sequences() const;
  //! The sequence's record, or nullptr. Does not count as an access.
  [[nodiscard]] const SequenceInfo* get_sequence(SeqId seq) const;
  //! The slot of a live sequence, nullopt when unknown.
  [[nodiscard]] std::optional<SequenceSlot> find_slot(SeqId seq) const;
  //! get_sequence() at a known slot: nullptr unless the slot holds `seq`.
  [[nodiscard]] const SequenceInfo* get_sequence(SeqId seq, SequenceSlot slot) const;
  [[nodiscard]] const CacheStats& stats() const { return stats_; }
  [[nodiscard]] const EvictionStrategy& eviction_strategy() const { return strategy_; }
  [[nodiscard]] const BlockLayout& block_layout() const { return layout_; }
  //! References on `block` (0 when free or unknown), the retainer's included.
  [[nodiscard]] uint32_t block_ref_count(BlockId block) const {
    return allocator_.ref_count(block);
  }
  //! Whether the retainer holds a reference on `block`.
  [[nodiscard]] bool is_retained(BlockId block) const {
    return block.value < retained_.size() && retained_[block.value];
  }

  //! Attaches the retainer that caches blocks (not owned; it must outlive this cache or be
  //! detached first). nullptr detaches. InvalidOperation while any block is retained.
  Status set_block_retainer(BlockRetainer* retainer);
  [[nodiscard]] BlockRetainer* block_retainer() const { return retainer_; }
  //! Adds the retainer's reference to a block some sequence holds, so that the block stays
  //! cached when its last sequence releases it. Errors: no retainer (InvalidOperation), a block
  //! no sequence holds (BlockNotFound), a block already retained (InvalidOperation).
  Status retain_block(BlockId block);
  //! Gives up to `count` cached blocks back to the free list, in the retainer's eviction order
  //! (ahead of an allocation that would otherwise do it). Returns how many were freed.
  size_t free_cached_blocks(size_t count);
  //! Drops the retainer's reference; the block returns to the free list if no sequence holds it.
  //! The retainer forgets the block itself (no notification). Error BlockNotFound if not retained.
  Status release_retained_block(BlockId block);

  //! Creates `seq` holding `num_tokens` tokens (0 is allowed). Errors: InvalidOperation if it
  //! exists, OutOfMemory if fewer than ceil(num_tokens / block_size) blocks are available.
  Status allocate(SeqId seq, size_t num_tokens);
  //! Creates `seq` holding `num_tokens` tokens whose first blocks are `shared`, taken by
  //! reference (a prefix-cache hit: no copy); the rest are new blocks. Each shared block must be
  //! held by a sequence or retained, appear once, and fit: shared.size() <= ceil(num_tokens /
  //! block_size). A shared last block that is partly filled is copied on the first append.
  //! Errors: as allocate(), plus BlockNotFound / InvalidArgument naming the bad block.
  Status allocate_shared(SeqId seq, size_t num_tokens, std::span<const BlockId> shared);
  //! Adds `num_new_tokens` tokens. If the last block is partly filled and shared, it is first
  //! copied into a private block (a kCopyOnWrite TokenCopy). Appending 0 tokens is a no-op.
  Status append(SeqId seq, size_t num_new_tokens);
  //! append() at a known slot; SequenceNotFound unless the slot holds `seq`.
  Status append(SeqId seq, SequenceSlot slot, size_t num_new_tokens);
  //! Drops the sequence and its references; blocks with no references return to the free list.
  Status free(SeqId seq);
  //! Creates `dst` sharing every block of `src` (no copy until one of them writes).
  //! The fork inherits src's priority.
  Status fork(SeqId src, SeqId dst);
  //! Sets the priority used by the priority strategy; with priority(n) it must be < n.
  Status set_priority(SeqId seq, uint32_t priority);

  //! The sequence evict() would remove, or nullopt when there is none.
  [[nodiscard]] std::optional<SeqId> select_eviction_target() const;
  //! Frees select_eviction_target(). Error NothingToEvict when no sequence exists.
  Result<SeqId> evict();
  //! Evicts, in strategy order but preferring sequences that free at least one block, until
  //! utilization() <= target_util. Returns the evicted ids in order. target_util must be in [0, 1].
  Result<std::vector<SeqId>> evict_to_threshold(double target_util);
  //! Same, with the configured eviction threshold as the target.
  Result<std::vector<SeqId>> evict_to_threshold();

  //! StreamingLLM: keeps tokens [0, sink) and [n - window, n) of an n-token sequence as one
  //! contiguous sequence of sink + window tokens, frees the blocks no longer needed, and queues
  //! kCompaction copies for retained tokens whose slot changed (none when the dropped span is a
  //! whole number of blocks). Returns the number of dropped tokens (0 if n <= sink + window).
  //! Positions change: store K before RoPE or re-rotate, as StreamingLLM requires.
  //! `uncomputed_from`: the kept slots from there on (numbered after the compaction) hold tokens
  //! whose K/V the next forward pass writes; the blocks holding them end up the sequence's own
  //! (shared ones are copied), so that a fork sharing them never gets the compacted sequence's
  //! K/V, which attends to other tokens, in the slots it computes itself.
  Result<size_t> apply_streaming_llm(SeqId seq, size_t sink_tokens, size_t window_tokens,
                                     size_t uncomputed_from = SIZE_MAX);
  //! Same, with the sink and window of the configured streaming_llm strategy.
  Result<size_t> apply_streaming_llm(SeqId seq);

  //! Token-level compression by any selection (H2O heavy hitters, PyramidKV budgets, see
  //! quant/token_selection.h): keeps the tokens at `positions` as one contiguous sequence in that
  //! order (the token at positions[i] goes to slot i), frees the blocks no longer needed, and
  //! queues kCompaction copies for the tokens whose slot changed; shared blocks are copied, never
  //! written. The positions are distinct, below num_tokens, and none moves to a later slot
  //! (positions[i] >= i), so copies in slot order never read a slot already written: increasing
  //! positions qualify, and so does an order that fills dropped slots with later tokens
  //! (quant::fill_dropped_slots), which moves far fewer. Returns the number of dropped tokens.
  //! As with StreamingLLM, positions change. The first `own_blocks` blocks of the new table end up
  //! the sequence's own even where no token moves into them (shared ones are copied), so that
  //! they can be indexed as a compacted prefix; so do the blocks holding the slots from
  //! `uncomputed_from` on, as for apply_streaming_llm.
  Result<size_t> retain_tokens(SeqId seq, std::span<const size_t> positions, size_t own_blocks = 0,
                               size_t uncomputed_from = SIZE_MAX);

  //! Gives `seq` a new table of ceil(num_tokens / block_size) fresh blocks and then releases its
  //! old ones, which the caller's copies may still read (none of them is among the new): a
  //! regrouping, where another view of the same memory decides the new blocks' content (PyramidKV
  //! across ranks). Queues no copies. Errors (nothing changes): SequenceNotFound, OutOfMemory
  //! when fewer blocks are available than the new table takes.
  Status replace_table(SeqId seq, size_t num_tokens);

  //! All sequence ids, ascending.
  [[nodiscard]] std::vector<SeqId> sequence_ids() const;

  //! Copies queued since the last take_pending_copies(), in execution order.
  [[nodiscard]] const std::vector<TokenCopy>& pending_copies() const { return pending_copies_; }
  //! Returns and clears the queued copies.
  std::vector<TokenCopy> take_pending_copies();

  //! Host memory of this bookkeeping: free list and reference counts, retained flags, sequence
  //! records and their tables, the victim order. O(sequences).
  [[nodiscard]] size_t host_memory_bytes() const;

  //! Recounts every reference from the block tables (plus the retainer's) and checks the free
  //! list, the cached count, table sizes and the victim index against them. For tests and
  //! debugging; O(blocks + sequences).
  [[nodiscard]] Status verify_integrity() const;

  //! The seed's multi-line Display text (strategy, blocks, memory in MB, sequences, stats).
  friend std::ostream& operator<<(std::ostream& os, const PagedKvCache& cache);

 private:
  PagedKvCache(BlockLayout layout, uint64_t num_blocks, Status init_status);
  static Result<BlockLayout> seed_layout(size_t block_size, size_t num_heads, size_t head_dim);

  size_t blocks_for(size_t num_tokens) const {
    if (block_shift_ >= 0) return (num_tokens >> block_shift_) + (tail_tokens(num_tokens) != 0);
    return num_tokens / layout_.block_size + (num_tokens % layout_.block_size != 0);
  }
  //! Tokens in the last, partly filled block of `num_tokens` (0 when it is full).
  size_t tail_tokens(size_t num_tokens) const {
    return block_shift_ >= 0 ? num_tokens & (layout_.block_size - 1)
                             : num_tokens % layout_.block_size;
  }
  //! The slot of a live sequence (SequenceTable::kNoSlot when unknown).
  uint32_t slot_of(SeqId seq) const;
  //! Whether `slot` holds the live sequence `seq`.
  bool holds(uint32_t slot, SeqId seq) const;
  Status append_in_slot(uint32_t slot, size_t num_new_tokens);
  using VictimKey = std::tuple<uint64_t, uint64_t, uint32_t>;  // detail::VictimIndex::Key
  //! Records an access to the sequence in `slot`; `key_before_change` is its victim key before
  //! the caller's mutation.
  void touch(uint32_t slot, const VictimKey& key_before_change);
  //! Adds `seq`'s record, filled in by fill(info) (tokens, blocks, priority), and ranks it as
  //! just used.
  template <typename Fill>
  void add_sequence(SeqId seq, Fill&& fill);
  void release_blocks(std::span<const BlockId> blocks);
  //! Adds a sequence reference to each held or retained block.
  void share_blocks(std::span<const BlockId> blocks);
  //! References held by sequence tables (the retainer's excluded).
  uint32_t sequence_refs(BlockId block) const;
  //! Drops the retainer's reference (the block goes free when no sequence holds it).
  void drop_retained(BlockId block);
  //! Makes `count` blocks free, taking cached blocks back from the retainer if the free list is
  //! short. The caller has checked count <= available_block_count().
  void reclaim_for(size_t count);
  BlockId take_block();
  //! Executes a compaction plan on a sequence that keeps `keep` tokens and counts it in the stats.
  //! OutOfMemory (nothing changed) if shared blocks cannot be replaced.
  Status compact(uint32_t seq_slot, const detail::CompactionPlan& plan, size_t keep,
                 size_t own_blocks, size_t uncomputed_from);
  bool frees_a_block(const SequenceInfo& info) const;
  void remove_sequence(uint32_t slot);

  BlockLayout layout_;
  // log2 of the block size when it is a power of two (the usual case), so the per-token paths
  // shift instead of dividing; -1 otherwise.
  int block_shift_ = -1;
  BlockAllocator allocator_;
  std::unique_ptr<detail::SequenceTable> table_;  // heap: victims_ refers to it across moves
  std::unique_ptr<detail::VictimIndex> victims_;
  EvictionStrategy strategy_;
  double threshold_ = 0.9;
  uint64_t clock_ = 0;
  CacheStats stats_;
  std::vector<TokenCopy> pending_copies_;
  BlockRetainer* retainer_ = nullptr;
  std::vector<bool> retained_;  // per block; sized when a retainer is attached
  size_t retained_count_ = 0;
  std::vector<BlockId> notify_;  // the blocks of one retainer notification (reused)
  Status init_status_;
};

}  // namespace kvfabric
