// The coordinator's KV events: what each replica's cache stores and drops, as a router outside
// the process follows it (set_kv_event_sink, kv_event_snapshot, reset_prefix_cache).
#include <gtest/gtest.h>

#include <algorithm>
#include <optional>
#include <span>
#include <vector>

#include "kvfabric/coordinator/coordinator.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using testing::serving_config;
using testing::token_run;
constexpr uint32_t kBlockSize = 16;  // serving_config's

// The hashes of a prompt's full blocks, computed as a router would.
std::vector<uint64_t> chain(const std::vector<TokenId>& prompt, const CacheSalt& salt = {}) {
  std::vector<uint64_t> hashes;
  std::optional<uint64_t> parent;
  for (size_t at = 0; at + kBlockSize <= prompt.size(); at += kBlockSize) {
    parent = kv_block_hash(parent, std::span(prompt).subspan(at, kBlockSize), salt);
    hashes.push_back(*parent);
  }
  return hashes;
}

class CoordinatorKvEvents : public ::testing::Test {
 protected:
  CoordinatorKvEvents() : c_(Coordinator::create(serving_config(2, 1, 4, 2, 16, 8)).value()) {}

  void subscribe() {
    c_.set_kv_event_sink([this](const KvEventBatch& batch) { batches_.push_back(batch); });
  }
  // Admits, steps (which indexes the prompt) and frees: the prompt stays cached, idle.
  uint32_t cache_prompt(uint64_t seq, const std::vector<TokenId>& prompt) {
    const auto placed = c_.admit(SeqId{seq}, prompt);
    EXPECT_TRUE(placed.ok()) << placed.status();
    EXPECT_TRUE(c_.step().ok());
    EXPECT_TRUE(c_.free(SeqId{seq}).ok());
    return placed->replica;
  }

  Coordinator c_;
  std::vector<KvEventBatch> batches_;
};

TEST_F(CoordinatorKvEvents, AStepReportsTheBlocksItsPlanComputes) {
  subscribe();
  const auto prompt = token_run(70, 100);  // 4 full blocks and a partial one
  const auto placed = c_.admit(SeqId{1}, prompt);
  ASSERT_TRUE(placed.ok());
  EXPECT_TRUE(batches_.empty());  // nothing is cached before the plan that computes it
  const auto plan = c_.step();
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(batches_.size(), 1u);
  EXPECT_EQ(batches_[0].step, plan->step);
  ASSERT_EQ(batches_[0].events.size(), 1u);
  const KvEvent& stored = batches_[0].events[0];
  EXPECT_EQ(stored.type, KvEventType::kBlockStored);
  EXPECT_EQ(stored.replica, placed->replica);
  EXPECT_EQ(stored.block_hashes, chain(prompt));
  EXPECT_EQ(stored.num_tokens, 64u);
  EXPECT_FALSE(stored.parent_block_hash);
  // A step that changes no cache sends no batch.
  ASSERT_TRUE(c_.step().ok());
  EXPECT_EQ(batches_.size(), 1u);
}

TEST_F(CoordinatorKvEvents, ATenantsBlocksCarryItsSalt) {
  subscribe();
  AdmitOptions alice;
  alice.tenant = "alice";
  const auto prompt = token_run(32, 7);
  ASSERT_TRUE(c_.admit(SeqId{1}, prompt, alice).ok());
  ASSERT_TRUE(c_.step().ok());
  ASSERT_EQ(batches_.size(), 1u);
  const KvEvent& stored = batches_[0].events.at(0);
  EXPECT_FALSE(stored.salt.empty());
  EXPECT_EQ(stored.block_hashes, chain(prompt, stored.salt));
  EXPECT_NE(stored.block_hashes, chain(prompt));
}

