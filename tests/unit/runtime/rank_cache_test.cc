#include "kvfabric/runtime/rank_cache.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <numeric>

#include "kvfabric/runtime/staged_transport.h"
#include "testing/backend_fixture.h"
#include "testing/property_env.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using Op = StepPlan::Op;
using testing::serving_config;
using ::testing::HasSubstr;

struct SingleRank {
  std::unique_ptr<Backend> backend = testing::cpu_backend(best_cpu_isa());
  std::unique_ptr<Transport> transport = make_local_transport();
  std::unique_ptr<RankCache> rank;

  explicit SingleRank(const Config& config) {
    auto created = RankCache::create(config, 0, *backend, *transport);
    EXPECT_TRUE(created.ok()) << created.status();
    rank = std::move(created).value();
  }
  std::vector<uint8_t> device_bytes() const {
    const PagedKvView& v = rank->device_pool();
    return std::vector<uint8_t>(v.block(0), v.block(0) + v.num_blocks * v.block_bytes);
  }
};

TEST(RankLayoutTest, ShardsSplitHeadsAndReplicateKvHeadsWhenTooFew) {
  const Config tp4 = serving_config(1, 4, 32, 8, 8, 0);
  const auto l = rank_layout(tp4, 3);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->shard, 3u);
  EXPECT_EQ(l->first_kv_head, 6u);
  EXPECT_EQ(l->num_kv_heads, 2u);
  EXPECT_EQ(l->first_q_head, 24u);
  EXPECT_EQ(l->num_q_heads, 8u);

  const Config gqa = serving_config(2, 4, 8, 2, 8, 0);  // Hkv 2 < tp 4: pairs of shards share one
  for (uint32_t r = 0; r < 8; ++r) {
    const auto s = rank_layout(gqa, r);
    ASSERT_TRUE(s.ok());
    EXPECT_EQ(s->replica, r / 4);
    EXPECT_EQ(s->num_kv_heads, 1u);
    EXPECT_EQ(s->first_kv_head, (r % 4) / 2);
    EXPECT_EQ(s->first_q_head, (r % 4) * 2);
    // Every local query head attends to a local KV head.
    EXPECT_EQ(s->first_q_head / (8 / 2), s->first_kv_head);
  }
  EXPECT_THAT(rank_layout(gqa, 8).status().message(), HasSubstr("outside the world of 8 ranks"));
}

TEST(RankCacheTest, CreateRefusesATransportOfAnotherWorld) {
  auto backend = testing::cpu_backend(CpuIsa::kGeneric);
  auto local = make_local_transport();
  const auto made = RankCache::create(serving_config(2, 1, 4, 2, 8, 0), 0, *backend, *local);
  ASSERT_FALSE(made.ok());
  EXPECT_THAT(made.status().message(), HasSubstr("2-rank topology runs on local rank 0 of 1"));
}

TEST(RankCacheTest, APlanOfTheWrongStepIsRefusedAndChangesNothing) {
  SingleRank r(serving_config(1, 1, 4, 2, 8, 4));
  StepPlan plan;
  plan.step = 3;
  plan.tables = {{SeqId{1}, 0, 5, 0, 0, {BlockId{2}}}};
  const Status s = r.rank->execute(plan);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidOperation);
  EXPECT_THAT(s.message(), HasSubstr("rank 0 (replica 0, shard 0) received the plan of step 3 but expects step 0"));
  EXPECT_TRUE(r.rank->tables().empty());
  EXPECT_EQ(r.rank->next_step(), 0u);
  plan.step = 0;
  EXPECT_TRUE(r.rank->execute(plan).ok());
  EXPECT_EQ(r.rank->next_step(), 1u);
  EXPECT_EQ(r.rank->tables().size(), 1u);
  EXPECT_EQ(r.rank->execute(plan).code(), ErrorCode::kInvalidOperation);  // a replay
}

