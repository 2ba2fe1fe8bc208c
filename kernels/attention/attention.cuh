// Paged attention over one (query token, KV head, context split) per CTA, all query heads of the
// GQA group together, dequantizing K/V rows in registers. Splits are merged by combine_kernel
// (flash decoding). Layout and math follow the CPU reference (src/backend/cpu/attention.cc).
#pragma once

#include <algorithm>
#include <cfloat>

#include "api.h"
#include "common/dequant.cuh"

namespace kvfabric::kernels {

inline constexpr int kAttentionThreads = 128;
//! Query heads one CTA serves; a GQA group of 8 takes two CTAs per KV head. Fewer accumulators
//! per thread keep more CTAs resident, which a bandwidth-bound kernel needs more than reuse.
inline constexpr uint32_t kHeadsPerCta = 4;
//! CTAs per SM the register budget is sized for: 6 leaves 80 registers a thread. Measured on an
//! H100 (f16, 16 x 4k): 8 CTAs (64 registers, spilling) were 5 % slower, 5 (no spills, fewer warps
//! to hide memory latency) 13 % slower.
inline constexpr int kAttentionMinCtasPerSm = 6;

__host__ __device__ inline uint32_t head_slices(uint32_t group) {
  return (group + kHeadsPerCta - 1) / kHeadsPerCta;
}

//! Per (item, KV head, split): max, sum, then group x head_dim accumulators.
__host__ __device__ inline uint64_t partial_floats(uint32_t group, uint32_t head_dim) {
  return 2 + uint64_t{group} * (head_dim + 2);
}

//! Split size (tokens per CTA) for `base_ctas` CTAs per split and `resident` CTAs the GPU runs at
//! once: the largest split, down to 64 tokens, whose grid fills its last wave best (a nearly
//! empty last wave costs as much as a full one).
__host__ inline uint32_t choose_split_tokens(uint32_t base_ctas, uint32_t max_context,
                                             uint32_t resident) {
  // Every CTA has a fixed cost (query load, softmax, reduction, partial write): the largest split
  // whose waves are at least 85% full wins; otherwise the best-filled one.
  uint32_t best = kSplitTokens;
  double best_fill = 0.0;
  for (uint32_t split = kSplitTokens; split >= 64; split /= 2) {
    const uint64_t ctas = uint64_t{base_ctas} * ((max_context + split - 1) / split);
    const uint64_t waves = (ctas + resident - 1) / std::max<uint32_t>(resident, 1);
    const double fill = static_cast<double>(ctas) / static_cast<double>(waves * resident);
    if (fill >= 0.85) return split;
    if (fill > best_fill) {
      best_fill = fill;
      best = split;
    }
  }
  return best;
}

template <int HD>
struct AttentionShape {
  static constexpr int kThreadsPerToken = HD / kElemsPerThread;  // lanes sharing one K/V row
  static constexpr int kTokensPerPass = kAttentionThreads / kThreadsPerToken;
};

//! Sums N per-lane values over the `Lanes` lanes of a token group (Lanes a power of two dividing
//! 32) as a reduce-scatter: at each step a lane keeps one half of its values, sends the other half
//! to its partner and adds what the partner sent, so N values cost N - 1 shuffles (plus one per
//! step left once a single value remains) instead of N * log2(Lanes). Afterwards v[0, max(1, N /
//! Lanes)) hold complete sums of the values whose indices start at the returned base.
template <int Offset, int Count, int N>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[N], uint32_t lane, uint32_t& base) {
  if constexpr (Offset > 0) {
    if constexpr (Count > 1) {
      constexpr int kHalf = Count / 2;
      const bool upper = (lane & Offset) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, Offset);
      }
      if (upper) base += kHalf;
      reduce_scatter_step<Offset / 2, kHalf>(v, lane, base);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], Offset);
      reduce_scatter_step<Offset / 2, 1>(v, lane, base);
    }
  }
}

template <int Lanes, int N>
__device__ __forceinline__ uint32_t reduce_scatter(float (&v)[N], uint32_t lane) {
  uint32_t base = 0;
  reduce_scatter_step<Lanes / 2, N>(v, lane, base);
  return base;
}

