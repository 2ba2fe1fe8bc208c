// The math of the quantized KV formats (DESIGN.md §3), one definition for host and device code.
//
// fp8_e4m3: one f32 scale per (token, head) row: scale = absmax / 448, code = e4m3(x / scale),
//           x' = scale * e4m3_to_f32(code).
// int8/int4/int2: asymmetric, per group of `group_size` elements along head_dim, with an f32 scale
//           and an integer zero-point in [0, 2^bits - 1]:
//           lo = min(min(x), 0), hi = max(max(x), 0), scale = (hi - lo) / qmax,
//           zero = clamp(rint(-lo / scale)), code = clamp(rint(x / scale) + zero), x' = scale *
//           (code - zero). The range includes 0 so the zero-point is a valid code; |x - x'| <=
//           scale / 2.
// Constant groups (all elements equal) reconstruct exactly in both schemes: the scale is the
// constant's magnitude and the code encodes +-1 (or 0 for a zero group).
#pragma once

#include <cmath>
#include <cstdint>

#include "kvfabric/common/host_device.h"
#include "kvfabric/quant/numeric.h"

namespace kvfabric::quant {

//! The inverse scale of an integer group whose qmax / range overflows (subnormal inputs): the
//! largest finite float. An infinite one made 0 * inf a NaN zero point, and a NaN cast to an
//! integer is undefined (compilers then disagree on the byte).
inline constexpr float kLargestInverseScale = 3.40282347e+38f;

struct IntGroupParams {
  float scale = 0.0f;
  float inv_scale = 0.0f;
  uint32_t zero = 0;
  bool constant = false;
  uint32_t constant_code = 0;
};

//! Parameters of one integer group from its minimum and maximum (qmax = 2^bits - 1).
KVF_HOST_DEVICE static inline IntGroupParams int_group_params(float min_x, float max_x,
                                                              uint32_t qmax) {
  IntGroupParams p;
  if (min_x == max_x) {
    p.constant = true;
    if (min_x > 0.0f) {
      p.scale = min_x;  // code 1, zero 0 -> scale * 1
      p.constant_code = 1;
    } else if (min_x < 0.0f) {
      p.scale = -min_x;  // code 0, zero 1 -> scale * -1
      p.zero = 1;
    }
    return p;
  }
  const float lo = min_x < 0.0f ? min_x : 0.0f;
  const float hi = max_x > 0.0f ? max_x : 0.0f;
  p.scale = (hi - lo) / static_cast<float>(qmax);
  p.inv_scale = static_cast<float>(qmax) / (hi - lo);
  if (!(p.inv_scale <= kLargestInverseScale)) p.inv_scale = kLargestInverseScale;
  float zero = rintf(-lo * p.inv_scale);
  zero = zero > 0.0f ? (zero > static_cast<float>(qmax) ? static_cast<float>(qmax) : zero) : 0.0f;
  p.zero = static_cast<uint32_t>(zero);
  return p;
}

KVF_HOST_DEVICE static inline uint32_t int_encode(float x, const IntGroupParams& p, uint32_t qmax) {
  if (p.constant) return p.constant_code;
  float q = rintf(x * p.inv_scale) + static_cast<float>(p.zero);
  q = q > 0.0f ? (q > static_cast<float>(qmax) ? static_cast<float>(qmax) : q) : 0.0f;
  return static_cast<uint32_t>(q);
}

KVF_HOST_DEVICE static inline float int_decode(uint32_t code, float scale, uint32_t zero) {
  return scale * (static_cast<float>(code) - static_cast<float>(zero));
}

struct Fp8RowParams {
  float scale = 0.0f;
  float inv_scale = 0.0f;
  bool constant = false;
  uint8_t constant_code = 0;
};

//! Parameters of one fp8 row from its absolute maximum; `all_equal` with `value` marks a constant.
KVF_HOST_DEVICE static inline Fp8RowParams fp8_row_params(float absmax, bool all_equal,
                                                          float value) {
  Fp8RowParams p;
  if (absmax == 0.0f) {
    p.constant = true;  // all zeros: scale 0, code 0
    return p;
  }
  if (all_equal) {
    p.constant = true;
    p.scale = absmax;
    p.constant_code = static_cast<uint8_t>(value < 0.0f ? 0xB8u : 0x38u);  // e4m3 -1.0 / +1.0
    return p;
  }
  p.scale = absmax / numeric::kFp8E4M3Max;
  p.inv_scale = numeric::kFp8E4M3Max / absmax;
  if (!(p.inv_scale <= kLargestInverseScale)) {
    // Magnitudes below 448 / FLT_MAX: 448 / absmax overflows, and a zero element times infinity
    // would encode NaN (stored as -absmax). The largest finite inverse and its inverse (2^-128,
    // subnormal) still map the row into fp8's range and back.
    p.inv_scale = kLargestInverseScale;
    p.scale = 1.0f / kLargestInverseScale;
  }
  return p;
}

KVF_HOST_DEVICE static inline uint8_t fp8_encode(float x, const Fp8RowParams& p) {
  return p.constant ? p.constant_code : numeric::f32_to_fp8_e4m3(x * p.inv_scale);
}

KVF_HOST_DEVICE static inline float fp8_decode(uint8_t code, float scale) {
  return scale * numeric::fp8_e4m3_to_f32(code);
}

}  // namespace kvfabric::quant
