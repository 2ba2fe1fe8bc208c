// Compiled with -mavx2 -mfma -mf16c; used only when the processor reports all three.
// Everything except the table getter has internal linkage, so none of this code can be picked
// by the linker for the generic translation units.
//
// Attention reads each K or V row once and uses it for every query head of the GQA group before
// the next row is read. With 4 query heads per KV head that is 4 multiply-adds per element of K
// and of V, so on few cores the kernels are bound by arithmetic, not memory: the float formats
// convert to f32 in registers and keep dequantization a small share of the FMAs; the integer
// formats' qk works in integers against a quantized query (simd_int_x86.h).
#include "backend/cpu/simd_ops.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "backend/cpu/simd_int_x86.h"
#include "kvfabric/quant/kv_format.h"
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
  // Sign-extended to 16 bits and shifted left by 7, a byte's sign lands in bits 15 and 14 and the
  // rest in 13..7: clearing bit 14 leaves the f16.
  const __m128i shifted =
      _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_cvtsi64_si128(static_cast<long long>(raw))), 7);
  return _mm256_cvtph_ps(_mm_and_si128(shifted, _mm_set1_epi16(static_cast<short>(0xBFFF))));
}
// 8 codes of `bits` bits (8, 4 or 2) starting at element `d` of a packed row.
__m256 load_codes(const uint8_t* row, uint32_t d, uint32_t bits) {
  if (bits == 8) {
    uint64_t raw;
    std::memcpy(&raw, row + d, 8);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(raw))));
  }
  uint32_t raw = 0;
  std::memcpy(&raw, row + d * bits / 8, bits);  // 8 codes take `bits` bytes
  const __m256i shifts = bits == 4 ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
                                   : _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i codes =
      _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(raw)), shifts),
                       _mm256_set1_epi32((1 << bits) - 1));
  return _mm256_cvtepi32_ps(codes);
}

// Elements [d, d + 8) of one token's row as stored: values of the float formats, fp8 values times
// 2^-8, integer codes. Scale and zero-point are the caller's.
template <DType D>
__m256 load_stored8(const uint8_t* row, uint32_t d) {
  if constexpr (D == DType::kF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + d);
  } else if constexpr (D == DType::kF16) {
    return load_f16(row + 2 * d);
  } else if constexpr (D == DType::kBF16) {
    return load_bf16(row + 2 * d);
  } else if constexpr (D == DType::kFP8E4M3) {
    return load_fp8_times_2_pow_minus_8(row + d);
  } else {
    return load_codes(row, d, dtype_bits(D));
  }
}

// Reads 8 dequantized elements at a time from one token's row of a tile (gather). The arithmetic
// matches quant::decode_row exactly (scale * code, scale * (code - zero)).
template <DType D>
struct RowReader {
  const uint8_t* row;
  const float* scales;
  const uint8_t* zeros;
  uint32_t group_shift;  // log2(group_size): the fast path takes power-of-two groups only

  RowReader(const PagedKvView& pool, const TileRef& tile, uint32_t t)
      : row(tile.codes + t * pool.row_bytes),
        scales(tile.scales + uint64_t{t} * pool.groups_per_row),
        zeros(tile.zeros + uint64_t{t} * pool.groups_per_row),
        group_shift(static_cast<uint32_t>(__builtin_ctz(pool.group_size))) {}

  __m256 load(uint32_t d) const {
    const __m256 stored = load_stored8<D>(row, d);
    if constexpr (D == DType::kFP8E4M3) {
      return _mm256_mul_ps(_mm256_set1_ps(scales[0] * 256.0f), stored);
    } else if constexpr (is_integer_quantized(D)) {
      const uint32_t g = d >> group_shift;
      return _mm256_mul_ps(_mm256_set1_ps(scales[g]),
                           _mm256_sub_ps(stored, _mm256_set1_ps(static_cast<float>(zeros[g]))));
    } else {
      return stored;
    }
  }
};

// 16 e4m3 codes as values times 2^-8, as load_fp8_times_2_pow_minus_8 but with one widening and
// one mask for both halves.
void load_fp8x16_times_2_pow_minus_8(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m256i shifted = _mm256_slli_epi16(
      _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 7);
  const __m256i f16 = _mm256_and_si256(shifted, _mm256_set1_epi16(static_cast<short>(0xBFFF)));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(f16));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(f16, 1));
}

// How qk and pv read one chunk of a tile of a float format (f32, f16, bf16, fp8), 16 elements at
// a time. fp8's per-row scale multiplies the dot product (qk) or the softmax weight (pv) instead
// of every element: one rounding more than quant::decode_row's exact form, far below the format's
// own error; gather (decode_rows) keeps the exact form.
template <DType D>
struct ChunkReader {
  static_assert(!is_integer_quantized(D), "integer formats take qk_int and pv_int_rows");
  const uint8_t* codes;
  uint64_t row_bytes;
  const float* scales;  // fp8: the tile's, from the chunk's first token

