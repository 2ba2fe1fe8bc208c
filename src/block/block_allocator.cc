#include "kvfabric/block/block_allocator.h"

#include <algorithm>
#include <string>

namespace kvfabric {

BlockAllocator::BlockAllocator(uint32_t num_blocks)
    : ref_counts_(num_blocks, 0), free_ring_(num_blocks), free_count_(num_blocks) {
  for (uint32_t i = 0; i < num_blocks; ++i)
    free_ring_[i] = i;
}

uint32_t BlockAllocator::ref_count(BlockId block) const {
  return block.value < ref_counts_.size() ? ref_counts_[block.value] : 0;
}

BlockId BlockAllocator::pop_front() {
  const BlockId block{free_ring_[head_]};
  head_ = head_ + 1 == free_ring_.size() ? 0 : head_ + 1;
  --free_count_;
  ref_counts_[block.value] = 1;
  peak_used_ = std::max(peak_used_, used_count());
  return block;
}

Result<BlockId> BlockAllocator::allocate() {
  if (free_count_ == 0) return out_of_memory(1, 0);
  return pop_front();
}

Result<std::vector<BlockId>> BlockAllocator::allocate(size_t count) {
  if (count > free_count_) return out_of_memory(count, free_count_);
  std::vector<BlockId> blocks;
  blocks.reserve(count);
  for (size_t i = 0; i < count; ++i)
    blocks.push_back(pop_front());
  return blocks;
}

Status BlockAllocator::add_ref(BlockId block) {
  if (ref_count(block) == 0) return block_not_found(block);
  ++ref_counts_[block.value];
  return ok_status();
}

Result<bool> BlockAllocator::release(BlockId block) {
  if (ref_count(block) == 0) return block_not_found(block);
  if (--ref_counts_[block.value] > 0) return false;
  size_t tail = head_ + free_count_;
  if (tail >= free_ring_.size()) tail -= free_ring_.size();
  free_ring_[tail] = block.value;
  ++free_count_;
  return true;
}

}  // namespace kvfabric
