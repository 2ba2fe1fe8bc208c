#include "kvfabric/coordinator/coordinator.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <numeric>
#include <set>

#include "testing/property_env.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using testing::serving_config;
using ::testing::HasSubstr;
using Kind = StepPlan::OpKind;

using testing::token_run;

Coordinator make(const Config& config) {
  auto c = Coordinator::create(config);
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(c).value();
}

std::vector<StepPlan::Op> ops_of(const StepPlan& plan, Kind kind) {
  std::vector<StepPlan::Op> out;
  for (const auto& op : plan.ops) {
    if (op.kind == kind) out.push_back(op);
  }
  return out;
}

TEST(CoordinatorTest, AdmitPlacesPublishesAndIndexesWithThePlanThatComputesIt) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 32, 8));
  const auto prompt = token_run(70, 100);
  const auto a = c.admit(SeqId{1}, prompt);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->cached_tokens, 0u);
  EXPECT_EQ(a->blocks.size(), 5u);
  // A request in the same step finds nothing: step 0's forward pass has not computed A yet.
  const auto same_step = c.admit(SeqId{3}, prompt);
  ASSERT_TRUE(same_step.ok());
  EXPECT_EQ(same_step->cached_tokens, 0u);
  EXPECT_NE(same_step->blocks[0], a->blocks[0]);
  auto plan = c.step();
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->step, 0u);
  ASSERT_EQ(plan->tables.size(), 2u);
  EXPECT_EQ(plan->tables[0].seq, SeqId{1});
  EXPECT_EQ(plan->tables[0].replica, a->replica);
  EXPECT_EQ(plan->tables[0].num_tokens, 70u);
  EXPECT_EQ(plan->tables[0].computed_tokens, 0u);
  EXPECT_EQ(plan->tables[0].blocks, a->blocks);
  ASSERT_TRUE(c.free(SeqId{3}).ok());

  // Step 0's plan indexed the prompt its forward pass computes: a request of step 1 sharing 64
  // tokens hits at once (no step of lag), and its table says those 64 are computed.
  auto second = prompt;
  second.resize(64);
  second.push_back(9);
  const auto b = c.admit(SeqId{2}, second);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->replica, a->replica);
  EXPECT_EQ(b->cached_tokens, 64u);
  EXPECT_EQ(b->migrated_tokens, 0u);
  EXPECT_EQ(std::vector(b->blocks.begin(), b->blocks.begin() + 4),
            std::vector(a->blocks.begin(), a->blocks.begin() + 4));
  EXPECT_EQ(c.stats().local_hit_tokens, 64u);
  const auto plan1 = c.step();
  ASSERT_TRUE(plan1.ok());
  ASSERT_EQ(plan1->tables.size(), 1u);
  EXPECT_EQ(plan1->tables[0].num_tokens, 65u);
  EXPECT_EQ(plan1->tables[0].computed_tokens, 64u);
  EXPECT_TRUE(c.verify_integrity().ok());
}

