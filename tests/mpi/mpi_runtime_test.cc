// mpi label, run under mpirun with 4 ranks: RankCache on every layout of 4 ranks (dp 2 x tp 2,
// dp 1 x tp 4, dp 4 x tp 1, and GQA shapes with fewer KV heads than shards) executing step plans
// over the MPI transport. Moved blocks arrive bit-exact (checksums on both sides), TP-sharded
// decode attention gathered equals one rank's result, a scripted serving workload keeps every
// sequence's K/V exact with identical tables on every shard and no leaked block, and a plan of
// the wrong step is refused by every rank with an error naming the ranks and steps; token
// compression keeps the same tokens on every shard of a replica. Blocks sent
// through the host-staged transport arrive bit-exact.
//
// Every rank runs the same tests and the same collectives in the same order; checks use EXPECT_*
// so that a failure on one rank never leaves the others waiting.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvfabric/coordinator/coordinator.h"
#include "kvfabric/runtime/rank_cache.h"
#include "kvfabric/runtime/staged_transport.h"
#include "mpi/mpi_env.h"
#include "testing/backend_fixture.h"
#include "testing/block_pattern.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using Op = StepPlan::Op;
using ::testing::HasSubstr;

struct Layout {
  const char* name;
  uint32_t dp, tp, q_heads, kv_heads;
};

void PrintTo(const Layout& l, std::ostream* os) { *os << l.name; }

const Layout kLayouts[] = {
    {"dp2_tp2", 2, 2, 8, 4},
    {"dp1_tp4", 1, 4, 16, 4},
    {"dp4_tp1", 4, 1, 4, 2},
    {"gqa_kv2_dp1_tp4", 1, 4, 8, 2},  // Llama-style GQA: each KV head on 2 shards
    {"gqa_kv1_dp2_tp2", 2, 2, 4, 1},  // one KV head, replicated on both shards
};

// One rank's cache on the MPI transport.
struct Rank {
  std::unique_ptr<Backend> backend = testing::cpu_backend(best_cpu_isa());
  std::unique_ptr<RankCache> cache;

  explicit Rank(const Config& config) {
    Transport& t = testing::mpi_transport();
    auto made = RankCache::create(config, static_cast<uint32_t>(t.rank().value), *backend, t);
    EXPECT_TRUE(made.ok()) << made.status();
    if (made.ok()) cache = std::move(made).value();
  }
  const RankLayout& layout() const { return cache->layout(); }
};

bool is_root() { return testing::mpi_transport().rank().value == 0; }

// Rank 0 broadcasts `plan`; every rank executes it.
Status broadcast_and_execute(RankCache& cache, const StepPlan& plan) {
  std::vector<uint8_t> bytes;
  if (is_root()) bytes = plan.serialize();
  return cache.receive_and_execute(bytes, RankId{0});
}

std::vector<uint64_t> all_gather(uint64_t value) {
  std::vector<uint64_t> all;
  const Status s = testing::mpi_transport().all_gather(value, all);
  EXPECT_TRUE(s.ok()) << s;
  return all;
}

uint64_t fold(uint64_t digest, uint64_t block_checksum) {
  return testing::splitmix64(digest ^ block_checksum);
}

class RuntimeLayoutTest : public ::testing::TestWithParam<Layout> {
 protected:
  void SetUp() override {
    if (testing::mpi_transport().world_size() != 4) GTEST_SKIP() << "needs 4 ranks";
  }
  Config config(uint64_t device_blocks, uint64_t host_blocks) const {
    const Layout& l = GetParam();
    return testing::serving_config(l.dp, l.tp, l.q_heads, l.kv_heads, device_blocks, host_blocks);
  }
};

