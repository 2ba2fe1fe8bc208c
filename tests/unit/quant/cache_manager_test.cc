// The seed CacheManager (ruvector, seed 001): the seed's tests (seed-semantics.md §F3) and each of
// its defects (§E2) fixed.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kvfabric/quant/cache_manager.h"

namespace kvfabric {
namespace {

// The seed tests' configuration: max_seq_len 8, 2 heads of 4.
CacheManagerConfig seed_config(TokenEvictionPolicy policy = H2oPolicy{}, uint8_t bits = 4,
                               size_t max_seq_len = 8) {
  return CacheManagerConfig{.max_seq_len = max_seq_len,
                            .num_heads = 2,
                            .head_dim = 4,
                            .quantization_bits = bits,
                            .eviction_policy = policy};
}

CacheManager make(const CacheManagerConfig& config) {
  auto manager = CacheManager::create(config);
  EXPECT_TRUE(manager.ok()) << manager.status();
  return std::move(manager).value();
}

// Token t's K row is t repeated (constant heads reconstruct exactly), its V row is -t.
void append_token(CacheManager& m, float t, size_t layer = 0) {
  const size_t row = m.config().num_heads * m.config().head_dim;
  const std::vector<float> k(row, t), v(row, -t);
  ASSERT_TRUE(m.append(k, v, layer).ok());
}

std::vector<size_t> positions(const CacheManager& m, size_t layer = 0) {
  auto p = m.token_positions(layer);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? *p : std::vector<size_t>{};
}

TEST(CacheManagerSeed, AppendThenGetOneEntry) {
  CacheManager m = make(seed_config());
  append_token(m, 1.0f);
  const std::vector<size_t> first = {0};
  auto got = m.get(first);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->keys.size(), 1u);
  ASSERT_EQ(got->values.size(), 1u);
  EXPECT_EQ(got->keys[0], std::vector<float>(8, 1.0f));
  EXPECT_EQ(got->values[0], std::vector<float>(8, -1.0f));
  EXPECT_EQ(got->token_positions, std::vector<size_t>{0});
}

TEST(CacheManagerSeed, EmptyManager) {
  CacheManager m = make(seed_config());
  EXPECT_TRUE(m.is_empty());
  EXPECT_EQ(m.len(), 0u);
  auto none = m.get(std::vector<size_t>{});
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->keys.empty());
  EXPECT_TRUE(none->values.empty());
}

TEST(CacheManagerSeed, H2oEvictsTheLowestScore) {
  CacheManager m = make(seed_config(H2oPolicy{}, 4, 100));
  for (int t = 0; t < 4; ++t)
    append_token(m, static_cast<float>(t));
  ASSERT_TRUE(m.update_attention_scores(std::vector<double>{5, 1, 3, 4}).ok());
  ASSERT_TRUE(m.evict(3, 0).ok());
  EXPECT_EQ(m.len(), 3u);
  auto scores = m.attention_scores(0);
  ASSERT_TRUE(scores.ok());
  EXPECT_EQ(*scores, (std::vector<double>{5, 3, 4}));
}

TEST(CacheManagerSeed, SlidingWindowKeepsSinkAndWindow) {
  CacheManager m = make(seed_config(SlidingWindowPolicy{.window = 3, .sink = 2}, 4, 100));
  for (int t = 0; t < 10; ++t)
    append_token(m, static_cast<float>(t));
  m.evict(5);
  EXPECT_EQ(m.len(), 5u);
  EXPECT_EQ(positions(m), (std::vector<size_t>{0, 1, 7, 8, 9}));
}

TEST(CacheManagerSeed, MemoryAndCompression) {
  CacheManager m = make(seed_config());
  EXPECT_GT(m.compression_ratio(), 1.0);
  EXPECT_EQ(m.memory_bytes(), 0u);
  append_token(m, 1.0f);
  const size_t one = m.memory_bytes();
  EXPECT_GT(one, 0u);
  append_token(m, 2.0f);
  EXPECT_EQ(m.memory_bytes(), 2 * one);
}

TEST(CacheManagerSeed, AutoEvictionHoldsMaxSeqLen) {
  CacheManager m = make(seed_config());
  for (int t = 0; t < 12; ++t)
    append_token(m, static_cast<float>(t));
  EXPECT_LE(m.len(), 8u);
}

