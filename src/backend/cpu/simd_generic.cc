#include <cmath>

#include "backend/cpu/simd_ops.h"
#include "kvfabric/quant/quantize.h"

namespace kvfabric::cpu {
namespace {

void decode_rows(const PagedKvView& pool, const TileRef& tile, uint32_t n, float* out) {
  const quant::RowFormat format{pool.dtype, pool.head_dim, pool.group_size};
  for (uint32_t t = 0; t < n; ++t) {
    quant::decode_row(
        format, tile.codes + t * pool.row_bytes, tile.scales + uint64_t{t} * pool.groups_per_row,
        tile.zeros + uint64_t{t} * pool.groups_per_row, out + uint64_t{t} * pool.head_dim);
  }
}

void qk(const PagedKvView& pool, const TileRef& keys, uint32_t n, const float* q, uint32_t rows,
        float* out, uint32_t out_stride, float* scratch) {
  const uint32_t hd = pool.head_dim;
  decode_rows(pool, keys, n, scratch);
  for (uint32_t r = 0; r < rows; ++r) {
    const float* qr = q + uint64_t{r} * hd;
    for (uint32_t t = 0; t < n; ++t) {
      const float* kt = scratch + uint64_t{t} * hd;
      float sum = 0.0f;
      for (uint32_t d = 0; d < hd; ++d)
        sum += qr[d] * kt[d];
      out[uint64_t{r} * out_stride + t] = sum;
    }
  }
}

void pv(const PagedKvView& pool, const TileRef& values, uint32_t n, const float* p,
        uint32_t p_stride, uint32_t rows, float* acc, float* scratch) {
  const uint32_t hd = pool.head_dim;
  decode_rows(pool, values, n, scratch);
  for (uint32_t r = 0; r < rows; ++r) {
    float* ar = acc + uint64_t{r} * hd;
    for (uint32_t t = 0; t < n; ++t) {
      const float w = p[uint64_t{r} * p_stride + t];
      const float* vt = scratch + uint64_t{t} * hd;
      for (uint32_t d = 0; d < hd; ++d)
        ar[d] += w * vt[d];
    }
  }
}

float exp_sum(float* x, uint32_t n, float max) {
  float sum = 0.0f;
  for (uint32_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  return sum;
}

void encode_row(const PagedKvView& pool, const void* src, DType src_dtype, uint8_t* codes,
                float* scales, uint8_t* zeros) {
  float row[1024];  // head_dim <= 1024 (config limit)
  quant::load_activations(src, src_dtype, pool.head_dim, row);
  quant::encode_row({pool.dtype, pool.head_dim, pool.group_size}, row, codes, scales, zeros);
}

}  // namespace

const SimdOps& generic_simd_ops() {
  static const SimdOps ops{"generic", decode_rows, qk, pv, exp_sum, encode_row};
  return ops;
}

}  // namespace kvfabric::cpu
