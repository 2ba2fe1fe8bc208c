// PagedKvCache with a BlockRetainer: retained blocks outlive their sequences as cached blocks,
// are shared by reference, are never written, and are taken back before an allocation fails.
#include <gtest/gtest.h>

#include <sstream>
#include <vector>

#include "kvfabric/block/block_retainer.h"
#include "kvfabric/block/paged_kv_cache.h"
#include "testing/fifo_retainer.h"

namespace kvfabric {
namespace {

constexpr size_t kBlockSize = 16;

class RetainerTest : public ::testing::Test {
 protected:
  RetainerTest() : cache_(8, kBlockSize, 2, 8) {
    EXPECT_TRUE(cache_.set_block_retainer(&retainer_).ok());
  }

  void retain(BlockId block) {
    ASSERT_TRUE(cache_.retain_block(block).ok()) << block;
    retainer_.retained(block);
  }
  std::vector<BlockId> blocks_of(SeqId seq) { return cache_.get_sequence(seq)->block_ids; }
  void expect_consistent() {
    EXPECT_TRUE(cache_.verify_integrity().ok()) << cache_.verify_integrity();
    EXPECT_EQ(cache_.free_block_count() + cache_.cached_block_count() + cache_.used_block_count(),
              cache_.total_blocks());
  }

  testing::FifoRetainer retainer_;
  PagedKvCache cache_;
};

TEST(RetainerOff, CacheWithoutRetainerCachesNothing) {
  PagedKvCache cache(4, kBlockSize, 2, 8);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 20).ok());
  EXPECT_EQ(cache.retain_block(BlockId{0}).code(), ErrorCode::kInvalidOperation);
  EXPECT_EQ(cache.cached_block_count(), 0u);
  EXPECT_EQ(cache.available_block_count(), 2u);
  ASSERT_TRUE(cache.free(SeqId{1}).ok());
  EXPECT_EQ(cache.free_block_count(), 4u);
  std::ostringstream text;
  text << cache;
  EXPECT_EQ(text.str().find("Cached"), std::string::npos);  // the seed's Display text
}

TEST_F(RetainerTest, RetainedBlocksStayCachedWhenTheirSequenceEnds) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 40).ok());  // 3 blocks
  const auto blocks = blocks_of(SeqId{1});
  retain(blocks[0]);
  retain(blocks[1]);
  EXPECT_EQ(cache_.block_ref_count(blocks[0]), 2u);
  EXPECT_EQ(cache_.cached_block_count(), 0u);
  expect_consistent();

  ASSERT_TRUE(cache_.free(SeqId{1}).ok());
  EXPECT_EQ(retainer_.idle_events, 2u);
  EXPECT_EQ(cache_.cached_block_count(), 2u);
  EXPECT_EQ(cache_.free_block_count(), 6u);  // only the unretained block went back
  EXPECT_EQ(cache_.used_block_count(), 0u);
  EXPECT_DOUBLE_EQ(cache_.utilization(), 0.0);  // cached blocks are not pressure
  EXPECT_EQ(cache_.stats().total_frees, 1u);
  expect_consistent();
}

TEST_F(RetainerTest, AllocateSharedTakesCachedBlocksByReference) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 32).ok());
  const auto prefix = blocks_of(SeqId{1});
  retain(prefix[0]);
  retain(prefix[1]);
  ASSERT_TRUE(cache_.free(SeqId{1}).ok());

  ASSERT_TRUE(cache_.allocate_shared(SeqId{2}, 40, prefix).ok());
  const auto table = blocks_of(SeqId{2});
  ASSERT_EQ(table.size(), 3u);
  EXPECT_EQ(table[0], prefix[0]);
  EXPECT_EQ(table[1], prefix[1]);
  EXPECT_EQ(retainer_.used_events, 2u);
  EXPECT_EQ(cache_.cached_block_count(), 0u);
  EXPECT_EQ(cache_.used_block_count(), 3u);
  EXPECT_EQ(cache_.stats().shared_prefix_blocks, 2u);
  EXPECT_TRUE(cache_.pending_copies().empty());  // a hit copies nothing

  // A second live sharer adds a reference without a notification.
  ASSERT_TRUE(cache_.allocate_shared(SeqId{3}, 16, std::vector<BlockId>{prefix[0]}).ok());
  EXPECT_EQ(cache_.block_ref_count(prefix[0]), 3u);
  EXPECT_EQ(retainer_.used_events, 2u);
  expect_consistent();
}

