// Token compression planned by the coordinator and run by a rank: compactions keep exactly the
// tokens their policy picks, bit-exact, and never disturb K/V that a prefix hit serves.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>
#include <thread>

#include "backend/validate.h"
#include "kvfabric/coordinator/coordinator.h"
#include "kvfabric/runtime/rank_cache.h"
#include "kvfabric/runtime/rank_job.h"
#include "testing/backend_fixture.h"
#include "testing/kv_reference.h"
#include "testing/mailbox_transport.h"
#include "testing/property_env.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using quant::CompressionPolicy;
using testing::serving_config;
using testing::splitmix64;
using ::testing::HasSubstr;

CompressionPolicy streaming(uint64_t budget, uint64_t sink) {
  CompressionPolicy p;
  p.kind = CompressionPolicy::Kind::kStreaming;
  p.budget_tokens = budget;
  p.sink_tokens = sink;
  return p;
}

CompressionPolicy h2o(uint64_t budget, uint64_t recent, uint32_t interval) {
  CompressionPolicy p;
  p.kind = CompressionPolicy::Kind::kH2o;
  p.budget_tokens = budget;
  p.recent_tokens = recent;
  p.interval_steps = interval;
  return p;
}

CompressionPolicy snapkv(uint64_t budget, uint64_t window) {
  CompressionPolicy p;
  p.kind = CompressionPolicy::Kind::kSnapKv;
  p.budget_tokens = budget;
  p.window_tokens = window;
  return p;
}

CompressionPolicy pyramid(uint64_t budget, uint64_t window, double beta) {
  CompressionPolicy p;
  p.kind = CompressionPolicy::Kind::kPyramid;
  p.budget_tokens = budget;
  p.window_tokens = window;
  p.beta = beta;
  return p;
}

// The test model's 2 layers as 2 layer groups of one (PyramidKV's tables per group).
Config grouped(Config config) {
  config.cache.layers_per_group = 1;
  return config;
}

bool requests_scores_of(const StepPlan& plan, SeqId seq) {
  return std::any_of(plan.score_requests.begin(), plan.score_requests.end(),
                     [&](const StepPlan::ScoreRequest& r) { return r.seq == seq; });
}

// One rank (dp 1, tp 1) serving the coordinator's plans; the engine model writes and checks
// every cached token's K/V after each step, and its attention feeds the scores.
struct CompressedRank {
  Config config;
  std::unique_ptr<Backend> backend = testing::cpu_backend(best_cpu_isa());
  std::unique_ptr<Transport> transport = make_local_transport();
  std::unique_ptr<RankCache> rank;
  Coordinator coordinator;
  testing::EngineModel engine{config};
  std::function<float(SeqId, size_t, uint32_t)> mass = [](SeqId, size_t, uint32_t) { return 0.0f; };

  explicit CompressedRank(const Config& c)
      : config(c), coordinator(std::move(Coordinator::create(c)).value()) {
    rank = std::move(RankCache::create(config, 0, *backend, *transport)).value();
  }

  Result<Placement> admit(SeqId seq, const std::vector<TokenId>& prompt,
                          const AdmitOptions& options) {
    auto placed = coordinator.admit(seq, prompt, options);
    if (placed.ok()) engine.admitted(seq, prompt, *placed);
    return placed;
  }
  Result<Placement> admit(SeqId seq, const std::vector<TokenId>& prompt,
                          std::optional<CompressionPolicy> policy) {
    AdmitOptions options;
    options.compression = policy;
    return admit(seq, prompt, options);
  }
  void free(SeqId seq) {
    ASSERT_TRUE(coordinator.free(seq).ok());
    engine.freed(seq);
  }
  void decode(SeqId seq) {
    const TokenId token = static_cast<TokenId>(engine.tokens(seq).size() * 7 + 3);
    ASSERT_TRUE(coordinator.append(seq, 1).ok());
    engine.appended(seq, std::span(&token, 1));
  }
  // One step: plan, execute (the root gathers requested scores), forward pass, check, attend.
  ::testing::AssertionResult step(StepPlan* out = nullptr) {
    auto plan = coordinator.step();
    if (!plan.ok()) return ::testing::AssertionFailure() << plan.status();
    std::vector<uint8_t> bytes = plan->serialize();
    if (const Status s = rank->receive_and_execute(bytes, RankId{0}); !s.ok()) {
      return ::testing::AssertionFailure() << s;
    }
    for (const ReplicaScores& r : rank->reported_scores()) {
      if (const Status s = coordinator.report_attention(r.seq, plan->step, r.scores); !s.ok()) {
        return ::testing::AssertionFailure() << s;
      }
    }
    engine.planned(*plan);
    if (const Status s = engine.forward(*rank); !s.ok()) return ::testing::AssertionFailure() << s;
    if (const Status s = engine.attend(*rank, mass); !s.ok()) {
      return ::testing::AssertionFailure() << s;
    }
    if (out != nullptr) *out = *plan;
    return engine.verify(*rank);
  }
  // Admits, runs the steps a SnapKV prompt takes to be compacted (prefill, score request,
  // compaction), then frees the sequence and runs the step that releases it.
  Result<Placement> serve_and_free(SeqId seq, const std::vector<TokenId>& prompt,
                                   const AdmitOptions& options) {
    const auto one_step = [this] {
      const auto stepped = step();
      return stepped ? ok_status() : Status(ErrorCode::kInternal, stepped.message());
    };
    KVF_ASSIGN_OR_RETURN(Placement placed, admit(seq, prompt, options));
    for (int i = 0; i < 3; ++i) KVF_RETURN_IF_ERROR(one_step());
    KVF_RETURN_IF_ERROR(coordinator.free(seq));
    engine.freed(seq);
    KVF_RETURN_IF_ERROR(one_step());
    return placed;
  }
  // Steps without reporting scores (plans executed, forward passes run) until a plan requests
  // the scores of `seq`; that plan is `plan`.
  ::testing::AssertionResult step_until_scores_requested(SeqId seq, StepPlan& plan) {
    plan = StepPlan{};
    while (!requests_scores_of(plan, seq)) {
      auto next = coordinator.step();
      if (!next.ok()) return ::testing::AssertionFailure() << next.status();
      plan = *std::move(next);
      std::vector<uint8_t> bytes = plan.serialize();
      if (const Status s = rank->receive_and_execute(bytes, RankId{0}); !s.ok()) {
        return ::testing::AssertionFailure() << s;
      }
      engine.planned(plan);
      if (const Status s = engine.forward(*rank); !s.ok()) return ::testing::AssertionFailure() << s;
    }
    return ::testing::AssertionSuccess();
  }
};

TEST(CompressionTest, StreamingKeepsTheSinksAndTheNewestTokensBitExact) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  const SeqId seq{1};
  ASSERT_TRUE(r.admit(seq, testing::token_run(100, 10), streaming(48, 4)).ok());
  ASSERT_TRUE(r.step());  // the prefill
  r.decode(seq);
  StepPlan plan;
  ASSERT_TRUE(r.step(&plan));  // compacted, then the decoded token computed in place
  ASSERT_EQ(plan.compactions.size(), 1u);
  const StepPlan::Compaction& c = plan.compactions[0];
  EXPECT_EQ(c.tokens_before, 101u);
  // 53 tokens past the budget drop as three whole blocks: the window keeps its blocks in place,
  // and only the block where the sink meets the window is copied.
  EXPECT_EQ(c.kept, (std::vector<StepPlan::TokenRange>{{0, 4}, {52, 49}}));
  EXPECT_EQ(r.coordinator.blocks_of(seq).size(), 4u);  // 53 tokens
  uint32_t copied = 0;
  for (const StepPlan::Op& op : plan.ops) copied += op.kind == StepPlan::OpKind::kCopy ? op.copy.num_tokens : 0;
  EXPECT_EQ(copied, 16u);  // the cached prompt's first block is copied whole, never written
  std::vector<size_t> want = {0, 1, 2, 3};
  for (size_t i = 52; i <= 100; ++i) want.push_back(i);
  EXPECT_EQ(r.engine.origins(seq), want);
  EXPECT_EQ(r.coordinator.stats().compactions, 1u);
  EXPECT_EQ(r.coordinator.stats().compacted_tokens, 48u);
  // The next compactions keep the cache within a block of its budget as it decodes.
  for (int i = 0; i < 40; ++i) {
    r.decode(seq);
    ASSERT_TRUE(r.step());
    EXPECT_LE(r.engine.origins(seq).size(), 48u + 15u);
  }
  EXPECT_GE(r.coordinator.stats().compactions, 3u);
  EXPECT_EQ(r.engine.origins(seq).back(), 140u);
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
}

