// The element conversions against independent oracles: the compiler's own _Float16 conversion,
// exhaustive decoding of every code, and brute-force nearest-value search.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kvfabric/quant/numeric.h"
#include "testing/kv_reference.h"

namespace kvfabric {
namespace {

using namespace numeric;

std::vector<float> interesting_floats() {
  std::vector<float> v = {0.0f,          -0.0f,         1.0f,          -1.0f,         65504.0f,
                          65519.99f,     65520.0f,      1e6f,          5.9604645e-8f, 2.98e-8f,
                          2.9802322e-8f, 1e-10f,        6.1035156e-5f, 6.0975552e-5f, 0.1f,
                          3.14159f,      448.0f,        464.0f,        500.0f,        1e-3f,
                          0.001953125f,  0.0009765625f, 0.015625f,     0.0146484375f, INFINITY,
                          -INFINITY};
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    float f = f32_from_bits(bits(rng));
    if (!std::isnan(f)) v.push_back(f);
  }
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int i = 0; i < 100000; ++i)
    v.push_back(normal(rng));
  return v;
}

TEST(Numeric, F16DecodesEveryCode) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const double expected = testing::ref_f16(static_cast<uint16_t>(h));
    const float got = f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << h;
    } else {
      ASSERT_EQ(got, expected) << "code " << h;
    }
  }
}

#if defined(__FLT16_MAX__)
TEST(Numeric, F16EncodeMatchesCompiler) {
  for (float f : interesting_floats()) {
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t expected;
    std::memcpy(&expected, &h, 2);
    ASSERT_EQ(f32_to_f16(f), expected) << "f=" << f;
  }
}
#endif

// The nearest value of a format among its finite codes, ties to an even code.
template <typename Decode>
uint32_t nearest_code(double x, uint32_t num_codes, Decode decode) {
  uint32_t best = 0;
  double best_err = INFINITY;
  for (uint32_t c = 0; c < num_codes; ++c) {
    const double v = decode(c);
    if (std::isnan(v) || std::isinf(v)) continue;
    const double err = std::fabs(v - x);
    const bool tie = err == best_err;
    if (err < best_err || (tie && (c & 1) == 0 && (best & 1) == 1)) {
      best = c;
      best_err = err;
    }
  }
  return best;
}

TEST(Numeric, Fp8E4M3DecodesEveryCode) {
  for (uint32_t c = 0; c < 256; ++c) {
    const double expected = testing::ref_e4m3(static_cast<uint8_t>(c));
    const float got = fp8_e4m3_to_f32(static_cast<uint8_t>(c));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << c;
    } else {
      EXPECT_EQ(got, expected) << c;
    }
  }
  EXPECT_EQ(fp8_e4m3_to_f32(0x7E), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
}

TEST(Numeric, Fp8E4M3EncodesToNearestAndSaturates) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> mag(-12.0f, 9.5f);
  for (int i = 0; i < 20000; ++i) {
    const float x = (i % 2 ? -1.0f : 1.0f) * std::exp2(mag(rng));
    const uint8_t code = f32_to_fp8_e4m3(x);
    if (std::fabs(x) >= 448.0f) {
      EXPECT_EQ(code & 0x7F, 0x7E) << x;
      continue;
    }
    const uint32_t magnitude = nearest_code(
        std::fabs(x), 128, [](uint32_t c) { return testing::ref_e4m3(static_cast<uint8_t>(c)); });
    ASSERT_EQ(code & 0x7F, magnitude) << "x=" << x;
    ASSERT_EQ(code >> 7, x < 0 ? 1 : 0);
  }
  // Every representable value encodes to itself; exact midpoints go to the even code.
  for (uint32_t c = 0; c < 0x7F; ++c)
    EXPECT_EQ(f32_to_fp8_e4m3(fp8_e4m3_to_f32(c)), c);
  EXPECT_EQ(f32_to_fp8_e4m3(1.0625f), 0x38);  // between 1.0 (0x38) and 1.125 (0x39)
  EXPECT_EQ(f32_to_fp8_e4m3(1.1875f), 0x3A);  // between 1.125 and 1.25 (0x3A)
  EXPECT_EQ(f32_to_fp8_e4m3(1e9f), 0x7E);
  EXPECT_EQ(f32_to_fp8_e4m3(-1e9f), 0xFE);
}

TEST(Numeric, Bf16RoundsToNearestEven) {
  for (float f : interesting_floats()) {
    const uint16_t b = f32_to_bf16(f);
    const double back = testing::ref_bf16(b);
    if (std::isinf(back)) {  // overflow: |f| is at least halfway past the largest bf16
      EXPECT_GE(std::fabs(f), std::ldexp(255.5, 120)) << f;
      continue;
    }
    // Neighbours of the result are no closer than it.
    const double up = testing::ref_bf16(static_cast<uint16_t>(b + 1));
    const double down = testing::ref_bf16(static_cast<uint16_t>(b - 1));
    const double err = std::fabs(back - f);
    if (!std::isinf(up) && !std::isnan(up)) {
      ASSERT_LE(err, std::fabs(up - f)) << f;
    }
    if (!std::isinf(down) && !std::isnan(down) && (b & 0x7FFF) != 0) {
      ASSERT_LE(err, std::fabs(down - f)) << f;
    }
  }
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3F80);  // tie between 1.0 and 1.0078125 -> even
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(Numeric, PackedCodesLayout) {
  uint8_t row[4] = {0, 0, 0, 0};
  for (uint32_t i = 0; i < 8; ++i)
    pack_code(row, i, 4, i + 1);  // int4: low nibble first
  EXPECT_EQ(row[0], 0x21);
  EXPECT_EQ(row[3], 0x87);
  uint8_t two[2] = {0xFF, 0xFF};
  for (uint32_t i = 0; i < 8; ++i)
    pack_code(two, i, 2, i % 4);  // int2: bits 0-1 first
  EXPECT_EQ(two[0], 0b11100100);
  for (uint32_t i = 0; i < 8; ++i)
    EXPECT_EQ(unpack_code(two, i, 2), i % 4);
  for (uint32_t i = 0; i < 8; ++i)
    EXPECT_EQ(unpack_code(row, i, 4), i + 1);
}

}  // namespace
}  // namespace kvfabric
