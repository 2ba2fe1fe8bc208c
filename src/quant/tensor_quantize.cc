#include "kvfabric/quant/tensor_quantize.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <sstream>
#include <string>

namespace kvfabric::quant {
namespace {

// Codes form one little-endian bit stream, so widths that do not divide 8 (3, 5, 6, 7) may
// straddle two bytes.
void pack_bits(std::vector<uint8_t>& data, size_t index, uint32_t bits, uint32_t code) {
  const size_t bit = index * bits;
  const uint32_t word = code << (bit % 8);
  data[bit / 8] = static_cast<uint8_t>(data[bit / 8] | (word & 0xFFu));
  if ((bit % 8) + bits > 8)
    data[bit / 8 + 1] = static_cast<uint8_t>(data[bit / 8 + 1] | (word >> 8));
}

Status check_bits(uint8_t bits) {
  if (bits < kMinTensorBits || bits > kMaxTensorBits) {
    return invalid_argument("quantization bits " + std::to_string(bits) + " outside [" +
                            std::to_string(kMinTensorBits) + ", " + std::to_string(kMaxTensorBits) +
                            "]");
  }
  return ok_status();
}

Status check_finite(std::span<const float> tensor) {
  for (size_t i = 0; i < tensor.size(); ++i) {
    if (!std::isfinite(tensor[i])) {
      return invalid_argument("tensor element " + std::to_string(i) + " is " +
                              (std::isnan(tensor[i]) ? "NaN" : "infinite"));
    }
  }
  return ok_status();
}

uint32_t encode(float x, float scale, float zero_point, uint32_t qmax) {
  const float q = round_to_nearest_even(x / scale + zero_point);
  return static_cast<uint32_t>(std::clamp(q, 0.0f, static_cast<float>(qmax)));
}

QuantizedTensor empty_tensor(size_t num_elements, size_t num_segments, uint8_t bits) {
  QuantizedTensor t;
  t.data.assign((num_elements * bits + 7) / 8, 0);
  t.scales.reserve(num_segments);
  t.zero_points.reserve(num_segments);
  t.bits = bits;
  t.num_elements = num_elements;
  return t;
}

}  // namespace

uint32_t QuantizedTensor::code(size_t i) const {
  const size_t bit = i * bits;
  uint32_t word = data[bit / 8];
  if ((bit % 8) + bits > 8) word |= static_cast<uint32_t>(data[bit / 8 + 1]) << 8;
  return (word >> (bit % 8)) & ((1u << bits) - 1u);
}

size_t QuantizedTensor::byte_size() const {
  return data.size() + sizeof(float) * (scales.size() + zero_points.size());
}

size_t quantized_bytes(size_t num_elements, size_t num_segments, uint8_t bits) {
  return (num_elements * bits + 7) / 8 + 2 * sizeof(float) * num_segments;
}

float round_to_nearest_even(float x) {
  const float rounded = std::round(x);
  const float fraction = x - std::floor(x);
  if (std::fabs(fraction - 0.5f) < FLT_EPSILON && std::fmod(rounded, 2.0f) != 0.0f) {
    return x > 0.0f ? rounded - 1.0f : rounded + 1.0f;
  }
  return rounded;
}

Result<QuantizedTensor> quantize_asymmetric(std::span<const float> tensor, size_t num_heads,
                                            uint8_t bits) {
  KVF_RETURN_IF_ERROR(check_bits(bits));
  if (num_heads == 0) return invalid_argument("num_heads must be positive");
  if (tensor.size() % num_heads != 0) {
    return invalid_argument("a tensor of " + std::to_string(tensor.size()) +
                            " elements does not split into " + std::to_string(num_heads) +
                            " heads");
  }
  KVF_RETURN_IF_ERROR(check_finite(tensor));

  const size_t head_dim = tensor.size() / num_heads;
  const uint32_t qmax = (1u << bits) - 1u;
  QuantizedTensor out = empty_tensor(tensor.size(), num_heads, bits);
  for (size_t h = 0; h < num_heads; ++h) {
    const auto head = tensor.subspan(h * head_dim, head_dim);
    const auto [lo_it, hi_it] = std::minmax_element(head.begin(), head.end());
    const float lo = head_dim ? *lo_it : 0.0f;
    const float scale = head_dim ? (*hi_it - lo) / static_cast<float>(qmax) : 0.0f;
    if (std::isinf(scale)) {  // stored, it would read back as NaN
      std::ostringstream span;
      span << "[" << lo << ", " << *hi_it << "]";
      return invalid_argument("head " + std::to_string(h) + " spans " + span.str() +
                              ", a range wider than the largest float; nothing was stored");
    }
    if (!(scale >= FLT_MIN)) {
      // Constant (or empty) head: code 0 and zero_point = -lo reconstruct lo exactly. The seed's
      // scale 1, zero_point 0 rounded the value itself into [0, qmax].
      out.scales.push_back(1.0f);
      out.zero_points.push_back(-lo);
      continue;  // codes stay 0
    }
    const float zero_point = -lo / scale;
    out.scales.push_back(scale);
    out.zero_points.push_back(zero_point);
    for (size_t i = 0; i < head_dim; ++i)
      pack_bits(out.data, h * head_dim + i, bits, encode(head[i], scale, zero_point, qmax));
  }
  return out;
}

Result<QuantizedTensor> quantize_symmetric(std::span<const float> tensor, uint8_t bits) {
  KVF_RETURN_IF_ERROR(check_bits(bits));
  KVF_RETURN_IF_ERROR(check_finite(tensor));

  float absmax = 0.0f;
  for (const float x : tensor)
    absmax = std::max(absmax, std::fabs(x));
  const float offset = static_cast<float>(1u << (bits - 1));
  const float scale_raw = absmax / (offset - 1.0f);
  const float scale = scale_raw >= FLT_MIN ? scale_raw : 1.0f;  // all zeros (or subnormal)
  const uint32_t qmax = (1u << bits) - 1u;
  QuantizedTensor out = empty_tensor(tensor.size(), 1, bits);
  out.scales.push_back(scale);
  out.zero_points.push_back(offset);
  for (size_t i = 0; i < tensor.size(); ++i)
    pack_bits(out.data, i, bits, encode(tensor[i], scale, offset, qmax));
  return out;
}

Result<std::vector<float>> dequantize(const QuantizedTensor& tensor, size_t num_segments) {
  KVF_RETURN_IF_ERROR(check_bits(tensor.bits));
  if (num_segments == 0 || tensor.scales.size() != num_segments ||
      tensor.zero_points.size() != num_segments) {
    return invalid_argument("the tensor has " + std::to_string(tensor.scales.size()) +
                            " scales and " + std::to_string(tensor.zero_points.size()) +
                            " zero-points; " + std::to_string(num_segments) + " segments asked");
  }
  if (tensor.num_elements % num_segments != 0 ||
      tensor.data.size() != (tensor.num_elements * tensor.bits + 7) / 8) {
    return invalid_argument("a tensor of " + std::to_string(tensor.num_elements) + " " +
                            std::to_string(tensor.bits) + "-bit elements in " +
                            std::to_string(tensor.data.size()) + " bytes and " +
                            std::to_string(num_segments) + " segments is malformed");
  }
  const size_t segment_len = tensor.num_elements / num_segments;
  std::vector<float> out(tensor.num_elements);
  for (size_t i = 0; i < out.size(); ++i) {
    const size_t s = i / segment_len;
    out[i] = tensor.scales[s] * (static_cast<float>(tensor.code(i)) - tensor.zero_points[s]);
  }
  return out;
}

}  // namespace kvfabric::quant
