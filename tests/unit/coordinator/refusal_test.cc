// A refused request changes nothing (DESIGN.md §5): not the counters, not any sequence's replica,
// tier or blocks, not the prefix caches, not what the next plans hold. Each case builds the same
// state twice, sends the refused request to one coordinator only, and compares everything a
// scheduler or a rank can observe.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "kvfabric/coordinator/coordinator.h"
#include "testing/property_env.h"
#include "testing/random_client.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using testing::serving_config;
using testing::token_run;
using ::testing::HasSubstr;

// Everything observable of `c` for the sequences S0 .. S<max_seq>.
std::string observe(const Coordinator& c, uint64_t max_seq) {
  std::ostringstream out;
  const CoordinatorStats& s = c.stats();
  out << "admitted " << s.admitted << " prompt " << s.prompt_tokens << " hit " << s.local_hit_tokens
      << " migrated " << s.migrated_tokens << "/" << s.migrated_blocks << " swapped "
      << s.swapped_out << "/" << s.swapped_in << " parked " << s.parked << " preempted "
      << s.preempted << " steps " << s.steps << "\n";
  for (uint32_t r = 0; r < c.num_replicas(); ++r) {
    const ReplicaStats pools = c.replica_stats(r);
    out << "replica " << r << ": used " << pools.used_blocks << " cached " << pools.cached_blocks
        << " free " << pools.free_blocks << " sequences " << pools.sequences << " host free "
        << pools.host_free_blocks << " indexed " << pools.indexed_blocks << "\n";
  }
  for (uint64_t id = 0; id <= max_seq; ++id) {
    const SeqId seq{id};
    const auto replica = c.replica_of(seq);
    if (!replica) continue;
    out << seq << " on " << *replica << (c.is_swapped(seq) ? " swapped" : "") << ":";
    for (BlockId b : c.blocks_of(seq)) out << " " << b.value;
    out << "\n";
  }
  // The random clients' tenants: their holdings and counters, but for the refusals charged to
  // them (a refusal counts there only; a tenant unknown so far reads as zeros and the defaults).
  for (const char* tenant : testing::RandomClient::kTenants) {
    const TenantStats t = c.tenant_stats(tenant);
    const TenantQuota q = c.tenant_quota(tenant);
    out << "tenant '" << tenant << "': admitted " << t.admitted << " prompt " << t.prompt_tokens
        << " cached " << t.cached_tokens << " migrated " << t.migrated_tokens << " preempted "
        << t.preempted << " sequences " << t.sequences << " blocks " << t.blocks << " host "
        << t.host_blocks << " quota " << q.max_blocks << "/" << q.max_host_blocks << "/"
        << q.max_sequences << "/" << q.max_priority << "\n";
  }
  return out.str();
}

// Builds a state twice with `setup`, refuses `request` on one copy, and checks that both then
// look and plan alike for two more steps.
template <typename Setup, typename Request>
void expect_refusal_changes_nothing(const Config& config, Setup setup, Request request,
                                    ErrorCode code, const std::string& message) {
  auto refused = Coordinator::create(config), control = Coordinator::create(config);
  ASSERT_TRUE(refused.ok() && control.ok());
  setup(*refused);
  setup(*control);
  ASSERT_EQ(observe(*refused, 64), observe(*control, 64));
  const Status status = request(*refused);
  EXPECT_EQ(status.code(), code) << status;
  EXPECT_THAT(status.message(), HasSubstr(message));
  EXPECT_EQ(observe(*refused, 64), observe(*control, 64));
  for (int step = 0; step < 2; ++step) {
    const auto a = refused->step(), b = control->step();
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b) << "step " << step;
  }
  EXPECT_EQ(observe(*refused, 64), observe(*control, 64));
  EXPECT_TRUE(refused->verify_integrity().ok());
}

// `count` sequences of 2 blocks each, computed (one step); placement alternates over replicas.
void admit_pairs(Coordinator& c, uint64_t first, size_t count, uint32_t priority = 0) {
  for (uint64_t i = 0; i < count; ++i) {
    const auto placed = c.admit(SeqId{first + i}, token_run(32, static_cast<TokenId>(1000 * (first + i))), priority);
    ASSERT_TRUE(placed.ok()) << placed.status();
  }
  ASSERT_TRUE(c.step().ok());
}

