#include <gtest/gtest.h>

#include "kvfabric/common/block_layout.h"
#include "kvfabric/common/dtype.h"

namespace kvfabric {
namespace {

TEST(DType, NamesRoundTrip) {
  for (DType d : kAllDTypes) {
    auto parsed = parse_dtype(dtype_name(d));
    ASSERT_TRUE(parsed.ok()) << dtype_name(d);
    EXPECT_EQ(parsed.value(), d);
  }
  EXPECT_EQ(parse_dtype("FP16").value(), DType::kF16);
  EXPECT_EQ(parse_dtype("bfloat16").value(), DType::kBF16);
  EXPECT_EQ(parse_dtype("fp8").value(), DType::kFP8E4M3);
  const auto bad = parse_dtype("int3");
  EXPECT_EQ(bad.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("int3"), std::string::npos);
}

TEST(DType, Bits) {
  EXPECT_EQ(dtype_bits(DType::kF32), 32u);
  EXPECT_EQ(dtype_bits(DType::kBF16), 16u);
  EXPECT_EQ(dtype_bits(DType::kFP8E4M3), 8u);
  EXPECT_EQ(dtype_bits(DType::kInt4), 4u);
  EXPECT_EQ(dtype_bits(DType::kInt2), 2u);
  EXPECT_TRUE(is_quantized(DType::kFP8E4M3));
  EXPECT_FALSE(is_integer_quantized(DType::kFP8E4M3));
  EXPECT_TRUE(is_integer_quantized(DType::kInt2));
  EXPECT_FALSE(is_quantized(DType::kBF16));
}

TEST(BlockLayout, SeedFp16OneLayer) {
  // Seed formula 2 * bs * H * D * 2 for (16, 32, 128): 262144 bytes.
  const auto layout = BlockLayout::create(1, 32, 16, 128, DType::kF16).value();
  EXPECT_EQ(layout.block_bytes(), 262144u);
  EXPECT_EQ(layout.num_groups(), 0u);
}

TEST(BlockLayout, LayersHeadsAndDtype) {
  // Llama-3-8B bf16 block: 2 * 32 layers * 8 heads * 16 tokens * 128 * 2 B = 2 MiB.
  EXPECT_EQ(BlockLayout::create(32, 8, 16, 128, DType::kBF16).value().block_bytes(), 2u << 20);
  EXPECT_EQ(BlockLayout::create(32, 8, 16, 128, DType::kF32).value().block_bytes(), 4u << 20);
}

TEST(BlockLayout, Fp8CarriesOneScalePerTokenHead) {
  const auto layout = BlockLayout::create(2, 4, 16, 128, DType::kFP8E4M3).value();
  const uint64_t data = 2ull * 2 * 4 * 16 * 128;
  EXPECT_EQ(layout.data_bytes(), data);
  EXPECT_EQ(layout.groups_per_row(), 1u);
  EXPECT_EQ(layout.num_groups(), 2ull * 2 * 4 * 16);
  EXPECT_EQ(layout.scales_offset(), data);
  EXPECT_EQ(layout.block_bytes(), (data + layout.num_groups() * 4 + 15) / 16 * 16);
}

TEST(BlockLayout, IntegerFormatsPackCodesAndAddScaleAndZero) {
  const auto int4 = BlockLayout::create(1, 1, 16, 128, DType::kInt4, 32).value();
  EXPECT_EQ(int4.tile_bytes(), 16u * 128 / 2);
  EXPECT_EQ(int4.data_bytes(), 2u * 16 * 64);
  EXPECT_EQ(int4.groups_per_row(), 4u);
  EXPECT_EQ(int4.num_groups(), 2u * 16 * 4);
  EXPECT_EQ(int4.zeros_offset(), int4.scales_offset() + int4.num_groups() * 4);
  EXPECT_EQ(int4.block_bytes(), int4.data_bytes() + int4.num_groups() * 5);

  const auto int2 = BlockLayout::create(1, 1, 1, 64, DType::kInt2).value();  // group = head_dim
  EXPECT_EQ(int2.group_size, 64u);
  EXPECT_EQ(int2.data_bytes(), 2u * 16);
  EXPECT_EQ(int2.block_bytes(), 48u);  // 32 B codes, 2 rows of (4 B scale + 1 B zero), padded to 16
  EXPECT_EQ(int2.block_bytes() % 16, 0u);
}

TEST(BlockLayout, RejectsBadShapes) {
  EXPECT_EQ(BlockLayout::create(0, 1, 16, 64, DType::kF16).status().code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(BlockLayout::create(1, 1, 0, 64, DType::kF16).status().code(),
            ErrorCode::kInvalidArgument);
  const auto not_dividing = BlockLayout::create(1, 1, 16, 64, DType::kInt8, 48);
  EXPECT_NE(not_dividing.status().message().find("does not divide head_dim"), std::string::npos);
  const auto sub_byte = BlockLayout::create(1, 1, 16, 64, DType::kInt2, 2);
  EXPECT_NE(sub_byte.status().message().find("byte boundary"), std::string::npos);
  const auto odd_row = BlockLayout::create(1, 1, 16, 3, DType::kInt4);
  EXPECT_EQ(odd_row.status().code(), ErrorCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvfabric
