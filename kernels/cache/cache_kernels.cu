// Writing, reading, checking and moving KV slots on the GPU; the CPU backend is the reference
// (src/backend/cpu/cache_ops.cc) and append writes the same bytes.
#include <cfloat>
#include <climits>

#include "api.h"
#include "common/dequant.cuh"

namespace kvfabric::kernels {
namespace {

constexpr int kAppendThreads = 128;

// Packs 8 codes of `bits` bits (element i at bits [i * bits, ...)) and stores them at `out`.
__device__ void store_codes8(uint8_t* out, const uint32_t (&q)[8], uint32_t bits) {
  if (bits == 8) {
    uint2 w;
    w.x = q[0] | (q[1] << 8) | (q[2] << 16) | (q[3] << 24);
    w.y = q[4] | (q[5] << 8) | (q[6] << 16) | (q[7] << 24);
    *reinterpret_cast<uint2*>(out) = w;
  } else if (bits == 4) {
    uint32_t w = 0;
    for (int e = 0; e < 8; ++e)
      w |= q[e] << (4 * e);
    *reinterpret_cast<uint32_t*>(out) = w;
  } else {
    uint32_t w = 0;
    for (int e = 0; e < 8; ++e)
      w |= q[e] << (2 * e);
    *reinterpret_cast<uint16_t*>(out) = static_cast<uint16_t>(w);
  }
}

__device__ uint32_t pack_halves(uint16_t lo, uint16_t hi) {
  return lo | (uint32_t{hi} << 16);
}

// Each row (token, head, K|V) is handled by head_dim / 8 consecutive lanes (`tpt`, a power of
// two <= 32), each converting 8 elements; rows never straddle a warp.
// grid ceil(rows * tpt / kAppendThreads), block kAppendThreads.
__global__ void append_kernel(PagedKvView pool, uint32_t layer, const void* key, const void* value,
                              DType input_dtype, uint32_t num_tokens, const int64_t* slots) {
  const uint32_t heads = pool.num_kv_heads, hd = pool.head_dim;
  const uint32_t tpt = hd / kElemsPerThread;
  const uint64_t thread = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const uint64_t r = thread / tpt;
  const uint64_t rows = uint64_t{num_tokens} * heads * 2;
  const uint32_t lane = threadIdx.x % tpt;
  // Rows past the end and padding tokens keep their lanes in the shuffles below but write nothing.
  const bool row_valid = r < rows;
  const uint32_t kv = r % 2;
  const uint32_t head = (r / 2) % heads;
  const uint32_t token = row_valid ? static_cast<uint32_t>(r / 2 / heads) : 0;
  const int64_t slot = row_valid ? slots[token] : -1;
  const uint32_t d0 = lane * kElemsPerThread;
  float x[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (slot >= 0) {
    load_activation8(kv == 0 ? key : value, input_dtype, (uint64_t{token} * heads + head) * hd + d0,
                     x);
  }
  const uint64_t block = slot >= 0 ? static_cast<uint64_t>(slot) / pool.block_size : 0;
  const uint32_t offset =
      slot >= 0 ? static_cast<uint32_t>(static_cast<uint64_t>(slot) % pool.block_size) : 0;
  uint8_t* row = pool.codes(block, layer, kv, head) + offset * pool.row_bytes;
  float* scales = pool.scales(block, layer, kv, head) + uint64_t{offset} * pool.groups_per_row;
  uint8_t* zeros = pool.zeros(block, layer, kv, head) + uint64_t{offset} * pool.groups_per_row;

  switch (pool.dtype) {
    case DType::kF32:
      if (slot >= 0) {
        reinterpret_cast<float4*>(row + 4 * d0)[0] = make_float4(x[0], x[1], x[2], x[3]);
        reinterpret_cast<float4*>(row + 4 * d0)[1] = make_float4(x[4], x[5], x[6], x[7]);
      }
      return;
    case DType::kF16:
    case DType::kBF16:
      if (slot >= 0) {
        uint16_t h[8];
        for (int e = 0; e < 8; ++e) {
          h[e] = pool.dtype == DType::kF16 ? numeric::f32_to_f16(x[e]) : numeric::f32_to_bf16(x[e]);
        }
        *reinterpret_cast<uint4*>(row + 2 * d0) =
            make_uint4(pack_halves(h[0], h[1]), pack_halves(h[2], h[3]), pack_halves(h[4], h[5]),
                       pack_halves(h[6], h[7]));
      }
      return;
    case DType::kFP8E4M3: {
      const float first = __shfl_sync(0xffffffffu, x[0], 0, tpt);
      float absmax = 0.0f;
      bool differs = false;
      for (int e = 0; e < 8; ++e) {
        absmax = fmaxf(absmax, fabsf(x[e]));
        differs = differs || x[e] != first;
      }
      float any_differs = differs ? 1.0f : 0.0f;
      for (uint32_t o = tpt / 2; o > 0; o /= 2) {
        absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, o, tpt));
        any_differs = fmaxf(any_differs, __shfl_xor_sync(0xffffffffu, any_differs, o, tpt));
      }
      if (slot < 0) return;
      const quant::Fp8RowParams p = quant::fp8_row_params(absmax, any_differs == 0.0f, first);
      if (lane == 0) scales[0] = p.scale;
      uint32_t q[8];
      for (int e = 0; e < 8; ++e)
        q[e] = quant::fp8_encode(x[e], p);
      store_codes8(row + d0, q, 8);
      return;
    }
    default: {  // integer formats: the lanes of one group reduce its range together
      const uint32_t bits = dtype_bits(pool.dtype);
      const uint32_t qmax = (1u << bits) - 1u;
      const uint32_t lanes_per_group = pool.group_size / kElemsPerThread;  // a power of two <= tpt
      float lo = x[0], hi = x[0];
      for (int e = 1; e < 8; ++e) {
        lo = fminf(lo, x[e]);
        hi = fmaxf(hi, x[e]);
      }
      for (uint32_t o = lanes_per_group / 2; o > 0; o /= 2) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o, lanes_per_group));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o, lanes_per_group));
      }
      if (slot < 0) return;
      const quant::IntGroupParams p = quant::int_group_params(lo, hi, qmax);
      const uint32_t g = d0 / pool.group_size;
      if (d0 % pool.group_size == 0) {
        scales[g] = p.scale;
        zeros[g] = static_cast<uint8_t>(p.zero);
      }
      uint32_t q[8];
      for (int e = 0; e < 8; ++e)
        q[e] = quant::int_encode(x[e], p, qmax);
      store_codes8(row + d0 * bits / 8, q, bits);
      return;
    }
  }
}

