// A randomized serving loop over several replicas' pools sharing one GlobalPrefixIndex, checked
// against a model written independently of the tree: per replica, the set of cached block-aligned
// prefixes with their block ids and last use. After every operation the test checks that
//  - every replica's cached prefix of a prompt is the model's longest cached prefix,
//  - every block served holds exactly the K/V of the prompt's prefix (a fingerprint per block),
//  - eviction took, on its replica, the idle prefixes least recently used first, deepest first,
//  - the tree's own counters, links and victim sets agree with a recount (verify()),
//  - from a quarter of the run on, the KV events replayed by a subscriber give every replica's
//    cached blocks exactly as the model's prefixes hash them (kv_block_hash).
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <span>
#include <vector>

#include "kvfabric/block/paged_kv_cache.h"
#include "kvfabric/prefix/global_prefix_index.h"
#include "testing/property_env.h"

namespace kvfabric {
namespace {

using Tokens = std::vector<TokenId>;
constexpr uint32_t kReplicas = 3;
constexpr uint32_t kBlocks = 20;
constexpr uint32_t kBlockSize = 4;
constexpr uint64_t kOperations = 20'000;

uint64_t fingerprint(const Tokens& tokens, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ULL;
  for (size_t i = 0; i < n; ++i) {
    h = (h ^ tokens[i]) * 0xff51afd7ed558ccdULL;
    h ^= h >> 31;
  }
  return h ^ n;
}

struct Live {
  uint32_t replica = 0;
  Tokens tokens;
  size_t prompt = 0;  // tokens of the prompt (indexed at most once, like the coordinator does)
  bool indexed = false;
};

struct Cached {
  BlockId block;
  uint64_t last_access = 0;
};

class GlobalPrefixProperty : public ::testing::TestWithParam<uint64_t> {
 protected:
  GlobalPrefixProperty() : rng_(testing::property_seed(GetParam())) {
    index_ = GlobalPrefixIndex::create({kBlockSize, kReplicas, kBlocks}).value();
    for (uint32_t r = 0; r < kReplicas; ++r) {
      pools_.push_back(std::make_unique<PagedKvCache>(kBlocks, kBlockSize, 1, 8));
      EXPECT_TRUE(pools_.back()->set_block_retainer(&index_->retainer(r)).ok());
      content_.emplace_back(kBlocks, 0);
    }
    model_.resize(kReplicas);
  }

  Tokens random_prompt() {
    Tokens prompt;
    if (rng_() % 3 == 0 && !history_.empty()) {
      prompt = history_[rng_() % history_.size()];
      prompt.resize(rng_() % (prompt.size() + 1));
    } else if (rng_() % 2 == 0) {
      prompt = {1, 2, 3, 4, 5, 6, 7, 8};  // a system prompt of two blocks
    }
    const size_t extra = 1 + rng_() % 14;
    for (size_t i = 0; i < extra; ++i) prompt.push_back(static_cast<TokenId>(10 + rng_() % 4));
    return prompt;
  }

  bool used(uint32_t r, BlockId b) const { return pools_[r]->block_ref_count(b) >= 2; }

  // The model's longest cached prefix of `tokens` on replica r, in blocks.
  size_t model_blocks(uint32_t r, const Tokens& tokens) const {
    size_t blocks = 0;
    while ((blocks + 1) * kBlockSize <= tokens.size() &&
           model_[r].count(Tokens(tokens.begin(), tokens.begin() + (blocks + 1) * kBlockSize)) > 0) {
      ++blocks;
    }
    return blocks;
  }

