#include "block/victim_index.h"

#include <limits>

#include "kvfabric/common/check.h"

namespace kvfabric::detail {

VictimIndex::Key VictimIndex::key_of(uint32_t slot) const {
  const SequenceInfo& info = table_.at(slot);
  uint64_t rank = 0;
  switch (policy_) {
    case EvictionPolicy::kLru:
    case EvictionPolicy::kStreamingLlm:
      rank = info.last_access;
      break;
    case EvictionPolicy::kLfu:
      rank = info.access_count;
      break;
    case EvictionPolicy::kLongestFirst:
      rank = std::numeric_limits<uint64_t>::max() - info.num_tokens;
      break;
    case EvictionPolicy::kPriority:
      rank = info.priority;
      break;
  }
  return {rank, info.seq_id.value, slot};
}

void VictimIndex::unlink(uint32_t node) {
  const Link link = links_[node];
  links_[link.prev].next = link.next;
  links_[link.next].prev = link.prev;
}

void VictimIndex::link_last(uint32_t node) {
  const uint32_t last = links_[kEnd].prev;
  links_[node] = {last, kEnd};
  links_[last].next = node;
  links_[kEnd].prev = node;
}

void VictimIndex::insert(uint32_t slot) {
  if (ordered()) {
    keys_.insert(key_of(slot));
    return;
  }
  if (links_.size() <= slot + 1) links_.resize(slot + 2);
  link_last(slot + 1);
}

void VictimIndex::erase(uint32_t slot) {
  if (ordered()) {
    keys_.erase(key_of(slot));
  } else {
    unlink(slot + 1);
  }
}

void VictimIndex::update(const Key& old_key, uint32_t slot) {
  if (!ordered()) {
    if (std::get<0>(old_key) != table_.at(slot).last_access) {
      unlink(slot + 1);
      link_last(slot + 1);
    }
    return;
  }
  const Key new_key = key_of(slot);
  if (new_key == old_key) return;
  // Reuse the tree node: no allocation on the per-token append path.
  auto node = keys_.extract(old_key);
  KVF_CHECK(!node.empty(), "victim index lost " + to_string(table_.at(slot).seq_id));
  node.value() = new_key;
  keys_.insert(std::move(node));
}

std::optional<uint32_t> VictimIndex::first() const {
  if (ordered()) {
    if (keys_.empty()) return std::nullopt;
    return std::get<2>(*keys_.begin());
  }
  const uint32_t node = links_[kEnd].next;
  if (node == kEnd) return std::nullopt;
  return node - 1;
}

Status VictimIndex::verify() const {
  std::vector<bool> seen(table_.slot_limit(), false);
  size_t listed = 0;
  auto fail = [](const std::string& what) { return Status(ErrorCode::kInternal, what); };
  if (ordered()) {
    for (const Key& key : keys_) {
      const uint32_t slot = std::get<2>(key);
      if (!table_.alive(slot) || key != key_of(slot)) return fail("the victim index holds a stale key");
      seen[slot] = true;
      ++listed;
    }
  } else {
    uint64_t previous = 0;
    for (uint32_t node = links_[kEnd].next; node != kEnd; node = links_[node].next) {
      const uint32_t slot = node - 1;
      if (!table_.alive(slot) || seen[slot]) return fail("the LRU list holds a stale or repeated entry");
      if (links_[links_[node].next].prev != node) return fail("the LRU list's links disagree");
      const uint64_t tick = table_.at(slot).last_access;
      if (tick <= previous) return fail("the LRU list is out of order");
      previous = tick;
      seen[slot] = true;
      if (++listed > table_.size()) return fail("the LRU list loops");
    }
  }
  if (listed != table_.size()) {
    return fail("the victim index lists " + std::to_string(listed) + " of " +
                std::to_string(table_.size()) + " sequences");
  }
  return ok_status();
}

}  // namespace kvfabric::detail