// A table change continues the table the rank holds: one that skips blocks the rank never got
// (or continues a table the same plan releases) is refused before anything runs.
TEST(RankCacheTest, ATableChangeBeyondWhatTheRankHoldsIsRefused) {
  SingleRank r(serving_config(1, 1, 4, 2, 8, 4));
  StepPlan plan;
  plan.tables = {{SeqId{1}, 0, 20, 0, 0, {BlockId{2}, BlockId{5}}}};
  ASSERT_TRUE(r.rank->execute(plan).ok());
  plan.step = 1;
  plan.tables = {{SeqId{1}, 0, 40, 20, 3, {BlockId{6}}}};
  Status s = r.rank->execute(plan);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("the table of S1 continues from block 3 but this replica holds 2"));
  plan.tables = {{SeqId{1}, 0, 40, 20, 2, {BlockId{6}}}};
  plan.released = {SeqId{1}};
  EXPECT_THAT(r.rank->execute(plan).message(), HasSubstr("continues from block 2 but this replica holds 0"));
  EXPECT_EQ(r.rank->next_step(), 1u);
  plan.released.clear();
  plan.tables.push_back({SeqId{1}, 0, 40, 20, 3, {}});  // listed twice
  EXPECT_THAT(r.rank->execute(plan).message(), HasSubstr("the plan lists S1's table twice"));
  plan.tables.pop_back();
  ASSERT_TRUE(r.rank->execute(plan).ok());
  EXPECT_EQ(r.rank->tables().at(SeqId{1}).blocks,
            (std::vector<BlockId>{BlockId{2}, BlockId{5}, BlockId{6}}));
  EXPECT_EQ(r.rank->tables().at(SeqId{1}).num_tokens, 40u);
}

// A table the rank keeps must mean blocks of its pool holding its tokens: engines read slots off
// it. Hand-built plans naming anything else are refused and change nothing.
TEST(RankCacheTest, ATableThatCannotHoldItsTokensIsRefused) {
  SingleRank r(serving_config(1, 1, 4, 2, 8, 4));  // 8 blocks of 16 tokens
  StepPlan plan;
  plan.tables = {{SeqId{1}, 0, 20, 0, 0, {BlockId{2}, BlockId{5}}}};
  ASSERT_TRUE(r.rank->execute(plan).ok());
  const auto refused = [&](StepPlan::Table t, const std::string& message) {
    StepPlan bad;
    bad.step = 1;
    bad.tables = {std::move(t)};
    const Status s = r.rank->execute(bad);
    EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << message;
    EXPECT_THAT(s.message(), HasSubstr(message));
    EXPECT_EQ(r.rank->next_step(), 1u);
    EXPECT_EQ(r.rank->tables().size(), 1u);
    EXPECT_EQ(r.rank->tables().at(SeqId{1}).blocks, (std::vector<BlockId>{BlockId{2}, BlockId{5}}));
  };
  refused({SeqId{7}, 0, 16, 0, 0, {BlockId{999}}}, "S7's table names B999, outside this rank's pool of 8");
  refused({SeqId{7}, 0, 16, 0, 0, {kInvalidBlockId}}, "outside this rank's pool of 8 blocks");
  refused({SeqId{7}, 0, 10, 11, 0, {BlockId{1}}}, "S7's table has 11 computed of 10 tokens");
  refused({SeqId{7}, 0, 17, 0, 0, {BlockId{1}}}, "S7's table holds 17 tokens in 1 blocks of 16");
  refused({SeqId{7}, 0, 16, 0, 0, {}}, "holds 16 tokens in 0 blocks");
  refused({SeqId{7}, 0, 32, 0, 0, {BlockId{3}, BlockId{3}}}, "S7's table names B3 twice");
  refused({SeqId{1}, 0, 49, 20, 2, {BlockId{6}}}, "S1's table holds 49 tokens in 3 blocks of 16");
  refused({SeqId{1}, 0, 32, 20, 1, {BlockId{2}}}, "S1's table keeps B2 and lists it again");
  // A block another sequence holds too is sharing (a cached prefix), not an error.
  StepPlan fine;
  fine.step = 1;
  fine.tables = {{SeqId{9}, 0, 16, 16, 0, {BlockId{2}}}};
  ASSERT_TRUE(r.rank->execute(fine).ok());
  EXPECT_EQ(r.rank->tables().size(), 2u);
}

// What a plan must not say whatever the tables: a preempted sequence kept, an op other than a
// migration naming another replica (it would land in the wrong writer's wave), a compaction
// whose kept ranges overlap, or two compactions of one sequence (its scores renumbered twice).
TEST(RankCacheTest, PlansThatContradictThemselvesAreRefused) {
  SingleRank r(serving_config(1, 1, 4, 2, 8, 4));
  StepPlan first;
  first.tables = {{SeqId{1}, 0, 8, 8, 0, {BlockId{2}}}};
  ASSERT_TRUE(r.rank->execute(first).ok());
  const auto refused = [&](const StepPlan& plan, const std::string& message) {
    const Status s = r.rank->execute(plan);
    EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << message;
    EXPECT_THAT(s.message(), HasSubstr(message));
    EXPECT_EQ(r.rank->next_step(), 1u);
    EXPECT_EQ(r.rank->tables().at(SeqId{1}).blocks, std::vector<BlockId>{BlockId{2}});
  };
  StepPlan plan;
  plan.step = 1;
  plan.preempted = {SeqId{1}};
  refused(plan, "S1 is preempted but not released");
  plan.preempted.clear();
  Op swap = Op::swap_out(0, BlockId{3}, BlockId{0});
  swap.dst_replica = 1;
  plan.ops = {swap};
  refused(plan, "names a destination replica; only migrations do");
  plan.ops.clear();
  plan.tables = {{SeqId{1}, 0, 8, 8, 0, {BlockId{2}}}};
  plan.compactions = {{SeqId{1}, 0, 8, {{2, 2}, {3, 1}}}};
  refused(plan, "ranges must be disjoint");
  plan.compactions = {{SeqId{1}, 0, 8, {{0, 8}}}, {SeqId{1}, 0, 8, {{0, 8}}}};
  refused(plan, "the plan compacts S1 twice");
}

TEST(RankCacheTest, AnOpOutsideThePoolsIsRefusedBeforeAnythingRuns) {
  SingleRank r(serving_config(1, 1, 4, 2, 8, 4));
  const auto before = r.device_bytes();
  const std::vector<std::pair<Op, std::string>> bad = {
      {Op::swap_out(0, BlockId{8}, BlockId{0}), "outside the pools (8 device, 4 host blocks)"},
      {Op::swap_in(0, BlockId{4}, BlockId{0}), "outside the pools"},
      {Op::migrate(0, BlockId{1}, 0, BlockId{2}), "migration within replica 0"},
      {Op::swap_out(1, BlockId{1}, BlockId{1}), "replica 1 of 1"},
      {Op::token_copy(0, TokenCopy{BlockId{1}, 10, BlockId{2}, 0, 7, CopyReason::kCompaction}),
       "does not fit the pool (8 blocks of 16 tokens)"},
  };
  for (const auto& [op, message] : bad) {
    StepPlan plan;
    // A valid op first: it must not run either.
    plan.ops = {Op::token_copy(0, TokenCopy{BlockId{0}, 0, BlockId{1}, 0, 16, CopyReason::kCopyOnWrite}), op};
    const Status s = r.rank->execute(plan);
    EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << message;
    EXPECT_THAT(s.message(), HasSubstr("op 1: "));
    EXPECT_THAT(s.message(), HasSubstr(message));
  }
  EXPECT_EQ(r.device_bytes(), before);
  EXPECT_EQ(r.rank->next_step(), 0u);
}

