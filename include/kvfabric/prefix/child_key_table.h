// The children of a radix node that has many, by the key of their first block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace kvfabric::detail {

//! \brief Child ids by unit key, for a radix node with many children: open addressing with linear
//! probing in one array kept at most half full, so that finding a child costs about one cache miss
//! and adding one rarely allocates. Keys are hashes already; children whose keys collide are all
//! kept, and a lookup offers each of them to the caller's test.
class ChildKeyTable {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;

  [[nodiscard]] bool empty() const { return size_ == 0; }
  [[nodiscard]] size_t size() const { return size_; }
  void insert(uint64_t key, uint32_t child);
  //! Removes `child`'s entry under `key`; false when there is none.
  bool erase(uint64_t key, uint32_t child);
  //! Files `by` where `child` was under `key`; false when there is none.
  bool replace(uint64_t key, uint32_t child, uint32_t by);
  [[nodiscard]] bool contains(uint64_t key, uint32_t child) const {
    return position(key, child) != slots_.size();
  }
  //! Drops every entry and gives the array back.
  void clear();
  //! The first child under `key` for which `match` returns non-zero, with what it returned;
  //! {kNone, 0} when there is none.
  template <typename Match>
  std::pair<uint32_t, size_t> find(uint64_t key, Match&& match) const {
    if (size_ == 0) return {kNone, 0};
    for (size_t i = home(key); slots_[i].child != kNone; i = next(i)) {
      if (slots_[i].key != key) continue;
      if (const size_t found = match(slots_[i].child); found > 0) return {slots_[i].child, found};
    }
    return {kNone, 0};
  }
  [[nodiscard]] size_t memory_bytes() const { return slots_.capacity() * sizeof(Slot); }

 private:
  struct Slot {
    uint64_t key = 0;
    uint32_t child = kNone;  // kNone: the slot is empty
  };
  // Fibonacci hashing (the top bits of key * 2^64 / phi): keys that differ only in their high
  // bits spread too. Only called on a table with slots.
  [[nodiscard]] size_t home(uint64_t key) const {
    return static_cast<size_t>((key * 0x9e3779b97f4a7c15ULL) >> shift_);
  }
  [[nodiscard]] size_t next(size_t i) const { return (i + 1) & (slots_.size() - 1); }
  // The slot of `child` under `key`, or slots_.size() when there is none.
  [[nodiscard]] size_t position(uint64_t key, uint32_t child) const;
  void grow();

  std::vector<Slot> slots_;  // empty, or a power of two long
  size_t size_ = 0;
  uint32_t shift_ = 0;  // 64 - log2(slots_.size())
};

}  // namespace kvfabric::detail