// Regression: a sliding window kept the blocks of its newest tokens in place, even one shared
// with a fork and holding tokens not computed yet: the forward pass then wrote the compacted
// sequence's K/V (attending to the sink and the window only) and the fork's (attending to
// everything) into the same slots.
TEST(CompressionTest, ACompactionNeverLeavesTheSlotsItsForwardPassWritesShared) {
  Config config = serving_config(1, 1, 4, 2, 8, 0);
  config.cache.block_size = 4;
  auto coordinator = Coordinator::create(config);
  ASSERT_TRUE(coordinator.ok());
  Coordinator& c = *coordinator;
  AdmitOptions options;
  options.compression = streaming(8, 2);
  ASSERT_TRUE(c.admit(SeqId{1}, testing::token_run(8, 100), options).ok());
  ASSERT_TRUE(c.step().ok());      // the prefill
  ASSERT_TRUE(c.step().ok());      // computed
  ASSERT_TRUE(c.append(SeqId{1}, 4).ok());  // a block of tokens the next forward pass computes
  ASSERT_TRUE(c.fork(SeqId{1}, SeqId{2}).ok());
  ASSERT_TRUE(c.append(SeqId{1}, 4).ok());
  const auto plan = c.step();
  ASSERT_TRUE(plan.ok());
  ASSERT_FALSE(plan->compactions.empty());
  // Every compacted table's blocks from its first uncomputed slot on are its own.
  for (const StepPlan::Compaction& compaction : plan->compactions) {
    const auto table = std::find_if(plan->tables.begin(), plan->tables.end(),
                                    [&](const StepPlan::Table& t) { return t.seq == compaction.seq; });
    ASSERT_NE(table, plan->tables.end());
    ASSERT_EQ(table->first_block, 0u);
    const SeqId other = compaction.seq == SeqId{1} ? SeqId{2} : SeqId{1};
    const std::vector<BlockId> others = c.blocks_of(other);
    for (size_t k = table->computed_tokens / 4; k < table->blocks.size(); ++k) {
      EXPECT_THAT(others, ::testing::Not(::testing::Contains(table->blocks[k])))
          << compaction.seq << "'s block " << k << " is " << other << "'s too";
    }
  }
  EXPECT_TRUE(c.verify_integrity().ok());
}

// The ranks' scores reach the coordinator through the plan's score requests; the heaviest
// tokens survive, with the recent window.
TEST(CompressionTest, H2oKeepsPlantedHeavyHittersFromTheRanksScores) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  const std::set<size_t> heavy = {3, 17, 40, 41, 66};
  r.mass = [&](SeqId, size_t origin, uint32_t) {
    return heavy.count(origin) ? 1.0f : 0.01f * static_cast<float>(origin % 5);
  };
  const SeqId seq{1};
  ASSERT_TRUE(r.admit(seq, testing::token_run(90, 10), h2o(32, 16, 4)).ok());
  uint64_t requested = 0;
  for (int i = 0; i < 8; ++i) {
    StepPlan plan;
    ASSERT_TRUE(r.step(&plan));
    requested += plan.score_requests.size();
    r.decode(seq);
  }
  EXPECT_GT(requested, 0u);
  ASSERT_GE(r.coordinator.stats().compactions, 1u);
  const std::vector<size_t>& kept = r.engine.origins(seq);
  for (size_t h : heavy) EXPECT_TRUE(std::count(kept.begin(), kept.end(), h)) << "token " << h;
  // Newest 16 always stay (the last decoded token is not computed yet, so it stays too).
  const size_t newest = r.engine.tokens(seq).size() - 1;
  for (size_t i = newest - 15; i <= newest; ++i) {
    EXPECT_TRUE(std::count(kept.begin(), kept.end(), i)) << "recent token " << i;
  }
  EXPECT_LE(kept.size(), 32u + 4u);  // the budget plus what decoded since the last compaction
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
}

// H2O fills the slots it drops with later tokens: once the cached prompt was copied (the first
// compaction), each compaction copies the tokens that fill dropped slots and the two its scores
// do not cover (the one computed since the ranks reported, and the uncomputed one), not every
// token after the first dropped one. The recent window stays the newest
// tokens by age wherever earlier compactions moved them, and every kept token reads back exact.
TEST(CompressionTest, H2oMovesOnlyTheTokensThatFillDroppedSlots) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  const std::set<size_t> heavy = {2, 30, 31, 57};
  r.mass = [&](SeqId, size_t origin, uint32_t) {
    return heavy.count(origin) ? 1.0f : 0.05f * static_cast<float>(origin % 7);
  };
  const SeqId seq{1};
  constexpr size_t kRecent = 12;
  ASSERT_TRUE(r.admit(seq, testing::token_run(80, 3), h2o(40, kRecent, 1)).ok());
  uint64_t compactions = 0, later_copied = 0, later_dropped = 0;
  for (int i = 0; i < 30; ++i) {
    StepPlan plan;
    ASSERT_TRUE(r.step(&plan));
    for (const StepPlan::Compaction& c : plan.compactions) {
      ++compactions;
      uint64_t copied = 0;
      for (const StepPlan::Op& op : plan.ops) {
        if (op.kind == StepPlan::OpKind::kCopy) copied += op.copy.num_tokens;
      }
      const uint64_t dropped = c.tokens_before - c.tokens_after();
      if (compactions > 1) {
        EXPECT_LE(copied, dropped + 2) << "compaction " << compactions;
        later_copied += copied;
        later_dropped += dropped;
      }
      const std::vector<size_t>& kept = r.engine.origins(seq);
      const size_t tokens = r.engine.tokens(seq).size();
      for (size_t o = tokens - kRecent; o < tokens; ++o) {
        EXPECT_TRUE(std::count(kept.begin(), kept.end(), o)) << "recent token " << o;
      }
      for (size_t h : heavy) EXPECT_TRUE(std::count(kept.begin(), kept.end(), h)) << "token " << h;
    }
    r.decode(seq);
  }
  EXPECT_GE(compactions, 20u);
  EXPECT_GT(later_dropped, 0u);
  EXPECT_LE(later_copied, 3 * later_dropped);
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
}

// A scheduler that reports one step late (it builds the next plan first) is answered: the
// request repeats until a report comes, and a report for any of those plans is taken. Once a
// compaction renumbered the sequence, a report for a plan before it is refused.
TEST(CompressionTest, AReportOneStepLateIsTakenUntilTheSequenceIsRenumbered) {
  auto coordinator = Coordinator::create(serving_config(1, 1, 4, 2, 32, 0));
  ASSERT_TRUE(coordinator.ok());
  AdmitOptions options;
  options.compression = h2o(24, 4, 1);
  const SeqId seq{1};
  ASSERT_TRUE(coordinator->admit(seq, testing::token_run(48, 5), options).ok());
  ASSERT_TRUE(coordinator->step().ok());  // the prefill
  std::vector<uint64_t> asked;
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(coordinator->append(seq, 1).ok());
    const auto plan = coordinator->step();
    ASSERT_TRUE(plan.ok());
    ASSERT_EQ(plan->score_requests.size(), 1u);  // asked again: no report yet
    asked.push_back(plan->step);
  }
  const std::vector<double> scores(49, 1.0);
  EXPECT_THAT(coordinator->report_attention(seq, asked[0] - 1, scores).message(),
              HasSubstr("its outstanding requests are steps " + std::to_string(asked[0]) + " to " +
                        std::to_string(asked[1])));
  EXPECT_THAT(coordinator->report_attention(seq, asked[1] + 1, scores).message(),
              HasSubstr("outstanding requests are steps"));
  ASSERT_TRUE(coordinator->report_attention(seq, asked[0], scores).ok());  // one step late
  const auto compacted = coordinator->step();
  ASSERT_TRUE(compacted.ok());
  ASSERT_EQ(compacted->compactions.size(), 1u);
  EXPECT_THAT(coordinator->report_attention(seq, asked[1], scores).message(),
              HasSubstr("its outstanding request is step " + std::to_string(compacted->step)));
  EXPECT_TRUE(coordinator->verify_integrity().ok());
}

// A plan every rank refuses gathers no scores: the root holds none, not the last plan's.
TEST(CompressionTest, ARefusedPlanLeavesNoEarlierScoresBehind) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  r.mass = [](SeqId, size_t, uint32_t) { return 1.0f; };
  ASSERT_TRUE(r.admit(SeqId{1}, testing::token_run(60, 4), h2o(20, 4, 1)).ok());
  bool reported = false;
  for (int i = 0; i < 3 && !reported; ++i) {
    ASSERT_TRUE(r.step());
    reported = !r.rank->reported_scores().empty();
    r.decode(SeqId{1});
  }
  ASSERT_TRUE(reported);
  StepPlan stale;
  stale.step = 0;  // long past
  std::vector<uint8_t> bytes = stale.serialize();
  EXPECT_FALSE(r.rank->receive_and_execute(bytes, RankId{0}).ok());
  EXPECT_TRUE(r.rank->reported_scores().empty());
}

