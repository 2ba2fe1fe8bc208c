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

//! Query rows as qk reads them. Float formats read `f32`. Integer formats read the query quantized
//! once per call (quantize_query): row r is scales[r] * codes[r][*], codes symmetric in
//! [-127, 127], so each element moves by at most max|q[r]| / 254 (half a step); qk then computes
//! q.(s*c + o) = s*(q.c) + o*sum(q) per group, the per-element work in integers.
struct QueryRows {
  const float* f32;         //!< [rows][head_dim], times the softmax scale
  const int8_t* codes;      //!< [rows][head_dim] (integer formats)
  const float* scales;      //!< [rows]
  const float* group_sums;  //!< [rows][groups_per_row]: sum of the codes of each group (exact)
  uint32_t head_dim, groups_per_row;

  //! The rows from `row` on.
  QueryRows from(uint32_t row) const {
    return {f32 + uint64_t{row} * head_dim,
            codes == nullptr ? nullptr : codes + uint64_t{row} * head_dim,
            scales == nullptr ? nullptr : scales + row,
            group_sums == nullptr ? nullptr : group_sums + uint64_t{row} * groups_per_row,
            head_dim,
            groups_per_row};
  }
};

//! Fills the integer fields of `q` (whose f32 rows are set) for a pool of an integer format:
//! per row, scale = max|q| / 127 and codes = rint(q / scale). The buffers hold rows * head_dim
//! codes, rows scales and rows * groups_per_row sums.
void quantize_query(const PagedKvView& pool, uint32_t rows, int8_t* codes, float* scales,
                    float* group_sums, QueryRows& q);

struct SimdOps {
  const char* name;
  //! out[t][d] = token t's value at dimension d (t < n), dequantized.
  void (*decode_rows)(const PagedKvView& pool, const TileRef& tile, uint32_t n, float* out);
  //! out[r * out_stride + t] = dot(q[r], K[t]) for r < rows, t < n <= kMaxChunkRows, with the
  //! quantized query for integer formats; `scratch` holds kMaxChunkRows * head_dim floats.
  void (*qk)(const PagedKvView& pool, const TileRef& keys, uint32_t n, const QueryRows& q,
             uint32_t rows, float* out, uint32_t out_stride, float* scratch);
  //! acc[r][d] += sum over t < n of p[r * p_stride + t] * V[t][d].
  void (*pv)(const PagedKvView& pool, const TileRef& values, uint32_t n, const float* p,
             uint32_t p_stride, uint32_t rows, float* acc, float* scratch);
  //! x[i] = exp(x[i] - max) for i < n; returns the sum.
  float (*exp_sum)(float* x, uint32_t n, float max);
  //! Encodes one token's `heads` consecutive (token, head) rows of head_dim activations (f32,
  //! f16 or bf16 at `src`, finite) into the pool's format: head h's codes at codes + h *
  //! tile_bytes, its scale and zero records at scales / zeros + h * block_size * groups_per_row
  //! (the same token's row in the next head's tile); per row the same bytes as quant::encode_row.
  //! `stream`: the call writes far more than the caches hold, so codes may be written with
  //! non-temporal stores; the caller then fences (store_fence) before anyone reads them.
  void (*encode_rows)(const PagedKvView& pool, const void* src, DType src_dtype, uint32_t heads,
                      uint8_t* codes, float* scales, uint8_t* zeros, bool stream);
};

const SimdOps& generic_simd_ops();
//! AVX2 + FMA + F16C versions, or nullptr when the build has none (non-x86 targets).
const SimdOps* avx2_simd_ops();
//! The AVX2 versions with the integer formats' qk on the 256-bit VNNI dot product (AVX512-VNNI
//! + AVX512VL), or nullptr when the build has none.
const SimdOps* avx2_vnni_simd_ops();

}  // namespace kvfabric::cpu
