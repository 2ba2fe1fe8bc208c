// Compiled with -mavx2 -mfma -mf16c -mavx512vnni -mavx512vl -mavx512bw -mavx512dq; used only when
// the processor reports all of them. The AVX2 kernels, except the integer formats' qk: VNNI's dpbusd multiplies 32
// unsigned codes by 32 signed query codes and adds each four products to an int32 lane in one
// instruction, without the AVX2 version's int16 step (and so without its centring of 8-bit codes).
#include "backend/cpu/simd_ops.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && \
    defined(__AVX512BW__) && defined(__AVX512DQ__)
#include "backend/cpu/simd_int_x86.h"
#include "kvfabric/quant/kv_format.h"

namespace kvfabric::cpu {
namespace {

struct VnniDot {
  using Query = __m256i;
  static Query query(__m256i q) { return q; }
  static __m256i prepare(__m256i c) { return c; }
  static __m256i add(__m256i acc, __m256i c, __m256i q) { return _mm256_dpbusd_epi32(acc, c, q); }
};

bool vnni_fits(const PagedKvView& pool) {
  return is_integer_quantized(pool.dtype) && int_kernels_fit(pool);
}

// ---- qk of groups of 32 elements or more, key rows transposed in registers: the generic
// qk_tokens8 reduces each (row, token, unit) dot product from eight int32 lanes to one, a
// shuffle-and-add tree that costs three times the dot products themselves. Here eight tokens'
// 32-byte units are transposed by dwords instead (twice: tokens a..d, then e..h), once for up to
// four query rows, so that one dpbusd adds one dword of four tokens (and another dword of
// the same four in the upper half) against that dword of the query broadcast into the lanes:
// four dpbusd leave each token's unit dot product in two lanes, which one permutation pairs up.
// The int32 sums are exact, so the logits are bit for bit those of qk_tokens8.

// x[k] = token k's unit; v[j] (j < 4): dwords j (lanes 0-3) and j + 4 (lanes 4-7) of tokens
// k0..k0+3, for k0 = 0 (v[0..3]) and 4 (v[4..7]).
void transpose_dwords(const __m256i x[8], __m256i v[8]) {
  for (uint32_t half = 0; half < 2; ++half) {
    const __m256i* in = x + 4 * half;
    const __m256i ab_lo = _mm256_unpacklo_epi32(in[0], in[1]);  // a0 b0 a1 b1 | a4 b4 a5 b5
    const __m256i ab_hi = _mm256_unpackhi_epi32(in[0], in[1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
    const __m256i cd_lo = _mm256_unpacklo_epi32(in[2], in[3]);
    const __m256i cd_hi = _mm256_unpackhi_epi32(in[2], in[3]);
    __m256i* out = v + 4 * half;
    out[0] = _mm256_unpacklo_epi64(ab_lo, cd_lo);  // a0 b0 c0 d0 | a4 b4 c4 d4
    out[1] = _mm256_unpackhi_epi64(ab_lo, cd_lo);  // a1 b1 c1 d1 | a5 b5 c5 d5
    out[2] = _mm256_unpacklo_epi64(ab_hi, cd_hi);
    out[3] = _mm256_unpackhi_epi64(ab_hi, cd_hi);
  }
}

// Eight tokens' dot products with one query unit `qu` (32 int8 codes), lane k = token k.
__m256i unit_dots8(const __m256i v[8], __m256i qu) {
  __m256i low = _mm256_setzero_si256(), high = _mm256_setzero_si256();
  for (uint32_t j = 0; j < 4; ++j) {
    const __m256i qj = _mm256_permutevar8x32_epi32(qu, _mm256_setr_epi32(j, j, j, j, j + 4, j + 4,
                                                                         j + 4, j + 4));
    low = _mm256_dpbusd_epi32(low, v[j], qj);       // tokens 0-3
    high = _mm256_dpbusd_epi32(high, v[4 + j], qj);  // tokens 4-7
  }
  return _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20),
                          _mm256_permute2x128_si256(low, high, 0x31));
}

// out[r][t] for R query rows and tokens [t0, t0 + 8) of the chunk (those below n).
template <uint32_t R>
void qk_rows_transposed(const IntKeyChunk& c, const QueryRows& q, uint32_t t0, float* out,
                        uint32_t out_stride) {
  const uint8_t* rows[8];  // tokens past the chunk repeat its last one
  for (uint32_t k = 0; k < 8; ++k)
    rows[k] = c.codes + uint64_t{std::min(t0 + k, c.n - 1)} * c.head_dim;
  __m256 logits[R];
  for (uint32_t r = 0; r < R; ++r)
    logits[r] = _mm256_setzero_ps();
  for (uint32_t u = 0; u < c.head_dim / 32; ++u) {
    __m256i x[8], v[8];
    for (uint32_t k = 0; k < 8; ++k)
      x[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[k] + 32 * u));
    transpose_dwords(x, v);
    const uint32_t g = (32 * u) >> c.group_shift;
    const __m256 scales = _mm256_loadu_ps(c.records.scales + g * c.records.padded_n + t0);
    for (uint32_t r = 0; r < R; ++r) {
      const __m256i qu = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(q.codes + uint64_t{r} * c.head_dim + 32 * u));
      logits[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(unit_dots8(v, qu)), scales, logits[r]);
    }
  }
  for (uint32_t r = 0; r < R; ++r)
    finish_logits8(c, q.from(r), t0, logits[r], out + uint64_t{r} * out_stride);
}

