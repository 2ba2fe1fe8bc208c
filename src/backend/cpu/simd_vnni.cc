// Compiled with -mavx2 -mfma -mf16c -mavx512vnni -mavx512vl; used only when the processor reports
// all of them. The AVX2 kernels, except the integer formats' qk: VNNI's dpbusd multiplies 32
// unsigned codes by 32 signed query codes and adds each four products to an int32 lane in one
// instruction, without the AVX2 version's int16 step (and so without its centring of 8-bit codes).
#include "backend/cpu/simd_ops.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#include "backend/cpu/simd_int_x86.h"

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

void qk(const PagedKvView& pool, const TileRef& keys, uint32_t n, const QueryRows& q, uint32_t rows,
        float* out, uint32_t out_stride, float* scratch) {
  if (!vnni_fits(pool)) {
    avx2_simd_ops()->qk(pool, keys, n, q, rows, out, out_stride, scratch);
    return;
  }
  switch (dtype_bits(pool.dtype)) {
    case 8:
      qk_int<8, VnniDot>(pool, keys, n, q, rows, out, out_stride, scratch);
      break;
    case 4:
      qk_int<4, VnniDot>(pool, keys, n, q, rows, out, out_stride, scratch);
      break;
    default:
      qk_int<2, VnniDot>(pool, keys, n, q, rows, out, out_stride, scratch);
      break;
  }
}

}  // namespace

const SimdOps* avx2_vnni_simd_ops() {
  static const SimdOps ops = [] {
    SimdOps o = *avx2_simd_ops();
    o.name = "avx2-vnni";
    o.qk = qk;
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
