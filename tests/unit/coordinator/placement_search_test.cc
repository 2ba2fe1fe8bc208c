// Coordinator::admission_costs, and admit()'s pruned search for the cheapest replica checked
// against it: choose_replica ranks the few holders of a prompt's deepest part directly and
// searches the rest in load order only while one could still win. Random workloads whose shared
// system prompts spread to more than 16 and more than 64 replicas reach every branch of that
// search; each admission must land where the exhaustive costs say.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <optional>
#include <random>
#include <vector>

#include "kvfabric/coordinator/coordinator.h"
#include "testing/property_env.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using testing::serving_config;
using testing::token_run;

// The replica admit() must take when one has room: the cheapest that accepts the request and has
// room, ties to the lower id.
std::optional<uint32_t> cheapest_with_room(const std::vector<AdmissionCost>& costs) {
  std::optional<uint32_t> best;
  for (const AdmissionCost& c : costs) {
    if (!c.accepts || !c.has_room()) continue;
    if (!best || c.cost < costs[*best].cost) best = c.replica;  // replica order: ties stay lower
  }
  return best;
}

std::vector<ReplicaStats> all_replica_stats(const Coordinator& c) {
  std::vector<ReplicaStats> stats;
  for (uint32_t r = 0; r < c.num_replicas(); ++r) stats.push_back(c.replica_stats(r));
  return stats;
}

bool same(const ReplicaStats& a, const ReplicaStats& b) {
  return a.used_blocks == b.used_blocks && a.cached_blocks == b.cached_blocks &&
         a.free_blocks == b.free_blocks && a.indexed_blocks == b.indexed_blocks &&
         a.sequences == b.sequences && a.swapped == b.swapped;
}

TEST(AdmissionCosts, NameTheCachedPrefixTheMigrationAndTheLoadOfEachReplica) {
  Config config = serving_config(3, 1, 4, 2, 64, 0);
  Coordinator c = Coordinator::create(config).value();
  const std::vector<TokenId> prompt = token_run(80, 1);  // 5 blocks
  ASSERT_TRUE(c.admit(SeqId{1}, prompt).ok());
  const uint32_t holder = *c.replica_of(SeqId{1});
  ASSERT_TRUE(c.step().ok());  // indexes the prompt

  const auto costs = c.admission_costs(prompt);
  ASSERT_TRUE(costs.ok()) << costs.status().to_string();
  ASSERT_EQ(costs->size(), 3u);
  const CoordinatorConfig& w = config.coordinator;
  for (const AdmissionCost& cost : *costs) {
    EXPECT_TRUE(cost.accepts);
    EXPECT_EQ(cost.blocks_available, 64u - (cost.replica == holder ? 5u : 0u));
    if (cost.replica == holder) {
      EXPECT_EQ(cost.cached_tokens, 80u);
      EXPECT_FALSE(cost.migration_source);
      EXPECT_DOUBLE_EQ(cost.load, w.queue_weight + w.memory_weight * 5.0 / 64.0);
      EXPECT_DOUBLE_EQ(cost.cost, cost.load);  // nothing to compute
      EXPECT_EQ(cost.blocks_needed, 0u);       // every block is the running sequence's already
    } else {
      EXPECT_EQ(cost.cached_tokens, 0u);
      ASSERT_EQ(cost.migration_source, holder);  // moving 80 tokens beats computing them
      EXPECT_EQ(cost.migrated_tokens, 80u);
      EXPECT_DOUBLE_EQ(cost.load, 0.0);
      EXPECT_DOUBLE_EQ(cost.cost, w.migration_token_cost * 80);
      EXPECT_EQ(cost.blocks_needed, 5u);
    }
  }
  // The holder is loaded by the running sequence; moving the prefix to an idle replica costs
  // less, and admit() goes where the costs say: the lowest such replica.
  const uint32_t expected = holder == 0 ? 1 : 0;
  EXPECT_EQ(cheapest_with_room(*costs), expected);
  const auto placed = c.admit(SeqId{2}, prompt);
  ASSERT_TRUE(placed.ok());
  EXPECT_EQ(placed->replica, expected);
  EXPECT_EQ(placed->migrated_tokens, 80u);
}