// grid (num_items, num_kv_heads * head_slices(group), num_splits), block kAttentionThreads.
// query/output [rows, num_q_heads, HD]; workspace partials [items][kv_heads][splits][...].
//
// Each group of HD/8 lanes owns one token at a time and each lane 8 of its dimensions. A thread
// keeps kUnroll rows in flight: the registers of a row are refilled with the row of the next pass
// as soon as it is decoded, so loads stay outstanding while the thread computes. The split's block
// ids are staged in shared memory first. A GQA group smaller than kHeadsPerCta is padded with zero
// query heads, so the inner loops have no per-head branches.
template <DType D, int HD>
__global__ void __launch_bounds__(kAttentionThreads, kAttentionMinCtasPerSm)
    attention_kernel(PagedKvView pool, AttentionLaunch a, uint32_t num_splits,
                     uint32_t split_tokens, float* logits_out) {
  using Shape = AttentionShape<HD>;
  constexpr int TPT = Shape::kThreadsPerToken;
  constexpr int TPP = Shape::kTokensPerPass;
  // Rows in flight per thread: 2 of f32 (64 bytes), 4 of the others (64 bytes of f16/bf16, 32 of
  // fp8/int8, 16 of int4).
  constexpr int kUnroll = Raw8<D>::kWords >= 8 ? 2 : 4;
  constexpr int kGroup = kHeadsPerCta;
  constexpr int kDots = kUnroll * kGroup;  // partial logits per thread and pass
  constexpr int kProbFloats = kGroup * kSplitTokens;
  constexpr int kReduceFloats = TPP * kGroup * HD;
  __shared__ float smem[kProbFloats > kReduceFloats ? kProbFloats : kReduceFloats];
  __shared__ uint32_t blocks_s[kSplitTokens + 2];
  __shared__ float row_max[kGroup], row_sum[kGroup];
  float* p_s = smem;  // [heads of this CTA][kSplitTokens] logits, then probabilities

  const uint32_t group_total = a.num_q_heads / pool.num_kv_heads;
  const uint32_t slices = head_slices(group_total);
  const uint32_t item = blockIdx.x, head = blockIdx.y / slices, split = blockIdx.z;
  const uint32_t first_g = (blockIdx.y % slices) * kGroup;  // this CTA's heads within the group
  const uint32_t group = min(kHeadsPerCta, group_total - first_g);
  const uint32_t context = a.item_context[item];
  const uint32_t begin = split * split_tokens;
  const uint32_t end = min(context, begin + split_tokens);
  const uint32_t row = a.item_row[item];
  // Partials of the whole group, [item][kv head][split]; this CTA fills heads first_g.. only.
  float* partial = a.workspace +
                   ((uint64_t{item} * pool.num_kv_heads + head) * num_splits + split) *
                       partial_floats(group_total, HD) +
                   2 + first_g * (HD + 2);
  if (begin >= end) {  // an empty split (shorter context than the grid): a neutral partial
    if (threadIdx.x < group) {
      partial[threadIdx.x * (HD + 2)] = -FLT_MAX;
      partial[threadIdx.x * (HD + 2) + 1] = 0.0f;
    }
    return;
  }
  const uint32_t len = end - begin;
  const uint32_t bs = pool.block_size;
  const uint32_t first_block = begin / bs;
  const uint32_t* table = a.block_tables + uint64_t{a.item_table[item]} * a.max_blocks_per_seq;
  for (uint32_t i = threadIdx.x; i <= (end - 1) / bs - first_block; i += blockDim.x) {
    blocks_s[i] = table[first_block + i];
  }

  const uint32_t lane_token = threadIdx.x / TPT;  // which token of a pass
  const uint32_t token_lane = threadIdx.x % TPT;  // which lane of its token group
  const uint32_t d0 = token_lane * kElemsPerThread;
  // This lane's 8 query elements of every head of the group, scaled; zero for padding heads.
  float q[kGroup][8];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g < group) {
      const uint64_t first =
          (uint64_t{row} * a.num_q_heads + head * group_total + first_g + g) * HD + d0;
      load_activation8(a.query, a.query_dtype, first, q[g]);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e)
      q[g][e] = g < group ? q[g][e] * a.softmax_scale : 0.0f;
  }
  __syncthreads();  // blocks_s

  auto load_row = [&](uint32_t kv, uint32_t t, Raw8<D>& raw) {
    const uint32_t pos = begin + t;
    const uint32_t block = blocks_s[pos / bs - first_block];
    raw.load(pool, pool.codes(block, a.layer, kv, head), pool.scales(block, a.layer, kv, head),
             pool.zeros(block, a.layer, kv, head), pos % bs, d0);
  };
  constexpr uint32_t kStep = TPP * kUnroll;  // tokens per pass of the CTA
  Raw8<D> raw[kUnroll] = {};
  auto load_first_pass = [&](uint32_t kv) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t t = u * TPP + lane_token;
      if (t < len) load_row(kv, t, raw[u]);
    }
  };

  // Phase 1: logits of every token of the split for each query head of the group.
  load_first_pass(0);
  for (uint32_t t0 = 0; t0 < len; t0 += kStep) {
    float dots[kDots];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t t = t0 + u * TPP + lane_token;
      float k[8];
      raw[u].decode_unscaled(k);
      const float scale = raw[u].row_scale();
      if (t + kStep < len) load_row(0, t + kStep, raw[u]);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e)
          dot = fmaf(q[g][e], k[e], dot);
        dots[u * kGroup + g] = Raw8<D>::kRowScaled ? dot * scale : dot;
      }
    }
    // Rows past the split hold stale or zero data: their sums are formed but never stored.
    const uint32_t base = reduce_scatter<TPT>(dots, token_lane);
    constexpr int kKept = kDots > TPT ? kDots / TPT : 1;
    constexpr uint32_t kLanesPerSum = kDots >= TPT ? 1 : TPT / kDots;  // lanes holding one sum