// Every block a plan moves (migration to the next replica, swap-out, swap-in, a fork's full-block
// copy) is checksummed where it leaves and where it lands; the checksums agree, across ranks for
// migrations, and the blocks no op touches keep their bytes.
TEST_P(RuntimeLayoutTest, MovedBlocksArriveBitExact) {
  Rank r(config(16, 8));
  ASSERT_NE(r.cache, nullptr);
  const RankLayout& l = r.layout();
  const PagedKvView& device = r.cache->device_pool();
  const PagedKvView& host = r.cache->host_pool();
  // Different bytes on every rank, tier and block.
  for (uint32_t b = 0; b < device.num_blocks; ++b) {
    testing::fill_pattern(device.block(b), device.block_bytes, testing::block_seed(l.rank, 0, 0, b, 1));
  }
  for (uint32_t b = 0; b < host.num_blocks; ++b) {
    testing::fill_pattern(host.block(b), host.block_bytes, testing::block_seed(l.rank, 1, 0, b, 2));
  }
  auto device_sum = [&](uint32_t b) { return testing::checksum(device.block(b), device.block_bytes); };
  auto host_sum = [&](uint32_t b) { return testing::checksum(host.block(b), host.block_bytes); };

  const std::vector<std::pair<uint32_t, uint32_t>> swap_out = {{0, 0}, {1, 1}, {2, 2}};
  const std::vector<std::pair<uint32_t, uint32_t>> swap_in = {{5, 10}, {6, 11}};
  const std::vector<std::pair<uint32_t, uint32_t>> migrations = {{4, 13}, {5, 14}, {6, 15}, {7, 8}};
  const uint32_t fork_src = 3, fork_dst = 12, untouched = 9;
  StepPlan plan;
  for (uint32_t rep = 0; rep < l.dp; ++rep) {
    for (auto [d, h] : swap_out) plan.ops.push_back(Op::swap_out(rep, BlockId{d}, BlockId{h}));
    for (auto [h, d] : swap_in) plan.ops.push_back(Op::swap_in(rep, BlockId{h}, BlockId{d}));
    plan.ops.push_back(Op::token_copy(
        rep, TokenCopy{BlockId{fork_src}, 0, BlockId{fork_dst}, 0, 16, CopyReason::kCopyOnWrite}));
    if (l.dp > 1) {
      for (auto [s, d] : migrations) {
        plan.ops.push_back(Op::migrate(rep, BlockId{s}, (rep + 1) % l.dp, BlockId{d}));
      }
    }
  }
  uint64_t out_before = 0, in_before = 0, sent = 0;
  for (auto [d, h] : swap_out) out_before = fold(out_before, device_sum(d));
  for (auto [h, d] : swap_in) in_before = fold(in_before, host_sum(h));
  for (auto [s, d] : migrations) sent = fold(sent, device_sum(s));
  const uint64_t fork_before = device_sum(fork_src), untouched_before = device_sum(untouched);

  const Status executed = broadcast_and_execute(*r.cache, plan);
  ASSERT_TRUE(executed.ok()) << executed;

  uint64_t out_after = 0, in_after = 0, received = 0;
  for (auto [d, h] : swap_out) out_after = fold(out_after, host_sum(h));
  for (auto [h, d] : swap_in) in_after = fold(in_after, device_sum(d));
  for (auto [s, d] : migrations) received = fold(received, device_sum(d));
  EXPECT_EQ(out_after, out_before) << "swap-out";
  EXPECT_EQ(in_after, in_before) << "swap-in";
  EXPECT_EQ(device_sum(fork_dst), fork_before) << "fork copy";
  EXPECT_EQ(device_sum(untouched), untouched_before);

  // Shard s of replica p received what shard s of replica p - 1 sent.
  const std::vector<uint64_t> all_sent = all_gather(sent);
  const std::vector<uint64_t> all_received = all_gather(received);
  if (l.dp > 1) {
    const uint32_t from = l.rank_of((l.replica + l.dp - 1) % l.dp, l.shard);
    EXPECT_EQ(all_received[l.rank], all_sent[from]) << "rank " << l.rank << " from rank " << from;
    EXPECT_NE(all_sent[l.rank], all_sent[from]);  // the check can tell ranks apart
    EXPECT_EQ(r.cache->stats().migrated_blocks_received, migrations.size());
    EXPECT_EQ(r.cache->stats().migrated_blocks_sent, migrations.size());
  }
  EXPECT_EQ(r.cache->stats().swapped_out_blocks, swap_out.size());
  EXPECT_EQ(r.cache->stats().swapped_in_blocks, swap_in.size());
}