TEST(RankCacheTest, OpsReusingABlockRunInPlanOrder) {
  // Block 1 is swapped out, then refilled from block 2 by a copy, then block 1 is swapped back
  // into block 3: with waves, block 3 receives block 1's old content, block 1 holds block 2's.
  SingleRank r(serving_config(1, 1, 4, 2, 8, 4));
  const PagedKvView& pool = r.rank->device_pool();
  for (uint32_t b = 0; b < 8; ++b) std::memset(pool.block(b), static_cast<int>(b + 1), pool.block_bytes);
  StepPlan plan;
  plan.ops = {Op::swap_out(0, BlockId{1}, BlockId{0}),
              Op::token_copy(0, TokenCopy{BlockId{2}, 0, BlockId{1}, 0, 16, CopyReason::kCopyOnWrite}),
              Op::swap_in(0, BlockId{0}, BlockId{3})};
  ASSERT_TRUE(r.rank->execute(plan).ok());
  auto filled = [&](uint32_t b, uint8_t v) {
    const uint8_t* p = pool.block(b);
    // Copies move token slots: compare the K/V bytes of the first layer's first token.
    return p[0] == v && p[pool.block_bytes / 2] == v;
  };
  EXPECT_TRUE(filled(3, 2));
  EXPECT_TRUE(filled(1, 3));
  EXPECT_TRUE(filled(2, 3));
}

// A backend that queues block moves and copies until synchronize(), as the CUDA backend queues
// them on its stream: an executor that hands the transport blocks before queued work landed
// sends or overwrites the wrong bytes here, as it would on a GPU.
class QueuingBackend final : public Backend {
 public:
  explicit QueuingBackend(Backend& inner) : inner_(&inner) {}

  [[nodiscard]] size_t queued() const { return queue_.size(); }
  [[nodiscard]] const std::vector<std::string>& log() const { return log_; }
  std::vector<std::string>& log() { return log_; }

  std::string_view name() const override { return "queuing"; }
  Result<KvArena> allocate_arena(uint64_t bytes, Tier tier) override {
    return inner_->allocate_arena(bytes, tier);
  }
  Status swap_blocks(const PagedKvView& src, const PagedKvView& dst,
                     std::span<const BlockMove> moves) override {
    log_.push_back("swap_blocks");
    queue_.push_back([this, src, dst, moves = std::vector<BlockMove>(moves.begin(), moves.end())] {
      return inner_->swap_blocks(src, dst, moves);
    });
    return ok_status();
  }
  Status compact_tokens(std::span<const GroupTokenCopies> batch) override {
    log_.push_back("compact_tokens");
    struct Owned {
      PagedKvView pool, source;
      std::vector<TokenCopy> copies;
    };
    std::vector<Owned> owned;
    for (const auto& g : batch) owned.push_back({g.pool, g.source, {g.copies.begin(), g.copies.end()}});
    queue_.push_back([this, owned = std::move(owned)] {
      std::vector<GroupTokenCopies> groups;
      for (const Owned& o : owned) groups.push_back({o.pool, o.copies, o.source});
      return inner_->compact_tokens(groups);
    });
    return ok_status();
  }
  Status synchronize() override {
    log_.push_back("synchronize");
    return flush();
  }
  // Everything else runs in queue order, after what is queued.
  Status append_kv(const PagedKvView& pool, const AppendKvArgs& args) override {
    KVF_RETURN_IF_ERROR(flush());
    return inner_->append_kv(pool, args);
  }
  Status gather_kv(const PagedKvView& pool, const GatherKvArgs& args) override {
    KVF_RETURN_IF_ERROR(flush());
    return inner_->gather_kv(pool, args);
  }
  Status copy_blocks(std::span<const GroupBlockCopies> batch) override {
    KVF_RETURN_IF_ERROR(flush());
    return inner_->copy_blocks(batch);
  }
  Status paged_decode_attention(const PagedKvView& pool, const DecodeAttentionArgs& args) override {
    KVF_RETURN_IF_ERROR(flush());
    return inner_->paged_decode_attention(pool, args);
  }
  Status paged_prefill_attention(const PagedKvView& pool, const PrefillAttentionArgs& args) override {
    KVF_RETURN_IF_ERROR(flush());
    return inner_->paged_prefill_attention(pool, args);
  }
  Status upload(void* dst, const void* src_host, uint64_t bytes) override {
    KVF_RETURN_IF_ERROR(flush());
    return inner_->upload(dst, src_host, bytes);
  }
  Status download(void* dst_host, const void* src, uint64_t bytes) override {
    KVF_RETURN_IF_ERROR(flush());
    return inner_->download(dst_host, src, bytes);
  }
  Status copy_bytes(void* dst, const void* src, uint64_t bytes) override {
    KVF_RETURN_IF_ERROR(flush());
    return inner_->copy_bytes(dst, src, bytes);
  }