  ChunkReader(const PagedKvView& pool, const TileRef& tile)
      : codes(tile.codes), row_bytes(pool.row_bytes), scales(tile.scales) {}

  //! Elements [d, d + 16) of token t, without fp8's row scale.
  void load16(uint32_t t, uint32_t d, __m256& lo, __m256& hi) const {
    const uint8_t* row = codes + t * row_bytes;
    if constexpr (D == DType::kFP8E4M3) {
      load_fp8x16_times_2_pow_minus_8(row + d, lo, hi);
    } else {
      lo = load_stored8<D>(row, d);
      hi = load_stored8<D>(row, d + 8);
    }
  }

  //! The factor token t's loaded values still need: fp8's row scale (times the 2^8 that
  //! the fp8 loads leave out), 1 for the other formats.
  float row_scale(uint32_t t) const {
    if constexpr (D == DType::kFP8E4M3) {
      return scales[t] * 256.0f;
    } else {
      return 1.0f;
    }
  }
};

// R query rows against each key row: out[r][t] = dot(q[r], K[t]). Two accumulators per row keep
// 2R FMA chains in flight (an FMA's latency is several times its issue interval).
template <DType D, uint32_t R>
void qk_rows(const PagedKvView& pool, const ChunkReader<D>& keys, uint32_t n, const float* q,
             float* out, uint32_t out_stride) {
  const uint32_t hd = pool.head_dim;
  for (uint32_t t = 0; t < n; ++t) {
    __m256 acc[R][2];
    for (uint32_t j = 0; j < R; ++j)
      acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (uint32_t d = 0; d < hd; d += 16) {
      __m256 k0, k1;
      keys.load16(t, d, k0, k1);
      for (uint32_t j = 0; j < R; ++j) {
        const float* qj = q + uint64_t{j} * hd + d;
        acc[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(qj), k0, acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(_mm256_loadu_ps(qj + 8), k1, acc[j][1]);
      }
    }
    const float row_scale = keys.row_scale(t);
    for (uint32_t j = 0; j < R; ++j)
      out[uint64_t{j} * out_stride + t] = hsum(_mm256_add_ps(acc[j][0], acc[j][1])) * row_scale;
  }
}

// pv_accumulate16 over a float format's values. fp8 moves each token's row scale into its
// weights first (`weights` holds R * n floats).
template <DType D, uint32_t R>
void pv_rows(const PagedKvView& pool, const ChunkReader<D>& values, uint32_t n, const float* p,
             uint32_t p_stride, float* acc, float* weights) {
  const uint32_t hd = pool.head_dim;
  if constexpr (D == DType::kFP8E4M3) {
    for (uint32_t j = 0; j < R; ++j) {
      for (uint32_t t = 0; t < n; ++t)
        weights[j * n + t] = p[uint64_t{j} * p_stride + t] * values.row_scale(t);
    }
    p = weights;
    p_stride = n;
  }
  pv_accumulate16<R>(hd, n, p, p_stride, acc, [&](uint32_t d) {
    return [&values, d](uint32_t t, __m256& v0, __m256& v1) { values.load16(t, d, v0, v1); };
  });
}

// Splits `rows` into passes of 4/2/1 rows with register accumulators. pv's `scratch`
// (kMaxChunkRows * head_dim floats) holds fp8's weights.
template <DType D>
void qk_typed(const PagedKvView& pool, const TileRef& tile, uint32_t n, const float* q,
              uint32_t rows, float* out, uint32_t out_stride) {
  const ChunkReader<D> keys(pool, tile);
  const uint32_t hd = pool.head_dim;
  uint32_t r = 0;
  for (; r + 4 <= rows; r += 4)
    qk_rows<D, 4>(pool, keys, n, q + uint64_t{r} * hd, out + uint64_t{r} * out_stride, out_stride);
  for (; r + 2 <= rows; r += 2)
    qk_rows<D, 2>(pool, keys, n, q + uint64_t{r} * hd, out + uint64_t{r} * out_stride, out_stride);
  for (; r < rows; ++r)
    qk_rows<D, 1>(pool, keys, n, q + uint64_t{r} * hd, out + uint64_t{r} * out_stride, out_stride);
}

template <DType D>
void pv_typed(const PagedKvView& pool, const TileRef& tile, uint32_t n, const float* p,
              uint32_t p_stride, uint32_t rows, float* acc, float* scratch) {
  const ChunkReader<D> values(pool, tile);
  const uint32_t hd = pool.head_dim;
  uint32_t r = 0;
  for (; r + 4 <= rows; r += 4)
    pv_rows<D, 4>(pool, values, n, p + uint64_t{r} * p_stride, p_stride, acc + uint64_t{r} * hd,
                  scratch);
  for (; r + 2 <= rows; r += 2)
    pv_rows<D, 2>(pool, values, n, p + uint64_t{r} * p_stride, p_stride, acc + uint64_t{r} * hd,
                  scratch);
  for (; r < rows; ++r)
    pv_rows<D, 1>(pool, values, n, p + uint64_t{r} * p_stride, p_stride, acc + uint64_t{r} * hd,
                  scratch);
}

// The register paths need head_dim in whole 16-element steps and integer groups of a power of
// two >= 8 (others take the generic path).
bool fast_path(const PagedKvView& pool) {
  const uint32_t g = pool.group_size;
  return pool.head_dim % 16 == 0 &&
         (!is_integer_quantized(pool.dtype) || (g >= 8 && (g & (g - 1)) == 0));
}

// qk and pv: the integer kernels need whole 32-element units (int_kernels_fit).
bool attention_fast_path(const PagedKvView& pool) {
  return is_integer_quantized(pool.dtype) ? int_kernels_fit(pool) : fast_path(pool);
}

void decode_rows(const PagedKvView& pool, const TileRef& tile, uint32_t n, float* out) {
  const uint32_t hd = pool.head_dim;
  if (!fast_path(pool)) {
    generic_simd_ops().decode_rows(pool, tile, n, out);
    return;
  }
  auto run = [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    for (uint32_t t = 0; t < n; ++t) {
      const RowReader<D> row(pool, tile, t);
      for (uint32_t d = 0; d < hd; d += 8)
        _mm256_storeu_ps(out + uint64_t{t} * hd + d, row.load(d));
    }
  };
  switch (pool.dtype) {
    case DType::kF32:
      run(std::integral_constant<DType, DType::kF32>{});
      break;
    case DType::kF16:
      run(std::integral_constant<DType, DType::kF16>{});
      break;
    case DType::kBF16:
      run(std::integral_constant<DType, DType::kBF16>{});
      break;
    case DType::kFP8E4M3:
      run(std::integral_constant<DType, DType::kFP8E4M3>{});
      break;
    case DType::kInt8:
      run(std::integral_constant<DType, DType::kInt8>{});
      break;
    case DType::kInt4:
      run(std::integral_constant<DType, DType::kInt4>{});
      break;
    case DType::kInt2:
      run(std::integral_constant<DType, DType::kInt2>{});
      break;
  }
}

void qk(const PagedKvView& pool, const TileRef& keys, uint32_t n, const QueryRows& q, uint32_t rows,
        float* out, uint32_t out_stride, float* scratch) {
  if (!attention_fast_path(pool)) {
    generic_simd_ops().qk(pool, keys, n, q, rows, out, out_stride, scratch);
    return;
  }
  switch (pool.dtype) {
    case DType::kF32:
      qk_typed<DType::kF32>(pool, keys, n, q.f32, rows, out, out_stride);
      break;
    case DType::kF16:
      qk_typed<DType::kF16>(pool, keys, n, q.f32, rows, out, out_stride);
      break;
    case DType::kBF16:
      qk_typed<DType::kBF16>(pool, keys, n, q.f32, rows, out, out_stride);
      break;
    case DType::kFP8E4M3:
      qk_typed<DType::kFP8E4M3>(pool, keys, n, q.f32, rows, out, out_stride);
      break;
    case DType::kInt8:
      qk_int<8, Avx2ByteCodeDot>(pool, keys, n, q, rows, out, out_stride, scratch);
      break;
    case DType::kInt4:
      qk_int<4, Avx2SmallCodeDot>(pool, keys, n, q, rows, out, out_stride, scratch);
      break;
    case DType::kInt2:
      qk_int<2, Avx2SmallCodeDot>(pool, keys, n, q, rows, out, out_stride, scratch);
      break;
  }
}

void pv(const PagedKvView& pool, const TileRef& values, uint32_t n, const float* p,
        uint32_t p_stride, uint32_t rows, float* acc, float* scratch) {
  if (!attention_fast_path(pool)) {
    generic_simd_ops().pv(pool, values, n, p, p_stride, rows, acc, scratch);
    return;
  }
  switch (pool.dtype) {
    case DType::kF32:
      pv_typed<DType::kF32>(pool, values, n, p, p_stride, rows, acc, scratch);
      break;
    case DType::kF16:
      pv_typed<DType::kF16>(pool, values, n, p, p_stride, rows, acc, scratch);
      break;
    case DType::kBF16:
      pv_typed<DType::kBF16>(pool, values, n, p, p_stride, rows, acc, scratch);
      break;
    case DType::kFP8E4M3:
      pv_typed<DType::kFP8E4M3>(pool, values, n, p, p_stride, rows, acc, scratch);
      break;
    case DType::kInt8:
      pv_int<8>(pool, values, n, p, p_stride, rows, acc, scratch);
      break;
    case DType::kInt4:
      pv_int<4>(pool, values, n, p, p_stride, rows, acc, scratch);
      break;
    case DType::kInt2:
      pv_int<2>(pool, values, n, p, p_stride, rows, acc, scratch);
      break;
  }
}

// exp(x) for x <= 0: 2^n * e^r with |r| <= ln2/2 and a degree-6 Taylor polynomial
// (relative error < 2e-7); inputs below -87 are clamped (their weight underflows anyway).
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
  if (i < n) {  // the tail through a zero-padded vector, same polynomial
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

// ---- Encoding (append_kv): the same arithmetic as quant::encode_row, 8 elements at a time.

__m256 load_activation8(const uint8_t* src, DType dtype, uint32_t d) {
  switch (dtype) {
    case DType::kF16:
      return load_f16(src + 2 * d);
    case DType::kBF16:
      return load_bf16(src + 2 * d);
    default:
      return _mm256_loadu_ps(reinterpret_cast<const float*>(src) + d);
  }
}

// A row of hd activations as f32, the source format chosen once per row rather than per vector.
void load_row(const uint8_t* src, DType dtype, uint32_t hd, float* row) {
  switch (dtype) {
    case DType::kF16:
      for (uint32_t d = 0; d < hd; d += 8)
        _mm256_storeu_ps(row + d, load_f16(src + 2 * d));
      return;
    case DType::kBF16:
      for (uint32_t d = 0; d < hd; d += 8)
        _mm256_storeu_ps(row + d, load_bf16(src + 2 * d));
      return;
    default:
      std::memcpy(row, src, sizeof(float) * hd);
      return;
  }
}

float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_min_ss(m, _mm_movehdup_ps(m)));
}
uint32_t hor(__m256i v) {
  __m128i m = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_or_si128(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_or_si128(m, _mm_shuffle_epi32(m, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// Writes the low byte of each of 8 int32 lanes to out[0..7].
void store_bytes8(__m256i v, uint8_t* out) {
  const __m256i pick =
      _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1,
                       -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, pick),
                                                     _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
  const uint64_t bytes = static_cast<uint64_t>(_mm256_extract_epi64(packed, 0));
  std::memcpy(out, &bytes, 8);
}

// Stores 32 codes of `bits` bits given one a byte (in order), packed as quant::encode_row packs
// them: lowest bits first.
void store_codes32(__m256i bytes, uint32_t bits, uint8_t* out) {
  if (bits == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bytes);
    return;
  }
  __m256i packed;
  if (bits == 4) {  // each 16-bit lane's two codes into its low byte
    packed = _mm256_and_si256(_mm256_or_si256(bytes, _mm256_srli_epi16(bytes, 4)),
                              _mm256_set1_epi16(0x00FF));
    packed = _mm256_packus_epi16(packed, packed);
  } else {  // each 32-bit lane's four codes into its low byte
    packed = _mm256_or_si256(
        _mm256_or_si256(bytes, _mm256_srli_epi32(bytes, 6)),
        _mm256_or_si256(_mm256_srli_epi32(bytes, 12), _mm256_srli_epi32(bytes, 18)));
    packed = _mm256_and_si256(packed, _mm256_set1_epi32(0xFF));
    packed = _mm256_packus_epi32(packed, packed);
    packed = _mm256_packus_epi16(packed, packed);
  }
  // the low 8 (4) bytes of each 128-bit lane, in order
  const __m128i out16 = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  if (bits == 4) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), out16);
  } else {
    const uint64_t raw = static_cast<uint64_t>(
        _mm_cvtsi128_si64(_mm_unpacklo_epi32(out16, _mm_srli_si128(out16, 8))));
    std::memcpy(out, &raw, 8);
  }
}

