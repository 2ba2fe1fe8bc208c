// qk and pv of the integer formats on x86.
//
// qk works in integers: the key codes against the query quantized to int8 (QueryRows), 32
// elements at a time summed exactly in int32 by a dot-product policy (AVX2 or VNNI), then
// q.(s*c + o) = s*(q.c) + o*sum(q) per group. Eight tokens are reduced together, so with groups
// of 32 or more the conversion to f32, the group scale's FMA and the zero points' share cost one
// vector operation per eight tokens instead of one per token (smaller groups scale each token's
// int32 lanes first).
//
// pv reads the codes unpacked to bytes once per chunk, so every bit width converts 8 codes with
// two instructions, and dequantizes each with one FMA shared by the GQA group's rows.
//
// Included by simd_avx2.cc and simd_vnni.cc, each compiled with its own instruction set: the
// anonymous namespace gives each file its own copy, so the linker cannot mix them.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/simd_ops.h"
#include "kvfabric/quant/kv_format.h"

namespace kvfabric::cpu {
namespace {

// Lane k of the result is the sum of the lanes of v[k].
__m256 hsum8(const __m256 v[8]) {
  const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
  // [v0 v1 v2 v3 sums of lanes 0-3 | the same of lanes 4-7], then for v4..v7
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                       _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// The 32 codes of elements [32 * unit, 32 * unit + 32) of a packed row, one byte each, in order.
template <uint32_t Bits>
__m256i unpack32(const uint8_t* row, uint32_t unit) {
  if constexpr (Bits == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * unit));
  } else if constexpr (Bits == 4) {
    // Byte b holds two elements, low nibble first: widened to 16 bits, b | b << 4 has the first
    // in the low byte's and the second in the high byte's low nibble.
    const __m256i w =
        _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * unit)));
    return _mm256_and_si256(_mm256_or_si256(w, _mm256_slli_epi16(w, 4)), _mm256_set1_epi8(0x0F));
  } else {
    static_assert(Bits == 2);
    // Byte b holds four elements, lowest bits first: widened to 32 bits, shifted copies put
    // element j's two bits at the bottom of byte j.
    uint64_t raw;
    std::memcpy(&raw, row + 8 * unit, 8);
    const __m256i w = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(raw)));
    const __m256i spread =
        _mm256_or_si256(_mm256_or_si256(w, _mm256_slli_epi32(w, 6)),
                        _mm256_or_si256(_mm256_slli_epi32(w, 12), _mm256_slli_epi32(w, 18)));
    return _mm256_and_si256(spread, _mm256_set1_epi8(0x03));
  }
}

// A chunk's codes one byte per element, [n][head_dim]: 8-bit rows are read in place, narrower
// ones unpacked into `buffer`.
template <uint32_t Bits>
const uint8_t* chunk_codes(const PagedKvView& pool, const TileRef& tile, uint32_t n,
                           uint8_t* buffer) {
  if constexpr (Bits == 8) {
    return tile.codes;
  } else {
    const uint32_t hd = pool.head_dim;
    for (uint32_t t = 0; t < n; ++t) {
      for (uint32_t u = 0; u < hd / 32; ++u) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(buffer + uint64_t{t} * hd + 32 * u),
                            unpack32<Bits>(tile.codes + t * pool.row_bytes, u));
      }
    }
    return buffer;
  }
}

// Dot-product policies: add(acc, prepare(c), query(q)) adds to int32 lane i the products of
// elements 4i .. 4i+3 of 32 unsigned codes c and 32 query codes q in [-127, 127], exactly.

// Codes below 16: maddubs' int16 pairs (at most 2 * 15 * 127) cannot saturate.
struct Avx2SmallCodeDot {
  using Query = __m256i;
  static Query query(__m256i q) { return q; }
  static __m256i prepare(__m256i c) { return c; }
  static __m256i add(__m256i acc, __m256i c, Query q) {
    return _mm256_add_epi32(acc,
                            _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), _mm256_set1_epi16(1)));
  }
};

