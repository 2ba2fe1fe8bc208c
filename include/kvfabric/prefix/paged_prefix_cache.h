// A paged block manager with automatic prefix caching: PagedKvCache + PrefixBlockIndex.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "kvfabric/block/paged_kv_cache.h"
#include "kvfabric/common/status.h"
#include "kvfabric/prefix/prefix_block_index.h"

namespace kvfabric {

//! \brief A PagedKvCache whose full blocks are indexed by prompt prefix, so requests that share a
//! prefix share its blocks instead of recomputing them.
//!
//! Lifecycle of a request: allocate(seq, prompt) shares the longest cached prefix by reference
//! and returns its length (the engine prefills only the rest); after prefill, insert(seq,
//! prompt) indexes the sequence's full blocks; every other operation (append, fork, free,
//! evict, ...) goes to pool() as usual. An indexed block whose last sequence goes away stays
//! cached; when an allocation finds the free list short, the least recently used cached blocks
//! no sequence needs go back to it first (PagedKvCache with a BlockRetainer).
//!
//! The pool must not be moved out of this object: it keeps a pointer to the index. Not
//! thread-safe.
class PagedPrefixCache {
 public:
  //! Attaches a new index to `pool` (which must have no retainer yet). options.block_size must
  //! be 0 (take the pool's) or equal to the pool's; block_bytes 0 takes the pool's.
  static Result<PagedPrefixCache> create(PagedKvCache pool, PrefixIndexOptions options = {});

  PagedPrefixCache(PagedPrefixCache&&) noexcept = default;
  PagedPrefixCache& operator=(PagedPrefixCache&&) noexcept = default;

  [[nodiscard]] PagedKvCache& pool() { return pool_; }
  [[nodiscard]] const PagedKvCache& pool() const { return pool_; }
  [[nodiscard]] const PrefixBlockIndex& index() const { return *index_; }

  //! Creates `seq` holding the `prompt` tokens: the blocks of its longest cached prefix are
  //! shared (no copy), the rest are new. Returns how many prompt tokens are already cached (whole
  //! blocks; all of them when the prompt is cached up to a shared partial last block). Errors as
  //! PagedKvCache::allocate; a failed call changes nothing (not even the statistics).
  Result<size_t> allocate(SeqId seq, std::span<const TokenId> prompt);
  //! allocate() with the prompt's unit keys already computed (see RadixKey).
  Result<size_t> allocate(SeqId seq, const RadixKey& prompt);
  //! Indexes the blocks holding the first tokens.size() tokens of `seq` (the tokens themselves
  //! are `tokens`, in block-table order), raising their priority to at least `priority`. Returns
  //! how many blocks were newly indexed. A sequence compacted by StreamingLLM no longer holds the
  //! K/V of a prefix: do not index it. Errors: an unknown sequence, more tokens than it holds,
  //! and as PrefixBlockIndex::insert.
  Result<size_t> insert(SeqId seq, std::span<const TokenId> tokens, uint32_t priority = 0);
  //! insert() of a key that may be salted (see PrefixBlockIndex::insert).
  Result<size_t> insert(SeqId seq, const RadixKey& key, uint32_t priority = 0);
  //! Empties the index; cached blocks no sequence holds return to the free list.
  void clear_index();

  //! The pool's and the index's integrity checks, and that they agree on every cached block.
  [[nodiscard]] Status verify_integrity() const;

 private:
  PagedPrefixCache(PagedKvCache pool, std::unique_ptr<PrefixBlockIndex> index);

  std::unique_ptr<PrefixBlockIndex> index_;  // heap: the pool points to it across moves
  PagedKvCache pool_;
};

}  // namespace kvfabric
