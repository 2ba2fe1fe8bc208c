// A rank's cache viewed per layer group (PyramidKV across ranks): the plans regroup a sequence's
// whole blocks into a table per layer group, later plans continue those tables, and the forward
// pass reads each layer through its group's view.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kvfabric/runtime/rank_cache.h"
#include "testing/backend_fixture.h"
#include "testing/kv_reference.h"
#include "testing/property_env.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using Op = StepPlan::Op;
using ::testing::HasSubstr;

constexpr uint32_t kLayers = 4, kLayersPerGroup = 2, kKvHeads = 2, kHeadDim = 64;

Config grouped_config(uint32_t layers_per_group = kLayersPerGroup) {
  Config c = testing::serving_config(1, 1, 4, kKvHeads, 16, 4);
  c.model.num_layers = kLayers;
  c.cache.layers_per_group = layers_per_group;
  return c;
}

TokenCopy tokens(uint32_t src, uint32_t src_offset, uint32_t dst, uint32_t dst_offset,
                 uint32_t n) {
  return {BlockId{src}, src_offset, BlockId{dst}, dst_offset, n, CopyReason::kCompaction};
}

std::vector<uint8_t> device_bytes_of(const RankCache& rank) {
  const PagedKvView& p = rank.device_pool();
  return std::vector<uint8_t>(p.block(0), p.block(0) + p.bytes());
}

class RankCacheLayerGroups : public ::testing::Test {
 protected:
  void SetUp() override {
    auto created = RankCache::create(grouped_config(), 0, *backend_, *transport_);
    ASSERT_TRUE(created.ok()) << created.status();
    rank_ = std::move(created).value();
  }

  // Step 0: S1 holds 40 tokens in whole blocks 3, 5 and 6, written for every layer.
  void admit_whole() {
    StepPlan plan;
    plan.tables = {{SeqId{1}, 0, 40, 0, 0, {BlockId{3}, BlockId{5}, BlockId{6}}}};
    ASSERT_TRUE(rank_->execute(plan).ok());
    std::vector<int64_t> slots;
    for (uint32_t t = 0; t < 40; ++t) slots.push_back(int64_t{whole_table_[t / 16]} * 16 + t % 16);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      const auto k = testing::random_normal(40 * kKvHeads * kHeadDim, rng_);
      const auto v = testing::random_normal(40 * kKvHeads * kHeadDim, rng_);
      ASSERT_TRUE(rank_->append_kv(layer, {0, k.data(), v.data(), DType::kF32, 40, slots.data()})
                      .ok());
      whole_k_.push_back(gather(layer, whole_table_, 40, BlockView::kWhole));
    }
  }

  // Step 1: group 0 keeps tokens [0, 32) in block 7; group 1 keeps [0, 4) and [30, 40) in
  // block 8 (32-token blocks in a group's view).
  StepPlan regrouping() const {
    StepPlan plan;
    plan.step = 1;
    plan.ops = {Op::regroup(0, tokens(3, 0, 7, 0, 16), 0), Op::regroup(0, tokens(5, 0, 7, 16, 16), 0),
                Op::regroup(0, tokens(3, 0, 8, 0, 4), 1), Op::regroup(0, tokens(5, 14, 8, 4, 2), 1),
                Op::regroup(0, tokens(6, 0, 8, 6, 8), 1)};
    plan.tables = {{SeqId{1}, 0, 32, 32, 0, {BlockId{7}}, 0},
                   {SeqId{1}, 0, 14, 14, 0, {BlockId{8}}, 1}};
    plan.compactions = {{SeqId{1}, 0, 40, {{0, 32}}, 0}, {SeqId{1}, 0, 40, {{0, 4}, {30, 10}}, 1}};
    return plan;
  }

  std::vector<float> gather(uint32_t layer, const std::vector<uint32_t>& table, uint32_t n,
                            BlockView view) {
    std::vector<float> k(uint64_t{n} * kKvHeads * kHeadDim), v(k.size());
    const Status s = rank_->gather_kv(layer, {0, table.data(), n, k.data(), v.data()}, view);
    EXPECT_TRUE(s.ok()) << s;
    return k;
  }

  std::vector<uint8_t> device_bytes() const { return device_bytes_of(*rank_); }

  // A plan refused before anything runs: the error, and the rank unchanged.
  void expect_refused(const StepPlan& plan, const std::string& why) {
    const auto bytes = device_bytes();
    const uint64_t digest = rank_->tables_digest(), step = rank_->next_step();
    const Status s = rank_->execute(plan);
    EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << why;
    EXPECT_THAT(s.message(), HasSubstr(why));
    EXPECT_EQ(device_bytes(), bytes) << why;
    EXPECT_EQ(rank_->tables_digest(), digest) << why;
    EXPECT_EQ(rank_->next_step(), step) << why;
  }

  std::mt19937 rng_{3};
  std::unique_ptr<Backend> backend_ = testing::cpu_backend(best_cpu_isa());
  std::unique_ptr<Transport> transport_ = make_local_transport();
  std::unique_ptr<RankCache> rank_;
  const std::vector<uint32_t> whole_table_ = {3, 5, 6};
  std::vector<std::vector<float>> whole_k_;  // per layer, as written
};

