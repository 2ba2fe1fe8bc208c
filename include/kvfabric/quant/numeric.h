// Bit-exact conversions between f32 and the stored KV element formats (f16, bf16, fp8 e4m3), and
// sub-byte code packing. Host and device code use these same functions, so the CPU backend and
// the CUDA kernels produce identical bytes.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvfabric/common/host_device.h"

namespace kvfabric::numeric {

// Internal linkage (static): the SIMD translation units include this header with other target
// flags, and must not share out-of-line copies with the generic ones.

KVF_HOST_DEVICE static inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

KVF_HOST_DEVICE static inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

//! f32 -> IEEE binary16, round to nearest even; overflow to +-inf, NaN stays NaN.
KVF_HOST_DEVICE static inline uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u)
    return static_cast<uint16_t>(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u));
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (abs >= 0x38800000u) {  // normal f16: rebias the exponent (127 -> 15), round at bit 13
    const uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
  }
  const uint32_t exponent = abs >> 23;
  if (exponent < 102) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
  // Subnormal f16: code = mantissa * 2^(exponent - 126), rounded to nearest even.
  const uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126 - exponent;
  uint32_t code = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (code & 1u))) ++code;
  return static_cast<uint16_t>(sign | code);
}

//! IEEE binary16 -> f32 (exact).
KVF_HOST_DEVICE static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return f32_from_bits(f32_bits(magnitude) | sign);
  }
  if (exponent == 31) return f32_from_bits(sign | 0x7F800000u | (mantissa << 13));
  return f32_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

//! f32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
KVF_HOST_DEVICE static inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

//! bfloat16 -> f32 (exact).
KVF_HOST_DEVICE static inline float bf16_to_f32(uint16_t b) {
  return f32_from_bits(static_cast<uint32_t>(b) << 16);
}

//! Largest finite fp8 e4m3 (OCP "FN" variant: no infinities, S.1111.111 is NaN).
inline constexpr float kFp8E4M3Max = 448.0f;

//! f32 -> fp8 e4m3, round to nearest even, saturating to +-448. Callers never pass NaN.
KVF_HOST_DEVICE static inline uint8_t f32_to_fp8_e4m3(float f) {
  const uint32_t x = f32_bits(f);
  const uint8_t sign = static_cast<uint8_t>((x >> 24) & 0x80u);
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x43E00000u) return static_cast<uint8_t>(sign | 0x7Eu);  // >= 448: saturate
  if (abs < 0x3C800000u) {  // below 2^-6: subnormal, unit 2^-9
    const float units = f32_from_bits(abs) * 512.0f;
    uint32_t code = static_cast<uint32_t>(units);
    const float rest = units - static_cast<float>(code);
    if (rest > 0.5f || (rest == 0.5f && (code & 1u))) ++code;
    return static_cast<uint8_t>(sign | code);  // code 8 is the smallest normal, 0x08
  }
  const uint32_t rounded = abs + 0x7FFFFu + ((abs >> 20) & 1u);  // keep 3 mantissa bits
  const uint32_t exponent = (rounded >> 23) - 120u;              // rebias 127 -> 7
  const uint32_t code = (exponent << 3) | ((rounded >> 20) & 7u);
  return static_cast<uint8_t>(sign | (code > 0x7Eu ? 0x7Eu : code));
}

//! fp8 e4m3 -> f32 (exact; 0x7F/0xFF decode to NaN).
KVF_HOST_DEVICE static inline float fp8_e4m3_to_f32(uint8_t c) {
  const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
  const uint32_t exponent = (c >> 3) & 0xFu;
  const uint32_t mantissa = c & 7u;
  if (exponent == 15 && mantissa == 7) return f32_from_bits(sign | 0x7FC00000u);
  if (exponent == 0) {
    return f32_from_bits(f32_bits(static_cast<float>(mantissa) * 0.001953125f) | sign);  // 2^-9
  }
  return f32_from_bits(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

//! Stores code `q` (bits wide: 2, 4 or 8) as element `index` of a packed row: element i of a
//! byte lives in bits [i * bits, (i + 1) * bits), lowest first.
KVF_HOST_DEVICE static inline void pack_code(uint8_t* row, uint32_t index, uint32_t bits,
                                             uint32_t q) {
  if (bits == 8) {
    row[index] = static_cast<uint8_t>(q);
    return;
  }
  const uint32_t per_byte = 8 / bits;
  const uint32_t shift = (index % per_byte) * bits;
  const uint32_t mask = ((1u << bits) - 1u) << shift;
  uint8_t& byte = row[index / per_byte];
  byte = static_cast<uint8_t>((byte & ~mask) | ((q << shift) & mask));
}

KVF_HOST_DEVICE static inline uint32_t unpack_code(const uint8_t* row, uint32_t index,
                                                   uint32_t bits) {
  if (bits == 8) return row[index];
  const uint32_t per_byte = 8 / bits;
  return (row[index / per_byte] >> ((index % per_byte) * bits)) & ((1u << bits) - 1u);
}

}  // namespace kvfabric::numeric
