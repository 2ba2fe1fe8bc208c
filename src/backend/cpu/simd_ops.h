// The inner loops of the CPU kernels, one implementation per instruction set. The kernels decode a
// block's [block_size][head_dim] tile to f32 and then only do float math on L1-resident buffers.
#pragma once

#include <cstdint>

#include "kvfabric/backend/paged_kv_view.h"

namespace kvfabric::cpu {

//! Token 0 of one (layer, K|V, head) tile of a block.
struct TileRef {
  const uint8_t* codes;
  const float* scales;
  const uint8_t* zeros;
};

struct SimdOps {
  const char* name;
  //! out[t][d] = value of token t (t < n), dimension d of the tile, dequantized.
  void (*decode_rows)(const PagedKvView& pool, const TileRef& tile, uint32_t n, float* out);
  //! out[r * out_stride + t] = dot(q[r], k[t]) for r < rows, t < n; q is [rows][hd], k [n][hd].
  void (*dot_rows)(const float* q, uint32_t rows, const float* k, uint32_t n, uint32_t hd,
                   float* out, uint32_t out_stride);
  //! acc[r][d] += sum over t < n of p[r * p_stride + t] * v[t][d].
  void (*accumulate)(const float* p, uint32_t p_stride, uint32_t rows, const float* v, uint32_t n,
                     uint32_t hd, float* acc);
  //! x[i] = exp(x[i] - max) for i < n; returns the sum.
  float (*exp_sum)(float* x, uint32_t n, float max);
};

const SimdOps& generic_simd_ops();
//! AVX2 + FMA + F16C versions, or nullptr when the build has none (non-x86 targets).
const SimdOps* avx2_simd_ops();

}  // namespace kvfabric::cpu
