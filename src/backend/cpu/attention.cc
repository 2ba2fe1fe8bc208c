// Paged attention on the CPU. Work is split over (sequence, KV head) pairs; the query heads of a
// GQA group share each decoded K/V tile, so every KV byte is read once per call.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/kernels.h"
#include "kvfabric/quant/quantize.h"

namespace kvfabric::cpu {
namespace {

// Loads query rows [first_row, first_row + rows) of a [*, num_q_heads, hd] tensor slice as f32,
// pre-multiplied by the softmax scale.
void load_scaled_rows(const void* tensor, DType dtype, uint64_t first_element, uint32_t rows,
                      uint32_t hd, float scale, float* out) {
  const size_t elem = dtype == DType::kF32 ? 4 : 2;
  quant::load_activations(static_cast<const uint8_t*>(tensor) + first_element * elem, dtype,
                          uint64_t{rows} * hd, out);
  for (uint64_t i = 0; i < uint64_t{rows} * hd; ++i)
    out[i] *= scale;
}

void store_rows(const float* rows_f32, uint32_t rows, uint32_t hd, DType dtype, void* tensor,
                uint64_t first_element) {
  const size_t elem = dtype == DType::kF32 ? 4 : 2;
  quant::store_activations(rows_f32, dtype, uint64_t{rows} * hd,
                           static_cast<uint8_t*>(tensor) + first_element * elem);
}

TileRef tile_of(const PagedKvView& pool, uint32_t block, uint32_t layer, uint32_t kv,
                uint32_t head) {
  return TileRef{pool.codes(block, layer, kv, head), pool.scales(block, layer, kv, head),
                 pool.zeros(block, layer, kv, head)};
}

}  // namespace

void decode_attention(const SimdOps& ops, const PagedKvView& pool, const DecodeAttentionArgs& a,
                      int threads) {
  const uint32_t heads = pool.num_kv_heads;
  const uint32_t group = a.num_q_heads / heads;
  const uint32_t hd = pool.head_dim;
  const uint32_t bs = pool.block_size;
  const int64_t items = int64_t{a.num_seqs} * heads;
  uint32_t max_context = 0;
  for (uint32_t s = 0; s < a.num_seqs; ++s)
    max_context = std::max(max_context, a.context_lens[s]);
  // With mass output each (sequence, KV head) writes its own row; rows are summed afterwards.
  std::vector<float> mass_parts(a.attention_mass ? uint64_t(items) * max_context : 0);

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> q(uint64_t{group} * hd), acc(uint64_t{group} * hd);
    std::vector<float> tile(uint64_t{bs} * hd), logits;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const uint32_t s = static_cast<uint32_t>(item / heads);
      const uint32_t h = static_cast<uint32_t>(item % heads);
      const uint32_t ctx = a.context_lens[s];
      const uint32_t* table = a.block_tables + uint64_t{s} * a.max_blocks_per_seq;
      const uint64_t q_first = (uint64_t{s} * a.num_q_heads + uint64_t{h} * group) * hd;
      load_scaled_rows(a.query, a.query_dtype, q_first, group, hd, a.softmax_scale, q.data());
      logits.resize(uint64_t{group} * ctx);

      // Pass 1: logits for every context token and query head, then an exact softmax.
      for (uint32_t first = 0; first < ctx; first += bs) {
        const uint32_t n = std::min(bs, ctx - first);
        ops.decode_rows(pool, tile_of(pool, table[first / bs], a.layer, 0, h), n, tile.data());
        ops.dot_rows(q.data(), group, tile.data(), n, hd, logits.data() + first, ctx);
      }
      for (uint32_t g = 0; g < group; ++g) {
        float* row = logits.data() + uint64_t{g} * ctx;
        const float max = *std::max_element(row, row + ctx);
        const float inv_sum = 1.0f / ops.exp_sum(row, ctx, max);
        for (uint32_t t = 0; t < ctx; ++t)
          row[t] *= inv_sum;
      }
      if (a.attention_mass != nullptr) {
        float* part = mass_parts.data() + uint64_t(item) * max_context;
        for (uint32_t g = 0; g < group; ++g) {
          for (uint32_t t = 0; t < ctx; ++t)
            part[t] += logits[uint64_t{g} * ctx + t];
        }
      }

      // Pass 2: the probability-weighted sum of V.
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (uint32_t first = 0; first < ctx; first += bs) {
        const uint32_t n = std::min(bs, ctx - first);
        ops.decode_rows(pool, tile_of(pool, table[first / bs], a.layer, 1, h), n, tile.data());
        ops.accumulate(logits.data() + first, ctx, group, tile.data(), n, hd, acc.data());
      }
      store_rows(acc.data(), group, hd, a.query_dtype, a.output, q_first);
    }
  }

  if (a.attention_mass != nullptr) {
    for (uint32_t s = 0; s < a.num_seqs; ++s) {
      float* mass = a.attention_mass + uint64_t{s} * a.mass_stride;
      std::fill(mass, mass + a.context_lens[s], 0.0f);
      for (uint32_t h = 0; h < heads; ++h) {
        const float* part = mass_parts.data() + (uint64_t{s} * heads + h) * max_context;
        for (uint32_t t = 0; t < a.context_lens[s]; ++t)
          mass[t] += part[t];
      }
    }
  }
}

