// Dispatch of the attention instances, the split combine and the attention-mass kernels.
#include <cfloat>

#include "attention/attention.cuh"
#include "attention/instances.h"

namespace kvfabric::kernels {
namespace {

constexpr uint32_t kCombineThreads = 128;

//! The maximum (or sum) of one value per thread over the CTA; every thread gets the result.
template <bool kMax>
__device__ float combine_block_reduce(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  __syncthreads();  // scratch may still be read by an earlier reduction
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = scratch[0];
  for (uint32_t w = 1; w < kCombineThreads / 32; ++w)
    v = kMax ? fmaxf(v, scratch[w]) : v + scratch[w];
  return v;
}

// grid (num_items, num_q_heads), block kCombineThreads: merges the splits of one query head (when
// there are several) and records the head's final softmax max and sum for the mass kernel.
// The splits' weights exp(max_s - max) are computed once each, in parallel, and kept in shared
// memory a chunk at a time; each thread then sums its dimensions over the chunk with the loads of
// several splits in flight (a serial walk over the splits was latency-bound: 13 us at 16 x 4k).
template <int HD>
__global__ void combine_kernel(AttentionLaunch a, uint32_t num_kv_heads, uint32_t num_splits,
                               float* stats) {
  constexpr uint32_t kChunk = 256;
  constexpr int kDims = (HD + kCombineThreads - 1) / kCombineThreads;
  __shared__ float weight_s[kChunk];
  __shared__ float scratch[kCombineThreads / 32];
  const uint32_t item = blockIdx.x, qh = blockIdx.y;
  const uint32_t group = a.num_q_heads / num_kv_heads;
  const uint32_t head = qh / group, g = qh % group;
  const uint64_t stride = partial_floats(group, HD);
  // This head's partial of split s: first + s * stride -> [max, sum, HD accumulators].
  const float* first =
      a.workspace + (uint64_t{item} * num_kv_heads + head) * num_splits * stride + 2 + g * (HD + 2);
  float m = -FLT_MAX;
  for (uint32_t s = threadIdx.x; s < num_splits; s += kCombineThreads)
    m = fmaxf(m, first[s * stride]);
  const float global_max = combine_block_reduce<true>(m, scratch);

  float total = 0.0f;
  float sum[kDims];
#pragma unroll
  for (int k = 0; k < kDims; ++k)
    sum[k] = 0.0f;
  for (uint32_t c0 = 0; c0 < num_splits; c0 += kChunk) {
    const uint32_t n = min(kChunk, num_splits - c0);
    for (uint32_t i = threadIdx.x; i < n; i += kCombineThreads) {
      const float* p = first + (c0 + i) * stride;
      const float w = __expf(p[0] - global_max);
      total += p[1] * w;
      weight_s[i] = p[1] > 0.0f ? w : 0.0f;  // an empty split's accumulators were never written
    }
    __syncthreads();
    if (num_splits > 1) {
#pragma unroll
      for (int k = 0; k < kDims; ++k) {
        const uint32_t d = threadIdx.x + k * kCombineThreads;
        if (d < HD) {
#pragma unroll 8
          for (uint32_t i = 0; i < n; ++i) {
            const float w = weight_s[i];
            if (w > 0.0f) sum[k] += first[(c0 + i) * stride + 2 + d] * w;
          }
        }
      }
    }
    __syncthreads();  // weight_s is refilled by the next chunk
  }
  total = combine_block_reduce<false>(total, scratch);
  if (num_splits > 1) {
    const uint32_t row = a.item_row[item];
#pragma unroll
    for (int k = 0; k < kDims; ++k) {
      const uint32_t d = threadIdx.x + k * kCombineThreads;
      if (d < HD) {
        store_activation(a.output, a.query_dtype, (uint64_t{row} * a.num_q_heads + qh) * HD + d,
                         sum[k] / total);
      }
    }
  }
  if (stats != nullptr && threadIdx.x == 0) {
    stats[(uint64_t{item} * a.num_q_heads + qh) * 2] = global_max;
    stats[(uint64_t{item} * a.num_q_heads + qh) * 2 + 1] = total;
  }
}

// grid (num_items, ceil(max_context / 256)), block 256: mass[item][t] = sum over query heads of
// softmax(t), from the raw logits and the final statistics.
__global__ void mass_kernel(AttentionLaunch a, const float* logits, const float* stats) {
  const uint32_t item = blockIdx.x;
  const uint32_t t = blockIdx.y * blockDim.x + threadIdx.x;
  if (t >= a.item_context[item]) return;
  float mass = 0.0f;
  for (uint32_t qh = 0; qh < a.num_q_heads; ++qh) {
    const uint64_t s = uint64_t{item} * a.num_q_heads + qh;
    mass += __expf(logits[s * a.mass_stride + t] - stats[2 * s]) / stats[2 * s + 1];
  }
  a.mass[uint64_t{item} * a.mass_stride + t] = mass;
}

// The most splits any split size can produce: workspace is sized for it.
uint32_t max_splits(const AttentionLaunch& a) {
  return (a.max_context + 63) / 64;
}

}  // namespace

uint64_t attention_workspace_floats(const PagedKvView& pool, const AttentionLaunch& a,
                                    bool with_mass) {
  const uint32_t group = a.num_q_heads / pool.num_kv_heads;
  uint64_t floats = uint64_t{a.num_items} * pool.num_kv_heads * max_splits(a) *
                    partial_floats(group, pool.head_dim);
  floats += uint64_t{a.num_items} * a.num_q_heads * 2;  // final statistics
  if (with_mass) floats += uint64_t{a.num_items} * a.num_q_heads * a.mass_stride;  // raw logits
  return floats;
}

cudaError_t launch_attention(const PagedKvView& pool, const AttentionLaunch& a,
                             cudaStream_t stream) {
  const uint32_t group = a.num_q_heads / pool.num_kv_heads;
  const uint64_t partials = uint64_t{a.num_items} * pool.num_kv_heads * max_splits(a) *
                            partial_floats(group, pool.head_dim);
  float* stats = a.workspace + partials;
  float* logits = a.mass != nullptr ? stats + uint64_t{a.num_items} * a.num_q_heads * 2 : nullptr;
  cudaError_t err = cudaErrorInvalidValue;  // a (dtype, head_dim) without a compiled kernel
  uint32_t splits = 0;
#define KVF_DISPATCH_ATTENTION(DTYPE, NAME, HD)                             \
  if (pool.dtype == DType::DTYPE && pool.head_dim == HD) {                  \
    err = launch_attention_##NAME##_##HD(pool, a, logits, &splits, stream); \
  }
  KVF_ATTENTION_INSTANCES(KVF_DISPATCH_ATTENTION)
#undef KVF_DISPATCH_ATTENTION
  if (err != cudaSuccess) return err;
  if (splits > 1 || a.mass != nullptr) {
    const dim3 combine_grid(a.num_items, a.num_q_heads);
    switch (pool.head_dim) {
      case 64:
        combine_kernel<64>
            <<<combine_grid, kCombineThreads, 0, stream>>>(a, pool.num_kv_heads, splits, stats);
        break;
      case 128:
        combine_kernel<128>
            <<<combine_grid, kCombineThreads, 0, stream>>>(a, pool.num_kv_heads, splits, stats);
        break;
      default:
        combine_kernel<256>
            <<<combine_grid, kCombineThreads, 0, stream>>>(a, pool.num_kv_heads, splits, stats);
        break;
    }
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (a.mass != nullptr) {
    const dim3 mass_grid(a.num_items, (a.max_context + 255) / 256);
    mass_kernel<<<mass_grid, 256, 0, stream>>>(a, logits, stats);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace kvfabric::kernels
