#include "kvfabric/prefix/child_key_table.h"

#include <algorithm>
#include <bit>

namespace kvfabric::detail {

void ChildKeyTable::insert(uint64_t key, uint32_t child) {
  if (2 * (size_ + 1) > slots_.size()) grow();
  size_t i = home(key);
  while (slots_[i].child != kNone) i = next(i);
  slots_[i] = Slot{key, child};
  ++size_;
}

size_t ChildKeyTable::position(uint64_t key, uint32_t child) const {
  if (size_ == 0) return slots_.size();
  for (size_t i = home(key); slots_[i].child != kNone; i = next(i)) {
    if (slots_[i].key == key && slots_[i].child == child) return i;
  }
  return slots_.size();
}

bool ChildKeyTable::erase(uint64_t key, uint32_t child) {
  size_t hole = position(key, child);
  if (hole == slots_.size()) return false;
  // Backward shift instead of a tombstone: each later entry of the run moves into the hole unless
  // its home lies after the hole (cyclically, up to where it sits), so every entry stays reachable
  // from its home.
  const size_t mask = slots_.size() - 1;
  for (size_t j = next(hole); slots_[j].child != kNone; j = next(j)) {
    if (((j - home(slots_[j].key)) & mask) >= ((j - hole) & mask)) {
      slots_[hole] = slots_[j];
      hole = j;
    }
  }
  slots_[hole] = Slot{};
  --size_;
  return true;
}

bool ChildKeyTable::replace(uint64_t key, uint32_t child, uint32_t by) {
  const size_t i = position(key, child);
  if (i == slots_.size()) return false;
  slots_[i].child = by;
  return true;
}

void ChildKeyTable::clear() {
  slots_ = std::vector<Slot>();  // not `= {}`, which would keep the capacity
  size_ = 0;
  shift_ = 0;
}

void ChildKeyTable::grow() {
  const size_t capacity = std::max<size_t>(8, 2 * slots_.size());
  std::vector<Slot> old = std::exchange(slots_, std::vector<Slot>(capacity));
  shift_ = 64 - static_cast<uint32_t>(std::countr_zero(capacity));
  size_ = 0;
  for (const Slot& s : old) {
    if (s.child != kNone) insert(s.key, s.child);
  }
}

}  // namespace kvfabric::detail
