// Copy-on-write (seed-semantics.md §E1.2): a write never lands in a block another sequence holds.
#include <gtest/gtest.h>

#include "kvfabric/block/paged_kv_cache.h"
#include "testing/slot_model.h"

namespace kvfabric {
namespace {

using testing::token_ids;

class CopyOnWrite : public ::testing::Test {
 protected:
  CopyOnWrite() : cache_(16, 4, 1, 8), slots_(16, 4) {}

  void write_new(SeqId seq, size_t first, const std::vector<int64_t>& tokens) {
    slots_.apply(cache_.take_pending_copies());
    slots_.write(*cache_.get_sequence(seq), first, tokens);
  }

  PagedKvCache cache_;
  testing::SlotModel slots_;
};

TEST_F(CopyOnWrite, ChildAppendCopiesSharedTail) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 6).ok());  // blocks: [4 full][2 of 4]
  write_new(SeqId{1}, 0, token_ids(0, 6));
  ASSERT_TRUE(cache_.fork(SeqId{1}, SeqId{2}).ok());
  const BlockId shared_tail = cache_.get_sequence(SeqId{1})->block_ids[1];
  EXPECT_EQ(cache_.block_ref_count(shared_tail), 2u);

  ASSERT_TRUE(cache_.append(SeqId{2}, 1).ok());
  const auto& copies = cache_.pending_copies();
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].reason, CopyReason::kCopyOnWrite);
  EXPECT_EQ(copies[0].src_block, shared_tail);
  EXPECT_EQ(copies[0].num_tokens, 2u);
  const SequenceInfo* child = cache_.get_sequence(SeqId{2});
  EXPECT_NE(child->block_ids[1], shared_tail);
  EXPECT_EQ(child->block_ids[0], cache_.get_sequence(SeqId{1})->block_ids[0]);  // full block shared
  EXPECT_EQ(cache_.block_ref_count(shared_tail), 1u);
  EXPECT_EQ(cache_.stats().cow_copies, 1u);
  EXPECT_EQ(cache_.stats().cow_copied_tokens, 2u);
  write_new(SeqId{2}, 6, {100});

  // The parent writes its own next token into the original tail: both keep their own tokens.
  ASSERT_TRUE(cache_.append(SeqId{1}, 1).ok());
  EXPECT_TRUE(cache_.pending_copies().empty());  // the tail is private to S1 now
  write_new(SeqId{1}, 6, {6});
  EXPECT_EQ(slots_.read(*cache_.get_sequence(SeqId{1})), token_ids(0, 7));
  std::vector<int64_t> child_expected = token_ids(0, 6);
  child_expected.push_back(100);
  EXPECT_EQ(slots_.read(*cache_.get_sequence(SeqId{2})), child_expected);
  EXPECT_TRUE(cache_.verify_integrity().ok());
}

TEST_F(CopyOnWrite, ParentAppendAlsoCopies) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 3).ok());
  ASSERT_TRUE(cache_.fork(SeqId{1}, SeqId{2}).ok());
  ASSERT_TRUE(cache_.append(SeqId{1}, 3).ok());  // 3 -> 6 tokens: copy tail + 1 new block
  EXPECT_EQ(cache_.pending_copies().size(), 1u);
  EXPECT_EQ(cache_.used_block_count(), 3u);
  EXPECT_NE(cache_.get_sequence(SeqId{1})->block_ids[0],
            cache_.get_sequence(SeqId{2})->block_ids[0]);
}

TEST_F(CopyOnWrite, BlockAlignedForkNeedsNoCopy) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 8).ok());
  ASSERT_TRUE(cache_.fork(SeqId{1}, SeqId{2}).ok());
  ASSERT_TRUE(cache_.append(SeqId{2}, 1).ok());
  EXPECT_TRUE(cache_.pending_copies().empty());
  EXPECT_EQ(cache_.stats().cow_copies, 0u);
}

TEST_F(CopyOnWrite, BeamSearchFanOut) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 5).ok());
  write_new(SeqId{1}, 0, token_ids(0, 5));
  for (int beam = 2; beam <= 4; ++beam)
    ASSERT_TRUE(cache_.fork(SeqId{1}, SeqId{beam}).ok());
  for (int beam = 1; beam <= 4; ++beam) {
    ASSERT_TRUE(cache_.append(SeqId{beam}, 1).ok());
    write_new(SeqId{beam}, 5, {1000 + beam});
  }
  // The last writer found the tail no longer shared and wrote in place.
  EXPECT_EQ(cache_.stats().cow_copies, 3u);
  for (int beam = 1; beam <= 4; ++beam) {
    std::vector<int64_t> expected = token_ids(0, 5);
    expected.push_back(1000 + beam);
    EXPECT_EQ(slots_.read(*cache_.get_sequence(SeqId{beam})), expected) << "beam " << beam;
  }
}

TEST_F(CopyOnWrite, OutOfMemoryChangesNothing) {
  ASSERT_TRUE(cache_.allocate(SeqId{1}, 62).ok());  // 16 blocks, all of them
  ASSERT_TRUE(cache_.fork(SeqId{1}, SeqId{2}).ok());
  const Status s = cache_.append(SeqId{2}, 1);  // needs a private copy of the tail
  EXPECT_EQ(s.message(), "Out of memory: requested 1 blocks, 0 available");
  EXPECT_EQ(cache_.get_sequence(SeqId{2})->num_tokens, 62u);
  EXPECT_TRUE(cache_.pending_copies().empty());
  EXPECT_EQ(cache_.stats().cow_copies, 0u);
  EXPECT_TRUE(cache_.verify_integrity().ok());
}

}  // namespace
}  // namespace kvfabric
