#include "kvfabric/runtime/rank_cache.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>

#include "testing/backend_fixture.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using Op = StepPlan::Op;
using testing::serving_config;
using ::testing::HasSubstr;

struct SingleRank {
  std::unique_ptr<Backend> backend = testing::cpu_backend(best_cpu_isa());
  std::unique_ptr<Transport> transport = make_local_transport();
  std::unique_ptr<RankCache> rank;

  explicit SingleRank(const Config& config) {
    auto created = RankCache::create(config, 0, *backend, *transport);
    EXPECT_TRUE(created.ok()) << created.status();
    rank = std::move(created).value();
  }
  std::vector<uint8_t> device_bytes() const {
    const PagedKvView& v = rank->device_pool();
    return std::vector<uint8_t>(v.block(0), v.block(0) + v.num_blocks * v.block_bytes);
  }
};

TEST(RankLayoutTest, ShardsSplitHeadsAndReplicateKvHeadsWhenTooFew) {
  const Config tp4 = serving_config(1, 4, 32, 8, 8, 0);
  const auto l = rank_layout(tp4, 3);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->shard, 3u);
  EXPECT_EQ(l->first_kv_head, 6u);
  EXPECT_EQ(l->num_kv_heads, 2u);
  EXPECT_EQ(l->first_q_head, 24u);
  EXPECT_EQ(l->num_q_heads, 8u);

  const Config gqa = serving_config(2, 4, 8, 2, 8, 0);  // Hkv 2 < tp 4: pairs of shards share one
  for (uint32_t r = 0; r < 8; ++r) {
    const auto s = rank_layout(gqa, r);
    ASSERT_TRUE(s.ok());
    EXPECT_EQ(s->replica, r / 4);
    EXPECT_EQ(s->num_kv_heads, 1u);
    EXPECT_EQ(s->first_kv_head, (r % 4) / 2);
    EXPECT_EQ(s->first_q_head, (r % 4) * 2);
    // Every local query head attends to a local KV head.
    EXPECT_EQ(s->first_q_head / (8 / 2), s->first_kv_head);
  }
  EXPECT_THAT(rank_layout(gqa, 8).status().message(), HasSubstr("outside the world of 8 ranks"));
}

TEST(RankCacheTest, CreateRefusesATransportOfAnotherWorld) {
  auto backend = testing::cpu_backend(CpuIsa::kGeneric);
  auto local = make_local_transport();
  const auto made = RankCache::create(serving_config(2, 1, 4, 2, 8, 0), 0, *backend, *local);
  ASSERT_FALSE(made.ok());
  EXPECT_THAT(made.status().message(), HasSubstr("2-rank topology runs on local rank 0 of 1"));
  Config grouped = serving_config(1, 1, 4, 2, 8, 0);
  grouped.cache.layers_per_group = 1;
  EXPECT_EQ(RankCache::create(grouped, 0, *backend, *local).status().code(), ErrorCode::kUnimplemented);
}

TEST(RankCacheTest, APlanOfTheWrongStepIsRefusedAndChangesNothing) {
  SingleRank r(serving_config(1, 1, 4, 2, 8, 4));
  StepPlan plan;
  plan.step = 3;
  plan.tables = {{SeqId{1}, 0, 5, {BlockId{2}}}};
  const Status s = r.rank->execute(plan);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidOperation);
  EXPECT_THAT(s.message(), HasSubstr("rank 0 (replica 0, shard 0) received the plan of step 3 but expects step 0"));
  EXPECT_TRUE(r.rank->tables().empty());
  EXPECT_EQ(r.rank->next_step(), 0u);
  plan.step = 0;
  EXPECT_TRUE(r.rank->execute(plan).ok());
  EXPECT_EQ(r.rank->next_step(), 1u);
  EXPECT_EQ(r.rank->tables().size(), 1u);
  EXPECT_EQ(r.rank->execute(plan).code(), ErrorCode::kInvalidOperation);  // a replay
}