TEST(AdmissionCosts, ReadTheSaltAndThePriorityAndChangeNothing) {
  Config config = serving_config(2, 1, 4, 2, 16, 8);
  config.coordinator.max_sequences_per_replica = 1;
  Coordinator c = Coordinator::create(config).value();
  const std::vector<TokenId> prompt = token_run(48, 1);
  AdmitOptions salted;
  salted.tenant = "a";
  ASSERT_TRUE(c.admit(SeqId{1}, prompt, salted).ok());
  ASSERT_TRUE(c.step().ok());
  const uint32_t holder = *c.replica_of(SeqId{1});

  const auto before = all_replica_stats(c);
  const uint64_t admitted = c.stats().admitted;
  const std::vector<std::string> tenants = c.tenants();
  AdmitOptions stranger;
  stranger.tenant = "b";
  ASSERT_TRUE(c.admission_costs(prompt, stranger).ok());
  const auto as_a = c.admission_costs(prompt, salted).value();
  const auto unsalted = c.admission_costs(prompt).value();
  EXPECT_EQ(as_a[holder].cached_tokens, 48u);
  EXPECT_EQ(unsalted[holder].cached_tokens, 0u);  // another namespace
  EXPECT_FALSE(as_a[holder].accepts);             // full: one sequence per replica
  EXPECT_TRUE(as_a[1 - holder].accepts);
  EXPECT_EQ(c.tenants(), tenants);  // asking for "b" did not register it
  const auto after = all_replica_stats(c);
  for (uint32_t r = 0; r < 2; ++r) EXPECT_TRUE(same(before[r], after[r])) << "replica " << r;
  EXPECT_EQ(c.stats().admitted, admitted);
  EXPECT_TRUE(c.verify_integrity().ok());

  // What admit would refuse for the priority is refused here too, naming it.
  Config prioritized = serving_config(2, 1, 4, 2, 16, 8);
  prioritized.cache.eviction.strategy = EvictionPolicy::kPriority;
  prioritized.cache.eviction.priority_levels = 2;
  prioritized.tenants.max_priority = 0;
  Coordinator p = Coordinator::create(prioritized).value();
  AdmitOptions high;
  high.priority = 7;
  EXPECT_THAT(p.admission_costs(prompt, high).status().message(),
              ::testing::HasSubstr("priority 7 for the request is out of range"));
  EXPECT_FALSE(p.admit(SeqId{1}, prompt, high).ok());
  high.priority = 1;
  high.tenant = "t";
  EXPECT_THAT(p.admission_costs(prompt, high).status().message(),
              ::testing::HasSubstr("priority 1 is above 0, the highest this tenant may give"));
  EXPECT_EQ(p.tenants(), std::vector<std::string>({""}));  // "t" was not registered

  const auto empty = c.admission_costs({});
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(empty.status().message(), ::testing::HasSubstr("the prompt is empty"));
}

struct SearchCase {
  uint32_t dp;
  uint64_t blocks_per_replica;
  uint64_t seed;
  //! With a host tier, a sequence limit and priority eviction, replicas refuse newcomers now and
  //! then (full, or bringing swapped sequences back): the search must skip them.
  bool refusing_replicas = false;
};

// The cost admit() weighs, from what the coordinator shows of each replica: its cached prefix,
// its running sequences and used blocks, and the weights of the config.
void expect_costs_follow_the_formula(const Coordinator& c, std::span<const TokenId> prompt,
                                     const AdmitOptions& options,
                                     const std::vector<AdmissionCost>& costs) {
  const CoordinatorConfig& w = c.config().coordinator;
  std::vector<size_t> local(c.num_replicas());
  for (uint32_t r = 0; r < c.num_replicas(); ++r) local[r] = c.cached_tokens(r, prompt, options);
  const auto deepest = std::max_element(local.begin(), local.end());  // the lowest id among ties
  const auto best_source = static_cast<uint32_t>(deepest - local.begin());
  for (uint32_t r = 0; r < c.num_replicas(); ++r) {
    const ReplicaStats stats = c.replica_stats(r);
    const double load = w.queue_weight * static_cast<double>(stats.sequences) +
                        w.memory_weight * static_cast<double>(stats.used_blocks) /
                            static_cast<double>(stats.device_blocks);
    const bool migrate = r != best_source && *deepest > local[r] &&
                         w.migration_token_cost < w.prefill_token_cost;
    const size_t covered = migrate ? *deepest : local[r];
    const double cost = w.prefill_token_cost * static_cast<double>(prompt.size() - covered) +
                        (migrate ? w.migration_token_cost * static_cast<double>(*deepest - local[r])
                                 : 0.0) +
                        load;
    ASSERT_EQ(costs[r].cached_tokens, local[r]) << "replica " << r;
    ASSERT_EQ(costs[r].migration_source, migrate ? std::optional(best_source) : std::nullopt);
    ASSERT_DOUBLE_EQ(costs[r].load, load) << "replica " << r;
    ASSERT_NEAR(costs[r].cost, cost, 1e-9 * cost) << "replica " << r;
    ASSERT_EQ(costs[r].blocks_available, stats.free_blocks + stats.cached_blocks);
  }
}

void PrintTo(const SearchCase& c, std::ostream* os) {
  *os << "dp " << c.dp << ", " << c.blocks_per_replica << " blocks a replica, seed " << c.seed
      << (c.refusing_replicas ? ", replicas that refuse newcomers" : "");
}

class PlacementSearchProperty : public ::testing::TestWithParam<SearchCase> {};

