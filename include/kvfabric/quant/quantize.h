// Row-level conversion between f32 and the stored KV formats: the reference implementation the
// CPU backend uses and the CUDA kernels are tested against.
#pragma once

#include <cstdint>

#include "kvfabric/common/dtype.h"
#include "kvfabric/common/status.h"

namespace kvfabric::quant {

//! \brief Where one (token, head) row lives: `codes` holds head_dim packed elements; for fp8
//! `scales` holds 1 record, for int8/int4/int2 `scales` and `zeros` hold head_dim / group_size.
struct RowFormat {
  DType dtype = DType::kF32;
  uint32_t head_dim = 0;
  uint32_t group_size = 0;  //!< integer formats; ignored otherwise
};

//! Encodes `x` [head_dim] into the row. The input must be finite (see check_finite).
void encode_row(const RowFormat& format, const float* x, uint8_t* codes, float* scales,
                uint8_t* zeros);
//! Decodes a row into `out` [head_dim].
void decode_row(const RowFormat& format, const uint8_t* codes, const float* scales,
                const uint8_t* zeros, float* out);

//! Converts `n` activation elements (f32, f16 or bf16) to f32.
void load_activations(const void* src, DType dtype, uint64_t n, float* out);
//! Converts `n` f32 values to an activation dtype (f32, f16 or bf16), rounding to nearest even.
void store_activations(const float* src, DType dtype, uint64_t n, void* out);

//! Bits of the f32 magnitude from which a pool of `pool_dtype` cannot store a value: f16 rounds
//! 65520 and above to infinity, bf16 3.3961e38 (0x7F7F8000) and above; an integer group's range
//! (max - min) overflows from 2^127; f32 and fp8 (a scale per row) store any finite value, so
//! for them it is infinity's bits.
uint32_t unstorable_abs_bits(DType pool_dtype);
//! Index of the first element (f32, f16 or bf16) that is NaN, infinite, or whose magnitude's
//! f32 bits are at least `abs_bits` (unstorable_abs_bits), or -1 when there is none.
int64_t find_unstorable(const void* src, DType dtype, uint64_t n, uint32_t abs_bits);
//! Index of the first element that is NaN or infinite, or -1 when all `n` are finite.
int64_t find_non_finite(const void* src, DType dtype, uint64_t n);

}  // namespace kvfabric::quant
