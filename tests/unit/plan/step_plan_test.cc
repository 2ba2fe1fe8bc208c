#include "kvfabric/plan/step_plan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace kvfabric {
namespace {

using Op = StepPlan::Op;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

TokenCopy cow(uint32_t src, uint32_t dst, uint32_t tokens) {
  return TokenCopy{BlockId{src}, 0, BlockId{dst}, 0, tokens, CopyReason::kCopyOnWrite};
}

StepPlan sample_plan() {
  StepPlan plan;
  plan.step = 41;
  plan.ops = {Op::swap_out(1, BlockId{3}, BlockId{0}), Op::migrate(0, BlockId{7}, 1, BlockId{3}),
              Op::swap_in(0, BlockId{2}, BlockId{9}),
              Op::token_copy(1, TokenCopy{BlockId{5}, 2, BlockId{6}, 4, 9, CopyReason::kCompaction}),
              Op::regroup(2, TokenCopy{BlockId{1}, 3, BlockId{4}, 20, 1, CopyReason::kCompaction}, 1)};
  plan.tables = {{SeqId{4}, 1, 33, 17, 0, {BlockId{3}, BlockId{6}, BlockId{8}}},
                 {SeqId{9}, 0, 0, 0, 0, {}},
                 {SeqId{5}, 2, 40, 39, 2, {BlockId{11}}},
                 {SeqId{6}, 2, 21, 21, 0, {BlockId{4}}, 1}};
  plan.released = {SeqId{2}, SeqId{11}};
  plan.preempted = {SeqId{11}};
  plan.compactions = {{SeqId{4}, 1, 60, {{0, 4}, {31, 29}}}, {SeqId{6}, 2, 30, {{3, 21}}, 1}};
  plan.score_requests = {{SeqId{5}, 2}, {SeqId{4}, 1}};
  return plan;
}

TEST(StepPlanTest, SerializeRoundTripsEveryField) {
  const StepPlan plan = sample_plan();
  const auto parsed = StepPlan::deserialize(plan.serialize());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(*parsed, plan);
  EXPECT_EQ(parsed->count(StepPlan::OpKind::kMigrate), 1u);
  EXPECT_EQ(parsed->ops[3].copy.src_block, BlockId{5});
  EXPECT_EQ(parsed->ops[3].to_group, StepPlan::kAllLayers);
  EXPECT_EQ(parsed->ops[4].from_group, StepPlan::kAllLayers);
  EXPECT_EQ(parsed->ops[4].to_group, 1u);
  EXPECT_EQ(parsed->tables[3].layer_group, 1u);
  EXPECT_EQ(parsed->compactions[1].layer_group, 1u);

  const auto empty = StepPlan::deserialize(StepPlan{}.serialize());
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
}

TEST(StepPlanTest, ACompactionKeepsOnlyRangesItCanMean) {
  EXPECT_EQ(sample_plan().compactions[0].tokens_after(), 33u);
  const auto refused_with = [](std::vector<StepPlan::TokenRange> kept) {
    StepPlan plan;
    plan.compactions = {{SeqId{3}, 0, 50, std::move(kept)}};
    return StepPlan::deserialize(plan.serialize()).status();
  };
  EXPECT_TRUE(refused_with({{0, 10}, {20, 30}}).ok());
  EXPECT_TRUE(refused_with({{0, 2}, {30, 5}, {7, 6}}).ok());  // dropped slots filled by later ones
  // Empty, overlapping in either order, outside, or moving a token to a later slot.
  for (const auto& kept : std::vector<std::vector<StepPlan::TokenRange>>{
           {{0, 0}}, {{10, 5}, {12, 3}}, {{12, 3}, {10, 5}}, {{40, 11}}, {{51, 1}},
           {{5, 1}, {0, 1}}, {{0, 2}, {30, 5}, {4, 6}}}) {
    const Status refused = refused_with(kept);
    EXPECT_EQ(refused.code(), ErrorCode::kParseError);
    EXPECT_THAT(refused.message(), HasSubstr("compaction of S3"));
  }
}

TEST(StepPlanTest, ATableChangeContinuesTheTableItFollows) {
  std::vector<BlockId> table = {BlockId{1}, BlockId{2}, BlockId{3}};
  StepPlan::Table change{SeqId{7}, 0, 49, 48, 2, {BlockId{9}, BlockId{4}}};
  ASSERT_TRUE(apply_table_change(table, change).ok());
  EXPECT_EQ(table, (std::vector<BlockId>{BlockId{1}, BlockId{2}, BlockId{9}, BlockId{4}}));
  change.first_block = 5;
  const Status refused = apply_table_change(table, change);
  EXPECT_EQ(refused.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(refused.message(), HasSubstr("S7 continues from block 5 but holds 4"));
  EXPECT_EQ(table.size(), 4u);  // unchanged
}

TEST(StepPlanTest, EveryTruncationIsAParseError) {
  const auto bytes = sample_plan().serialize();
  for (size_t n = 0; n < bytes.size(); ++n) {
    const auto parsed = StepPlan::deserialize(std::span(bytes.data(), n));
    ASSERT_FALSE(parsed.ok()) << "length " << n;
    EXPECT_EQ(parsed.status().code(), ErrorCode::kParseError) << "length " << n;
  }
}

// kind, replica, dst_replica, src, dst, copy offsets and length, reason, from and to group.
constexpr size_t kOpBytesForTest = 1 + 4 * 4 + 3 * 4 + 1 + 2 * 4;

TEST(StepPlanTest, MalformedBytesAreRefusedWithTheirReason) {
  const auto good = sample_plan().serialize();
  auto with = [&](size_t at, uint8_t value) {
    auto bytes = good;
    bytes[at] = value;
    return StepPlan::deserialize(bytes).status();
  };
  EXPECT_THAT(with(0, 0).message(), HasSubstr("not a step plan"));
  EXPECT_THAT(with(4, 9).message(), HasSubstr("version 9"));
  const size_t first_op = 4 + 4 + 8 + 8;
  EXPECT_THAT(with(first_op, 7).message(), HasSubstr("unknown kind 7"));
  EXPECT_THAT(with(first_op + 1 + 4 * 4 + 3 * 4, 5).message(), HasSubstr("unknown reason 5"));
  // A swap-out that names a destination replica.
  EXPECT_THAT(with(first_op + 1 + 4, 3).message(), HasSubstr("only migrations do"));
  // Layer groups: a copy from one group's view into another's, and a swap that names one.
  const size_t copy_groups = first_op + 3 * kOpBytesForTest + 1 + 4 * 4 + 3 * 4 + 1;
  EXPECT_THAT(with(copy_groups, 0).message(), HasSubstr("only whole blocks regroup"));
  EXPECT_THAT(with(first_op + 1 + 4 * 4 + 3 * 4 + 1, 0).message(), HasSubstr("only copies do"));
  // An op count far beyond the bytes that follow.
  EXPECT_THAT(with(4 + 4 + 8 + 7, 0xFF).message(), HasSubstr("ops but only"));

  // A table that claims more computed tokens than it has.
  StepPlan overcomputed = sample_plan();
  overcomputed.tables[0].computed_tokens = 34;
  EXPECT_THAT(StepPlan::deserialize(overcomputed.serialize()).status().message(),
              HasSubstr("says 34 of its 33 tokens are computed"));

  auto trailing = good;
  trailing.push_back(0);
  EXPECT_THAT(StepPlan::deserialize(trailing).status().message(), HasSubstr("trailing bytes"));
}

TEST(PlanWavesTest, IndependentOpsShareTheFirstWave) {
  const std::vector<Op> ops = {Op::swap_out(0, BlockId{1}, BlockId{0}),
                               Op::migrate(0, BlockId{2}, 1, BlockId{2}),
                               Op::swap_in(1, BlockId{0}, BlockId{5}),
                               Op::token_copy(0, cow(3, 4, 5))};
  EXPECT_THAT(plan_waves(ops), ElementsAre(0u, 0u, 0u, 0u));
}

TEST(PlanWavesTest, ABlockReadThenReusedWaitsForTheRead) {
  // A parked sequence's block is read, freed, and taken by a swap-in and by a copy.
  const std::vector<Op> ops = {Op::migrate(0, BlockId{4}, 1, BlockId{0}),
                               Op::swap_in(0, BlockId{2}, BlockId{4}),
                               Op::token_copy(1, cow(0, 9, 3))};
  EXPECT_THAT(plan_waves(ops), ElementsAre(0u, 1u, 1u));
}

TEST(PlanWavesTest, ReadsAfterWritesComeLater) {
  // A prefix migrated in, then copied on write, then forked on to a third replica.
  const std::vector<Op> ops = {Op::migrate(0, BlockId{1}, 1, BlockId{7}),
                               Op::token_copy(1, cow(7, 8, 4)),
                               Op::migrate(1, BlockId{8}, 2, BlockId{3})};
  EXPECT_THAT(plan_waves(ops), ElementsAre(0u, 1u, 2u));
}

TEST(PlanWavesTest, SwapOutThenInOfOneHostBlockIsOrdered) {
  const std::vector<Op> ops = {Op::swap_out(0, BlockId{1}, BlockId{6}),
                               Op::swap_in(0, BlockId{6}, BlockId{2})};
  EXPECT_THAT(plan_waves(ops), ElementsAre(0u, 1u));
}

TEST(PlanWavesTest, CopiesChainInsideAWaveButOthersDoNot) {
  // Copies run in list order, so a chain of copies stays in one wave; a migration that reads a
  // copy's result, and a copy that overwrites what a migration read, move on.
  const std::vector<Op> ops = {Op::token_copy(0, cow(1, 2, 4)), Op::token_copy(0, cow(2, 3, 4)),
                               Op::migrate(0, BlockId{3}, 1, BlockId{0}),
                               Op::token_copy(0, cow(1, 3, 4)), Op::migrate(0, BlockId{1}, 1, BlockId{9})};
  EXPECT_THAT(plan_waves(ops), ElementsAre(0u, 0u, 1u, 2u, 0u));
}

TEST(PlanWavesTest, ReplicasAndTiersAreSeparateBlocks) {
  const std::vector<Op> ops = {Op::swap_out(0, BlockId{1}, BlockId{1}),
                               Op::swap_out(1, BlockId{1}, BlockId{1}),
                               Op::migrate(2, BlockId{1}, 3, BlockId{1})};
  EXPECT_THAT(plan_waves(ops), ElementsAre(0u, 0u, 0u));
}

}  // namespace
}  // namespace kvfabric