template <uint32_t Bits>
void qk_int_transposed(const PagedKvView& pool, const TileRef& keys, uint32_t n,
                       const QueryRows& q, uint32_t rows, float* out, uint32_t out_stride,
                       float* scratch) {
  if (pool.group_size < 32) {  // a unit's lanes belong to several groups
    qk_int<Bits, VnniDot>(pool, keys, n, q, rows, out, out_stride, scratch);
    return;
  }
  const IntKeyChunk chunk = IntKeyChunk::make<Bits>(pool, keys, n, scratch);
  for (uint32_t t0 = 0; t0 < n; t0 += 8) {
    uint32_t r = 0;
    for (; r + 4 <= rows; r += 4)
      qk_rows_transposed<4>(chunk, q.from(r), t0, out + uint64_t{r} * out_stride, out_stride);
    for (; r + 2 <= rows; r += 2)
      qk_rows_transposed<2>(chunk, q.from(r), t0, out + uint64_t{r} * out_stride, out_stride);
    for (; r < rows; ++r)
      qk_rows_transposed<1>(chunk, q.from(r), t0, out + uint64_t{r} * out_stride, out_stride);
  }
}

void qk(const PagedKvView& pool, const TileRef& keys, uint32_t n, const QueryRows& q, uint32_t rows,
        float* out, uint32_t out_stride, float* scratch) {
  if (!vnni_fits(pool)) {
    avx2_simd_ops()->qk(pool, keys, n, q, rows, out, out_stride, scratch);
    return;
  }
  switch (dtype_bits(pool.dtype)) {
    case 8:
      qk_int_transposed<8>(pool, keys, n, q, rows, out, out_stride, scratch);
      break;
    case 4:
      qk_int_transposed<4>(pool, keys, n, q, rows, out, out_stride, scratch);
      break;
    default:
      qk_int_transposed<2>(pool, keys, n, q, rows, out, out_stride, scratch);
      break;
  }
}

// ---- append_kv's integer encoder on 512-bit vectors (AVX512F/BW/DQ, which every processor
// with AVX512-VNNI has), the AVX2 encoder's two passes (simd_avx2.cc) wider: pass 1 reduces each
// group to 8 lanes of min and max and sixteen groups' lanes together (in-lane 256-bit shuffles:
// Zen 4's two-source 512-bit permutations made this pass 10% slower), then computes sixteen
// groups' parameters at once; pass 2 converts the input again (cheaper than keeping it in a
// buffer) and writes 64 codes a step: rint by the conversion, packs to int16, + zero point,
// packus (the [0, 255] clamp), one dword permutation into order, 4- and 2-bit codes packed by
// multiply-adds. The same IEEE operations as quant::int_group_params / int_encode, so the same
// bytes as the scalar reference (tests/unit/backend/append_gather_test.cc checks every ISA).

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push  // GCC 12 flags _mm512_undefined_*() inside its own intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

