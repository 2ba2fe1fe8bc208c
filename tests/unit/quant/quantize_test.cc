// Row quantization: error bounds per format, exact constant groups, group and packing layout.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <random>

#include "kvfabric/quant/kv_format.h"
#include "kvfabric/quant/numeric.h"
#include "kvfabric/quant/quantize.h"
#include "testing/kv_reference.h"

namespace kvfabric {
namespace {

struct Row {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  std::vector<uint8_t> zeros;
};

Row encode(const quant::RowFormat& f, const std::vector<float>& x) {
  Row r{std::vector<uint8_t>(f.head_dim * 4), std::vector<float>(f.head_dim),
        std::vector<uint8_t>(f.head_dim)};
  quant::encode_row(f, x.data(), r.codes.data(), r.scales.data(), r.zeros.data());
  return r;
}

std::vector<float> decode(const quant::RowFormat& f, const Row& r) {
  std::vector<float> out(f.head_dim);
  quant::decode_row(f, r.codes.data(), r.scales.data(), r.zeros.data(), out.data());
  return out;
}

class RowRoundTrip : public ::testing::TestWithParam<std::tuple<DType, uint32_t, uint32_t>> {};

TEST_P(RowRoundTrip, ErrorWithinTheFormatsBound) {
  const auto [dtype, head_dim, group] = GetParam();
  const quant::RowFormat f{dtype, head_dim, group};
  std::mt19937 rng(static_cast<uint32_t>(head_dim * 31 + group));
  for (int trial = 0; trial < 200; ++trial) {
    // Offsets and scales vary so that groups with no zero in range are covered too.
    std::vector<float> x = testing::random_normal(head_dim, rng, trial % 5 == 0 ? 0.01f : 2.0f);
    if (trial % 7 == 0)
      for (float& v : x)
        v += 5.0f;
    const auto back = decode(f, encode(f, x));
    const uint32_t g = is_integer_quantized(dtype) ? group : head_dim;
    for (uint32_t i = 0; i < head_dim; ++i) {
      const float* grp = x.data() + (i / g) * g;
      const double bound = testing::element_error_bound(dtype, grp, g, x[i]);
      ASSERT_LE(std::fabs(double{back[i]} - x[i]), bound)
          << dtype_name(dtype) << " hd=" << head_dim << " group=" << group << " i=" << i
          << " x=" << x[i] << " got " << back[i];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, RowRoundTrip,
                         ::testing::Values(std::make_tuple(DType::kF32, 64u, 0u),
                                           std::make_tuple(DType::kF16, 128u, 0u),
                                           std::make_tuple(DType::kBF16, 64u, 0u),
                                           std::make_tuple(DType::kFP8E4M3, 128u, 0u),
                                           std::make_tuple(DType::kInt8, 128u, 128u),
                                           std::make_tuple(DType::kInt8, 64u, 32u),
                                           std::make_tuple(DType::kInt4, 128u, 32u),
                                           std::make_tuple(DType::kInt4, 64u, 64u),
                                           std::make_tuple(DType::kInt2, 128u, 32u),
                                           std::make_tuple(DType::kInt2, 64u, 16u)));

TEST(Quantize, ConstantGroupsReconstructExactly) {
  for (DType dtype : {DType::kFP8E4M3, DType::kInt8, DType::kInt4, DType::kInt2}) {
    for (float c : {0.0f, 1.0f, -1.0f, 0.1f, -0.42f, 100.0f, 3.5f, -1e-20f, 7.3e4f}) {
      const quant::RowFormat f{dtype, 64, 32};
      std::vector<float> x(64, c);
      const auto back = decode(f, encode(f, x));
      for (float v : back)
        ASSERT_EQ(v, c) << dtype_name(dtype) << " constant " << c;
    }
  }
  // One constant group next to a varying one: only the constant group is exact.
  const quant::RowFormat f{DType::kInt4, 64, 32};
  std::vector<float> x(64, -2.5f);
  for (int i = 32; i < 64; ++i)
    x[i] = static_cast<float>(i) / 10;
  const auto back = decode(f, encode(f, x));
  for (int i = 0; i < 32; ++i)
    EXPECT_EQ(back[i], -2.5f);
}

// A range so small that qmax / range overflows (subnormal inputs) still gets a finite inverse
// scale, so the zero point and every code are defined (0 * inf made a NaN, and casting a NaN to
// an integer is undefined: compilers disagreed on the byte).
TEST(Quantize, ASubnormalRangeGetsDefinedCodes) {
  for (const float hi : {1e-40f, 1e-45f, 2e-38f}) {
    for (const uint32_t qmax : {3u, 15u, 255u}) {
      const quant::IntGroupParams p = quant::int_group_params(0.0f, hi, qmax);
      EXPECT_TRUE(std::isfinite(p.inv_scale)) << hi;
      EXPECT_EQ(p.zero, 0u) << hi;
      for (const float x : {0.0f, hi / 2, hi}) {
        const uint32_t code = quant::int_encode(x, p, qmax);
        EXPECT_LE(code, qmax);
        EXPECT_LE(std::fabs(quant::int_decode(code, p.scale, p.zero) - x), hi) << hi << " " << x;
      }
    }
  }
  const quant::IntGroupParams negative = quant::int_group_params(-1e-40f, 0.0f, 255);
  EXPECT_TRUE(std::isfinite(negative.inv_scale));
  EXPECT_LE(negative.zero, 255u);
}

// An fp8 row whose largest magnitude is below 448 / FLT_MAX: 448 / absmax overflowed, and each
// zero element encoded 0 * inf = NaN, stored as -absmax. Zeros stay zero, signs stay, values
// keep fp8's precision (bound relative to the row's largest).
TEST(Quantize, AnFp8RowOfTinyValuesKeepsItsZerosAndSigns) {
  const quant::RowFormat format{DType::kFP8E4M3, 8, 0};
  for (const float top : {1e-37f, 1e-40f, 1.3e-36f}) {
    const float x[8] = {top, 0.0f, -top / 2, 0.0f, top / 4, -top, 0.0f, top / 8};
    uint8_t codes[8];
    float scale = 0;
    quant::encode_row(format, x, codes, &scale, nullptr);
    float back[8];
    quant::decode_row(format, codes, &scale, nullptr, back);
    for (int i = 0; i < 8; ++i) {
      EXPECT_TRUE(std::isfinite(back[i])) << top << " element " << i;
      EXPECT_LE(std::fabs(back[i] - x[i]), top / 8) << top << " element " << i << ": " << back[i];
      if (x[i] == 0.0f) {
        EXPECT_EQ(back[i], 0.0f) << top << " element " << i;
      }
    }
  }
}

TEST(Quantize, IntegerLayoutIsScaleZeroPerGroup) {
  const quant::RowFormat f{DType::kInt8, 8, 4};
  const std::vector<float> x = {-1.0f, 0.0f, 1.0f, 2.0f, 10.0f, 10.0f, 10.0f, 10.0f};
  const Row r = encode(f, x);
  // Group 0: range [-1, 2] -> scale 3/255, zero rint(1 / scale) = 85.
  EXPECT_FLOAT_EQ(r.scales[0], 3.0f / 255.0f);
  EXPECT_EQ(r.zeros[0], 85);
  EXPECT_EQ(r.codes[0], 0);
  EXPECT_EQ(r.codes[3], 255);
  // Group 1 is the constant 10: scale 10, code 1, zero 0.
  EXPECT_EQ(r.scales[1], 10.0f);
  EXPECT_EQ(r.zeros[1], 0);
  EXPECT_EQ(r.codes[4], 1);
}

TEST(Quantize, FindsNonFiniteInputs) {
  std::vector<float> f = {1.0f, 2.0f, NAN, 3.0f};
  EXPECT_EQ(quant::find_non_finite(f.data(), DType::kF32, 4), 2);
  f[2] = INFINITY;
  EXPECT_EQ(quant::find_non_finite(f.data(), DType::kF32, 4), 2);
  f[2] = 0;
  EXPECT_EQ(quant::find_non_finite(f.data(), DType::kF32, 4), -1);
  const std::vector<uint16_t> h = {0x3C00, 0x7C00};  // f16 1.0, +inf
  EXPECT_EQ(quant::find_non_finite(h.data(), DType::kF16, 2), 1);
  const std::vector<uint16_t> b = {0x3F80, 0x7FC0};  // bf16 1.0, NaN
  EXPECT_EQ(quant::find_non_finite(b.data(), DType::kBF16, 2), 1);
}

// The magnitudes a pool cannot store: f16 rounds 65520 up to infinity, bf16 past its largest
// value, and an integer group's range (max - min) overflows from 2^127.
TEST(Quantize, FindsValuesAPoolWouldStoreAsInfinity) {
  const auto first_bad = [](float x, DType pool) {
    const std::vector<float> f = {1.0f, -x, 2.0f};
    return quant::find_unstorable(f.data(), DType::kF32, 3, quant::unstorable_abs_bits(pool));
  };
  EXPECT_EQ(first_bad(65519.996f, DType::kF16), -1);  // rounds down to 65504
  EXPECT_EQ(first_bad(65520.0f, DType::kF16), 1);
  EXPECT_EQ(first_bad(1e6f, DType::kF16), 1);
  EXPECT_EQ(first_bad(std::nextafter(std::ldexp(1.0f, 127), 0.0f), DType::kInt8), -1);
  EXPECT_EQ(first_bad(std::ldexp(1.0f, 127), DType::kInt4), 1);
  EXPECT_EQ(first_bad(std::bit_cast<float>(0x7F7F7FFFu), DType::kBF16), -1);
  EXPECT_EQ(first_bad(std::bit_cast<float>(0x7F7F8000u), DType::kBF16), 1);
  for (DType pool : {DType::kF32, DType::kFP8E4M3}) {
    EXPECT_EQ(first_bad(std::numeric_limits<float>::max(), pool), -1);
    EXPECT_EQ(first_bad(INFINITY, pool), 1);
    EXPECT_EQ(first_bad(NAN, pool), 1);
  }
  // What is stored at the bounds is what was given, rounded: never infinity or NaN.
  EXPECT_EQ(numeric::f16_to_f32(numeric::f32_to_f16(65519.996f)), 65504.0f);
  EXPECT_TRUE(std::isinf(numeric::f16_to_f32(numeric::f32_to_f16(65520.0f))));
  EXPECT_TRUE(std::isinf(numeric::bf16_to_f32(numeric::f32_to_bf16(std::bit_cast<float>(0x7F7F8000u)))));
  // bf16 inputs are the upper half of a f32; f16 inputs (at most 65504) fit every pool.
  const std::vector<uint16_t> b = {0x477F, 0x4780};  // 65280, 65536
  EXPECT_EQ(quant::find_unstorable(b.data(), DType::kBF16, 2, quant::unstorable_abs_bits(DType::kF16)), 1);
  const std::vector<uint16_t> h = {0x7BFF, 0xFBFF};  // f16 +-65504
  EXPECT_EQ(quant::find_unstorable(h.data(), DType::kF16, 2, quant::unstorable_abs_bits(DType::kF16)), -1);
}

}  // namespace
}  // namespace kvfabric
