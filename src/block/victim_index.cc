#include "block/victim_index.h"

#include <limits>

#include "kvfabric/common/check.h"

namespace kvfabric::detail {

VictimIndex::Key VictimIndex::key_of(const SequenceInfo& info) const {
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
  return {rank, info.seq_id.value};
}

void VictimIndex::update(const Key& old_key, const SequenceInfo& info) {
  const Key new_key = key_of(info);
  if (new_key == old_key) return;
  // Reuse the tree node: no allocation on the per-token append path.
  auto node = keys_.extract(old_key);
  KVF_CHECK(!node.empty(), "victim index lost " + to_string(info.seq_id));
  node.value() = new_key;
  keys_.insert(std::move(node));
}

}  // namespace kvfabric::detail