// A plan carries what changed in a table: a decode step that fills a block sends that block, one
// that does not sends none, and a fork's first write sends its tail copy. The ranks' tables,
// rebuilt from the changes, are the coordinator's.
TEST(CoordinatorTest, APlanSendsOnlyWhatChangedInATable) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 32, 8));  // 16-token blocks
  const auto a = c.admit(SeqId{1}, token_run(40, 100));
  ASSERT_TRUE(a.ok());
  std::map<SeqId, std::vector<BlockId>> ranks;  // the tables as a rank rebuilds them
  auto step = [&] {
    const auto plan = c.step();
    EXPECT_TRUE(plan.ok());
    for (SeqId seq : plan->released) ranks.erase(seq);
    for (const auto& t : plan->tables) EXPECT_TRUE(apply_table_change(ranks[t.seq], t).ok());
    for (const auto& [seq, blocks] : ranks) EXPECT_EQ(blocks, c.blocks_of(seq)) << seq;
    return *plan;
  };
  StepPlan plan = step();
  ASSERT_EQ(plan.tables.size(), 1u);
  EXPECT_EQ(plan.tables[0].first_block, 0u);
  EXPECT_EQ(plan.tables[0].blocks.size(), 3u);
  ASSERT_TRUE(c.append(SeqId{1}, 1).ok());  // 41 tokens: the third block has room
  plan = step();
  ASSERT_EQ(plan.tables.size(), 1u);
  EXPECT_EQ(plan.tables[0].first_block, 3u);
  EXPECT_TRUE(plan.tables[0].blocks.empty());
  EXPECT_EQ(plan.tables[0].num_tokens, 41u);
  ASSERT_TRUE(c.append(SeqId{1}, 8).ok());  // 49 tokens: a fourth block
  plan = step();
  EXPECT_EQ(plan.tables[0].first_block, 3u);
  EXPECT_EQ(plan.tables[0].blocks, std::vector<BlockId>{c.blocks_of(SeqId{1})[3]});
  // A fork shares the partly filled tail; the child's first write copies it.
  ASSERT_TRUE(c.fork(SeqId{1}, SeqId{2}).ok());
  plan = step();
  ASSERT_EQ(plan.tables.size(), 1u);
  EXPECT_EQ(plan.tables[0].first_block, 0u);  // new to the replica: whole
  ASSERT_TRUE(c.append(SeqId{2}, 1).ok());
  plan = step();
  EXPECT_EQ(plan.tables[0].first_block, 3u);
  EXPECT_NE(plan.tables[0].blocks[0], c.blocks_of(SeqId{1})[3]);
  EXPECT_TRUE(c.verify_integrity().ok());
}

// Regression: a sequence marked for the plan and then swapped out in the same step kept its mark,
// so no plan ever published its table again, not even when it came back.
TEST(CoordinatorTest, ASequenceSwappedOutAfterAChangeIsPublishedWhenItReturns) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 8, 8));
  ASSERT_TRUE(c.admit(SeqId{1}, token_run(64, 100)).ok());  // 4 blocks
  ASSERT_TRUE(c.step().ok());
  ASSERT_TRUE(c.append(SeqId{1}, 1).ok());  // 5 blocks; marked for the next plan
  ASSERT_TRUE(c.admit(SeqId{2}, token_run(64, 900), 1).ok());  // needs S1's room
  ASSERT_TRUE(c.is_swapped(SeqId{1}));
  auto plan = c.step();
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->released, std::vector<SeqId>{SeqId{1}});
  for (const auto& t : plan->tables) EXPECT_NE(t.seq, SeqId{1});
  ASSERT_TRUE(c.free(SeqId{2}).ok());
  plan = c.step();  // S1 comes back
  ASSERT_TRUE(plan.ok());
  ASSERT_FALSE(c.is_swapped(SeqId{1}));
  ASSERT_EQ(plan->tables.size(), 1u);
  EXPECT_EQ(plan->tables[0].seq, SeqId{1});
  EXPECT_EQ(plan->tables[0].first_block, 0u);
  EXPECT_EQ(plan->tables[0].blocks, c.blocks_of(SeqId{1}));
  ASSERT_TRUE(c.append(SeqId{1}, 1).ok());  // and its changes keep coming
  plan = c.step();
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->tables.size(), 1u);
  EXPECT_EQ(plan->tables[0].num_tokens, 66u);
  EXPECT_TRUE(c.verify_integrity().ok());
}

