// The 21 cbtop integration tests (F411-F420 and the workflow, seed-semantics.md §F2).
#include <gtest/gtest.h>

#include <sstream>

#include "kvfabric/block/eviction_strategy.h"
#include "kvfabric/block/paged_kv_cache.h"
#include "testing/slot_model.h"

namespace kvfabric {
namespace {

PagedKvCache small(size_t blocks) {
  return PagedKvCache(blocks, 16, 32, 128);
}

// F411: block allocation never exceeds capacity.
TEST(F411, AllocatesExactlyCapacity) {
  PagedKvCache cache = small(100);
  int successes = 0;
  for (int i = 0; i < 150; ++i) {
    const Status s = cache.allocate(SeqId{i}, 16);
    if (!s.ok()) {
      EXPECT_EQ(s.code(), ErrorCode::kOutOfMemory);
      break;
    }
    ++successes;
  }
  EXPECT_EQ(successes, 100);
  EXPECT_EQ(cache.used_block_count(), 100u);
  EXPECT_EQ(cache.free_block_count(), 0u);
}

TEST(F411, FullCacheRejects) {
  PagedKvCache cache = small(10);
  for (int i = 0; i < 10; ++i)
    ASSERT_TRUE(cache.allocate(SeqId{i}, 16).ok());
  EXPECT_EQ(cache.allocate(SeqId{10}, 16).code(), ErrorCode::kOutOfMemory);
}

// F412: forks share blocks.
TEST(F412, ForkSharesBlocks) {
  PagedKvCache cache = small(100);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 64).ok());
  const size_t used = cache.used_block_count();
  for (int beam = 2; beam <= 5; ++beam)
    ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{beam}).ok());
  EXPECT_EQ(cache.used_block_count(), used);
  EXPECT_EQ(cache.num_sequences(), 5u);
  for (int beam = 2; beam <= 5; ++beam)
    EXPECT_EQ(cache.get_sequence(SeqId{beam})->num_tokens, 64u);
}

TEST(F412, ForkOfMissingSource) {
  PagedKvCache cache = small(10);
  EXPECT_EQ(cache.fork(SeqId{1}, SeqId{2}).code(), ErrorCode::kSequenceNotFound);
}

// F413: threshold-triggered eviction.
TEST(F413, EvictionTriggersAboveThreshold) {
  PagedKvCache cache = small(10).with_eviction_threshold(0.8);
  for (int i = 0; i < 9; ++i)
    ASSERT_TRUE(cache.allocate(SeqId{i}, 16).ok());
  EXPECT_TRUE(cache.needs_eviction());
  EXPECT_GE(cache.utilization(), 0.8);
  ASSERT_TRUE(cache.evict_to_threshold(0.5).ok());
  EXPECT_LE(cache.utilization(), 0.5);
}

TEST(F413, NoEvictionBelowThreshold) {
  PagedKvCache cache = small(10).with_eviction_threshold(0.9);
  for (int i = 0; i < 5; ++i)
    ASSERT_TRUE(cache.allocate(SeqId{i}, 16).ok());
  EXPECT_FALSE(cache.needs_eviction());
}

// F414: eviction order. The seed slept 10 ms between calls; the logical clock needs no sleep.
TEST(F414, LruEvictsOldestFirst) {
  PagedKvCache cache = small(10).with_eviction_strategy(EvictionStrategy::lru());
  for (int i = 1; i <= 3; ++i)
    ASSERT_TRUE(cache.allocate(SeqId{i}, 16).ok());
  EXPECT_EQ(cache.evict().value(), SeqId{1});
  EXPECT_EQ(cache.evict().value(), SeqId{2});
}

TEST(F414, LfuEvictsLeastUsed) {
  PagedKvCache cache = small(10).with_eviction_strategy(EvictionStrategy::lfu());
  for (int i = 1; i <= 3; ++i)
    ASSERT_TRUE(cache.allocate(SeqId{i}, 1).ok());
  for (int i = 0; i < 5; ++i)
    ASSERT_TRUE(cache.append(SeqId{1}, 1).ok());
  ASSERT_TRUE(cache.append(SeqId{3}, 1).ok());
  EXPECT_EQ(cache.select_eviction_target(), SeqId{2});
}