 private:
  Status flush() {
    std::vector<std::function<Status()>> queue;
    queue.swap(queue_);
    for (auto& op : queue) KVF_RETURN_IF_ERROR(op());
    return ok_status();
  }

  Backend* inner_;
  std::vector<std::function<Status()>> queue_;
  std::vector<std::string> log_;
};

// Rank 0 of a two-rank world whose peer is simulated: exchange_blocks keeps what is sent and
// fills every received block with the peer's byte, and logs how much backend work was queued.
class SimulatedPeerTransport final : public Transport {
 public:
  SimulatedPeerTransport(QueuingBackend& backend, uint8_t peer_byte)
      : backend_(&backend), peer_byte_(peer_byte) {}

  std::vector<std::vector<uint8_t>> sent;

  std::string_view name() const override { return "simulated-peer"; }
  RankId rank() const override { return RankId{0}; }
  int world_size() const override { return 2; }
  Status exchange_blocks(std::span<const BlockBatch> sends,
                         std::span<const BlockBatch> recvs) override {
    backend_->log().push_back("exchange with " + std::to_string(backend_->queued()) + " queued");
    for (const BlockBatch& b : sends)
      for (uint8_t* block : b.blocks) sent.emplace_back(block, block + b.block_bytes);
    for (const BlockBatch& b : recvs)
      for (uint8_t* block : b.blocks) std::memset(block, peer_byte_, b.block_bytes);
    return ok_status();
  }
  Status broadcast(std::vector<uint8_t>&, RankId) override { return ok_status(); }
  Status barrier() override { return ok_status(); }
  Status all_gather(uint64_t value, std::vector<uint64_t>& out) override {
    out = {value, value};
    return ok_status();
  }
  Status gather(std::span<const uint8_t> bytes, RankId, std::vector<std::vector<uint8_t>>& out) override {
    out.assign(2, std::vector<uint8_t>(bytes.begin(), bytes.end()));
    return ok_status();
  }
  void set_timeout(std::optional<std::chrono::milliseconds>) override {}

 private:
  QueuingBackend* backend_;
  uint8_t peer_byte_;
};

// Rank 0 (replica 0) of dp 2, on a queuing backend, every device block b filled with b + 1 and
// every host block h with 0x40 + h.
struct QueuedRank {
  std::unique_ptr<Backend> cpu = testing::cpu_backend(best_cpu_isa());
  QueuingBackend backend{*cpu};
  SimulatedPeerTransport transport{backend, 0xA5};
  std::unique_ptr<RankCache> rank;

  QueuedRank() {
    auto created = RankCache::create(serving_config(2, 1, 4, 2, 12, 4), 0, backend, transport);
    EXPECT_TRUE(created.ok()) << created.status();
    rank = std::move(created).value();
    const PagedKvView& device = rank->device_pool();
    const PagedKvView& host = rank->host_pool();
    for (uint32_t b = 0; b < device.num_blocks; ++b)
      std::memset(device.block(b), static_cast<int>(b + 1), device.block_bytes);
    for (uint32_t h = 0; h < host.num_blocks; ++h)
      std::memset(host.block(h), 0x40 + static_cast<int>(h), host.block_bytes);
  }
  static bool filled(const PagedKvView& pool, uint32_t block, uint8_t value) {
    const uint8_t* p = pool.block(block);
    return std::all_of(p, p + pool.block_bytes, [value](uint8_t v) { return v == value; });
  }
  static std::vector<uint8_t> block_of(uint8_t value, uint64_t bytes) {
    return std::vector<uint8_t>(bytes, value);
  }
};