TEST(CoordinatorTest, ACachedPrefixMigratesToALessLoadedReplica) {
  Config config = serving_config(2, 1, 4, 2, 32, 8);
  config.coordinator.queue_weight = 1000;  // one running sequence outweighs 64 prefill tokens
  Coordinator c = make(config);
  const auto prompt = token_run(64, 100);
  const auto a = c.admit(SeqId{1}, prompt);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(c.step().ok());  // indexed with the plan whose forward pass computes it

  auto longer = prompt;
  longer.push_back(5);
  const auto b = c.admit(SeqId{2}, longer);
  ASSERT_TRUE(b.ok());
  EXPECT_NE(b->replica, a->replica);
  EXPECT_EQ(b->cached_tokens, 64u);
  EXPECT_EQ(b->migrated_tokens, 64u);
  const auto plan = c.step();
  ASSERT_TRUE(plan.ok());
  const auto moves = ops_of(*plan, Kind::kMigrate);
  ASSERT_EQ(moves.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(moves[i].replica, a->replica);
    EXPECT_EQ(moves[i].src, a->blocks[i]);
    EXPECT_EQ(moves[i].dst_replica, b->replica);
    EXPECT_EQ(moves[i].dst, b->blocks[i]);
  }
  EXPECT_EQ(c.stats().migrated_tokens, 64u);

  // The plan that moves the prefix indexes the copy: both replicas now hold it.
  EXPECT_EQ(c.cached_tokens(b->replica, prompt), 64u);
  EXPECT_EQ(c.cached_tokens(a->replica, prompt), 64u);
  EXPECT_TRUE(c.verify_integrity().ok());
}

TEST(CoordinatorTest, NoMigrationWhenMovingCostsMoreThanComputing) {
  Config config = serving_config(2, 1, 4, 2, 32, 8);
  config.coordinator.queue_weight = 1000;
  config.coordinator.migration_token_cost = 1.5;
  Coordinator c = make(config);
  const auto prompt = token_run(64, 100);
  ASSERT_TRUE(c.admit(SeqId{1}, prompt).ok());
  ASSERT_TRUE(c.step().ok());
  ASSERT_TRUE(c.step().ok());
  const auto b = c.admit(SeqId{2}, prompt);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->migrated_tokens, 0u);
  EXPECT_EQ(b->cached_tokens, 0u);
  EXPECT_EQ(c.step()->count(Kind::kMigrate), 0u);
}

TEST(CoordinatorTest, ForkAcrossReplicasMovesTheParentsBlocks) {
  Coordinator c = make(serving_config(2, 1, 4, 2, 32, 8));
  const auto a = c.admit(SeqId{1}, token_run(40, 0));
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(c.step().ok());
  const uint32_t other = 1 - a->replica;
  ASSERT_TRUE(c.fork(SeqId{1}, SeqId{2}, other).ok());
  EXPECT_EQ(c.replica_of(SeqId{2}), other);
  const auto plan = c.step();
  ASSERT_TRUE(plan.ok());
  const auto moves = ops_of(*plan, Kind::kMigrate);
  ASSERT_EQ(moves.size(), 3u);
  const auto child = c.blocks_of(SeqId{2});
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(moves[i].src, a->blocks[i]);
    EXPECT_EQ(moves[i].dst, child[i]);
  }
  ASSERT_EQ(plan->tables.size(), 1u);
  EXPECT_EQ(plan->tables[0].num_tokens, 40u);
  // A fork on the same replica shares blocks instead.
  ASSERT_TRUE(c.fork(SeqId{1}, SeqId{3}).ok());
  EXPECT_EQ(c.blocks_of(SeqId{3}), a->blocks);
  EXPECT_EQ(c.step()->count(Kind::kMigrate), 0u);
  EXPECT_TRUE(c.verify_integrity().ok());
}

TEST(CoordinatorTest, AppendIntoASharedTailIsCopiedInPlanOrder) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 32, 8));
  ASSERT_TRUE(c.admit(SeqId{1}, token_run(20, 0)).ok());
  ASSERT_TRUE(c.step().ok());
  ASSERT_TRUE(c.fork(SeqId{1}, SeqId{2}).ok());
  ASSERT_TRUE(c.append(SeqId{2}, 1).ok());
  const auto plan = c.step();
  ASSERT_TRUE(plan.ok());
  const auto copies = ops_of(*plan, Kind::kCopy);
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].copy.src_block, c.blocks_of(SeqId{1})[1]);
  EXPECT_EQ(copies[0].copy.dst_block, c.blocks_of(SeqId{2})[1]);
  EXPECT_EQ(copies[0].copy.num_tokens, 4u);
}

// Replica 0 full of computed sequences of 2 blocks each (32 tokens).
void fill_replica(Coordinator& c, size_t count, SeqId first) {
  for (size_t i = 0; i < count; ++i) {
    const auto placed = c.admit(SeqId{first.value + i}, token_run(32, static_cast<TokenId>(1000 * (first.value + i))));
    ASSERT_TRUE(placed.ok()) << placed.status();
  }
  ASSERT_TRUE(c.step().ok());
}