TEST(CompressionTest, SnapKvCompactsThePromptOnceAndKeepsDecodedTokens) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  r.mass = [](SeqId, size_t origin, uint32_t) { return origin == 10 || origin == 20 ? 5.0f : 0.1f; };
  CompressionPolicy policy;
  policy.kind = CompressionPolicy::Kind::kSnapKv;
  policy.budget_ratio = 0.25;  // of 96 prompt tokens: 24, kept in whole blocks: 32
  policy.window_tokens = 8;
  const SeqId seq{4};
  ASSERT_TRUE(r.admit(seq, testing::token_run(96, 1), policy).ok());
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(r.step());
    r.decode(seq);
  }
  EXPECT_EQ(r.coordinator.stats().compactions, 1u);
  const std::vector<size_t>& kept = r.engine.origins(seq);
  EXPECT_TRUE(std::count(kept.begin(), kept.end(), 10u));
  EXPECT_TRUE(std::count(kept.begin(), kept.end(), 20u));
  for (size_t i = 88; i < 96; ++i) EXPECT_TRUE(std::count(kept.begin(), kept.end(), i));
  // 32 of the prompt, then every decoded token.
  const size_t prompt_kept = std::count_if(kept.begin(), kept.end(), [](size_t o) { return o < 96; });
  EXPECT_EQ(prompt_kept, 32u);
  EXPECT_EQ(kept.size(), 32u + (r.engine.tokens(seq).size() - 96));
}

// PyramidKV across ranks: SnapKV's votes select once, after the prompt, a budget per layer
// group (84 and 12 tokens for an average of 48 over 2 layers with beta 4), each kept in whole
// group blocks (2 x 16 tokens) short of the prompt. The selections are nested, the planted heavy
// tokens survive in every group, each group's table holds its own tokens bit-exact (engine.verify
// reads every group through its view), and the pool holds what the groups keep.
TEST(CompressionTest, PyramidKeepsNestedBudgetsPerLayerGroupBitExact) {
  CompressedRank r(grouped(serving_config(1, 1, 4, 2, 32, 0)));
  const std::set<size_t> heavy = {3, 17, 40, 41, 66};
  r.mass = [&](SeqId, size_t origin, uint32_t) { return heavy.count(origin) ? 5.0f : 0.1f; };
  const SeqId seq{4};
  ASSERT_TRUE(r.admit(seq, testing::token_run(100, 1), pyramid(48, 8, 4)).ok());
  StepPlan regrouping;
  for (int i = 0; i < 8 && regrouping.compactions.empty(); ++i) {
    ASSERT_TRUE(r.step(&regrouping));
    r.decode(seq);
  }
  ASSERT_EQ(regrouping.compactions.size(), 2u);
  ASSERT_TRUE(r.engine.grouped(seq));
  const size_t decoded = r.engine.tokens(seq).size() - 100;
  // Group 0's 84 round up to the whole prompt; group 1's 12 to 36 (100 - 2 x 32).
  const std::vector<size_t> prompt_kept = {100, 36};
  for (uint32_t g = 0; g < 2; ++g) {
    EXPECT_EQ(regrouping.compactions[g].layer_group, g);
    const std::vector<size_t>& kept = r.engine.group_origins(seq, g);
    EXPECT_EQ(kept.size(), prompt_kept[g] + decoded) << "group " << g;
    for (size_t h : heavy) EXPECT_TRUE(std::count(kept.begin(), kept.end(), h)) << "token " << h;
    for (size_t w = 92; w < 100; ++w) EXPECT_TRUE(std::count(kept.begin(), kept.end(), w));
  }
  const std::vector<size_t>& deep = r.engine.group_origins(seq, 1);
  const std::vector<size_t>& shallow = r.engine.group_origins(seq, 0);
  for (size_t o : deep) EXPECT_TRUE(std::count(shallow.begin(), shallow.end(), o)) << o;
  const size_t regroup_copies = std::count_if(
      regrouping.ops.begin(), regrouping.ops.end(),
      [](const StepPlan::Op& op) { return op.from_group == StepPlan::kAllLayers && op.to_group != StepPlan::kAllLayers; });
  EXPECT_GT(regroup_copies, 0u);
  // Decoding fills every group's last block together: a round of two blocks at a time.
  for (int i = 0; i < 40; ++i) {
    ASSERT_TRUE(r.step());
    r.decode(seq);
    const size_t tokens = r.engine.tokens(seq).size() - 100;
    const size_t blocks = (100 + tokens + 31) / 32 + (36 + tokens + 31) / 32;
    ASSERT_EQ(r.coordinator.blocks_of(seq).size(), blocks) << "after " << tokens << " decoded";
  }
  EXPECT_EQ(r.coordinator.tokens_of(seq),
            (r.engine.group_origins(seq, 0).size() + r.engine.group_origins(seq, 1).size() + 1) / 2);
  EXPECT_EQ(r.coordinator.stats().compactions, 1u);
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
  r.free(seq);
  ASSERT_TRUE(r.step());
  EXPECT_TRUE(r.rank->group_tables().empty());
  EXPECT_EQ(r.coordinator.replica_stats(0).used_blocks, 0u);
}

// Whole group blocks would take more than the whole table here (4 groups of one layer, 64-token
// group blocks: three groups keep all 65 prompt tokens in 2 blocks each, one keeps 1): the
// sequence stays whole, with every token, rather than grow.
TEST(CompressionTest, APyramidThatWouldTakeMoreBlocksKeepsTheSequenceWhole) {
  Config config = serving_config(1, 1, 4, 2, 32, 0);
  config.model.num_layers = 4;
  config.cache.layers_per_group = 1;
  CompressedRank r(config);
  r.mass = [](SeqId, size_t, uint32_t) { return 1.0f; };
  const SeqId seq{1};
  ASSERT_TRUE(r.admit(seq, testing::token_run(65, 1), pyramid(2, 1, 4)).ok());
  for (int i = 0; i < 6; ++i) {
    StepPlan plan;
    ASSERT_TRUE(r.step(&plan));
    EXPECT_TRUE(plan.compactions.empty()) << "step " << plan.step;
    r.decode(seq);
  }
  EXPECT_FALSE(r.engine.grouped(seq));
  EXPECT_EQ(r.engine.origins(seq).size(), 71u);
  EXPECT_EQ(r.coordinator.stats().compactions, 0u);
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
}

// A sequence compacted per layer group forked while its groups' last blocks are partly filled:
// the child gets its own copies of that round (written next by either), the rest is shared.
// Then a higher-priority request swaps both out and back in, on new blocks. Every group's K/V
// reads back exact after every step.
TEST(CompressionTest, ForkedAndSwappedGroupedSequencesKeepEveryGroupsKv) {
  CompressedRank r(grouped(serving_config(1, 1, 4, 2, 24, 24)));
  r.mass = [](SeqId, size_t origin, uint32_t) { return origin % 9 == 0 ? 3.0f : 0.2f; };
  const SeqId seq{1}, child{2};
  ASSERT_TRUE(r.admit(seq, testing::token_run(70, 1), pyramid(24, 8, 4)).ok());
  for (int i = 0; i < 6 && !r.engine.grouped(seq); ++i) {
    ASSERT_TRUE(r.step());
    r.decode(seq);
  }
  ASSERT_TRUE(r.engine.grouped(seq));
  ASSERT_NE(r.engine.group_origins(seq, 0).size() % 32, 0u);  // the last round is partly filled
  const std::vector<BlockId> parent_blocks = r.coordinator.blocks_of(seq);
  ASSERT_TRUE(r.coordinator.fork(seq, child).ok());
  r.engine.forked(seq, child);
  const std::vector<BlockId> child_blocks = r.coordinator.blocks_of(child);
  ASSERT_EQ(child_blocks.size(), parent_blocks.size());
  for (size_t i = 0; i < parent_blocks.size(); ++i) {
    EXPECT_EQ(child_blocks[i] == parent_blocks[i], i + 2 < parent_blocks.size()) << "block " << i;
  }
  StepPlan forked;
  ASSERT_TRUE(r.step(&forked));
  EXPECT_EQ(forked.count(StepPlan::OpKind::kCopy), 2u);
  for (int i = 0; i < 12; ++i) {
    r.decode(seq);
    r.decode(child);
    ASSERT_TRUE(r.step());
  }
  // Room for the newcomer only by swapping both out.
  AdmitOptions urgent;
  urgent.priority = 1;
  const uint64_t free_now = testing::available_blocks(r.coordinator, 0);
  const auto newcomer = testing::token_run(static_cast<uint32_t>((free_now + 2) * 16), 500);
  ASSERT_TRUE(r.admit(SeqId{3}, newcomer, urgent).ok());
  EXPECT_TRUE(r.coordinator.is_swapped(seq) || r.coordinator.is_swapped(child));
  ASSERT_TRUE(r.step());
  r.free(SeqId{3});
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(r.step());
  EXPECT_FALSE(r.coordinator.is_swapped(seq));
  EXPECT_FALSE(r.coordinator.is_swapped(child));
  EXPECT_GT(r.coordinator.stats().swapped_in, 0u);
  r.decode(seq);
  ASSERT_TRUE(r.step());
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
}