// The same sequences on every replica; each shard computes decode attention for its query heads,
// rank 0 gathers the heads and compares them with one unsharded rank over the same K/V.
TEST_P(RuntimeLayoutTest, ShardedDecodeAttentionEqualsOneRank) {
  const Config sharded = config(40, 0);
  Rank r(sharded);
  ASSERT_NE(r.cache, nullptr);
  const RankLayout& l = r.layout();
  const uint32_t hd = sharded.model.head_dim, hq = sharded.model.num_query_heads;
  const std::vector<uint32_t> lengths = {37, 16, 70, 1};  // ragged, partial last blocks
  const uint32_t max_blocks = 5;

  // Tables over shuffled blocks, the same on every replica; prompts of random tokens.
  std::mt19937 rng(7);
  const std::vector<uint32_t> pool = testing::shuffled_blocks(20, 40, rng);
  std::vector<std::vector<TokenId>> prompts;
  std::vector<uint32_t> tables(lengths.size() * max_blocks, kInvalidBlockId.value);
  // A sequence lives on one replica: replica p holds copies of the sequences under other ids.
  auto seq_id = [](size_t s, uint32_t replica) { return SeqId{s + 1 + 100 * replica}; };
  auto plan_for = [&](uint32_t replicas) {
    StepPlan plan;
    size_t next = 0;
    for (size_t s = 0; s < lengths.size(); ++s) {
      std::vector<BlockId> blocks;
      for (uint32_t i = 0; i < (lengths[s] + 15) / 16; ++i) {
        tables[s * max_blocks + i] = pool[next];
        blocks.push_back(BlockId{pool[next++]});
      }
      for (uint32_t rep = 0; rep < replicas; ++rep) {
        plan.tables.push_back({seq_id(s, rep), rep, lengths[s], 0, 0, blocks});
      }
    }
    return plan;
  };
  for (uint32_t len : lengths) {
    std::vector<TokenId> p(len);
    for (auto& t : p) t = static_cast<TokenId>(rng() % 32000);
    prompts.push_back(std::move(p));
  }
  // Writes every sequence's K/V on `cache` as the engine does after a prefill.
  auto prefill = [&](RankCache& cache, const Config& config, const StepPlan& plan) {
    testing::EngineModel engine(config);
    for (const StepPlan::Table& t : plan.tables) {
      engine.admitted(t.seq, prompts[(t.seq.value - 1) % 100], Placement{});
    }
    engine.planned(plan);
    const Status written = engine.forward(cache);
    EXPECT_TRUE(written.ok()) << written;
    EXPECT_TRUE(engine.verify(cache));
  };
  // Queries of every head, [seq, head, dim].
  std::vector<float> query(lengths.size() * hq * hd);
  for (size_t i = 0; i < query.size(); ++i) {
    query[i] = static_cast<float>(static_cast<int>(testing::splitmix64(i) % 257) - 128) / 128.0f;
  }
  auto decode = [&](RankCache& cache, uint32_t first_head, uint32_t heads) {
    std::vector<float> q(lengths.size() * heads * hd), out(q.size());
    for (size_t s = 0; s < lengths.size(); ++s) {
      std::copy_n(&query[(s * hq + first_head) * hd], heads * hd, &q[s * heads * hd]);
    }
    DecodeAttentionArgs args;
    args.query = q.data();
    args.output = out.data();
    args.num_seqs = static_cast<uint32_t>(lengths.size());
    args.num_q_heads = heads;
    args.block_tables = tables.data();
    args.max_blocks_per_seq = max_blocks;
    args.context_lens = lengths.data();
    args.softmax_scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const Status s = cache.decode_attention(1, args);
    EXPECT_TRUE(s.ok()) << s;
    return out;
  };

  const StepPlan plan = plan_for(l.dp);
  const Status executed = broadcast_and_execute(*r.cache, plan);
  ASSERT_TRUE(executed.ok()) << executed;
  prefill(*r.cache, sharded, plan);
  std::vector<float> mine = decode(*r.cache, l.first_q_head, l.num_q_heads);

  // Every rank sends its output to rank 0 in one batch.
  Transport& t = testing::mpi_transport();
  const int world = t.world_size();
  const uint64_t bytes = mine.size() * sizeof(float);
  std::vector<std::vector<float>> gathered(world, std::vector<float>(mine.size()));
  std::vector<uint8_t*> send_block = {reinterpret_cast<uint8_t*>(mine.data())};
  std::vector<std::vector<uint8_t*>> recv_blocks(world);
  std::vector<BlockBatch> sends, recvs;
  if (is_root()) {
    gathered[0] = mine;
    for (int peer = 1; peer < world; ++peer) {
      recv_blocks[peer] = {reinterpret_cast<uint8_t*>(gathered[peer].data())};
      recvs.push_back(BlockBatch{RankId{peer}, recv_blocks[peer], bytes});
    }
  } else {
    sends.push_back(BlockBatch{RankId{0}, send_block, bytes});
  }
  const Status exchanged = t.exchange_blocks(sends, recvs);
  ASSERT_TRUE(exchanged.ok()) << exchanged;
  if (!is_root()) return;

  // One rank holding every head of the model.
  Config whole = sharded;
  whole.topology.dp = 1;
  whole.topology.tp = 1;
  auto local = make_local_transport();
  auto backend = testing::cpu_backend(best_cpu_isa());
  auto single = RankCache::create(whole, 0, *backend, *local);
  ASSERT_TRUE(single.ok()) << single.status();
  const StepPlan one_replica = plan_for(1);
  ASSERT_TRUE((*single)->execute(one_replica).ok());
  prefill(**single, whole, one_replica);
  const std::vector<float> reference = decode(**single, 0, hq);

  for (int rank = 0; rank < world; ++rank) {
    const auto rl = rank_layout(sharded, static_cast<uint32_t>(rank));
    ASSERT_TRUE(rl.ok());
    for (size_t s = 0; s < lengths.size(); ++s) {
      for (uint32_t h = 0; h < rl->num_q_heads; ++h) {
        for (uint32_t d = 0; d < hd; ++d) {
          const float got = gathered[rank][(s * rl->num_q_heads + h) * hd + d];
          const float want = reference[(s * hq + rl->first_q_head + h) * hd + d];
          // The same kernel over the same bytes: equal up to summation order (4 ulp).
          ASSERT_FLOAT_EQ(got, want) << "rank " << rank << " seq " << s << " head "
                                     << rl->first_q_head + h << " dim " << d;
        }
      }
    }
  }
}

