// Which blocks the job has cached at some time: the memory behind the "evicted" and "other salt"
// causes of a prefix miss (Coordinator::stats().misses).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvfabric::detail {

//! \brief A Bloom filter of (block content, position in the prompt) keys, two probes per key, of
//! a fixed size chosen from the job's block count. It only grows: a block once cached stays
//! "seen", and as the filter fills a never-seen block is taken for a seen one now and then (the
//! miss metrics are approximate in that direction, and only there). Keys are the coordinator's
//! unit keys, so recording a block costs no hashing beyond what indexing already does for it.
class SeenBlocks {
 public:
  //! About 16 bits per block of every replica's pool, at least 64 KiB and at most 128 MiB.
  explicit SeenBlocks(uint64_t total_device_blocks);

  void add(uint64_t key);
  [[nodiscard]] bool contains(uint64_t key) const;
  [[nodiscard]] size_t memory_bytes() const { return words_.size() * sizeof(uint64_t); }

  //! The key of a block whose unit key is `unit` at block index `position` of its prompt;
  //! `any_salt` keys the block's content without its salt (see Coordinator's miss causes).
  static uint64_t key(uint64_t unit, size_t position, bool any_salt);

 private:
  std::vector<uint64_t> words_;
  uint64_t mask_ = 0;  // bit index mask (the size is a power of two)
};

}  // namespace kvfabric::detail
