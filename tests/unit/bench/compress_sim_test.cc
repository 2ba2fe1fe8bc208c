// kvfabric-bench compress's simulation (compress_sim.h) on small shapes: the reference is exact,
// policies that keep everything equal it, the planted heavy hitters are found, more budget never
// hurts, runs repeat, and bad options are refused by name.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "bench/compress_sim.h"

namespace kvfabric::bench {
namespace {

using testing::HasSubstr;

CompressOptions small_options() {
  CompressOptions o;
  o.tokens = 512;
  o.heads = 2;
  o.head_dim = 64;
  o.decode_steps = 16;
  o.layers = 2;
  o.seed = 5;
  return o;
}

std::vector<CompressPoint> run(const CompressOptions& o) {
  auto points = run_compress_sim(o);
  EXPECT_TRUE(points.ok()) << points.status();
  return points.ok() ? *points : std::vector<CompressPoint>{};
}

const CompressPoint& find(const std::vector<CompressPoint>& points, CompressWorkload workload,
                          CompressPolicy policy, double budget) {
  for (const CompressPoint& p : points) {
    if (p.workload == workload && p.policy == policy && p.budget == budget) return p;
  }
  ADD_FAILURE() << "no point for " << policy_name(policy) << " at " << budget;
  static const CompressPoint none;
  return none;
}

TEST(CompressSim, FullAttentionIsTheExactReference) {
  CompressOptions o = small_options();
  o.policies = {CompressPolicy::kFull};
  const auto points = run(o);
  ASSERT_EQ(points.size(), 2u);  // one per workload
  for (const CompressPoint& p : points) {
    EXPECT_EQ(p.relative_error, 0.0) << workload_name(p.workload);
    EXPECT_EQ(p.mass_kept, 1.0) << workload_name(p.workload);
    EXPECT_EQ(p.kept_tokens, 528.0);
    EXPECT_EQ(p.memory_saved, 0.0);
    EXPECT_EQ(p.kv_bytes_f16,
              528u * 2 * 2 * 64 * 2 * 2);  // tokens x layers x heads x dim x K,V x f16
  }
  EXPECT_EQ(points[0].planted_kept, 1.0);
  EXPECT_EQ(points[1].planted_kept, -1.0);  // power-law has nothing planted
}

TEST(CompressSim, PoliciesThatKeepEveryTokenEqualFullAttention) {
  CompressOptions o = small_options();
  o.budgets = {1.0};
  o.policies = {CompressPolicy::kStreaming, CompressPolicy::kH2o, CompressPolicy::kSnapKv};
  for (const CompressPoint& p : run(o)) {
    EXPECT_EQ(p.relative_error, 0.0) << policy_name(p.policy) << " " << workload_name(p.workload);
    EXPECT_EQ(p.mass_kept, 1.0) << policy_name(p.policy) << " " << workload_name(p.workload);
  }
}

TEST(CompressSim, HeldTokensMatchTheBudget) {
  CompressOptions o = small_options();
  o.budgets = {0.2};
  o.policies = {CompressPolicy::kStreaming, CompressPolicy::kH2o, CompressPolicy::kSnapKv,
                CompressPolicy::kPyramid};
  const size_t budget = budget_tokens(o, 0.2);
  ASSERT_EQ(budget, 106u);  // round(0.2 x 528)
  for (const CompressPoint& p : run(o)) {
    EXPECT_EQ(p.budget_tokens, budget);
    EXPECT_DOUBLE_EQ(p.kept_tokens, 106.0) << policy_name(p.policy);  // pyramid: on average
    EXPECT_DOUBLE_EQ(p.memory_saved, 1.0 - 106.0 / 528.0);
    EXPECT_EQ(p.kv_bytes_f16, 106u * 2 * 2 * 64 * 2 * 2);
  }
}

TEST(CompressSim, H2oAndSnapKvFindThePlantedHeavyHitters) {
  CompressOptions o = small_options();
  o.workloads = {CompressWorkload::kPlanted};
  o.budgets = {0.2};
  o.policies = {CompressPolicy::kStreaming, CompressPolicy::kH2o, CompressPolicy::kSnapKv};
  const auto points = run(o);
  const auto& streaming = find(points, CompressWorkload::kPlanted, CompressPolicy::kStreaming, 0.2);
  for (const CompressPolicy policy : {CompressPolicy::kH2o, CompressPolicy::kSnapKv}) {
    const auto& p = find(points, CompressWorkload::kPlanted, policy, 0.2);
    EXPECT_GE(p.planted_kept, 0.9) << policy_name(policy);
    EXPECT_LT(p.relative_error, streaming.relative_error) << policy_name(policy);
    EXPECT_GT(p.mass_kept, streaming.mass_kept) << policy_name(policy);
  }
  EXPECT_LT(streaming.planted_kept, 0.5);  // the window holds about its share of the prompt
}

TEST(CompressSim, MoreBudgetNeverRaisesTheError) {
  CompressOptions o = small_options();
  o.workloads = {CompressWorkload::kPlanted};
  o.budgets = {0.1, 0.2, 0.3, 0.5, 0.8};
  o.policies = {CompressPolicy::kStreaming, CompressPolicy::kH2o, CompressPolicy::kSnapKv,
                CompressPolicy::kPyramid};
  const auto points = run(o);
  for (const CompressPolicy policy : o.policies) {
    for (size_t i = 1; i < o.budgets.size(); ++i) {
      const auto& smaller = find(points, CompressWorkload::kPlanted, policy, o.budgets[i - 1]);
      const auto& larger = find(points, CompressWorkload::kPlanted, policy, o.budgets[i]);
      EXPECT_LE(larger.relative_error, smaller.relative_error)
          << policy_name(policy) << " at " << o.budgets[i];
      EXPECT_GE(larger.mass_kept, smaller.mass_kept)
          << policy_name(policy) << " at " << o.budgets[i];
    }
  }
}

nlohmann::json without_timing(nlohmann::json results) {
  for (auto& r : results["runs"])
    r.erase("selection_us");
  return results;
}

TEST(CompressSim, TheSameSeedGivesTheSameResults) {
  CompressOptions o = small_options();
  o.tokens = 128;
  o.budgets = {0.2, 0.5};
  const auto first = without_timing(compress_json(o, run(o)));
  const auto second = without_timing(compress_json(o, run(o)));
  EXPECT_EQ(first.dump(), second.dump());
  o.seed += 1;
  EXPECT_NE(without_timing(compress_json(o, run(o))).dump(), first.dump());
}

std::string refusal(const CompressOptions& o) {
  const Status s = check_compress_options(o);
  EXPECT_FALSE(s.ok());
  return s.message();
}

TEST(CompressSim, RefusesBadOptionsNamingThem) {
  auto with = [](auto change) {
    CompressOptions o = small_options();
    change(o);
    return refusal(o);
  };
  EXPECT_THAT(with([](auto& o) { o.tokens = 8; }), HasSubstr("--tokens 8"));
  EXPECT_THAT(with([](auto& o) { o.heads = 0; }), HasSubstr("--heads"));
  EXPECT_THAT(with([](auto& o) { o.head_dim = 0; }), HasSubstr("--head-dim"));
  EXPECT_THAT(with([](auto& o) { o.layers = 0; }), HasSubstr("--layers"));
  EXPECT_THAT(with([](auto& o) { o.decode_steps = 0; }), HasSubstr("--decode-steps"));
  EXPECT_THAT(with([](auto& o) { o.budgets = {}; }), HasSubstr("--budgets"));
  EXPECT_THAT(with([](auto& o) { o.budgets = {0.2, 0.0}; }), HasSubstr("--budgets 0 must be"));
  EXPECT_THAT(with([](auto& o) { o.budgets = {1.5}; }), HasSubstr("--budgets 1.5 must be"));
  EXPECT_THAT(
      with([](auto& o) { o.budgets = {0.02}; }),
      HasSubstr("--budgets 0.02 holds 11 of the 528 tokens, not more than --decode-steps 16"));
  EXPECT_THAT(with([](auto& o) { o.policies = {}; }), HasSubstr("--policies"));
  EXPECT_THAT(parse_compress_policy("lru").status().message(),
              HasSubstr("--policies \"lru\" is not one of full, streaming, h2o, snapkv, pyramid"));
  EXPECT_THAT(parse_compress_workload("zipf").status().message(),
              HasSubstr("--workloads \"zipf\" is not one of planted, power-law"));
  EXPECT_FALSE(run_compress_sim([] {
                 CompressOptions o = small_options();
                 o.heads = 0;
                 return o;
               }())
                   .ok());
}

}  // namespace
}  // namespace kvfabric::bench