TEST(RankCacheOverlapTest, AWavesSwapsAndCopiesAreQueuedBeforeItsTransfer) {
  QueuedRank r;
  StepPlan plan;
  plan.ops = {Op::swap_out(0, BlockId{1}, BlockId{0}),
              Op::migrate(0, BlockId{2}, 1, BlockId{5}),   // sent
              Op::migrate(1, BlockId{3}, 0, BlockId{4}),   // received into block 4
              Op::swap_in(0, BlockId{1}, BlockId{6}),
              Op::token_copy(0, TokenCopy{BlockId{7}, 0, BlockId{8}, 0, 16, CopyReason::kCopyOnWrite})};
  ASSERT_EQ(plan_waves(plan.ops), (std::vector<uint32_t>{0, 0, 0, 0, 0}));
  ASSERT_TRUE(r.rank->execute(plan).ok());
  // One wave: its three backend calls are still queued when the transfer starts.
  EXPECT_THAT(r.backend.log(), ::testing::ElementsAre("swap_blocks", "swap_blocks", "compact_tokens",
                                                       "exchange with 3 queued", "synchronize"));
  EXPECT_EQ(r.rank->stats().overlapped_waves, 1u);
  const PagedKvView& device = r.rank->device_pool();
  const PagedKvView& host = r.rank->host_pool();
  ASSERT_EQ(r.transport.sent.size(), 1u);
  EXPECT_EQ(r.transport.sent[0], QueuedRank::block_of(3, device.block_bytes));
  EXPECT_TRUE(QueuedRank::filled(device, 4, 0xA5));
  EXPECT_TRUE(QueuedRank::filled(host, 0, 2));
  EXPECT_TRUE(QueuedRank::filled(device, 6, 0x41));
  EXPECT_TRUE(QueuedRank::filled(device, 8, 8));
}

TEST(RankCacheOverlapTest, ATransferWaitsForWhatEarlierWavesQueued) {
  QueuedRank r;
  StepPlan plan;
  // Wave 0 writes block 3 (swap-in) and reads block 2 (swap-out); wave 1 sends block 3 and
  // receives into block 2: both need wave 0 to have landed.
  plan.ops = {Op::swap_in(0, BlockId{0}, BlockId{3}), Op::swap_out(0, BlockId{2}, BlockId{1}),
              Op::migrate(0, BlockId{3}, 1, BlockId{5}), Op::migrate(1, BlockId{9}, 0, BlockId{2})};
  ASSERT_EQ(plan_waves(plan.ops), (std::vector<uint32_t>{0, 0, 1, 1}));
  ASSERT_TRUE(r.rank->execute(plan).ok());
  EXPECT_THAT(r.backend.log(), ::testing::ElementsAre("swap_blocks", "swap_blocks", "synchronize",
                                                       "exchange with 0 queued", "synchronize"));
  EXPECT_EQ(r.rank->stats().overlapped_waves, 0u);
  const PagedKvView& device = r.rank->device_pool();
  ASSERT_EQ(r.transport.sent.size(), 1u);
  EXPECT_EQ(r.transport.sent[0], QueuedRank::block_of(0x40, device.block_bytes));
  EXPECT_TRUE(QueuedRank::filled(r.rank->host_pool(), 1, 3));
  EXPECT_TRUE(QueuedRank::filled(device, 2, 0xA5));
}

TEST(RankCacheOverlapTest, AWaveWithoutTransfersDoesNotWait) {
  QueuedRank r;
  StepPlan plan;
  plan.ops = {Op::swap_out(0, BlockId{1}, BlockId{0}),
              Op::token_copy(0, TokenCopy{BlockId{2}, 0, BlockId{1}, 0, 16, CopyReason::kCopyOnWrite})};
  ASSERT_EQ(plan_waves(plan.ops), (std::vector<uint32_t>{0, 1}));
  ASSERT_TRUE(r.rank->execute(plan).ok());
  // Two waves on one queue: the backend orders them; the executor waits once, at the end.
  EXPECT_THAT(r.backend.log(),
              ::testing::ElementsAre("swap_blocks", "compact_tokens", "synchronize"));
  EXPECT_TRUE(QueuedRank::filled(r.rank->host_pool(), 0, 2));
  EXPECT_TRUE(QueuedRank::filled(r.rank->device_pool(), 1, 3));
}