TEST(CoordinatorTest, PressureEvictsIdleCacheFirst) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 8, 8));
  ASSERT_TRUE(c.admit(SeqId{1}, token_run(64, 0)).ok());
  ASSERT_TRUE(c.step().ok());
  ASSERT_TRUE(c.step().ok());
  ASSERT_TRUE(c.free(SeqId{1}).ok());  // 4 blocks stay cached, idle
  EXPECT_EQ(c.replica_stats(0).cached_blocks, 4u);
  ASSERT_TRUE(c.admit(SeqId{2}, token_run(128, 5000)).ok());  // needs all 8
  EXPECT_EQ(c.stats().swapped_out, 0u);
  EXPECT_EQ(c.replica_stats(0).cached_blocks, 0u);
}

TEST(CoordinatorTest, PressureSwapsThenParksThenPreempts) {
  // Two replicas of 8 blocks, 4 host blocks each; 8 computed sequences of 2 blocks fill both
  // (placement alternates: S1, S3, S5, S7 on replica 0).
  Coordinator c = make(serving_config(2, 1, 4, 2, 8, 4));
  fill_replica(c, 8, SeqId{1});
  const std::vector<SeqId> on0 = {SeqId{1}, SeqId{3}, SeqId{5}, SeqId{7}};
  for (SeqId s : on0) ASSERT_EQ(c.replica_of(s), 0u);
  ASSERT_EQ(testing::available_blocks(c, 0), 0u);
  ASSERT_EQ(testing::available_blocks(c, 1), 0u);

  // Swap: the least recently used computed sequence goes to the host tier.
  ASSERT_TRUE(c.append(SeqId{7}, 1).ok());
  EXPECT_TRUE(c.is_swapped(SeqId{1}));
  ASSERT_TRUE(c.append(SeqId{5}, 17).ok());  // 2 more blocks: S3 goes too
  EXPECT_TRUE(c.is_swapped(SeqId{3}));
  EXPECT_EQ(c.stats().swapped_out, 2u);
  EXPECT_EQ(c.host_free_blocks(0), 0u);
  auto plan = c.step();
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->count(Kind::kSwapOut), 4u);
  EXPECT_THAT(plan->released, ::testing::ElementsAre(SeqId{1}, SeqId{3}));
  EXPECT_EQ(plan->count(Kind::kSwapIn), 0u);  // the replica was short in this step

  // Park: with the host tier full, a victim moves to the peer that has room for it.
  ASSERT_TRUE(c.free(SeqId{2}).ok());
  ASSERT_TRUE(c.free(SeqId{4}).ok());
  ASSERT_TRUE(c.append(SeqId{7}, 32).ok());  // 65 tokens: 2 more blocks, 1 free
  EXPECT_EQ(c.stats().parked, 1u);
  EXPECT_EQ(c.replica_of(SeqId{5}), 1u);
  plan = c.step();
  ASSERT_TRUE(plan.ok());
  const auto moves = ops_of(*plan, Kind::kMigrate);
  ASSERT_EQ(moves.size(), 4u);
  EXPECT_EQ(moves[0].replica, 0u);
  EXPECT_EQ(moves[0].dst_replica, 1u);
  EXPECT_EQ(c.blocks_of(SeqId{5}).size(), 4u);

  // A newcomer of the same priority does not displace running sequences.
  EXPECT_EQ(c.admit(SeqId{100}, token_run(16 * 7, 90000)).status().code(), ErrorCode::kOutOfMemory);
  EXPECT_EQ(c.stats().preempted, 0u);
  // Preempt: a higher-priority newcomer, no host room, no peer room; the engine is told to
  // recompute the victim.
  const auto placed = c.admit(SeqId{100}, token_run(16 * 7, 90000), 1);
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(placed->replica, 0u);
  EXPECT_EQ(c.stats().preempted, 1u);
  EXPECT_FALSE(c.replica_of(SeqId{7}).has_value());
  plan = c.step();
  ASSERT_TRUE(plan.ok());
  EXPECT_THAT(plan->preempted, ::testing::ElementsAre(SeqId{7}));
  EXPECT_TRUE(c.verify_integrity().ok());
}

