#include "kvfabric/block/block_allocator.h"

#include <algorithm>
#include <string>

namespace kvfabric {

BlockAllocator::BlockAllocator(uint32_t num_blocks)
    : ref_counts_(num_blocks, 0), free_ring_(num_blocks), free_count_(num_blocks) {
  for (uint32_t i = 0; i < num_blocks; ++i)
    free_ring_[i] = i;
}

Result<std::vector<BlockId>> BlockAllocator::allocate(size_t count) {
  if (count > free_count_) return out_of_memory(count, free_count_);
  std::vector<BlockId> blocks;
  blocks.reserve(count);
  for (size_t i = 0; i < count; ++i)
    blocks.push_back(pop_front());
  return blocks;
}

}  // namespace kvfabric