// One thread per (token, head, K|V, 8 elements).
template <DType D>
__global__ void gather_kernel(PagedKvView pool, uint32_t layer, const uint32_t* table,
                              uint32_t num_tokens, float* key_out, float* value_out) {
  const uint32_t chunks = pool.head_dim / kElemsPerThread;
  const uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= uint64_t{num_tokens} * pool.num_kv_heads * 2 * chunks) return;
  const uint32_t d0 = (i % chunks) * kElemsPerThread;
  const uint32_t kv = (i / chunks) % 2;
  const uint32_t head = (i / chunks / 2) % pool.num_kv_heads;
  const uint32_t token = static_cast<uint32_t>(i / chunks / 2 / pool.num_kv_heads);
  const uint32_t block = table[token / pool.block_size];
  float v[8];
  read8<D>(pool, pool.codes(block, layer, kv, head), pool.scales(block, layer, kv, head),
           pool.zeros(block, layer, kv, head), token % pool.block_size, d0, v);
  float* out = (kv == 0 ? key_out : value_out) +
               (uint64_t{token} * pool.num_kv_heads + head) * pool.head_dim + d0;
  for (int e = 0; e < 8; ++e)
    out[e] = v[e];
}

// A grid-stride loop, one element per thread and step.
// The same test as quant::find_unstorable: NaN and infinity have the largest magnitude bits.
__global__ void find_unstorable_kernel(const void* data, DType dtype, uint64_t n,
                                       uint32_t abs_bits, unsigned long long* flag) {
  const uint32_t half_limit = dtype == DType::kF16 ? 0x7C00u : (abs_bits + 0xFFFFu) >> 16;
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x) {
    bool bad;
    if (dtype == DType::kF32) {
      bad = (__float_as_uint(static_cast<const float*>(data)[i]) & 0x7FFFFFFFu) >= abs_bits;
    } else {
      bad = (static_cast<uint32_t>(static_cast<const uint16_t*>(data)[i]) & 0x7FFFu) >= half_limit;
    }
    if (bad) atomicMin(flag, static_cast<unsigned long long>(i));
  }
}