// A compressed sequence's prompt is cached whole before it is compacted, and the compaction
// copies the cached blocks instead of writing them: a later request for the same prompt is
// served the full, unchanged K/V (engine.verify checks every token of both).
TEST(CompressionTest, ACompactedPromptIsNeverServedToARequestExpectingFullKv) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  const auto prompt = testing::token_run(64, 500);
  ASSERT_TRUE(r.admit(SeqId{1}, prompt, streaming(20, 4)).ok());
  ASSERT_TRUE(r.step());
  r.decode(SeqId{1});
  ASSERT_TRUE(r.step());
  ASSERT_EQ(r.coordinator.stats().compactions, 1u);
  auto longer = prompt;
  longer.push_back(9);
  const auto full = r.admit(SeqId{2}, longer, std::nullopt);
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(full->cached_tokens, 64u);
  ASSERT_TRUE(r.step());
  // The same compressed request shares the full prompt too, and compacts its own copy.
  ASSERT_TRUE(r.admit(SeqId{3}, prompt, streaming(20, 4)).ok());
  ASSERT_TRUE(r.step());
  r.decode(SeqId{3});
  ASSERT_TRUE(r.step());
  EXPECT_EQ(r.coordinator.stats().compactions, 2u);
  const auto again = r.admit(SeqId{5}, longer, std::nullopt);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->cached_tokens, 64u);
  ASSERT_TRUE(r.step());
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
}

// Attention that depends on the prompt position alone, as a model's does on an identical prompt:
// identical requests then keep the same tokens.
float by_position(SeqId, size_t origin, uint32_t) { return origin % 7 == 3 ? 5.0f : 0.1f; }

// A SnapKV compaction's kept prompt is indexed under the prompt, namespace, budget and window;
// an identical request starts from it (engine.verify checks its K/V every step), and a request
// differing in any of them does not.
TEST(CompressionTest, IdenticalSnapKvRequestsShareTheCompactedPrompt) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  r.mass = by_position;
  const auto prompt = testing::token_run(96, 1);
  const CompressionPolicy policy = snapkv(24, 8);  // kept in whole blocks: 32 tokens
  ASSERT_TRUE(r.admit(SeqId{1}, prompt, policy).ok());
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(r.step());
    r.decode(SeqId{1});
  }
  ASSERT_EQ(r.coordinator.stats().compactions, 1u);
  EXPECT_EQ(r.coordinator.stats().compressed_indexed, 1u);
  const std::vector<size_t> kept = r.engine.origins(SeqId{1});
  ASSERT_GT(kept.size(), 32u);
  for (size_t i = 0; i < kept.size(); ++i) EXPECT_EQ(kept[i] < 96, i < 32) << "slot " << i;

  const auto shared = r.admit(SeqId{2}, prompt, policy);
  ASSERT_TRUE(shared.ok());
  EXPECT_EQ(shared->compressed_tokens, 32u);
  EXPECT_EQ(shared->cached_tokens, 96u);
  const std::vector<BlockId> first = r.coordinator.blocks_of(SeqId{1});
  EXPECT_EQ(shared->blocks, std::vector<BlockId>(first.begin(), first.begin() + 2));
  EXPECT_EQ(r.engine.origins(SeqId{2}), std::vector<size_t>(kept.begin(), kept.begin() + 32));
  StepPlan plan;
  ASSERT_TRUE(r.step(&plan));
  const auto table = std::find_if(plan.tables.begin(), plan.tables.end(),
                                  [](const StepPlan::Table& t) { return t.seq == SeqId{2}; });
  ASSERT_NE(table, plan.tables.end());
  EXPECT_EQ(table->num_tokens, 32u);
  EXPECT_EQ(table->computed_tokens, 32u);  // nothing to prefill
  for (int i = 0; i < 20; ++i) {
    r.decode(SeqId{1});
    r.decode(SeqId{2});
    ASSERT_TRUE(r.step(&plan));
    EXPECT_FALSE(requests_scores_of(plan, SeqId{2}));  // its compaction is the one it shares
  }
  EXPECT_EQ(r.coordinator.stats().compactions, 1u);
  EXPECT_EQ(r.coordinator.stats().compressed_hits, 1u);
  EXPECT_EQ(r.coordinator.stats().local_hit_tokens, 96u);  // the first missed

  // A different budget, window, prompt or namespace, or no compression: the full prompt.
  auto changed = prompt;
  changed.back() += 1;
  auto changed_inside = prompt;  // the same length, first and last blocks: hashed to tell
  changed_inside[40] += 1;
  AdmitOptions other_tenant;
  other_tenant.tenant = "b";
  other_tenant.compression = policy;
  const auto other = r.coordinator.admit(SeqId{7}, prompt, other_tenant);
  ASSERT_TRUE(other.ok());
  r.engine.admitted(SeqId{7}, prompt, *other);
  EXPECT_EQ(other->compressed_tokens, 0u);
  for (const auto& [seq, request, compression] :
       {std::tuple{SeqId{3}, prompt, std::optional(snapkv(40, 8))},
        std::tuple{SeqId{4}, prompt, std::optional(snapkv(24, 4))},
        std::tuple{SeqId{5}, changed, std::optional(policy)},
        std::tuple{SeqId{6}, prompt, std::optional<CompressionPolicy>()},
        std::tuple{SeqId{8}, changed_inside, std::optional(policy)}}) {
    const auto placed = r.admit(seq, request, compression);
    ASSERT_TRUE(placed.ok()) << seq;
    EXPECT_EQ(placed->compressed_tokens, 0u) << seq;
    EXPECT_EQ(placed->cached_tokens, seq == SeqId{5} ? 80u : seq == SeqId{8} ? 32u : 96u) << seq;
  }
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(r.step());
  EXPECT_EQ(r.coordinator.stats().compressed_hits, 1u);
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
}

// A kept prompt leaves with its sequence unless its prompt was admitted again: then it stays
// cached when its sequences end and leaves like any cached block. A selection made from a
// partial report (a shorter vote) is compacted but never shared.
TEST(CompressionTest, AKeptPromptOutlivesItsSequenceOnlyWhenItsPromptRecurs) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  r.mass = by_position;
  const auto prompt = testing::token_run(96, 1);
  const CompressionPolicy policy = snapkv(24, 8);
  AdmitOptions options;
  options.compression = policy;
  const auto run_and_free = [&](SeqId seq, size_t want_compressed) {
    const auto placed = r.serve_and_free(seq, prompt, options);
    ASSERT_TRUE(placed.ok()) << placed.status();
    EXPECT_EQ(placed->compressed_tokens, want_compressed) << seq;
    EXPECT_TRUE(r.coordinator.verify_integrity().ok());
  };
  run_and_free(SeqId{1}, 0);
  EXPECT_EQ(r.coordinator.stats().compressed_indexed, 1u);
  EXPECT_EQ(r.coordinator.replica_stats(0).cached_blocks, 6u);  // the full prompt only
  run_and_free(SeqId{2}, 0);  // the prompt recurs: compacted and indexed again, to stay
  EXPECT_EQ(r.coordinator.stats().compressed_indexed, 2u);
  EXPECT_EQ(r.coordinator.replica_stats(0).cached_blocks, 8u);
  run_and_free(SeqId{3}, 32);  // cached with no sequence holding it
  run_and_free(SeqId{4}, 32);
  EXPECT_EQ(r.coordinator.stats().compressed_hits, 2u);
  ASSERT_TRUE(r.coordinator.reset_prefix_cache(std::nullopt).ok());
  EXPECT_EQ(r.coordinator.replica_stats(0).cached_blocks, 0u);
  const auto gone = r.admit(SeqId{5}, prompt, policy);
  ASSERT_TRUE(gone.ok());
  EXPECT_EQ(gone->compressed_tokens, 0u);
  EXPECT_EQ(gone->cached_tokens, 0u);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(r.step());
  EXPECT_EQ(r.coordinator.stats().compressed_indexed, 3u);  // its own compaction, indexed again

  // A report that leaves voters unscored: the rest of the prompt is kept, and not shared.
  const auto other = testing::token_run(96, 300);
  ASSERT_TRUE(r.admit(SeqId{6}, other, policy).ok());
  StepPlan plan;
  ASSERT_TRUE(r.step_until_scores_requested(SeqId{6}, plan));
  const std::vector<double> partial(40, 1.0);  // of 88 voters
  ASSERT_TRUE(r.coordinator.report_attention(SeqId{6}, plan.step, partial).ok());
  ASSERT_TRUE(r.step(&plan));
  ASSERT_EQ(plan.compactions.size(), 1u);
  EXPECT_EQ(r.coordinator.stats().compressed_indexed, 3u);
  const auto unshared = r.admit(SeqId{7}, other, policy);
  ASSERT_TRUE(unshared.ok());
  EXPECT_EQ(unshared->compressed_tokens, 0u);
  ASSERT_TRUE(r.step());
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
}

