// The inner loops of the CPU kernels, one implementation per instruction set. Attention works on
// chunks of at most kMaxChunkRows tokens of one (layer, K|V, head) tile.
#pragma once

#include <cstdint>

#include "kvfabric/backend/paged_kv_view.h"

namespace kvfabric::cpu {

//! Token 0 of the rows being processed in one (layer, K|V, head) tile of a block.
struct TileRef {
  const uint8_t* codes;
  const float* scales;
  const uint8_t* zeros;
};

//! Rows the attention kernels hand to qk/pv at once; scratch buffers hold this many rows.
inline constexpr uint32_t kMaxChunkRows = 32;

struct SimdOps {
  const char* name;
  //! out[t][d] = token t's value at dimension d (t < n), dequantized.
  void (*decode_rows)(const PagedKvView& pool, const TileRef& tile, uint32_t n, float* out);
  //! out[r * out_stride + t] = dot(q[r], K[t]) for r < rows, t < n <= kMaxChunkRows; q is
  //! [rows][head_dim]; `scratch` holds kMaxChunkRows * head_dim floats.
  void (*qk)(const PagedKvView& pool, const TileRef& keys, uint32_t n, const float* q,
             uint32_t rows, float* out, uint32_t out_stride, float* scratch);
  //! acc[r][d] += sum over t < n of p[r * p_stride + t] * V[t][d].
  void (*pv)(const PagedKvView& pool, const TileRef& values, uint32_t n, const float* p,
             uint32_t p_stride, uint32_t rows, float* acc, float* scratch);
  //! x[i] = exp(x[i] - max) for i < n; returns the sum.
  float (*exp_sum)(float* x, uint32_t n, float max);
  //! Encodes one (token, head) row of head_dim activations (f32, f16 or bf16 at `src`, finite)
  //! into the pool's format: the same bytes as quant::encode_row.
  void (*encode_row)(const PagedKvView& pool, const void* src, DType src_dtype, uint8_t* codes,
                     float* scales, uint8_t* zeros);
};

const SimdOps& generic_simd_ops();
//! AVX2 + FMA + F16C versions, or nullptr when the build has none (non-x86 targets).
const SimdOps* avx2_simd_ops();

}  // namespace kvfabric::cpu
