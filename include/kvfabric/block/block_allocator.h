// Free list and reference counts of one block pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvfabric/common/status.h"

namespace kvfabric {

//! \brief A pool of `total()` block ids with reference counts. A block is free exactly when its
//! count is 0. Allocation takes blocks from the front of a FIFO free list and freeing puts them at
//! the back (the seed's reuse order), so a freed block is reused as late as possible.
//! Every operation is O(1) per block; misuse (an unknown or free block) is an error, not a crash.
class BlockAllocator {
 public:
  //! Host memory per block: its reference count and its free-list slot.
  static constexpr uint64_t kBytesPerBlock = 2 * sizeof(uint32_t);

  explicit BlockAllocator(uint32_t num_blocks = 0);

  [[nodiscard]] uint32_t total() const { return static_cast<uint32_t>(ref_counts_.size()); }
  [[nodiscard]] size_t free_count() const { return free_count_; }
  [[nodiscard]] size_t used_count() const { return total() - free_count_; }
  [[nodiscard]] size_t peak_used() const { return peak_used_; }

  //! References held on `block`; 0 when it is free or out of range.
  [[nodiscard]] uint32_t ref_count(BlockId block) const {
    return block.value < ref_counts_.size() ? ref_counts_[block.value] : 0;
  }
  [[nodiscard]] bool is_free(BlockId block) const { return ref_count(block) == 0; }

  //! Takes one free block with reference count 1.
  Result<BlockId> allocate() {
    if (free_count_ == 0) return out_of_memory(1, 0);
    return pop_front();
  }
  //! Takes `count` blocks, all or none.
  Result<std::vector<BlockId>> allocate(size_t count);
  //! Adds a reference to an allocated block (a fork or a prefix-cache hit sharing it).
  Status add_ref(BlockId block) {
    if (ref_count(block) == 0) return block_not_found(block);
    ++ref_counts_[block.value];
    return ok_status();
  }
  //! Drops one reference; returns true when that was the last and the block is free again.
  Result<bool> release(BlockId block) {
    if (ref_count(block) == 0) return block_not_found(block);
    if (--ref_counts_[block.value] > 0) return false;
    size_t tail = head_ + free_count_;
    if (tail >= free_ring_.size()) tail -= free_ring_.size();
    free_ring_[tail] = block.value;
    ++free_count_;
    return true;
  }

 private:
  BlockId pop_front() {
    const BlockId block{free_ring_[head_]};
    head_ = head_ + 1 == free_ring_.size() ? 0 : head_ + 1;
    --free_count_;
    ref_counts_[block.value] = 1;
    if (used_count() > peak_used_) peak_used_ = used_count();
    return block;
  }

  std::vector<uint32_t> ref_counts_;
  std::vector<uint32_t> free_ring_;  // FIFO of free ids: [head_, head_ + free_count_) mod total
  size_t head_ = 0;
  size_t free_count_ = 0;
  size_t peak_used_ = 0;
};

}  // namespace kvfabric