// A scripted serving load (shared system prompts, beam-search forks across replicas, long and
// short requests, frees, memory pressure): every rank runs its own coordinator on the same calls
// and gets the plan rank 0 broadcasts; after every step each sequence's K/V gathered on every
// shard is exactly its tokens' K/V, and the shards of a replica hold identical tables. At the
// end nothing is left: no table, no sequence block, no host block.
TEST_P(RuntimeLayoutTest, ServingWorkloadKeepsShardsIdenticalAndLeaksNothing) {
  // Two replicas get more room each, so that forks onto the other one find some.
  const Config c = config(GetParam().dp == 2 ? 64 : 40, 12);
  Rank r(c);
  ASSERT_NE(r.cache, nullptr);
  const RankLayout& l = r.layout();
  auto coordinator = Coordinator::create(c);
  ASSERT_TRUE(coordinator.ok()) << coordinator.status();
  testing::EngineModel engine(c);
  testing::ServingWorkload workload(11, l.dp);
  bool data_ok = true, plans_agree = true, digests_agree = true;
  uint64_t copies = 0, swap_ins = 0, migrations = 0;
  auto run_step = [&](int step) {
    const auto plan = coordinator->step();
    ASSERT_TRUE(plan.ok()) << plan.status();
    copies += plan->count(StepPlan::OpKind::kCopy);
    swap_ins += plan->count(StepPlan::OpKind::kSwapIn);
    migrations += plan->count(StepPlan::OpKind::kMigrate);
    const std::vector<uint8_t> mine = plan->serialize();
    std::vector<uint8_t> bytes;
    if (is_root()) bytes = mine;
    const Status executed = r.cache->receive_and_execute(bytes, RankId{0});
    ASSERT_TRUE(executed.ok()) << "step " << step << ": " << executed;
    // This rank's coordinator made the very plan rank 0 broadcast.
    if (bytes != mine && plans_agree) {
      ADD_FAILURE() << "step " << step << ": rank " << l.rank << " planned other bytes";
      plans_agree = false;
    }
    workload.planned(*plan, engine);
    const Status forward = engine.forward(*r.cache);
    ASSERT_TRUE(forward.ok()) << forward;
    if (data_ok) {
      const auto verified = engine.verify(*r.cache);
      EXPECT_TRUE(verified) << "step " << step;
      data_ok = static_cast<bool>(verified);
    }
    const std::vector<uint64_t> digests = all_gather(r.cache->tables_digest());
    for (uint32_t s = 0; s < l.tp && digests_agree; ++s) {
      if (digests[l.rank_of(l.replica, s)] != digests[l.rank]) {
        ADD_FAILURE() << "step " << step << ": shards " << s << " and " << l.shard << " of replica "
                      << l.replica << " hold different tables";
        digests_agree = false;
      }
    }
  };
  for (int step = 0; step < 150; ++step) {
    ASSERT_TRUE(workload.issue(*coordinator, engine).ok());
    run_step(step);
  }
  ASSERT_TRUE(workload.drain(*coordinator, engine).ok());
  run_step(150);

  EXPECT_TRUE(r.cache->tables().empty());
  EXPECT_TRUE(r.cache->group_tables().empty());
  EXPECT_TRUE(coordinator->verify_integrity().ok()) << coordinator->verify_integrity();
  for (uint32_t rep = 0; rep < l.dp; ++rep) {
    const ReplicaStats pools = coordinator->replica_stats(rep);
    EXPECT_EQ(pools.sequences, 0u);
    // Every block is free or an idle cached prefix.
    EXPECT_EQ(pools.used_blocks, 0u) << "replica " << rep;
    EXPECT_EQ(pools.free_blocks + pools.cached_blocks, pools.device_blocks) << "replica " << rep;
    EXPECT_EQ(coordinator->host_free_blocks(rep), c.cache.host_num_blocks) << "replica " << rep;
  }
  // The run exercised what it claims to.
  const CoordinatorStats& stats = coordinator->stats();
  const testing::WorkloadCounts& counts = workload.counts();
  EXPECT_GT(counts.forks, 0u);
  EXPECT_GT(copies, 0u);
  EXPECT_GT(swap_ins, 0u);
  EXPECT_GT(stats.local_hit_tokens, 0u);
  EXPECT_GT(stats.preempted, 0u);
  if (l.dp > 1) {
    EXPECT_GT(counts.cross_replica_forks, 0u);
    EXPECT_GT(migrations, 0u);
    EXPECT_EQ(r.cache->stats().migrated_blocks_received + r.cache->stats().migrated_blocks_sent > 0, true);
  }
}