template <DType In>
__m512 load_input16(const uint8_t* src, uint64_t i) {  // elements [i, i + 16) as f32
  const auto* p = reinterpret_cast<const __m256i*>(src + i * (In == DType::kF32 ? 4 : 2));
  if constexpr (In == DType::kF16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(p));
  } else if constexpr (In == DType::kBF16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16));
  } else {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(src) + i);
  }
}

// Lane j of the result: min (Max = false) or max over the 8 lanes of v[j]. In-lane shuffles of
// 256-bit vectors: the two-source 512-bit permutations cost more on Zen 4.
template <bool Max>
__m256 transpose_reduce8(const __m256* v) {
  auto op = [](__m256 a, __m256 b) { return Max ? _mm256_max_ps(a, b) : _mm256_min_ps(a, b); };
  // (a0 a1 a2 a3 | a4 a5 a6 a7), (b...) -> (a01 a23 b01 b23 | a45 a67 b45 b67)
  auto pair = [&](__m256 a, __m256 b) {
    return op(_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xDD));
  };
  const __m256 lo = pair(pair(v[0], v[1]), pair(v[2], v[3]));  // (v0..v3 low | v0..v3 high)
  const __m256 hi = pair(pair(v[4], v[5]), pair(v[6], v[7]));
  return op(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// quant::int_group_params on 16 lanes (see group_params8 in simd_avx2.cc).
template <uint32_t Bits>
void group_params16(__m512 min_x, __m512 max_x, float* scale_out, float* inv_out,
                         uint8_t* zero_out, int16_t* offset_out) {
  constexpr uint32_t qmax = (1u << Bits) - 1u;
  const __m512 zero_f = _mm512_setzero_ps();
  const __m512 qmax_f = _mm512_set1_ps(static_cast<float>(qmax));
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 lo = _mm512_min_ps(min_x, zero_f), hi = _mm512_max_ps(max_x, zero_f);
  const __m512 range = _mm512_sub_ps(hi, lo);
  const __m512 scale = _mm512_div_ps(range, qmax_f);
  const __m512 inv =
      _mm512_min_ps(_mm512_div_ps(qmax_f, range), _mm512_set1_ps(quant::kLargestInverseScale));
  const __mmask16 constant = _mm512_cmp_ps_mask(min_x, max_x, _CMP_EQ_OQ);
  __m512 zero = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_xor_ps(lo, sign), inv),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  zero = _mm512_min_ps(_mm512_max_ps(zero, zero_f), qmax_f);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i positive =
      _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(min_x, zero_f, _CMP_GT_OQ), one);
  const __m512i negative =
      _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(min_x, zero_f, _CMP_LT_OQ), one);
  const __m512i zero_i = _mm512_cvttps_epi32(zero);
  _mm512_storeu_ps(scale_out, _mm512_mask_mov_ps(scale, constant, _mm512_andnot_ps(sign, min_x)));
  _mm512_storeu_ps(inv_out, _mm512_maskz_mov_ps(static_cast<__mmask16>(~constant), inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(zero_out),
                   _mm512_cvtepi32_epi8(_mm512_mask_mov_epi32(zero_i, constant, negative)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset_out),
                      _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(zero_i, constant, positive)));
}