TEST_F(RetainerTest, AllocationTakesCachedBlocksBackBeforeFailing) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 8 * kBlockSize).ok());
  const auto blocks = blocks_of(SeqId{1});
  for (BlockId b : blocks)
    retain(b);
  ASSERT_TRUE(cache_.free(SeqId{1}).ok());  // blocks go idle in table order
  ASSERT_EQ(cache_.free_block_count(), 0u);
  ASSERT_EQ(cache_.cached_block_count(), 8u);

  ASSERT_TRUE(cache_.allocate(SeqId{2}, 3 * kBlockSize).ok());
  // The retainer chose its three oldest idle blocks; they were freed and reused.
  EXPECT_EQ(blocks_of(SeqId{2}), (std::vector<BlockId>{blocks[0], blocks[1], blocks[2]}));
  EXPECT_FALSE(cache_.is_retained(blocks[0]));
  EXPECT_EQ(cache_.stats().cached_blocks_reclaimed, 3u);
  EXPECT_EQ(cache_.cached_block_count(), 5u);
  expect_consistent();

  const auto failed = cache_.allocate(SeqId{3}, 6 * kBlockSize);
  EXPECT_EQ(failed.message(), "Out of memory: requested 6 blocks, 5 available");
  EXPECT_EQ(cache_.cached_block_count(), 5u);  // nothing was reclaimed for the failed call
  EXPECT_EQ(cache_.get_sequence(SeqId{3}), nullptr);
  expect_consistent();
}

TEST_F(RetainerTest, AppendCopiesARetainedPartialBlockFirst) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 20).ok());  // tail block holds 4 tokens
  const BlockId tail = blocks_of(SeqId{1})[1];
  retain(tail);
  ASSERT_TRUE(cache_.append(SeqId{1}, 1).ok());
  ASSERT_EQ(cache_.pending_copies().size(), 1u);
  const TokenCopy copy = cache_.pending_copies()[0];
  EXPECT_EQ(copy.src_block, tail);
  EXPECT_EQ(copy.num_tokens, 4u);
  EXPECT_NE(blocks_of(SeqId{1})[1], tail);     // the sequence writes into its own copy
  EXPECT_EQ(cache_.cached_block_count(), 1u);  // the retained original is idle now
  expect_consistent();
}

TEST_F(RetainerTest, CompactionNeverWritesIntoARetainedBlock) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 4 * kBlockSize + 8).ok());
  const auto blocks = blocks_of(SeqId{1});
  retain(blocks[0]);
  // sink 4 + window 20: tokens move into block 0 and 1; block 0 is retained, so it is replaced.
  ASSERT_TRUE(cache_.apply_streaming_llm(SeqId{1}, 4, 20).ok());
  const auto after = blocks_of(SeqId{1});
  EXPECT_NE(after[0], blocks[0]);
  for (const TokenCopy& c : cache_.pending_copies())
    EXPECT_NE(c.dst_block, blocks[0]) << c;
  expect_consistent();
}

TEST_F(RetainerTest, AllocateSharedRejectsBadPrefixesAndChangesNothing) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 32).ok());
  const auto held = blocks_of(SeqId{1});
  const std::vector<BlockId> free_block{BlockId{7}};
  EXPECT_EQ(cache_.allocate_shared(SeqId{2}, 16, free_block).code(), ErrorCode::kBlockNotFound);
  EXPECT_EQ(cache_.allocate_shared(SeqId{2}, 16, std::vector<BlockId>{BlockId{99}}).message(),
            "Block not found: B99");
  EXPECT_EQ(cache_.allocate_shared(SeqId{2}, 32, std::vector<BlockId>{held[0], held[0]}).message(),
            "B0 appears twice in the shared prefix of S2");
  EXPECT_EQ(cache_.allocate_shared(SeqId{2}, 10, held).code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(cache_.allocate_shared(SeqId{1}, 32, held).code(), ErrorCode::kInvalidOperation);
  EXPECT_EQ(cache_.num_sequences(), 1u);
  EXPECT_EQ(cache_.block_ref_count(held[0]), 1u);
  expect_consistent();
}

