#include <algorithm>
#include <cmath>

#include "backend/cpu/simd_ops.h"
#include "kvfabric/quant/numeric.h"
#include "kvfabric/quant/quantize.h"

namespace kvfabric::cpu {

void quantize_query(const PagedKvView& pool, uint32_t rows, int8_t* codes, float* scales,
                    float* group_sums, QueryRows& q) {
  const uint32_t hd = pool.head_dim, gpr = pool.groups_per_row;
  for (uint32_t r = 0; r < rows; ++r) {
    const float* x = q.f32 + uint64_t{r} * hd;
    float absmax = 0.0f;
    for (uint32_t d = 0; d < hd; ++d)
      absmax = std::max(absmax, std::fabs(x[d]));
    const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
    scales[r] = absmax / 127.0f;
    int8_t* c = codes + uint64_t{r} * hd;
    for (uint32_t d = 0; d < hd; ++d)  // |x * inv| <= 127 up to rounding: clamp anyway
      c[d] = static_cast<int8_t>(std::clamp(std::rint(x[d] * inv), -127.0f, 127.0f));
    for (uint32_t g = 0; g < gpr; ++g) {
      int32_t sum = 0;
      for (uint32_t i = g * pool.group_size; i < (g + 1) * pool.group_size; ++i)
        sum += c[i];
      group_sums[uint64_t{r} * gpr + g] = static_cast<float>(sum);
    }
  }
  q.codes = codes;
  q.scales = scales;
  q.group_sums = group_sums;
}

namespace {

void decode_rows(const PagedKvView& pool, const TileRef& tile, uint32_t n, float* out) {
  const quant::RowFormat format{pool.dtype, pool.head_dim, pool.group_size};
  for (uint32_t t = 0; t < n; ++t) {
    quant::decode_row(
        format, tile.codes + t * pool.row_bytes, tile.scales + uint64_t{t} * pool.groups_per_row,
        tile.zeros + uint64_t{t} * pool.groups_per_row, out + uint64_t{t} * pool.head_dim);
  }
}

// Integer formats against the quantized query: per group, scale * (q.c) + offset * sum(q), in the
// query's units, with offset = -(zero * scale).
void qk_integer(const PagedKvView& pool, const TileRef& keys, uint32_t n, const QueryRows& q,
                uint32_t rows, float* out, uint32_t out_stride) {
  const uint32_t hd = pool.head_dim, gs = pool.group_size, gpr = pool.groups_per_row;
  const uint32_t bits = dtype_bits(pool.dtype);
  uint8_t codes[1024];  // head_dim <= 1024 (config limit)
  for (uint32_t t = 0; t < n; ++t) {
    for (uint32_t d = 0; d < hd; ++d)
      codes[d] =
          static_cast<uint8_t>(numeric::unpack_code(keys.codes + t * pool.row_bytes, d, bits));
    const float* scales = keys.scales + uint64_t{t} * gpr;
    const uint8_t* zeros = keys.zeros + uint64_t{t} * gpr;
    for (uint32_t r = 0; r < rows; ++r) {
      const int8_t* qc = q.codes + uint64_t{r} * hd;
      float sum = 0.0f;
      for (uint32_t g = 0; g < gpr; ++g) {
        int32_t dot = 0;
        for (uint32_t i = g * gs; i < (g + 1) * gs; ++i)
          dot += int32_t{qc[i]} * codes[i];
        const float offset = -static_cast<float>(zeros[g]) * scales[g];
        sum += scales[g] * static_cast<float>(dot) + offset * q.group_sums[uint64_t{r} * gpr + g];
      }
      out[uint64_t{r} * out_stride + t] = q.scales[r] * sum;
    }
  }
}

void qk(const PagedKvView& pool, const TileRef& keys, uint32_t n, const QueryRows& q, uint32_t rows,
        float* out, uint32_t out_stride, float* scratch) {
  if (is_integer_quantized(pool.dtype)) {
    qk_integer(pool, keys, n, q, rows, out, out_stride);
    return;
  }
  const uint32_t hd = pool.head_dim;
  decode_rows(pool, keys, n, scratch);
  for (uint32_t r = 0; r < rows; ++r) {
    const float* qr = q.f32 + uint64_t{r} * hd;
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

void encode_rows(const PagedKvView& pool, const void* src, DType src_dtype, uint32_t heads,
                 uint8_t* codes, float* scales, uint8_t* zeros, bool /*stream*/) {
  float row[1024];  // head_dim <= 1024 (config limit)
  const size_t in_row_bytes = (src_dtype == DType::kF32 ? 4 : 2) * size_t{pool.head_dim};
  const uint64_t records = uint64_t{pool.block_size} * pool.groups_per_row;
  for (uint32_t h = 0; h < heads; ++h) {
    quant::load_activations(static_cast<const uint8_t*>(src) + h * in_row_bytes, src_dtype,
                            pool.head_dim, row);
    quant::encode_row({pool.dtype, pool.head_dim, pool.group_size}, row,
                      codes + h * pool.tile_bytes, scales + h * records, zeros + h * records);
  }
}

}  // namespace

const SimdOps& generic_simd_ops() {
  static const SimdOps ops{"generic", decode_rows, qk, pv, exp_sum, encode_rows};
  return ops;
}

}  // namespace kvfabric::cpu
