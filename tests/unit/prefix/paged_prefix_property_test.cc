// A randomized serving loop over PagedPrefixCache with a host model of the token slots. Each slot
// holds a fingerprint of the prefix that produced it (standing in for its K/V), so the test can
// check that every prefix hit hands out blocks holding exactly the K/V of the prompt's prefix,
// and that cached blocks survive copy-on-write, forks, compaction and eviction intact.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <sstream>
#include <vector>

#include "kvfabric/block/paged_kv_cache.h"
#include "kvfabric/prefix/paged_prefix_cache.h"
#include "testing/property_env.h"
#include "testing/slot_model.h"

namespace kvfabric {
namespace {

using Tokens = std::vector<TokenId>;
constexpr size_t kBlocks = 48;
constexpr size_t kBlockSize = 4;
constexpr int kOperations = 100'000;

int64_t fingerprint(int64_t previous, TokenId token) {
  uint64_t h = static_cast<uint64_t>(previous) ^ (0x9e3779b97f4a7c15ULL + token);
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 31;
  return static_cast<int64_t>(h >> 1);
}

struct Live {
  Tokens tokens;
  std::vector<int64_t> slots;  // what each position must read back
  bool cacheable = true;       // false once compaction moved tokens away from their prefix
};

struct Case {
  PrefixIndexOptions options;
  uint64_t seed;
  friend void PrintTo(const Case& c, std::ostream* os) {
    *os << (c.options.cache_partial_blocks ? "partial blocks, " : "full blocks, ")
        << (c.options.order == RadixEvictionOrder::kLru ? "LRU" : "priority");
  }
};

class PagedPrefixProperty : public ::testing::TestWithParam<Case> {
 protected:
  PagedPrefixProperty()
      : cache_(PagedPrefixCache::create(PagedKvCache(kBlocks, kBlockSize, 2, 8), GetParam().options)
                   .value()),
        slots_(kBlocks, kBlockSize),
        rng_(testing::property_seed(GetParam().seed)) {}

  std::vector<int64_t> fingerprints(const Tokens& tokens) const {
    std::vector<int64_t> out(tokens.size());
    int64_t fp = 0;
    for (size_t i = 0; i < tokens.size(); ++i)
      out[i] = fp = fingerprint(fp, tokens[i]);
    return out;
  }

  // Prompts share prefixes: a system prompt, then earlier prompts continued (multi-turn).
  Tokens random_prompt() {
    Tokens prompt;
    const int kind = static_cast<int>(rng_() % 3);
    if (kind == 0 && !history_.empty()) {
      prompt = history_[rng_() % history_.size()];
      if (rng_() % 2) prompt.resize(rng_() % (prompt.size() + 1));
    } else if (kind == 1) {
      prompt = {1, 2, 3, 4, 5, 6};  // a system prompt
    }
    const size_t extra = rng_() % 12;
    for (size_t i = 0; i < extra; ++i)
      prompt.push_back(static_cast<TokenId>(10 + rng_() % 6));
    return prompt;
  }

  SeqId random_live() {
    auto it = live_.begin();
    std::advance(it, rng_() % live_.size());
    return it->first;
  }

  void flush() { slots_.apply(cache_.pool().take_pending_copies()); }

  void check() {
    ASSERT_TRUE(cache_.verify_integrity().ok()) << cache_.verify_integrity();
    const PagedKvCache& pool = cache_.pool();
    ASSERT_EQ(pool.free_block_count() + pool.cached_block_count() + pool.used_block_count(),
              pool.total_blocks());
    ASSERT_EQ(pool.num_sequences(), live_.size());
    for (const auto& [id, live] : live_) {
      ASSERT_EQ(slots_.read(*pool.get_sequence(id)), live.slots) << id;
    }
  }