TEST(CacheManagerSeed, PyramidBudgetDecreasesWithDepth) {
  CacheManager m = make(seed_config());
  auto bottom = m.pyramid_budget(0, 4);
  auto top = m.pyramid_budget(3, 4);
  ASSERT_TRUE(bottom.ok() && top.ok());
  EXPECT_GT(*bottom, *top);
}

TEST(CacheManagerSeed, ThreeBitSingleEntry) {
  CacheManager m = make(seed_config(H2oPolicy{}, 3));
  append_token(m, 0.5f);
  ASSERT_TRUE(m.update_attention_scores(std::vector<double>{1.0}).ok());
  m.evict(1);
  EXPECT_EQ(m.len(), 1u);
  auto got = m.get(std::vector<size_t>{0});
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->keys.size(), 1u);
}

TEST(CacheManagerSeed, DocExample) {
  CacheManager m = make(CacheManagerConfig{.max_seq_len = 128,
                                           .num_heads = 4,
                                           .head_dim = 16,
                                           .quantization_bits = 4,
                                           .eviction_policy = SlidingWindowPolicy{64, 4}});
  std::vector<float> k(64), v(64);
  for (size_t i = 0; i < 64; ++i)
    k[i] = std::sin(static_cast<float>(i)), v[i] = 0.01f * i;
  ASSERT_TRUE(m.append(k, v, 0).ok());
  auto got = m.get(std::vector<size_t>{0});
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->keys.size(), 1u);
}

// §E2.1: with scores on the old tokens, the seed evicted every newcomer at once.
TEST(CacheManagerFixes, H2oKeepsTheNewcomer) {
  CacheManager m = make(seed_config(H2oPolicy{}, 4, 4));
  for (int t = 0; t < 4; ++t)
    append_token(m, static_cast<float>(t));
  ASSERT_TRUE(m.update_attention_scores(std::vector<double>(4, 1.0)).ok());
  append_token(m, 99.0f);
  EXPECT_EQ(positions(m), (std::vector<size_t>{1, 2, 3, 4}));
  auto newest = m.get(std::vector<size_t>{3});
  ASSERT_TRUE(newest.ok());
  EXPECT_EQ(newest->keys[0][0], 99.0f);

  // recent_ratio 0 is the seed's pure heavy-hitter rule, kept on request.
  CacheManager seed_rule = make(seed_config(H2oPolicy{.recent_ratio = 0.0}, 4, 4));
  for (int t = 0; t < 4; ++t)
    append_token(seed_rule, static_cast<float>(t));
  ASSERT_TRUE(seed_rule.update_attention_scores(std::vector<double>(4, 1.0)).ok());
  append_token(seed_rule, 99.0f);
  EXPECT_EQ(positions(seed_rule), (std::vector<size_t>{0, 1, 2, 3}));
}

TEST(CacheManagerFixes, H2oKeepsHeavyHittersAndTheRecentHalf) {
  CacheManager m = make(seed_config(H2oPolicy{}, 8, 6));
  for (int t = 0; t < 6; ++t)
    append_token(m, static_cast<float>(t));
  ASSERT_TRUE(m.update_attention_scores(std::vector<double>{9, 0, 7, 0, 8, 0}).ok());
  for (int t = 6; t < 9; ++t)
    append_token(m, static_cast<float>(t));
  // Budget 6: the newest 3 (6, 7, 8) plus the 3 heaviest older ones (0, 2, 4).
  EXPECT_EQ(positions(m), (std::vector<size_t>{0, 2, 4, 6, 7, 8}));
}

