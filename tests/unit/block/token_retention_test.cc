// retain_tokens: token-level compression by any selection (H2O, PyramidKV). The kept tokens read
// back in order through the new table, sharers never see a write, blocks are freed exactly, and
// bad input changes nothing.
#include <gtest/gtest.h>

#include <random>
#include <sstream>

#include "kvfabric/block/paged_kv_cache.h"
#include "testing/slot_model.h"

namespace kvfabric {
namespace {

std::vector<int64_t> tokens_at(const std::vector<int64_t>& tokens,
                               const std::vector<size_t>& positions) {
  std::vector<int64_t> out;
  for (size_t p : positions)
    out.push_back(tokens[p]);
  return out;
}

using testing::token_ids;

std::string snapshot(const PagedKvCache& cache) {
  std::ostringstream os;
  os << cache;
  for (SeqId seq : cache.sequence_ids()) {
    const SequenceInfo* info = cache.get_sequence(seq);
    os << seq << ":" << info->num_tokens << ":" << info->last_access;
    for (BlockId b : info->block_ids)
      os << "," << b;
    os << ";";
  }
  os << cache.stats().compaction_copied_tokens << cache.pending_copies().size();
  return os.str();
}

TEST(TokenRetention, KeepsTheSelectedTokensInOrder) {
  PagedKvCache cache(16, 4, 1, 8);
  testing::SlotModel slots(16, 4);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 22).ok());
  slots.write(*cache.get_sequence(SeqId{1}), 0, token_ids(0, 22));

  // H2O-like: a few heavy hitters early on, then a recent window.
  const std::vector<size_t> keep = {0, 1, 5, 9, 10, 11, 17, 18, 19, 20, 21};
  auto dropped = cache.retain_tokens(SeqId{1}, keep);
  ASSERT_TRUE(dropped.ok()) << dropped.status();
  EXPECT_EQ(*dropped, 11u);
  const SequenceInfo* seq = cache.get_sequence(SeqId{1});
  EXPECT_EQ(seq->num_tokens, 11u);
  EXPECT_EQ(seq->num_blocks(), 3u);
  EXPECT_EQ(cache.used_block_count(), 3u);
  slots.apply(cache.take_pending_copies());
  EXPECT_EQ(slots.read(*seq), tokens_at(token_ids(0, 22), keep));
  // Tokens 0 and 1 stayed in their slots; the other nine moved.
  EXPECT_EQ(cache.stats().compaction_copied_tokens, 9u);
  EXPECT_EQ(cache.stats().selection_evicted_tokens, 11u);
  EXPECT_EQ(cache.stats().compactions, 1u);
  EXPECT_TRUE(cache.verify_integrity().ok());

  // The next token goes right after the kept ones.
  ASSERT_TRUE(cache.append(SeqId{1}, 1).ok());
  slots.write(*cache.get_sequence(SeqId{1}), 11, {99});
  auto expected = tokens_at(token_ids(0, 22), keep);
  expected.push_back(99);
  EXPECT_EQ(slots.read(*cache.get_sequence(SeqId{1})), expected);
}

// The same selection with the dropped slots filled by the later kept tokens (the order
// quant::fill_dropped_slots gives): only the six tokens past the kept count move.
TEST(TokenRetention, FillingDroppedSlotsMovesOnlyTheLaterTokens) {
  PagedKvCache cache(16, 4, 1, 8);
  testing::SlotModel slots(16, 4);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 22).ok());
  slots.write(*cache.get_sequence(SeqId{1}), 0, token_ids(0, 22));
  const std::vector<size_t> order = {0, 1, 11, 17, 18, 5, 19, 20, 21, 9, 10};
  auto dropped = cache.retain_tokens(SeqId{1}, order);
  ASSERT_TRUE(dropped.ok()) << dropped.status();
  EXPECT_EQ(*dropped, 11u);
  const SequenceInfo* seq = cache.get_sequence(SeqId{1});
  EXPECT_EQ(seq->num_blocks(), 3u);
  slots.apply(cache.take_pending_copies());
  EXPECT_EQ(slots.read(*seq), tokens_at(token_ids(0, 22), order));
  EXPECT_EQ(cache.stats().compaction_copied_tokens, 6u);
  EXPECT_TRUE(cache.verify_integrity().ok());
}

