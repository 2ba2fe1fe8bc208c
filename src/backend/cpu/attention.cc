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

// Tokens handled per step: a contiguous layout (one huge block) is walked in the same L1-sized
// chunks as 16-token blocks.
constexpr uint32_t kChunk = kMaxChunkRows;

TileRef tile_of(const PagedKvView& pool, uint32_t block, uint32_t layer, uint32_t kv, uint32_t head,
                uint32_t first_token = 0) {
  return TileRef{pool.codes(block, layer, kv, head) + uint64_t{first_token} * pool.row_bytes,
                 pool.scales(block, layer, kv, head) + uint64_t{first_token} * pool.groups_per_row,
                 pool.zeros(block, layer, kv, head) + uint64_t{first_token} * pool.groups_per_row};
}

// Asks for the next block's first cache lines of each head's K and V tile while the current block
// is processed: blocks of a paged sequence are scattered, so the hardware prefetcher cannot guess
// where the next one starts; it streams the rest of each tile itself.
void prefetch_block(const PagedKvView& pool, uint32_t block, uint32_t layer, uint32_t first_head,
                    uint32_t num_heads) {
  for (uint32_t h = first_head; h < first_head + num_heads; ++h) {
    for (uint32_t kv = 0; kv < 2; ++kv) {
      const uint8_t* codes = pool.codes(block, layer, kv, h);
      __builtin_prefetch(codes);
      __builtin_prefetch(codes + 64);
      if (pool.groups_per_row > 0) __builtin_prefetch(pool.scales(block, layer, kv, h));
    }
  }
}

// The query rows of one work item as qk reads them, with their quantized form for integer formats.
class QueryBuffer {
 public:
  explicit QueryBuffer(const PagedKvView& pool) : pool_(pool) {}

  //! f32 rows to fill ([rows][head_dim]); call prepare() once they are written.
  float* f32(uint32_t rows) {
    rows_ = rows;
    f32_.resize(uint64_t{rows} * pool_.head_dim);
    return f32_.data();
  }

  QueryRows prepare() {
    QueryRows q{f32_.data(), nullptr, nullptr, nullptr, pool_.head_dim, pool_.groups_per_row};
    if (is_integer_quantized(pool_.dtype)) {
      codes_.resize(f32_.size());
      scales_.resize(rows_);
      sums_.resize(uint64_t{rows_} * pool_.groups_per_row);
      quantize_query(pool_, rows_, codes_.data(), scales_.data(), sums_.data(), q);
    }
    return q;
  }

 private:
  const PagedKvView& pool_;
  uint32_t rows_ = 0;
  std::vector<float> f32_;
  std::vector<int8_t> codes_;
  std::vector<float> scales_;
  std::vector<float> sums_;
};

// Running softmax state of one query row (flash decoding).
struct OnlineSoftmax {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;
};

}  // namespace