// F415: memory utilization.
TEST(F415, UtilizationAndMemory) {
  PagedKvCache cache = small(100);
  EXPECT_EQ(cache.utilization(), 0.0);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 160).ok());
  EXPECT_NEAR(cache.utilization(), 0.1, 1e-9);
  EXPECT_EQ(cache.block_memory_bytes(), 262144u);
  EXPECT_EQ(cache.used_memory_bytes(), 2621440u);
}

TEST(F415, EmptyPool) {
  PagedKvCache cache = small(0);
  EXPECT_TRUE(cache.init_status().ok());
  EXPECT_EQ(cache.utilization(), 0.0);
  EXPECT_FALSE(cache.needs_eviction());
}

// F416: statistics. LRU picks S1, whose blocks S3 shares, so evict() frees nothing (as the seed).
TEST(F416, StatsTracking) {
  PagedKvCache cache = small(100);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 32).ok());
  ASSERT_TRUE(cache.allocate(SeqId{2}, 16).ok());
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{3}).ok());
  ASSERT_TRUE(cache.free(SeqId{2}).ok());
  EXPECT_EQ(cache.evict().value(), SeqId{1});
  const CacheStats& s = cache.stats();
  EXPECT_EQ(s.total_allocations, 3u);
  EXPECT_EQ(s.total_frees, 1u);
  EXPECT_EQ(s.total_forks, 1u);
  EXPECT_EQ(s.total_evictions, 1u);
  EXPECT_EQ(cache.used_block_count(), 2u);
}

// F417: no leaks across allocate/free rounds.
TEST(F417, RoundsLeaveNoLeaks) {
  PagedKvCache cache = small(100);
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < 10; ++i)
      ASSERT_TRUE(cache.allocate(SeqId{i}, 160).ok());
    EXPECT_EQ(cache.used_block_count(), 100u);
    EXPECT_EQ(cache.free_block_count(), 0u);
    for (int i = 0; i < 10; ++i)
      ASSERT_TRUE(cache.free(SeqId{i}).ok());
    EXPECT_EQ(cache.used_block_count(), 0u);
    EXPECT_EQ(cache.free_block_count(), 100u);
  }
}

TEST(F417, FreeOfMissingSequence) {
  PagedKvCache cache = small(10);
  EXPECT_EQ(cache.free(SeqId{42}).code(), ErrorCode::kSequenceNotFound);
}

// F418: freed blocks are reused.
TEST(F418, FragmentedFreeListIsReused) {
  PagedKvCache cache = small(200);
  for (int i = 0; i < 50; ++i)
    ASSERT_TRUE(cache.allocate(SeqId{i}, 32).ok());
  for (int i = 0; i < 50; i += 2)
    ASSERT_TRUE(cache.free(SeqId{i}).ok());
  const size_t free_before = cache.free_block_count();
  for (int i = 100; i < 125; ++i)
    ASSERT_TRUE(cache.allocate(SeqId{i}, 32).ok());
  EXPECT_EQ(free_before - cache.free_block_count(), 50u);
}

// F419: shared blocks are freed only with their last reference.
TEST(F419, ForkReferenceCounting) {
  PagedKvCache cache = small(100);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 64).ok());
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{2}).ok());
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{3}).ok());
  const size_t used = cache.used_block_count();
  ASSERT_TRUE(cache.free(SeqId{2}).ok());
  EXPECT_EQ(cache.used_block_count(), used);
  ASSERT_TRUE(cache.free(SeqId{1}).ok());
  EXPECT_EQ(cache.used_block_count(), used);
  ASSERT_TRUE(cache.free(SeqId{3}).ok());
  EXPECT_EQ(cache.used_block_count(), 0u);
}

