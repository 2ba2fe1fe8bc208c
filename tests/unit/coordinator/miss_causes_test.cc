// Why prompt tokens missed the cache (CoordinatorStats::missed): each cause on its own, and the
// causes with the hits adding up to every prompt token over a mixed workload.
#include <gtest/gtest.h>

#include <random>

#include "coordinator/seen_blocks.h"
#include "kvfabric/coordinator/coordinator.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using testing::serving_config;
using testing::token_run;

Coordinator make(const Config& config) { return Coordinator::create(config).value(); }

// Admits, steps (indexing the prompt) and frees: the prompt stays cached, idle.
void cache_prompt(Coordinator& c, uint64_t seq, const std::vector<TokenId>& prompt,
                  const AdmitOptions& options = {}) {
  ASSERT_TRUE(c.admit(SeqId{seq}, prompt, options).ok());
  ASSERT_TRUE(c.step().ok());
  ASSERT_TRUE(c.free(SeqId{seq}).ok());
}

uint64_t sum(const MissedTokens& m) {
  return m.partial_block + m.other_replica + m.evicted + m.other_salt + m.never_seen;
}

TEST(MissCauses, ANewPromptIsNeverSeenButItsPartialBlock) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 8));
  ASSERT_TRUE(c.admit(SeqId{1}, token_run(70, 1)).ok());
  const MissedTokens& m = c.stats().missed;
  EXPECT_EQ(m.never_seen, 64u);
  EXPECT_EQ(m.partial_block, 6u);
  EXPECT_EQ(sum(m), 70u);
}

TEST(MissCauses, AnEvictedPrefixIsNamed) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 8));  // 16 blocks
  const auto a = token_run(64, 1);
  cache_prompt(c, 1, a);
  cache_prompt(c, 2, token_run(16 * 16, 5000));  // takes every block: a is evicted
  const MissedTokens before = c.stats().missed;
  const auto again = c.admit(SeqId{3}, a);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->cached_tokens, 0u);
  EXPECT_EQ(c.stats().missed.evicted - before.evicted, 64u);
  EXPECT_EQ(c.stats().missed.never_seen, before.never_seen);
}

TEST(MissCauses, APrefixLeftOnAnotherReplicaIsNamed) {
  Config config = serving_config(2, 1, 4, 2, 16, 8);
  config.coordinator.max_sequences_per_replica = 1;
  config.coordinator.migration_token_cost = config.coordinator.prefill_token_cost * 2;  // no moves
  Coordinator c = make(config);
  const auto prompt = token_run(64, 1);
  const auto first = c.admit(SeqId{1}, prompt);
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(c.step().ok());  // indexed on its replica, which its sequence now fills
  const auto second = c.admit(SeqId{2}, prompt);
  ASSERT_TRUE(second.ok());
  ASSERT_NE(second->replica, first->replica);
  EXPECT_EQ(second->cached_tokens, 0u);
  EXPECT_EQ(c.stats().missed.other_replica, 64u);
  EXPECT_EQ(c.stats().missed.never_seen, 64u);  // the first admission's
}

TEST(MissCauses, AnotherTenantsPrefixIsNamed) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 8));
  const auto prompt = token_run(64, 1);
  AdmitOptions alice, bob;
  alice.tenant = "alice";
  bob.tenant = "bob";
  cache_prompt(c, 1, prompt, alice);
  const MissedTokens before = c.stats().missed;
  const auto placed = c.admit(SeqId{2}, prompt, bob);
  ASSERT_TRUE(placed.ok());
  EXPECT_EQ(placed->cached_tokens, 0u);
  EXPECT_EQ(c.stats().missed.other_salt - before.other_salt, 64u);
  EXPECT_EQ(c.stats().missed.never_seen, before.never_seen);
}

// A mixed workload: prompts share a few prefixes, under a few tenants, at random lengths; some
// sequences leave; a step every few operations. `each_admission` is called after every admission.
template <typename Observe>
void run_mixed_workload(Coordinator& c, Observe&& each_admission) {
  std::mt19937_64 rng(11);
  std::vector<uint64_t> live;
  uint64_t next = 1;
  for (int op = 0; op < 3000; ++op) {
    if (rng() % 3 != 0 || live.empty()) {
      std::vector<TokenId> prompt = token_run(16 * (1 + rng() % 3), 100 * static_cast<TokenId>(rng() % 4));
      const auto tail = token_run(rng() % 40, 7000 + static_cast<TokenId>(rng() % 3) * 100);
      prompt.insert(prompt.end(), tail.begin(), tail.end());
      AdmitOptions options;
      options.tenant = rng() % 4 == 0 ? "other" : "";
      if (c.admit(SeqId{next}, prompt, options).ok()) live.push_back(next);
      each_admission();
      ++next;
    } else {
      const size_t i = rng() % live.size();
      ASSERT_TRUE(c.free(SeqId{live[i]}).ok());
      live.erase(live.begin() + static_cast<ptrdiff_t>(i));
    }
    if (op % 7 == 0) {
      ASSERT_TRUE(c.step().ok());
    }
  }
}

