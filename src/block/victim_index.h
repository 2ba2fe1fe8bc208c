// Resident sequences ordered by eviction preference, so choosing a victim is O(1) and keeping the
// order current is O(log n) per access, independent of hash-map iteration order.
#pragma once

#include <cstdint>
#include <set>
#include <utility>

#include "kvfabric/block/sequence_info.h"
#include "kvfabric/config/config.h"

namespace kvfabric::detail {

class VictimIndex {
 public:
  //! (strategy-specific rank, seq id); the smallest key is the next victim.
  using Key = std::pair<uint64_t, uint64_t>;
  using const_iterator = std::set<Key>::const_iterator;

  explicit VictimIndex(EvictionPolicy policy) : policy_(policy) {}

  [[nodiscard]] EvictionPolicy policy() const { return policy_; }
  [[nodiscard]] Key key_of(const SequenceInfo& info) const;

  void insert(const SequenceInfo& info) { keys_.insert(key_of(info)); }
  void erase(const SequenceInfo& info) { keys_.erase(key_of(info)); }
  //! Re-ranks a sequence whose key was `old_key` before it changed.
  void update(const Key& old_key, const SequenceInfo& info);

  [[nodiscard]] bool empty() const { return keys_.empty(); }
  [[nodiscard]] size_t size() const { return keys_.size(); }
  [[nodiscard]] const_iterator begin() const { return keys_.begin(); }
  [[nodiscard]] const_iterator end() const { return keys_.end(); }
  [[nodiscard]] bool contains(const SequenceInfo& info) const {
    return keys_.count(key_of(info)) > 0;
  }
  static SeqId seq_of(const Key& key) { return SeqId{key.second}; }

 private:
  EvictionPolicy policy_;
  std::set<Key> keys_;
};

}  // namespace kvfabric::detail
