// Randomized operations against the block manager, with every invariant checked after every
// operation and a host slot model holding the tokens each sequence must read back. The retainer
// variants also retain, release and share cached blocks (a FIFO retainer standing in for the
// prefix index) and check that a retained block's tokens never change.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <sstream>

#include "kvfabric/block/eviction_strategy.h"
#include "kvfabric/block/paged_kv_cache.h"
#include "testing/fifo_retainer.h"
#include "testing/property_env.h"
#include "testing/slot_model.h"

namespace kvfabric {
namespace {

constexpr size_t kBlocks = 96;
constexpr size_t kBlockSize = 4;
constexpr int kOperations = 100'000;

struct PropertyCase {
  EvictionStrategy strategy;
  bool retainer = false;

  friend void PrintTo(const PropertyCase& c, std::ostream* os) {
    *os << c.strategy << (c.retainer ? " with a retainer" : "");
  }
};

// Everything observable through the public API; equal before and after a failed call.
std::string fingerprint(const PagedKvCache& cache) {
  std::ostringstream os;
  os << cache << cache.free_block_count() << "|" << cache.pending_copies().size() << "|"
     << cache.stats().cow_copies << "|" << cache.stats().compactions << "|"
     << cache.cached_block_count() << "|" << cache.stats().cached_blocks_reclaimed << "|";
  for (uint32_t b = 0; b < cache.total_blocks(); ++b)
    os << (cache.is_retained(BlockId{b}) ? "r" : "");
  for (SeqId id : cache.sequence_ids()) {
    const SequenceInfo* s = cache.get_sequence(id);
    os << id << ":" << s->num_tokens << ":" << s->last_access << ":" << s->access_count << ":"
       << s->priority << ":";
    for (BlockId b : s->block_ids)
      os << b << ",";
  }
  return os.str();
}

class BlockManagerProperty : public ::testing::TestWithParam<PropertyCase> {
 protected:
  BlockManagerProperty()
      : cache_(PagedKvCache(kBlocks, kBlockSize, 2, 8).with_eviction_strategy(GetParam().strategy)),
        slots_(kBlocks, kBlockSize) {
    if (GetParam().retainer) {
      EXPECT_TRUE(cache_.set_block_retainer(&retainer_).ok());
    }
  }

  std::vector<int64_t> fresh_tokens(size_t n) {
    std::vector<int64_t> tokens(n);
    for (auto& t : tokens)
      t = next_token_++;
    return tokens;
  }

  SeqId random_live(bool allow_missing) {
    if (expected_.empty() || (allow_missing && rng_() % 20 == 0))
      return SeqId{1'000'000 + rng_() % 5};
    auto it = expected_.begin();
    std::advance(it, rng_() % expected_.size());
    return it->first;
  }

  void flush_copies() { slots_.apply(cache_.take_pending_copies()); }

  void check_invariants() {
    std::vector<uint32_t> holders(kBlocks, 0);
    ASSERT_EQ(cache_.sequence_ids().size(), expected_.size());
    for (const auto& [id, tokens] : expected_) {
      const SequenceInfo* s = cache_.get_sequence(id);
      ASSERT_NE(s, nullptr) << id;
      ASSERT_EQ(s->num_tokens, tokens.size()) << id;
      ASSERT_EQ(s->num_blocks(), (tokens.size() + kBlockSize - 1) / kBlockSize) << id;
      for (BlockId b : s->block_ids)
        ++holders.at(b.value);
      if (cache_.pending_copies().empty()) {
        ASSERT_EQ(slots_.read(*s), tokens) << id;
      }
    }
    size_t unreferenced = 0;
    size_t idle = 0;
    for (uint32_t b = 0; b < kBlocks; ++b) {
      const BlockId block{b};
      const uint32_t retained = cache_.is_retained(block) ? 1 : 0;
      ASSERT_EQ(retained, retainer_.held().count(block)) << block;
      ASSERT_EQ(cache_.block_ref_count(block), holders[b] + retained) << block;
      if (holders[b] + retained == 0) ++unreferenced;
      if (retained && holders[b] == 0) {
        ++idle;
        ASSERT_TRUE(retainer_.is_idle(block)) << block;
      }
    }
    // No free block is referenced, and every unreferenced block is free; cached = idle retained.
    ASSERT_EQ(unreferenced, cache_.free_block_count());
    ASSERT_EQ(idle, cache_.cached_block_count());
    ASSERT_EQ(cache_.free_block_count() + cache_.cached_block_count() + cache_.used_block_count(),
              cache_.total_blocks());
    // A retained block is never written: it still holds what it held when it was retained.
    std::erase_if(snapshots_, [&](const auto& kv) { return !cache_.is_retained(kv.first); });
    if (cache_.pending_copies().empty()) {
      for (const auto& [block, tokens] : snapshots_)
        ASSERT_EQ(slots_.read_block(block, tokens.size()), tokens) << block;
    }
    ASSERT_TRUE(cache_.verify_integrity().ok()) << cache_.verify_integrity();
  }