// A fork shares its parent's kept prompt and knows where it is indexed: freeing the fork
// forgets none of it while the parent holds it (whichever of the two ends last forgets it).
TEST(CompressionTest, FreeingAForkLeavesItsParentsKeptPromptShared) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  r.mass = by_position;
  const auto prompt = testing::token_run(96, 1);
  const CompressionPolicy policy = snapkv(24, 8);
  ASSERT_TRUE(r.admit(SeqId{1}, prompt, policy).ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(r.step());
  ASSERT_EQ(r.coordinator.stats().compressed_indexed, 1u);
  ASSERT_TRUE(r.coordinator.fork(SeqId{1}, SeqId{2}).ok());
  r.engine.forked(SeqId{1}, SeqId{2});
  ASSERT_TRUE(r.step());
  r.free(SeqId{2});
  ASSERT_TRUE(r.step());
  const auto identical = r.admit(SeqId{3}, prompt, policy);
  ASSERT_TRUE(identical.ok()) << identical.status();
  EXPECT_EQ(identical->compressed_tokens, 32u);
  ASSERT_TRUE(r.step());
  EXPECT_EQ(r.coordinator.stats().compressed_hits, 1u);
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
}

// A kept prompt whose holders take no newcomer moves to a replica that does, as a cached
// prefix would (the plan's migrate ops read exactly its blocks); with migration costing more
// than prefill, the request is placed as usual instead.
TEST(CompressionTest, AKeptPromptMovesToAReplicaThatTakesTheRequest) {
  const auto prompt = testing::token_run(96, 1);
  AdmitOptions options;
  options.compression = snapkv(24, 8);
  for (const double migration_cost : {0.1, 2.0}) {
    Config config = serving_config(2, 1, 4, 2, 32, 0);
    config.coordinator.max_sequences_per_replica = 1;
    config.coordinator.migration_token_cost = migration_cost;
    auto c = Coordinator::create(config);
    ASSERT_TRUE(c.ok());
    ASSERT_TRUE(c->admit(SeqId{1}, prompt, options).ok());
    const uint32_t holder = *c->replica_of(SeqId{1});
    StepPlan plan;
    while (!requests_scores_of(plan, SeqId{1})) plan = std::move(c->step()).value();
    ASSERT_TRUE(c->report_attention(SeqId{1}, plan.step, std::vector<double>(96, 1.0)).ok());
    plan = std::move(c->step()).value();
    ASSERT_EQ(plan.compactions.size(), 1u);
    const std::vector<BlockId> kept_blocks = c->blocks_of(SeqId{1});

    const auto moved = c->admit(SeqId{2}, prompt, options);  // the holder is full
    ASSERT_TRUE(moved.ok());
    EXPECT_NE(moved->replica, holder);
    if (migration_cost > 1.0) {
      EXPECT_EQ(moved->compressed_tokens, 0u);
      continue;
    }
    EXPECT_EQ(moved->compressed_tokens, 32u);
    EXPECT_EQ(moved->cached_tokens, 96u);
    EXPECT_EQ(moved->migrated_tokens, 96u);
    plan = std::move(c->step()).value();
    std::vector<StepPlan::Op> want;
    for (size_t i = 0; i < 2; ++i) {
      want.push_back(StepPlan::Op::migrate(holder, kept_blocks[i], moved->replica, moved->blocks[i]));
    }
    EXPECT_EQ(plan.ops, want);
    EXPECT_EQ(c->stats().compressed_hits, 1u);
    EXPECT_TRUE(c->verify_integrity().ok());
  }
}

// A request served a kept prompt takes the kept prompt's blocks from its tenant's quota, not the
// full prompt's: a quota too small for the prompt admits it compressed, and refuses it otherwise.
TEST(CompressionTest, AKeptPromptCountsItsOwnBlocksAgainstTheQuota) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  r.mass = by_position;
  const auto prompt = testing::token_run(96, 1);
  AdmitOptions options;
  options.tenant = "t";
  options.compression = snapkv(24, 8);
  for (SeqId seq : {SeqId{1}, SeqId{2}}) {  // seen twice: the kept prompt stays
    ASSERT_TRUE(r.serve_and_free(seq, prompt, options).ok());
  }
  TenantQuota quota;
  quota.max_blocks = 3;  // the full prompt needs 6, its kept prompt 2
  ASSERT_TRUE(r.coordinator.set_tenant_quota("t", quota).ok());
  const auto served = r.coordinator.admit(SeqId{3}, prompt, options);
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_EQ(served->compressed_tokens, 32u);
  AdmitOptions plain = options;
  plain.compression.reset();
  const ReplicaStats before = r.coordinator.replica_stats(0);
  const auto refused = r.coordinator.admit(SeqId{4}, prompt, plain);
  EXPECT_EQ(refused.status().code(), ErrorCode::kResourceExhausted);
  EXPECT_EQ(r.coordinator.replica_stats(0).used_blocks, before.used_blocks);
}

// A refused identical request is not a recurrence: the kept prompt still leaves with its
// sequence.
TEST(CompressionTest, ARefusedRequestDoesNotKeepAKeptPromptCached) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  r.mass = by_position;
  const auto prompt = testing::token_run(96, 1);
  AdmitOptions options;
  options.tenant = "t";
  options.compression = snapkv(24, 8);
  ASSERT_TRUE(r.admit(SeqId{1}, prompt, options).ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(r.step());
  ASSERT_EQ(r.coordinator.stats().compressed_indexed, 1u);
  TenantQuota quota;
  quota.max_sequences = 1;
  ASSERT_TRUE(r.coordinator.set_tenant_quota("t", quota).ok());
  EXPECT_EQ(r.coordinator.admit(SeqId{2}, prompt, options).status().code(),
            ErrorCode::kResourceExhausted);
  r.free(SeqId{1});
  ASSERT_TRUE(r.step());
  EXPECT_EQ(r.coordinator.replica_stats(0).cached_blocks, 6u);  // the full prompt only
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
}

// What eviction leaves of a kept prompt serves nobody, and a later compaction of the prompt is
// never hung below it: two full votes of different lengths (all prompt tokens, or only those
// before the window) keep the same tokens, and the kept prompt served afterwards is one
// compaction's whole (engine.verify checks its K/V).
TEST(CompressionTest, APartlyEvictedKeptPromptIsReplacedNotCompleted) {
  CompressedRank r(serving_config(1, 1, 4, 2, 22, 0));
  r.mass = by_position;
  const auto prompt = testing::token_run(96, 1);
  const CompressionPolicy policy = snapkv(24, 8);
  AdmitOptions options;
  options.compression = policy;
  ASSERT_TRUE(r.serve_and_free(SeqId{1}, prompt, options).ok());
  ASSERT_TRUE(r.serve_and_free(SeqId{2}, prompt, options).ok());  // seen twice: it stays cached
  ASSERT_EQ(r.coordinator.replica_stats(0).cached_blocks, 8u);
  // Pressure evicts the kept prompt's last block (then the full prompt's blocks).
  ASSERT_TRUE(r.admit(SeqId{3}, prompt, std::nullopt).ok());  // holds the full prompt's blocks
  const size_t free_blocks = r.coordinator.replica_stats(0).free_blocks;
  ASSERT_TRUE(r.admit(SeqId{9}, testing::token_run((free_blocks + 1) * 16, 5000), std::nullopt).ok());
  r.free(SeqId{9});
  ASSERT_EQ(r.coordinator.replica_stats(0).cached_blocks, 1u);  // the kept prompt's first block
  const auto mine = r.admit(SeqId{4}, prompt, policy);
  ASSERT_TRUE(mine.ok());
  ASSERT_EQ(mine->compressed_tokens, 0u);
  StepPlan plan;
  ASSERT_TRUE(r.step_until_scores_requested(SeqId{4}, plan));
  std::vector<double> votes(88);  // a full vote that leaves out the window
  for (size_t i = 0; i < votes.size(); ++i) votes[i] = by_position(SeqId{4}, i, 0);
  ASSERT_TRUE(r.coordinator.report_attention(SeqId{4}, plan.step, votes).ok());
  ASSERT_TRUE(r.step(&plan));
  ASSERT_EQ(plan.compactions.size(), 1u);
  EXPECT_EQ(r.coordinator.stats().compressed_indexed, 3u);
  const auto served = r.admit(SeqId{5}, prompt, policy);
  ASSERT_TRUE(served.ok());
  EXPECT_EQ(served->compressed_tokens, 32u);
  const std::vector<BlockId> compacted = r.coordinator.blocks_of(SeqId{4});
  EXPECT_EQ(served->blocks, std::vector<BlockId>(compacted.begin(), compacted.begin() + 2));
  EXPECT_TRUE(r.step());
  EXPECT_TRUE(r.coordinator.verify_integrity().ok());
}