// 8-bit codes: 2 * 255 * 127 would saturate maddubs' int16 pairs, so the codes are centred
// (c - 128 in [-128, 127]) and their signs moved onto the query: |c - 128| * (q * sign(c - 128)),
// at most 2 * 128 * 127 = 32512 a pair. The query's lanes of 128 * q, computed once per unit,
// add the centring back: the sums stay exact integers.
struct Avx2ByteCodeDot {
  struct Query {
    __m256i q, centring;
  };
  static Query query(__m256i q) {
    // maddubs reads 0x80 unsigned: 128
    return {q, Avx2SmallCodeDot::add(_mm256_setzero_si256(),
                                     _mm256_set1_epi8(static_cast<char>(0x80)), q)};
  }
  static __m256i prepare(__m256i c) {
    return _mm256_xor_si256(c, _mm256_set1_epi8(static_cast<char>(0x80)));
  }
  static __m256i add(__m256i acc, __m256i centred, const Query& q) {
    // abs(-128) is 0x80, which maddubs reads unsigned: 128
    const __m256i pairs =
        _mm256_maddubs_epi16(_mm256_abs_epi8(centred), _mm256_sign_epi8(q.q, centred));
    const __m256i sums = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
    return _mm256_add_epi32(acc, _mm256_add_epi32(sums, q.centring));
  }
};

// The integer kernels take head_dim in whole 32-element units and power-of-two groups >= 8.
bool int_kernels_fit(const PagedKvView& pool) {
  const uint32_t g = pool.group_size;
  return pool.head_dim % 32 == 0 && g >= 8 && (g & (g - 1)) == 0;
}

uint32_t round_up(uint32_t x, uint32_t m) {
  return (x + m - 1) / m * m;
}

// offsets[i] = -(zero * scale) of the first `count` group records of `tile`: a code then
// dequantizes with one FMA, code * scale + offset.
void store_group_offsets(const TileRef& tile, uint32_t count, float* offsets) {
  uint32_t i = 0;
  for (; i + 8 <= count; i += 8) {
    uint64_t raw;
    std::memcpy(&raw, tile.zeros + i, 8);
    const __m256 zero =
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(raw))));
    _mm256_storeu_ps(offsets + i, _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), zero),
                                                _mm256_loadu_ps(tile.scales + i)));
  }
  for (; i < count; ++i)
    offsets[i] = -static_cast<float>(tile.zeros[i]) * tile.scales[i];
}

// out[g * out_stride + t] = in[t * 4 + g] for 8 tokens t and 4 groups g: unpacks pair tokens
// (t, t + 2) and then (t, t + 2, t + 4, t + 6) of each group, one permutation restores the order.
void transpose_8x4(const float* in, float* out, uint32_t out_stride) {
  const __m256 r0 = _mm256_loadu_ps(in), r1 = _mm256_loadu_ps(in + 8);  // tokens 0-1, 2-3
  const __m256 r2 = _mm256_loadu_ps(in + 16), r3 = _mm256_loadu_ps(in + 24);
  const __m256 lo01 = _mm256_unpacklo_ps(r0, r1), hi01 = _mm256_unpackhi_ps(r0, r1);
  const __m256 lo23 = _mm256_unpacklo_ps(r2, r3), hi23 = _mm256_unpackhi_ps(r2, r3);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto tokens_in_order = [&](__m256 a, __m256 b, bool high) {  // tokens 0 2 4 6 | 1 3 5 7
    const __m256d ad = _mm256_castps_pd(a), bd = _mm256_castps_pd(b);
    return _mm256_permutevar8x32_ps(
        _mm256_castpd_ps(high ? _mm256_unpackhi_pd(ad, bd) : _mm256_unpacklo_pd(ad, bd)), order);
  };
  _mm256_storeu_ps(out, tokens_in_order(lo01, lo23, false));
  _mm256_storeu_ps(out + out_stride, tokens_in_order(lo01, lo23, true));
  _mm256_storeu_ps(out + 2 * out_stride, tokens_in_order(hi01, hi23, false));
  _mm256_storeu_ps(out + 3 * out_stride, tokens_in_order(hi01, hi23, true));
}

// A chunk's per-(token, group) scales and biases, -(scale * zero), transposed to
// [group][token] so that eight tokens' records load as one vector; tokens are padded to a
// multiple of 8 by repeating the last.
struct GroupRecords {
  const float* scales;
  const float* bias;
  uint32_t padded_n;

