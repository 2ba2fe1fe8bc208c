#include "kvfabric/block/eviction_strategy.h"

#include <string>

namespace kvfabric {

EvictionStrategy EvictionStrategy::from_config(const EvictionConfig& config) {
  switch (config.strategy) {
    case EvictionPolicy::kLru:
      return lru();
    case EvictionPolicy::kLfu:
      return lfu();
    case EvictionPolicy::kLongestFirst:
      return longest_first();
    case EvictionPolicy::kPriority:
      return priority(config.priority_levels);
    case EvictionPolicy::kStreamingLlm:
      return streaming_llm(config.sink_tokens, config.window_tokens);
  }
  return lru();
}

Status EvictionStrategy::validate() const {
  if (policy_ == EvictionPolicy::kPriority && levels_ == 0) {
    return invalid_argument("Priority(0) has no valid priority (levels must be >= 1)");
  }
  if (policy_ == EvictionPolicy::kStreamingLlm && window_tokens_ == 0) {
    return invalid_argument(to_string() + " keeps no recent tokens (window must be >= 1)");
  }
  return ok_status();
}

std::string EvictionStrategy::to_string() const {
  switch (policy_) {
    case EvictionPolicy::kLru:
      return "LRU";
    case EvictionPolicy::kLfu:
      return "LFU";
    case EvictionPolicy::kLongestFirst:
      return "LongestFirst";
    case EvictionPolicy::kPriority:
      return "Priority(" + std::to_string(levels_) + ")";
    case EvictionPolicy::kStreamingLlm:
      return "StreamingLLM(sink=" + std::to_string(sink_tokens_) +
             ", window=" + std::to_string(window_tokens_) + ")";
  }
  return "Unknown";
}

}  // namespace kvfabric
