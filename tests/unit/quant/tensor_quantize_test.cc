// The seed CacheManager's tensor quantizers and token-selection rules (seed-semantics.md §D4-§D6,
// §E2): seed codes reproduced, constant heads exact, packed widths, H2O / sliding-window choices
// against the seed's removal loop, PyramidKV budgets.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kvfabric/quant/tensor_quantize.h"
#include "kvfabric/quant/token_selection.h"

namespace kvfabric {
namespace {

std::vector<float> round_trip(const quant::QuantizedTensor& t, size_t segments) {
  auto out = quant::dequantize(t, segments);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : std::vector<float>{};
}

TEST(TensorQuantize, SeedRoundingCases) {
  EXPECT_EQ(quant::round_to_nearest_even(2.5f), 2.0f);
  EXPECT_EQ(quant::round_to_nearest_even(3.5f), 4.0f);
  EXPECT_EQ(quant::round_to_nearest_even(4.5f), 4.0f);
  EXPECT_EQ(quant::round_to_nearest_even(1.3f), 1.0f);
  EXPECT_EQ(quant::round_to_nearest_even(1.7f), 2.0f);
  EXPECT_EQ(quant::round_to_nearest_even(-2.5f), -2.0f);
  EXPECT_EQ(quant::round_to_nearest_even(-3.5f), -4.0f);
}

// The seed's own tests: 4-bit and 3-bit asymmetric, 4-bit symmetric round trips.
TEST(TensorQuantize, SeedRoundTripTolerances) {
  const std::vector<float> x4 = {0.0f, 0.5f, 1.0f, -1.0f, 0.25f, -0.5f, 0.75f, -0.25f};
  auto q4 = quant::quantize_asymmetric(x4, 2, 4);
  ASSERT_TRUE(q4.ok()) << q4.status();
  const auto y4 = round_trip(*q4, 2);
  for (size_t i = 0; i < x4.size(); ++i)
    EXPECT_LT(std::fabs(x4[i] - y4[i]), 0.15f) << i;

  const std::vector<float> x3 = {0.0f, 0.5f, 1.0f, -1.0f, 0.3f, -0.7f, 0.8f, -0.2f};
  auto q3 = quant::quantize_asymmetric(x3, 2, 3);
  ASSERT_TRUE(q3.ok()) << q3.status();
  const auto y3 = round_trip(*q3, 2);
  for (size_t i = 0; i < x3.size(); ++i)
    EXPECT_LT(std::fabs(x3[i] - y3[i]), 0.35f) << i;

  const std::vector<float> xs = {0.0f, 0.5f, -0.5f, 1.0f, -1.0f};
  auto qs = quant::quantize_symmetric(xs, 4);
  ASSERT_TRUE(qs.ok()) << qs.status();
  const auto ys = round_trip(*qs, 1);
  for (size_t i = 0; i < xs.size(); ++i)
    EXPECT_LT(std::fabs(xs[i] - ys[i]), 0.2f) << i;
  EXPECT_EQ(ys[0], 0.0f);  // symmetric codes represent 0 exactly
}

// Appendix A of seed-semantics.md: the codes, scales and zero-points the seed produced.
TEST(TensorQuantize, ReproducesTheSeedsCodes) {
  const std::vector<float> x = {0.0f, 0.5f, 1.0f, -1.0f, 0.25f, -0.5f, 0.75f, -0.25f};
  auto q = quant::quantize_asymmetric(x, 2, 4);
  ASSERT_TRUE(q.ok()) << q.status();
  const std::vector<uint32_t> seed_codes = {7, 11, 15, 0, 9, 0, 15, 3};
  for (size_t i = 0; i < seed_codes.size(); ++i)
    EXPECT_EQ(q->code(i), seed_codes[i]) << i;
  EXPECT_FLOAT_EQ(q->scales[0], 2.0f / 15.0f);
  EXPECT_FLOAT_EQ(q->scales[1], 1.25f / 15.0f);
  EXPECT_FLOAT_EQ(q->zero_points[0], 7.4999995f);
  EXPECT_FLOAT_EQ(q->zero_points[1], 6.0f);
  EXPECT_EQ(q->data.size(), 4u);  // packed: two 4-bit codes a byte (the seed used 8 bytes)
}

// Seed defect E2.2: constant heads came back as round(value) clamped to [0, 15].
TEST(TensorQuantize, ConstantHeadsReconstructExactly) {
  for (const uint8_t bits : {2, 3, 4, 8}) {
    const std::vector<float> x = {-1.0f, -1.0f, 100.0f, 100.0f, 2.5f, 2.5f, 0.42f, 0.42f};
    auto q = quant::quantize_asymmetric(x, 4, bits);
    ASSERT_TRUE(q.ok()) << q.status();
    EXPECT_EQ(round_trip(*q, 4), x) << int{bits};
  }
  auto zeros = quant::quantize_symmetric(std::vector<float>(6, 0.0f), 4);
  ASSERT_TRUE(zeros.ok());
  EXPECT_EQ(round_trip(*zeros, 1), std::vector<float>(6, 0.0f));
}

TEST(TensorQuantize, ErrorWithinHalfAStepAtEveryWidth) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (uint8_t bits = quant::kMinTensorBits; bits <= quant::kMaxTensorBits; ++bits) {
    for (int trial = 0; trial < 50; ++trial) {
      const size_t heads = 1 + static_cast<size_t>(trial % 4);
      std::vector<float> x(heads * 24);
      for (float& v : x)
        v = normal(rng) + static_cast<float>(trial % 3);
      auto q = quant::quantize_asymmetric(x, heads, bits);
      ASSERT_TRUE(q.ok()) << q.status();
      ASSERT_EQ(q->data.size(), (x.size() * bits + 7) / 8);
      const auto y = round_trip(*q, heads);
      for (size_t i = 0; i < x.size(); ++i) {
        const float scale = q->scales[i / 24];
        // Half a step, plus the float rounding of scale * (code - zero_point).
        EXPECT_LE(std::fabs(x[i] - y[i]), (0.5f + 1e-3f) * scale + 1e-5f)
            << "bits " << int{bits} << " element " << i;
      }
      auto s = quant::quantize_symmetric(x, bits);
      ASSERT_TRUE(s.ok());
      const auto z = round_trip(*s, 1);
      for (size_t i = 0; i < x.size(); ++i)
        EXPECT_LE(std::fabs(x[i] - z[i]), (0.5f + 1e-3f) * s->scales[0] + 1e-5f);
    }
  }
}

// Widths that do not divide 8 straddle bytes; every code must read back as written.
TEST(TensorQuantize, PackedCodesOfEveryWidthReadBack) {
  for (uint8_t bits = quant::kMinTensorBits; bits <= quant::kMaxTensorBits; ++bits) {
    const uint32_t qmax = (1u << bits) - 1u;
    std::vector<float> ramp(3 * (qmax + 1));
    for (size_t i = 0; i < ramp.size(); ++i)
      ramp[i] = static_cast<float>(i % (qmax + 1));
    auto q = quant::quantize_asymmetric(ramp, 3, bits);
    ASSERT_TRUE(q.ok()) << q.status();
    for (size_t i = 0; i < ramp.size(); ++i)
      ASSERT_EQ(q->code(i), i % (qmax + 1)) << "bits " << int{bits} << " element " << i;
    EXPECT_EQ(round_trip(*q, 3), ramp);  // integers on an integer grid are exact
    EXPECT_EQ(q->byte_size(), quant::quantized_bytes(ramp.size(), 3, bits));
  }
}

TEST(TensorQuantize, BadInputIsRefusedWithItsReason) {
  const std::vector<float> x = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f};
  EXPECT_NE(quant::quantize_asymmetric(x, 2, 4).status().message().find("does not split into 2"),
            std::string::npos);
  EXPECT_NE(quant::quantize_asymmetric(x, 0, 4).status().message().find("num_heads"),
            std::string::npos);
  for (const uint8_t bits : {0, 1, 9, 32}) {
    EXPECT_NE(quant::quantize_asymmetric(x, 1, bits).status().message().find("outside [2, 8]"),
              std::string::npos);
    EXPECT_FALSE(quant::quantize_symmetric(x, bits).ok());
  }
  const std::vector<float> bad = {1.0f, NAN, 2.0f, INFINITY};
  EXPECT_NE(quant::quantize_asymmetric(bad, 1, 4).status().message().find("element 1 is NaN"),
            std::string::npos);
  EXPECT_NE(quant::quantize_symmetric(std::span(bad).subspan(2), 4)
                .status()
                .message()
                .find("element 1 is infinite"),
            std::string::npos);