TEST(RankCacheLayerGroupsCreate, GroupsMustDivideTheLayers) {
  auto backend = testing::cpu_backend(CpuIsa::kGeneric);
  auto transport = make_local_transport();
  const auto refused = RankCache::create(grouped_config(3), 0, *backend, *transport);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("cache.layers_per_group 3 must divide the 4"));
  const auto one_group = RankCache::create(grouped_config(4), 0, *backend, *transport);
  ASSERT_TRUE(one_group.ok()) << one_group.status();
  EXPECT_EQ((*one_group)->num_layer_groups(), 0u);  // every layer in one group: whole blocks
  const auto two = RankCache::create(grouped_config(2), 0, *backend, *transport);
  ASSERT_TRUE(two.ok()) << two.status();
  ASSERT_EQ((*two)->num_layer_groups(), 2u);
  EXPECT_EQ((*two)->group_pool(1).first_layer, 2u);
  EXPECT_EQ((*two)->group_pool(1).block_size, 32u);
  EXPECT_EQ((*two)->group_pool(1).base, (*two)->device_pool().base);
}

TEST_F(RankCacheLayerGroups, APlanRegroupsASequenceAndTheForwardPassReadsItsGroups) {
  admit_whole();
  const uint64_t whole_digest = rank_->tables_digest();
  ASSERT_TRUE(rank_->execute(regrouping()).ok());
  EXPECT_EQ(rank_->tables().count(SeqId{1}), 0u);
  ASSERT_EQ(rank_->group_tables().count(SeqId{1}), 1u);
  const auto& groups = rank_->group_tables().at(SeqId{1});
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_EQ(groups[0].num_tokens, 32u);
  EXPECT_EQ(groups[1].blocks, std::vector<BlockId>{BlockId{8}});
  EXPECT_NE(rank_->tables_digest(), whole_digest);
  EXPECT_EQ(rank_->stats().token_copies, 5u);

  const std::vector<std::vector<uint32_t>> kept = {
      [] {
        std::vector<uint32_t> all(32);
        for (uint32_t t = 0; t < 32; ++t) all[t] = t;
        return all;
      }(),
      {0, 1, 2, 3, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39}};
  const uint64_t row = uint64_t{kKvHeads} * kHeadDim;
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    const uint32_t g = layer / kLayersPerGroup;
    const std::vector<uint32_t> table = {groups[g].blocks[0].value};
    const auto k = gather(layer, table, static_cast<uint32_t>(kept[g].size()),
                          BlockView::kLayerGroup);
    for (size_t i = 0; i < kept[g].size(); ++i) {
      for (uint64_t e = 0; e < row; ++e) {
        ASSERT_EQ(k[i * row + e], whole_k_[layer][kept[g][i] * row + e])
            << "layer " << layer << " kept token " << i;
      }
    }
  }

  // A decode step: group 0's block is full, so its table takes a block; group 1's does not.
  StepPlan decode;
  decode.step = 2;
  decode.tables = {{SeqId{1}, 0, 33, 32, 1, {BlockId{9}}, 0}, {SeqId{1}, 0, 15, 14, 1, {}, 1}};
  ASSERT_TRUE(rank_->execute(decode).ok());
  EXPECT_EQ(rank_->group_tables().at(SeqId{1})[0].blocks,
            (std::vector<BlockId>{BlockId{7}, BlockId{9}}));
  EXPECT_EQ(rank_->group_tables().at(SeqId{1})[1].num_tokens, 15u);
  // The new token's slot in each group, written and read through the groups' views.
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    const uint32_t g = layer / kLayersPerGroup;
    const int64_t slot = g == 0 ? 9 * 32 + 0 : 8 * 32 + 14;
    const auto k = testing::random_normal(row, rng_);
    ASSERT_TRUE(rank_->append_kv(layer, {0, k.data(), k.data(), DType::kF32, 1, &slot},
                                 BlockView::kLayerGroup)
                    .ok());
  }
  StepPlan release;
  release.step = 3;
  release.released = {SeqId{1}};
  ASSERT_TRUE(rank_->execute(release).ok());
  EXPECT_TRUE(rank_->group_tables().empty());
}