  // `scratch` takes 3 * padded_n * groups_per_row floats.
  static GroupRecords make(const PagedKvView& pool, const TileRef& tile, uint32_t n,
                           float* scratch) {
    const uint32_t gpr = pool.groups_per_row, padded_n = round_up(n, 8), count = n * gpr;
    float* bias_by_token = scratch;  // [token][group]
    store_group_offsets(tile, count, bias_by_token);
    float* scales = scratch + uint64_t{padded_n} * gpr;
    float* bias = scales + uint64_t{padded_n} * gpr;
    uint32_t first = 0;  // tokens before it are transposed
    if (gpr == 4) {  // 32-element groups of 128-dimension heads
      for (; first + 8 <= n; first += 8) {
        transpose_8x4(tile.scales + first * 4, scales + first, padded_n);
        transpose_8x4(bias_by_token + first * 4, bias + first, padded_n);
      }
    }
    for (uint32_t g = 0; g < gpr; ++g) {  // gathers measured slower than this
      float* scales_g = scales + g * padded_n;
      float* bias_g = bias + g * padded_n;
      for (uint32_t t = first; t < n; ++t) {
        scales_g[t] = tile.scales[t * gpr + g];
        bias_g[t] = bias_by_token[t * gpr + g];
      }
      std::fill(scales_g + n, scales_g + padded_n, scales_g[n - 1]);
      std::fill(bias_g + n, bias_g + padded_n, bias_g[n - 1]);
    }
    return {scales, bias, padded_n};
  }
};

// ---- qk

// A chunk of keys as qk_tokens8 reads it; its tables live in `scratch`.
struct IntKeyChunk {
  const uint8_t* codes;      // [n][head_dim], one byte each
  const float* lane_scales;  // groups under 32 elements: [token][unit][8 lanes]
  GroupRecords records;
  uint32_t n, head_dim, groups_per_row, group_shift;

  template <uint32_t Bits>
  static IntKeyChunk make(const PagedKvView& pool, const TileRef& tile, uint32_t n,
                          float* scratch) {
    const uint32_t hd = pool.head_dim, gpr = pool.groups_per_row;
    auto* code_buffer = reinterpret_cast<uint8_t*>(scratch);
    float* lanes = scratch + uint64_t{n} * hd / 4;
    float* records = lanes + uint64_t{n} * hd / 4;
    IntKeyChunk c{chunk_codes<Bits>(pool, tile, n, code_buffer),
                  lanes,
                  GroupRecords::make(pool, tile, n, records),
                  n,
                  hd,
                  gpr,
                  static_cast<uint32_t>(__builtin_ctz(pool.group_size))};
    if (pool.group_size < 32) {  // int32 lane i holds elements 4i .. 4i+3
      for (uint32_t t = 0; t < n; ++t) {
        for (uint32_t e = 0; e < hd; e += 4)
          lanes[(uint64_t{t} * hd + e) / 4] = tile.scales[t * gpr + (e >> c.group_shift)];
      }
    }
    return c;
  }
};

// Lane k of the result is the sum of the lanes of v[k]. Unpacks and adds: phaddd is several
// micro-ops each on the processors measured.
__m256i hsum8_epi32(const __m256i v[8]) {
  __m256i pairs[4];  // [a0+a2, b0+b2, a1+a3, b1+b3 | the same of lanes 4..7] of v[2i], v[2i+1]
  for (uint32_t i = 0; i < 4; ++i) {
    pairs[i] = _mm256_add_epi32(_mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  }
  // [v0 v1 v2 v3 sums of lanes 0..3 | of lanes 4..7], then the same of v4..v7
  const __m256i low = _mm256_add_epi32(_mm256_unpacklo_epi64(pairs[0], pairs[1]),
                                       _mm256_unpackhi_epi64(pairs[0], pairs[1]));
  const __m256i high = _mm256_add_epi32(_mm256_unpacklo_epi64(pairs[2], pairs[3]),
                                        _mm256_unpackhi_epi64(pairs[2], pairs[3]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20),
                          _mm256_permute2x128_si256(low, high, 0x31));
}

// Groups of 32 elements or more: each unit's int32 sums of eight tokens are reduced to one
// vector (lane k: token t0 + k) before the conversion and the group scale's FMA.
template <class Dot>
__m256 qk_tokens8_whole_units(const IntKeyChunk& c, const QueryRows& q, uint32_t t0,
                              const uint8_t* const rows[8]) {
  __m256 logits = _mm256_setzero_ps();
  for (uint32_t u = 0; u < c.head_dim / 32; ++u) {
    const auto qu =
        Dot::query(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.codes + 32 * u)));
    __m256i dot[8];
    for (uint32_t k = 0; k < 8; ++k) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[k] + 32 * u));
      dot[k] = Dot::add(_mm256_setzero_si256(), Dot::prepare(codes), qu);
    }
    const uint32_t g = (32 * u) >> c.group_shift;
    const __m256 scales = _mm256_loadu_ps(c.records.scales + g * c.records.padded_n + t0);
    logits = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8_epi32(dot)), scales, logits);
  }
  return logits;
}

