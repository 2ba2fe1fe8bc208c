// The hook through which a cache of shared prefixes keeps blocks alive in a PagedKvCache.
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "kvfabric/common/ids.h"

namespace kvfabric {

//! \brief Holds one reference on each block it retains, outside every sequence table: the prefix
//! module's block index is one. A PagedKvCache with a retainer (set_block_retainer) then keeps a
//! retained block when its last sequence releases it: the block is *cached* (idle) rather than
//! free, so a later prefix hit can share it without recomputing it. When the free list cannot
//! cover an allocation, the cache asks the retainer to give idle blocks back (release_idle), in
//! the retainer's eviction order, before it reports OutOfMemory.
//!
//! Because the retainer's reference counts like any other, a retained block is "shared": the
//! block manager copies it before a sequence writes into it (copy-on-write, compaction).
//!
//! The cache calls the notifications synchronously from the mutation that causes them; a
//! retainer must not call back into the cache from them.
class BlockRetainer {
 public:
  virtual ~BlockRetainer() = default;

  //! Retained blocks that no sequence holds and that release_idle() can give back now.
  [[nodiscard]] virtual size_t idle_blocks() const = 0;
  //! Stops retaining up to `count` idle blocks, chosen by the retainer's eviction policy, and
  //! returns them; the cache puts them on its free list. Returns fewer only when fewer are idle.
  virtual std::vector<BlockId> release_idle(size_t count) = 0;
  //! A retained block gained its first sequence reference (a prefix hit shares it).
  virtual void on_block_used(BlockId block) = 0;
  //! A retained block lost its last sequence reference: it is cached and idle now.
  virtual void on_block_idle(BlockId block) = 0;
  //! Several blocks became used (or idle) in one operation, in table order: a retainer can take
  //! them together. The defaults notify them one by one.
  virtual void on_blocks_used(std::span<const BlockId> blocks) {
    for (BlockId b : blocks) on_block_used(b);
  }
  virtual void on_blocks_idle(std::span<const BlockId> blocks) {
    for (BlockId b : blocks) on_block_idle(b);
  }
};

}  // namespace kvfabric
