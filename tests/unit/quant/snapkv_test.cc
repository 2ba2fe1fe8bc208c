// SnapKV token selection (token_selection.h): the observation window's votes, pooled over
// positions and summed over heads, pick the older tokens; the window itself is always kept.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kvfabric/quant/token_selection.h"

namespace kvfabric {
namespace {

using quant::SnapKvOptions;
using quant::SnapKvPooling;
using V = std::vector<size_t>;

// Window attention in which every window query gives `votes[t] / window` to token t, so each
// head's summed vote for t is votes[t]; the same votes for every head.
std::vector<double> attention_with_votes(const std::vector<double>& votes, size_t heads,
                                         size_t window) {
  std::vector<double> attention;
  for (size_t h = 0; h < heads; ++h) {
    for (size_t q = 0; q < window; ++q) {
      for (const double v : votes)
        attention.push_back(v / static_cast<double>(window));
    }
  }
  return attention;
}

std::vector<double> random_attention(size_t heads, size_t window, size_t tokens, uint32_t seed) {
  std::mt19937 rng(seed);
  std::exponential_distribution<double> weight(1.0);
  std::vector<double> attention(heads * window * tokens);
  for (double& w : attention)
    w = weight(rng);
  return attention;
}

SnapKvOptions options(size_t budget, size_t window, size_t kernel,
                      SnapKvPooling pooling = SnapKvPooling::kMax) {
  return SnapKvOptions{budget, window, kernel, pooling};
}

V kept(const std::vector<double>& attention, size_t heads, size_t tokens, const SnapKvOptions& o) {
  auto selected = quant::select_snapkv(attention, heads, tokens, o);
  EXPECT_TRUE(selected.ok()) << selected.status();
  return selected.ok() ? *selected : V{};
}

TEST(SnapKv, PoolingKeepsAClusterOverLouderLoneSpikes) {
  // A 5-token cluster of moderate votes and three lone spikes, each louder than any cluster token.
  const size_t tokens = 60, window = 4;
  std::vector<double> votes(tokens, 0.0);
  for (size_t t = 20; t < 25; ++t)
    votes[t] = 0.5;
  for (const size_t spike : {5u, 35u, 45u})
    votes[spike] = 0.6;
  const auto attention = attention_with_votes(votes, 2, window);
  // Without pooling the spikes win, and the cluster's two newest tokens fill the rest.
  EXPECT_EQ(kept(attention, 2, tokens, options(window + 5, window, 1)),
            (V{5, 23, 24, 35, 45, 56, 57, 58, 59}));
  // Averaged over 5 positions the cluster (0.5 at its centre) beats the spikes (0.12).
  EXPECT_EQ(kept(attention, 2, tokens, options(window + 5, window, 5, SnapKvPooling::kAvg)),
            (V{20, 21, 22, 23, 24, 56, 57, 58, 59}));
}

TEST(SnapKv, MaxPoolingWidensALoneSpikeToItsNeighbours) {
  const size_t tokens = 30, window = 2;
  std::vector<double> votes(tokens, 0.0);
  votes[10] = 3.0;
  auto scores = quant::snapkv_scores(attention_with_votes(votes, 1, window), 1, tokens,
                                     options(10, window, 5));
  ASSERT_TRUE(scores.ok()) << scores.status();
  ASSERT_EQ(scores->size(), tokens - window);
  for (size_t t = 0; t < scores->size(); ++t)
    EXPECT_DOUBLE_EQ((*scores)[t], t >= 8 && t <= 12 ? 3.0 : 0.0) << "token " << t;
}

TEST(SnapKv, AvgPoolingDividesByThePositionsInside) {
  const size_t tokens = 12, window = 2;
  std::vector<double> votes(tokens, 0.0);
  votes[0] = 6.0;  // at the start: the kernel is clipped, not padded
  votes[5] = 3.0;
  auto scores = quant::snapkv_scores(attention_with_votes(votes, 1, window), 1, tokens,
                                     options(4, window, 3, SnapKvPooling::kAvg));
  ASSERT_TRUE(scores.ok()) << scores.status();
  const std::vector<double> expected = {3.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0};
  ASSERT_EQ(scores->size(), expected.size());
  for (size_t t = 0; t < expected.size(); ++t)
    EXPECT_DOUBLE_EQ((*scores)[t], expected[t]) << "token " << t;
}

TEST(SnapKv, HeadsVoteSeparatelyAndTheirVotesAdd) {
  // Head 0 attends to token 3, head 1 to token 7: one shared selection keeps both.
  const size_t tokens = 16, window = 3;
  std::vector<double> head0(tokens, 0.0), head1(tokens, 0.0);
  head0[3] = 1.0;
  head1[7] = 1.0;
  auto attention = attention_with_votes(head0, 1, window);
  const auto second = attention_with_votes(head1, 1, window);
  attention.insert(attention.end(), second.begin(), second.end());
  EXPECT_EQ(kept(attention, 2, tokens, options(window + 2, window, 1)), (V{3, 7, 13, 14, 15}));
}

TEST(SnapKv, KeepsTheWindowAndExactlyTheBudget) {
  const size_t heads = 3, window = 5, tokens = 40;
  const auto attention = random_attention(heads, window, tokens, 7);
  for (const size_t kernel : {1u, 3u, 7u}) {
    for (size_t budget = window; budget <= tokens + 3; ++budget) {
      const V k = kept(attention, heads, tokens, options(budget, window, kernel));
      ASSERT_EQ(k.size(), std::min(budget, tokens)) << "budget " << budget;
      EXPECT_TRUE(std::is_sorted(k.begin(), k.end()));
      EXPECT_TRUE(std::adjacent_find(k.begin(), k.end()) == k.end()) << "duplicates";
      for (size_t t = tokens - window; t < tokens; ++t)
        EXPECT_THAT(k, testing::Contains(t)) << "window token " << t << ", budget " << budget;
    }
  }
}

TEST(SnapKv, EqualScoresKeepTheNewerToken) {
  // Uniform attention: every older token scores the same, so the newest win, as in H2O.
  const size_t tokens = 20, window = 4;
  const auto attention = attention_with_votes(std::vector<double>(tokens, 1.0), 2, window);
  EXPECT_EQ(kept(attention, 2, tokens, options(7, window, 3)), (V{13, 14, 15, 16, 17, 18, 19}));
  EXPECT_EQ(kept(attention, 2, tokens, options(window, window, 3)), (V{16, 17, 18, 19}));
}

TEST(SnapKv, RefusesBadArgumentsNamingThem) {
  const size_t heads = 2, window = 4, tokens = 10;
  const auto good = random_attention(heads, window, tokens, 3);
  auto message = [&](const std::vector<double>& attention, size_t h, size_t n,
                     const SnapKvOptions& o) {
    auto selected = quant::select_snapkv(attention, h, n, o);
    EXPECT_FALSE(selected.ok());
    return selected.ok() ? std::string() : selected.status().message();
  };
  using testing::HasSubstr;
  EXPECT_THAT(message(good, 0, tokens, options(6, window, 3)), HasSubstr("num_heads"));
  EXPECT_THAT(message({}, heads, tokens, options(6, 0, 3)), HasSubstr("window must be >= 1"));
  EXPECT_THAT(message(good, heads, 3, options(6, window, 3)), HasSubstr("num_tokens 3"));
  EXPECT_THAT(message(good, heads, tokens, options(6, window, 4)), HasSubstr("kernel 4"));
  EXPECT_THAT(message(good, heads, tokens, options(6, window, 0)), HasSubstr("kernel 0"));
  EXPECT_THAT(message(good, heads, tokens + 1, options(6, window, 3)),
              HasSubstr("window_attention holds 80"));
  EXPECT_THAT(message(good, heads, tokens, options(3, window, 3)),
              HasSubstr("budget 3 is smaller than its window 4"));
  for (const double bad : {double{NAN}, -0.5, double{INFINITY}}) {
    auto attention = good;
    attention[17] = bad;
    EXPECT_THAT(message(attention, heads, tokens, options(6, window, 3)),
                HasSubstr("window_attention[17]"));
  }
}

}  // namespace
}  // namespace kvfabric
