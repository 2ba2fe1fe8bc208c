#include <gtest/gtest.h>

#include "kvfabric/block/block_allocator.h"

namespace kvfabric {
namespace {

TEST(BlockAllocator, FifoReuseOrder) {
  BlockAllocator alloc(4);
  EXPECT_EQ(alloc.allocate().value(), BlockId{0});
  EXPECT_EQ(alloc.allocate().value(), BlockId{1});
  EXPECT_TRUE(alloc.release(BlockId{0}).value());
  // Free blocks go to the back: 2 and 3 come before the freed 0.
  EXPECT_EQ(alloc.allocate(3).value(), (std::vector<BlockId>{BlockId{2}, BlockId{3}, BlockId{0}}));
  EXPECT_EQ(alloc.free_count(), 0u);
  EXPECT_EQ(alloc.allocate().status().code(), ErrorCode::kOutOfMemory);
}

TEST(BlockAllocator, AllOrNothing) {
  BlockAllocator alloc(3);
  ASSERT_TRUE(alloc.allocate(2).ok());
  const auto failed = alloc.allocate(2);
  EXPECT_EQ(failed.status().message(), "Out of memory: requested 2 blocks, 1 available");
  EXPECT_EQ(alloc.free_count(), 1u);
}

TEST(BlockAllocator, ReferenceCounts) {
  BlockAllocator alloc(2);
  const BlockId b = alloc.allocate().value();
  ASSERT_TRUE(alloc.add_ref(b).ok());
  EXPECT_EQ(alloc.ref_count(b), 2u);
  EXPECT_FALSE(alloc.release(b).value());
  EXPECT_TRUE(alloc.release(b).value());
  EXPECT_TRUE(alloc.is_free(b));
  // Double free, a reference to a free block and unknown ids are errors, not corruption.
  EXPECT_EQ(alloc.release(b).status().code(), ErrorCode::kBlockNotFound);
  EXPECT_EQ(alloc.add_ref(b).message(), "Block not found: B0");
  EXPECT_EQ(alloc.release(BlockId{99}).status().code(), ErrorCode::kBlockNotFound);
  EXPECT_EQ(alloc.free_count(), 2u);
}

TEST(BlockAllocator, PeakTracking) {
  BlockAllocator alloc(8);
  auto five = alloc.allocate(5).value();
  for (int i = 0; i < 3; ++i)
    ASSERT_TRUE(alloc.release(five[i]).value());
  ASSERT_TRUE(alloc.allocate(3).ok());
  EXPECT_EQ(alloc.peak_used(), 5u);
  ASSERT_TRUE(alloc.allocate(1).ok());
  EXPECT_EQ(alloc.peak_used(), 6u);
}

}  // namespace
}  // namespace kvfabric