// Regression (found by the 4-rank serving test): making room for a newcomer parks a victim on the
// replica that holds the newcomer's cached prefix, evicting part of it; the migration must move
// only what is still cached there, never blocks the parked victim has just been given.
TEST(CoordinatorTest, AMigratedPrefixIsReadAfterMakingRoomNotBefore) {
  Config config = serving_config(2, 1, 4, 2, 12, 0);  // no host tier: victims are parked
  config.coordinator.memory_weight = 0;
  config.coordinator.queue_weight = 1000;  // placement follows the running count
  Coordinator c = make(config);
  const std::vector<TokenId> prefix = token_run(48, 5000);  // 3 blocks
  auto placed_on = [&](SeqId seq, std::vector<TokenId> prompt, uint32_t priority) {
    const auto p = c.admit(seq, prompt, priority);
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? p->replica : 99u;
  };
  EXPECT_EQ(placed_on(SeqId{1}, token_run(80, 100), 0), 0u);  // X: 5 blocks
  EXPECT_EQ(placed_on(SeqId{2}, prefix, 0), 1u);           // the prefix
  EXPECT_EQ(placed_on(SeqId{3}, token_run(80, 900), 1), 0u);  // 5 blocks nobody may displace
  EXPECT_EQ(placed_on(SeqId{4}, token_run(32, 3000), 0), 1u);
  ASSERT_TRUE(c.fork(SeqId{4}, SeqId{5}).ok());
  ASSERT_TRUE(c.fork(SeqId{4}, SeqId{6}).ok());
  ASSERT_TRUE(c.append(SeqId{4}, 64).ok());  // replica 1: 6 blocks used
  ASSERT_TRUE(c.step().ok());
  ASSERT_TRUE(c.step().ok());  // the prefix is indexed
  ASSERT_TRUE(c.free(SeqId{2}).ok());
  ASSERT_TRUE(c.step().ok());
  ASSERT_EQ(c.replica_stats(1).cached_blocks, 3u);
  ASSERT_EQ(c.replica_stats(1).free_blocks, 3u);
  ASSERT_EQ(c.replica_stats(0).free_blocks, 2u);

  // 7 blocks fit neither replica; replica 0 runs fewer sequences and is chosen, the prefix to be
  // migrated from replica 1; making room parks X (5 blocks) on replica 1, which takes its 3 free
  // blocks and 2 of the prefix's.
  std::vector<TokenId> prompt = prefix;
  for (TokenId t : token_run(64, 7000)) prompt.push_back(t);
  const auto placed = c.admit(SeqId{7}, prompt, 1);
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(placed->replica, 0u);
  EXPECT_EQ(c.replica_of(SeqId{1}), 1u);
  EXPECT_EQ(c.stats().parked, 1u);
  EXPECT_EQ(placed->migrated_tokens, 16u);  // the one block still cached
  const auto plan = c.step();
  ASSERT_TRUE(plan.ok());
  // No op reads a block that an earlier op of the plan wrote.
  std::set<std::pair<uint32_t, uint32_t>> written;
  for (const auto& op : plan->ops) {
    if (op.kind != Kind::kMigrate) continue;
    EXPECT_EQ(written.count({op.replica, op.src.value}), 0u)
        << "reads " << op.src << " of replica " << op.replica << " after it was overwritten";
    written.insert({op.dst_replica, op.dst.value});
  }
  EXPECT_EQ(plan->count(Kind::kMigrate), 5u + 1u);
  EXPECT_TRUE(c.verify_integrity().ok());
}

TEST(CoordinatorTest, SwappedSequencesComeBackOldestFirstWhenThereIsRoom) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 8, 8));
  fill_replica(c, 4, SeqId{1});
  ASSERT_TRUE(c.admit(SeqId{10}, token_run(64, 77777), 1).ok());  // swaps 1 and 2 out
  EXPECT_TRUE(c.is_swapped(SeqId{1}));
  EXPECT_TRUE(c.is_swapped(SeqId{2}));
  ASSERT_TRUE(c.step().ok());
  EXPECT_EQ(c.append(SeqId{1}, 1).code(), ErrorCode::kInvalidOperation);
  ASSERT_TRUE(c.free(SeqId{10}).ok());
  ASSERT_TRUE(c.free(SeqId{3}).ok());
  const auto plan = c.step();
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(c.is_swapped(SeqId{1}));
  EXPECT_FALSE(c.is_swapped(SeqId{2}));
  const auto ins = ops_of(*plan, Kind::kSwapIn);
  ASSERT_EQ(ins.size(), 4u);
  EXPECT_EQ(ins[0].dst, c.blocks_of(SeqId{1})[0]);
  EXPECT_EQ(c.stats().swapped_in, 2u);
  EXPECT_EQ(c.host_free_blocks(0), 8u);
  EXPECT_TRUE(c.verify_integrity().ok());
}

TEST(CoordinatorTest, BadRequestsAreRefusedAndChangeNothing) {
  Coordinator c = make(serving_config(2, 1, 4, 2, 8, 4));
  ASSERT_TRUE(c.admit(SeqId{1}, token_run(20, 0)).ok());
  const auto before = c.stats();
  EXPECT_EQ(c.admit(SeqId{1}, token_run(4, 0)).status().code(), ErrorCode::kInvalidOperation);
  EXPECT_THAT(c.admit(SeqId{2}, std::span<const TokenId>{}).status().message(), HasSubstr("empty"));
  EXPECT_THAT(c.admit(SeqId{uint64_t{1} << 63}, token_run(4, 0)).status().message(), HasSubstr("reserved"));
  EXPECT_EQ(c.admit(SeqId{3}, token_run(16 * 9, 0)).status().code(), ErrorCode::kOutOfMemory);
  EXPECT_EQ(c.append(SeqId{9}, 1).code(), ErrorCode::kSequenceNotFound);
  EXPECT_EQ(c.free(SeqId{9}).code(), ErrorCode::kSequenceNotFound);
  EXPECT_EQ(c.set_priority(SeqId{9}, 1).code(), ErrorCode::kSequenceNotFound);
  EXPECT_EQ(c.fork(SeqId{9}, SeqId{4}).code(), ErrorCode::kSequenceNotFound);
  EXPECT_EQ(c.fork(SeqId{1}, SeqId{1}).code(), ErrorCode::kInvalidOperation);
  EXPECT_EQ(c.fork(SeqId{1}, SeqId{4}, 7u).message(),
            "fork S1 -> S4: replica 7 does not exist (dp 2); nothing was changed");
  EXPECT_EQ(c.stats().admitted, before.admitted);
  EXPECT_EQ(c.stats().migrated_blocks, 0u);
  EXPECT_FALSE(c.replica_of(SeqId{2}).has_value());
  EXPECT_FALSE(c.replica_of(SeqId{4}).has_value());
  const auto plan = c.step();
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->ops.empty());
  ASSERT_EQ(plan->tables.size(), 1u);
  EXPECT_TRUE(c.verify_integrity().ok());
}

TEST(CoordinatorTest, PrioritiesOutsideThePriorityLevelsAreRefused) {
  Config config = serving_config(1, 1, 4, 2, 8, 4);
  config.cache.eviction.strategy = EvictionPolicy::kPriority;
  Coordinator c = make(config);
  EXPECT_EQ(c.admit(SeqId{1}, token_run(4, 0), 4).status().code(), ErrorCode::kInvalidArgument);
  EXPECT_FALSE(c.replica_of(SeqId{1}).has_value());
  ASSERT_TRUE(c.admit(SeqId{1}, token_run(4, 0), 3).ok());
  EXPECT_THAT(c.set_priority(SeqId{1}, 99).message(), HasSubstr("priority_levels is 4"));
  EXPECT_TRUE(c.set_priority(SeqId{1}, 0).ok());
  EXPECT_TRUE(c.verify_integrity().ok());
}