  // A finite head whose range overflows a float read back as NaN (its scale was infinite).
  const std::vector<float> wide = {0.0f, 1.0f, -2e38f, 2e38f};
  EXPECT_NE(quant::quantize_asymmetric(wide, 2, 8).status().message().find(
                "head 1 spans [-2e+38, 2e+38], a range wider than the largest float"),
            std::string::npos);
  EXPECT_TRUE(quant::quantize_asymmetric(std::vector<float>{-1e38f, 1e38f}, 1, 8).ok());

  auto q = quant::quantize_asymmetric(std::vector<float>{1, 2, 3, 4}, 2, 4);
  ASSERT_TRUE(q.ok());
  EXPECT_FALSE(quant::dequantize(*q, 1).ok());  // two scales, one segment asked
  quant::QuantizedTensor truncated = *q;
  truncated.data.pop_back();
  EXPECT_FALSE(quant::dequantize(truncated, 2).ok());
}

// The seed's H2O loop, with the fix (the newest `recent` never compete): remove the minimum
// score, the oldest on ties, until `budget` remain.
std::vector<size_t> seed_h2o_keep(const std::vector<double>& scores, size_t budget, size_t recent) {
  std::vector<size_t> kept(scores.size());
  std::iota(kept.begin(), kept.end(), size_t{0});
  const size_t protected_count = std::min(recent, budget);
  while (kept.size() > budget) {
    size_t victim = 0;
    for (size_t i = 1; i + protected_count < kept.size(); ++i) {
      if (scores[kept[i]] < scores[kept[victim]]) victim = i;
    }
    kept.erase(kept.begin() + static_cast<ptrdiff_t>(victim));
  }
  return kept;
}