TEST_F(RankCacheLayerGroups, PlansThatCannotMeanAGroupedSequenceAreRefusedChangingNothing) {
  admit_whole();
  StepPlan plan = regrouping();
  plan.tables[1].layer_group = 2;
  expect_refused(plan, "S1's table of layer group 2: this rank's pool has 2 layer groups");
  plan = regrouping();
  plan.tables.pop_back();
  plan.compactions.pop_back();
  expect_refused(plan, "S1 becomes compacted per layer group on replica 0 with 1 tables; it "
                       "needs all 2, whole");
  plan = regrouping();
  plan.tables.push_back({SeqId{1}, 0, 40, 40, 0, {BlockId{3}}});
  expect_refused(plan, "both whole and per layer group");
  plan = regrouping();
  plan.tables[1].first_block = 1;
  expect_refused(plan, "continues from block 1 but this replica holds 0");
  plan = regrouping();
  plan.ops[2].from_group = 0;
  expect_refused(plan, "copy reads layer group 0 and writes layer group 1; only whole blocks regroup");
  plan = regrouping();
  plan.ops[0] = Op::regroup(0, tokens(7, 0, 7, 0, 16), 0);
  expect_refused(plan, "reads and writes one block");
  plan = regrouping();
  plan.ops[0] = Op::regroup(0, tokens(3, 20, 7, 0, 1), 0);  // slot 20 of a 16-token whole block
  expect_refused(plan, "16 tokens in a block of the source's view, 32 in the destination's");
  plan = regrouping();
  plan.compactions[1].kept = {{0, 4}, {30, 9}};
  expect_refused(plan, "compaction of S1 in layer group 1 keeps 13 tokens");
  // A group's view of a block spans all of the block's bytes: two groups in one block would
  // write over each other.
  plan = regrouping();
  plan.tables[1].blocks = {BlockId{7}};
  expect_refused(plan, "S1's tables of layer groups 0 and 1 both hold B7");
  plan = regrouping();
  plan.compactions.push_back(plan.compactions[0]);
  expect_refused(plan, "the plan compacts S1 in layer group 0 twice");

  ASSERT_TRUE(rank_->execute(regrouping()).ok());
  const std::vector<float> mass(14, 1.0f);
  const Status scored = rank_->accumulate_attention(SeqId{1}, mass);
  EXPECT_EQ(scored.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(scored.message(), HasSubstr("compacted per layer group"));

  StepPlan grow;  // group 1 keeps B8 and lists it again
  grow.step = 2;
  grow.tables = {{SeqId{1}, 0, 40, 14, 1, {BlockId{8}}, 1}};
  expect_refused(grow, "S1's table of layer group 1 keeps B8 and lists it again");
  grow.tables[0].blocks = {BlockId{7}};  // group 0's block
  expect_refused(grow, "S1's tables of layer groups 0 and 1 both hold B7");
}

// Random plans of copies between any views, tables of any group (some out of range), releases
// and compactions, at a rank of 2 layer groups with 6-token blocks: each runs or is refused
// whole, a refused one changes no byte and no table, no refusal is an internal error, and a
// sequence held per layer group always has every group's table.
TEST(RankCacheLayerGroupsProperty, ARandomPlanRunsOrChangesNothing) {
  SCOPED_TRACE(testing::property_trace());
  Config config = grouped_config();
  config.cache.block_size = 6;
  config.cache.num_blocks = 12;
  auto backend = testing::cpu_backend(best_cpu_isa());
  auto transport = make_local_transport();
  auto rank = RankCache::create(config, 0, *backend, *transport).value();
  std::mt19937_64 rng(testing::property_seed(42));
  const auto below = [&](uint64_t n) { return rng() % n; };
  const auto any_group = [&]() -> uint32_t {
    return below(10) < 3 ? StepPlan::kAllLayers : static_cast<uint32_t>(below(4));
  };
  const PagedKvView& pool = rank->device_pool();
  for (uint32_t b = 0; b < pool.num_blocks; ++b) {
    std::memset(pool.block(b), static_cast<int>(b + 1), pool.block_bytes);
  }
  uint64_t ran = 0;
  for (uint64_t i = 0; i < testing::property_count(4000); ++i) {
    StepPlan plan;
    plan.step = rank->next_step();
    for (uint64_t n = below(4); n > 0; --n) {
      StepPlan::Op op = Op::token_copy(0, {BlockId{static_cast<uint32_t>(below(13))},
                                           static_cast<uint32_t>(below(14)),
                                           BlockId{static_cast<uint32_t>(below(13))},
                                           static_cast<uint32_t>(below(14)),
                                           static_cast<uint32_t>(below(14)), CopyReason::kCompaction});
      op.from_group = any_group();
      op.to_group = any_group();
      plan.ops.push_back(op);
    }
    for (uint64_t n = below(4); n > 0; --n) {
      StepPlan::Table t{SeqId{1 + below(3)}, 0, below(40), 0, static_cast<uint32_t>(below(3)), {},
                        any_group()};
      t.computed_tokens = below(t.num_tokens + 1);
      for (uint64_t b = below(4); b > 0; --b) {
        t.blocks.push_back(BlockId{static_cast<uint32_t>(below(12))});
      }
      plan.tables.push_back(t);
    }
    if (below(5) == 0) plan.released.push_back(SeqId{1 + below(3)});
    if (below(3) == 0 && !plan.tables.empty()) {
      const StepPlan::Table& t = plan.tables[below(plan.tables.size())];
      plan.compactions.push_back(
          {t.seq, 0, t.num_tokens + below(3), {{0, t.num_tokens}}, t.layer_group});
    }
    const auto bytes = device_bytes_of(*rank);
    const uint64_t digest = rank->tables_digest(), step = rank->next_step();
    const Status s = rank->execute(plan);
    if (s.ok()) {
      ++ran;
      for (const auto& [seq, groups] : rank->group_tables()) {
        ASSERT_EQ(groups.size(), 2u) << "plan " << i;
        for (const StepPlan::Table& t : groups) ASSERT_EQ(t.seq, seq) << "plan " << i;
      }
      continue;
    }
    ASSERT_NE(s.code(), ErrorCode::kInternal) << "plan " << i << ": " << s;
    ASSERT_EQ(rank->tables_digest(), digest) << "plan " << i << ": " << s;
    ASSERT_EQ(rank->next_step(), step) << "plan " << i;
    ASSERT_EQ(device_bytes_of(*rank), bytes) << "plan " << i << ": " << s;
  }
  EXPECT_GT(ran, testing::property_count(4000) / 20);
}

TEST(RankCacheLayerGroupsCreate, ARankWithoutGroupsRefusesGroupTablesAndViews) {
  auto backend = testing::cpu_backend(CpuIsa::kGeneric);
  auto transport = make_local_transport();
  auto rank = RankCache::create(grouped_config(0), 0, *backend, *transport).value();
  StepPlan plan;
  plan.tables = {{SeqId{1}, 0, 4, 0, 0, {BlockId{1}}, 0}};
  const Status s = rank->execute(plan);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("this rank's pool has 0 layer groups"));
  const std::vector<uint32_t> table = {1};
  std::vector<float> k(kKvHeads * kHeadDim), v(k.size());
  const Status view = rank->gather_kv(0, {0, table.data(), 1, k.data(), v.data()},
                                      BlockView::kLayerGroup);
  EXPECT_EQ(view.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(view.message(), HasSubstr("cache.layers_per_group is unset"));
}

}  // namespace
}  // namespace kvfabric
