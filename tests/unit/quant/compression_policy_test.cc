#include "kvfabric/quant/compression_policy.h"
#include "kvfabric/quant/token_selection.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

namespace kvfabric::quant {
namespace {

using Kind = CompressionPolicy::Kind;
using ::testing::ElementsAre;

std::vector<size_t> range(size_t from, size_t to) {
  std::vector<size_t> r(to - from);
  std::iota(r.begin(), r.end(), from);
  return r;
}

std::vector<size_t> join(std::vector<size_t> a, const std::vector<size_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

CompressionPolicy policy(Kind kind, uint64_t budget) {
  CompressionPolicy p;
  p.kind = kind;
  p.budget_tokens = budget;
  return p;
}

TEST(CompressionPolicyTest, TheBudgetIsTokensOrAShareOfThePrompt) {
  CompressionPolicy p = policy(Kind::kH2o, 0);
  p.budget_ratio = 0.3;
  EXPECT_EQ(budget_for(p, 100), 30u);
  EXPECT_EQ(budget_for(p, 101), 31u);  // rounded up
  EXPECT_EQ(budget_for(p, 1), 1u);
  p.kind = Kind::kSnapKv;
  p.window_tokens = 32;
  EXPECT_EQ(budget_for(p, 50), 32u);  // the observation window always fits
  EXPECT_EQ(budget_for(policy(Kind::kStreaming, 64), 1000), 64u);
}

// PyramidKV per layer group: the mean of its layers' budgets (which sum to layers x average),
// rounded up, never rising with depth, and at least the observation window.
TEST(CompressionPolicyTest, PyramidGroupBudgetsAverageTheirLayersAndKeepTheWindow) {
  CompressionPolicy p = policy(Kind::kPyramid, 0);
  p.window_tokens = 8;
  p.beta = 4;
  const auto per_layer = pyramid_layer_budgets(100, 8, 4);
  ASSERT_TRUE(per_layer.ok());
  for (uint32_t per_group : {1u, 2u, 4u, 8u}) {
    const auto groups = pyramid_group_budgets(p, 100, 8, per_group);
    ASSERT_TRUE(groups.ok()) << groups.status();
    ASSERT_EQ(groups->size(), 8u / per_group);
    uint64_t sum = 0;
    for (size_t g = 0; g < groups->size(); ++g) {
      uint64_t layers = 0;
      for (uint32_t l = 0; l < per_group; ++l) layers += (*per_layer)[g * per_group + l];
      EXPECT_EQ((*groups)[g], std::max<uint64_t>((layers + per_group - 1) / per_group, 8));
      if (g > 0) EXPECT_LE((*groups)[g], (*groups)[g - 1]);
      sum += (*groups)[g] * per_group;
    }
    EXPECT_GE(sum, 800u);                             // the layers' 8 x 100, rounded up
    EXPECT_LT(sum, 800u + 8 * per_group + 8 * 8u);    // by less than a token a layer, or the window
  }
  // 100 over 2 layers with beta 4: 175 and 25; over groups of both layers, their mean.
  EXPECT_THAT(*pyramid_group_budgets(p, 100, 2, 1), ElementsAre(175u, 25u));
  EXPECT_THAT(*pyramid_group_budgets(p, 100, 2, 2), ElementsAre(100u));
  p.beta = 40;  // 197.5 and 2.5 round to 198 and 2; the window instead of the 2
  EXPECT_THAT(*pyramid_group_budgets(p, 100, 2, 1), ElementsAre(198u, 8u));
  EXPECT_FALSE(pyramid_group_budgets(p, 100, 6, 4).ok());
  EXPECT_FALSE(pyramid_group_budgets(p, 100, 6, 0).ok());
  EXPECT_FALSE(pyramid_group_budgets(p, 0, 6, 3).ok());
  // Twice the average, or the layers' total, past a count: refused, not computed.
  EXPECT_THAT(pyramid_group_budgets(p, (uint64_t{1} << 63) | (uint64_t{1} << 62), 2, 1)
                  .status()
                  .message(),
              ::testing::HasSubstr("too large"));
  EXPECT_FALSE(pyramid_layer_budgets(uint64_t{1} << 62, 8, 2).ok());
  EXPECT_TRUE(pyramid_layer_budgets(uint64_t{1} << 40, 8, 2).ok());
  // The budget counts as SnapKV's: at least the window, and validated like it plus beta.
  EXPECT_EQ(budget_for(p, 10), 8u);
  p.budget_tokens = 4;
  EXPECT_THAT(validate(p).message(), ::testing::HasSubstr("compression.window_tokens 8"));
  p.budget_tokens = 16;
  p.beta = 0.5;
  EXPECT_THAT(validate(p).message(), ::testing::HasSubstr("compression.beta 0.5"));
  EXPECT_TRUE(set_compression_field(p, "beta", 3).ok());
  EXPECT_TRUE(validate(p).ok());
}

TEST(CompressionPolicyTest, StreamingKeepsSinksAndTheNewestTokensAndAnyUncomputedOnes) {
  CompressionPolicy p = policy(Kind::kStreaming, 10);
  p.sink_tokens = 2;
  EXPECT_EQ(select_kept_tokens(p, 10, 30, 30, 20, {}), join(range(0, 2), range(22, 30)));
  EXPECT_EQ(select_kept_tokens(p, 10, 10, 10, 10, {}), range(0, 10));  // nothing to drop
  // Twelve tokens not computed yet: all stay, past the budget.
  EXPECT_EQ(select_kept_tokens(p, 10, 30, 18, 20, {}), join(range(0, 2), range(18, 30)));
  // In whole blocks of 6: 20 droppable tokens drop as 18; in blocks of 4, 3 droppable wait.
  EXPECT_EQ(select_kept_tokens(p, 10, 30, 30, 20, {}, 6), join(range(0, 2), range(20, 30)));
  EXPECT_EQ(select_kept_tokens(p, 10, 13, 13, 13, {}, 4), range(0, 13));
  // A sink as large as the budget keeps the sink.
  p.sink_tokens = 20;
  EXPECT_EQ(select_kept_tokens(p, 10, 30, 30, 20, {}), range(0, 10));
}

TEST(CompressionPolicyTest, H2oKeepsTheRecentWindowAndTheHeaviestScoredTokens) {
  CompressionPolicy p = policy(Kind::kH2o, 6);
  p.recent_tokens = 2;
  std::vector<double> scores(20, 0.0);
  scores[3] = 5;
  scores[9] = 4;
  scores[12] = 3;
  scores[15] = 2;
  EXPECT_THAT(select_kept_tokens(p, 6, 20, 20, 20, scores), ElementsAre(3, 9, 12, 15, 18, 19));
  // Scores that stop short: the unscored tokens count as recent and stay.
  EXPECT_THAT(select_kept_tokens(p, 6, 20, 20, 20, std::span(scores).first(17)),
              ElementsAre(3, 9, 12, 17, 18, 19));
  // Ties keep the newer token; without scores nothing can be judged, and nothing is dropped.
  EXPECT_EQ(select_kept_tokens(p, 6, 20, 20, 20, std::vector<double>(20, 1.0)), range(14, 20));
  EXPECT_EQ(select_kept_tokens(p, 6, 20, 20, 20, {}), range(0, 20));
  // recent 0 means half the budget.
  p.recent_tokens = 0;
  EXPECT_THAT(select_kept_tokens(p, 6, 20, 20, 20, scores), ElementsAre(3, 9, 12, 17, 18, 19));
}

// After a compaction filled dropped slots with newer tokens, slot order is not arrival order:
// the recent window is the newest arrivals wherever they sit, and ties keep the newer arrival.
TEST(CompressionPolicyTest, H2oTakesTheRecentWindowByArrivalNotBySlot) {
  CompressionPolicy p = policy(Kind::kH2o, 4);
  p.recent_tokens = 2;
  // Slots 2 and 7 hold the two newest tokens, slot 5 the oldest.
  const std::vector<uint32_t> arrival = {11, 15, 16, 12, 13, 10, 14, 17};
  std::vector<double> scores(8, 0.0);
  scores[6] = 3;
  scores[4] = 2;
  scores[5] = 2;  // ties with slot 4, which arrived later
  EXPECT_THAT(select_kept_tokens(p, 4, 8, 8, 8, scores, 1, arrival), ElementsAre(2, 4, 6, 7));
  // By slot order the window would be slots 6 and 7, and both tied slots would fit.
  EXPECT_THAT(select_kept_tokens(p, 4, 8, 8, 8, scores), ElementsAre(4, 5, 6, 7));
  // An unscored slot (the newest) stays and counts toward the window.
  EXPECT_THAT(select_kept_tokens(p, 4, 8, 8, 8, std::span(scores).first(7), 1, arrival),
              ElementsAre(2, 4, 6, 7));
  scores[2] = 9;  // in the window anyway: the heavy budget goes to the next heaviest
  EXPECT_THAT(select_kept_tokens(p, 4, 8, 8, 8, scores, 1, arrival), ElementsAre(2, 4, 6, 7));
  // An arrival list that does not name every slot is not read: slot order.
  scores[2] = 0;
  EXPECT_THAT(select_kept_tokens(p, 4, 8, 8, 8, scores, 1, std::span(arrival).first(5)),
              ElementsAre(4, 5, 6, 7));
}

// Slot order until the first compaction, then each slot's arrival follows its token; appended
// tokens arrive after every listed one. When 32 bits run out the order survives renumbering.
TEST(CompressionPolicyTest, ArrivalsFollowTheirTokensThroughCompactions) {
  ArrivalOrder order;
  order.note_appended(5);
  EXPECT_TRUE(order.arrival().empty());  // slot order
  order.follow(std::vector<size_t>{0, 4, 2}, 5);  // tokens 0, 4, 2 kept in that order
  EXPECT_THAT(order.arrival(), ElementsAre(0, 4, 2));
  order.note_appended(5);  // two tokens appended
  EXPECT_THAT(order.arrival(), ElementsAre(0, 4, 2, 5, 6));
  order.follow(std::vector<size_t>{4, 1, 3}, 6);  // the sixth slot appended just before
  EXPECT_THAT(order.arrival(), ElementsAre(6, 4, 5));

  ArrivalOrder near_limit(UINT32_MAX - 3);
  near_limit.follow(std::vector<size_t>{2, 0}, 3);  // arrivals 2^32 - 4 .. 2^32 - 2
  EXPECT_THAT(near_limit.arrival(), ElementsAre(UINT32_MAX - 1, UINT32_MAX - 3));
  near_limit.note_appended(4);  // past the limit: renumbered by rank, order kept
  EXPECT_THAT(near_limit.arrival(), ElementsAre(1, 0, 2, 3));
}

TEST(CompressionPolicyTest, DroppedSlotsAreFilledByLaterKeptTokens) {
  // Slots 0, 1, 5 stay; 2, 3, 4 and 6 take 7, 9, 10 and 12; the unscored 14 and 15 follow.
  const std::vector<size_t> kept = {0, 1, 5, 7, 9, 10, 12, 14, 15};
  EXPECT_THAT(fill_dropped_slots(kept, 14), ElementsAre(0, 1, 7, 9, 10, 5, 12, 14, 15));
  // Nothing dropped below the kept count: nothing moves but the unscored tokens.
  EXPECT_THAT(fill_dropped_slots(std::vector<size_t>{0, 1, 2, 6}, 5), ElementsAre(0, 1, 2, 6));
  EXPECT_THAT(fill_dropped_slots(std::vector<size_t>{3, 4}, 5), ElementsAre(3, 4));
  EXPECT_TRUE(fill_dropped_slots({}, 0).empty());
  // Every token lands at or before its old slot, each exactly once.
  std::mt19937 rng(7);
  for (int round = 0; round < 200; ++round) {
    const size_t n = 1 + rng() % 40;
    const size_t scored = rng() % (n + 1);
    std::vector<size_t> some;  // a selection: some scored tokens, every unscored one
    for (size_t t = 0; t < n; ++t) {
      if (t >= scored || rng() % 3 != 0) some.push_back(t);
    }
    const std::vector<size_t> order = fill_dropped_slots(some, scored);
    ASSERT_EQ(order.size(), some.size());
    for (size_t i = 0; i < order.size(); ++i) ASSERT_GE(order[i], i) << "round " << round;
    std::vector<size_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    ASSERT_EQ(sorted, some);
    // The unscored stay last, in order.
    const auto is_unscored = [&](size_t t) { return t >= scored; };
    const auto unscored = std::count_if(some.begin(), some.end(), is_unscored);
    ASSERT_TRUE(std::is_sorted(order.end() - unscored, order.end()));
    ASSERT_TRUE(std::all_of(order.end() - unscored, order.end(), is_unscored));
  }
}

TEST(CompressionPolicyTest, SnapKvBudgetsThePromptAndKeepsItsWindowAndDecodedTokens) {
  CompressionPolicy p = policy(Kind::kSnapKv, 6);
  p.window_tokens = 3;
  std::vector<double> votes(17, 0.0);  // the prompt's 20 tokens before its window of 3
  votes[2] = 9;
  votes[11] = 8;
  votes[16] = 7;
  // 25 tokens: the prompt of 20 and 5 decoded.
  EXPECT_EQ(select_kept_tokens(p, 6, 25, 25, 20, votes),
            join({2, 11, 16}, range(17, 25)));
  // A prompt within the budget keeps everything.
  EXPECT_EQ(select_kept_tokens(p, 6, 9, 9, 6, votes), range(0, 9));
}

TEST(CompressionPolicyTest, ValidationNamesTheField) {
  CompressionPolicy p = policy(Kind::kH2o, 8);
  EXPECT_TRUE(validate(p).ok());
  p.budget_ratio = 0.5;
  EXPECT_EQ(validate(p).message(),
            "compression.budget_tokens 8 and compression.budget_ratio 0.5: set only one");
  p.budget_tokens = 0;
  p.budget_ratio = 0;
  EXPECT_THAT(validate(p).message(), ::testing::HasSubstr("a compression budget is needed"));
  p.budget_ratio = 1e300;  // quoted as the client wrote it, not as 301 digits
  EXPECT_EQ(validate(p).message(),
            "compression.budget_ratio 1e+300 must be in (0, 1] (the share of the prompt kept)");
  p.budget_ratio = std::nan("");
  EXPECT_THAT(validate(p).message(), ::testing::HasSubstr("compression.budget_ratio"));
  p = policy(Kind::kSnapKv, 8);
  p.window_tokens = 0;
  EXPECT_THAT(validate(p).message(), ::testing::HasSubstr("compression.window_tokens"));
  p.window_tokens = CompressionPolicy{}.window_tokens;  // a window the client did not choose
  EXPECT_THAT(validate(p).message(),
              ::testing::HasSubstr("window_tokens 32 (the default) exceeds"));
  // Fields by name, as the control plane, Python and the replay's specs give them.
  p = policy(Kind::kH2o, 0);
  EXPECT_TRUE(set_compression_field(p, "budget_tokens", 64).ok());
  EXPECT_TRUE(set_compression_field(p, "interval_steps", 16).ok());
  EXPECT_EQ(p.budget_tokens, 64u);
  EXPECT_EQ(p.interval_steps, 16u);
  EXPECT_THAT(set_compression_field(p, "interval_steps", 0x1p32).message(),
              ::testing::HasSubstr("compression.interval_steps"));
  EXPECT_FALSE(set_compression_field(p, "sink_tokens", 1.5).ok());
  EXPECT_FALSE(set_compression_field(p, "recent_tokens", INFINITY).ok());
  EXPECT_THAT(set_compression_field(p, "speed", 1).message(), ::testing::HasSubstr("'speed'"));
  EXPECT_EQ(p.interval_steps, 16u);  // refused: unchanged
  EXPECT_EQ(parse_compression_kind("h2o").value(), Kind::kH2o);
  EXPECT_EQ(to_string(Kind::kSnapKv), "snapkv");
}

}  // namespace
}  // namespace kvfabric::quant