// Regression: append(seq, 2^32 - 1) on a full replica answered OutOfMemory after swapping out,
// parking and preempting the other sequences.
TEST(RefusalTest, AnAppendNothingCouldMakeRoomForDisplacesNobody) {
  expect_refusal_changes_nothing(
      serving_config(2, 1, 4, 2, 8, 4), [](Coordinator& c) { admit_pairs(c, 1, 8); },
      [](Coordinator& c) { return c.append(SeqId{7}, std::numeric_limits<uint32_t>::max()); },
      ErrorCode::kOutOfMemory, "append S7: needs 268435456 blocks on replica 0, which holds 8");
  // Within the pool, but more than every other sequence frees.
  expect_refusal_changes_nothing(
      serving_config(2, 1, 4, 2, 8, 4), [](Coordinator& c) { admit_pairs(c, 1, 8); },
      [](Coordinator& c) { return c.append(SeqId{7}, 16 * 6 + 1); }, ErrorCode::kOutOfMemory,
      "needs 7 blocks on replica 0, which has 0 available and could free 6 more");
}

// Regression: an admit that could not fit even after relief still swapped out a sequence of
// lower priority first.
TEST(RefusalTest, AnAdmitThatCannotFitEvenAfterReliefDisplacesNobody) {
  Config config = serving_config(1, 1, 4, 2, 8, 8);
  auto setup = [](Coordinator& c) {
    ASSERT_TRUE(c.admit(SeqId{1}, token_run(32, 100), 0).ok());   // 2 blocks, may be displaced
    ASSERT_TRUE(c.admit(SeqId{2}, token_run(96, 5000), 1).ok());  // 6 blocks, may not
    ASSERT_TRUE(c.step().ok());
  };
  expect_refusal_changes_nothing(
      config, setup, [](Coordinator& c) { return c.admit(SeqId{3}, token_run(64, 9000), 1).status(); },
      ErrorCode::kOutOfMemory, "admit S3: needs 4 blocks on replica 0, which has 0 available and could free 2 more");
  // A newcomer of priority 2 may displace both, and then it fits.
  auto c = Coordinator::create(config);
  ASSERT_TRUE(c.ok());
  setup(*c);
  ASSERT_TRUE(c->admit(SeqId{3}, token_run(64, 9000), 2).ok());
  EXPECT_EQ(c->stats().swapped_out, 2u);
}

// Regression: relief counted a cached block as regained once its last sequence let go, though
// the index keeps it in use while a longer prefix hangs below it: the admission swapped its
// victim out, then failed with an internal error.
TEST(RefusalTest, ACachedPrefixStillInUseBelowIsNotRoomARefusalCounts) {
  Config config = serving_config(1, 1, 4, 2, 6, 8);
  auto setup = [](Coordinator& c) {
    // One step: V computes P, C computes P + Q from its own copy; the step indexes P on V's
    // blocks and Q under it on C's.
    ASSERT_TRUE(c.admit(SeqId{1}, token_run(32, 100), 0).ok());
    auto longer = token_run(32, 100);
    const auto q = token_run(16, 700);
    longer.insert(longer.end(), q.begin(), q.end());
    ASSERT_TRUE(c.admit(SeqId{2}, longer, 1).ok());
    ASSERT_TRUE(c.step().ok());
  };
  // Displacing V leaves P's blocks in use under C's Q: one free block, not three.
  expect_refusal_changes_nothing(
      config, setup, [](Coordinator& c) { return c.admit(SeqId{3}, token_run(48, 9000), 1).status(); },
      ErrorCode::kOutOfMemory, "admit S3: needs 3 blocks on replica 0, which has 1 available and could free 0 more");
}

// Regression: relief counted the cached prefix a newcomer shares as room its victim's exit would
// free (nothing of the victim's used it any more, only a prefix hanging below it), so the admit
// preempted its victim, then failed with an internal error for want of that room.
TEST(RefusalTest, TheSharedPrefixIsNotRoomReliefCounts) {
  Config config = serving_config(1, 1, 4, 2, 8, 0);
  const std::vector<TokenId> shared = token_run(32, 1000);  // 2 blocks
  auto setup = [&](Coordinator& c) {
    // One step: S1 computes shared + 1 block and indexes it; S2 computes shared + 2 blocks from
    // its own copy, and its 2 blocks are indexed under S1's copy of the shared part.
    auto first = shared, second = shared;
    const auto tail1 = token_run(16, 2000), tail2 = token_run(32, 3000);
    first.insert(first.end(), tail1.begin(), tail1.end());
    second.insert(second.end(), tail2.begin(), tail2.end());
    ASSERT_TRUE(c.admit(SeqId{1}, first).ok());
    ASSERT_TRUE(c.admit(SeqId{2}, second).ok());
    ASSERT_TRUE(c.step().ok());
    ASSERT_TRUE(c.free(SeqId{1}).ok());
    ASSERT_TRUE(c.step().ok());
  };
  // The newcomer shares the 2 blocks and needs 7 more: displacing S2 frees its 2 private blocks
  // and idles its 2 indexed ones, which with the free block and S1's idle one make 6, not 8.
  auto request = [&](Coordinator& c) {
    auto prompt = shared;
    const auto rest = token_run(112, 5000);
    prompt.insert(prompt.end(), rest.begin(), rest.end());
    return c.admit(SeqId{3}, prompt, 1).status();
  };
  expect_refusal_changes_nothing(config, setup, request, ErrorCode::kOutOfMemory,
                                 "admit S3: needs 7 blocks on replica 0");
}

