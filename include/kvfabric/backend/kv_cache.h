// The seed ferrum `KvCache`: per-sequence KV for every layer of a model, contiguous or paged over
// one shared block pool, with ferrum's write-then-attend step semantics and its defects fixed.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "kvfabric/backend/backend.h"
#include "kvfabric/block/block_allocator.h"

namespace kvfabric {

struct KvCacheOptions {
  uint32_t num_layers = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kF16;
  uint32_t group_size = 0;  //!< integer dtypes; 0 = head_dim
  //! Tokens per block; 0 selects the contiguous layout (one capacity-sized region per sequence).
  uint32_t block_size = 16;
  uint32_t capacity = 512;  //!< most tokens one sequence may hold (ferrum kv_capacity)
  //! Paged: blocks in the shared pool. Contiguous: sequences that can be resident at once.
  uint64_t pool_blocks = 0;
};

//! \brief Ferrum's per-request KV cache (seed 004), rebuilt on kvfabric's block layout.
//!
//! Layout (one for both modes, DESIGN.md §3): a pool of blocks, block-major
//! `[layer][K|V][kv_head][token_in_block][head_dim]`. Paged mode uses `block_size`-token blocks
//! shared by all sequences; contiguous mode gives each sequence one block of `capacity` tokens,
//! which is ferrum's head-major `[kv_head][capacity][head_dim]` per layer. Both run the same
//! kernels.
//!
//! A forward step writes the new tokens of every layer, attends, then advances:
//!   append(id, layer, k, v, n) for each layer  -> writes positions [len, len + n)
//!   attention(id, layer, q, q_len, ...)        -> causal over len + n tokens
//!   advance(id)                                -> len += n once every layer has written n tokens
//!
//! Fixed seed defects: blocks are allocated on demand as a sequence grows (not max_blocks up
//! front); pool exhaustion and capacity overflow are errors that change nothing; reset() and
//! release() return every block (no leak); block tables are padded with kInvalidBlockId, never a
//! real block; a backend error is returned, never silently bypassed.
class KvCache {
 public:
  static Result<KvCache> create(Backend& backend, const KvCacheOptions& options);

  KvCache(KvCache&&) noexcept = default;
  KvCache& operator=(KvCache&&) noexcept = default;

  [[nodiscard]] bool is_paged() const { return paged_; }
  [[nodiscard]] uint32_t capacity() const { return options_.capacity; }
  [[nodiscard]] uint32_t block_size() const { return view_.block_size; }
  [[nodiscard]] uint32_t max_blocks_per_seq() const { return max_blocks_per_seq_; }
  [[nodiscard]] size_t free_blocks() const { return allocator_.free_count(); }
  [[nodiscard]] size_t num_sequences() const { return sequences_.size(); }
  [[nodiscard]] const PagedKvView& view() const { return view_; }

  //! Creates an empty sequence (no blocks until it is written). Idempotent, as ferrum's ensure_kv.
  Status ensure(uint64_t cache_id);
  //! Writes `num_tokens` K/V rows [num_tokens, num_kv_heads, head_dim] of `layer` after the ones
  //! this step already wrote, allocating blocks as needed.
  Status append(uint64_t cache_id, uint32_t layer, const void* key, const void* value, DType dtype,
                uint32_t num_tokens);
  //! Attention of the last `q_len` written tokens of `layer` ([q_len, num_q_heads, head_dim] in
  //! `dtype`) over everything written: query i sees positions [0, len + pending - q_len + i].
  Status attention(uint64_t cache_id, uint32_t layer, const void* query, DType dtype,
                   uint32_t q_len, uint32_t num_q_heads, void* output, float softmax_scale);
  //! Ends the step: every layer must have written the same number of new tokens.
  Status advance(uint64_t cache_id);
  //! Shortens a sequence (no pending step) and returns the blocks past the new length.
  Status truncate(uint64_t cache_id, uint32_t new_len);
  //! Drops a sequence and returns its blocks.
  Status release(uint64_t cache_id);
  //! Drops every sequence; afterwards all blocks are free.
  void reset();

  //! Committed tokens of a sequence.
  [[nodiscard]] Result<uint32_t> len(uint64_t cache_id) const;
  //! The sequence's block table padded to max_blocks_per_seq() with kInvalidBlockId.
  [[nodiscard]] Result<std::vector<uint32_t>> block_table(uint64_t cache_id) const;

 private:
  struct Sequence {
    uint32_t len = 0;
    std::vector<uint32_t> blocks;
    std::vector<uint32_t> pending;  //!< tokens written this step, per layer
  };

  KvCache(Backend& backend, const KvCacheOptions& options, bool paged, uint32_t max_blocks,
          KvArena arena, PagedKvView view);
  Result<Sequence*> find(uint64_t cache_id, std::string_view op);
  // Token counts in 64 bits: a block count (tokens + block_size - 1) / block_size wraps in 32.
  Status grow(Sequence& seq, uint64_t tokens);
  void shrink(Sequence& seq, uint64_t tokens);

  Backend* backend_;
  KvCacheOptions options_;
  bool paged_;
  uint32_t max_blocks_per_seq_;
  KvArena arena_;
  PagedKvView view_;
  BlockAllocator allocator_;
  std::map<uint64_t, Sequence> sequences_;
};

}  // namespace kvfabric