// 64 codes, one byte each in order, stored packed at `out` (64 / 32 / 16 bytes).
template <uint32_t Bits, bool Stream>
void store_codes64(__m512i bytes, uint8_t* out) {
  if constexpr (Bits == 8) {
    if constexpr (Stream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(out), bytes);
    } else {
      _mm512_storeu_si512(out, bytes);
    }
  } else if constexpr (Bits == 4) {  // b0 + 16 * b1 per 16-bit lane, then its low byte
    const __m256i packed =
        _mm512_cvtepi16_epi8(_mm512_maddubs_epi16(bytes, _mm512_set1_epi16(0x1001)));
    if constexpr (Stream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(out), packed);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), packed);
    }
  } else {  // b0 + 4 * b1 + 16 * b2 + 64 * b3 per 32-bit lane
    const __m512i pairs = _mm512_maddubs_epi16(bytes, _mm512_set1_epi32(0x40100401));
    const __m128i packed =
        _mm512_cvtepi32_epi8(_mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed);
  }
}

// `heads` rows of one token, group_size a multiple of 32, head_dim a multiple of 64.
template <DType In, uint32_t Bits, bool Stream>
void encode_int_rows16(const PagedKvView& pool, const uint8_t* src, uint32_t heads,
                       uint8_t* codes, float* scales, uint8_t* zeros) {
  constexpr uint32_t kChunk = 2048;  // elements per pass; head_dim <= 1024
  constexpr uint32_t kMaxGroups = kChunk / 32;
  constexpr size_t in_bytes = In == DType::kF32 ? 4 : 2;
  const uint32_t gs = pool.group_size, gpr = pool.groups_per_row, hd = pool.head_dim;
  const uint64_t tile_bytes = pool.tile_bytes;
  const uint64_t records = uint64_t{pool.block_size} * gpr;  // one head's tile to the next
  const uint32_t chunk_heads = hd >= kChunk ? 1 : kChunk / hd;
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  alignas(64) float scale_a[kMaxGroups + 16], inv_a[kMaxGroups + 16];
  alignas(64) uint8_t zero_a[kMaxGroups + 16];
  alignas(64) int16_t offset_a[kMaxGroups + 16];
  for (uint32_t h0 = 0; h0 < heads; h0 += chunk_heads) {
    const uint32_t nh = heads - h0 < chunk_heads ? heads - h0 : chunk_heads;
    const uint32_t groups = nh * gpr;
    const uint8_t* in = src + uint64_t{h0} * hd * in_bytes;
    for (uint32_t first = 0; first < groups; first += 16) {
      const uint32_t count = groups - first < 16 ? groups - first : 16;
      __m256 mins[16], maxs[16];
      for (uint32_t j = 0; j < 16; ++j) {  // lanes past `count` repeat group `first`, unused
        const uint32_t begin = (first + (j < count ? j : 0)) * gs;
        __m512 lo = load_input16<In>(in, begin), hi = lo;
        for (uint32_t d = 16; d < gs; d += 16) {
          const __m512 v = load_input16<In>(in, begin + d);
          lo = _mm512_min_ps(lo, v);
          hi = _mm512_max_ps(hi, v);
        }
        mins[j] = _mm256_min_ps(_mm512_castps512_ps256(lo), _mm512_extractf32x8_ps(lo, 1));
        maxs[j] = _mm256_max_ps(_mm512_castps512_ps256(hi), _mm512_extractf32x8_ps(hi, 1));
      }
      const __m512 min_x = _mm512_insertf32x8(_mm512_castps256_ps512(transpose_reduce8<false>(mins)),
                                              transpose_reduce8<false>(mins + 8), 1);
      const __m512 max_x = _mm512_insertf32x8(_mm512_castps256_ps512(transpose_reduce8<true>(maxs)),
                                              transpose_reduce8<true>(maxs + 8), 1);
      group_params16<Bits>(min_x, max_x, scale_a + first, inv_a + first, zero_a + first,
                           offset_a + first);
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
      const uint8_t* inh = in + uint64_t{h} * hd * in_bytes;
      // 64 elements a step; halves of 32 belong to groups g (and g + 1 when gs is 32)
      uint32_t g = g0, in_group = 0;
      for (uint32_t e = 0; e < hd; e += 64) {
        const uint32_t ga = g;
        in_group += 32;
        if (in_group == gs) ++g, in_group = 0;
        const uint32_t gb = g;
        in_group += 32;
        if (in_group == gs) ++g, in_group = 0;
        const __m512 inv_a16 = _mm512_set1_ps(inv_a[ga]), inv_b16 = _mm512_set1_ps(inv_a[gb]);
        const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(load_input16<In>(inh, e), inv_a16));
        const __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(load_input16<In>(inh, e + 16), inv_a16));
        const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(load_input16<In>(inh, e + 32), inv_b16));
        const __m512i d = _mm512_cvtps_epi32(_mm512_mul_ps(load_input16<In>(inh, e + 48), inv_b16));
        // rint(x / scale) (|x / scale| <= qmax + 1 fits int16) + zero, clamped to [0, 255]
        const __m512i ab = _mm512_add_epi16(_mm512_packs_epi32(a, b), _mm512_set1_epi16(offset_a[ga]));
        const __m512i cd = _mm512_add_epi16(_mm512_packs_epi32(c, d), _mm512_set1_epi16(offset_a[gb]));
        __m512i bytes = _mm512_permutexvar_epi32(order, _mm512_packus_epi16(ab, cd));
        if constexpr (Bits < 8)
          bytes = _mm512_min_epu8(bytes, _mm512_set1_epi8(static_cast<char>((1u << Bits) - 1u)));
        store_codes64<Bits, Stream>(bytes, out + e * Bits / 8);
      }
    }
  }
}