  // The blocks a sequence just wrote (or a copy this call queued fills) belong to it alone.
  void expect_private_writes(SeqId id, size_t first_written, size_t copies_before) {
    const SequenceInfo* s = cache_.get_sequence(id);
    for (size_t pos = first_written; pos < s->num_tokens; pos += 1) {
      ASSERT_EQ(cache_.block_ref_count(s->block_ids[pos / kBlockSize]), 1u)
          << id << " wrote position " << pos << " into a shared block";
    }
    const auto& copies = cache_.pending_copies();
    for (size_t i = copies_before; i < copies.size(); ++i) {
      ASSERT_EQ(cache_.block_ref_count(copies[i].dst_block), 1u) << copies[i];
    }
  }

  void step() {
    const std::string before = fingerprint(cache_);
    const size_t copies_before = cache_.pending_copies().size();
    const int op = static_cast<int>(rng_() % 100);
    Status status;
    if (op < 15) {  // allocate
      const SeqId id =
          rng_() % 10 == 0 && !expected_.empty() ? random_live(false) : SeqId{next_seq_++};
      const size_t n = rng_() % 41;
      status = cache_.allocate(id, n);
      if (status.ok()) {
        flush_copies();
        expected_[id] = fresh_tokens(n);
        slots_.write(*cache_.get_sequence(id), 0, expected_[id]);
        expect_private_writes(id, 0, copies_before);
      }
    } else if (op < 50) {  // append
      const SeqId id = random_live(true);
      const size_t n = rng_() % 4 == 0 ? rng_() % 9 : 1;
      const size_t old = expected_.count(id) ? expected_[id].size() : 0;
      status = cache_.append(id, n);
      if (status.ok()) {
        expect_private_writes(id, old, copies_before);
        flush_copies();
        const auto tokens = fresh_tokens(n);
        slots_.write(*cache_.get_sequence(id), old, tokens);
        expected_[id].insert(expected_[id].end(), tokens.begin(), tokens.end());
      }
    } else if (op < 62) {  // fork
      const SeqId src = random_live(true);
      const SeqId dst =
          rng_() % 10 == 0 && !expected_.empty() ? random_live(false) : SeqId{next_seq_++};
      status = cache_.fork(src, dst);
      if (status.ok()) expected_[dst] = expected_[src];
    } else if (op < 72) {  // free
      const SeqId id = random_live(true);
      status = cache_.free(id);
      if (status.ok()) expected_.erase(id);
    } else if (op < 75) {  // evict
      auto evicted = cache_.evict();
      status = evicted.status();
      if (evicted.ok()) expected_.erase(evicted.value());
    } else if (op < 78) {  // evict_to_threshold
      const double target = static_cast<double>(rng_() % 11) / 10.0;
      auto evicted = cache_.evict_to_threshold(target);
      status = evicted.status();
      ASSERT_TRUE(evicted.ok());
      for (SeqId id : evicted.value())
        expected_.erase(id);
      ASSERT_LE(cache_.utilization(), target + 1e-12);
    } else if (op < 90) {  // apply_streaming_llm
      const SeqId id = random_live(true);
      const size_t sink = rng_() % 9;
      const size_t window = rng_() % 25;
      auto dropped = cache_.apply_streaming_llm(id, sink, window);
      status = dropped.status();
      if (dropped.ok() && dropped.value() > 0) {
        expect_private_writes(id, cache_.get_sequence(id)->num_tokens, copies_before);
        auto& tokens = expected_[id];
        std::vector<int64_t> kept(tokens.begin(), tokens.begin() + sink);
        kept.insert(kept.end(), tokens.end() - window, tokens.end());
        tokens = kept;
      }
    } else {  // set_priority
      const SeqId id = random_live(true);
      status = cache_.set_priority(id, static_cast<uint32_t>(rng_() % 6));
    }
    if (!status.ok()) {
      ASSERT_EQ(fingerprint(cache_), before) << "failed call changed state: " << status;
    }
    if (rng_() % 2 == 0) flush_copies();  // copies may also pile up across calls
    check_invariants();
    if (GetParam().retainer) {
      ASSERT_NO_FATAL_FAILURE(retainer_step());
      check_invariants();
    }
  }