// The scores rank 0 gathered for a plan, broadcast so that every rank's coordinator (each plays
// the whole job here) reads the same ones.
std::vector<ReplicaScores> share_scores(const RankCache& cache) {
  std::vector<uint8_t> bytes;
  const auto put = [&bytes](const void* p, size_t n) {
    bytes.insert(bytes.end(), static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + n);
  };
  for (const ReplicaScores& r : cache.reported_scores()) {
    const uint64_t n = r.scores.size();
    put(&r.seq.value, 8);
    put(&n, 8);
    put(r.scores.data(), n * sizeof(double));
  }
  EXPECT_TRUE(testing::mpi_transport().broadcast(bytes, RankId{0}).ok());
  std::vector<ReplicaScores> shared;
  for (size_t at = 0; at < bytes.size();) {
    ReplicaScores r;
    uint64_t n = 0;
    std::memcpy(&r.seq.value, bytes.data() + at, 8);
    std::memcpy(&n, bytes.data() + at + 8, 8);
    r.scores.resize(n);
    std::memcpy(r.scores.data(), bytes.data() + at + 16, n * sizeof(double));
    at += 16 + n * sizeof(double);
    shared.push_back(std::move(r));
  }
  return shared;
}

// Token compression across shards: every shard scores only its own heads (here each shard's
// mass differs, so a shard choosing alone would keep other tokens), rank 0 sums the shards of
// each replica, and the coordinator's compactions keep the same tokens on every shard: the
// kept positions and tables agree across shards, every kept token's K/V is exact, and the
// summed scores are exactly the shards' masses added up. Nothing leaks. With `repeat_prompts`,
// some requests repeat a recent prompt whole and the masses depend on the position alone (as a
// model's do on an identical prompt): identical SnapKV requests then share kept prompts, moved
// between replicas where their holder takes no newcomer.
void check_compression_on_every_shard(const Config& c, const quant::CompressionPolicy& policy,
                                      bool repeat_prompts = false) {
  Rank r(c);
  ASSERT_NE(r.cache, nullptr);
  const RankLayout& l = r.layout();
  auto coordinator = Coordinator::create(c);
  ASSERT_TRUE(coordinator.ok()) << coordinator.status();
  testing::EngineModel engine(c);
  testing::ServingWorkload workload(17, l.dp);
  workload.compress_some(policy);
  if (repeat_prompts) workload.repeat_some_prompts();
  const auto shard_mass = [repeat_prompts](SeqId seq, size_t origin, uint32_t shard) {
    const uint64_t of_seq = repeat_prompts ? 0 : seq.value * 7919;
    return static_cast<float>(testing::splitmix64(of_seq + origin * 31 + shard) % 63 + 1) / 16.0f;
  };
  bool data_ok = true, kept_agree = true, sums_ok = true;
  uint64_t requests = 0;
  const int last_step = repeat_prompts ? 300 : 100;  // long enough for prompts to recur
  for (int step = 0; step <= last_step; ++step) {
    if (step < last_step) {
      ASSERT_TRUE(workload.issue(*coordinator, engine).ok());
    } else {
      ASSERT_TRUE(workload.drain(*coordinator, engine).ok());
    }
    const auto plan = coordinator->step();
    ASSERT_TRUE(plan.ok()) << plan.status();
    requests += plan->score_requests.size();
    std::vector<uint8_t> bytes;
    if (is_root()) bytes = plan->serialize();
    const Status executed = r.cache->receive_and_execute(bytes, RankId{0});
    ASSERT_TRUE(executed.ok()) << "step " << step << ": " << executed;
    for (const ReplicaScores& shared : share_scores(*r.cache)) {
      EXPECT_TRUE(coordinator->report_attention(shared.seq, plan->step, shared.scores).ok());
    }
    workload.planned(*plan, engine);
    // Rank 0's sums are every shard's mass of each token added up, once per forward pass that
    // scored it (a whole number of passes; a shard missing or counted twice would not be). They
    // come renumbered by this plan's compactions, as the engine's positions are now.
    if (is_root()) {
      for (const ReplicaScores& got : r.cache->reported_scores()) {
        const std::vector<size_t>& origins = engine.origins(got.seq);
        for (size_t i = 0; i < got.scores.size() && sums_ok; ++i) {
          double one_pass = 0;
          for (uint32_t s = 0; s < l.tp; ++s) one_pass += shard_mass(got.seq, origins[i], s);
          const double passes = one_pass == 0 ? 1 : got.scores[i] / one_pass;
          if (passes != std::round(passes) || passes < 1 || passes > step) {
            ADD_FAILURE() << "step " << step << ": " << got.seq << " token " << i << " scores "
                          << got.scores[i] << ", not a whole number of passes of the shards' "
                          << "masses added up (" << one_pass << ")";
            sums_ok = false;
          }
        }
      }
    }
    ASSERT_TRUE(engine.forward(*r.cache).ok());
    ASSERT_TRUE(engine.attend(*r.cache, shard_mass).ok());
    if (data_ok) {
      const auto verified = engine.verify(*r.cache);
      EXPECT_TRUE(verified) << "step " << step;
      data_ok = static_cast<bool>(verified);
    }
    // What each shard keeps of every sequence it holds, folded: equal across a replica's shards.
    uint64_t kept = r.cache->tables_digest();
    for (const auto& [seq, table] : r.cache->tables()) {
      for (size_t origin : engine.origins(seq)) kept = testing::splitmix64(kept ^ origin);
    }
    for (const auto& [seq, tables] : r.cache->group_tables()) {
      for (uint32_t g = 0; g < tables.size(); ++g) {
        for (size_t origin : engine.group_origins(seq, g)) kept = testing::splitmix64(kept ^ origin);
      }
    }
    const std::vector<uint64_t> all = all_gather(kept);
    for (uint32_t s = 0; s < l.tp && kept_agree; ++s) {
      if (all[l.rank_of(l.replica, s)] != all[l.rank]) {
        ADD_FAILURE() << "step " << step << ": shards " << s << " and " << l.shard
                      << " of replica " << l.replica << " keep different tokens";
        kept_agree = false;
      }
    }
  }
  EXPECT_TRUE(r.cache->tables().empty());
  EXPECT_TRUE(coordinator->verify_integrity().ok()) << coordinator->verify_integrity();
  for (uint32_t rep = 0; rep < l.dp; ++rep) {
    EXPECT_EQ(coordinator->replica_stats(rep).used_blocks, 0u) << "replica " << rep;
    EXPECT_EQ(coordinator->host_free_blocks(rep), c.cache.host_num_blocks) << "replica " << rep;
  }
  EXPECT_EQ(requests > 0, policy.needs_scores());
  EXPECT_GT(coordinator->stats().compactions, 5u);
  EXPECT_GT(workload.counts().forks, 0u);
  if (repeat_prompts) {
    EXPECT_GT(coordinator->stats().compressed_hits, 0u);
  }
}