// After a compaction, decode attention reads exactly the kept rows: it equals fp64 attention over
// the kept tokens' K/V, and its attention mass (the H2O score a shard reports) equals the fp64
// softmax weights summed over the query heads.
TEST(CompressionTest, DecodeOverACompactedSequenceEqualsFp64OverTheKeptRows) {
  CompressedRank r(serving_config(1, 1, 4, 2, 32, 0));
  const SeqId seq{1};
  const auto prompt = testing::token_run(70, 3);
  ASSERT_TRUE(r.admit(seq, prompt, streaming(40, 4)).ok());
  ASSERT_TRUE(r.step());
  r.decode(seq);
  ASSERT_TRUE(r.step());
  ASSERT_EQ(r.coordinator.stats().compactions, 1u);
  const std::vector<uint64_t>& kv_hashes = r.engine.kv_hashes(seq);
  const auto n = static_cast<uint32_t>(kv_hashes.size());
  const uint32_t hd = 64, q_heads = 4, kv_heads = 2, layer = 1;

  std::mt19937 rng(5);
  const std::vector<float> query = testing::random_normal(q_heads * hd, rng);
  std::vector<float> output(q_heads * hd), mass(n, 0.0f);
  std::vector<uint32_t> table;
  for (BlockId b : r.coordinator.blocks_of(seq)) table.push_back(b.value);
  DecodeAttentionArgs args;
  args.layer = layer;
  args.query = query.data();
  args.output = output.data();
  args.num_seqs = 1;
  args.num_q_heads = q_heads;
  args.block_tables = table.data();
  args.max_blocks_per_seq = static_cast<uint32_t>(table.size());
  args.context_lens = &n;
  args.softmax_scale = 0.125f;
  args.attention_mass = mass.data();
  args.mass_stride = n;
  ASSERT_TRUE(r.rank->decode_attention(layer, args).ok());

  std::vector<double> want_mass(n, 0.0);
  for (uint32_t qh = 0; qh < q_heads; ++qh) {
    const uint32_t kvh = qh / (q_heads / kv_heads);
    std::vector<double> k(size_t{n} * hd), v(k.size()), q(hd), weights;
    for (uint32_t t = 0; t < n; ++t) {
      for (uint32_t d = 0; d < hd; ++d) {
        k[size_t{t} * hd + d] = testing::token_kv(kv_hashes[t], layer, kvh, d, false);
        v[size_t{t} * hd + d] = testing::token_kv(kv_hashes[t], layer, kvh, d, true);
      }
    }
    for (uint32_t d = 0; d < hd; ++d) q[d] = query[qh * hd + d];
    const std::vector<double> want = testing::ref_attention(q, k.data(), v.data(), n, hd, 0.125, &weights);
    for (uint32_t d = 0; d < hd; ++d) EXPECT_NEAR(output[qh * hd + d], want[d], 1e-4) << qh << "," << d;
    for (uint32_t t = 0; t < n; ++t) want_mass[t] += weights[t];
  }
  for (uint32_t t = 0; t < n; ++t) EXPECT_NEAR(mass[t], want_mass[t], 1e-5) << "token " << t;
  // What a shard does with it: the scores the coordinator's next H2O compaction reads.
  ASSERT_TRUE(r.rank->accumulate_attention(seq, mass).ok());
  EXPECT_EQ(r.rank->attention_scores(seq).size(), n);
}

// A job's forward pass (RankJob::set_forward_pass) runs after every plan; the scores it adds
// reach rank 0 with the next plan that requests them, and an error from it fails the step.
TEST(CompressionTest, ARankJobsForwardPassFeedsTheScoreRequests) {
  const Config config = serving_config(1, 1, 4, 2, 32, 0);
  auto backend = testing::cpu_backend(best_cpu_isa());
  auto transport = make_local_transport();
  auto job = RankJob::create(config, *transport, *backend);
  ASSERT_TRUE(job.ok()) << job.status();
  auto coordinator = Coordinator::create(config);
  ASSERT_TRUE(coordinator.ok());
  std::vector<uint64_t> passes;
  (*job)->set_forward_pass([&](RankCache& cache, const StepPlan& plan) {
    passes.push_back(plan.step);
    for (const auto& [seq, table] : cache.tables()) {
      std::vector<float> mass(table.num_tokens, 0.5f);
      if (mass.size() > 7) mass[7] = 9.0f;
      KVF_RETURN_IF_ERROR(cache.accumulate_attention(seq, mass));
    }
    return ok_status();
  });
  AdmitOptions options;
  options.compression = h2o(24, 4, 1);
  ASSERT_TRUE(coordinator->admit(SeqId{1}, testing::token_run(64, 2), options).ok());
  uint64_t reported = 0;
  for (int step = 0; step < 4; ++step) {
    auto plan = coordinator->step();
    ASSERT_TRUE(plan.ok());
    ASSERT_TRUE((*job)->execute(*plan).ok());
    for (const ReplicaScores& s : (*job)->cache().reported_scores()) {
      ASSERT_TRUE(coordinator->report_attention(s.seq, plan->step, s.scores).ok());
      ++reported;
    }
    ASSERT_TRUE(coordinator->append(SeqId{1}, 1).ok());
  }
  EXPECT_EQ(passes, (std::vector<uint64_t>{0, 1, 2, 3}));
  EXPECT_GT(reported, 0u);
  // Requested at steps 1 and 2 (interval 1), reported with those plans, compacted at 2 and 3.
  EXPECT_EQ(coordinator->stats().compactions, 2u);
  EXPECT_GT((*job)->cache().stats().scores_sent, 0u);
  EXPECT_EQ(coordinator->tokens_of(SeqId{1}), 24u + 1u);  // the budget and the token since

  (*job)->set_forward_pass([](RankCache&, const StepPlan&) {
    return Status(ErrorCode::kInternal, "the model ran out of memory");
  });
  auto plan = coordinator->step();
  ASSERT_TRUE(plan.ok());
  EXPECT_THAT((*job)->execute(*plan).message(), HasSubstr("the model ran out of memory"));
}

// An H2O compaction moves later tokens into dropped slots and the uncomputed ones after them, so
// a copy often writes a block an earlier copy of the same compaction reads. A backend that runs
// a launch's copies at once (CUDA) must not put those two in one launch: run each launch's copies
// in reverse order, a schedule parallel copies may take, and the pool must end as running them
// one by one leaves it.
TEST(CompressionTest, ACompactionsCopiesSplitIntoLaunchesThatKeepTheirOrder) {
  const Config config = serving_config(1, 1, 4, 2, 32, 0);
  auto coordinator = Coordinator::create(config);
  ASSERT_TRUE(coordinator.ok());
  AdmitOptions options;
  options.compression = h2o(40, 8, 1);
  const SeqId seq{1};
  ASSERT_TRUE(coordinator->admit(seq, testing::token_run(64, 7), options).ok());
  ASSERT_TRUE(coordinator->step().ok());  // the prefill
  const auto asked = coordinator->step();
  ASSERT_TRUE(asked.ok());
  ASSERT_EQ(asked->score_requests.size(), 1u);
  std::vector<double> scores(64);
  for (size_t i = 0; i < scores.size(); ++i) scores[i] = (i * 7) % 5 == 0 ? 1.0 : 0.1 * (i % 3);
  ASSERT_TRUE(coordinator->report_attention(seq, asked->step, scores).ok());
  ASSERT_TRUE(coordinator->append(seq, 1).ok());
  // The first compaction copies the cached prompt's blocks; the second moves tokens within the
  // sequence's own blocks.
  const auto compacted = coordinator->step();
  ASSERT_TRUE(compacted.ok());
  ASSERT_EQ(compacted->compactions.size(), 1u);
  ASSERT_EQ(compacted->score_requests.size(), 1u);  // interval 1: the next one's scores
  ASSERT_EQ(coordinator->tokens_of(seq), 40u);
  // 25 heavy tokens and 15 new ones: tokens 0 and 16..24 stay in place, 25..39 fill slots
  // 1..15, and the new tokens then move into slots 25..39, which those fillers were read from.
  ASSERT_TRUE(coordinator->append(seq, 15).ok());
  scores.assign(40, 0.0);
  scores[0] = 1.0;
  std::fill(scores.begin() + 16, scores.end(), 1.0);
  ASSERT_TRUE(coordinator->report_attention(seq, compacted->step, scores).ok());
  auto plan = coordinator->step();
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->compactions.size(), 1u);
  EXPECT_EQ(plan->compactions[0].kept,
            (std::vector<StepPlan::TokenRange>{{0, 1}, {25, 15}, {16, 9}, {40, 15}}));
  std::vector<TokenCopy> copies;
  for (const StepPlan::Op& op : plan->ops) {
    if (op.kind == StepPlan::OpKind::kCopy) copies.push_back(op.copy);
  }
  ASSERT_GT(copies.size(), 2u);

  const uint32_t bs = config.cache.block_size;
  std::vector<uint32_t> pool(config.cache.num_blocks * bs);
  std::iota(pool.begin(), pool.end(), 0u);  // every slot holds its own name
  const auto run = [&](std::vector<uint32_t>& slots, const TokenCopy& c) {
    std::copy_n(slots.begin() + c.src_block.value * bs + c.src_offset, c.num_tokens,
                slots.begin() + c.dst_block.value * bs + c.dst_offset);
  };
  std::vector<uint32_t> in_order = pool, launched = pool;
  for (const TokenCopy& c : copies) run(in_order, c);
  size_t first = 0;
  for (const size_t last : detail::token_copy_launches(copies)) {
    ASSERT_LT(first, last);
    for (size_t i = last; i-- > first;) run(launched, copies[i]);
    first = last;
  }
  EXPECT_EQ(first, copies.size());
  const auto differs = std::mismatch(launched.begin(), launched.end(), in_order.begin());
  EXPECT_TRUE(differs.first == launched.end())
      << "slot " << differs.first - launched.begin() << " holds slot " << *differs.first
      << "'s token after the launches, slot " << *differs.second << "'s in list order";
}

