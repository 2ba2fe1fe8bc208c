#include "kvfabric/common/dtype.h"

#include <algorithm>
#include <cctype>
#include <string>
#include <utility>

namespace kvfabric {

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
    case DType::kFP8E4M3:
      return "fp8_e4m3";
    case DType::kInt8:
      return "int8";
    case DType::kInt4:
      return "int4";
    case DType::kInt2:
      return "int2";
  }
  return "unknown";
}

Result<DType> parse_dtype(std::string_view name) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  static const std::pair<std::string_view, DType> kNames[] = {
      {"f32", DType::kF32},       {"fp32", DType::kF32},         {"float32", DType::kF32},
      {"float", DType::kF32},     {"f16", DType::kF16},          {"fp16", DType::kF16},
      {"float16", DType::kF16},   {"half", DType::kF16},         {"bf16", DType::kBF16},
      {"bfloat16", DType::kBF16}, {"fp8_e4m3", DType::kFP8E4M3}, {"fp8e4m3", DType::kFP8E4M3},
      {"fp8", DType::kFP8E4M3},   {"e4m3", DType::kFP8E4M3},     {"int8", DType::kInt8},
      {"i8", DType::kInt8},       {"int4", DType::kInt4},        {"i4", DType::kInt4},
      {"int2", DType::kInt2},     {"i2", DType::kInt2},
  };
  for (const auto& [alias, dtype] : kNames) {
    if (alias == lower) return dtype;
  }
  return invalid_argument("unknown dtype '" + std::string(name) +
                          "' (expected one of f32, f16, bf16, fp8_e4m3, int8, int4, int2)");
}

}  // namespace kvfabric
