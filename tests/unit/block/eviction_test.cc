// Eviction strategies, deterministic tie-breaks, priorities and the threshold convention
// (seed-semantics.md §E1.3, §E1.5, §E1.6).
#include <gtest/gtest.h>

#include <cmath>

#include "kvfabric/block/eviction_strategy.h"
#include "kvfabric/block/paged_kv_cache.h"
#include "kvfabric/config/config.h"

namespace kvfabric {
namespace {

TEST(Eviction, TiesGoToLowerSeqId) {
  PagedKvCache longest =
      PagedKvCache(32, 4, 1, 8).with_eviction_strategy(EvictionStrategy::longest_first());
  for (int id : {7, 3, 5})
    ASSERT_TRUE(longest.allocate(SeqId{id}, 8).ok());
  EXPECT_EQ(longest.select_eviction_target(), SeqId{3});

  PagedKvCache lfu = PagedKvCache(32, 4, 1, 8).with_eviction_strategy(EvictionStrategy::lfu());
  for (int id : {9, 4, 6})
    ASSERT_TRUE(lfu.allocate(SeqId{id}, 1).ok());
  EXPECT_EQ(lfu.select_eviction_target(), SeqId{4});

  PagedKvCache prio =
      PagedKvCache(32, 4, 1, 8).with_eviction_strategy(EvictionStrategy::priority(3));
  for (int id : {8, 2})
    ASSERT_TRUE(prio.allocate(SeqId{id}, 1).ok());
  EXPECT_EQ(prio.select_eviction_target(), SeqId{2});
}

TEST(Eviction, LruFollowsAccesses) {
  PagedKvCache cache(32, 4, 1, 8);
  for (int id = 1; id <= 3; ++id)
    ASSERT_TRUE(cache.allocate(SeqId{id}, 1).ok());
  ASSERT_TRUE(cache.append(SeqId{1}, 1).ok());
  EXPECT_EQ(cache.select_eviction_target(), SeqId{2});
  ASSERT_TRUE(cache.append(SeqId{2}, 0).ok());  // an empty append is not an access
  EXPECT_EQ(cache.select_eviction_target(), SeqId{2});
  EXPECT_EQ(cache.get_sequence(SeqId{2})->access_count, 1u);
}

TEST(Eviction, PriorityStrategy) {
  PagedKvCache cache =
      PagedKvCache(32, 4, 1, 8).with_eviction_strategy(EvictionStrategy::priority(4));
  for (int id = 1; id <= 3; ++id)
    ASSERT_TRUE(cache.allocate(SeqId{id}, 1).ok());
  ASSERT_TRUE(cache.set_priority(SeqId{1}, 3).ok());
  ASSERT_TRUE(cache.set_priority(SeqId{2}, 1).ok());
  ASSERT_TRUE(cache.set_priority(SeqId{3}, 2).ok());
  EXPECT_EQ(cache.evict().value(), SeqId{2});
  EXPECT_EQ(cache.evict().value(), SeqId{3});

  const Status out_of_range = cache.set_priority(SeqId{1}, 4);
  EXPECT_EQ(out_of_range.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(out_of_range.message().find("Priority(4)"), std::string::npos);
  EXPECT_EQ(cache.get_sequence(SeqId{1})->priority, 3u);
  EXPECT_EQ(cache.set_priority(SeqId{9}, 0).code(), ErrorCode::kSequenceNotFound);
}

TEST(Eviction, ForkInheritsPriority) {
  PagedKvCache cache =
      PagedKvCache(32, 4, 1, 8).with_eviction_strategy(EvictionStrategy::priority(4));
  ASSERT_TRUE(cache.allocate(SeqId{1}, 4).ok());
  ASSERT_TRUE(cache.allocate(SeqId{2}, 4).ok());
  ASSERT_TRUE(cache.set_priority(SeqId{1}, 3).ok());
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{3}).ok());
  EXPECT_EQ(cache.get_sequence(SeqId{3})->priority, 3u);
  EXPECT_EQ(cache.select_eviction_target(), SeqId{2});
}

TEST(Eviction, ChangingStrategyReordersVictims) {
  PagedKvCache cache(32, 4, 1, 8);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 4).ok());
  ASSERT_TRUE(cache.allocate(SeqId{2}, 12).ok());
  EXPECT_EQ(cache.select_eviction_target(), SeqId{1});
  ASSERT_TRUE(cache.set_eviction_strategy(EvictionStrategy::longest_first()).ok());
  EXPECT_EQ(cache.select_eviction_target(), SeqId{2});
  EXPECT_EQ(cache.set_eviction_strategy(EvictionStrategy::priority(0)).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(cache.eviction_strategy(), EvictionStrategy::longest_first());
}

TEST(Eviction, EmptyCacheHasNothingToEvict) {
  PagedKvCache cache(4, 4, 1, 8);
  EXPECT_FALSE(cache.select_eviction_target().has_value());
  const auto result = cache.evict();
  EXPECT_EQ(result.status().code(), ErrorCode::kNothingToEvict);
  EXPECT_EQ(result.status().message(), "No sequences to evict");
}

// The seed evicted every fork of a shared sequence before a private one. Sharers free nothing
// until the last one goes, so a private victim is taken first.
TEST(Eviction, ThresholdPrefersVictimsThatFreeMemory) {
  PagedKvCache cache(10, 4, 1, 8);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 16).ok());  // 4 blocks
  for (int id = 2; id <= 4; ++id)
    ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{id}).ok());
  ASSERT_TRUE(cache.allocate(SeqId{5}, 16).ok());  // 4 private blocks, newest
  const auto evicted = cache.evict_to_threshold(0.5);
  ASSERT_TRUE(evicted.ok());
  EXPECT_EQ(evicted.value(), std::vector<SeqId>{SeqId{5}});
  EXPECT_EQ(cache.num_sequences(), 4u);

  // When only sharers remain, they go in LRU order until the blocks are free.
  const auto rest = cache.evict_to_threshold(0.0);
  EXPECT_EQ(rest.value(), (std::vector<SeqId>{SeqId{1}, SeqId{2}, SeqId{3}, SeqId{4}}));
  EXPECT_EQ(cache.used_block_count(), 0u);
}

TEST(Eviction, ThresholdConventionIsCoherent) {
  PagedKvCache cache = PagedKvCache(10, 4, 1, 8).with_eviction_threshold(0.5);
  for (int id = 0; id < 5; ++id)
    ASSERT_TRUE(cache.allocate(SeqId{id}, 4).ok());
  // At exactly the threshold nothing needs evicting, and evicting to it does nothing.
  EXPECT_FALSE(cache.needs_eviction());
  EXPECT_TRUE(cache.evict_to_threshold().value().empty());
  ASSERT_TRUE(cache.allocate(SeqId{5}, 4).ok());
  EXPECT_TRUE(cache.needs_eviction());
  EXPECT_EQ(cache.evict_to_threshold().value().size(), 1u);
  EXPECT_FALSE(cache.needs_eviction());
}

TEST(Eviction, ThresholdValidation) {
  PagedKvCache cache(10, 4, 1, 8);
  EXPECT_EQ(cache.evict_to_threshold(std::nan("")).status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(cache.evict_to_threshold(-0.1).status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(cache.set_eviction_threshold(1.5).code(), ErrorCode::kInvalidArgument);
  cache.with_eviction_threshold(std::nan(""));  // ignored, logged
  EXPECT_EQ(cache.eviction_threshold(), 0.9);
  cache.with_eviction_threshold(7.0);  // clamped, as the seed
  EXPECT_EQ(cache.eviction_threshold(), 1.0);
  // An empty cache never needs eviction, even at threshold 0.
  ASSERT_TRUE(cache.set_eviction_threshold(0.0).ok());
  EXPECT_FALSE(cache.needs_eviction());
}

TEST(Eviction, SequenceIdsAreSorted) {
  PagedKvCache cache(64, 4, 1, 8);
  for (int id : {42, 7, 19, 3, 100, 8})
    ASSERT_TRUE(cache.allocate(SeqId{id}, 1).ok());
  EXPECT_EQ(cache.sequence_ids(),
            (std::vector<SeqId>{SeqId{3}, SeqId{7}, SeqId{8}, SeqId{19}, SeqId{42}, SeqId{100}}));
}

TEST(Construction, InvalidArgumentsGiveAnUnusableCacheWithTheReason) {
  PagedKvCache zero_block_size(10, 0, 1, 8);
  EXPECT_EQ(zero_block_size.init_status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(zero_block_size.init_status().message().find("block_size"), std::string::npos);
  EXPECT_EQ(zero_block_size.allocate(SeqId{1}, 4).code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(zero_block_size.total_blocks(), 0u);

  EXPECT_FALSE(PagedKvCache::create(size_t{1} << 33, 16, 1, 8).ok());
  EXPECT_TRUE(PagedKvCache::create(8, 16, 1, 8).ok());
}

TEST(Construction, FromConfig) {
  Config config;
  config.model = ModelConfig{"m", 4, 8, 4, 64, DType::kBF16};
  config.cache.block_size = 16;
  config.cache.num_blocks = 128;
  config.cache.kv_dtype = DType::kInt4;
  config.cache.quant_group_size = 32;
  config.cache.eviction.strategy = EvictionPolicy::kPriority;
  config.cache.eviction.priority_levels = 2;
  config.cache.eviction.threshold = 0.75;
  config.topology.tp = 2;

  PagedKvCache cache(config);
  ASSERT_TRUE(cache.init_status().ok()) << cache.init_status();
  EXPECT_EQ(cache.total_blocks(), 128u);
  EXPECT_EQ(cache.eviction_strategy(), EvictionStrategy::priority(2));
  EXPECT_EQ(cache.eviction_threshold(), 0.75);
  // 4 layers, 2 local KV heads, 16 tokens, 64 dims at 4 bits + (f32 scale, u8 zero) per group.
  const uint64_t data = 4ull * 2 * 2 * 16 * 64 / 2;
  const uint64_t groups = 4ull * 2 * 2 * 16 * 2;
  EXPECT_EQ(cache.block_memory_bytes(), data + groups * 5);
  EXPECT_EQ(cache.block_layout(), block_layout(config).value());

  config.cache.quant_group_size = 48;
  const auto bad = PagedKvCache::create(config);
  EXPECT_EQ(bad.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("group_size"), std::string::npos);
}

}  // namespace
}  // namespace kvfabric