// Groups under 32 elements: a unit's int32 lanes belong to different groups, so each token's
// lanes are scaled one by one and the eight tokens reduced at the end.
template <class Dot>
__m256 qk_tokens8_split_units(const IntKeyChunk& c, const QueryRows& q, uint32_t t0,
                              const uint8_t* const rows[8]) {
  __m256 acc[8];
  for (uint32_t k = 0; k < 8; ++k)
    acc[k] = _mm256_setzero_ps();
  for (uint32_t u = 0; u < c.head_dim / 32; ++u) {
    const auto qu =
        Dot::query(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.codes + 32 * u)));
    for (uint32_t k = 0; k < 8; ++k) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[k] + 32 * u));
      const __m256i dot = Dot::add(_mm256_setzero_si256(), Dot::prepare(codes), qu);
      const uint32_t t = std::min(t0 + k, c.n - 1);
      const __m256 scales =
          _mm256_loadu_ps(c.lane_scales + (uint64_t{t} * c.head_dim / 32 + u) * 8);
      acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scales, acc[k]);
    }
  }
  return hsum8(acc);
}

// Adds the zero points' share to the scaled dot products of tokens [t0, t0 + 8) of one query row,
// applies the row's scale and stores those below n at out[t0..].
void finish_logits8(const IntKeyChunk& c, const QueryRows& q, uint32_t t0, __m256 logits,
                    float* out) {
  // the zero points' share: sum over groups of -(scale * zero) * sum(q)
  for (uint32_t g = 0; g < c.groups_per_row; ++g) {
    logits = _mm256_fmadd_ps(_mm256_loadu_ps(c.records.bias + g * c.records.padded_n + t0),
                             _mm256_set1_ps(q.group_sums[g]), logits);
  }
  logits = _mm256_mul_ps(logits, _mm256_set1_ps(q.scales[0]));
  if (t0 + 8 <= c.n) {
    _mm256_storeu_ps(out + t0, logits);
  } else {
    alignas(32) float tail[8];
    _mm256_store_ps(tail, logits);
    std::copy(tail, tail + (c.n - t0), out + t0);
  }
}

// out[t] = dot(q, K[t]) for tokens [t0, t0 + 8) of the chunk (those below n), one query row.
template <class Dot>
void qk_tokens8(const IntKeyChunk& c, const QueryRows& q, uint32_t t0, float* out) {
  const uint8_t* rows[8];  // tokens past the chunk repeat its last one
  for (uint32_t k = 0; k < 8; ++k)
    rows[k] = c.codes + uint64_t{std::min(t0 + k, c.n - 1)} * c.head_dim;
  const __m256 logits = c.group_shift >= 5 ? qk_tokens8_whole_units<Dot>(c, q, t0, rows)
                                           : qk_tokens8_split_units<Dot>(c, q, t0, rows);
  finish_logits8(c, q, t0, logits, out);
}

template <uint32_t Bits, class Dot>
void qk_int(const PagedKvView& pool, const TileRef& keys, uint32_t n, const QueryRows& q,
            uint32_t rows, float* out, uint32_t out_stride, float* scratch) {
  const IntKeyChunk chunk = IntKeyChunk::make<Bits>(pool, keys, n, scratch);
  for (uint32_t r = 0; r < rows; ++r) {
    for (uint32_t t0 = 0; t0 < n; t0 += 8)
      qk_tokens8<Dot>(chunk, q.from(r), t0, out + uint64_t{r} * out_stride);
  }
}

// ---- pv

// 8 unpacked codes as f32.
__m256 load_codes8(const uint8_t* p) {
  uint64_t raw;
  std::memcpy(&raw, p, 8);
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(raw))));
}