// One process, one replica: the coordinator's plans run on a rank, the engine model computes
// every slot the tables hold and checks every sequence's K/V after each step.
struct ServedRank {
  Config config;
  SingleRank rank{config};
  Coordinator coordinator = std::move(Coordinator::create(config)).value();
  testing::EngineModel engine{config};

  explicit ServedRank(const Config& c) : config(c) {}

  Result<Placement> admit(SeqId seq, const std::vector<TokenId>& prompt) {
    auto placed = coordinator.admit(seq, prompt);
    if (placed.ok()) engine.admitted(seq, prompt, *placed);
    return placed;
  }
  void free(SeqId seq) {
    ASSERT_TRUE(coordinator.free(seq).ok());
    engine.freed(seq);
  }
  void fork(SeqId src, SeqId dst) {
    ASSERT_TRUE(coordinator.fork(src, dst).ok());
    engine.forked(src, dst);
  }
  ::testing::AssertionResult step() {
    auto plan = coordinator.step();
    if (!plan.ok()) return ::testing::AssertionFailure() << plan.status();
    std::vector<uint8_t> bytes = plan->serialize();
    if (const Status s = rank.rank->receive_and_execute(bytes, RankId{0}); !s.ok()) {
      return ::testing::AssertionFailure() << s;
    }
    engine.planned(*plan);
    if (const Status s = engine.forward(*rank.rank); !s.ok()) return ::testing::AssertionFailure() << s;
    return engine.verify(*rank.rank);
  }
};

// A prompt is shared from the step after the plan that computes it, and the K/V served is what
// that forward pass wrote; a request in the same step computes its own copy.
TEST(RankCacheTest, APromptIsSharedFromTheNextStepWithTheKvItsForwardPassWrote) {
  ServedRank s(serving_config(1, 1, 4, 2, 32, 0));
  const auto a = testing::token_run(64, 100);
  auto longer = a;
  longer.push_back(7);
  ASSERT_TRUE(s.admit(SeqId{1}, a).ok());
  const auto same_step = s.admit(SeqId{2}, longer);
  ASSERT_TRUE(same_step.ok());
  EXPECT_EQ(same_step->cached_tokens, 0u);
  ASSERT_TRUE(s.step());
  const auto next_step = s.admit(SeqId{3}, longer);
  ASSERT_TRUE(next_step.ok());
  EXPECT_EQ(next_step->cached_tokens, 64u);
  ASSERT_TRUE(s.step());  // the engine gathers sequence 3 and checks every token's K/V
  EXPECT_TRUE(s.coordinator.verify_integrity().ok());
}

// Regression: a sequence id freed and admitted again before the step() that indexes it was indexed
// with its first prompt, so a later request for that prompt was served the blocks holding the
// second prompt's K/V. The same happened to an id re-used by a fork.
TEST(RankCacheTest, AReusedSequenceIdNeverServesAnotherPromptsKv) {
  ServedRank s(serving_config(1, 1, 4, 2, 32, 0));
  const auto a = testing::token_run(64, 100), b = testing::token_run(64, 5000);
  ASSERT_TRUE(s.admit(SeqId{5}, a).ok());
  s.free(SeqId{5});
  ASSERT_TRUE(s.admit(SeqId{5}, b).ok());
  ASSERT_TRUE(s.step());
  ASSERT_TRUE(s.step());
  const auto again = s.admit(SeqId{6}, a);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->cached_tokens, 0u);  // A was freed before it was ever indexed
  ASSERT_TRUE(s.step());
  const auto shares_b = s.admit(SeqId{7}, b);
  ASSERT_TRUE(shares_b.ok());
  EXPECT_EQ(shares_b->cached_tokens, 64u);  // B was indexed, under its own prompt
  ASSERT_TRUE(s.step());

  // A fork onto a freed id: the fork holds C's blocks, never D's prompt.
  const auto c = testing::token_run(48, 9000), d = testing::token_run(48, 12000);
  ASSERT_TRUE(s.admit(SeqId{8}, d).ok());
  s.free(SeqId{8});
  ASSERT_TRUE(s.admit(SeqId{9}, c).ok());
  s.fork(SeqId{9}, SeqId{8});
  ASSERT_TRUE(s.step());
  ASSERT_TRUE(s.step());
  const auto wants_d = s.admit(SeqId{10}, d);
  ASSERT_TRUE(wants_d.ok());
  EXPECT_EQ(wants_d->cached_tokens, 0u);
  ASSERT_TRUE(s.step());
  EXPECT_TRUE(s.coordinator.verify_integrity().ok());
}

