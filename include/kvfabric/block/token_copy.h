// Copy operations the block manager emits for the storage layer to execute.
#pragma once

#include <cstdint>
#include <ostream>

#include "kvfabric/common/ids.h"

namespace kvfabric {

enum class CopyReason : uint8_t {
  kCopyOnWrite,  //!< a shared, partly filled block is duplicated before a sequence writes to it
  kCompaction,   //!< StreamingLLM moves retained tokens so logical slots stay contiguous
};

//! \brief Copy `num_tokens` token slots from (src_block, src_offset) to (dst_block, dst_offset),
//! for every layer, K and V, and every KV head of the rank. Plain data: the block manager emits
//! these, a backend executes them before the step's forward pass.
//!
//! A list of TokenCopy is executed in order, and each copy behaves like memmove (its source and
//! destination may overlap within one block). Both ranges lie inside one block.
struct TokenCopy {
  BlockId src_block;
  uint32_t src_offset = 0;
  BlockId dst_block;
  uint32_t dst_offset = 0;
  uint32_t num_tokens = 0;
  CopyReason reason = CopyReason::kCopyOnWrite;

  friend bool operator==(const TokenCopy&, const TokenCopy&) = default;
  friend std::ostream& operator<<(std::ostream& os, const TokenCopy& c) {
    return os << (c.reason == CopyReason::kCopyOnWrite ? "cow " : "compact ") << c.src_block << "["
              << c.src_offset << "+" << c.num_tokens << "] -> " << c.dst_block << "["
              << c.dst_offset << "]";
  }
};

}  // namespace kvfabric
