// Compiled with -mavx2 -mfma -mf16c; used only when the processor reports all three.
// Everything except the table getter has internal linkage, so none of this code can be picked
// by the linker for the generic translation units.
#include "backend/cpu/simd_ops.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include <cstring>

#include "kvfabric/quant/quantize.h"

namespace kvfabric::cpu {
namespace {

float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  lo = _mm_add_ps(lo, _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// 8 codes of one dtype -> 8 floats (before the row or group scale).
__m256 load_f16(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__m256 load_bf16(const uint8_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
// e4m3 bits shifted into an f16 (sign to bit 15, exponent and mantissa to bits 13..7) are the
// same number times 2^-8, subnormals included; the caller folds the 2^8 into the scale.
__m256 load_fp8_times_2_pow_minus_8(const uint8_t* p) {
  uint64_t raw;
  std::memcpy(&raw, p, 8);
  const __m128i bytes = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(static_cast<long long>(raw)));
  const __m128i sign = _mm_slli_epi16(_mm_and_si128(bytes, _mm_set1_epi16(0x80)), 8);
  const __m128i magnitude = _mm_slli_epi16(_mm_and_si128(bytes, _mm_set1_epi16(0x7F)), 7);
  return _mm256_cvtph_ps(_mm_or_si128(sign, magnitude));
}
__m256 load_u8(const uint8_t* p) {
  uint64_t raw;
  std::memcpy(&raw, p, 8);
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(raw))));
}

void decode_rows(const PagedKvView& pool, const TileRef& tile, uint32_t n, float* out) {
  const uint32_t hd = pool.head_dim;
  const bool vector_width_ok =
      hd % 8 == 0 && (pool.dtype != DType::kInt8 || pool.group_size % 8 == 0);
  const bool vectorized =
      vector_width_ok && (pool.dtype == DType::kF16 || pool.dtype == DType::kBF16 ||
                          pool.dtype == DType::kFP8E4M3 || pool.dtype == DType::kInt8);
  if (!vectorized) {
    const quant::RowFormat format{pool.dtype, pool.head_dim, pool.group_size};
    for (uint32_t t = 0; t < n; ++t) {
      quant::decode_row(format, tile.codes + t * pool.row_bytes,
                        tile.scales + uint64_t{t} * pool.groups_per_row,
                        tile.zeros + uint64_t{t} * pool.groups_per_row, out + uint64_t{t} * hd);
    }
    return;
  }
  for (uint32_t t = 0; t < n; ++t) {
    const uint8_t* row = tile.codes + t * pool.row_bytes;
    float* dst = out + uint64_t{t} * hd;
    switch (pool.dtype) {
      case DType::kF16:
        for (uint32_t d = 0; d < hd; d += 8)
          _mm256_storeu_ps(dst + d, load_f16(row + 2 * d));
        break;
      case DType::kBF16:
        for (uint32_t d = 0; d < hd; d += 8)
          _mm256_storeu_ps(dst + d, load_bf16(row + 2 * d));
        break;
      case DType::kFP8E4M3: {
        const __m256 scale = _mm256_set1_ps(tile.scales[t] * 256.0f);
        for (uint32_t d = 0; d < hd; d += 8) {
          _mm256_storeu_ps(dst + d, _mm256_mul_ps(scale, load_fp8_times_2_pow_minus_8(row + d)));
        }
        break;
      }
      default: {  // int8: scale * (code - zero), per group
        const float* scales = tile.scales + uint64_t{t} * pool.groups_per_row;
        const uint8_t* zeros = tile.zeros + uint64_t{t} * pool.groups_per_row;
        for (uint32_t g = 0; g < pool.groups_per_row; ++g) {
          const __m256 scale = _mm256_set1_ps(scales[g]);
          const __m256 zero = _mm256_set1_ps(static_cast<float>(zeros[g]));
          for (uint32_t d = g * pool.group_size; d < (g + 1) * pool.group_size; d += 8) {
            _mm256_storeu_ps(dst + d, _mm256_mul_ps(scale, _mm256_sub_ps(load_u8(row + d), zero)));
          }
        }
        break;
      }
    }
  }
}

float dot(const float* a, const float* b, uint32_t hd) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  uint32_t d = 0;
  for (; d + 16 <= hd; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  for (; d + 8 <= hd; d += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; d < hd; ++d)
    sum += a[d] * b[d];
  return sum;
}

void dot_rows(const float* q, uint32_t rows, const float* k, uint32_t n, uint32_t hd, float* out,
              uint32_t out_stride) {
  for (uint32_t t = 0; t < n; ++t) {
    const float* kt = k + uint64_t{t} * hd;
    for (uint32_t r = 0; r < rows; ++r)
      out[uint64_t{r} * out_stride + t] = dot(q + uint64_t{r} * hd, kt, hd);
  }
}

void accumulate(const float* p, uint32_t p_stride, uint32_t rows, const float* v, uint32_t n,
                uint32_t hd, float* acc) {
  for (uint32_t r = 0; r < rows; ++r) {
    float* ar = acc + uint64_t{r} * hd;
    const float* pr = p + uint64_t{r} * p_stride;
    uint32_t d = 0;
    // Keep 32 outputs in registers while streaming over the tokens.
    for (; d + 32 <= hd; d += 32) {
      __m256 a0 = _mm256_loadu_ps(ar + d), a1 = _mm256_loadu_ps(ar + d + 8);
      __m256 a2 = _mm256_loadu_ps(ar + d + 16), a3 = _mm256_loadu_ps(ar + d + 24);
      for (uint32_t t = 0; t < n; ++t) {
        const __m256 w = _mm256_set1_ps(pr[t]);
        const float* vt = v + uint64_t{t} * hd + d;
        a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt), a0);
        a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8), a1);
        a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 16), a2);
        a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 24), a3);
      }
      _mm256_storeu_ps(ar + d, a0);
      _mm256_storeu_ps(ar + d + 8, a1);
      _mm256_storeu_ps(ar + d + 16, a2);
      _mm256_storeu_ps(ar + d + 24, a3);
    }
    for (; d < hd; ++d) {
      float a = ar[d];
      for (uint32_t t = 0; t < n; ++t)
        a += pr[t] * v[uint64_t{t} * hd + d];
      ar[d] = a;
    }
  }
}

// exp(x) for x <= 0: 2^n * e^r with |r| <= ln2/2 and a degree-6 Taylor polynomial
// (relative error < 2e-7); inputs below -87 flush to 2^-126 scale, which underflows the sum.
__m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2, split in two
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i pow2 =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
}

float exp_sum(float* x, uint32_t n, float max) {
  const __m256 m = _mm256_set1_ps(max);
  __m256 acc = _mm256_setzero_ps();
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  if (i < n) {  // tail through a zero-padded vector, same polynomial
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (uint32_t j = i; j < n; ++j)
      tail[j - i] = x[j] - max;
    alignas(32) float e[8];
    _mm256_store_ps(e, exp_nonpositive(_mm256_load_ps(tail)));
    for (uint32_t j = i; j < n; ++j) {
      x[j] = e[j - i];
      sum += e[j - i];
    }
  }
  return sum;
}

}  // namespace

const SimdOps* avx2_simd_ops() {
  static const SimdOps ops{"avx2", decode_rows, dot_rows, accumulate, exp_sum};
  return &ops;
}

}  // namespace kvfabric::cpu

#else  // not compiled for x86-64 with AVX2: only the generic kernels exist

namespace kvfabric::cpu {
const SimdOps* avx2_simd_ops() {
  return nullptr;
}
}  // namespace kvfabric::cpu

#endif
