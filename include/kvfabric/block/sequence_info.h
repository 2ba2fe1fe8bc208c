// What a block manager knows about one sequence, and its running counters.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvfabric/common/ids.h"

namespace kvfabric {

//! \brief One sequence's block table and eviction bookkeeping (seed `SequenceInfo`).
//! Invariant: block_ids.size() == ceil(num_tokens / block_size); logical token i lives in
//! block_ids[i / block_size] at slot i % block_size.
struct SequenceInfo {
  SeqId seq_id;
  size_t num_tokens = 0;
  std::vector<BlockId> block_ids;
  uint64_t last_access = 0;   //!< logical clock tick of the last allocate/append/fork/compaction
  uint64_t access_count = 0;  //!< 1 at allocate or fork, +1 per non-empty append or compaction
  uint32_t priority = 0;      //!< higher survives longer under the priority strategy

  [[nodiscard]] size_t num_blocks() const { return block_ids.size(); }
};

//! \brief Running counters (seed `CacheStats` plus copy-on-write and compaction counters).
struct CacheStats {
  uint64_t total_allocations = 0;  //!< blocks taken from the free list
  uint64_t total_frees = 0;        //!< blocks returned to the free list
  uint64_t total_evictions = 0;    //!< sequences evicted by evict() / evict_to_threshold()
  uint64_t total_forks = 0;
  size_t peak_blocks_used = 0;
  uint64_t cow_copies = 0;  //!< partly filled shared blocks copied before a write
  uint64_t cow_copied_tokens = 0;
  uint64_t compactions = 0;  //!< apply_streaming_llm and retain_tokens calls that dropped tokens
  uint64_t compaction_copied_tokens = 0;
  uint64_t streaming_evicted_tokens = 0;  //!< tokens dropped by apply_streaming_llm
  uint64_t selection_evicted_tokens = 0;  //!< tokens dropped by retain_tokens
  uint64_t shared_prefix_blocks = 0;      //!< blocks allocate_shared() took by reference
  uint64_t cached_blocks_reclaimed = 0;   //!< cached blocks taken back for an allocation

  friend bool operator==(const CacheStats&, const CacheStats&) = default;
};

}  // namespace kvfabric
