// Which blocks the job has cached lately: the memory behind the "evicted" and "other salt" causes
// of a prefix miss (Coordinator::stats().missed).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kvfabric/prefix/cache_salt.h"
#include "kvfabric/prefix/radix_tree.h"

namespace kvfabric::detail {

//! \brief Two generations of a Bloom filter of (block content, position in the prompt) keys, two
//! probes per key, sized from the job's block count. A generation takes keys until it holds one
//! per 8 of its bits (about 1 false positive in 20), then becomes the old one and the oldest is
//! cleared: the filter remembers the blocks of the last one to two pool-fulls of the whole job,
//! with a bounded error that errs only towards "seen". Keys sample a block's tokens (key()), so
//! recording a block costs the same for any block size.
class SeenBlocks {
 public:
  //! 16 bits per block of every replica's pool in each generation, 64 KiB to 64 MiB each.
  explicit SeenBlocks(uint64_t total_device_blocks);
  //! Host memory the filter takes for a job of `total_device_blocks`.
  static uint64_t bytes_for(uint64_t total_device_blocks);

  void add(uint64_t key);
  [[nodiscard]] bool contains(uint64_t key) const;
  [[nodiscard]] size_t memory_bytes() const;

  //! The key of the block `tokens` at block index `position` of its prompt, under `salt`, or
  //! under any salt (`any_salt`: the salt is left out). A block is known by a sample of its
  //! tokens, the first and last kSampled, so that a key costs the same for any block size
  //! (the filter sees every newly cached block): two blocks that agree on those tokens at the
  //! same position count as one, which only ever makes a miss look evicted.
  static uint64_t key(std::span<const TokenId> tokens, size_t position, const CacheSalt& salt,
                      bool any_salt) {
    return key(sample(tokens), position, salt, any_salt);
  }
  //! key() from a block's sample(), for a caller that keys one block twice.
  static uint64_t key(uint64_t sampled, size_t position, const CacheSalt& salt, bool any_salt);
  //! A hash of the tokens a key samples.
  static uint64_t sample(std::span<const TokenId> tokens);
  static constexpr size_t kSampled = 8;

 private:
  using Bits = std::vector<uint64_t>;
  [[nodiscard]] bool in(const Bits& bits, uint64_t key) const;

  std::array<Bits, 2> generations_;
  size_t current_ = 0;
  uint64_t added_ = 0;     // keys added to the current generation
  uint64_t capacity_ = 0;  // keys a generation takes before it is the old one
  uint64_t mask_ = 0;      // bit index mask (a generation's size is a power of two)
};

}  // namespace kvfabric::detail