TEST(MissCauses, HitsAndCausesAddUpToEveryPromptToken) {
  Coordinator c = make(serving_config(3, 1, 4, 2, 24, 8));
  run_mixed_workload(c, [] {});
  const CoordinatorStats& s = c.stats();
  EXPECT_EQ(s.local_hit_tokens + s.migrated_tokens + sum(s.missed), s.prompt_tokens);
  EXPECT_GT(s.missed.evicted, 0u);
  EXPECT_GT(s.missed.other_salt, 0u);
  EXPECT_GT(s.missed.never_seen, 0u);
  EXPECT_GT(s.local_hit_tokens, 0u);
}

// Admissions leave their misses to be counted by stats() or the next step: the counts must not
// depend on which comes first (a step remembers its prompts' blocks as seen only after counting).
TEST(MissCauses, CountsDoNotDependOnWhenStatsAreRead) {
  Coordinator read_each_time = make(serving_config(3, 1, 4, 2, 24, 8));
  Coordinator read_at_end = make(serving_config(3, 1, 4, 2, 24, 8));
  std::vector<MissedTokens> seen_each_time;
  run_mixed_workload(read_each_time, [&] { seen_each_time.push_back(read_each_time.stats().missed); });
  run_mixed_workload(read_at_end, [] {});
  const MissedTokens& a = read_each_time.stats().missed;
  const MissedTokens& b = read_at_end.stats().missed;
  EXPECT_EQ(a.partial_block, b.partial_block);
  EXPECT_EQ(a.other_replica, b.other_replica);
  EXPECT_EQ(a.evicted, b.evicted);
  EXPECT_EQ(a.other_salt, b.other_salt);
  EXPECT_EQ(a.never_seen, b.never_seen);
  // Read after every admission, the counts grow with every prompt.
  ASSERT_GT(seen_each_time.size(), 1u);
  EXPECT_GT(sum(seen_each_time.back()), sum(seen_each_time.front()));
}

// The filter behind "evicted": what it was given lately it always knows; what it was given two
// generations ago it forgets; what it never saw it takes for seen only now and then.
TEST(SeenBlocks, RemembersTheRecentPastAndForgetsTheRest) {
  detail::SeenBlocks seen(1);  // the smallest filter: 2^19 bits per generation, 65,536 keys
  const uint64_t per_generation = (uint64_t{1} << 19) / 8;
  auto key = [](uint64_t i) {
    const TokenId block[2] = {static_cast<TokenId>(i), static_cast<TokenId>(i >> 32)};
    return detail::SeenBlocks::key(block, i % 7, CacheSalt{}, false);
  };
  for (uint64_t i = 0; i < per_generation; ++i) seen.add(key(i));
  for (uint64_t i = 0; i < per_generation; ++i) ASSERT_TRUE(seen.contains(key(i))) << i;
  // A second generation: the first is still known.
  for (uint64_t i = per_generation; i < 2 * per_generation; ++i) seen.add(key(i));
  for (uint64_t i = 0; i < 2 * per_generation; ++i) ASSERT_TRUE(seen.contains(key(i))) << i;
  uint64_t false_positives = 0;
  for (uint64_t i = 10 * per_generation; i < 11 * per_generation; ++i) false_positives += seen.contains(key(i));
  EXPECT_LT(false_positives, per_generation / 8);  // two generations of about 1 in 20 each
  // A third: the first is forgotten (but for the same false-positive rate).
  for (uint64_t i = 2 * per_generation; i < 3 * per_generation + 1; ++i) seen.add(key(i));
  uint64_t remembered = 0;
  for (uint64_t i = 0; i < per_generation; ++i) remembered += seen.contains(key(i));
  EXPECT_LT(remembered, per_generation / 8);
  EXPECT_EQ(seen.memory_bytes(), detail::SeenBlocks::bytes_for(1));
  // A key names the sampled tokens, the position and the salt; "any salt" leaves the salt out.
  const auto block = token_run(16, 3);
  const CacheSalt alice = CacheSalt::of("alice"), bob = CacheSalt::of("bob");
  using detail::SeenBlocks;
  EXPECT_NE(SeenBlocks::key(block, 2, alice, false), SeenBlocks::key(block, 2, bob, false));
  EXPECT_NE(SeenBlocks::key(block, 2, alice, false), SeenBlocks::key(block, 3, alice, false));
  EXPECT_NE(SeenBlocks::key(block, 2, alice, false), SeenBlocks::key(token_run(16, 4), 2, alice, false));
  EXPECT_EQ(SeenBlocks::key(block, 2, alice, true), SeenBlocks::key(block, 2, bob, true));
  EXPECT_NE(SeenBlocks::key(block, 2, CacheSalt{}, false), SeenBlocks::key(block, 2, CacheSalt{}, true));
  EXPECT_EQ(detail::SeenBlocks::bytes_for(1), 2u * (uint64_t{1} << 19) / 8);
}

}  // namespace
}  // namespace kvfabric