// grid (count, slices), block 256: block copies with 16-byte accesses.
__global__ void copy_blocks_kernel(const BlockCopyOp* ops, uint64_t block_bytes) {
  const BlockCopyOp op = ops[blockIdx.x];
  const uint64_t words = block_bytes / 16;
  const auto* src = reinterpret_cast<const uint4*>(op.src);
  auto* dst = reinterpret_cast<uint4*>(op.dst);
  for (uint64_t i = uint64_t{blockIdx.y} * blockDim.x + threadIdx.x; i < words;
       i += uint64_t{gridDim.y} * blockDim.x) {
    dst[i] = src[i];
  }
}

// Copies `bytes` from src to dst like memmove, cooperatively in the CTA: chunks are staged in
// registers and walked away from the overlap, so no chunk reads bytes another already wrote.
__device__ void cta_memmove(uint8_t* dst, const uint8_t* src, uint64_t bytes) {
  const uint64_t chunk = blockDim.x;
  const bool forward = dst <= src;
  for (uint64_t done = 0; done < bytes; done += chunk) {
    const uint64_t base = forward ? done : bytes - min(bytes, done + chunk);
    const uint64_t count = forward ? min(chunk, bytes - done) : min(chunk, bytes - done);
    const uint64_t i = base + threadIdx.x;
    uint8_t v = 0;
    if (threadIdx.x < count) v = src[i];
    __syncthreads();
    if (threadIdx.x < count) dst[i] = v;
    __syncthreads();
  }
}

// grid (count, tiles of a block of dst), block 256: one TokenCopy for one (layer, K|V, head)
// tile of dst, read from the same model layer of src (dst itself, or another view of its arena).
__global__ void token_copies_kernel(PagedKvView src, PagedKvView dst, const TokenCopy* ops) {
  const TokenCopy c = ops[blockIdx.x];
  const uint32_t tile = blockIdx.y;
  const uint32_t layer = tile / (2 * dst.num_kv_heads);
  const uint32_t kv = (tile / dst.num_kv_heads) % 2;
  const uint32_t head = tile % dst.num_kv_heads;
  const uint32_t src_layer = dst.first_layer - src.first_layer + layer;
  cta_memmove(dst.codes(c.dst_block.value, layer, kv, head) + c.dst_offset * dst.row_bytes,
              src.codes(c.src_block.value, src_layer, kv, head) + c.src_offset * dst.row_bytes,
              uint64_t{c.num_tokens} * dst.row_bytes);
  const uint64_t gpr = dst.groups_per_row;
  if (gpr == 0) return;
  cta_memmove(reinterpret_cast<uint8_t*>(dst.scales(c.dst_block.value, layer, kv, head) +
                                         c.dst_offset * gpr),
              reinterpret_cast<const uint8_t*>(src.scales(c.src_block.value, src_layer, kv, head) +
                                               c.src_offset * gpr),
              c.num_tokens * gpr * sizeof(float));
  if (!is_integer_quantized(dst.dtype)) return;
  cta_memmove(dst.zeros(c.dst_block.value, layer, kv, head) + c.dst_offset * gpr,
              src.zeros(c.src_block.value, src_layer, kv, head) + c.src_offset * gpr,
              c.num_tokens * gpr);
}

}  // namespace