// §E2.3: the seed kept sink + window whatever the budget, so max_seq_len 3 held 5 tokens.
TEST(CacheManagerFixes, SlidingWindowNeverExceedsTheBudget) {
  const SlidingWindowPolicy policy{.window = 3, .sink = 2};
  CacheManager small = make(seed_config(policy, 4, 3));
  for (int t = 0; t < 9; ++t)
    append_token(small, static_cast<float>(t));
  EXPECT_EQ(positions(small), (std::vector<size_t>{0, 1, 8}));

  CacheManager m = make(seed_config(policy, 4, 100));
  for (int t = 0; t < 10; ++t)
    append_token(m, static_cast<float>(t));
  ASSERT_TRUE(m.evict(3, 0).ok());
  EXPECT_EQ(positions(m), (std::vector<size_t>{0, 1, 9}));

  // A budget above sink + window slides continuously instead of over-evicting in bursts.
  CacheManager wide = make(seed_config(policy, 4, 8));
  EXPECT_EQ(*wide.layer_budget(0), 5u);
  for (int t = 0; t < 9; ++t) {
    append_token(wide, static_cast<float>(t));
    EXPECT_EQ(wide.len(), std::min<size_t>(t + 1, 5));
  }
  EXPECT_EQ(positions(wide), (std::vector<size_t>{0, 1, 6, 7, 8}));
}

// §E2.4: the seed stored a byte per code, so every width had the same ratio (3.76 here).
TEST(CacheManagerFixes, CompressionFollowsTheBitWidth) {
  auto ratio = [](uint8_t bits) {
    return make(CacheManagerConfig{
                    .max_seq_len = 8, .num_heads = 32, .head_dim = 128, .quantization_bits = bits})
        .compression_ratio();
  };
  EXPECT_NEAR(ratio(8), 32768.0 / 8704.0, 1e-9);
  EXPECT_NEAR(ratio(4), 32768.0 / 4608.0, 1e-9);
  EXPECT_NEAR(ratio(2), 32768.0 / 2560.0, 1e-9);
  EXPECT_GT(ratio(3), ratio(4));
}

// §E2.5: the seed ignored the layer and split one max_seq_len across all layers.
TEST(CacheManagerFixes, PyramidKvKeepsPerLayerBudgets) {
  CacheManager m = make(seed_config(PyramidKvPolicy{.total_layers = 4}));
  ASSERT_EQ(m.num_layers(), 4u);
  const std::vector<size_t> expected = {15, 10, 6, 1};  // average 8, sum 32
  for (size_t layer = 0; layer < 4; ++layer) {
    EXPECT_EQ(*m.layer_budget(layer), expected[layer]);
    EXPECT_EQ(*m.pyramid_budget(layer, 4), expected[layer]);
    for (int t = 0; t < 20; ++t)
      append_token(m, static_cast<float>(t), layer);
  }
  for (size_t layer = 0; layer < 4; ++layer)
    EXPECT_EQ(*m.len(layer), expected[layer]);
  EXPECT_EQ(m.len(), 32u);
  EXPECT_EQ(positions(m, 3), std::vector<size_t>{19});  // budget 1: the newest only

  EXPECT_FALSE(m.pyramid_budget(4, 4).ok());  // the seed underflowed past the last layer
  EXPECT_FALSE(m.append(std::vector<float>(8), std::vector<float>(8), 4).ok());
  // Methods without a layer refuse to guess on a multi-layer cache.
  const Status guess = m.update_attention_scores(std::vector<double>(15, 1.0));
  EXPECT_EQ(guess.code(), ErrorCode::kInvalidOperation);
  EXPECT_NE(guess.message().find("name the layer"), std::string::npos);
  EXPECT_FALSE(m.get(std::vector<size_t>{0}).ok());
}

// §E2.6: the seed skipped bad positions, zipped mismatched scores, and took any row length.
TEST(CacheManagerFixes, BadInputChangesNothing) {
  CacheManager m = make(seed_config());
  for (int t = 0; t < 3; ++t)
    append_token(m, static_cast<float>(t));
  ASSERT_TRUE(m.update_attention_scores(std::vector<double>{1, 2, 3}).ok());

  const std::vector<size_t> indices = {0, 5};
  const Status past = m.get(indices).status();
  EXPECT_NE(past.message().find("index 5 past the 3 entries of layer 0"), std::string::npos);

  EXPECT_NE(m.update_attention_scores(std::vector<double>{1, 1})
                .message()
                .find("2 scores for the 3 entries"),
            std::string::npos);
  EXPECT_FALSE(m.update_attention_scores(std::vector<double>{1, NAN, 1}).ok());
  EXPECT_FALSE(m.update_attention_scores(std::vector<double>{1, 1, INFINITY}).ok());
  EXPECT_EQ(*m.attention_scores(0), (std::vector<double>{1, 2, 3}));

  EXPECT_FALSE(m.append(std::vector<float>(7), std::vector<float>(8), 0).ok());
  std::vector<float> nan_row(8, 1.0f);
  nan_row[3] = NAN;
  EXPECT_FALSE(m.append(std::vector<float>(8), nan_row, 0).ok());
  EXPECT_FALSE(m.evict(1, 1).ok());
  EXPECT_EQ(positions(m), (std::vector<size_t>{0, 1, 2}));
}

