// A host model of a pool's token slots, written independently of the block manager: it executes
// TokenCopy lists (in order, memmove semantics) and reads a sequence back through its block table.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "kvfabric/block/sequence_info.h"
#include "kvfabric/block/token_copy.h"

namespace kvfabric::testing {

//! Token ids first, first + 1, ..., first + n - 1: what tests write and expect to read back.
inline std::vector<int64_t> token_ids(int64_t first, size_t n) {
  std::vector<int64_t> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = first + static_cast<int64_t>(i);
  return v;
}

class SlotModel {
 public:
  static constexpr int64_t kEmpty = -1;

  SlotModel(size_t num_blocks, size_t block_size)
      : block_size_(block_size), slots_(num_blocks * block_size, kEmpty) {}

  void apply(const std::vector<TokenCopy>& copies) {
    for (const TokenCopy& c : copies) {
      std::vector<int64_t> staged(c.num_tokens);
      for (uint32_t i = 0; i < c.num_tokens; ++i)
        staged[i] = at(c.src_block, c.src_offset + i);
      for (uint32_t i = 0; i < c.num_tokens; ++i)
        at(c.dst_block, c.dst_offset + i) = staged[i];
    }
  }

  //! Writes `tokens` at logical positions [first, first + tokens.size()) of the sequence.
  void write(const SequenceInfo& info, size_t first, const std::vector<int64_t>& tokens) {
    for (size_t i = 0; i < tokens.size(); ++i) {
      const size_t pos = first + i;
      at(info.block_ids.at(pos / block_size_), pos % block_size_) = tokens[i];
    }
  }

  //! The first `n` slots of one block.
  [[nodiscard]] std::vector<int64_t> read_block(BlockId block, size_t n) const {
    std::vector<int64_t> out(n);
    for (size_t i = 0; i < n; ++i)
      out[i] = slots_.at(static_cast<size_t>(block.value) * block_size_ + i);
    return out;
  }

  [[nodiscard]] std::vector<int64_t> read(const SequenceInfo& info) const {
    std::vector<int64_t> out(info.num_tokens);
    for (size_t pos = 0; pos < info.num_tokens; ++pos) {
      out[pos] =
          slots_.at(info.block_ids.at(pos / block_size_).value * block_size_ + pos % block_size_);
    }
    return out;
  }

 private:
  int64_t& at(BlockId block, size_t offset) {
    if (offset >= block_size_) throw std::out_of_range("token copy crosses a block boundary");
    return slots_.at(static_cast<size_t>(block.value) * block_size_ + offset);
  }

  size_t block_size_;
  std::vector<int64_t> slots_;
};

}  // namespace kvfabric::testing