// H2O compacting at every step, SnapKV once per prompt, and StreamingLLM (which reads no scores).
TEST_P(RuntimeLayoutTest, CompressionKeepsTheSameTokensOnEveryShard) {
  const Config c = config(GetParam().dp == 2 ? 64 : 40, 12);
  quant::CompressionPolicy h2o;
  h2o.kind = quant::CompressionPolicy::Kind::kH2o;
  h2o.budget_tokens = 36;
  h2o.recent_tokens = 8;
  h2o.interval_steps = 1;
  quant::CompressionPolicy snapkv;
  snapkv.kind = quant::CompressionPolicy::Kind::kSnapKv;
  snapkv.budget_ratio = 0.4;
  snapkv.window_tokens = 8;
  quant::CompressionPolicy streaming;
  streaming.kind = quant::CompressionPolicy::Kind::kStreaming;
  streaming.budget_tokens = 40;
  for (const auto& policy : {h2o, snapkv, streaming}) {
    SCOPED_TRACE(std::string(quant::to_string(policy.kind)));
    check_compression_on_every_shard(c, policy);
  }
  SCOPED_TRACE("snapkv, repeated prompts");
  check_compression_on_every_shard(c, snapkv, /*repeat_prompts=*/true);
}

// PyramidKV across ranks: SnapKV's summed votes, a budget per layer group (the model's 2 layers
// as 2 groups), every shard's group tables and kept tokens alike, every group's K/V exact.
TEST_P(RuntimeLayoutTest, PyramidKeepsTheSameTokensPerLayerGroupOnEveryShard) {
  Config c = config(GetParam().dp == 2 ? 64 : 40, 12);
  c.cache.layers_per_group = 1;
  quant::CompressionPolicy pyramid;
  pyramid.kind = quant::CompressionPolicy::Kind::kPyramid;
  pyramid.budget_ratio = 0.4;
  pyramid.window_tokens = 8;
  pyramid.beta = 4;
  check_compression_on_every_shard(c, pyramid);
}