cudaError_t launch_append_kv(const PagedKvView& pool, uint32_t layer, const void* key,
                             const void* value, DType input_dtype, uint32_t num_tokens,
                             const int64_t* slots, cudaStream_t stream) {
  const uint64_t threads =
      uint64_t{num_tokens} * pool.num_kv_heads * 2 * (pool.head_dim / kElemsPerThread);
  if (threads == 0) return cudaSuccess;
  append_kernel<<<static_cast<unsigned>((threads + kAppendThreads - 1) / kAppendThreads),
                  kAppendThreads, 0, stream>>>(pool, layer, key, value, input_dtype, num_tokens,
                                               slots);
  return cudaGetLastError();
}

cudaError_t launch_gather_kv(const PagedKvView& pool, uint32_t layer, const uint32_t* table,
                             uint32_t num_tokens, float* key_out, float* value_out,
                             cudaStream_t stream) {
  const uint64_t threads =
      uint64_t{num_tokens} * pool.num_kv_heads * 2 * (pool.head_dim / kElemsPerThread);
  if (threads == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>((threads + 255) / 256);
  switch (pool.dtype) {
    case DType::kF32:
      gather_kernel<DType::kF32>
          <<<grid, 256, 0, stream>>>(pool, layer, table, num_tokens, key_out, value_out);
      break;
    case DType::kF16:
      gather_kernel<DType::kF16>
          <<<grid, 256, 0, stream>>>(pool, layer, table, num_tokens, key_out, value_out);
      break;
    case DType::kBF16:
      gather_kernel<DType::kBF16>
          <<<grid, 256, 0, stream>>>(pool, layer, table, num_tokens, key_out, value_out);
      break;
    case DType::kFP8E4M3:
      gather_kernel<DType::kFP8E4M3>
          <<<grid, 256, 0, stream>>>(pool, layer, table, num_tokens, key_out, value_out);
      break;
    case DType::kInt8:
      gather_kernel<DType::kInt8>
          <<<grid, 256, 0, stream>>>(pool, layer, table, num_tokens, key_out, value_out);
      break;
    case DType::kInt4:
      gather_kernel<DType::kInt4>
          <<<grid, 256, 0, stream>>>(pool, layer, table, num_tokens, key_out, value_out);
      break;
    case DType::kInt2:
      gather_kernel<DType::kInt2>
          <<<grid, 256, 0, stream>>>(pool, layer, table, num_tokens, key_out, value_out);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_find_unstorable(const void* data, DType dtype, uint64_t n, uint32_t abs_bits,
                                   unsigned long long* flag, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min<uint64_t>((n + 255) / 256, 4096));
  find_unstorable_kernel<<<grid, 256, 0, stream>>>(data, dtype, n, abs_bits, flag);
  return cudaGetLastError();
}

cudaError_t launch_copy_blocks(const BlockCopyOp* ops, uint32_t count, uint64_t block_bytes,
                               cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const unsigned slices =
      static_cast<unsigned>(std::min<uint64_t>((block_bytes / 16 + 255) / 256, 64));
  copy_blocks_kernel<<<dim3(count, slices), 256, 0, stream>>>(ops, block_bytes);
  return cudaGetLastError();
}

cudaError_t launch_token_copies(const PagedKvView& src, const PagedKvView& dst,
                                const TokenCopy* ops, uint32_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const unsigned tiles = dst.num_layers * 2 * dst.num_kv_heads;
  token_copies_kernel<<<dim3(count, tiles), 256, 0, stream>>>(src, dst, ops);
  return cudaGetLastError();
}

}  // namespace kvfabric::kernels