TEST(RankCacheTest, AnOpOutsideThePoolsIsRefusedBeforeAnythingRuns) {
  SingleRank r(serving_config(1, 1, 4, 2, 8, 4));
  const auto before = r.device_bytes();
  const std::vector<std::pair<Op, std::string>> bad = {
      {Op::swap_out(0, BlockId{8}, BlockId{0}), "outside the pools (8 device, 4 host blocks)"},
      {Op::swap_in(0, BlockId{4}, BlockId{0}), "outside the pools"},
      {Op::migrate(0, BlockId{1}, 0, BlockId{2}), "migration within replica 0"},
      {Op::swap_out(1, BlockId{1}, BlockId{1}), "replica 1 of 1"},
      {Op::token_copy(0, TokenCopy{BlockId{1}, 10, BlockId{2}, 0, 7, CopyReason::kCompaction}),
       "does not fit the pool (8 blocks of 16 tokens)"},
  };
  for (const auto& [op, message] : bad) {
    StepPlan plan;
    // A valid op first: it must not run either.
    plan.ops = {Op::token_copy(0, TokenCopy{BlockId{0}, 0, BlockId{1}, 0, 16, CopyReason::kCopyOnWrite}), op};
    const Status s = r.rank->execute(plan);
    EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << message;
    EXPECT_THAT(s.message(), HasSubstr("op 1: "));
    EXPECT_THAT(s.message(), HasSubstr(message));
  }
  EXPECT_EQ(r.device_bytes(), before);
  EXPECT_EQ(r.rank->next_step(), 0u);
}

TEST(RankCacheTest, OpsReusingABlockRunInPlanOrder) {
  // Block 1 is swapped out, then refilled from block 2 by a copy, then block 1 is swapped back
  // into block 3: with waves, block 3 receives block 1's old content, block 1 holds block 2's.
  SingleRank r(serving_config(1, 1, 4, 2, 8, 4));
  const PagedKvView& pool = r.rank->device_pool();
  for (uint32_t b = 0; b < 8; ++b) std::memset(pool.block(b), static_cast<int>(b + 1), pool.block_bytes);
  StepPlan plan;
  plan.ops = {Op::swap_out(0, BlockId{1}, BlockId{0}),
              Op::token_copy(0, TokenCopy{BlockId{2}, 0, BlockId{1}, 0, 16, CopyReason::kCopyOnWrite}),
              Op::swap_in(0, BlockId{0}, BlockId{3})};
  ASSERT_TRUE(r.rank->execute(plan).ok());
  auto filled = [&](uint32_t b, uint8_t v) {
    const uint8_t* p = pool.block(b);
    // Copies move token slots: compare the K/V bytes of the first layer's first token.
    return p[0] == v && p[pool.block_bytes / 2] == v;
  };
  EXPECT_TRUE(filled(3, 2));
  EXPECT_TRUE(filled(1, 3));
  EXPECT_TRUE(filled(2, 3));
}

// The whole stack in one process: coordinator plans, the rank executes them, the engine model
// writes K/V, and every sequence's K/V is checked after every step.
TEST(RankCacheTest, AServingWorkloadKeepsEverySequencesKvExact) {
  const Config config = serving_config(1, 1, 4, 2, 32, 12);
  SingleRank r(config);
  auto coordinator = Coordinator::create(config);
  ASSERT_TRUE(coordinator.ok());
  testing::EngineModel engine(config);
  testing::ServingWorkload workload(3, 1);
  uint64_t copies = 0, swaps = 0;
  for (int step = 0; step < 150; ++step) {
    ASSERT_TRUE(workload.issue(*coordinator, engine).ok());
    auto plan = coordinator->step();
    ASSERT_TRUE(plan.ok());
    copies += plan->count(StepPlan::OpKind::kCopy);
    swaps += plan->count(StepPlan::OpKind::kSwapIn);
    std::vector<uint8_t> bytes = plan->serialize();
    ASSERT_TRUE(r.rank->receive_and_execute(bytes, RankId{0}).ok());
    workload.planned(*plan, engine);
    ASSERT_TRUE(engine.forward(*r.rank).ok());
    ASSERT_TRUE(engine.verify(*r.rank)) << "step " << step;
  }
  ASSERT_TRUE(workload.drain(*coordinator, engine).ok());
  std::vector<uint8_t> last = coordinator->step()->serialize();
  ASSERT_TRUE(r.rank->receive_and_execute(last, RankId{0}).ok());
  EXPECT_TRUE(r.rank->tables().empty());
  EXPECT_GT(copies, 0u);
  EXPECT_GT(swaps, 0u);
  EXPECT_GT(coordinator->stats().local_hit_tokens, 0u);
  EXPECT_GT(coordinator->stats().preempted, 0u);
}

}  // namespace
}  // namespace kvfabric