  // Idle prefixes of replica r in the order eviction must take them: least recently used first,
  // deeper first among equals. A prefix is idle when no sequence uses it or a longer cached
  // prefix; `sharing` are blocks about to be used (the pool shares them before it reclaims).
  std::vector<Tokens> eviction_order(uint32_t r, const std::vector<BlockId>& sharing = {}) const {
    std::vector<Tokens> idle;
    for (const auto& [prefix, cached] : model_[r]) {
      bool subtree_idle = true;
      for (const auto& [other, oc] : model_[r]) {
        if (other.size() < prefix.size() || !std::equal(prefix.begin(), prefix.end(), other.begin())) {
          continue;
        }
        const bool shared = std::find(sharing.begin(), sharing.end(), oc.block) != sharing.end();
        if (used(r, oc.block) || shared) subtree_idle = false;
      }
      if (subtree_idle) idle.push_back(prefix);
    }
    std::sort(idle.begin(), idle.end(), [&](const Tokens& a, const Tokens& b) {
      const uint64_t ta = model_[r].at(a).last_access;
      const uint64_t tb = model_[r].at(b).last_access;
      return ta != tb ? ta < tb : a.size() > b.size();
    });
    return idle;
  }

  // Drops the model entries the index no longer holds and checks they were the first idle ones in
  // eviction order (computed before the operation reclaimed them).
  void reconcile_evictions(uint32_t r, const std::vector<Tokens>& order) {
    std::vector<Tokens> gone;
    for (const auto& [prefix, cached] : model_[r]) {
      if (!index_->is_indexed(r, cached.block)) gone.push_back(prefix);
    }
    ASSERT_LE(gone.size(), order.size()) << testing::property_trace();
    std::vector<Tokens> expected(order.begin(), order.begin() + static_cast<ptrdiff_t>(gone.size()));
    std::sort(expected.begin(), expected.end());
    ASSERT_EQ(gone, expected) << "replica " << r << " evicted out of order; "
                              << testing::property_trace();
    for (const Tokens& prefix : gone) model_[r].erase(prefix);
  }

  void touch(uint32_t r, const Tokens& tokens, size_t blocks) {
    ++tick_;
    for (size_t b = 1; b <= blocks; ++b) {
      model_[r].at(Tokens(tokens.begin(), tokens.begin() + b * kBlockSize)).last_access = tick_;
    }
  }

  // The K/V a sequence computes into its blocks from `first_block` on.
  void compute(const Live& s, const SequenceInfo& info, size_t first_block) {
    for (size_t i = first_block; i < info.block_ids.size(); ++i) {
      content_[s.replica][info.block_ids[i].value] =
          fingerprint(s.tokens, std::min(s.tokens.size(), (i + 1) * kBlockSize));
    }
  }

  void admit() {
    const uint32_t r = static_cast<uint32_t>(rng_() % kReplicas);
    const Tokens prompt = random_prompt();
    index_->lookup(RadixKey(prompt, kBlockSize), lookup_);
    for (uint32_t q = 0; q < kReplicas; ++q) {
      ASSERT_EQ(index_->prefix_on(lookup_, q).blocks, model_blocks(q, prompt))
          << "replica " << q << "; " << testing::property_trace();
    }
    const ReplicaPrefix held = index_->prefix_on(lookup_, r);
    const size_t needed = (prompt.size() + kBlockSize - 1) / kBlockSize;
    if (needed - held.blocks + held.idle_blocks > pools_[r]->available_block_count()) return;
    std::vector<BlockId> shared;
    index_->blocks_on(lookup_, r, held.blocks, shared);
    for (size_t i = 0; i < shared.size(); ++i) {
      ASSERT_EQ(content_[r][shared[i].value], fingerprint(prompt, (i + 1) * kBlockSize))
          << "served a block of other K/V; " << testing::property_trace();
    }
    index_->use(lookup_, r);
    if (held.blocks > 0) touch(r, prompt, held.blocks);
    const SeqId seq{next_seq_++};
    const std::vector<Tokens> order = eviction_order(r, shared);
    ASSERT_TRUE(pools_[r]->allocate_shared(seq, prompt.size(), shared).ok());
    reconcile_evictions(r, order);
    Live s{r, prompt, prompt.size(), false};
    compute(s, *pools_[r]->get_sequence(seq), shared.size());
    live_.emplace(seq, std::move(s));
    history_.push_back(prompt);
    if (history_.size() > 32) history_.erase(history_.begin());
  }

