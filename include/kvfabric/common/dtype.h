// Element types of model activations and of stored KV.
#pragma once

#include <cstdint>
#include <ostream>
#include <string_view>

#include "kvfabric/common/status.h"

namespace kvfabric {

//! \brief Element type. Quantized types store codes plus per-group metadata (DESIGN.md §3).
enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kFP8E4M3,  //!< 8-bit float codes with one f32 scale per (token, head)
  kInt8,     //!< asymmetric integer codes, per token, groups along head_dim
  kInt4,     //!< as kInt8, two codes per byte
  kInt2,     //!< as kInt8, four codes per byte (KIVI-style)
};

inline constexpr DType kAllDTypes[] = {DType::kF32,  DType::kF16,  DType::kBF16, DType::kFP8E4M3,
                                       DType::kInt8, DType::kInt4, DType::kInt2};

//! Canonical name: "f32", "f16", "bf16", "fp8_e4m3", "int8", "int4", "int2".
std::string_view dtype_name(DType dtype);
//! Parses a canonical name or a common alias ("fp16", "half", "float32", "bfloat16", "fp8", ...).
Result<DType> parse_dtype(std::string_view name);
inline std::ostream& operator<<(std::ostream& os, DType d) {
  return os << dtype_name(d);
}

//! Bits per stored element (the code width for quantized types).
constexpr uint32_t dtype_bits(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 32;
    case DType::kF16:
    case DType::kBF16:
      return 16;
    case DType::kFP8E4M3:
    case DType::kInt8:
      return 8;
    case DType::kInt4:
      return 4;
    case DType::kInt2:
      return 2;
  }
  return 0;
}

//! True for the asymmetric integer formats (int8, int4, int2), which carry scale and zero-point.
constexpr bool is_integer_quantized(DType dtype) {
  return dtype == DType::kInt8 || dtype == DType::kInt4 || dtype == DType::kInt2;
}
//! True for every format that stores per-group scales (fp8 and the integer formats).
constexpr bool is_quantized(DType dtype) {
  return dtype == DType::kFP8E4M3 || is_integer_quantized(dtype);
}
//! True for types a model computes in (and a query or output tensor may have).
constexpr bool is_float_compute(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
}

}  // namespace kvfabric