// store_codes32 with non-temporal stores (8- and 4-bit codes; `out` aligned to 32 / 16 bytes).
template <uint32_t Bits>
void stream_codes32(__m256i bytes, uint8_t* out) {
  static_assert(Bits == 8 || Bits == 4);
  if constexpr (Bits == 8) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(out), bytes);
  } else {
    __m256i packed = _mm256_and_si256(_mm256_or_si256(bytes, _mm256_srli_epi16(bytes, 4)),
                                      _mm256_set1_epi16(0x00FF));
    packed = _mm256_packus_epi16(packed, packed);
    _mm_stream_si128(reinterpret_cast<__m128i*>(out),
                     _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
  }
}

// f32 -> e4m3 codes for 8 lanes, as numeric::f32_to_fp8_e4m3 (RNE, saturating to 448).
__m256i f32_to_e4m3_8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80));
  const __m256i abs = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i rounded =
      _mm256_add_epi32(_mm256_add_epi32(abs, _mm256_set1_epi32(0x7FFFF)),
                       _mm256_and_si256(_mm256_srli_epi32(abs, 20), _mm256_set1_epi32(1)));
  __m256i normal = _mm256_or_si256(
      _mm256_slli_epi32(_mm256_sub_epi32(_mm256_srli_epi32(rounded, 23), _mm256_set1_epi32(120)),
                        3),
      _mm256_and_si256(_mm256_srli_epi32(rounded, 20), _mm256_set1_epi32(7)));
  normal = _mm256_min_epi32(normal, _mm256_set1_epi32(0x7E));
  // Subnormals: units of 2^-9, rounded to nearest even (the default MXCSR mode).
  const __m256i subnormal =
      _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(abs), _mm256_set1_ps(512.0f)));
  const __m256i is_subnormal = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3C800000), abs);
  const __m256i saturated = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x43DFFFFF));
  __m256i code = _mm256_blendv_epi8(normal, subnormal, is_subnormal);
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7E), saturated);
  return _mm256_or_si256(code, sign);
}

// ---- Integer formats, eight groups at a time (append_kv's main cost). Per group the scalar
// encoder reduces min and max horizontally and then divides twice; here the minima (maxima) of
// eight groups are reduced together by transposing sums (lane j of the result is group j's), and
// int_group_params runs on the eight lanes with the same IEEE operations (two vector divisions,
// round to nearest even), so every scale, zero and code is bit for bit the scalar one.

template <DType In>
__m256 load_input8(const uint8_t* src, uint64_t i) {  // elements [i, i + 8)
  if constexpr (In == DType::kF16) {
    return load_f16(src + 2 * i);
  } else if constexpr (In == DType::kBF16) {
    return load_bf16(src + 2 * i);
  } else {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(src) + i);
  }
}

// Lane j of the result: op over the 8 lanes of v[j].
template <class Op>
__m256 transpose_reduce8(const __m256* v, Op op) {
  // (a0 a1 a2 a3 | a4 a5 a6 a7), (b...) -> (a01 a23 b01 b23 | a45 a67 b45 b67)
  auto pair = [&](__m256 a, __m256 b) {
    return op(_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xDD));
  };
  const __m256 lo = pair(pair(v[0], v[1]), pair(v[2], v[3]));  // (v0..v3 low | v0..v3 high)
  const __m256 hi = pair(pair(v[4], v[5]), pair(v[6], v[7]));
  return op(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

constexpr int qmax_of(uint32_t bits) {
  return static_cast<int>((1u << bits) - 1u);
}

// Group parameters of eight groups from their minima and maxima (lane j: group j), as
// quant::int_group_params computes them. Stores each group's scale, zero point, 1 / scale (0 for
// a constant group) and the offset its codes add to rint(x / scale) (the zero point, or the
// constant code). A 1 / scale that overflows (ranges below ~2^-120, which only f32 and bf16
// inputs reach) is the largest finite float, as there.
template <uint32_t Bits>
void group_params8(__m256 min_x, __m256 max_x, float* scale_out, float* inv_out, uint8_t* zero_out,
                   int16_t* offset_out) {
  constexpr uint32_t qmax = (1u << Bits) - 1u;
  const __m256 zero_f = _mm256_setzero_ps();
  const __m256 qmax_f = _mm256_set1_ps(static_cast<float>(qmax));
  const __m256 sign = _mm256_set1_ps(-0.0f);
  // min_ps(a, b) is a < b ? a : b and max_ps(a, b) a > b ? a : b, as the scalar code.
  const __m256 lo = _mm256_min_ps(min_x, zero_f), hi = _mm256_max_ps(max_x, zero_f);
  const __m256 range = _mm256_sub_ps(hi, lo);
  const __m256 scale = _mm256_div_ps(range, qmax_f);
  const __m256 inv =
      _mm256_min_ps(_mm256_div_ps(qmax_f, range), _mm256_set1_ps(quant::kLargestInverseScale));
  const __m256 constant = _mm256_cmp_ps(min_x, max_x, _CMP_EQ_OQ);
  __m256 zero = _mm256_round_ps(_mm256_mul_ps(_mm256_xor_ps(lo, sign), inv),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  zero = _mm256_min_ps(_mm256_max_ps(zero, zero_f), qmax_f);
  // A constant group: scale |x| with code 1 (x > 0) or zero point 1 (x < 0); 0 and 0 for 0.
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i positive =
      _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(min_x, zero_f, _CMP_GT_OQ)), one);
  const __m256i negative =
      _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(min_x, zero_f, _CMP_LT_OQ)), one);
  const __m256i zero_i = _mm256_cvttps_epi32(zero);
  const __m256i constant_i = _mm256_castps_si256(constant);
  _mm256_storeu_ps(scale_out, _mm256_blendv_ps(scale, _mm256_andnot_ps(sign, min_x), constant));
  _mm256_storeu_ps(inv_out, _mm256_andnot_ps(constant, inv));  // codes x * 0 + constant code
  const __m256i zeros = _mm256_blendv_epi8(zero_i, negative, constant_i);
  const __m256i offsets = _mm256_blendv_epi8(zero_i, positive, constant_i);
  // int32 lanes to (zeros as 8 int16, offsets as 8 int16), then bytes
  const __m256i both = _mm256_permute4x64_epi64(_mm256_packs_epi32(zeros, offsets), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(offset_out), _mm256_extracti128_si256(both, 1));
  const __m128i zero_bytes =
      _mm_packus_epi16(_mm256_castsi256_si128(both), _mm256_castsi256_si128(both));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(zero_out), zero_bytes);
}

// `heads` rows of one token (contiguous in `src`), group_size a multiple of 32. Two passes over
// up to kChunk elements (whole heads): minima, maxima and the group parameters of all groups,
// eight at a time, then the codes; the inputs converted to f32 once, in a buffer that stays in
// L1. Splitting the passes lets the parameters' latency (a division) overlap the codes of the
// groups before.
template <DType In, uint32_t Bits, bool Stream>
void encode_int_rows(const PagedKvView& pool, const uint8_t* src, uint32_t heads, uint8_t* codes,
                     float* scales, uint8_t* zeros) {
  constexpr uint32_t kChunk = 2048;  // elements per pass; head_dim <= 1024
  constexpr uint32_t kMaxGroups = kChunk / 32;
  constexpr size_t in_bytes = In == DType::kF32 ? 4 : 2;
  const uint32_t gs = pool.group_size, gpr = pool.groups_per_row, hd = pool.head_dim;
  const uint64_t tile_bytes = pool.tile_bytes;
  const uint64_t records = uint64_t{pool.block_size} * gpr;  // one head's tile to the next
  const uint32_t row_code_bytes = gs * Bits / 8;
  const uint32_t chunk_heads = hd >= kChunk ? 1 : kChunk / hd;
  const __m256i undo_pack = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  alignas(32) float x[kChunk];
  alignas(32) float scale_a[kMaxGroups + 8], inv_a[kMaxGroups + 8];
  alignas(32) uint8_t zero_a[kMaxGroups + 8];
  alignas(32) int16_t offset_a[kMaxGroups + 8];
  for (uint32_t h0 = 0; h0 < heads; h0 += chunk_heads) {
    const uint32_t nh = heads - h0 < chunk_heads ? heads - h0 : chunk_heads;
    const uint32_t groups = nh * gpr;
    const uint8_t* in = src + uint64_t{h0} * hd * in_bytes;
    // f32 inputs are read in place, others converted once into x
    const float* xs = In == DType::kF32 ? reinterpret_cast<const float*>(in) : x;
    for (uint32_t first = 0; first < groups; first += 8) {
      const uint32_t count = groups - first < 8 ? groups - first : 8;
      __m256 mins[8], maxs[8];
      for (uint32_t j = 0; j < 8; ++j) {  // lanes past `count` repeat group `first`, unused
        const uint32_t begin = (first + (j < count ? j : 0)) * gs;
        __m256 lo = load_input8<In>(in, begin), hi = lo;
        if constexpr (In != DType::kF32) _mm256_store_ps(x + begin, lo);
        for (uint32_t d = 8; d < gs; d += 8) {
          const __m256 v = load_input8<In>(in, begin + d);
          if constexpr (In != DType::kF32) _mm256_store_ps(x + begin + d, v);
          lo = _mm256_min_ps(lo, v);
          hi = _mm256_max_ps(hi, v);
        }
        mins[j] = lo;
        maxs[j] = hi;
      }
      group_params8<Bits>(
          transpose_reduce8(mins, [](__m256 a, __m256 b) { return _mm256_min_ps(a, b); }),
          transpose_reduce8(maxs, [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); }),
          scale_a + first, inv_a + first, zero_a + first, offset_a + first);
    }
    for (uint32_t h = 0; h < nh; ++h) {
      const uint32_t g0 = h * gpr;
      uint8_t* out = codes + (h0 + h) * tile_bytes;
      float* scale_out = scales + (h0 + h) * records;
      uint8_t* zero_out = zeros + (h0 + h) * records;
      for (uint32_t i = 0; i < gpr; ++i) {
        scale_out[i] = scale_a[g0 + i];
        zero_out[i] = zero_a[g0 + i];
      }
      for (uint32_t i = 0; i < gpr; ++i) {
        const uint32_t g = g0 + i;
        const float* xg = xs + uint64_t{g} * gs;
        uint8_t* out_g = out + i * row_code_bytes;
        const __m256 inv_b = _mm256_broadcast_ss(inv_a + g);
        const __m256i offset_b = _mm256_set1_epi16(offset_a[g]);
        // rint(x / scale) (the conversion rounds to nearest even as rint does; |x / scale| <=
        // qmax + 1 fits int16) + zero, clamped to [0, qmax]: packus clamps to [0, 255].
        auto rounded = [&](uint32_t d) {
          return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + d), inv_b));
        };
        for (uint32_t d = 0; d < gs; d += 32) {
          const __m256i ab =
              _mm256_add_epi16(_mm256_packs_epi32(rounded(d), rounded(d + 8)), offset_b);
          const __m256i cd =
              _mm256_add_epi16(_mm256_packs_epi32(rounded(d + 16), rounded(d + 24)), offset_b);
          __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), undo_pack);
          if constexpr (Bits < 8) bytes = _mm256_min_epu8(bytes, _mm256_set1_epi8(qmax_of(Bits)));
          if constexpr (Stream) {
            stream_codes32<Bits>(bytes, out_g + d * Bits / 8);
          } else {
            store_codes32(bytes, Bits, out_g + d * Bits / 8);
          }
        }
      }
    }
  }
}

// Non-temporal stores only where they write whole cache lines: rows of whole 64-byte lines,
// aligned (every row of a tile then is), of 8- or 4-bit codes.
bool can_stream(const PagedKvView& pool, const uint8_t* codes) {
  return dtype_bits(pool.dtype) >= 4 && pool.row_bytes % 64 == 0 && pool.tile_bytes % 64 == 0 &&
         reinterpret_cast<uintptr_t>(codes) % 64 == 0;
}

template <DType In>
void encode_int_rows_from(const PagedKvView& pool, const uint8_t* src, uint32_t heads,
                          uint8_t* codes, float* scales, uint8_t* zeros, bool stream) {
  stream = stream && can_stream(pool, codes);
  switch (dtype_bits(pool.dtype)) {
    case 8:
      return stream ? encode_int_rows<In, 8, true>(pool, src, heads, codes, scales, zeros)
                    : encode_int_rows<In, 8, false>(pool, src, heads, codes, scales, zeros);
    case 4:
      return stream ? encode_int_rows<In, 4, true>(pool, src, heads, codes, scales, zeros)
                    : encode_int_rows<In, 4, false>(pool, src, heads, codes, scales, zeros);
    default:
      return encode_int_rows<In, 2, false>(pool, src, heads, codes, scales, zeros);
  }
}

void encode_row(const PagedKvView& pool, const void* src_void, DType src_dtype, uint8_t* codes,
                float* scales, uint8_t* zeros) {
  const uint32_t hd = pool.head_dim;
  const auto* src = static_cast<const uint8_t*>(src_void);
  if (hd % 8 != 0 || (is_integer_quantized(pool.dtype) && pool.group_size % 8 != 0)) {
    generic_simd_ops().encode_rows(pool, src_void, src_dtype, 1, codes, scales, zeros, false);
    return;
  }
  switch (pool.dtype) {
    case DType::kF32:
      for (uint32_t d = 0; d < hd; d += 8) {
        _mm256_storeu_ps(reinterpret_cast<float*>(codes) + d, load_activation8(src, src_dtype, d));
      }
      return;
    case DType::kF16:
      for (uint32_t d = 0; d < hd; d += 8) {
        const __m128i h =
            _mm256_cvtps_ph(load_activation8(src, src_dtype, d), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 2 * d), h);
      }
      return;
    case DType::kBF16:
      for (uint32_t d = 0; d < hd; d += 8) {
        const __m256i x = _mm256_castps_si256(load_activation8(src, src_dtype, d));
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
        const __m256i r = _mm256_srli_epi32(
            _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), lsb), 16);
        const __m128i packed =
            _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 2 * d), packed);
      }
      return;
    default:
      break;
  }
  // Quantized formats read each element twice (range, then codes): convert the row once.
  alignas(32) float row[1024];  // head_dim <= 1024 (config limit); [0, hd) is written here
  load_row(src, src_dtype, hd, row);
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC cannot see that hd >= 8
#endif
  switch (pool.dtype) {
    case DType::kFP8E4M3: {
      const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
      const float first = row[0];
      const __m256 first_v = _mm256_set1_ps(first);
      __m256 absmax = _mm256_setzero_ps();
      __m256 differs = _mm256_setzero_ps();
      for (uint32_t d = 0; d < hd; d += 8) {
        const __m256 x = _mm256_load_ps(row + d);
        absmax = _mm256_max_ps(absmax, _mm256_and_ps(x, abs_mask));
        differs = _mm256_or_ps(differs, _mm256_cmp_ps(x, first_v, _CMP_NEQ_OQ));
      }
      const quant::Fp8RowParams p =
          quant::fp8_row_params(hmax(absmax), _mm256_movemask_ps(differs) == 0, first);
      scales[0] = p.scale;
      if (p.constant) {
        std::memset(codes, p.constant_code, hd);
        return;
      }
      const __m256 inv = _mm256_set1_ps(p.inv_scale);
      for (uint32_t d = 0; d < hd; d += 8) {
        store_bytes8(f32_to_e4m3_8(_mm256_mul_ps(_mm256_load_ps(row + d), inv)), codes + d);
      }
      return;
    }
    default: {  // int8 / int4 / int2, per group
      const uint32_t bits = dtype_bits(pool.dtype);
      const uint32_t qmax = (1u << bits) - 1u;
      const __m256i shifts = bits == 4 ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
                                       : _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
      for (uint32_t g = 0; g < hd / pool.group_size; ++g) {
        const uint32_t begin = g * pool.group_size, end = begin + pool.group_size;
        __m256 lo = _mm256_load_ps(row + begin), hi = lo;
        for (uint32_t d = begin + 8; d < end; d += 8) {
          const __m256 x = _mm256_load_ps(row + d);
          lo = _mm256_min_ps(lo, x);
          hi = _mm256_max_ps(hi, x);
        }
        const quant::IntGroupParams p = quant::int_group_params(hmin(lo), hmax(hi), qmax);
        scales[g] = p.scale;
        zeros[g] = static_cast<uint8_t>(p.zero);
        const __m256 inv = _mm256_set1_ps(p.inv_scale);
        const __m256i zero = _mm256_set1_epi32(static_cast<int>(p.zero));
        const __m256i top = _mm256_set1_epi32(static_cast<int>(qmax));
        // rint(x / scale) + zero is never below 0 (rint is odd and x >= lo); only the top clamps.
        // The conversion rounds to nearest even (the default MXCSR mode), as rint does, and
        // |x / scale| <= qmax keeps it in range.
        auto codes8 = [&](uint32_t d) {
          if (p.constant) return _mm256_set1_epi32(static_cast<int>(p.constant_code));
          const __m256i rounded = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(row + d), inv));
          return _mm256_min_epi32(_mm256_add_epi32(rounded, zero), top);
        };
        uint32_t d = begin;
        for (; d + 32 <= end; d += 32) {  // 32 codes at a time: pack 4 vectors to bytes
          const __m256i ab = _mm256_packus_epi32(codes8(d), codes8(d + 8));
          const __m256i cd = _mm256_packus_epi32(codes8(d + 16), codes8(d + 24));
          const __m256i bytes = _mm256_permutevar8x32_epi32(  // undo packus' per-lane order
              _mm256_packus_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
          store_codes32(bytes, bits, codes + d * bits / 8);
        }
        for (; d < end; d += 8) {
          const __m256i q = codes8(d);
          if (bits == 8) {
            store_bytes8(q, codes + d);
          } else {
            const uint32_t packed = hor(_mm256_sllv_epi32(q, shifts));
            std::memcpy(codes + d * bits / 8, &packed, bits);  // 8 codes take `bits` bytes
          }
        }
      }
      return;
    }
  }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
}