TEST_F(CoordinatorKvEvents, EvictionsForAnAdmissionComeWithTheNextStep) {
  c_ = Coordinator::create(serving_config(1, 1, 4, 2, 16, 8)).value();  // one replica, 16 blocks
  subscribe();
  const auto a = token_run(64, 1);  // 4 blocks, cached and idle
  cache_prompt(1, a);
  batches_.clear();
  // A prompt of all 16 blocks takes a's back; the change is reported with the step.
  const auto big = token_run(16 * kBlockSize, 5000);
  ASSERT_TRUE(c_.admit(SeqId{2}, big).ok());
  EXPECT_TRUE(batches_.empty());
  ASSERT_TRUE(c_.step().ok());
  ASSERT_EQ(batches_.size(), 1u);
  const std::vector<KvEvent>& events = batches_[0].events;
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].type, KvEventType::kBlockRemoved);
  std::vector<uint64_t> removed = events[0].block_hashes;
  std::sort(removed.begin(), removed.end());
  std::vector<uint64_t> expected = chain(a);
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(removed, expected);
  EXPECT_EQ(events[1].type, KvEventType::kBlockStored);
  EXPECT_EQ(events[1].block_hashes, chain(big));
}

TEST_F(CoordinatorKvEvents, ResetClearsIdlePrefixesAndKeepsUsedOnes) {
  subscribe();
  const auto a = token_run(64, 1);
  const auto b = token_run(48, 500);
  const auto pa = c_.admit(SeqId{1}, a);
  const auto pb = c_.admit(SeqId{2}, b);  // the other replica: the first one is busier
  ASSERT_TRUE(pa.ok() && pb.ok());
  ASSERT_NE(pa->replica, pb->replica);
  ASSERT_TRUE(c_.step().ok());
  ASSERT_TRUE(c_.free(SeqId{1}).ok());  // a stays cached, idle; b stays in use
  batches_.clear();

  const auto freed = c_.reset_prefix_cache();
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, 4u);
  EXPECT_EQ(c_.cached_tokens(pa->replica, a), 0u);
  EXPECT_EQ(c_.cached_tokens(pb->replica, b), 48u);
  ASSERT_EQ(batches_.size(), 1u);
  ASSERT_EQ(batches_[0].events.size(), 1u);
  EXPECT_EQ(batches_[0].events[0].type, KvEventType::kAllBlocksCleared);
  EXPECT_EQ(batches_[0].events[0].replica, pa->replica);
  EXPECT_TRUE(c_.verify_integrity().ok());
}

TEST_F(CoordinatorKvEvents, AResetOfAnUnknownReplicaIsRefusedAndChangesNothing) {
  subscribe();
  const auto a = token_run(64, 1);
  const uint32_t ra = cache_prompt(1, a);
  batches_.clear();
  const auto refused = c_.reset_prefix_cache(2);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(refused.status().message(), "reset_prefix_cache: replica 2 does not exist (dp 2)");
  EXPECT_EQ(c_.cached_tokens(ra, a), 64u);
  EXPECT_TRUE(batches_.empty());
  // The replica's own reset: just it.
  const auto freed = c_.reset_prefix_cache(ra == 0 ? 1 : 0);
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, 0u);
  EXPECT_EQ(c_.cached_tokens(ra, a), 64u);
  EXPECT_TRUE(batches_.empty());
}

TEST_F(CoordinatorKvEvents, ASnapshotThenTheEventsGiveWhatEachReplicaCaches) {
  const auto a = token_run(64, 1);
  const uint32_t ra = cache_prompt(1, a);  // before anyone subscribed
  EXPECT_TRUE(c_.kv_event_snapshot().events.empty());
  subscribe();
  const KvEventBatch snapshot = c_.kv_event_snapshot();
  ASSERT_EQ(snapshot.events.size(), 1u);
  EXPECT_EQ(snapshot.events[0].replica, ra);
  EXPECT_EQ(snapshot.events[0].block_hashes, chain(a));
  EXPECT_EQ(snapshot.step, c_.stats().steps);
  // Stopping: no more batches, and the hashes are gone from the index.
  c_.set_kv_event_sink(nullptr);
  EXPECT_FALSE(c_.prefix_index().recording_events());
  cache_prompt(2, token_run(32, 800));
  EXPECT_TRUE(batches_.empty());
}

}  // namespace
}  // namespace kvfabric