  void step() {
    const int op = static_cast<int>(rng_() % 100);
    if (op < 30) {  // a new request: allocate, check the hit, prefill, maybe index
      const Tokens prompt = random_prompt();
      const SeqId id{next_seq_++};
      const auto hit = cache_.allocate(id, prompt);
      if (!hit.ok()) {
        ASSERT_EQ(hit.status().code(), ErrorCode::kOutOfMemory) << hit.status();
        return;
      }
      const SequenceInfo& info = *cache_.pool().get_sequence(id);
      const auto expected = fingerprints(prompt);
      const std::vector<int64_t> served = slots_.read(info);
      for (size_t i = 0; i < hit.value(); ++i)
        ASSERT_EQ(served[i], expected[i]) << "a hit served wrong K/V at position " << i;
      hits_ += hit.value();
      for (size_t pos = hit.value(); pos < prompt.size(); pos += kBlockSize) {
        ASSERT_EQ(cache_.pool().block_ref_count(info.block_ids[pos / kBlockSize]), 1u)
            << "prefill would write into a shared block";
      }
      slots_.write(info, hit.value(),
                   std::vector<int64_t>(expected.begin() + static_cast<ptrdiff_t>(hit.value()),
                                        expected.end()));
      live_[id] = Live{prompt, expected, true};
      history_.push_back(prompt);
      if (history_.size() > 40) history_.erase(history_.begin());
      if (rng_() % 5 != 0) {
        ASSERT_TRUE(cache_.insert(id, prompt, static_cast<uint32_t>(rng_() % 3)).ok());
      }
    } else if (op < 55 && !live_.empty()) {  // decode a few tokens
      const SeqId id = random_live();
      Live& live = live_[id];
      const size_t n = 1 + rng_() % 3;
      const Status status = cache_.pool().append(id, n);
      if (!status.ok()) {
        ASSERT_EQ(status.code(), ErrorCode::kOutOfMemory) << status;
        return;
      }
      flush();
      std::vector<int64_t> fresh;
      int64_t fp = live.slots.empty() ? 0 : live.slots.back();
      for (size_t i = 0; i < n; ++i) {
        const auto token = static_cast<TokenId>(10 + rng_() % 6);
        live.tokens.push_back(token);
        fresh.push_back(fp = fingerprint(fp, token));
      }
      slots_.write(*cache_.pool().get_sequence(id), live.slots.size(), fresh);
      live.slots.insert(live.slots.end(), fresh.begin(), fresh.end());
    } else if (op < 65 && !live_.empty()) {  // index a sequence, generated tokens included
      const SeqId id = random_live();
      if (!live_[id].cacheable) return;
      ASSERT_TRUE(cache_.insert(id, live_[id].tokens).ok());
      history_.push_back(live_[id].tokens);
    } else if (op < 85 && !live_.empty()) {  // finish
      const SeqId id = random_live();
      ASSERT_TRUE(cache_.pool().free(id).ok());
      live_.erase(id);
    } else if (op < 90 && !live_.empty()) {  // fork (a beam)
      const SeqId src = random_live();
      const SeqId dst{next_seq_++};
      ASSERT_TRUE(cache_.pool().fork(src, dst).ok());
      live_[dst] = live_[src];
    } else if (op < 94 && !live_.empty()) {  // preempt the LRU sequence
      const auto evicted = cache_.pool().evict();
      ASSERT_TRUE(evicted.ok());
      live_.erase(evicted.value());
    } else if (op < 98 && !live_.empty()) {  // StreamingLLM compaction
      const SeqId id = random_live();
      Live& live = live_[id];
      const size_t sink = rng_() % 5, window = 1 + rng_() % 8;
      const auto dropped = cache_.pool().apply_streaming_llm(id, sink, window);
      if (!dropped.ok()) {
        ASSERT_EQ(dropped.status().code(), ErrorCode::kOutOfMemory) << dropped.status();
        return;
      }
      if (dropped.value() == 0) return;
      flush();
      std::vector<int64_t> kept(live.slots.begin(), live.slots.begin() + sink);
      kept.insert(kept.end(), live.slots.end() - static_cast<ptrdiff_t>(window), live.slots.end());
      live.slots = kept;
      live.tokens.resize(kept.size());  // positions no longer match a prompt prefix
      live.cacheable = false;
    } else if (rng_() % 50 == 0) {
      cache_.clear_index();
    }
  }

  PagedPrefixCache cache_;
  testing::SlotModel slots_;
  std::mt19937_64 rng_;
  std::map<SeqId, Live> live_;
  std::vector<Tokens> history_;
  uint64_t next_seq_ = 1;
  uint64_t hits_ = 0;
};

TEST_P(PagedPrefixProperty, HitsServeTheRightBlocksAndNothingLeaks) {
  SCOPED_TRACE(testing::property_trace());
  for (uint64_t i = 0; i < testing::property_count(kOperations); ++i) {
    ASSERT_NO_FATAL_FAILURE(step()) << "operation " << i;
    ASSERT_NO_FATAL_FAILURE(check()) << "after operation " << i;
  }
  for (const auto& [id, live] : live_)
    ASSERT_TRUE(cache_.pool().free(id).ok());
  cache_.clear_index();
  EXPECT_EQ(cache_.pool().free_block_count(), kBlocks);  // no block leaked
  // The mix exercised hits, cached-block reclaim and copy-on-write of shared blocks.
  EXPECT_GT(hits_, 20'000u);
  EXPECT_GT(cache_.pool().stats().cached_blocks_reclaimed, 10'000u);
  EXPECT_GT(cache_.index().stats().evictions, 10'000u);
  EXPECT_GT(cache_.pool().stats().cow_copies, 1'000u);
}

INSTANTIATE_TEST_SUITE_P(
    Options, PagedPrefixProperty,
    ::testing::Values(Case{PrefixIndexOptions{}, 11},
                      Case{PrefixIndexOptions{.order = RadixEvictionOrder::kPriority,
                                              .cache_partial_blocks = true},
                           12}),
    [](const auto& param_info) {
      return std::string(param_info.param.options.cache_partial_blocks ? "PartialBlocksPriority"
                                                                       : "FullBlocksLru");
    });

}  // namespace
}  // namespace kvfabric