  // Retain a block of a live sequence, release a retained block, or share full blocks (cached
  // or held) into a new sequence. Uses its own generator so the main sequence stays the same.
  void retainer_step() {
    flush_copies();
    const int op = static_cast<int>(retain_rng_() % 10);
    if (op < 5 && !expected_.empty()) {  // retain
      auto it = expected_.begin();
      std::advance(it, retain_rng_() % expected_.size());
      const SequenceInfo* s = cache_.get_sequence(it->first);
      if (s->block_ids.empty()) return;
      const size_t index = retain_rng_() % s->block_ids.size();
      const BlockId block = s->block_ids[index];
      const Status status = cache_.retain_block(block);
      if (cache_.is_retained(block) && !status.ok()) {
        ASSERT_EQ(status.code(), ErrorCode::kInvalidOperation);
        return;
      }
      ASSERT_TRUE(status.ok()) << status;
      retainer_.retained(block);
      const size_t filled = std::min(kBlockSize, s->num_tokens - index * kBlockSize);
      snapshots_[block] = slots_.read_block(block, filled);
    } else if (op < 7 && !retainer_.held().empty()) {  // release
      auto it = retainer_.held().begin();
      std::advance(it, retain_rng_() % retainer_.held().size());
      const BlockId block = *it;
      ASSERT_TRUE(cache_.release_retained_block(block).ok());
      retainer_.released(block);
    } else {  // share full blocks into a new sequence
      std::vector<BlockId> candidates;
      for (const auto& [block, tokens] : snapshots_) {
        if (tokens.size() == kBlockSize) candidates.push_back(block);
      }
      for (const auto& [id, tokens] : expected_) {
        const SequenceInfo* s = cache_.get_sequence(id);
        for (size_t i = 0; i < tokens.size() / kBlockSize; ++i)
          candidates.push_back(s->block_ids[i]);
      }
      std::sort(candidates.begin(), candidates.end());
      candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
      std::shuffle(candidates.begin(), candidates.end(), retain_rng_);
      candidates.resize(std::min<size_t>(candidates.size(), retain_rng_() % 4));
      const size_t extra = retain_rng_() % 9;
      std::vector<int64_t> tokens;
      for (BlockId block : candidates) {
        const auto content = slots_.read_block(block, kBlockSize);
        tokens.insert(tokens.end(), content.begin(), content.end());
      }
      const SeqId id{next_seq_++};
      const std::string before = fingerprint(cache_);
      const Status status = cache_.allocate_shared(id, tokens.size() + extra, candidates);
      if (!status.ok()) {
        ASSERT_EQ(status.code(), ErrorCode::kOutOfMemory) << status;
        ASSERT_EQ(fingerprint(cache_), before) << "failed call changed state: " << status;
        return;
      }
      expect_private_writes(id, tokens.size(), 0);
      const auto fresh = fresh_tokens(extra);
      slots_.write(*cache_.get_sequence(id), tokens.size(), fresh);
      tokens.insert(tokens.end(), fresh.begin(), fresh.end());
      expected_[id] = tokens;
    }
  }

  testing::FifoRetainer retainer_;  // declared first: the cache points to it
  PagedKvCache cache_;
  testing::SlotModel slots_;
  std::map<SeqId, std::vector<int64_t>> expected_;
  std::map<BlockId, std::vector<int64_t>> snapshots_;  // retained block -> tokens it held
  std::mt19937_64 rng_{testing::property_seed(20261122)};
  std::mt19937_64 retain_rng_{testing::property_seed(4)};
  int64_t next_token_ = 0;
  uint64_t next_seq_ = 1;
};

TEST_P(BlockManagerProperty, RandomOperationsKeepEveryInvariant) {
  SCOPED_TRACE(testing::property_trace());
  for (uint64_t i = 0; i < testing::property_count(kOperations); ++i) {
    ASSERT_NO_FATAL_FAILURE(step()) << "operation " << i;
  }
  // The mix must actually exercise the interesting paths.
  EXPECT_GT(cache_.stats().cow_copies, 100u);
  EXPECT_GT(cache_.stats().compactions, 100u);
  EXPECT_GT(cache_.stats().total_evictions, 100u);
  if (GetParam().retainer) {
    EXPECT_GT(cache_.stats().cached_blocks_reclaimed, 100u);
    EXPECT_GT(cache_.stats().shared_prefix_blocks, 1000u);
    EXPECT_GT(retainer_.used_events, 100u);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Strategies, BlockManagerProperty,
    ::testing::Values(PropertyCase{EvictionStrategy::lru()}, PropertyCase{EvictionStrategy::lfu()},
                      PropertyCase{EvictionStrategy::longest_first()},
                      PropertyCase{EvictionStrategy::priority(4)},
                      PropertyCase{EvictionStrategy::streaming_llm(4, 16)},
                      PropertyCase{EvictionStrategy::lru(), true},
                      PropertyCase{EvictionStrategy::streaming_llm(4, 16), true}),
    [](const auto& param_info) {
      std::string name = param_info.param.strategy.to_string();
      name.erase(std::remove_if(name.begin(), name.end(), [](char c) { return !std::isalnum(c); }),
                 name.end());
      return param_info.param.retainer ? name + "WithRetainer" : name;
    });

}  // namespace
}  // namespace kvfabric
