// Device-side reading and writing of KV rows, 8 elements per thread, with exactly the arithmetic of
// kvfabric/quant/kv_format.h and the CPU kernels (the CPU backend is the reference).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kvfabric/backend/paged_kv_view.h"
#include "kvfabric/quant/kv_format.h"
#include "kvfabric/quant/numeric.h"

namespace kvfabric::kernels {

//! Elements each thread handles in a row: 16 bytes of f16/bf16, 8 of int8/fp8, 4 of int4, 2 of
//! int2.
inline constexpr int kElemsPerThread = 8;

//! Loads `bytes` (2, 4, 8, 16 or 32) bytes from an address aligned to `bytes`.
template <int Bytes>
__device__ __forceinline__ void load_bytes(const uint8_t* p, uint32_t (&w)[(Bytes + 3) / 4]) {
  if constexpr (Bytes == 32) {
    const uint4 a = reinterpret_cast<const uint4*>(p)[0];
    const uint4 b = reinterpret_cast<const uint4*>(p)[1];
    w[0] = a.x;
    w[1] = a.y;
    w[2] = a.z;
    w[3] = a.w;
    w[4] = b.x;
    w[5] = b.y;
    w[6] = b.z;
    w[7] = b.w;
  } else if constexpr (Bytes == 16) {
    const uint4 a = *reinterpret_cast<const uint4*>(p);
    w[0] = a.x;
    w[1] = a.y;
    w[2] = a.z;
    w[3] = a.w;
  } else if constexpr (Bytes == 8) {
    const uint2 a = *reinterpret_cast<const uint2*>(p);
    w[0] = a.x;
    w[1] = a.y;
  } else if constexpr (Bytes == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    w[0] = *reinterpret_cast<const uint16_t*>(p);
  }
}

//! The raw bytes of 8 consecutive elements of one token's row, plus the row's scale and zero-point
//! where the format has them: loading and converting are separate steps so that a thread can
//! issue the loads of several rows before it needs any of them.
template <DType D>
struct Raw8 {
  static constexpr int kBits = static_cast<int>(dtype_bits(D));
  static constexpr int kBytes = kElemsPerThread * kBits / 8;
  static constexpr int kWords = (kBytes + 3) / 4;
  uint32_t w[kWords];
  float scale;
  uint32_t zero;

  __device__ __forceinline__ void load(const PagedKvView& pool, const uint8_t* tile_codes,
                                       const float* tile_scales, const uint8_t* tile_zeros,
                                       uint32_t t, uint32_t d0) {
    load_bytes<kBytes>(tile_codes + t * pool.row_bytes + d0 * kBits / 8, w);
    if constexpr (D == DType::kFP8E4M3) {
      scale = tile_scales[t];
    } else if constexpr (is_integer_quantized(D)) {
      const uint64_t record = uint64_t{t} * pool.groups_per_row + d0 / pool.group_size;
      scale = tile_scales[record];
      zero = tile_zeros[record];
    }
  }

  //! True where decode_unscaled leaves a per-row factor for the caller to apply once per row.
  static constexpr bool kRowScaled = D == DType::kFP8E4M3 || is_integer_quantized(D);