INSTANTIATE_TEST_SUITE_P(Layouts, RuntimeLayoutTest, ::testing::ValuesIn(kLayouts),
                         [](const ::testing::TestParamInfo<Layout>& p) { return std::string(p.param.name); });

// A plan whose step number a rank does not expect is refused by every rank before any block
// moves (a migration would otherwise wait forever for the refusing rank), and each error names
// the ranks that refused and the steps they expect.
TEST(RuntimeStepTest, AWrongStepNumberIsRefusedEverywhereNamingRanksAndSteps) {
  if (testing::mpi_transport().world_size() != 4) GTEST_SKIP() << "needs 4 ranks";
  const Config c = testing::serving_config(2, 2, 8, 4, 8, 4);
  Rank r(c);
  ASSERT_NE(r.cache, nullptr);
  const RankLayout& l = r.layout();
  const PagedKvView& device = r.cache->device_pool();
  for (uint32_t b = 0; b < device.num_blocks; ++b) {
    testing::fill_pattern(device.block(b), device.block_bytes, testing::block_seed(l.rank, 0, 0, b, 3));
  }
  const uint64_t before = testing::checksum(device.block(0), device.num_blocks * device.block_bytes);

  // Every rank expects step 0; the plan says 5.
  StepPlan ahead;
  ahead.step = 5;
  ahead.ops = {Op::migrate(0, BlockId{1}, 1, BlockId{2})};
  const Status all_refuse = broadcast_and_execute(*r.cache, ahead);
  EXPECT_EQ(all_refuse.code(), ErrorCode::kInvalidOperation);
  EXPECT_THAT(all_refuse.message(),
              HasSubstr("rank " + std::to_string(l.rank) + " (replica " + std::to_string(l.replica) +
                        ", shard " + std::to_string(l.shard) +
                        ") received the plan of step 5 but expects step 0"));
  EXPECT_THAT(all_refuse.message(),
              HasSubstr("the plan of step 5 broadcast by rank 0 was refused by rank 0 (replica 0, "
                        "shard 0, expecting step 0), rank 1 (replica 0, shard 1, expecting step 0), "
                        "rank 2 (replica 1, shard 0, expecting step 0), rank 3 (replica 1, shard 1, "
                        "expecting step 0); no rank executed it"));

  // Rank 2 runs a step of its own and falls out of step with the others.
  if (l.rank == 2) {
    ASSERT_TRUE(r.cache->execute(StepPlan{}).ok());
  }
  StepPlan step0;
  step0.ops = {Op::migrate(0, BlockId{1}, 1, BlockId{2}), Op::migrate(1, BlockId{3}, 0, BlockId{4})};
  const Status one_refuses = broadcast_and_execute(*r.cache, step0);
  EXPECT_EQ(one_refuses.code(), ErrorCode::kInvalidOperation);
  EXPECT_THAT(one_refuses.message(),
              HasSubstr("the plan of step 0 broadcast by rank 0 was refused by rank 2 (replica 1, "
                        "shard 0, expecting step 1); no rank executed it"));
  if (l.rank == 2) {
    EXPECT_THAT(one_refuses.message(),
                HasSubstr("rank 2 (replica 1, shard 0) received the plan of step 0 but expects step 1"));
  } else {
    EXPECT_THAT(one_refuses.message(), HasSubstr("rank " + std::to_string(l.rank) + " (replica "));
  }
  EXPECT_EQ(r.cache->next_step(), l.rank == 2 ? 1u : 0u);
  EXPECT_EQ(r.cache->stats().migrated_blocks_received, 0u);
  EXPECT_EQ(testing::checksum(device.block(0), device.num_blocks * device.block_bytes), before);

  // Unreadable plan bytes: every rank refuses, nobody hangs.
  std::vector<uint8_t> garbage;
  if (is_root()) garbage = {1, 2, 3};
  const Status unreadable = r.cache->receive_and_execute(garbage, RankId{0});
  EXPECT_FALSE(unreadable.ok());
  EXPECT_THAT(unreadable.message(), HasSubstr("no rank executed it"));
}