TEST(TokenRetention, KeepingAPrefixMovesNothing) {
  PagedKvCache cache(16, 4, 1, 8);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 20).ok());
  std::vector<size_t> keep(9);
  for (size_t i = 0; i < keep.size(); ++i)
    keep[i] = i;
  auto dropped = cache.retain_tokens(SeqId{1}, keep);
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(*dropped, 11u);
  EXPECT_TRUE(cache.pending_copies().empty());
  EXPECT_EQ(cache.used_block_count(), 3u);
}

TEST(TokenRetention, EdgeSelections) {
  PagedKvCache cache(16, 4, 1, 8);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 10).ok());
  const std::string before = snapshot(cache);
  std::vector<size_t> all(10);
  for (size_t i = 0; i < 10; ++i)
    all[i] = i;
  auto none_dropped = cache.retain_tokens(SeqId{1}, all);
  ASSERT_TRUE(none_dropped.ok());
  EXPECT_EQ(*none_dropped, 0u);
  EXPECT_EQ(snapshot(cache), before);  // keeping everything is not an access

  auto all_dropped = cache.retain_tokens(SeqId{1}, std::vector<size_t>{});
  ASSERT_TRUE(all_dropped.ok());
  EXPECT_EQ(*all_dropped, 10u);
  EXPECT_EQ(cache.get_sequence(SeqId{1})->num_tokens, 0u);
  EXPECT_EQ(cache.used_block_count(), 0u);
  EXPECT_EQ(cache.free_block_count(), 16u);
  EXPECT_TRUE(cache.verify_integrity().ok());
}

TEST(TokenRetention, BadInputChangesNothing) {
  PagedKvCache cache(16, 4, 1, 8);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 10).ok());
  const std::string before = snapshot(cache);
  EXPECT_EQ(cache.retain_tokens(SeqId{7}, std::vector<size_t>{0}).status().code(),
            ErrorCode::kSequenceNotFound);
  const Status past = cache.retain_tokens(SeqId{1}, std::vector<size_t>{0, 10}).status();
  EXPECT_EQ(past.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(past.message().find("position 10 past the 10 tokens of S1"), std::string::npos);
  const Status repeated = cache.retain_tokens(SeqId{1}, std::vector<size_t>{2, 2}).status();
  EXPECT_NE(repeated.message().find("position 2 is kept twice"), std::string::npos);
  const Status later = cache.retain_tokens(SeqId{1}, std::vector<size_t>{5, 3, 1}).status();
  EXPECT_NE(later.message().find("position 1 would move to later slot 2"), std::string::npos);
  EXPECT_EQ(snapshot(cache), before);
}

// A shared block that would receive moved tokens is replaced by a fresh copy; when no block is
// left for that copy, the call fails and changes nothing.
TEST(TokenRetention, SharedBlocksAreCopiedNotWritten) {
  PagedKvCache cache(6, 4, 1, 8);
  testing::SlotModel slots(6, 4);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 12).ok());
  slots.write(*cache.get_sequence(SeqId{1}), 0, token_ids(0, 12));
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{2}).ok());
  ASSERT_TRUE(cache.allocate(SeqId{3}, 12).ok());  // leaves 0 free blocks

  const std::vector<size_t> keep = {0, 3, 4, 8, 11};
  const std::string before = snapshot(cache);
  EXPECT_EQ(cache.retain_tokens(SeqId{1}, keep).status().code(), ErrorCode::kOutOfMemory);
  EXPECT_EQ(snapshot(cache), before);

  ASSERT_TRUE(cache.free(SeqId{3}).ok());
  auto dropped = cache.retain_tokens(SeqId{1}, keep);
  ASSERT_TRUE(dropped.ok()) << dropped.status();
  slots.apply(cache.take_pending_copies());
  EXPECT_EQ(slots.read(*cache.get_sequence(SeqId{1})), tokens_at(token_ids(0, 12), keep));
  EXPECT_EQ(slots.read(*cache.get_sequence(SeqId{2})), token_ids(0, 12));  // the sharer is intact
  EXPECT_TRUE(cache.verify_integrity().ok());
}