  //! The 8 values divided by row_scale(), exactly, with as few instructions as the format allows:
  //! attention sums products of these and applies the factor once per row and lane, so its inner
  //! loops skip the per-element multiply (and, for the integer formats, the int-to-float
  //! conversion, which runs at a quarter of the FMA rate).
  //! - f32, f16, bf16: the values themselves (row_scale() is 1);
  //! - fp8 e4m3: value * 2^-8 as an f16 built from the code's bits (sign to bit 15, the rest to
  //!   bits 13..7), two codes per step;
  //! - int8/int4/int2: code - zero, from floats 2^23 + code and 2^23 + zero (exact integers).
  __device__ __forceinline__ void decode_unscaled(float (&out)[8]) const {
    if constexpr (D == DType::kF32) {
      for (int e = 0; e < 8; ++e)
        out[e] = __uint_as_float(w[e]);
    } else if constexpr (D == DType::kF16) {
      for (int e = 0; e < 8; ++e) {  // the hardware conversion is exact for every f16
        out[e] =
            __half2float(__ushort_as_half(static_cast<unsigned short>(w[e / 2] >> (16 * (e % 2)))));
      }
    } else if constexpr (D == DType::kBF16) {
      for (int e = 0; e < 8; ++e)
        out[e] = __uint_as_float((w[e / 2] >> (16 * (e % 2))) << 16);
    } else if constexpr (D == DType::kFP8E4M3) {
#pragma unroll
      for (int pair = 0; pair < 4; ++pair) {
        // Codes 2p and 2p+1 into the high bytes of two 16-bit halves, then sign kept and the
        // exponent and mantissa bits down by one: an f16x2 of the two values times 2^-8.
        const uint32_t lo = (pair % 2) * 2;
        const uint32_t x = __byte_perm(w[pair / 2], 0u, 0x0404u | (lo << 4) | ((lo + 1) << 12));
        const uint32_t h2 = (x & 0x80008000u) | ((x >> 1) & 0x3F803F80u);
        out[2 * pair] = __half2float(__ushort_as_half(static_cast<unsigned short>(h2 & 0xFFFFu)));
        out[2 * pair + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(h2 >> 16)));
      }
    } else {
      const float zero_plus_2p23 = __uint_as_float(0x4B000000u | zero);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        uint32_t magic;
        if constexpr (kBits == 8) {
          magic = __byte_perm(w[e / 4], 0x4B000000u, 0x7540u | (e % 4));
        } else {
          const uint32_t bit = e * kBits;
          magic = ((w[bit / 32] >> (bit % 32)) & ((1u << kBits) - 1u)) | 0x4B000000u;
        }
        out[e] = __uint_as_float(magic) - zero_plus_2p23;
      }
    }
  }

  //! The factor that turns decode_unscaled's values into the row's values; scale * 256 is exact.
  __device__ __forceinline__ float row_scale() const {
    if constexpr (D == DType::kFP8E4M3) {
      return scale * 256.0f;
    } else if constexpr (is_integer_quantized(D)) {
      return scale;
    } else {
      return 1.0f;
    }
  }

  //! The 8 values, dequantized exactly as quant::decode_row does: the unscaled values are exact,
  //! so one multiply by the row's factor rounds as the reference's scale * (code - zero) and
  //! scale * value do.
  __device__ __forceinline__ void decode(float (&out)[8]) const {
    decode_unscaled(out);
    if constexpr (kRowScaled) {
      const float factor = row_scale();
      for (int e = 0; e < 8; ++e)
        out[e] *= factor;
    }
  }
};

//! Dequantizes elements [d0, d0 + 8) of token `t` of a tile (d0 a multiple of 8).
template <DType D>
__device__ __forceinline__ void read8(const PagedKvView& pool, const uint8_t* tile_codes,
                                      const float* tile_scales, const uint8_t* tile_zeros,
                                      uint32_t t, uint32_t d0, float (&out)[8]) {
  Raw8<D> raw;
  raw.load(pool, tile_codes, tile_scales, tile_zeros, t, d0);
  raw.decode(out);
}

//! Loads 8 activation elements (f32, f16 or bf16) at element index `i`.
__device__ __forceinline__ void load_activation8(const void* src, DType dtype, uint64_t i,
                                                 float (&out)[8]) {
  if (dtype == DType::kF32) {
    const float4 a = reinterpret_cast<const float4*>(static_cast<const float*>(src) + i)[0];
    const float4 b = reinterpret_cast<const float4*>(static_cast<const float*>(src) + i)[1];
    out[0] = a.x;
    out[1] = a.y;
    out[2] = a.z;
    out[3] = a.w;
    out[4] = b.x;
    out[5] = b.y;
    out[6] = b.z;
    out[7] = b.w;
    return;
  }
  const uint4 h = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(src) + i);
  const uint32_t w[4] = {h.x, h.y, h.z, h.w};
  for (int e = 0; e < 8; ++e) {
    const auto bits = static_cast<uint16_t>(w[e / 2] >> (16 * (e % 2)));
    out[e] = dtype == DType::kF16 ? numeric::f16_to_f32(bits) : numeric::bf16_to_f32(bits);
  }
}

__device__ __forceinline__ void store_activation(void* dst, DType dtype, uint64_t i, float v) {
  if (dtype == DType::kF32) {
    static_cast<float*>(dst)[i] = v;
  } else if (dtype == DType::kF16) {
    static_cast<uint16_t*>(dst)[i] = numeric::f32_to_f16(v);
  } else {
    static_cast<uint16_t*>(dst)[i] = numeric::f32_to_bf16(v);
  }
}

}  // namespace kvfabric::kernels
