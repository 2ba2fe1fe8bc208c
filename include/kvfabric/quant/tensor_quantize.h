// Whole-tensor quantization of the seed CacheManager (ruvector kv_cache): asymmetric per head and
// symmetric per tensor, with packed codes (README "Seed CacheManager").
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kvfabric/common/status.h"

namespace kvfabric::quant {

//! Code widths the tensor quantizers accept.
inline constexpr uint8_t kMinTensorBits = 2;
inline constexpr uint8_t kMaxTensorBits = 8;

//! \brief A quantized vector: element i is `scales[s] * (code(i) - zero_points[s])`, where s is
//! the element's segment (a head for asymmetric tensors, the whole vector for symmetric ones).
//! Codes are packed `bits` wide, element i in stream bits [i * bits, (i + 1) * bits), lowest bit
//! first (the seed stored one code per byte whatever the width).
struct QuantizedTensor {
  std::vector<uint8_t> data;       //!< ceil(num_elements * bits / 8) bytes
  std::vector<float> scales;       //!< one per segment
  std::vector<float> zero_points;  //!< one per segment, fractional as in the seed
  uint8_t bits = 0;
  size_t num_elements = 0;

  //! Code of element i (i < num_elements).
  [[nodiscard]] uint32_t code(size_t i) const;
  //! Bytes the tensor occupies: packed codes plus one f32 scale and one f32 zero-point a segment.
  [[nodiscard]] size_t byte_size() const;
};

//! Bytes of a tensor of `num_elements` codes `bits` wide in `num_segments` segments.
size_t quantized_bytes(size_t num_elements, size_t num_segments, uint8_t bits);

//! The seed's rounding: half away from zero, except that values within FLT_EPSILON of a .5
//! fraction round to the even neighbour (2.5 -> 2, 3.5 -> 4, -2.5 -> -2).
float round_to_nearest_even(float x);

//! Asymmetric quantization, one (scale, zero-point) per head: tensor = [num_heads][head_dim].
//! scale = (max - min) / (2^bits - 1), zero_point = -min / scale, so min and max map to the end
//! codes and the error is at most scale / 2. A constant head stores code 0 with
//! zero_point = -value and reconstructs exactly (the seed rounded it into [0, 2^bits - 1]).
//! Errors (nothing is produced): num_heads 0 or not dividing the length, bits outside [2, 8],
//! a NaN or infinite element.
Result<QuantizedTensor> quantize_asymmetric(std::span<const float> tensor, size_t num_heads,
                                            uint8_t bits);

//! Symmetric quantization with one scale: scale = max|x| / (2^(bits-1) - 1), codes offset by
//! 2^(bits-1) (stored as the zero-point), so 0 is exact. Errors: bits outside [2, 8], a NaN or
//! infinite element.
Result<QuantizedTensor> quantize_symmetric(std::span<const float> tensor, uint8_t bits);

//! The f32 values of a quantized tensor. `num_segments` must match its scales (the seed's
//! num_heads argument; 1 for symmetric tensors); a mismatch or malformed tensor is an error.
Result<std::vector<float>> dequantize(const QuantizedTensor& tensor, size_t num_segments);

}  // namespace kvfabric::quant