void encode_rows(const PagedKvView& pool, const void* src_void, DType src_dtype, uint32_t heads,
                 uint8_t* codes, float* scales, uint8_t* zeros, bool stream) {
  const auto* src = static_cast<const uint8_t*>(src_void);
  if (is_integer_quantized(pool.dtype) && pool.group_size % 32 == 0) {
    switch (src_dtype) {
      case DType::kF16:
        return encode_int_rows_from<DType::kF16>(pool, src, heads, codes, scales, zeros, stream);
      case DType::kBF16:
        return encode_int_rows_from<DType::kBF16>(pool, src, heads, codes, scales, zeros, stream);
      default:
        return encode_int_rows_from<DType::kF32>(pool, src, heads, codes, scales, zeros, stream);
    }
  }
  const size_t in_row_bytes = (src_dtype == DType::kF32 ? 4 : 2) * size_t{pool.head_dim};
  const uint64_t records = uint64_t{pool.block_size} * pool.groups_per_row;
  for (uint32_t h = 0; h < heads; ++h) {
    encode_row(pool, src + h * in_row_bytes, src_dtype, codes + h * pool.tile_bytes,
               scales + h * records, zeros + h * records);
  }
}

}  // namespace

const SimdOps* avx2_simd_ops() {
  static const SimdOps ops{"avx2", decode_rows, qk, pv, exp_sum, encode_rows};
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
