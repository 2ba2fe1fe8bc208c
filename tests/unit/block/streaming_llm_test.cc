// StreamingLLM compaction (seed-semantics.md §D3a, §E1.1): exactly the sink and the window stay,
// as one contiguous sequence whose table has ceil(tokens / block_size) blocks.
#include <gtest/gtest.h>

#include <tuple>

#include "kvfabric/block/eviction_strategy.h"
#include "kvfabric/block/paged_kv_cache.h"
#include "testing/slot_model.h"

namespace kvfabric {
namespace {

using testing::token_ids;

std::vector<int64_t> kept_tokens(size_t n, size_t sink, size_t window) {
  std::vector<int64_t> expected = token_ids(0, sink);
  const auto tail = token_ids(static_cast<int64_t>(n - window), window);
  expected.insert(expected.end(), tail.begin(), tail.end());
  return expected;
}

struct Case {
  size_t n, bs, sink, window;
  size_t expected_copied;  // tokens the storage layer must move
};

class SeedDefectCases : public ::testing::TestWithParam<Case> {};

// Every configuration the seed got wrong (seed-semantics.md Appendix A).
TEST_P(SeedDefectCases, KeepsExactlySinkAndWindow) {
  const Case c = GetParam();
  PagedKvCache cache(64, c.bs, 1, 8);
  testing::SlotModel slots(64, c.bs);
  ASSERT_TRUE(cache.allocate(SeqId{1}, c.n).ok());
  slots.write(*cache.get_sequence(SeqId{1}), 0, token_ids(0, c.n));

  const auto dropped = cache.apply_streaming_llm(SeqId{1}, c.sink, c.window);
  ASSERT_TRUE(dropped.ok()) << dropped.status();
  EXPECT_EQ(dropped.value(), c.n - c.sink - c.window);
  const SequenceInfo* seq = cache.get_sequence(SeqId{1});
  const size_t keep = c.sink + c.window;
  EXPECT_EQ(seq->num_tokens, keep);
  EXPECT_EQ(seq->num_blocks(), (keep + c.bs - 1) / c.bs);
  EXPECT_EQ(cache.used_block_count(), seq->num_blocks());  // everything else was freed
  EXPECT_EQ(cache.stats().compaction_copied_tokens, c.expected_copied);
  slots.apply(cache.take_pending_copies());
  EXPECT_EQ(slots.read(*seq), kept_tokens(c.n, c.sink, c.window));

  // The next token lands right after the window, not on top of it.
  ASSERT_TRUE(cache.append(SeqId{1}, 1).ok());
  slots.apply(cache.take_pending_copies());
  slots.write(*cache.get_sequence(SeqId{1}), keep, {999});
  auto expected = kept_tokens(c.n, c.sink, c.window);
  expected.push_back(999);
  EXPECT_EQ(slots.read(*cache.get_sequence(SeqId{1})), expected);
  EXPECT_TRUE(cache.verify_integrity().ok());
}

INSTANTIATE_TEST_SUITE_P(
    AppendixA, SeedDefectCases,
    ::testing::Values(Case{160, 16, 4, 16, 16},  // unaligned shift: the window moves
                      Case{160, 16, 16, 16, 0},  // aligned: whole blocks dropped, no copy
                      Case{160, 16, 0, 32, 0},   // no sink
                      Case{100, 16, 4, 30, 30},  // partial last block
                      Case{64, 16, 20, 20, 20},  // sink and window share a block
                      Case{48, 16, 40, 1, 1}));  // drops 7 tokens inside one block

TEST(StreamingLlm, AlignedShiftCopiesTheSmallerPart) {
  PagedKvCache cache(16, 16, 1, 8);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 58).ok());  // sink 3, window 39: shift 16
  ASSERT_TRUE(cache.apply_streaming_llm(SeqId{1}, 3, 39).ok());
  // The mixed block holds 3 sink tokens and 13 window tokens: copy the 3 sink tokens.
  ASSERT_EQ(cache.pending_copies().size(), 1u);
  EXPECT_EQ(cache.pending_copies()[0].num_tokens, 3u);
}

