// PrefixBlockIndex and PagedPrefixCache: hits share blocks by reference, cached blocks outlive
// their sequences, pressure evicts them leaf by leaf, and bad input changes nothing.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "kvfabric/block/paged_kv_cache.h"
#include "kvfabric/prefix/paged_prefix_cache.h"
#include "kvfabric/prefix/prefix_block_index.h"

namespace kvfabric {
namespace {

using Tokens = std::vector<TokenId>;
constexpr size_t kBlockSize = 4;

Tokens seq_tokens(TokenId first, size_t n) {
  Tokens t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}
Tokens concat(Tokens a, const Tokens& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

class PagedPrefixCacheTest : public ::testing::Test {
 protected:
  explicit PagedPrefixCacheTest(PrefixIndexOptions options = {}, size_t blocks = 16)
      : cache_(PagedPrefixCache::create(PagedKvCache(blocks, kBlockSize, 2, 8), options).value()) {}

  // A request: allocate, "prefill", index the prompt. Returns the cached tokens.
  size_t run(SeqId seq, const Tokens& prompt, uint32_t priority = 0) {
    const auto hit = cache_.allocate(seq, prompt);
    EXPECT_TRUE(hit.ok()) << hit.status();
    EXPECT_TRUE(cache_.insert(seq, prompt, priority).ok());
    return hit.value_or(0);
  }
  const std::vector<BlockId>& table(SeqId seq) {
    return cache_.pool().get_sequence(seq)->block_ids;
  }
  void expect_consistent() {
    EXPECT_TRUE(cache_.verify_integrity().ok()) << cache_.verify_integrity();
  }

  PagedPrefixCache cache_;
};

TEST_F(PagedPrefixCacheTest, AHitSharesTheCachedBlocksByReference) {
  const Tokens a = seq_tokens(100, 10);  // 2 full blocks + 2 tokens
  EXPECT_EQ(run(SeqId{1}, a), 0u);
  EXPECT_EQ(cache_.index().cached_blocks(), 2u);  // only full blocks are cached
  const Tokens b = concat(seq_tokens(100, 8), seq_tokens(7, 4));
  const auto hit = cache_.allocate(SeqId{2}, b);
  ASSERT_TRUE(hit.ok());
  EXPECT_EQ(hit.value(), 8u);
  EXPECT_EQ(table(SeqId{2})[0], table(SeqId{1})[0]);
  EXPECT_EQ(table(SeqId{2})[1], table(SeqId{1})[1]);
  EXPECT_NE(table(SeqId{2})[2], table(SeqId{1})[2]);
  EXPECT_EQ(cache_.pool().block_ref_count(table(SeqId{1})[0]), 3u);  // two sequences + index
  EXPECT_TRUE(cache_.pool().pending_copies().empty());               // no copy for a hit
  EXPECT_EQ(cache_.pool().stats().shared_prefix_blocks, 2u);
  const auto& stats = cache_.index().stats();
  EXPECT_EQ(stats.lookups, 2u);
  EXPECT_EQ(stats.hit_blocks, 2u);
  EXPECT_DOUBLE_EQ(stats.hit_ratio(), 8.0 / 22.0);
  expect_consistent();
}

TEST_F(PagedPrefixCacheTest, IndexedBlocksStayCachedAfterTheirSequenceEnds) {
  const Tokens a = seq_tokens(100, 12);
  run(SeqId{1}, a);
  ASSERT_TRUE(cache_.pool().free(SeqId{1}).ok());
  EXPECT_EQ(cache_.pool().cached_block_count(), 3u);
  EXPECT_EQ(cache_.pool().free_block_count(), 13u);
  EXPECT_EQ(cache_.pool().used_block_count(), 0u);
  expect_consistent();

  EXPECT_EQ(run(SeqId{2}, a), 12u);  // the whole prompt is cached
  EXPECT_EQ(cache_.pool().cached_block_count(), 0u);
  EXPECT_EQ(cache_.pool().stats().total_allocations, 3u);  // nothing new was taken
  expect_consistent();
}

TEST_F(PagedPrefixCacheTest, PressureEvictsTheLeastRecentlyUsedBlocksDeepestFirst) {
  const Tokens a = seq_tokens(100, 24);  // 6 blocks
  const Tokens b = seq_tokens(500, 24);  // 6 blocks
  run(SeqId{1}, a);
  run(SeqId{2}, b);
  ASSERT_TRUE(cache_.pool().free(SeqId{1}).ok());
  ASSERT_TRUE(cache_.pool().free(SeqId{2}).ok());
  ASSERT_EQ(cache_.pool().free_block_count(), 4u);
  // 7 new blocks: 4 free, then the 3 deepest blocks of the older prefix (a).
  EXPECT_EQ(run(SeqId{3}, seq_tokens(900, 28)), 0u);
  EXPECT_EQ(cache_.index().stats().evicted_blocks, 3u);
  EXPECT_EQ(cache_.pool().stats().cached_blocks_reclaimed, 3u);
  EXPECT_EQ(cache_.index().peek(a).tokens, 12u);  // a keeps its first 3 blocks
  EXPECT_EQ(cache_.index().peek(b).tokens, 24u);
  expect_consistent();
}

TEST_F(PagedPrefixCacheTest, AllocationFailsOnlyWhenCachedBlocksCannotCoverIt) {
  run(SeqId{1}, seq_tokens(100, 32));  // 8 blocks, held
  run(SeqId{2}, seq_tokens(500, 16));  // 4 blocks, cached after free
  ASSERT_TRUE(cache_.pool().free(SeqId{2}).ok());
  ASSERT_EQ(cache_.pool().available_block_count(), 8u);
  const auto stats_before = cache_.index().stats();
  const size_t nodes_before = cache_.index().node_count();
  // Shares b's first 2 blocks (idle: no longer available) and needs 7 more: only 6 remain.
  const Tokens c = concat(seq_tokens(500, 8), seq_tokens(2000, 28));
  const auto failed = cache_.allocate(SeqId{3}, c);
  EXPECT_EQ(failed.status().message(), "Out of memory: requested 7 blocks, 6 available");
  EXPECT_EQ(cache_.index().stats().lookups, stats_before.lookups);  // not even counted
  EXPECT_EQ(cache_.index().node_count(), nodes_before);             // no split
  EXPECT_EQ(cache_.pool().cached_block_count(), 4u);
  EXPECT_EQ(cache_.pool().get_sequence(SeqId{3}), nullptr);
  expect_consistent();
  // One block shorter fits: the 2 shared + 6 new.
  EXPECT_EQ(cache_.allocate(SeqId{3}, concat(seq_tokens(500, 8), seq_tokens(2000, 24))).value(),
            8u);
  EXPECT_EQ(cache_.pool().free_block_count() + cache_.pool().cached_block_count(), 0u);
  expect_consistent();
}

TEST_F(PagedPrefixCacheTest, APartialHitSplitsTheNodeAndLeavesItsRestEvictable) {
  const Tokens a = seq_tokens(100, 16);
  run(SeqId{1}, a);
  ASSERT_TRUE(cache_.pool().free(SeqId{1}).ok());
  ASSERT_EQ(cache_.index().node_count(), 1u);
  EXPECT_EQ(cache_.allocate(SeqId{2}, concat(seq_tokens(100, 8), seq_tokens(7, 8))).value(), 8u);
  EXPECT_EQ(cache_.index().node_count(), 2u);
  EXPECT_EQ(cache_.pool().cached_block_count(), 2u);  // the unmatched half is still evictable
  expect_consistent();
}

// S uses all of a node; T's hit splits it; when S ends, the half T does not use is idle. Its
// pins used to stay where S placed them, on the lower half, keeping those blocks counted as used
// and out of eviction's reach for as long as T ran.
TEST_F(PagedPrefixCacheTest, AUseMovesWithItsBlockWhenAHitSplitsTheNode) {
  const Tokens a = seq_tokens(100, 16);
  run(SeqId{1}, a);
  EXPECT_EQ(cache_.allocate(SeqId{2}, concat(seq_tokens(100, 8), seq_tokens(7, 8))).value(), 8u);
  ASSERT_TRUE(cache_.pool().free(SeqId{1}).ok());
  EXPECT_EQ(cache_.pool().cached_block_count(), 2u);  // [8, 16) of a: idle and evictable
  EXPECT_EQ(cache_.pool().used_block_count(), 4u);    // S2's shared half and its own two blocks
  expect_consistent();
  ASSERT_TRUE(cache_.pool().allocate(SeqId{3}, 12 * kBlockSize).ok());  // 10 free + the idle 2
  EXPECT_EQ(cache_.index().peek(a).tokens, 8u);
  expect_consistent();
}

TEST_F(PagedPrefixCacheTest, ConcurrentPrefillsOfTheSamePromptIndexOneCopy) {
  const Tokens a = seq_tokens(100, 8);
  ASSERT_EQ(cache_.allocate(SeqId{1}, a).value(), 0u);
  ASSERT_EQ(cache_.allocate(SeqId{2}, a).value(), 0u);  // both miss: nothing inserted yet
  EXPECT_EQ(cache_.insert(SeqId{1}, a).value(), 2u);
  EXPECT_EQ(cache_.insert(SeqId{2}, a).value(), 0u);  // already cached: its copies stay private
  ASSERT_TRUE(cache_.pool().free(SeqId{2}).ok());
  EXPECT_EQ(cache_.pool().free_block_count(), 14u);  // S2's duplicates were freed
  ASSERT_TRUE(cache_.pool().free(SeqId{1}).ok());
  EXPECT_EQ(cache_.pool().cached_block_count(), 2u);
  expect_consistent();
}

TEST_F(PagedPrefixCacheTest, ForksAndEvictionsKeepTheAccountsRight) {
  const Tokens a = seq_tokens(100, 12);
  run(SeqId{1}, a);
  ASSERT_TRUE(cache_.pool().fork(SeqId{1}, SeqId{2}).ok());
  ASSERT_TRUE(cache_.pool().evict().ok());            // S1, the least recently used
  EXPECT_EQ(cache_.pool().cached_block_count(), 0u);  // S2 still holds them
  ASSERT_TRUE(cache_.pool().append(SeqId{2}, 5).ok());
  ASSERT_TRUE(cache_.pool().free(SeqId{2}).ok());
  EXPECT_EQ(cache_.pool().cached_block_count(), 3u);
  EXPECT_EQ(cache_.pool().free_block_count(), 13u);
  expect_consistent();
}

TEST_F(PagedPrefixCacheTest, ClearingTheIndexFreesIdleBlocksAndLeavesUsedOnes) {
  run(SeqId{1}, seq_tokens(100, 8));
  run(SeqId{2}, seq_tokens(500, 8));
  ASSERT_TRUE(cache_.pool().free(SeqId{1}).ok());
  cache_.clear_index();
  EXPECT_EQ(cache_.index().cached_blocks(), 0u);
  EXPECT_EQ(cache_.pool().free_block_count(), 14u);
  EXPECT_EQ(cache_.pool().block_ref_count(table(SeqId{2})[0]), 1u);
  EXPECT_EQ(cache_.allocate(SeqId{3}, seq_tokens(100, 8)).value(), 0u);
  expect_consistent();
}

TEST_F(PagedPrefixCacheTest, BadInputIsAnErrorAndChangesNothing) {
  run(SeqId{1}, seq_tokens(100, 8));
  EXPECT_EQ(cache_.insert(SeqId{9}, seq_tokens(100, 8)).status().code(),
            ErrorCode::kSequenceNotFound);
  EXPECT_EQ(cache_.insert(SeqId{1}, seq_tokens(100, 9)).status().code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(cache_.allocate(SeqId{1}, seq_tokens(100, 8)).status().code(),
            ErrorCode::kInvalidOperation);
  EXPECT_EQ(cache_.index().stats().lookups, 1u);
  expect_consistent();
}

TEST(PagedPrefixCacheCreate, RejectsMismatchedOrAttachedPools) {
  PrefixIndexOptions options;
  options.block_size = 8;
  EXPECT_EQ(PagedPrefixCache::create(PagedKvCache(4, kBlockSize, 2, 8), options).status().message(),
            "prefix index block_size 8 differs from the pool's 4");
  PagedKvCache bad(4, 0, 2, 8);
  EXPECT_EQ(PagedPrefixCache::create(std::move(bad)).status().code(), ErrorCode::kInvalidArgument);
  auto attached = PagedKvCache(4, kBlockSize, 2, 8);
  PrefixIndexOptions standalone;
  standalone.block_size = kBlockSize;
  auto other = PrefixBlockIndex::create(standalone, 4).value();
  ASSERT_TRUE(attached.set_block_retainer(other.get()).ok());
  EXPECT_EQ(PagedPrefixCache::create(std::move(attached)).status().code(),
            ErrorCode::kInvalidOperation);
}

TEST(PagedPrefixCacheCreate, SurvivesAMove) {
  auto created = PagedPrefixCache::create(PagedKvCache(8, kBlockSize, 2, 8));
  ASSERT_TRUE(created.ok());
  PagedPrefixCache cache = std::move(created).value();
  ASSERT_TRUE(cache.allocate(SeqId{1}, seq_tokens(1, 8)).ok());
  ASSERT_TRUE(cache.insert(SeqId{1}, seq_tokens(1, 8)).ok());
  PagedPrefixCache moved = std::move(cache);
  ASSERT_TRUE(moved.pool().free(SeqId{1}).ok());  // notifies the (same) index
  EXPECT_EQ(moved.pool().cached_block_count(), 2u);
  EXPECT_TRUE(moved.verify_integrity().ok()) << moved.verify_integrity();
}

class PriorityPrefixCacheTest : public PagedPrefixCacheTest {
 protected:
  PriorityPrefixCacheTest()
      : PagedPrefixCacheTest(PrefixIndexOptions{.order = RadixEvictionOrder::kPriority}) {}
};

TEST_F(PriorityPrefixCacheTest, LowPriorityPrefixesGoFirst) {
  const Tokens a = seq_tokens(100, 16);
  const Tokens b = seq_tokens(500, 16);
  run(SeqId{1}, a, /*priority=*/1);
  run(SeqId{2}, b, /*priority=*/0);  // newer but less important
  ASSERT_TRUE(cache_.pool().free(SeqId{1}).ok());
  ASSERT_TRUE(cache_.pool().free(SeqId{2}).ok());
  run(SeqId{3}, seq_tokens(900, 44));  // 11 blocks: 8 free + 3 cached
  EXPECT_EQ(cache_.index().peek(a).tokens, 16u);
  EXPECT_EQ(cache_.index().peek(b).tokens, 4u);
  expect_consistent();
}

class PartialBlockPrefixCacheTest : public PagedPrefixCacheTest {
 protected:
  PartialBlockPrefixCacheTest()
      : PagedPrefixCacheTest(PrefixIndexOptions{.cache_partial_blocks = true}) {}
};

TEST_F(PartialBlockPrefixCacheTest, ARepeatedPromptSharesItsPartlyFilledLastBlock) {
  const Tokens a = seq_tokens(100, 10);
  run(SeqId{1}, a);
  EXPECT_EQ(cache_.index().cached_blocks(), 3u);
  // The owner's next token goes to a private copy of the now shared last block.
  ASSERT_TRUE(cache_.pool().append(SeqId{1}, 1).ok());
  ASSERT_EQ(cache_.pool().take_pending_copies().size(), 1u);
  ASSERT_TRUE(cache_.pool().free(SeqId{1}).ok());

  EXPECT_EQ(run(SeqId{2}, a), 10u);  // every token, the partial block included
  EXPECT_EQ(cache_.pool().stats().shared_prefix_blocks, 3u);
  ASSERT_TRUE(cache_.pool().append(SeqId{2}, 1).ok());
  const auto copies = cache_.pool().take_pending_copies();
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].num_tokens, 2u);
  EXPECT_EQ(copies[0].reason, CopyReason::kCopyOnWrite);
  // Another ending of the same block does not match the partial block.
  EXPECT_EQ(cache_.index().peek(concat(seq_tokens(100, 9), Tokens{1})).tokens, 8u);
  EXPECT_EQ(cache_.index().peek(seq_tokens(100, 11)).tokens, 8u);
  expect_consistent();
}

// ---------------------------------------------------------------------------------------------
// The index on its own.

TEST(PrefixBlockIndex, RecordsWhereItsBlocksLive) {
  PrefixIndexOptions options;
  options.block_size = 2;
  options.replica = 3;
  options.tier = StorageTier::kHost;
  auto index = PrefixBlockIndex::create(options, 8).value();
  const Tokens key = {1, 2, 3, 4, 5, 6};
  ASSERT_TRUE(index->insert(key, std::vector<BlockId>{BlockId{5}, BlockId{6}, BlockId{7}}).ok());
  ASSERT_TRUE(index->insert(Tokens{1, 2, 9, 9}, std::vector<BlockId>{BlockId{5}, BlockId{0}}).ok());
  const auto placements = index->placements(key);
  ASSERT_EQ(placements.size(), 2u);  // the shared first block, then the rest of `key`
  EXPECT_EQ(placements[0], (BlockPlacement{3, StorageTier::kHost, {BlockId{5}}}));
  EXPECT_EQ(placements[1], (BlockPlacement{3, StorageTier::kHost, {BlockId{6}, BlockId{7}}}));
  EXPECT_EQ(storage_tier_name(placements[0].tier), "host");
  EXPECT_TRUE(index->verify().ok()) << index->verify();
}

TEST(PrefixBlockIndex, RejectsBadBlocks) {
  PrefixIndexOptions options;
  options.block_size = 2;
  EXPECT_EQ(PrefixBlockIndex::create(PrefixIndexOptions{}, 8).status().code(),
            ErrorCode::kInvalidArgument);
  auto index = PrefixBlockIndex::create(options, 8).value();
  const Tokens key = {1, 2, 3, 4};
  EXPECT_EQ(index->insert(key, std::vector<BlockId>{BlockId{1}}).status().code(),
            ErrorCode::kInvalidArgument);  // too few blocks
  EXPECT_EQ(index->insert(key, std::vector<BlockId>{BlockId{1}, BlockId{8}}).status().message(),
            "B8 is outside the pool of 8 blocks");
  EXPECT_EQ(index->insert(key, std::vector<BlockId>{BlockId{1}, BlockId{1}}).status().message(),
            "B1 is listed twice");
  ASSERT_TRUE(index->insert(key, std::vector<BlockId>{BlockId{1}, BlockId{2}}).ok());
  EXPECT_EQ(index->insert(Tokens{7, 7}, std::vector<BlockId>{BlockId{2}}).status().message(),
            "B2 is already indexed for another prefix");
  EXPECT_EQ(index->cached_blocks(), 2u);
  EXPECT_EQ(index->stats().insertions, 1u);
  EXPECT_TRUE(index->verify().ok()) << index->verify();
}

TEST(PrefixBlockIndex, IdleBlocksComeBackLeafByLeaf) {
  PrefixIndexOptions options;
  options.block_size = 1;
  auto index = PrefixBlockIndex::create(options, 8).value();
  const std::vector<BlockId> blocks = {BlockId{0}, BlockId{1}, BlockId{2}};
  ASSERT_TRUE(index->insert(Tokens{1, 2, 3}, blocks).ok());
  EXPECT_EQ(index->idle_blocks(), 0u);  // the inserting sequence holds them
  EXPECT_TRUE(index->release_idle(1).empty());
  for (BlockId b : blocks)
    index->on_block_idle(b);
  EXPECT_EQ(index->idle_blocks(), 3u);
  EXPECT_EQ(index->release_idle(2), (std::vector<BlockId>{BlockId{1}, BlockId{2}}));  // the tail
  index->on_block_used(BlockId{0});
  EXPECT_TRUE(index->release_idle(1).empty());
  EXPECT_TRUE(index->verify().ok()) << index->verify();
}

}  // namespace
}  // namespace kvfabric