TEST(CacheManagerFixes, ConfigErrorsNameTheField) {
  auto message = [](CacheManagerConfig c) { return CacheManager::create(c).status().message(); };
  CacheManagerConfig c = seed_config();
  c.num_heads = 0;
  EXPECT_NE(message(c).find("num_heads"), std::string::npos);
  c = seed_config(H2oPolicy{}, 9);
  EXPECT_NE(message(c).find("quantization_bits 9"), std::string::npos);
  c = seed_config(H2oPolicy{.recent_ratio = 1.5});
  EXPECT_NE(message(c).find("recent_ratio"), std::string::npos);
  c = seed_config(SlidingWindowPolicy{});
  EXPECT_NE(message(c).find("keeps no token"), std::string::npos);
  c = seed_config(PyramidKvPolicy{.total_layers = 0});
  EXPECT_NE(message(c).find("at least one layer"), std::string::npos);
  c = seed_config(PyramidKvPolicy{.total_layers = 4, .beta = 0.5});
  EXPECT_NE(message(c).find("beta"), std::string::npos);
  c = seed_config(PyramidKvPolicy{.total_layers = 4});
  c.num_layers = 3;
  EXPECT_NE(message(c).find("differs from PyramidKV total_layers 4"), std::string::npos);
  c = seed_config();
  c.max_seq_len = 0;
  EXPECT_NE(message(c).find("max_seq_len"), std::string::npos);
  // Regression: 2^32 x 2^32 values per row wrapped to an empty row, and an append never ended.
  c = seed_config();
  c.num_heads = size_t{1} << 32;
  c.head_dim = size_t{1} << 32;
  EXPECT_NE(message(c).find("values per row are more than a row can hold"), std::string::npos);
}

// Dequantized rows stay within half a quantization step of what was appended, and survive
// eviction attached to their token positions.
TEST(CacheManagerFixes, RowsFollowTheirTokensThroughEviction) {
  CacheManager m = make(CacheManagerConfig{.max_seq_len = 16,
                                           .num_heads = 4,
                                           .head_dim = 32,
                                           .quantization_bits = 8,
                                           .eviction_policy = H2oPolicy{.recent_ratio = 0.25}});
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<float>> written;
  for (int t = 0; t < 64; ++t) {
    std::vector<float> k(128), v(128);
    for (size_t i = 0; i < 128; ++i)
      k[i] = normal(rng), v[i] = normal(rng);
    ASSERT_TRUE(m.append(k, v, 0).ok());
    written.push_back(k);
    std::vector<double> scores(*m.len(0));
    for (double& s : scores)
      s = static_cast<double>(rng() % 100) / 100.0;
    ASSERT_TRUE(m.update_attention_scores(scores).ok());
  }
  ASSERT_EQ(m.len(), 16u);
  std::vector<size_t> all(16);
  for (size_t i = 0; i < 16; ++i)
    all[i] = i;
  auto got = m.get(all);
  ASSERT_TRUE(got.ok());
  for (size_t i = 0; i < 16; ++i) {
    const std::vector<float>& original = written[got->token_positions[i]];
    for (size_t j = 0; j < 128; ++j)
      ASSERT_NEAR(got->keys[i][j], original[j], 0.05f);
  }
  // The newest 4 (16 * 0.25) are always kept.
  EXPECT_EQ(std::vector<size_t>(got->token_positions.end() - 4, got->token_positions.end()),
            (std::vector<size_t>{60, 61, 62, 63}));
}

}  // namespace
}  // namespace kvfabric