// Regression: a cross-replica fork that could not fit parked another sequence first.
TEST(RefusalTest, ARefusedCrossReplicaForkDisplacesNobody) {
  Config config = serving_config(2, 1, 4, 2, 8, 0);  // no host tier: victims would be parked
  config.coordinator.queue_weight = 1e6;            // placement follows the running count
  config.coordinator.memory_weight = 0;
  auto setup = [](Coordinator& c) {
    ASSERT_EQ(c.admit(SeqId{1}, token_run(64, 100), 1)->replica, 0u);   // 4 blocks: the parent
    ASSERT_EQ(c.admit(SeqId{2}, token_run(32, 900), 0)->replica, 1u);   // 2 blocks, displaceable
    ASSERT_EQ(c.admit(SeqId{3}, token_run(16, 2000), 1)->replica, 0u);  // 1 block: 3 stay free
    ASSERT_EQ(c.admit(SeqId{4}, token_run(96, 5000), 1)->replica, 1u);  // 6 blocks: replica 1 full
    ASSERT_TRUE(c.step().ok());
  };
  expect_refusal_changes_nothing(
      config, setup, [](Coordinator& c) { return c.fork(SeqId{1}, SeqId{9}, 1u); },
      ErrorCode::kOutOfMemory, "fork S1 -> S9: needs 4 blocks on replica 1");
}

// Forks share their parent's blocks, so memory never stopped them: 200,000 forks of one sequence
// made 200,000 sequences in a pool of 64 blocks.
TEST(RefusalTest, SequencesBeyondTheReplicaLimitAreRefused) {
  Config config = serving_config(2, 1, 4, 2, 64, 0);
  config.coordinator.max_sequences_per_replica = 4;
  auto setup = [](Coordinator& c) {
    ASSERT_EQ(c.admit(SeqId{1}, token_run(40, 100))->replica, 0u);
    for (uint64_t child = 2; child <= 4; ++child) ASSERT_TRUE(c.fork(SeqId{1}, SeqId{child}).ok());
  };
  expect_refusal_changes_nothing(
      config, setup, [](Coordinator& c) { return c.fork(SeqId{1}, SeqId{5}); },
      ErrorCode::kResourceExhausted,
      "fork S1 -> S5: replica 0 holds 4 sequences (coordinator.max_sequences_per_replica)");
  // A newcomer goes to a replica with room; when every replica is full it is refused.
  auto c = Coordinator::create(config);
  ASSERT_TRUE(c.ok());
  setup(*c);
  for (uint64_t id = 10; id < 14; ++id) {
    const auto placed = c->admit(SeqId{id}, token_run(40, 100));
    ASSERT_TRUE(placed.ok()) << placed.status();
    EXPECT_EQ(placed->replica, 1u);
  }
  const auto refused = c->admit(SeqId{20}, token_run(8, 7));
  EXPECT_EQ(refused.status().code(), ErrorCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(), HasSubstr("every replica holds 4 sequences"));
  EXPECT_EQ(c->stats().admitted, 5u);

  // The default limit bounds a flood of forks.
  auto flood = Coordinator::create(serving_config(1, 1, 4, 2, 64, 0));
  ASSERT_TRUE(flood.ok());
  ASSERT_TRUE(flood->admit(SeqId{1}, token_run(40, 100)).ok());
  uint64_t forked = 0;
  for (uint64_t child = 2; child < 6000; ++child) forked += flood->fork(SeqId{1}, SeqId{child}).ok() ? 1 : 0;
  EXPECT_EQ(forked, 4095u);
  EXPECT_TRUE(flood->verify_integrity().ok());
}