// Blocks asked to end up the sequence's own are copied even where no token moves into them, so
// that a compacted prefix can be indexed without indexing a block twice.
TEST(TokenRetention, OwnBlocksAreCopiedEvenWhereNothingMoves) {
  PagedKvCache cache(7, 4, 1, 8);
  testing::SlotModel slots(7, 4);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 12).ok());
  slots.write(*cache.get_sequence(SeqId{1}), 0, token_ids(0, 12));
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{2}).ok());
  ASSERT_TRUE(cache.allocate(SeqId{3}, 12).ok());  // leaves 1 free block
  const std::vector<size_t> keep = {0, 1, 2, 3, 5, 9};  // block 0 stays whole; block 1 is written

  const std::string before = snapshot(cache);
  EXPECT_EQ(cache.retain_tokens(SeqId{1}, keep, 2).status().code(), ErrorCode::kOutOfMemory);
  EXPECT_EQ(snapshot(cache), before);
  ASSERT_TRUE(cache.free(SeqId{3}).ok());
  const BlockId shared_first = cache.get_sequence(SeqId{2})->block_ids[0];
  ASSERT_TRUE(cache.retain_tokens(SeqId{1}, keep, 2).ok());
  const SequenceInfo* seq = cache.get_sequence(SeqId{1});
  EXPECT_NE(seq->block_ids[0], shared_first);
  slots.apply(cache.take_pending_copies());
  EXPECT_EQ(slots.read(*seq), tokens_at(token_ids(0, 12), keep));
  EXPECT_EQ(slots.read(*cache.get_sequence(SeqId{2})), token_ids(0, 12));  // the sharer is intact
  EXPECT_TRUE(cache.verify_integrity().ok());

  // Without them, the whole block that nothing moves into stays shared.
  ASSERT_TRUE(cache.fork(SeqId{2}, SeqId{4}).ok());
  ASSERT_TRUE(cache.retain_tokens(SeqId{4}, keep).ok());
  EXPECT_EQ(cache.get_sequence(SeqId{4})->block_ids[0], shared_first);
}