// Work items are sequences (all KV heads, or single heads when the batch is smaller than the
// thread count): every block's K and V tiles of those heads are read in one sweep, with an online
// softmax so that each block is visited once. With attention-mass output the raw logits are kept
// and turned into probabilities at the end.
void decode_attention(const SimdOps& ops, const PagedKvView& pool, const DecodeAttentionArgs& a,
                      int threads) {
  const uint32_t heads = pool.num_kv_heads;
  const uint32_t group = a.num_q_heads / heads;
  const uint32_t hd = pool.head_dim;
  const uint32_t bs = pool.block_size;
  const bool want_mass = a.attention_mass != nullptr;
  const uint32_t heads_per_item =
      want_mass || a.num_seqs >= 2 * static_cast<uint32_t>(threads) ? heads : 1;
  const int64_t items = int64_t{a.num_seqs} * (heads / heads_per_item);
  const uint32_t rows = heads_per_item * group;  // query rows of one item

#pragma omp parallel num_threads(threads)
  {
    QueryBuffer query(pool);
    std::vector<float> acc(uint64_t{rows} * hd);
    std::vector<float> scratch(uint64_t{kChunk} * hd), scores(uint64_t{group} * kChunk), logits;
    std::vector<OnlineSoftmax> state(rows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const uint32_t s = static_cast<uint32_t>(item / (heads / heads_per_item));
      const uint32_t first_head =
          static_cast<uint32_t>(item % (heads / heads_per_item)) * heads_per_item;
      const uint32_t ctx = a.context_lens[s];
      const uint32_t* table = a.block_tables + uint64_t{s} * a.max_blocks_per_seq;
      const uint64_t q_first = (uint64_t{s} * a.num_q_heads + uint64_t{first_head} * group) * hd;
      load_scaled_rows(a.query, a.query_dtype, q_first, rows, hd, a.softmax_scale, query.f32(rows));
      const QueryRows q = query.prepare();
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(state.begin(), state.end(), OnlineSoftmax{});
      if (want_mass) logits.resize(uint64_t{rows} * ctx);

      if (bs < ctx) prefetch_block(pool, table[1], a.layer, first_head, heads_per_item);
      for (uint32_t start = 0; start < ctx; start += bs) {
        const uint32_t block = table[start / bs];
        const uint32_t block_tokens = std::min(bs, ctx - start);
        if (start + 2 * bs < ctx) {
          prefetch_block(pool, table[start / bs + 2], a.layer, first_head, heads_per_item);
        }
        for (uint32_t sub = 0; sub < block_tokens; sub += kChunk) {
          const uint32_t n = std::min(kChunk, block_tokens - sub);
          for (uint32_t hi = 0; hi < heads_per_item; ++hi) {
            const uint32_t h = first_head + hi;
            const uint32_t row0 = hi * group;
            ops.qk(pool, tile_of(pool, block, a.layer, 0, h, sub), n, q.from(row0), group,
                   scores.data(), kChunk, scratch.data());
            for (uint32_t g = 0; g < group; ++g) {
              float* sc = scores.data() + uint64_t{g} * kChunk;
              OnlineSoftmax& st = state[row0 + g];
              if (want_mass) {
                std::copy(sc, sc + n, logits.data() + uint64_t{row0 + g} * ctx + start + sub);
              }
              const float new_max = std::max(st.max, *std::max_element(sc, sc + n));
              const float correction = std::exp(st.max - new_max);  // 0 on the first chunk
              st.sum = st.sum * correction + ops.exp_sum(sc, n, new_max);
              st.max = new_max;
              if (correction != 1.0f) {
                float* acc_row = acc.data() + uint64_t{row0 + g} * hd;
                for (uint32_t d = 0; d < hd; ++d)
                  acc_row[d] *= correction;
              }
            }
            ops.pv(pool, tile_of(pool, block, a.layer, 1, h, sub), n, scores.data(), kChunk, group,
                   acc.data() + uint64_t{row0} * hd, scratch.data());
          }
        }
      }
      for (uint32_t r = 0; r < rows; ++r) {
        const float inv = 1.0f / state[r].sum;
        for (uint32_t d = 0; d < hd; ++d)
          acc[uint64_t{r} * hd + d] *= inv;
      }
      store_rows(acc.data(), rows, hd, a.query_dtype, a.output, q_first);

      if (want_mass) {  // the item is the whole sequence here, so no other thread writes this row
        float* mass = a.attention_mass + uint64_t{s} * a.mass_stride;
        std::fill(mass, mass + ctx, 0.0f);
        for (uint32_t r = 0; r < rows; ++r) {
          const float* row = logits.data() + uint64_t{r} * ctx;
          const float inv = 1.0f / state[r].sum;
          for (uint32_t t = 0; t < ctx; ++t)
            mass[t] += std::exp(row[t] - state[r].max) * inv;
        }
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
    QueryBuffer query(pool);
    std::vector<float> acc, scores, running_max, running_sum, scratch(uint64_t{kChunk} * hd);
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
      float* q_f32 = query.f32(rows);
      for (uint32_t i = 0; i < q_len; ++i) {
        const uint64_t first =
            ((uint64_t{a.query_start[s]} + i) * a.num_q_heads + uint64_t{h} * group) * hd;
        load_scaled_rows(a.query, a.query_dtype, first, group, hd, a.softmax_scale,
                         q_f32 + uint64_t{i} * group * hd);
      }
      const QueryRows q = query.prepare();
      acc.assign(uint64_t{rows} * hd, 0.0f);
      scores.resize(uint64_t{rows} * kChunk);
      running_max.assign(rows, kNegInf);
      running_sum.assign(rows, 0.0f);

      // Online softmax over chunks of the context (flash attention): each K/V row is decoded once.
      for (uint32_t start = 0; start < ctx; start += bs) {
        const uint32_t block = table[start / bs];
        const uint32_t block_tokens = std::min(bs, ctx - start);
        for (uint32_t sub = 0; sub < block_tokens; sub += kChunk) {
          const uint32_t first = start + sub;  // context position of the chunk's first token
          const uint32_t n = std::min(kChunk, block_tokens - sub);
          ops.qk(pool, tile_of(pool, block, a.layer, 0, h, sub), n, q, rows, scores.data(), kChunk,
                 scratch.data());
          for (uint32_t r = 0; r < rows; ++r) {
            float* row = scores.data() + uint64_t{r} * kChunk;
            const uint32_t limit = first_query_pos + r / group;  // last position this query sees
            const uint32_t visible = limit < first ? 0 : std::min(n, limit - first + 1);
            if (visible == 0) {
              std::fill(row, row + n, 0.0f);
              continue;
            }
            const float chunk_max = *std::max_element(row, row + visible);
            const float new_max = std::max(running_max[r], chunk_max);
            const float correction = std::exp(running_max[r] - new_max);  // 0 on the first chunk
            running_sum[r] = running_sum[r] * correction + ops.exp_sum(row, visible, new_max);
            std::fill(row + visible, row + n, 0.0f);
            float* acc_row = acc.data() + uint64_t{r} * hd;
            for (uint32_t d = 0; d < hd; ++d)
              acc_row[d] *= correction;
            running_max[r] = new_max;
          }
          ops.pv(pool, tile_of(pool, block, a.layer, 1, h, sub), n, scores.data(), kChunk, rows,
                 acc.data(), scratch.data());
        }
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