// Regression: a client that never stepped grew the coordinator without bound (a loop of admit
// and free, or of append(seq, 0), gathered tables, releases and prompts for the next plan).
TEST(RefusalTest, APlanThatGathersTooMuchBeforeAStepRefusesMore) {
  Config config = serving_config(1, 1, 4, 2, 64, 0);
  config.coordinator.max_pending_plan_entries = 64;
  auto flood = Coordinator::create(config);
  ASSERT_TRUE(flood.ok());
  uint64_t admitted = 0;
  Status refused;
  for (int i = 0; i < 1000 && refused.ok(); ++i) {
    const auto placed = flood->admit(SeqId{1}, token_run(40, 100));
    refused = placed.status();
    if (placed.ok()) {
      ++admitted;
      ASSERT_TRUE(flood->free(SeqId{1}).ok());
    }
  }
  EXPECT_EQ(refused.code(), ErrorCode::kResourceExhausted);
  EXPECT_THAT(refused.message(),
              HasSubstr("admit S1: the next plan holds 65 entries, at most 64 "
                        "(coordinator.max_pending_plan_entries); call step first"));
  EXPECT_EQ(admitted, 13u);  // 3 prompt blocks + 1 table + 1 release each: 65 after 13
  ASSERT_TRUE(flood->admit(SeqId{2}, token_run(8, 7)).status().code() == ErrorCode::kResourceExhausted);
  ASSERT_TRUE(flood->step().ok());
  EXPECT_TRUE(flood->admit(SeqId{1}, token_run(40, 100)).ok());
  EXPECT_TRUE(flood->verify_integrity().ok());

  // append(seq, 0) marks the table of one sequence again and again: it is published once, so the
  // next plan does not grow with the calls.
  auto repeated = Coordinator::create(config);
  ASSERT_TRUE(repeated.ok());
  ASSERT_TRUE(repeated->admit(SeqId{1}, token_run(40, 100)).ok());
  ASSERT_TRUE(repeated->step().ok());
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE(repeated->append(SeqId{1}, 0).ok());
  const auto plan = repeated->step();
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->tables.size(), 1u);
  EXPECT_EQ(plan->tables[0].seq, SeqId{1});
}

// Random clients against twin coordinators: every call runs on the first, and on the second
// only when the first accepted it. After a refusal both must look alike, and after every call
// and step the first must pass its integrity check and both must plan alike. (Such a client
// found that relief counted a shared prefix as room, and a split that left another replica's
// load stale.)
TEST(RefusalProperty, RefusedCallsChangeNothingForRandomClients) {
  SCOPED_TRACE(testing::property_trace());
  const uint64_t first = testing::property_seed(1);
  uint64_t refusals = 0;
  for (uint64_t seed = first; seed < first + testing::property_count(1500); ++seed) {
    testing::RandomClient client(seed, /*layer_groups=*/true);
    auto refused = Coordinator::create(client.config()), twin = Coordinator::create(client.config());
    ASSERT_TRUE(refused.ok() && twin.ok()) << refused.status();
    for (int call_index = 0; call_index < 300; ++call_index) {
      const testing::ClientCall call = client.next();
      const std::string where = "seed " + std::to_string(seed) + ", call " +
                                std::to_string(call_index) + " (" + call.describe() + ")";
      if (call.kind == testing::ClientCall::Kind::kStep) {
        const auto a = refused->step(), b = twin->step();
        ASSERT_TRUE(a.ok() && b.ok()) << where;
        ASSERT_EQ(*a, *b) << where;
        for (const StepPlan::ScoreRequest& request : a->score_requests) {
          std::vector<double> scores(refused->tokens_of(request.seq));
          for (size_t i = 0; i < scores.size(); ++i) scores[i] = static_cast<double>((request.seq.value * 31 + i * 17) % 13);
          ASSERT_EQ(refused->report_attention(request.seq, a->step, scores),
                    twin->report_attention(request.seq, b->step, scores)) << where;
        }
      } else {
        const Status status = testing::RandomClient::apply(call, *refused);
        ASSERT_TRUE(status.code() != ErrorCode::kInternal) << where << ": " << status;
        if (status.ok()) {
          const Status again = testing::RandomClient::apply(call, *twin);
          ASSERT_TRUE(again.ok()) << where << ": the twin refused " << again;
        } else {
          ++refusals;
          ASSERT_EQ(observe(*refused, testing::RandomClient::kSequences),
                    observe(*twin, testing::RandomClient::kSequences))
              << where << " was refused (" << status << ") but changed the coordinator";
        }
      }
      const Status integrity = refused->verify_integrity();
      ASSERT_TRUE(integrity.ok()) << where << ": " << integrity;
    }
  }
  EXPECT_GT(refusals, 1000u);
}

}  // namespace
}  // namespace kvfabric