TEST(TokenSelection, HeavyHittersMatchTheSeedsRemovalLoop) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 2000; ++trial) {
    const size_t n = rng() % 40;
    std::vector<double> scores(n);
    for (double& s : scores)
      s = static_cast<double>(rng() % 4);  // many ties
    const size_t budget = rng() % 45;
    const size_t recent = rng() % 12;
    ASSERT_EQ(quant::select_heavy_hitters(scores, budget, recent),
              seed_h2o_keep(scores, budget, recent))
        << "n " << n << " budget " << budget << " recent " << recent;
  }
}

TEST(TokenSelection, HeavyHittersWithoutScoresAreFifo) {
  const std::vector<double> zeros(10, 0.0);
  EXPECT_EQ(quant::select_heavy_hitters(zeros, 4, 0), (std::vector<size_t>{6, 7, 8, 9}));
  EXPECT_EQ(quant::select_heavy_hitters(zeros, 0, 3), std::vector<size_t>{});
}

TEST(TokenSelection, SlidingWindowKeepsSinkThenNewest) {
  using V = std::vector<size_t>;
  EXPECT_EQ(quant::select_sliding_window(10, 5, 2, 3), (V{0, 1, 7, 8, 9}));
  EXPECT_EQ(quant::select_sliding_window(10, 100, 2, 3), (V{0, 1, 7, 8, 9}));
  EXPECT_EQ(quant::select_sliding_window(10, 3, 2, 3), (V{0, 1, 9}));  // window shrinks first
  EXPECT_EQ(quant::select_sliding_window(10, 1, 2, 3), (V{0}));        // then the sink
  EXPECT_EQ(quant::select_sliding_window(4, 5, 2, 3), (V{0, 1, 2, 3}));
  EXPECT_EQ(quant::select_sliding_window(10, 4, 0, 8), (V{6, 7, 8, 9}));
}

TEST(TokenSelection, PyramidBudgetsAverageTheBudgetAndDecrease) {
  auto small = quant::pyramid_layer_budgets(8, 4, 20.0);
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_EQ(*small, (std::vector<size_t>{15, 10, 6, 1}));
  for (const size_t layers : {1u, 2u, 3u, 7u, 32u, 80u}) {
    for (const size_t average : {1u, 2u, 5u, 64u, 4096u}) {
      for (const double beta : {1.0, 2.0, 20.0, 1000.0}) {
        auto budgets = quant::pyramid_layer_budgets(average, layers, beta);
        ASSERT_TRUE(budgets.ok()) << budgets.status();
        ASSERT_EQ(budgets->size(), layers);
        EXPECT_EQ(std::accumulate(budgets->begin(), budgets->end(), size_t{0}), layers * average)
            << layers << " layers, average " << average << ", beta " << beta;
        EXPECT_TRUE(std::is_sorted(budgets->rbegin(), budgets->rend()));
        EXPECT_GE(budgets->back(), 1u);
        if (beta == 1.0) {
          EXPECT_EQ(*budgets, std::vector<size_t>(layers, average));
        }
      }
    }
  }
  EXPECT_FALSE(quant::pyramid_layer_budgets(8, 0, 20.0).ok());
  EXPECT_FALSE(quant::pyramid_layer_budgets(0, 4, 20.0).ok());
  EXPECT_FALSE(quant::pyramid_layer_budgets(8, 4, 0.5).ok());
  EXPECT_FALSE(quant::pyramid_layer_budgets(8, 4, NAN).ok());
}

}  // namespace
}  // namespace kvfabric
