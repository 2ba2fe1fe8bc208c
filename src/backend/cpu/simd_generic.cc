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

void dot_rows(const float* q, uint32_t rows, const float* k, uint32_t n, uint32_t hd, float* out,
              uint32_t out_stride) {
  for (uint32_t r = 0; r < rows; ++r) {
    const float* qr = q + uint64_t{r} * hd;
    for (uint32_t t = 0; t < n; ++t) {
      const float* kt = k + uint64_t{t} * hd;
      float sum = 0.0f;
      for (uint32_t d = 0; d < hd; ++d)
        sum += qr[d] * kt[d];
      out[uint64_t{r} * out_stride + t] = sum;
    }
  }
}

void accumulate(const float* p, uint32_t p_stride, uint32_t rows, const float* v, uint32_t n,
                uint32_t hd, float* acc) {
  for (uint32_t r = 0; r < rows; ++r) {
    float* ar = acc + uint64_t{r} * hd;
    for (uint32_t t = 0; t < n; ++t) {
      const float w = p[uint64_t{r} * p_stride + t];
      const float* vt = v + uint64_t{t} * hd;
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

}  // namespace

const SimdOps& generic_simd_ops() {
  static const SimdOps ops{"generic", decode_rows, dot_rows, accumulate, exp_sum};
  return ops;
}

}  // namespace kvfabric::cpu