// The host-staged transport over MPI (src/runtime/staged_transport.cc; the CPU backend's copies
// are memcpy, so this checks the staging and the pairing, not a GPU): every rank sends a run of
// adjacent blocks to the next rank and scattered blocks to itself, for several rounds, and every
// block arrives bit-exact in its own round.
TEST(StagedTransportTest, BlocksThroughTheStagingArriveBitExactOnEveryRank) {
  Transport& mpi = testing::mpi_transport();
  const std::unique_ptr<Backend> backend = testing::cpu_backend(CpuIsa::kGeneric, 1);
  auto made = make_host_staged_transport(mpi, *backend);
  ASSERT_TRUE(made.ok()) << made.status();  // local (no collective): fails alike everywhere
  Transport& staged = **made;
  EXPECT_EQ(staged.name(), "mpi (staged through pinned host memory)");
  EXPECT_EQ(staged.rank(), mpi.rank());
  EXPECT_EQ(staged.world_size(), mpi.world_size());

  const int n = mpi.world_size();
  const int self = mpi.rank().value;
  const int next = (self + 1) % n;
  const int prev = (self + n - 1) % n;
  constexpr uint64_t kRun = 8, kRunBytes = 4096, kSelf = 5, kSelfBytes = 1000;
  testing::ScatteredArena run_out(kRun, kRunBytes, 1, 0x11, /*shuffle=*/false);
  testing::ScatteredArena run_in(kRun + 4, kRunBytes, 2 + self, 0x22);
  testing::ScatteredArena self_out(kSelf + 4, kSelfBytes, 3 + self, 0x33);
  testing::ScatteredArena self_in(kSelf, kSelfBytes, 4, 0x44, /*shuffle=*/false);
  const std::vector<uint8_t*> run_sent = run_out.blocks(0, kRun);
  const std::vector<uint8_t*> run_received = run_in.blocks(0, kRun);
  const std::vector<uint8_t*> self_sent = self_out.blocks(0, kSelf);
  const std::vector<uint8_t*> self_received = self_in.blocks(0, kSelf);
  const std::vector<BlockBatch> sends = {{RankId{next}, run_sent, kRunBytes},
                                         {RankId{self}, self_sent, kSelfBytes}};
  const std::vector<BlockBatch> recvs = {{RankId{self}, self_received, kSelfBytes},
                                         {RankId{prev}, run_received, kRunBytes}};
  for (uint64_t round = 0; round < 3; ++round) {
    for (uint64_t i = 0; i < kRun; ++i)
      testing::fill_pattern(run_sent[i], kRunBytes, testing::block_seed(self, next, 0, i, round));
    for (uint64_t i = 0; i < kSelf; ++i)
      testing::fill_pattern(self_sent[i], kSelfBytes, testing::block_seed(self, self, 1, i, round));
    const Status s = staged.exchange_blocks(sends, recvs);
    EXPECT_TRUE(s.ok()) << s;
    for (uint64_t i = 0; i < kRun; ++i) {
      EXPECT_TRUE(testing::has_pattern(run_received[i], kRunBytes,
                                       testing::block_seed(prev, self, 0, i, round)))
          << "rank " << self << " round " << round << " block " << i << " from rank " << prev;
    }
    for (uint64_t i = 0; i < kSelf; ++i) {
      EXPECT_TRUE(testing::has_pattern(self_received[i], kSelfBytes,
                                       testing::block_seed(self, self, 1, i, round)))
          << "rank " << self << " round " << round << " own block " << i;
    }
  }
  // The collectives are MPI's own.
  std::vector<uint64_t> all;
  EXPECT_TRUE(staged.all_gather(uint64_t(self) * 10, all).ok());
  std::vector<uint64_t> expected(n);
  for (int r = 0; r < n; ++r) expected[r] = uint64_t(r) * 10;
  EXPECT_EQ(all, expected);
}

}  // namespace
}  // namespace kvfabric