TEST(CompressionTest, BadPoliciesAreRefusedNamingTheFieldAndChangeNothing) {
  CompressedRank r(serving_config(1, 1, 4, 2, 8, 0));
  const auto prompt = testing::token_run(40, 1);
  const ReplicaStats before = r.coordinator.replica_stats(0);
  struct Case {
    CompressionPolicy policy;
    const char* field;
  };
  CompressionPolicy both = streaming(10, 4);
  both.budget_ratio = 0.5;
  CompressionPolicy neither = streaming(0, 4);
  CompressionPolicy ratio = h2o(0, 0, 1);
  ratio.budget_ratio = 1.5;
  CompressionPolicy interval = h2o(16, 0, 0);
  CompressionPolicy recent = h2o(16, 17, 1);
  CompressionPolicy window;
  window.kind = CompressionPolicy::Kind::kSnapKv;
  window.budget_tokens = 8;
  window.window_tokens = 9;
  for (const Case& c : {Case{both, "budget_ratio"}, Case{neither, "budget_tokens"},
                        Case{ratio, "compression.budget_ratio"}, Case{interval, "interval_steps"},
                        Case{recent, "compression.recent_tokens"},
                        Case{window, "compression.window_tokens"}}) {
    AdmitOptions options;
    options.compression = c.policy;
    const auto refused = r.coordinator.admit(SeqId{1}, prompt, options);
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(refused.status().message(), HasSubstr(c.field));
    EXPECT_FALSE(r.coordinator.replica_of(SeqId{1}).has_value());
  }
  EXPECT_EQ(r.coordinator.replica_stats(0).free_blocks, before.free_blocks);
  EXPECT_EQ(r.coordinator.stats().admitted, 0u);
  EXPECT_TRUE(quant::parse_compression_kind("pyramid").ok());
  EXPECT_THAT(quant::parse_compression_kind("lru").status().message(),
              HasSubstr("expected streaming, h2o, snapkv or pyramid"));
  // pyramid: a budget per layer group needs groups, and a beta >= 1.
  for (const auto& [policy, field] :
       {std::pair{pyramid(16, 8, 2), "cache.layers_per_group (0) makes no groups"},
        std::pair{pyramid(16, 8, 0.5), "compression.beta 0.5 must be a finite value >= 1"},
        std::pair{pyramid(4, 8, 2), "compression.window_tokens 8 exceeds"}}) {
    AdmitOptions options;
    options.compression = policy;
    const auto refused = r.coordinator.admit(SeqId{1}, prompt, options);
    EXPECT_EQ(refused.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(refused.status().message(), HasSubstr(field));
    EXPECT_FALSE(r.coordinator.replica_of(SeqId{1}).has_value());
  }
  // Regression: a budget whose per-layer budgets overflow (twice the average past 2^64) hung
  // the step that regrouped it; it is refused at admission.
  {
    CompressedRank groups(grouped(serving_config(1, 1, 4, 2, 8, 0)));
    AdmitOptions huge;
    huge.compression = pyramid((uint64_t{1} << 63) | (uint64_t{1} << 62), 4, 20);
    const auto refused = groups.coordinator.admit(SeqId{1}, prompt, huge);
    EXPECT_EQ(refused.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(refused.status().message(), HasSubstr("over 2 layers is too large"));
    EXPECT_FALSE(groups.coordinator.replica_of(SeqId{1}).has_value());
    huge.compression->budget_tokens = uint64_t{1} << 40;  // large, but counts: everything kept
    ASSERT_TRUE(groups.admit(SeqId{1}, prompt, huge).ok());
    for (int i = 0; i < 4; ++i) ASSERT_TRUE(groups.step());
    EXPECT_EQ(groups.coordinator.stats().compactions, 0u);
  }
  Config three = serving_config(1, 1, 4, 2, 8, 0);
  three.cache.layers_per_group = 3;  // of 2 layers: refused by the config's own check
  EXPECT_FALSE(Coordinator::create(three).ok());
  three.model.num_layers = 4;
  EXPECT_THAT(Coordinator::create(three).status().message(),
              HasSubstr("cache.layers_per_group 3 must divide the 4 layers"));

  // Scores: only for a sequence whose policy reads them, for its outstanding request, no longer
  // than it was then, finite, >= 0.
  ASSERT_TRUE(r.admit(SeqId{2}, prompt, streaming(20, 4)).ok());
  ASSERT_TRUE(r.admit(SeqId{3}, prompt, h2o(20, 0, 1)).ok());
  const std::vector<double> ok_scores(40, 1.0), too_many(41, 1.0);
  EXPECT_THAT(r.coordinator.report_attention(SeqId{3}, 0, ok_scores).message(),
              HasSubstr("no request of its scores is outstanding"));
  StepPlan prefill;
  ASSERT_TRUE(r.step(&prefill));
  ASSERT_TRUE(r.coordinator.append(SeqId{3}, 1).ok());  // the engine has not scored it yet
  const auto plan = r.coordinator.step();
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->score_requests, (std::vector<StepPlan::ScoreRequest>{{SeqId{3}, 0}}));
  const uint64_t step = plan->step;
  EXPECT_EQ(r.coordinator.report_attention(SeqId{2}, step, ok_scores).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(r.coordinator.report_attention(SeqId{9}, step, ok_scores).code(),
            ErrorCode::kSequenceNotFound);
  EXPECT_THAT(r.coordinator.report_attention(SeqId{3}, prefill.step, ok_scores).message(),
              HasSubstr("its outstanding request is step " + std::to_string(step)));
  const std::vector<double> all_tokens(41, 1.0), past_them(42, 1.0);
  EXPECT_THAT(r.coordinator.report_attention(SeqId{3}, step, past_them).message(),
              HasSubstr("42 scores for 41 tokens"));
  std::vector<double> negative(10, 1.0);
  negative[4] = -1;
  EXPECT_THAT(r.coordinator.report_attention(SeqId{3}, step, negative).message(),
              HasSubstr("token 4"));
  EXPECT_TRUE(r.coordinator.report_attention(SeqId{3}, step, all_tokens).ok());
  // And on the rank: unknown sequences and non-finite mass are refused.
  const std::vector<float> nan_mass = {1.0f, NAN};
  EXPECT_EQ(r.rank->accumulate_attention(SeqId{3}, nan_mass).code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(r.rank->accumulate_attention(SeqId{77}, nan_mass).code(), ErrorCode::kInvalidArgument);
}

// A seeded serving load where half the requests compress (streaming or H2O with the engine's
// scores), mixed with prefix hits, forks, swaps and preemption: every cached token's K/V is
// checked after every step, and at the end no block is held.
// With `repeat_prompts`, some requests repeat a recent prompt whole and attention depends on the
// position alone, so that identical SnapKV requests share their compacted prompts.
void run_compressed_workload(const CompressionPolicy& policy, uint64_t seed,
                             bool repeat_prompts = false) {
  // Room for compacted prompts to outlive their requests for a while, and still under pressure.
  Config config = serving_config(1, 1, 4, 2, repeat_prompts ? 40 : 32, 12);
  if (policy.kind == CompressionPolicy::Kind::kPyramid) config = grouped(config);
  CompressedRank r(config);
  r.mass = [](SeqId seq, size_t origin, uint32_t) {
    return static_cast<float>(splitmix64(seq.value * 131 + origin) % 100) / 100.0f;
  };
  if (repeat_prompts) r.mass = by_position;
  SCOPED_TRACE(testing::property_trace());
  testing::ServingWorkload workload(testing::property_seed(seed), 1);
  workload.compress_some(policy);
  if (repeat_prompts) workload.repeat_some_prompts();
  uint64_t swaps = 0, copies = 0;
  for (uint64_t step = 0; step < testing::property_count(repeat_prompts ? 400 : 150); ++step) {
    ASSERT_TRUE(workload.issue(r.coordinator, r.engine).ok());
    auto plan = r.coordinator.step();
    ASSERT_TRUE(plan.ok());
    swaps += plan->count(StepPlan::OpKind::kSwapIn);
    copies += plan->count(StepPlan::OpKind::kCopy);
    std::vector<uint8_t> bytes = plan->serialize();
    ASSERT_TRUE(r.rank->receive_and_execute(bytes, RankId{0}).ok());
    for (const ReplicaScores& s : r.rank->reported_scores()) {
      ASSERT_TRUE(r.coordinator.report_attention(s.seq, plan->step, s.scores).ok());
    }
    workload.planned(*plan, r.engine);
    ASSERT_TRUE(r.engine.forward(*r.rank).ok());
    ASSERT_TRUE(r.engine.attend(*r.rank, r.mass).ok());
    ASSERT_TRUE(r.engine.verify(*r.rank)) << "step " << step;
    ASSERT_TRUE(r.coordinator.verify_integrity().ok()) << "step " << step;
  }
  ASSERT_TRUE(workload.drain(r.coordinator, r.engine).ok());
  std::vector<uint8_t> last = r.coordinator.step()->serialize();
  ASSERT_TRUE(r.rank->receive_and_execute(last, RankId{0}).ok());
  EXPECT_TRUE(r.rank->tables().empty());
  EXPECT_EQ(r.coordinator.replica_stats(0).used_blocks, 0u);
  EXPECT_GT(r.coordinator.stats().compactions, 5u);
  EXPECT_GT(r.coordinator.stats().local_hit_tokens, 0u);
  EXPECT_GT(swaps, 0u);
  EXPECT_GT(copies, 0u);
  EXPECT_GT(workload.counts().forks, 0u);
  if (repeat_prompts) {
    EXPECT_GT(r.coordinator.stats().compressed_hits, 0u);
  }
}

TEST(CompressionTest, AStreamingWorkloadKeepsKvExactAndLeaksNothing) {
  run_compressed_workload(streaming(48, 4), 21);
}

TEST(CompressionTest, AnH2oWorkloadKeepsKvExactAndLeaksNothing) {
  run_compressed_workload(h2o(40, 12, 3), 22);
}

TEST(CompressionTest, ASnapKvWorkloadSharingCompactedPromptsKeepsKvExactAndLeaksNothing) {
  run_compressed_workload(snapkv(24, 8), 23, /*repeat_prompts=*/true);
}

// Across replicas, a rank per replica (each executing the plan on its own thread, blocks moving
// through an in-process mailbox): compression with migrations, parking and cross-replica forks
// keeps every cached token's K/V exact on both ranks after every step, and gives back every
// block.
void run_compressed_workload_across_replicas(const CompressionPolicy& policy, uint64_t seed,
                                             bool repeat_prompts) {
  constexpr uint32_t kReplicas = 2;
  Config config = serving_config(kReplicas, 1, 4, 2, repeat_prompts ? 36 : 24, 8);
  if (policy.kind == CompressionPolicy::Kind::kPyramid) config = grouped(config);
  auto coordinator = Coordinator::create(config);
  ASSERT_TRUE(coordinator.ok());
  std::unique_ptr<Backend> backend = testing::cpu_backend(best_cpu_isa());
  testing::Mailbox mailbox;
  std::vector<std::unique_ptr<testing::MailboxTransport>> transports;
  std::vector<std::unique_ptr<RankCache>> owned;
  std::vector<RankCache*> ranks;
  for (uint32_t r = 0; r < kReplicas; ++r) {
    transports.push_back(std::make_unique<testing::MailboxTransport>(mailbox, r, kReplicas));
    auto created = RankCache::create(config, r, *backend, *transports.back());
    ASSERT_TRUE(created.ok()) << created.status();
    owned.push_back(std::move(created).value());
    ranks.push_back(owned.back().get());
  }
  const auto execute = [&](const StepPlan& plan) {
    Status second = ok_status();
    std::thread peer([&] { second = ranks[1]->execute(plan); });
    Status first = ranks[0]->execute(plan);
    peer.join();
    return first.ok() ? second : first;
  };
  const auto mass = [](SeqId seq, size_t origin, uint32_t) {
    return static_cast<float>(splitmix64(seq.value * 131 + origin) % 100) / 100.0f;
  };
  testing::EngineModel engine(config);
  testing::ServingWorkload workload(testing::property_seed(seed), kReplicas);
  workload.compress_some(policy);
  if (repeat_prompts) workload.repeat_some_prompts();
  SCOPED_TRACE(testing::property_trace());
  uint64_t migrations = 0;
  for (uint64_t step = 0; step < testing::property_count(repeat_prompts ? 400 : 200); ++step) {
    ASSERT_TRUE(workload.issue(*coordinator, engine).ok());
    auto plan = coordinator->step();
    ASSERT_TRUE(plan.ok());
    migrations += plan->count(StepPlan::OpKind::kMigrate);
    const Status executed = execute(*plan);
    ASSERT_TRUE(executed.ok()) << "step " << step << ": " << executed;
    // The scores the plan asks for, from the rank of each sequence's replica (one shard each).
    for (const auto& request : plan->score_requests) {
      const std::span<const double> scores = ranks[request.replica]->attention_scores(request.seq);
      if (scores.empty()) continue;
      ASSERT_TRUE(coordinator->report_attention(request.seq, plan->step,
                                                std::vector<double>(scores.begin(), scores.end()))
                      .ok());
    }
    workload.planned(*plan, engine);
    const Status forward = engine.forward(ranks);
    ASSERT_TRUE(forward.ok()) << "step " << step << ": " << forward;
    for (uint32_t replica = 0; replica < kReplicas; ++replica) {
      RankCache& rank = *ranks[replica];
      // The rank holds the tables of exactly the sequences running on its replica (verify()
      // checks the ones it holds).
      std::set<SeqId> held;
      for (const auto& [seq, table] : rank.tables()) held.insert(seq);
      for (const auto& [seq, tables] : rank.group_tables()) held.insert(seq);
      ASSERT_EQ(held.size(), coordinator->replica_stats(replica).sequences) << "step " << step;
      for (SeqId seq : held) ASSERT_EQ(coordinator->replica_of(seq), replica) << seq;
      ASSERT_TRUE(engine.attend(rank, mass).ok());
      ASSERT_TRUE(engine.verify(rank)) << "step " << step << ", replica " << replica;
    }
    ASSERT_TRUE(coordinator->verify_integrity().ok()) << "step " << step;
  }
  ASSERT_TRUE(workload.drain(*coordinator, engine).ok());
  auto last = coordinator->step();
  ASSERT_TRUE(last.ok());
  ASSERT_TRUE(execute(*last).ok());
  EXPECT_GT(coordinator->stats().compactions, 5u);
  EXPECT_GT(migrations, 0u);
  for (uint32_t replica = 0; replica < kReplicas; ++replica) {
    EXPECT_TRUE(ranks[replica]->tables().empty());
    EXPECT_TRUE(ranks[replica]->group_tables().empty());
    EXPECT_EQ(coordinator->replica_stats(replica).used_blocks, 0u);
    EXPECT_EQ(coordinator->replica_stats(replica).host_blocks - coordinator->replica_stats(replica).host_free_blocks, 0u);
  }
  if (repeat_prompts) {
    EXPECT_GT(coordinator->stats().compressed_hits, 0u);
  }
}

TEST(CompressionTest, APyramidWorkloadKeepsEveryLayerGroupsKvExactAndLeaksNothing) {
  run_compressed_workload(pyramid(24, 8, 4), 24);
}

TEST(CompressionTest, PyramidWithMigrationsKeepsKvExactOnEveryRankAndLeaksNothing) {
  run_compressed_workload_across_replicas(pyramid(24, 8, 4), 33, false);
}

TEST(CompressionTest, CompressionWithMigrationsKeepsKvExactOnEveryRankAndLeaksNothing) {
  run_compressed_workload_across_replicas(h2o(30, 10, 2), 31, false);
}

TEST(CompressionTest, SharedSnapKvPromptsWithMigrationsKeepKvExactOnEveryRankAndLeakNothing) {
  run_compressed_workload_across_replicas(snapkv(24, 8), 32, true);
}

}  // namespace
}  // namespace kvfabric
