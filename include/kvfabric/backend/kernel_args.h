// The plain arguments of the KV operations: what the Backend interface takes and what the CUDA
// kernels may read. Plain data only (no virtuals, no Backend, no allocation), so that kernels/
// includes this header and paged_kv_view.h and never the Backend interface (DESIGN.md §4).
#pragma once

#include <cstdint>
#include <span>

#include "kvfabric/backend/paged_kv_view.h"
#include "kvfabric/block/token_copy.h"
#include "kvfabric/common/dtype.h"

namespace kvfabric {

//! Writes new tokens' K and V into their slots, quantizing to the pool's dtype on the way.
struct AppendKvArgs {
  uint32_t layer = 0;               //!< layer within the pool's layer group
  const void* key = nullptr;        //!< [num_tokens, num_kv_heads, head_dim] in input_dtype
  const void* value = nullptr;      //!< [num_tokens, num_kv_heads, head_dim] in input_dtype
  DType input_dtype = DType::kF32;  //!< f32, f16 or bf16
  uint32_t num_tokens = 0;
  const int64_t* slot_mapping = nullptr;  //!< [num_tokens] block * block_size + offset; -1 skips
};

//! Reads a sequence's tokens back into contiguous f32 tensors (dequantized).
struct GatherKvArgs {
  uint32_t layer = 0;
  const uint32_t* block_table = nullptr;  //!< [ceil(num_tokens / block_size)]
  uint32_t num_tokens = 0;
  float* key_out = nullptr;    //!< [num_tokens, num_kv_heads, head_dim]
  float* value_out = nullptr;  //!< [num_tokens, num_kv_heads, head_dim]
};

//! One query token per sequence over its whole context (the decode step).
struct DecodeAttentionArgs {
  uint32_t layer = 0;
  const void* query = nullptr;      //!< [num_seqs, num_q_heads, head_dim] in query_dtype
  DType query_dtype = DType::kF32;  //!< f32, f16 or bf16; the output has the same dtype
  //! [num_seqs, num_q_heads, head_dim]: the query itself or memory apart from it (a partial
  //! overlap is refused), as for attention_mass.
  void* output = nullptr;
  uint32_t num_seqs = 0;
  uint32_t num_q_heads = 0;  //!< local query heads, a multiple of the pool's KV heads (GQA)
  const uint32_t* block_tables =
      nullptr;  //!< [num_seqs, max_blocks_per_seq]; padding kInvalidBlockId
  uint32_t max_blocks_per_seq = 0;
  const uint32_t* context_lens = nullptr;  //!< [num_seqs], >= 1
  float softmax_scale = 1.0f;
  //! Optional [num_seqs, mass_stride] f32: each context token's softmax weight summed over the
  //! query heads (H2O scores). Entries past a sequence's context are left untouched.
  float* attention_mass = nullptr;
  uint32_t mass_stride = 0;
};

//! New tokens of each sequence attend causally to the cached prefix and to themselves. The new
//! tokens' K/V must already be appended: query i of a sequence with q_len new tokens and context
//! length n attends to positions [0, n - q_len + i].
struct PrefillAttentionArgs {
  uint32_t layer = 0;
  const void* query = nullptr;  //!< [total_query_tokens, num_q_heads, head_dim]
  DType query_dtype = DType::kF32;
  //! [total_query_tokens, num_q_heads, head_dim]: the query itself or memory apart from it.
  void* output = nullptr;
  uint32_t num_seqs = 0;
  uint32_t num_q_heads = 0;
  const uint32_t* query_start = nullptr;   //!< [num_seqs + 1] offsets of each sequence's queries
  const uint32_t* context_lens = nullptr;  //!< [num_seqs] cached + new tokens
  const uint32_t* block_tables = nullptr;  //!< [num_seqs, max_blocks_per_seq]
  uint32_t max_blocks_per_seq = 0;
  float softmax_scale = 1.0f;
};

//! A whole-block move or copy between two pools (or within one).
struct BlockMove {
  uint32_t src_block = 0;
  uint32_t dst_block = 0;
};

//! The token-range copies of one layer group (block manager CoW and compaction output), or a
//! regrouping: copies that read `source`, a view of the same layers laid out differently (the
//! whole-block view of an arena whose blocks a layer group's view also addresses: PyramidKV), and
//! write the rows of `pool`'s layers. A `source` without memory reads `pool` itself.
struct GroupTokenCopies {
  PagedKvView pool;
  std::span<const TokenCopy> copies;
  PagedKvView source{};

  [[nodiscard]] const PagedKvView& read_pool() const {
    return source.base == nullptr ? pool : source;
  }
};

//! Whole-block copies inside one layer group's pool.
struct GroupBlockCopies {
  PagedKvView pool;
  std::span<const BlockMove> copies;
};

}  // namespace kvfabric
