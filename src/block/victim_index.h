// Live sequences in eviction order, so that choosing a victim is O(1) (amortized) and keeping the
// order current costs O(1) per access under LRU and O(log n) under the other policies,
// independent of hash-map order.
#pragma once

#include <cstdint>
#include <vector>
#include <optional>
#include <set>
#include <tuple>

#include "block/sequence_table.h"
#include "kvfabric/common/status.h"
#include "kvfabric/config/config.h"

namespace kvfabric::detail {

class VictimIndex {
 public:
  //! (strategy-specific rank, seq id, slot): the smallest key is the next victim.
  using Key = std::tuple<uint64_t, uint64_t, uint32_t>;

  VictimIndex(EvictionPolicy policy, const SequenceTable& table)
      : policy_(policy), table_(table), links_(1) {}

  [[nodiscard]] EvictionPolicy policy() const { return policy_; }
  [[nodiscard]] Key key_of(uint32_t slot) const;

  //! A new sequence in `slot`.
  void insert(uint32_t slot);
  //! The sequence in `slot` is about to go.
  void erase(uint32_t slot);
  //! Re-ranks the sequence in `slot`, whose key was `old_key` before it changed.
  void update(const Key& old_key, uint32_t slot);

  [[nodiscard]] size_t size() const { return table_.size(); }
  //! The slot of the next victim, or nullopt when no sequence lives.
  [[nodiscard]] std::optional<uint32_t> first() const;
  //! Calls f(slot) for the live sequences in victim order until f returns true.
  template <typename F>
  void visit_in_order(F&& f) const {
    if (ordered()) {
      for (const Key& key : keys_) {
        if (f(std::get<2>(key))) return;
      }
      return;
    }
    for (uint32_t node = links_[kEnd].next; node != kEnd; node = links_[node].next) {
      if (f(node - 1)) return;
    }
  }
  [[nodiscard]] size_t memory_bytes() const {
    return links_.capacity() * sizeof(Link) + keys_.size() * (sizeof(Key) + 4 * sizeof(void*));
  }
  //! That every live sequence is in the order exactly once, with its current key. O(n).
  [[nodiscard]] Status verify() const;

 private:
  // LRU (and StreamingLLM, which evicts like LRU) ranks by the logical clock, which only grows:
  // the sequences form a list in access order, and an access moves one to the end, O(1). The
  // other policies' ranks move both ways and keep an ordered set.
  [[nodiscard]] bool ordered() const {
    return policy_ != EvictionPolicy::kLru && policy_ != EvictionPolicy::kStreamingLlm;
  }
  struct Link {
    uint32_t prev = 0;
    uint32_t next = 0;
  };
  static constexpr uint32_t kEnd = 0;  // links_[0] is the list's head and tail; slot s is links_[s + 1]
  void unlink(uint32_t node);
  void link_last(uint32_t node);

  EvictionPolicy policy_;
  const SequenceTable& table_;
  std::set<Key> keys_;        // the other policies
  std::vector<Link> links_;   // LRU: the list, least recently used first
};

}  // namespace kvfabric::detail