  void index_prompt() {
    std::vector<SeqId> candidates;
    for (const auto& [seq, s] : live_) {
      if (!s.indexed) candidates.push_back(seq);
    }
    if (candidates.empty()) return;
    const SeqId seq = candidates[rng_() % candidates.size()];
    Live& s = live_.at(seq);
    s.indexed = true;
    const Tokens prompt(s.tokens.begin(), s.tokens.begin() + static_cast<ptrdiff_t>(s.prompt));
    const std::vector<BlockId>& table = pools_[s.replica]->get_sequence(seq)->block_ids;
    const size_t full = prompt.size() / kBlockSize;
    const size_t cached = model_blocks(s.replica, prompt);
    auto added = index_->insert(s.replica, RadixKey(prompt, kBlockSize), table);
    ASSERT_TRUE(added.ok()) << added.status().to_string();
    ASSERT_EQ(added->size(), full - cached) << testing::property_trace();
    for (size_t i = 0; i < added->size(); ++i) {
      ASSERT_EQ((*added)[i], table[cached + i]);
      ASSERT_TRUE(pools_[s.replica]->retain_block((*added)[i]).ok());
      model_[s.replica][Tokens(prompt.begin(), prompt.begin() + (cached + i + 1) * kBlockSize)] =
          Cached{table[cached + i], 0};
    }
    if (full > 0) touch(s.replica, prompt, full);
  }

  void append() {
    if (live_.empty()) return;
    auto it = live_.begin();
    std::advance(it, static_cast<ptrdiff_t>(rng_() % live_.size()));
    Live& s = it->second;
    const size_t extra = 1 + rng_() % 6;
    const SequenceInfo* before = pools_[s.replica]->get_sequence(it->first);
    const size_t old_blocks = before->num_blocks();
    const size_t old_tokens = s.tokens.size();
    const size_t grown = (old_tokens + extra + kBlockSize - 1) / kBlockSize - old_blocks;
    const bool tail_shared = old_tokens % kBlockSize != 0 &&
                             pools_[s.replica]->block_ref_count(before->block_ids.back()) > 1;
    if (grown + (tail_shared ? 1 : 0) > pools_[s.replica]->available_block_count()) return;
    const std::vector<Tokens> order = eviction_order(s.replica);
    ASSERT_TRUE(pools_[s.replica]->append(it->first, extra).ok());
    (void)pools_[s.replica]->take_pending_copies();  // the tail is recomputed below
    reconcile_evictions(s.replica, order);
    for (size_t i = 0; i < extra; ++i) s.tokens.push_back(static_cast<TokenId>(10 + rng_() % 4));
    compute(s, *pools_[s.replica]->get_sequence(it->first), old_tokens / kBlockSize);
  }

  void free_one() {
    if (live_.empty()) return;
    auto it = live_.begin();
    std::advance(it, static_cast<ptrdiff_t>(rng_() % live_.size()));
    ASSERT_TRUE(pools_[it->second.replica]->free(it->first).ok());
    live_.erase(it);
  }

  // The chained hash of a block-aligned prefix's last block, as a router computes it.
  uint64_t prefix_hash(const Tokens& prefix) {
    auto known = hash_of_.find(prefix);
    if (known != hash_of_.end()) return known->second;
    std::optional<uint64_t> parent;
    if (prefix.size() > kBlockSize) parent = prefix_hash(Tokens(prefix.begin(), prefix.end() - kBlockSize));
    const uint64_t hash = kv_block_hash(
        parent, std::span(prefix).subspan(prefix.size() - kBlockSize), CacheSalt{});
    hash_of_.emplace(prefix, hash);
    return hash;
  }

