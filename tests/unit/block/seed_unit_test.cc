// The 16 cbtop unit tests (seed-semantics.md §F1). Where the seed relied on wall-clock sleeps, the
// logical access clock gives the same order without sleeping.
#include <gtest/gtest.h>

#include <sstream>

#include "kvfabric/block/eviction_strategy.h"
#include "kvfabric/block/paged_kv_cache.h"

namespace kvfabric {
namespace {

TEST(SeedUnit, NewCache) {
  PagedKvCache cache(1024, 16, 32, 128);
  EXPECT_EQ(cache.total_blocks(), 1024u);
  EXPECT_EQ(cache.block_size(), 16u);
  EXPECT_EQ(cache.free_block_count(), 1024u);
  EXPECT_EQ(cache.used_block_count(), 0u);
  EXPECT_EQ(cache.utilization(), 0.0);
}

TEST(SeedUnit, Allocate) {
  PagedKvCache cache(1024, 16, 32, 128);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 48).ok());
  EXPECT_EQ(cache.used_block_count(), 3u);
  EXPECT_EQ(cache.num_sequences(), 1u);
  const SequenceInfo* seq = cache.get_sequence(SeqId{1});
  ASSERT_NE(seq, nullptr);
  EXPECT_EQ(seq->num_tokens, 48u);
  EXPECT_EQ(seq->num_blocks(), 3u);
}

TEST(SeedUnit, Append) {
  PagedKvCache cache(1024, 16, 32, 128);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 8).ok());
  EXPECT_EQ(cache.used_block_count(), 1u);
  ASSERT_TRUE(cache.append(SeqId{1}, 4).ok());
  EXPECT_EQ(cache.used_block_count(), 1u);
  ASSERT_TRUE(cache.append(SeqId{1}, 8).ok());
  EXPECT_EQ(cache.used_block_count(), 2u);
  EXPECT_EQ(cache.get_sequence(SeqId{1})->num_tokens, 20u);
}

TEST(SeedUnit, Free) {
  PagedKvCache cache(1024, 16, 32, 128);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 48).ok());
  ASSERT_TRUE(cache.free(SeqId{1}).ok());
  EXPECT_EQ(cache.used_block_count(), 0u);
  EXPECT_EQ(cache.num_sequences(), 0u);
}

TEST(SeedUnit, Fork) {
  PagedKvCache cache(1024, 16, 32, 128);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 48).ok());
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{2}).ok());
  EXPECT_EQ(cache.num_sequences(), 2u);
  EXPECT_EQ(cache.used_block_count(), 3u);  // shared
  EXPECT_EQ(cache.stats().total_forks, 1u);
}

TEST(SeedUnit, OutOfMemory) {
  PagedKvCache cache(10, 16, 32, 128);
  const Status s = cache.allocate(SeqId{1}, 200);
  EXPECT_EQ(s.code(), ErrorCode::kOutOfMemory);
  EXPECT_EQ(s.message(), "Out of memory: requested 13 blocks, 10 available");
}

TEST(SeedUnit, SequenceNotFound) {
  PagedKvCache cache(10, 16, 32, 128);
  const Status s = cache.free(SeqId{999});
  EXPECT_EQ(s.code(), ErrorCode::kSequenceNotFound);
  EXPECT_EQ(s.message(), "Sequence not found: S999");
}

TEST(SeedUnit, Utilization) {
  PagedKvCache cache(100, 16, 32, 128);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 160).ok());
  EXPECT_NEAR(cache.utilization(), 0.1, 0.001);
  ASSERT_TRUE(cache.allocate(SeqId{2}, 480).ok());
  EXPECT_NEAR(cache.utilization(), 0.4, 0.001);
}

TEST(SeedUnit, LruEviction) {
  // The seed slept 10 ms between allocations; the logical clock orders them without sleeping.
  PagedKvCache cache =
      PagedKvCache(100, 16, 32, 128).with_eviction_strategy(EvictionStrategy::lru());
  for (int i = 1; i <= 3; ++i)
    ASSERT_TRUE(cache.allocate(SeqId{i}, 16).ok());
  EXPECT_EQ(cache.select_eviction_target(), SeqId{1});
}

TEST(SeedUnit, LongestFirstEviction) {
  PagedKvCache cache =
      PagedKvCache(100, 16, 32, 128).with_eviction_strategy(EvictionStrategy::longest_first());
  ASSERT_TRUE(cache.allocate(SeqId{1}, 16).ok());
  ASSERT_TRUE(cache.allocate(SeqId{2}, 64).ok());
  ASSERT_TRUE(cache.allocate(SeqId{3}, 32).ok());
  EXPECT_EQ(cache.select_eviction_target(), SeqId{2});
}

TEST(SeedUnit, EvictToThreshold) {
  PagedKvCache cache(10, 16, 32, 128);
  for (int i = 1; i <= 8; ++i)
    ASSERT_TRUE(cache.allocate(SeqId{i}, 16).ok());
  EXPECT_NEAR(cache.utilization(), 0.8, 1e-9);
  const auto evicted = cache.evict_to_threshold(0.5);
  ASSERT_TRUE(evicted.ok());
  EXPECT_GE(evicted->size(), 3u);
  EXPECT_LE(cache.utilization(), 0.5);
}

TEST(SeedUnit, MemoryCalculation) {
  PagedKvCache cache(100, 16, 32, 128);
  EXPECT_EQ(cache.block_memory_bytes(), 262144u);
  EXPECT_EQ(cache.total_memory_bytes(), 26214400u);
}

TEST(SeedUnit, Stats) {
  PagedKvCache cache(100, 16, 32, 128);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 32).ok());
  ASSERT_TRUE(cache.allocate(SeqId{2}, 16).ok());
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{3}).ok());
  ASSERT_TRUE(cache.free(SeqId{2}).ok());
  EXPECT_EQ(cache.stats().total_allocations, 3u);
  EXPECT_EQ(cache.stats().total_frees, 1u);
  EXPECT_EQ(cache.stats().total_forks, 1u);
}

TEST(SeedUnit, StrategyDisplay) {
  std::ostringstream os;
  os << EvictionStrategy::lru() << "|" << EvictionStrategy::lfu() << "|"
     << EvictionStrategy::streaming_llm(4, 512) << "|" << EvictionStrategy::longest_first() << "|"
     << EvictionStrategy::priority(3);
  EXPECT_EQ(os.str(), "LRU|LFU|StreamingLLM(sink=4, window=512)|LongestFirst|Priority(3)");
}

TEST(SeedUnit, DuplicateSequence) {
  PagedKvCache cache(100, 16, 32, 128);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 16).ok());
  const Status s = cache.allocate(SeqId{1}, 16);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidOperation);
  EXPECT_EQ(s.message(), "Invalid operation: Sequence S1 already exists");
}

TEST(SeedUnit, BlocksNeeded) {
  PagedKvCache cache(100, 16, 32, 128);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 1).ok());
  ASSERT_TRUE(cache.allocate(SeqId{2}, 16).ok());
  ASSERT_TRUE(cache.allocate(SeqId{3}, 17).ok());
  EXPECT_EQ(cache.get_sequence(SeqId{1})->num_blocks(), 1u);
  EXPECT_EQ(cache.get_sequence(SeqId{2})->num_blocks(), 1u);
  EXPECT_EQ(cache.get_sequence(SeqId{3})->num_blocks(), 2u);
}

}  // namespace
}  // namespace kvfabric