// F420: StreamingLLM. The seed also returned 140 and 20 tokens, but kept the wrong tokens
// (blocks [0,16) and [144,160)); here the slot model checks that exactly the sink and window stay.
TEST(F420, StreamingKeepsSinkAndWindow) {
  PagedKvCache cache = small(100).with_eviction_strategy(EvictionStrategy::streaming_llm(4, 16));
  testing::SlotModel slots(100, 16);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 160).ok());
  std::vector<int64_t> tokens(160);
  for (int i = 0; i < 160; ++i)
    tokens[i] = i;
  slots.write(*cache.get_sequence(SeqId{1}), 0, tokens);

  EXPECT_EQ(cache.apply_streaming_llm(SeqId{1}, 4, 16).value(), 140u);
  const SequenceInfo* seq = cache.get_sequence(SeqId{1});
  EXPECT_EQ(seq->num_tokens, 20u);
  EXPECT_EQ(seq->num_blocks(), 2u);
  slots.apply(cache.take_pending_copies());
  std::vector<int64_t> expected = {0, 1, 2, 3};
  for (int i = 144; i < 160; ++i)
    expected.push_back(i);
  EXPECT_EQ(slots.read(*seq), expected);
  EXPECT_EQ(cache.used_block_count(), 2u);
}

TEST(F420, ShortSequenceUnchanged) {
  PagedKvCache cache = small(100);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 16).ok());
  EXPECT_EQ(cache.apply_streaming_llm(SeqId{1}, 4, 32).value(), 0u);
  EXPECT_EQ(cache.get_sequence(SeqId{1})->num_tokens, 16u);
  EXPECT_TRUE(cache.pending_copies().empty());
}

TEST(F420, StreamingWithoutSequence) {
  PagedKvCache cache = small(10);
  EXPECT_EQ(cache.apply_streaming_llm(SeqId{7}, 4, 16).status().code(),
            ErrorCode::kSequenceNotFound);
}

TEST(Workflow, ServingScenario) {
  PagedKvCache cache = PagedKvCache(1024, 16, 32, 128)
                           .with_eviction_strategy(EvictionStrategy::lru())
                           .with_eviction_threshold(0.9);
  for (int i = 0; i < 20; ++i)
    ASSERT_TRUE(cache.allocate(SeqId{i}, 256).ok());
  for (int i = 0; i < 5; ++i)
    ASSERT_TRUE(cache.free(SeqId{i}).ok());
  for (int i = 20; i < 30; ++i)
    ASSERT_TRUE(cache.allocate(SeqId{i}, 128).ok());
  for (int i = 100; i < 103; ++i)
    ASSERT_TRUE(cache.fork(SeqId{10}, SeqId{i}).ok());
  for (int i = 10; i < 15; ++i)
    ASSERT_TRUE(cache.append(SeqId{i}, 32).ok());
  EXPECT_GT(cache.num_sequences(), 20u);
  EXPECT_GT(cache.stats().total_allocations, 0u);
  EXPECT_EQ(cache.stats().total_forks, 3u);
  std::ostringstream os;
  os << cache;
  EXPECT_NE(os.str().find("PagedKvCache"), std::string::npos);
  EXPECT_NE(os.str().find("LRU"), std::string::npos);
  EXPECT_TRUE(cache.verify_integrity().ok());
}

TEST(Workflow, DisplayMatchesSeedFormat) {
  PagedKvCache cache = small(100);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 160).ok());
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{2}).ok());
  std::ostringstream os;
  os << cache;
  EXPECT_EQ(os.str(),
            "PagedKvCache\n"
            "  Strategy: LRU (block_size=16)\n"
            "  Blocks: 10/100 (10.0% used)\n"
            "  Memory: 2.62 MB / 26.21 MB\n"
            "  Sequences: 2 active\n"
            "  Stats: allocs=10, frees=0, evictions=0, forks=1\n");
}

}  // namespace
}  // namespace kvfabric