  // A subscriber's view: applies the events, each stored block's parent already held.
  void apply_events(const std::vector<KvEvent>& events) {
    for (const KvEvent& e : events) {
      std::set<uint64_t>& held = subscriber_[e.replica];
      if (e.type == KvEventType::kBlockStored) {
        std::optional<uint64_t> parent = e.parent_block_hash;
        ASSERT_EQ(e.num_tokens, e.block_hashes.size() * kBlockSize);
        for (uint64_t h : e.block_hashes) {
          ASSERT_TRUE(!parent || held.count(*parent)) << "stored after an unknown parent; "
                                                      << testing::property_trace();
          ASSERT_TRUE(held.insert(h).second) << "stored twice; " << testing::property_trace();
          parent = h;
        }
      } else {
        ASSERT_EQ(e.type, KvEventType::kBlockRemoved);
        for (uint64_t h : e.block_hashes) {
          ASSERT_EQ(held.erase(h), 1u) << "removed a block not stored; " << testing::property_trace();
        }
      }
    }
  }

  void check_events() {
    apply_events(index_->take_events());
    for (uint32_t r = 0; r < kReplicas; ++r) {
      std::set<uint64_t> expected;
      for (const auto& [prefix, cached] : model_[r]) expected.insert(prefix_hash(prefix));
      ASSERT_EQ(subscriber_[r], expected) << "replica " << r << "; " << testing::property_trace();
    }
  }

  std::mt19937_64 rng_;
  std::unique_ptr<GlobalPrefixIndex> index_;
  std::vector<std::unique_ptr<PagedKvCache>> pools_;
  std::vector<std::vector<uint64_t>> content_;      // per replica, per block: its K/V's fingerprint
  std::vector<std::map<Tokens, Cached>> model_;     // per replica: cached prefixes
  std::map<SeqId, Live> live_;
  std::vector<Tokens> history_;
  PrefixLookup lookup_;
  uint64_t tick_ = 0;
  uint64_t next_seq_ = 0;
  std::map<Tokens, uint64_t> hash_of_;
  std::vector<std::set<uint64_t>> subscriber_ = std::vector<std::set<uint64_t>>(kReplicas);
};

TEST_P(GlobalPrefixProperty, MatchesTheModelAndNeverServesOtherKv) {
  const uint64_t operations = testing::property_count(kOperations);
  for (uint64_t op = 0; op < operations; ++op) {
    if (op == operations / 4) {  // a subscriber joins a running index: the snapshot, then events
      index_->record_events(true);
      apply_events(index_->holdings_as_events());
    }
    switch (rng_() % 5) {
      case 0:
      case 1:
        admit();
        break;
      case 2:
        index_prompt();
        break;
      case 3:
        append();
        break;
      default:
        free_one();
        break;
    }
    if (HasFatalFailure()) return;
    const Status status = index_->verify();
    ASSERT_TRUE(status.ok()) << "after operation " << op << ": " << status.to_string() << "; "
                             << testing::property_trace();
    for (uint32_t r = 0; r < kReplicas; ++r) {
      ASSERT_TRUE(pools_[r]->verify_integrity().ok());
      ASSERT_EQ(index_->cached_blocks(r), model_[r].size()) << testing::property_trace();
    }
    if (index_->recording_events()) check_events();
    if (HasFatalFailure()) return;
  }
  uint64_t evicted = 0;
  for (uint32_t r = 0; r < kReplicas; ++r) evicted += index_->evicted_blocks(r);
  EXPECT_GT(evicted, operations / 10) << "the workload should keep every replica under pressure";
  for (auto& [seq, s] : live_) ASSERT_TRUE(pools_[s.replica]->free(seq).ok());
  for (uint32_t r = 0; r < kReplicas; ++r) {
    EXPECT_EQ(index_->used_blocks(r), 0u);
    EXPECT_EQ(index_->idle_blocks(r), index_->cached_blocks(r));
  }
}

INSTANTIATE_TEST_SUITE_P(Seeds, GlobalPrefixProperty, ::testing::Values(1, 2, 3));

}  // namespace
}  // namespace kvfabric