TEST(CoordinatorTest, ConfigsItCannotServeAreRefused) {
  Config config = serving_config(1, 1, 4, 2, 8, 0);
  config.model.num_layers = 4;
  config.cache.layers_per_group = 3;  // layer groups are whole numbers of layers
  EXPECT_THAT(Coordinator::create(config).status().message(),
              HasSubstr("cache.layers_per_group 3 must divide the 4 layers"));
  config = serving_config(1, 1, 4, 2, 8, 0);
  config.coordinator.queue_weight = -1;
  EXPECT_THAT(Coordinator::create(config).status().message(), HasSubstr("coordinator.queue_weight"));
}

// Runs a seeded serving workload on a coordinator alone and returns every plan's bytes.
std::vector<std::vector<uint8_t>> run_workload(const Config& config, uint64_t seed, int steps,
                                               testing::WorkloadCounts* counts = nullptr,
                                               CoordinatorStats* stats = nullptr,
                                               bool reuse_ids = false) {
  SCOPED_TRACE(testing::property_trace());
  Coordinator c = make(config);
  testing::EngineModel engine(config);
  testing::ServingWorkload workload(testing::property_seed(seed), config.topology.dp, reuse_ids);
  std::vector<std::vector<uint8_t>> plans;
  for (uint64_t s = 0; s < testing::property_count(steps); ++s) {
    EXPECT_TRUE(workload.issue(c, engine).ok());
    const Status integrity = c.verify_integrity();
    EXPECT_TRUE(integrity.ok()) << "step " << s << ": " << integrity;
    auto plan = c.step();
    EXPECT_TRUE(plan.ok());
    workload.planned(*plan, engine);
    engine.computed_everywhere();
    EXPECT_EQ(engine.plan_error(), "");
    plans.push_back(plan->serialize());
  }
  EXPECT_TRUE(workload.drain(c, engine).ok());
  plans.push_back(c.step()->serialize());
  plans.push_back(c.step()->serialize());
  EXPECT_TRUE(c.verify_integrity().ok());
  // Nothing leaked: every replica's blocks are free or idle in its prefix cache.
  for (uint32_t r = 0; r < c.num_replicas(); ++r) {
    const ReplicaStats pools = c.replica_stats(r);
    EXPECT_EQ(pools.sequences, 0u);
    EXPECT_EQ(pools.used_blocks, 0u) << "replica " << r;
    EXPECT_EQ(pools.free_blocks + pools.cached_blocks, pools.device_blocks);
    EXPECT_EQ(c.host_free_blocks(r), config.cache.host_num_blocks);
  }
  if (counts != nullptr) *counts = workload.counts();
  if (stats != nullptr) *stats = c.stats();
  return plans;
}

TEST(CoordinatorTest, AServingWorkloadKeepsEveryInvariantAndLeaksNothing) {
  testing::WorkloadCounts counts;
  CoordinatorStats stats;
  run_workload(serving_config(4, 1, 4, 2, 40, 12), 7, 300, &counts, &stats);
  // The run exercised what it claims to.
  EXPECT_GT(counts.admitted, 200u);
  EXPECT_GT(counts.cross_replica_forks, 5u);
  EXPECT_GT(stats.local_hit_tokens, 0u);
  EXPECT_GT(stats.migrated_tokens, 0u);
  EXPECT_GT(stats.swapped_out, 0u);
  EXPECT_GT(stats.swapped_in, 0u);
  EXPECT_GT(stats.parked + stats.preempted, 0u);
}

TEST(CoordinatorTest, AWorkloadThatReusesIdsKeepsEveryInvariantAndLeaksNothing) {
  testing::WorkloadCounts counts;
  run_workload(serving_config(4, 1, 4, 2, 40, 12), 7, 300, &counts, nullptr, true);
  EXPECT_GT(counts.reused_ids, 20u);
}

TEST(CoordinatorTest, DecisionsAreDeterministic) {
  const Config config = serving_config(2, 1, 4, 2, 24, 8);
  EXPECT_EQ(run_workload(config, 11, 120), run_workload(config, 11, 120));
}

}  // namespace
}  // namespace kvfabric
