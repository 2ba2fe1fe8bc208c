// Block contents for transport tests: a byte pattern that is a pure function of (seed, byte
// index), so a receiver can regenerate exactly what a sender wrote, and a 64-bit checksum to
// compare blocks across ranks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

namespace kvfabric::testing {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

//! Seed naming one block: who sent it to whom, in which batch, at which index, in which round.
inline uint64_t block_seed(int src, int dst, uint64_t batch, uint64_t block, uint64_t round = 0) {
  return splitmix64(
      splitmix64(splitmix64(splitmix64(uint64_t(src) * 0x10001 + uint64_t(dst)) ^ batch) ^ block) ^
      round);
}

//! Fills `bytes` bytes at `p` with the pattern of `seed` (8 bytes per splitmix64 step).
inline void fill_pattern(uint8_t* p, uint64_t bytes, uint64_t seed) {
  uint64_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    const uint64_t w = splitmix64(seed ^ i);
    std::memcpy(p + i, &w, 8);
  }
  if (i < bytes) {
    const uint64_t w = splitmix64(seed ^ i);
    std::memcpy(p + i, &w, bytes - i);
  }
}

//! Whether `bytes` bytes at `p` hold exactly the pattern of `seed`.
inline bool has_pattern(const uint8_t* p, uint64_t bytes, uint64_t seed) {
  uint64_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    const uint64_t w = splitmix64(seed ^ i);
    if (std::memcmp(p + i, &w, 8) != 0) return false;
  }
  if (i < bytes) {
    const uint64_t w = splitmix64(seed ^ i);
    if (std::memcmp(p + i, &w, bytes - i) != 0) return false;
  }
  return true;
}

//! FNV-1a-style 64-bit checksum of a block, 8 bytes per step (any change of any byte changes it
//! with overwhelming probability).
inline uint64_t checksum(const uint8_t* p, uint64_t bytes) {
  uint64_t h = 0xcbf29ce484222325ull ^ bytes;
  uint64_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  for (; i < bytes; ++i)
    h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

//! A host arena of `count` blocks of `block_bytes` (8-byte aligned stride) filled with a marker,
//! handed out in a shuffled order so that batches are scattered (or in arena order, adjacent,
//! with `shuffle` false).
class ScatteredArena {
 public:
  ScatteredArena(uint64_t count, uint64_t block_bytes, uint64_t seed, uint8_t marker = 0xA5,
                 bool shuffle = true)
      : stride_((block_bytes + 7) / 8 * 8), bytes_(count * stride_, marker), order_(count) {
    std::iota(order_.begin(), order_.end(), uint64_t{0});
    std::mt19937_64 rng(seed);
    if (shuffle) std::shuffle(order_.begin(), order_.end(), rng);
  }
  //! The i-th block handed out (a shuffled slot of the arena).
  uint8_t* block(uint64_t i) { return bytes_.data() + order_[i] * stride_; }
  std::vector<uint8_t*> blocks(uint64_t first, uint64_t count) {
    std::vector<uint8_t*> out;
    for (uint64_t i = 0; i < count; ++i)
      out.push_back(block(first + i));
    return out;
  }
  uint64_t stride() const { return stride_; }
  std::vector<uint8_t>& bytes() { return bytes_; }

 private:
  uint64_t stride_;
  std::vector<uint8_t> bytes_;
  std::vector<uint64_t> order_;
};

}  // namespace kvfabric::testing