TEST_F(RetainerTest, FailedSharedAllocationLeavesCachedBlocksCached) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 2 * kBlockSize).ok());
  const auto prefix = blocks_of(SeqId{1});
  retain(prefix[0]);
  retain(prefix[1]);
  ASSERT_TRUE(cache_.free(SeqId{1}).ok());
  ASSERT_TRUE(cache_.allocate(SeqId{2}, 5 * kBlockSize).ok());  // 1 free + 2 cached remain
  ASSERT_EQ(cache_.available_block_count(), 3u);
  // Sharing both cached blocks leaves 1 block for the 2 new ones the sequence needs.
  const Status status = cache_.allocate_shared(SeqId{3}, 4 * kBlockSize, prefix);
  EXPECT_EQ(status.message(), "Out of memory: requested 2 blocks, 1 available");
  EXPECT_EQ(cache_.cached_block_count(), 2u);
  EXPECT_TRUE(retainer_.is_idle(prefix[0]) && retainer_.is_idle(prefix[1]));
  EXPECT_EQ(cache_.stats().shared_prefix_blocks, 0u);
  expect_consistent();
}

TEST_F(RetainerTest, ReleasingARetainedBlock) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 32).ok());
  const auto blocks = blocks_of(SeqId{1});
  retain(blocks[0]);
  retain(blocks[1]);
  EXPECT_EQ(cache_.retain_block(blocks[0]).message(), "Invalid operation: B0 is already retained");
  // Still held by S1: only the retainer's reference goes.
  ASSERT_TRUE(cache_.release_retained_block(blocks[0]).ok());
  retainer_.released(blocks[0]);
  EXPECT_EQ(cache_.block_ref_count(blocks[0]), 1u);
  ASSERT_TRUE(cache_.free(SeqId{1}).ok());
  // Idle: releasing it frees it.
  ASSERT_TRUE(cache_.release_retained_block(blocks[1]).ok());
  retainer_.released(blocks[1]);
  EXPECT_EQ(cache_.free_block_count(), 8u);
  EXPECT_EQ(cache_.release_retained_block(blocks[1]).code(), ErrorCode::kBlockNotFound);
  expect_consistent();
}

TEST_F(RetainerTest, RetainerCannotChangeWhileBlocksAreRetained) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 16).ok());
  retain(blocks_of(SeqId{1})[0]);
  EXPECT_EQ(cache_.set_block_retainer(nullptr).code(), ErrorCode::kInvalidOperation);
  EXPECT_EQ(cache_.block_retainer(), &retainer_);
  std::ostringstream text;
  text << cache_;
  EXPECT_NE(text.str().find("  Cached: 0 blocks\n"), std::string::npos);
}

TEST_F(RetainerTest, EvictingSequencesTurnsTheirRetainedBlocksIntoCache) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 4 * kBlockSize).ok());
  ASSERT_TRUE(cache_.allocate(SeqId{2}, 2 * kBlockSize).ok());
  for (BlockId b : blocks_of(SeqId{1}))
    retain(b);
  ASSERT_DOUBLE_EQ(cache_.utilization(), 0.75);
  const auto evicted = cache_.evict_to_threshold(0.3);
  ASSERT_TRUE(evicted.ok());
  EXPECT_EQ(evicted.value(), std::vector<SeqId>{SeqId{1}});  // LRU; it frees (caches) blocks
  EXPECT_EQ(cache_.cached_block_count(), 4u);
  EXPECT_DOUBLE_EQ(cache_.utilization(), 0.25);
  expect_consistent();
}

}  // namespace
}  // namespace kvfabric
