#include "kvfabric/quant/quantize.h"

#include <algorithm>
#include <cmath>

#include "kvfabric/quant/kv_format.h"
#include "kvfabric/quant/numeric.h"

namespace kvfabric::quant {
namespace {

void encode_int_row(const RowFormat& f, const float* x, uint8_t* codes, float* scales,
                    uint8_t* zeros) {
  const uint32_t bits = dtype_bits(f.dtype);
  const uint32_t qmax = (1u << bits) - 1u;
  const uint32_t groups = f.head_dim / f.group_size;
  for (uint32_t g = 0; g < groups; ++g) {
    const float* xs = x + g * f.group_size;
    float lo = xs[0], hi = xs[0];
    for (uint32_t i = 1; i < f.group_size; ++i) {
      lo = xs[i] < lo ? xs[i] : lo;
      hi = xs[i] > hi ? xs[i] : hi;
    }
    const IntGroupParams p = int_group_params(lo, hi, qmax);
    scales[g] = p.scale;
    zeros[g] = static_cast<uint8_t>(p.zero);
    for (uint32_t i = 0; i < f.group_size; ++i) {
      numeric::pack_code(codes, g * f.group_size + i, bits, int_encode(xs[i], p, qmax));
    }
  }
}

}  // namespace

void encode_row(const RowFormat& f, const float* x, uint8_t* codes, float* scales, uint8_t* zeros) {
  switch (f.dtype) {
    case DType::kF32:
      std::memcpy(codes, x, sizeof(float) * f.head_dim);
      return;
    case DType::kF16:
    case DType::kBF16:
      store_activations(x, f.dtype, f.head_dim, codes);
      return;
    case DType::kFP8E4M3: {
      float absmax = 0.0f;
      bool all_equal = true;
      for (uint32_t i = 0; i < f.head_dim; ++i) {
        const float a = std::fabs(x[i]);
        absmax = a > absmax ? a : absmax;
        all_equal = all_equal && x[i] == x[0];
      }
      const Fp8RowParams p = fp8_row_params(absmax, all_equal, x[0]);
      scales[0] = p.scale;
      for (uint32_t i = 0; i < f.head_dim; ++i)
        codes[i] = fp8_encode(x[i], p);
      return;
    }
    case DType::kInt8:
    case DType::kInt4:
    case DType::kInt2:
      encode_int_row(f, x, codes, scales, zeros);
      return;
  }
}

void decode_row(const RowFormat& f, const uint8_t* codes, const float* scales, const uint8_t* zeros,
                float* out) {
  switch (f.dtype) {
    case DType::kF32:
      std::memcpy(out, codes, sizeof(float) * f.head_dim);
      return;
    case DType::kF16:
    case DType::kBF16:
      load_activations(codes, f.dtype, f.head_dim, out);
      return;
    case DType::kFP8E4M3:
      for (uint32_t i = 0; i < f.head_dim; ++i)
        out[i] = fp8_decode(codes[i], scales[0]);
      return;
    case DType::kInt8:
    case DType::kInt4:
    case DType::kInt2: {
      const uint32_t bits = dtype_bits(f.dtype);
      for (uint32_t i = 0; i < f.head_dim; ++i) {
        const uint32_t g = i / f.group_size;
        out[i] = int_decode(numeric::unpack_code(codes, i, bits), scales[g], zeros[g]);
      }
      return;
    }
  }
}

void load_activations(const void* src, DType dtype, uint64_t n, float* out) {
  switch (dtype) {
    case DType::kF16: {
      const auto* h = static_cast<const uint16_t*>(src);
      for (uint64_t i = 0; i < n; ++i)
        out[i] = numeric::f16_to_f32(h[i]);
      return;
    }
    case DType::kBF16: {
      const auto* b = static_cast<const uint16_t*>(src);
      for (uint64_t i = 0; i < n; ++i)
        out[i] = numeric::bf16_to_f32(b[i]);
      return;
    }
    default:
      std::memcpy(out, src, sizeof(float) * n);
      return;
  }
}

void store_activations(const float* src, DType dtype, uint64_t n, void* out) {
  switch (dtype) {
    case DType::kF16: {
      auto* h = static_cast<uint16_t*>(out);
      for (uint64_t i = 0; i < n; ++i)
        h[i] = numeric::f32_to_f16(src[i]);
      return;
    }
    case DType::kBF16: {
      auto* b = static_cast<uint16_t*>(out);
      for (uint64_t i = 0; i < n; ++i)
        b[i] = numeric::f32_to_bf16(src[i]);
      return;
    }
    default:
      std::memcpy(out, src, sizeof(float) * n);
      return;
  }
}

// append_kv's check reads every input element before anything is written: on x86-64 the scan is
// also compiled for AVX2 and AVX-512 (chosen when the program loads), twice and four times the
// elements per instruction of the baseline SSE2 build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
int64_t find_unstorable(const void* src, DType dtype, uint64_t n, uint32_t abs_bits) {
  // Branch-free scan in chunks (vectorizes); only a chunk that has a bad value is searched. NaN
  // and infinity have the largest magnitude bits, so one comparison finds them and the values
  // too large alike. A f16 input is never too large (65504 fits every format); a bf16 one is
  // the upper half of a f32, compared against the bound rounded up to its 16 bits.
  constexpr uint64_t kChunk = 256;
  const bool half = dtype == DType::kF16 || dtype == DType::kBF16;
  const uint32_t limit = dtype == DType::kF16    ? 0x7C00u
                         : dtype == DType::kBF16 ? (abs_bits + 0xFFFFu) >> 16
                                                 : abs_bits;
  const uint32_t magnitude = half ? 0x7FFFu : 0x7FFFFFFFu;
  const auto* h = static_cast<const uint16_t*>(src);
  const auto* f = static_cast<const uint32_t*>(src);
  for (uint64_t begin = 0; begin < n; begin += kChunk) {
    const uint64_t end = std::min(n, begin + kChunk);
    uint32_t bad = 0;
    if (half) {
      for (uint64_t i = begin; i < end; ++i)
        bad |= static_cast<uint32_t>((h[i] & magnitude) >= limit);
    } else {
      for (uint64_t i = begin; i < end; ++i)
        bad |= static_cast<uint32_t>((f[i] & magnitude) >= limit);
    }
    if (bad == 0) continue;
    for (uint64_t i = begin; i < end; ++i) {
      const uint32_t bits = half ? h[i] : f[i];
      if ((bits & magnitude) >= limit) return static_cast<int64_t>(i);
    }
  }
  return -1;
}

int64_t find_non_finite(const void* src, DType dtype, uint64_t n) {
  return find_unstorable(src, dtype, n, unstorable_abs_bits(DType::kF32));
}

uint32_t unstorable_abs_bits(DType pool_dtype) {
  if (pool_dtype == DType::kF16) return 0x477FF000u;  // 65520: halfway to 65536, rounds up
  if (pool_dtype == DType::kBF16) return 0x7F7F8000u;  // halfway past bf16's largest, rounds up
  if (is_integer_quantized(pool_dtype)) return 0x7F000000u;  // 2^127
  return 0x7F800000u;                                        // infinity
}

}  // namespace kvfabric::quant