// The whole stack in one process: coordinator plans, the rank executes them, the engine model
// writes K/V, and every sequence's K/V is checked after every step.
void run_kv_exact_workload(uint64_t seed, bool reuse_ids, testing::WorkloadCounts& counts) {
  const Config config = serving_config(1, 1, 4, 2, 32, 12);
  SingleRank r(config);
  auto coordinator = Coordinator::create(config);
  ASSERT_TRUE(coordinator.ok());
  testing::EngineModel engine(config);
  SCOPED_TRACE(testing::property_trace());
  testing::ServingWorkload workload(testing::property_seed(seed), 1, reuse_ids);
  uint64_t copies = 0, swaps = 0;
  for (uint64_t step = 0; step < testing::property_count(150); ++step) {
    ASSERT_TRUE(workload.issue(*coordinator, engine).ok());
    auto plan = coordinator->step();
    ASSERT_TRUE(plan.ok());
    copies += plan->count(StepPlan::OpKind::kCopy);
    swaps += plan->count(StepPlan::OpKind::kSwapIn);
    std::vector<uint8_t> bytes = plan->serialize();
    ASSERT_TRUE(r.rank->receive_and_execute(bytes, RankId{0}).ok());
    workload.planned(*plan, engine);
    ASSERT_TRUE(engine.forward(*r.rank).ok());
    ASSERT_TRUE(engine.verify(*r.rank)) << "step " << step;
  }
  ASSERT_TRUE(workload.drain(*coordinator, engine).ok());
  std::vector<uint8_t> last = coordinator->step()->serialize();
  ASSERT_TRUE(r.rank->receive_and_execute(last, RankId{0}).ok());
  EXPECT_TRUE(r.rank->tables().empty());
  EXPECT_GT(copies, 0u);
  EXPECT_GT(swaps, 0u);
  EXPECT_GT(coordinator->stats().local_hit_tokens, 0u);
  EXPECT_GT(coordinator->stats().preempted, 0u);
  counts = workload.counts();
}

TEST(RankCacheTest, AServingWorkloadKeepsEverySequencesKvExact) {
  testing::WorkloadCounts counts;
  run_kv_exact_workload(3, false, counts);
}

// The same with a scheduler that cancels requests as they arrive and re-uses their ids at once.
TEST(RankCacheTest, ReusedIdsKeepEverySequencesKvExact) {
  testing::WorkloadCounts counts;
  run_kv_exact_workload(3, true, counts);
  EXPECT_GT(counts.reused_ids, 5u);
}

// The one-rank serving workload that gpu_runtime_test runs on a GPU, here on the CPU backend:
// on the local transport with host tensors, and through the host-staged transport with the
// forward pass's tensors in the backend's own buffers (the path a CUDA rank takes).
TEST(RankCacheWorkload, OneRankServesOnTheLocalTransport) {
  auto backend = testing::cpu_backend(best_cpu_isa());
  auto local = make_local_transport();
  testing::run_one_rank_workload(*backend, *local, /*device_buffers=*/false);
}

TEST(RankCacheWorkload, OneRankServesThroughTheStagedTransportWithBackendBuffers) {
  auto backend = testing::cpu_backend(best_cpu_isa());
  auto local = make_local_transport();
  auto staged = make_host_staged_transport(*local, *backend);
  ASSERT_TRUE(staged.ok()) << staged.status();
  testing::run_one_rank_workload(*backend, **staged, /*device_buffers=*/true);
}

}  // namespace
}  // namespace kvfabric