// The blocks holding slots the next forward pass writes (from `uncomputed_from` on) become the
// sequence's own, shared ones copied up to their last computed slot: a fork sharing them
// computes its own K/V there, over other tokens.
TEST(TokenRetention, BlocksTheForwardPassWritesAreTheSequencesOwn) {
  PagedKvCache cache(8, 4, 1, 8);
  testing::SlotModel slots(8, 4);
  ASSERT_TRUE(cache.allocate(SeqId{1}, 12).ok());
  slots.write(*cache.get_sequence(SeqId{1}), 0, token_ids(0, 12));
  ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{2}).ok());
  const std::vector<BlockId> fork_table = cache.get_sequence(SeqId{2})->block_ids;
  // Dropping tokens 0-3 of 12 (the last 2 not computed yet) moves nothing into blocks 1 and 2.
  std::vector<size_t> keep = {8, 9, 10, 11, 4, 5, 6, 7};
  ASSERT_TRUE(cache.retain_tokens(SeqId{1}, keep, 0, 6).ok());
  const SequenceInfo* seq = cache.get_sequence(SeqId{1});
  ASSERT_EQ(seq->block_ids.size(), 2u);
  EXPECT_NE(seq->block_ids[1], fork_table[1]);  // slots 6 and 7 are written next: a copy
  const std::vector<TokenCopy> copies = cache.take_pending_copies();
  slots.apply(copies);
  // The copy brings the computed slots 4 and 5 only.
  const std::vector<int64_t> read = slots.read(*seq);
  EXPECT_EQ(std::vector<int64_t>(read.begin(), read.begin() + 6),
            tokens_at(token_ids(0, 12), std::vector<size_t>(keep.begin(), keep.begin() + 6)));
  uint32_t copied_into_block1 = 0;
  for (const TokenCopy& c : copies) copied_into_block1 += c.dst_block == seq->block_ids[1] ? c.num_tokens : 0;
  EXPECT_EQ(copied_into_block1, 2u);
  EXPECT_EQ(slots.read(*cache.get_sequence(SeqId{2})), token_ids(0, 12));  // the fork is intact
  EXPECT_TRUE(cache.verify_integrity().ok());
  // Every slot computed (the default): a partly filled last block nothing moves into stays shared.
  ASSERT_TRUE(cache.fork(SeqId{2}, SeqId{5}).ok());
  ASSERT_TRUE(cache.retain_tokens(SeqId{5}, std::vector<size_t>{0, 1, 2, 3, 4, 5}).ok());
  EXPECT_EQ(cache.get_sequence(SeqId{5})->block_ids,
            std::vector<BlockId>(fork_table.begin(), fork_table.begin() + 2));
  ASSERT_TRUE(cache.free(SeqId{5}).ok());

  // A sliding window likewise: block-aligned, it would keep the window's blocks in place.
  ASSERT_TRUE(cache.free(SeqId{1}).ok());
  ASSERT_TRUE(cache.free(SeqId{2}).ok());
  ASSERT_TRUE(cache.allocate(SeqId{3}, 12).ok());
  ASSERT_TRUE(cache.fork(SeqId{3}, SeqId{4}).ok());
  const std::vector<BlockId> window_fork = cache.get_sequence(SeqId{4})->block_ids;
  ASSERT_TRUE(cache.apply_streaming_llm(SeqId{3}, 0, 8, 6).ok());
  EXPECT_EQ(cache.get_sequence(SeqId{3})->block_ids[0], window_fork[1]);  // computed: shared
  EXPECT_NE(cache.get_sequence(SeqId{3})->block_ids[1], window_fork[2]);
  EXPECT_TRUE(cache.verify_integrity().ok());
}

// Random selections on random tables with forks: every kept token reads back in order, sharers
// never change, and freeing everything returns every block.
TEST(TokenRetention, RandomSelectionsWithSharers) {
  std::mt19937 rng(42);
  for (int trial = 0; trial < 300; ++trial) {
    const size_t bs = std::vector<size_t>{1, 2, 4, 16}[rng() % 4];
    const size_t blocks = 64;
    PagedKvCache cache(blocks, bs, 1, 8);
    testing::SlotModel slots(blocks, bs);
    const size_t n = rng() % (bs * 12);
    ASSERT_TRUE(cache.allocate(SeqId{1}, n).ok());
    slots.write(*cache.get_sequence(SeqId{1}), 0, token_ids(0, n));
    const bool shared = rng() % 2 == 0;
    if (shared) {
      ASSERT_TRUE(cache.fork(SeqId{1}, SeqId{2}).ok());
    }

    std::vector<size_t> keep;
    const unsigned density = 1 + rng() % 4;  // keep about density / 4 of the tokens
    for (size_t p = 0; p < n; ++p) {
      if (rng() % 4 < density) keep.push_back(p);
    }
    auto dropped = cache.retain_tokens(SeqId{1}, keep);
    ASSERT_TRUE(dropped.ok()) << dropped.status();
    ASSERT_EQ(*dropped, n - keep.size());
    slots.apply(cache.take_pending_copies());
    ASSERT_EQ(slots.read(*cache.get_sequence(SeqId{1})), tokens_at(token_ids(0, n), keep))
        << "trial " << trial << ", block size " << bs << ", " << n << " tokens";
    if (shared) {
      ASSERT_EQ(slots.read(*cache.get_sequence(SeqId{2})), token_ids(0, n));
    }
    ASSERT_TRUE(cache.verify_integrity().ok());

    ASSERT_TRUE(cache.free(SeqId{1}).ok());
    if (shared) {
      ASSERT_TRUE(cache.free(SeqId{2}).ok());
    }
    ASSERT_EQ(cache.free_block_count(), blocks);
  }
}

}  // namespace
}  // namespace kvfabric