void prefill_attention(const SimdOps& ops, const PagedKvView& pool, const PrefillAttentionArgs& a,
                       int threads) {
  const uint32_t heads = pool.num_kv_heads;
  const uint32_t group = a.num_q_heads / heads;
  const uint32_t hd = pool.head_dim;
  const uint32_t bs = pool.block_size;
  const int64_t items = int64_t{a.num_seqs} * heads;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> q, acc, scores, running_max, running_sum, tile(uint64_t{bs} * hd);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const uint32_t s = static_cast<uint32_t>(item / heads);
      const uint32_t h = static_cast<uint32_t>(item % heads);
      const uint32_t q_len = a.query_start[s + 1] - a.query_start[s];
      if (q_len == 0) continue;
      const uint32_t ctx = a.context_lens[s];
      const uint32_t first_query_pos = ctx - q_len;
      const uint32_t* table = a.block_tables + uint64_t{s} * a.max_blocks_per_seq;
      // Row r = i * group + g: query token i, query head h * group + g.
      const uint32_t rows = q_len * group;
      q.resize(uint64_t{rows} * hd);
      for (uint32_t i = 0; i < q_len; ++i) {
        const uint64_t first =
            ((uint64_t{a.query_start[s]} + i) * a.num_q_heads + uint64_t{h} * group) * hd;
        load_scaled_rows(a.query, a.query_dtype, first, group, hd, a.softmax_scale,
                         q.data() + uint64_t{i} * group * hd);
      }
      acc.assign(uint64_t{rows} * hd, 0.0f);
      scores.resize(uint64_t{rows} * bs);
      running_max.assign(rows, kNegInf);
      running_sum.assign(rows, 0.0f);

      // Online softmax over the blocks (flash attention): each K/V tile is decoded once.
      for (uint32_t first = 0; first < ctx; first += bs) {
        const uint32_t n = std::min(bs, ctx - first);
        const uint32_t block = table[first / bs];
        ops.decode_rows(pool, tile_of(pool, block, a.layer, 0, h), n, tile.data());
        ops.dot_rows(q.data(), rows, tile.data(), n, hd, scores.data(), bs);
        for (uint32_t r = 0; r < rows; ++r) {
          float* row = scores.data() + uint64_t{r} * bs;
          const uint32_t limit = first_query_pos + r / group;  // last position this query sees
          const uint32_t visible = limit < first ? 0 : std::min(n, limit - first + 1);
          if (visible == 0) {
            std::fill(row, row + n, 0.0f);
            continue;
          }
          const float tile_max = *std::max_element(row, row + visible);
          const float new_max = std::max(running_max[r], tile_max);
          const float correction = std::exp(running_max[r] - new_max);  // 0 on the first tile
          running_sum[r] = running_sum[r] * correction + ops.exp_sum(row, visible, new_max);
          std::fill(row + visible, row + n, 0.0f);
          float* acc_row = acc.data() + uint64_t{r} * hd;
          for (uint32_t d = 0; d < hd; ++d)
            acc_row[d] *= correction;
          running_max[r] = new_max;
        }
        ops.decode_rows(pool, tile_of(pool, block, a.layer, 1, h), n, tile.data());
        ops.accumulate(scores.data(), bs, rows, tile.data(), n, hd, acc.data());
      }
      for (uint32_t r = 0; r < rows; ++r) {
        const float inv = 1.0f / running_sum[r];
        for (uint32_t d = 0; d < hd; ++d)
          acc[uint64_t{r} * hd + d] *= inv;
      }
      for (uint32_t i = 0; i < q_len; ++i) {
        const uint64_t first =
            ((uint64_t{a.query_start[s]} + i) * a.num_q_heads + uint64_t{h} * group) * hd;
        store_rows(acc.data() + uint64_t{i} * group * hd, group, hd, a.query_dtype, a.output,
                   first);
      }
    }
  }
}

}  // namespace kvfabric::cpu