TEST(StreamingLlm, ConfiguredStrategyParameters) {
  PagedKvCache cache =
      PagedKvCache(16, 4, 1, 8).with_eviction_strategy(EvictionStrategy::streaming_llm(2, 5));
  ASSERT_TRUE(cache.allocate(SeqId{1}, 30).ok());
  EXPECT_EQ(cache.apply_streaming_llm(SeqId{1}).value(), 23u);
  EXPECT_EQ(cache.get_sequence(SeqId{1})->num_tokens, 7u);
  EXPECT_EQ(cache.stats().streaming_evicted_tokens, 23u);
  EXPECT_EQ(cache.stats().compactions, 1u);

  PagedKvCache lru(16, 4, 1, 8);
  ASSERT_TRUE(lru.allocate(SeqId{1}, 30).ok());
  EXPECT_EQ(lru.apply_streaming_llm(SeqId{1}).status().code(), ErrorCode::kInvalidOperation);
}

TEST(StreamingLlm, SharedBlocksAreNotWrittenInPlace) {
  PagedKvCache cache(32, 4, 1, 8);
  testing::SlotModel slots(32, 4);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 30).ok());
  slots.write(*cache.get_sequence(SeqId{1}), 0, token_ids(0, 30));
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{2}).ok());
  const size_t used_before = cache.used_block_count();

  ASSERT_TRUE(cache.apply_streaming_llm(SeqId{2}, 3, 6).ok());  // unaligned shift of 21
  slots.apply(cache.take_pending_copies());
  EXPECT_EQ(slots.read(*cache.get_sequence(SeqId{2})), kept_tokens(30, 3, 6));
  EXPECT_EQ(slots.read(*cache.get_sequence(SeqId{1})), token_ids(0, 30));  // the sibling is intact
  EXPECT_EQ(cache.used_block_count(), used_before + 3);  // three private blocks for S2
  EXPECT_TRUE(cache.verify_integrity().ok());
}

TEST(StreamingLlm, SharedCompactionOutOfMemoryChangesNothing) {
  PagedKvCache cache(8, 4, 1, 8);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 30).ok());  // 8 blocks: the pool is full
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{2}).ok());
  const auto result = cache.apply_streaming_llm(SeqId{2}, 3, 6);
  EXPECT_EQ(result.status().code(), ErrorCode::kOutOfMemory);
  EXPECT_EQ(cache.get_sequence(SeqId{2})->num_tokens, 30u);
  EXPECT_TRUE(cache.pending_copies().empty());
  EXPECT_EQ(cache.stats().compactions, 0u);
  EXPECT_TRUE(cache.verify_integrity().ok());
}

// Every (n, block_size, sink, window) up to 40 tokens: the model proves the copies are right.
TEST(StreamingLlm, ExhaustiveSmallShapes) {
  for (size_t bs : {1, 3, 4, 16}) {
    for (size_t n = 1; n <= 40; ++n) {
      for (size_t sink = 0; sink < n; ++sink) {
        for (size_t window = 0; sink + window < n; ++window) {
          PagedKvCache cache(64, bs, 1, 8);
          testing::SlotModel slots(64, bs);
          ASSERT_TRUE(cache.allocate(SeqId{1}, n).ok());
          slots.write(*cache.get_sequence(SeqId{1}), 0, token_ids(0, n));
          ASSERT_EQ(cache.apply_streaming_llm(SeqId{1}, sink, window).value(), n - sink - window);
          slots.apply(cache.take_pending_copies());
          const SequenceInfo* seq = cache.get_sequence(SeqId{1});
          ASSERT_EQ(seq->num_blocks(), (sink + window + bs - 1) / bs);
          ASSERT_EQ(slots.read(*seq), kept_tokens(n, sink, window))
              << "n=" << n << " bs=" << bs << " sink=" << sink << " window=" << window;
          ASSERT_EQ(cache.used_block_count(), seq->num_blocks());
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvfabric
