// Independent references for the KV storage tests: decoders of the stored formats and of the
// block layout written from the documentation (DESIGN.md §3, kv_format.h) without calling
// kvfabric's own conversion or layout code, and fp64 attention.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kvfabric/common/dtype.h"

namespace kvfabric::testing {

inline double ref_f16(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exponent = (h >> 10) & 0x1F;
  const int mantissa = h & 0x3FF;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  if (exponent == 31) return mantissa ? NAN : sign * INFINITY;
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

inline double ref_bf16(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline double ref_e4m3(uint8_t c) {
  const int sign = (c >> 7) ? -1 : 1;
  const int exponent = (c >> 3) & 0xF;
  const int mantissa = c & 7;
  if (exponent == 15 && mantissa == 7) return NAN;
  if (exponent == 0) return sign * std::ldexp(mantissa, -9);
  return sign * std::ldexp(8 + mantissa, exponent - 10);
}

//! Reads element (block, layer, kv, head, token, dim) of a pool straight from its bytes.
class RawPool {
 public:
  RawPool(const uint8_t* base, uint32_t layers, uint32_t heads, uint32_t block_size,
          uint32_t head_dim, DType dtype, uint32_t group_size)
      : base_(base),
        layers_(layers),
        heads_(heads),
        bs_(block_size),
        hd_(head_dim),
        dtype_(dtype),
        group_(group_size == 0 ? head_dim : group_size) {
    bits_ = dtype == DType::kF32                            ? 32
            : dtype == DType::kF16 || dtype == DType::kBF16 ? 16
            : dtype == DType::kInt4                         ? 4
            : dtype == DType::kInt2                         ? 2
                                                            : 8;
    row_bytes_ = uint64_t{hd_} * bits_ / 8;
    const uint64_t data = uint64_t{layers_} * 2 * heads_ * bs_ * row_bytes_;
    groups_per_row_ = dtype == DType::kFP8E4M3 ? 1
                      : (dtype == DType::kInt8 || dtype == DType::kInt4 || dtype == DType::kInt2)
                          ? hd_ / group_
                          : 0;
    const uint64_t records = uint64_t{layers_} * 2 * heads_ * bs_ * groups_per_row_;
    scales_ = (data + 3) / 4 * 4;
    zeros_ = scales_ + records * 4;
    const bool ints = dtype == DType::kInt8 || dtype == DType::kInt4 || dtype == DType::kInt2;
    block_bytes_ = groups_per_row_ == 0 ? data : (zeros_ + (ints ? records : 0) + 15) / 16 * 16;
  }

  [[nodiscard]] uint64_t block_bytes() const { return block_bytes_; }

  [[nodiscard]] double at(uint64_t block, uint32_t layer, uint32_t kv, uint32_t head,
                          uint32_t token, uint32_t dim) const {
    const uint64_t tile = (uint64_t{layer} * 2 + kv) * heads_ + head;
    const uint8_t* blk = base_ + block * block_bytes_;
    const uint8_t* row = blk + (tile * bs_ + token) * row_bytes_;
    const uint64_t record = (tile * bs_ + token) * groups_per_row_ + dim / group_;
    float scale = 0;
    if (groups_per_row_ > 0) std::memcpy(&scale, blk + scales_ + record * 4, 4);
    switch (dtype_) {
      case DType::kF32: {
        float f;
        std::memcpy(&f, row + dim * 4, 4);
        return f;
      }
      case DType::kF16: {
        uint16_t h;
        std::memcpy(&h, row + dim * 2, 2);
        return ref_f16(h);
      }
      case DType::kBF16: {
        uint16_t b;
        std::memcpy(&b, row + dim * 2, 2);
        return ref_bf16(b);
      }
      case DType::kFP8E4M3:  // the format's dequantization is an f32 product
        return scale * static_cast<float>(ref_e4m3(row[dim]));
      default: {
        const uint32_t per_byte = 8 / bits_;
        const uint32_t code =
            (row[dim / per_byte] >> ((dim % per_byte) * bits_)) & ((1u << bits_) - 1);
        const uint8_t zero = blk[zeros_ + record];
        return scale * (static_cast<float>(code) - static_cast<float>(zero));
      }
    }
  }

 private:
  const uint8_t* base_;
  uint32_t layers_, heads_, bs_, hd_;
  DType dtype_;
  uint32_t group_, bits_ = 0, groups_per_row_ = 0;
  uint64_t row_bytes_ = 0, scales_ = 0, zeros_ = 0, block_bytes_ = 0;
};

//! Largest error the format may introduce for one stored element, given the f32 values of its
//! quantization group (the whole row for fp8): f16 2^-11 and bf16 2^-8 relative, fp8 2^-4
//! relative (2^-10 of the scale for subnormal codes), integers half a step of the group's range
//! extended to 0.
inline double element_error_bound(DType dtype, const float* group, uint32_t group_len, float x) {
  switch (dtype) {
    case DType::kF32:
      return 0.0;
    case DType::kF16:
      return std::fabs(x) * std::ldexp(1.0, -11) + std::ldexp(1.0, -25);
    case DType::kBF16:
      return std::fabs(x) * std::ldexp(1.0, -8);
    case DType::kFP8E4M3: {
      double absmax = 0;
      for (uint32_t i = 0; i < group_len; ++i)
        absmax = std::max(absmax, std::fabs(double{group[i]}));
      const double scale = absmax / 448.0;
      return std::max(std::fabs(x) * std::ldexp(1.0, -4), scale * std::ldexp(1.0, -10)) * 1.0001;
    }
    default: {
      double lo = 0, hi = 0;
      for (uint32_t i = 0; i < group_len; ++i) {
        lo = std::min(lo, double{group[i]});
        hi = std::max(hi, double{group[i]});
      }
      const int bits = dtype == DType::kInt8 ? 8 : dtype == DType::kInt4 ? 4 : 2;
      return (hi - lo) / ((1 << bits) - 1) * 0.5 * 1.0001 + 1e-7 * std::max(std::fabs(lo), hi);
    }
  }
}

//! fp64 attention of one query over `n` keys/values [n][hd] (row-major), causal masking left to
//! the caller. Also returns the softmax weights when `weights` is given.
inline std::vector<double> ref_attention(const std::vector<double>& q, const double* k,
                                         const double* v, uint32_t n, uint32_t hd, double scale,
                                         std::vector<double>* weights = nullptr) {
  std::vector<double> logits(n);
  double max = -INFINITY;
  for (uint32_t t = 0; t < n; ++t) {
    double dot = 0;
    for (uint32_t d = 0; d < hd; ++d)
      dot += q[d] * k[uint64_t{t} * hd + d];
    logits[t] = dot * scale;
    max = std::max(max, logits[t]);
  }
  double sum = 0;
  for (double& l : logits)
    sum += (l = std::exp(l - max));
  std::vector<double> out(hd, 0.0);
  for (uint32_t t = 0; t < n; ++t) {
    logits[t] /= sum;
    for (uint32_t d = 0; d < hd; ++d)
      out[d] += logits[t] * v[uint64_t{t} * hd + d];
  }
  if (weights) *weights = logits;
  return out;
}

inline std::vector<float> random_normal(size_t n, std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v)
    x = dist(rng);
  return v;
}

}  // namespace kvfabric::testing