bool avx512_encoder_fits(const PagedKvView& pool) {
  return is_integer_quantized(pool.dtype) && pool.group_size % 32 == 0 && pool.head_dim % 64 == 0;
}

template <DType In>
void encode_int_rows16_from(const PagedKvView& pool, const uint8_t* src, uint32_t heads,
                            uint8_t* codes, float* scales, uint8_t* zeros, bool stream) {
  // Non-temporal stores where they write whole aligned lines: rows of 8- or 4-bit codes.
  stream = stream && dtype_bits(pool.dtype) >= 4 && pool.row_bytes % 64 == 0 &&
           pool.tile_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(codes) % 64 == 0;
  switch (dtype_bits(pool.dtype)) {
    case 8:
      return stream ? encode_int_rows16<In, 8, true>(pool, src, heads, codes, scales, zeros)
                    : encode_int_rows16<In, 8, false>(pool, src, heads, codes, scales, zeros);
    case 4:
      return stream ? encode_int_rows16<In, 4, true>(pool, src, heads, codes, scales, zeros)
                    : encode_int_rows16<In, 4, false>(pool, src, heads, codes, scales, zeros);
    default:
      return encode_int_rows16<In, 2, false>(pool, src, heads, codes, scales, zeros);
  }
}

void encode_rows(const PagedKvView& pool, const void* src_void, DType src_dtype, uint32_t heads,
                 uint8_t* codes, float* scales, uint8_t* zeros, bool stream) {
  if (!avx512_encoder_fits(pool)) {
    avx2_simd_ops()->encode_rows(pool, src_void, src_dtype, heads, codes, scales, zeros, stream);
    return;
  }
  const auto* src = static_cast<const uint8_t*>(src_void);
  switch (src_dtype) {
    case DType::kF16:
      return encode_int_rows16_from<DType::kF16>(pool, src, heads, codes, scales, zeros, stream);
    case DType::kBF16:
      return encode_int_rows16_from<DType::kBF16>(pool, src, heads, codes, scales, zeros, stream);
    default:
      return encode_int_rows16_from<DType::kF32>(pool, src, heads, codes, scales, zeros, stream);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace

const SimdOps* avx2_vnni_simd_ops() {
  static const SimdOps ops = [] {
    SimdOps o = *avx2_simd_ops();
    o.name = "avx2-vnni";
    o.qk = qk;
    o.encode_rows = encode_rows;
    return o;
  }();
  return &ops;
}

}  // namespace kvfabric::cpu

#else  // not compiled for x86-64 with AVX512-VNNI: no VNNI kernels

namespace kvfabric::cpu {
const SimdOps* avx2_vnni_simd_ops() {
  return nullptr;
}
}  // namespace kvfabric::cpu

#endif