// acc[r][d] += sum_t p[r][t] * V[t][d] for R rows, 16 dimensions at a time kept in registers.
// `column(d)` returns the reader of dimensions [d, d + 16): read(t, v0, v1) gives token t's 16
// values as f32, however the format stores them. Shared by every format's pv.
template <uint32_t R, class Column>
void pv_accumulate16(uint32_t hd, uint32_t n, const float* p, uint32_t p_stride, float* acc,
                     Column column) {
  for (uint32_t d = 0; d < hd; d += 16) {
    const auto read = column(d);
    __m256 a[R][2];
    for (uint32_t j = 0; j < R; ++j) {
      a[j][0] = _mm256_loadu_ps(acc + uint64_t{j} * hd + d);
      a[j][1] = _mm256_loadu_ps(acc + uint64_t{j} * hd + d + 8);
    }
    for (uint32_t t = 0; t < n; ++t) {
      __m256 v0, v1;
      read(t, v0, v1);
      for (uint32_t j = 0; j < R; ++j) {
        const __m256 w = _mm256_broadcast_ss(p + uint64_t{j} * p_stride + t);
        a[j][0] = _mm256_fmadd_ps(w, v0, a[j][0]);
        a[j][1] = _mm256_fmadd_ps(w, v1, a[j][1]);
      }
    }
    for (uint32_t j = 0; j < R; ++j) {
      _mm256_storeu_ps(acc + uint64_t{j} * hd + d, a[j][0]);
      _mm256_storeu_ps(acc + uint64_t{j} * hd + d + 8, a[j][1]);
    }
  }
}

// pv_accumulate16 over unpacked integer codes: each code is converted to f32 once and
// dequantized with one FMA (code * scale + offset, offset = -(zero * scale) from `offsets`), then
// used by every row. One rounding more than quant::decode_row's exact form, far below the
// formats' own error.
template <uint32_t R>
void pv_int_rows(const PagedKvView& pool, const uint8_t* codes, const float* scales,
                 const float* offsets, uint32_t n, const float* p, uint32_t p_stride, float* acc) {
  const uint32_t hd = pool.head_dim, gpr = pool.groups_per_row;
  const uint32_t group_shift = static_cast<uint32_t>(__builtin_ctz(pool.group_size));
  pv_accumulate16<R>(hd, n, p, p_stride, acc, [&](uint32_t d) {
    const uint32_t g0 = d >> group_shift, g1 = (d + 8) >> group_shift;
    return [=](uint32_t t, __m256& v0, __m256& v1) {
      const uint8_t* row = codes + uint64_t{t} * hd + d;
      const uint64_t record = uint64_t{t} * gpr;
      const __m256 scale0 = _mm256_broadcast_ss(scales + record + g0);
      const __m256 offset0 = _mm256_broadcast_ss(offsets + record + g0);
      v0 = _mm256_fmadd_ps(load_codes8(row), scale0, offset0);
      v1 = g1 == g0 ? _mm256_fmadd_ps(load_codes8(row + 8), scale0, offset0)
                    : _mm256_fmadd_ps(load_codes8(row + 8),
                                      _mm256_broadcast_ss(scales + record + g1),
                                      _mm256_broadcast_ss(offsets + record + g1));
    };
  });
}

// pv of an integer format in passes of 4/2/1 rows. `scratch` (kMaxChunkRows * head_dim floats)
// holds the unpacked codes and the offsets.
template <uint32_t Bits>
void pv_int(const PagedKvView& pool, const TileRef& values, uint32_t n, const float* p,
            uint32_t p_stride, uint32_t rows, float* acc, float* scratch) {
  const uint32_t hd = pool.head_dim, count = n * pool.groups_per_row;
  const uint8_t* codes = chunk_codes<Bits>(pool, values, n, reinterpret_cast<uint8_t*>(scratch));
  float* offsets = scratch + uint64_t{n} * hd / 4;
  store_group_offsets(values, count, offsets);
  uint32_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    pv_int_rows<4>(pool, codes, values.scales, offsets, n, p + uint64_t{r} * p_stride, p_stride,
                   acc + uint64_t{r} * hd);
  }
  for (; r + 2 <= rows; r += 2) {
    pv_int_rows<2>(pool, codes, values.scales, offsets, n, p + uint64_t{r} * p_stride, p_stride,
                   acc + uint64_t{r} * hd);
  }
  for (; r < rows; ++r) {
    pv_int_rows<1>(pool, codes, values.scales, offsets, n, p + uint64_t{r} * p_stride, p_stride,
                   acc + uint64_t{r} * hd);
  }
}

}  // namespace
}  // namespace kvfabric::cpu