#pragma unroll
    for (int i = 0; i < kKept; ++i) {
      const uint32_t u = (base + i) / kGroup, g = (base + i) % kGroup;
      const uint32_t t = t0 + u * TPP + lane_token;
      if (t < len && g < group && token_lane % kLanesPerSum == 0) {
        p_s[g * kSplitTokens + t] = dots[i];
      }
    }
  }
  load_first_pass(1);  // the first values are in flight during the softmax
  __syncthreads();

  // Softmax statistics per query head: warp w handles heads w, w + 4.
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (uint32_t g = warp; g < group; g += kAttentionThreads / 32) {
    float m = -FLT_MAX;
    for (uint32_t t = lane; t < len; t += 32)
      m = fmaxf(m, p_s[g * kSplitTokens + t]);
    for (int offset = 16; offset > 0; offset /= 2)
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    float s = 0.0f;
    for (uint32_t t = lane; t < len; t += 32) {
      const float logit = p_s[g * kSplitTokens + t];
      if (logits_out != nullptr) {
        logits_out[(uint64_t{item} * a.num_q_heads + head * group_total + first_g + g) *
                       a.mass_stride +
                   begin + t] = logit;
      }
      const float e = __expf(logit - m);
      p_s[g * kSplitTokens + t] = e;
      s += e;
    }
    for (int offset = 16; offset > 0; offset /= 2)
      s += __shfl_xor_sync(0xffffffffu, s, offset);
    if (lane == 0) {
      row_max[g] = m;
      row_sum[g] = s;
    }
  }
  __syncthreads();

  // Phase 2: each thread sums p * v over its tokens for its 8 dimensions.
  float acc[kGroup][8];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      acc[g][e] = 0.0f;
  }
  for (uint32_t t0 = 0; t0 < len; t0 += kStep) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t t = t0 + u * TPP + lane_token;
      if (t >= len) continue;
      float v[8];
      raw[u].decode_unscaled(v);
      const float scale = raw[u].row_scale();
      if (t + kStep < len) load_row(1, t + kStep, raw[u]);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        // Padding heads have no probabilities: their sums are never stored.
        const float p =
            Raw8<D>::kRowScaled ? p_s[g * kSplitTokens + t] * scale : p_s[g * kSplitTokens + t];
#pragma unroll
        for (int e = 0; e < 8; ++e)
          acc[g][e] = fmaf(p, v[e], acc[g][e]);
      }
    }
  }
  __syncthreads();    // p_s is no longer read: reuse smem for the cross-token reduction
  float* red = smem;  // [TPP][group][HD]
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g < group) {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        red[(lane_token * group + g) * HD + d0 + e] = acc[g][e];
    }
  }
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < group * HD; i += blockDim.x) {
    float sum = 0.0f;
    for (uint32_t l = 0; l < TPP; ++l)
      sum += red[l * group * HD + i];
    const uint32_t g = i / HD, d = i % HD;
    if (num_splits == 1) {
      store_activation(a.output, a.query_dtype,
                       (uint64_t{row} * a.num_q_heads + head * group_total + first_g + g) * HD + d,
                       sum / row_sum[g]);
    } else {
      partial[g * (HD + 2) + 2 + d] = sum;
    }
  }
  if (threadIdx.x < group) {
    partial[threadIdx.x * (HD + 2)] = row_max[threadIdx.x];
    partial[threadIdx.x * (HD + 2) + 1] = row_sum[threadIdx.x];
  }
}

}  // namespace kvfabric::kernels