// Shared system prompts (a few blocks each, some extending one another) with random user
// suffixes; admissions, appends, frees and steps at random. Every admission is checked against
// the exhaustive costs taken just before it.
TEST_P(PlacementSearchProperty, EveryAdmissionTakesTheCheapestReplicaWithRoom) {
  const SearchCase param = GetParam();
  Config config = serving_config(param.dp, 1, 4, 2, param.blocks_per_replica,
                                 param.refusing_replicas ? param.blocks_per_replica / 2 : 0);
  if (param.refusing_replicas) {
    config.coordinator.max_sequences_per_replica = 5;
    config.cache.eviction.strategy = EvictionPolicy::kPriority;
    config.cache.eviction.priority_levels = 3;
  }
  Coordinator c = Coordinator::create(config).value();
  const uint64_t seed = testing::property_seed(param.seed);
  std::mt19937_64 rng(seed);
  const size_t bs = config.cache.block_size;
  const std::vector<std::vector<TokenId>> systems = {
      token_run(2 * bs, 1'000'000), token_run(4 * bs, 2'000'000), token_run(6 * bs, 3'000'000)};
  std::vector<SeqId> running;
  uint64_t next_seq = 1, next_token = 1, checked = 0, over_16 = 0, over_64 = 0, migrated = 0,
           refusing = 0;
  const uint64_t ops = testing::property_count(1200);
  for (uint64_t op = 0; op < ops; ++op) {
    uint64_t dice = rng() % 10;
    if (dice < 5 && running.size() >= 4 * size_t{param.dp}) dice = 7;  // a free: keep some room
    if (dice < 5) {
      std::vector<TokenId> prompt = systems[rng() % systems.size()];
      if (rng() % 4 == 0) prompt.resize(prompt.size() - bs);  // a shorter version of one
      const size_t suffix = rng() % (3 * bs);
      for (size_t i = 0; i < suffix; ++i) prompt.push_back(static_cast<TokenId>(next_token++));
      AdmitOptions options;
      options.priority = static_cast<uint32_t>(rng() % 3);
      const auto costs = c.admission_costs(prompt, options);
      ASSERT_TRUE(costs.ok()) << costs.status().to_string();
      ASSERT_NO_FATAL_FAILURE(expect_costs_follow_the_formula(c, prompt, options, *costs));
      const auto holders = std::count_if(costs->begin(), costs->end(),
                                         [](const AdmissionCost& a) { return a.cached_tokens > 0; });
      refusing += std::any_of(costs->begin(), costs->end(),
                              [](const AdmissionCost& a) { return !a.accepts; });
      over_16 += holders > 16;
      over_64 += holders > 64;
      const std::optional<uint32_t> expected = cheapest_with_room(*costs);
      const SeqId seq{next_seq++};
      const auto placed = c.admit(seq, prompt, options);
      if (expected) {
        ASSERT_TRUE(placed.ok()) << "op " << op << ": " << placed.status().to_string() << " "
                                 << testing::property_trace();
        const AdmissionCost& want = (*costs)[*expected];
        ASSERT_EQ(placed->replica, *expected)
            << "op " << op << ": costs " << (*costs)[placed->replica].cost << " there, "
            << want.cost << " on the expected one; " << holders << " holders; "
            << testing::property_trace();
        ASSERT_EQ(placed->migrated_tokens, want.migrated_tokens) << "op " << op;
        ASSERT_EQ(placed->cached_tokens, want.cached_tokens + want.migrated_tokens) << "op " << op;
        migrated += placed->migrated_tokens > 0;
        ++checked;
      }
      if (placed.ok()) running.push_back(seq);
    } else if (dice < 7 && !running.empty()) {
      const SeqId seq = running[rng() % running.size()];
      if (c.replica_of(seq)) (void)c.append(seq, 1 + rng() % bs);  // may be refused for room
    } else if (dice < 9 && !running.empty()) {
      const size_t i = rng() % running.size();
      if (c.replica_of(running[i])) {  // else preempted to make room
        ASSERT_TRUE(c.free(running[i]).ok());
      }
      running.erase(running.begin() + static_cast<ptrdiff_t>(i));
    } else {
      const auto plan = c.step();
      ASSERT_TRUE(plan.ok()) << plan.status().to_string();
      std::erase_if(running, [&](SeqId s) { return !c.replica_of(s); });  // preempted ones
    }
  }
  ASSERT_TRUE(c.verify_integrity().ok());
  // The workload reaches what it is for: admissions checked, prefixes moved, and prompts held by
  // more than 16 (ranked in load order) and more than 64 replicas (the scan that stops early).
  EXPECT_GT(checked, ops / 4);
  EXPECT_GT(migrated, 0u);
  EXPECT_GT(over_16, 0u);
  if (param.dp > 64) {
    EXPECT_GT(over_64, 0u);
  }
  if (param.refusing_replicas) {
    EXPECT_GT(refusing, ops / 20);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, PlacementSearchProperty,
                         ::testing::Values(SearchCase{24, 48, 11}, SearchCase{40, 24, 12},
                                           SearchCase{80, 40, 13}, SearchCase{96, 16, 14},
                                           SearchCase{24, 24, 15, true},
                                           SearchCase{72, 32, 16, true}),
                         [](const auto& test) {
                           return "dp" + std::to_string(test.param.dp) + "_blocks" +
                                  std::to_string(test.param.blocks_per_replica) +
                                  (test.param.refusing_replicas ? "_refusing" : "");
                         });

}  // namespace
}  // namespace kvfabric
