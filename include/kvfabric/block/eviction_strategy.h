// Which sequence a block manager gives up first when memory runs short.
#pragma once

#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string>

#include "kvfabric/config/config.h"

namespace kvfabric {

//! \brief An eviction strategy with its parameters (seed `EvictionStrategy`). Victims are chosen
//! deterministically: by a logical access clock (never wall time), ties broken by lower SeqId.
//!
//! | strategy        | victim                                   | prints as                       |
//! |-----------------|------------------------------------------|---------------------------------|
//! | lru()           | least recently accessed                  | LRU                             |
//! | lfu()           | fewest accesses                          | LFU                             |
//! | longest_first() | most tokens                              | LongestFirst                    |
//! | priority(n)     | lowest priority (set_priority, 0..n-1)   | Priority(n)                     |
//! | streaming_llm() | least recently accessed (sequences are   | StreamingLLM(sink=s, window=w)  |
//! |                 | compacted with apply_streaming_llm)      |                                 |
class EvictionStrategy {
 public:
  EvictionStrategy() = default;  //!< LRU, the seed's default

  static EvictionStrategy lru() { return EvictionStrategy(EvictionPolicy::kLru, 0, 0, 0); }
  static EvictionStrategy lfu() { return EvictionStrategy(EvictionPolicy::kLfu, 0, 0, 0); }
  static EvictionStrategy longest_first() {
    return EvictionStrategy(EvictionPolicy::kLongestFirst, 0, 0, 0);
  }
  static EvictionStrategy priority(size_t levels) {
    return EvictionStrategy(EvictionPolicy::kPriority, levels, 0, 0);
  }
  static EvictionStrategy streaming_llm(size_t sink_tokens, size_t window_tokens) {
    return EvictionStrategy(EvictionPolicy::kStreamingLlm, 0, sink_tokens, window_tokens);
  }
  //! The strategy named by a cache.eviction config section.
  static EvictionStrategy from_config(const EvictionConfig& config);

  [[nodiscard]] EvictionPolicy policy() const { return policy_; }
  [[nodiscard]] size_t levels() const { return levels_; }
  [[nodiscard]] size_t sink_tokens() const { return sink_tokens_; }
  [[nodiscard]] size_t window_tokens() const { return window_tokens_; }

  //! OK, or why the parameters are unusable (priority with 0 levels, StreamingLLM with no window).
  [[nodiscard]] Status validate() const;
  //! The seed's Display text, e.g. "StreamingLLM(sink=4, window=512)".
  [[nodiscard]] std::string to_string() const;

  friend bool operator==(const EvictionStrategy&, const EvictionStrategy&) = default;
  friend std::ostream& operator<<(std::ostream& os, const EvictionStrategy& s) {
    return os << s.to_string();
  }

 private:
  EvictionStrategy(EvictionPolicy policy, size_t levels, size_t sink, size_t window)
      : policy_(policy), levels_(levels), sink_tokens_(sink), window_tokens_(window) {}

  EvictionPolicy policy_ = EvictionPolicy::kLru;
  size_t levels_ = 0;
  size_t sink_tokens_ = 0;
  size_t window_tokens_ = 0;
};

}  // namespace kvfabric
