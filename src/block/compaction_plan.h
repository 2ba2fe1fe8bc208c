// Plans the compaction of one block table (StreamingLLM, or any token selection such as H2O):
// which old blocks the compacted sequence keeps and which token ranges must move so that logical
// slot i is block i / bs, offset i % bs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace kvfabric::detail {

struct CompactionPlan {
  //! One token-range move, in table indices: old table block -> new table block.
  struct Move {
    size_t src_index;
    uint32_t src_offset;
    size_t dst_index;
    uint32_t dst_offset;
    uint32_t num_tokens;
  };

  //! For each block of the compacted table, the index of the old table block it reuses.
  std::vector<size_t> base_index;
  //! Moves in execution order (ascending destination position; each is memmove-safe).
  std::vector<Move> moves;
  //! Old table indices not reused by the compacted table, ascending.
  std::vector<size_t> dropped_index;
};

//! Keeps tokens [0, sink) and [n - window, n) of an n-token table (requires n > sink + window).
//! When the dropped span is a whole number of blocks, blocks are kept in place and at most one
//! block is patched (the one where sink and window meet; the smaller part is copied). Otherwise
//! every window token shifts by the same amount and is moved, reusing the first blocks in place.
CompactionPlan plan_streaming_compaction(size_t num_tokens, size_t block_size, size_t sink,
                                         size_t window);

//! Keeps the tokens at `kept` (distinct, each < num_tokens and kept[i] >= i) of an n-token
//! table, in that order. The first blocks are reused in place; a token moves only when its slot
//! changes, in ascending slot order, so no move reads a slot an earlier move wrote.
CompactionPlan plan_token_retention(size_t num_tokens, size_t block_size,
                                    std::span<const size_t> kept);

}  // namespace kvfabric::detail
