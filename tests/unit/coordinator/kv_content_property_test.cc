// What every slot holds, for random clients: a model of the ranks runs each plan (its waves of
// swaps, copies and migrations, then the tables) on one number per token slot, and a model of the
// forward pass fills each table's slots from its computed-token count on. A slot's number is
// what the token's K/V is made from: the token and every slot cached before it in its sequence,
// so a compacted sequence computes other K/V than an uncompacted copy. After every step each
// running sequence must read back exactly the K/V its own history gives.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "kvfabric/coordinator/coordinator.h"
#include "kvfabric/plan/step_plan.h"
#include "testing/property_env.h"
#include "testing/random_client.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using testing::ClientCall;
using testing::RandomClient;
using testing::splitmix64;

constexpr uint32_t kBlockSize = RandomClient::kBlockSize;

// The engine's view of one sequence: its cached tokens and what each one's K/V is made from.
struct SequenceModel {
  std::vector<TokenId> tokens;
  std::vector<uint64_t> kv;      // valid below the computed count
  bool reads_kept_prompt = false;  // served an identical request's kept prompt: read it once
};

// Computes positions [first, end), as a forward pass does.
void compute(SequenceModel& s, size_t first, size_t end) {
  testing::compute_context_kv(s.kv, first, end, [&](size_t pos) { return s.tokens[pos]; });
}

class RankModel {
 public:
  explicit RankModel(const Config& config) {
    const uint32_t dp = config.topology.dp;
    device_.assign(dp, std::vector<uint64_t>(config.cache.num_blocks * kBlockSize, 0));
    host_.assign(dp, std::vector<uint64_t>(config.cache.host_num_blocks * kBlockSize + 1, 0));
    // Fresh blocks hold garbage, never the value a token's K/V would have.
    uint64_t garbage = 0x5eed;
    for (auto& pool : device_) {
      for (uint64_t& slot : pool) slot = garbage = splitmix64(garbage);
    }
  }

  // The plan's ops, in waves, each wave's kinds in RankCache's order (within a wave only copies
  // may depend on one another, in list order).
  void run_ops(const StepPlan& plan) {
    const std::vector<uint32_t> waves = plan_waves(plan.ops);
    uint32_t last = 0;
    for (uint32_t w : waves) last = std::max(last, w + 1);
    using Kind = StepPlan::OpKind;
    for (uint32_t wave = 0; wave < last; ++wave) {
      for (Kind kind : {Kind::kSwapOut, Kind::kSwapIn, Kind::kCopy, Kind::kMigrate}) {
        for (size_t i = 0; i < plan.ops.size(); ++i) {
          const StepPlan::Op& op = plan.ops[i];
          if (waves[i] != wave || op.kind != kind) continue;
          if (kind == Kind::kCopy) {
            for (uint32_t t = 0; t < op.copy.num_tokens; ++t) {
              slot(device_, op.replica, op.copy.dst_block, op.copy.dst_offset + t) =
                  slot(device_, op.replica, op.copy.src_block, op.copy.src_offset + t);
            }
            continue;
          }
          for (uint32_t t = 0; t < kBlockSize; ++t) {
            if (kind == Kind::kSwapOut) {
              slot(host_, op.replica, op.dst, t) = slot(device_, op.replica, op.src, t);
            } else if (kind == Kind::kSwapIn) {
              slot(device_, op.replica, op.dst, t) = slot(host_, op.replica, op.src, t);
            } else {
              slot(device_, op.dst_replica, op.dst, t) = slot(device_, op.replica, op.src, t);
            }
          }
        }
      }
    }
  }

  uint64_t& at(uint32_t replica, const std::vector<BlockId>& table, size_t pos) {
    return slot(device_, replica, table.at(pos / kBlockSize), pos % kBlockSize);
  }

 private:
  static uint64_t& slot(std::vector<std::vector<uint64_t>>& pools, uint32_t replica, BlockId block,
                        uint32_t offset) {
    return pools.at(replica).at(uint64_t{block.value} * kBlockSize + offset);
  }

  std::vector<std::vector<uint64_t>> device_, host_;
};

// One random client's run; returns "" or what went wrong first.
std::string run_client(uint64_t seed) {
  RandomClient client(seed);
  auto created = Coordinator::create(client.config());
  if (!created.ok()) return created.status().to_string();
  Coordinator& c = *created;
  RankModel ranks(client.config());
  std::map<SeqId, SequenceModel> engine;
  std::map<SeqId, std::vector<BlockId>> tables;  // as the ranks hold them
  std::map<SeqId, uint32_t> replica_of;
  for (int call_index = 0; call_index < 250; ++call_index) {
    const ClientCall call = client.next();
    const std::string where =
        "seed " + std::to_string(seed) + ", call " + std::to_string(call_index) + " (" + call.describe() + ")";
    if (call.kind == ClientCall::Kind::kAdmit) {
      auto placed = c.admit(call.seq, call.prompt, call.options);
      if (!placed.ok()) continue;
      SequenceModel s;
      s.tokens = call.prompt;
      if (placed->compressed_tokens > 0) {
        s.tokens.resize(placed->compressed_tokens);
        s.reads_kept_prompt = true;
      }
      s.kv.assign(s.tokens.size(), 0);
      compute(s, 0, placed->compressed_tokens > 0 ? 0 : placed->cached_tokens);
      engine[call.seq] = std::move(s);
      continue;
    }
    if (call.kind != ClientCall::Kind::kStep) {
      if (!RandomClient::apply(call, c).ok()) continue;
      if (call.kind == ClientCall::Kind::kAppend) {
        SequenceModel& s = engine.at(call.seq);
        for (size_t i = 0; i < call.tokens; ++i) {
          s.tokens.push_back(static_cast<TokenId>(90000 + client.below(50)));
          s.kv.push_back(0);
        }
      } else if (call.kind == ClientCall::Kind::kFork) {
        engine[call.dst] = engine.at(call.seq);
      } else if (call.kind == ClientCall::Kind::kFree) {
        engine.erase(call.seq);
      }
      continue;
    }
    auto plan = c.step();
    if (!plan.ok()) return where + ": " + plan.status().to_string();
    ranks.run_ops(*plan);
    for (SeqId seq : plan->released) {
      tables.erase(seq);
      replica_of.erase(seq);
    }
    for (SeqId seq : plan->preempted) {
      if (!c.replica_of(seq)) engine.erase(seq);  // the client's to admit again
    }
    for (const StepPlan::Compaction& compaction : plan->compactions) {
      SequenceModel& s = engine.at(compaction.seq);
      SequenceModel kept;
      for (const StepPlan::TokenRange& range : compaction.kept) {
        for (uint64_t pos = range.first; pos < range.first + range.count; ++pos) {
          kept.tokens.push_back(s.tokens.at(pos));
          kept.kv.push_back(s.kv.at(pos));
        }
      }
      kept.reads_kept_prompt = s.reads_kept_prompt;
      s = std::move(kept);
    }
    for (const StepPlan::Table& t : plan->tables) {
      std::vector<BlockId>& table = tables[t.seq];
      if (replica_of.count(t.seq) > 0 && replica_of[t.seq] != t.replica) table.clear();
      if (const Status applied = apply_table_change(table, t); !applied.ok()) {
        return where + ": " + applied.to_string();
      }
      replica_of[t.seq] = t.replica;
      SequenceModel& s = engine.at(t.seq);
      if (s.tokens.size() != t.num_tokens) {
        return where + ": " + to_string(t.seq) + "'s table has " + std::to_string(t.num_tokens) +
               " tokens, the engine " + std::to_string(s.tokens.size());
      }
      if (s.reads_kept_prompt) {  // what an identical request's compaction kept: taken as it is
        for (size_t pos = 0; pos < t.computed_tokens; ++pos) s.kv[pos] = ranks.at(t.replica, table, pos);
        s.reads_kept_prompt = false;
      }
      for (size_t pos = 0; pos < t.computed_tokens; ++pos) {
        if (ranks.at(t.replica, table, pos) != s.kv[pos]) {
          return where + ": " + to_string(t.seq) + "'s slot " + std::to_string(pos) + " of " +
                 std::to_string(t.computed_tokens) + " computed holds other K/V";
        }
      }
      compute(s, t.computed_tokens, t.num_tokens);  // the forward pass
      for (size_t pos = t.computed_tokens; pos < t.num_tokens; ++pos) ranks.at(t.replica, table, pos) = s.kv[pos];
    }
    // After the forward pass, every running sequence reads back its own K/V.
    for (const auto& [seq, table] : tables) {
      const SequenceModel& s = engine.at(seq);
      for (size_t pos = 0; pos < s.tokens.size(); ++pos) {
        if (ranks.at(replica_of[seq], table, pos) != s.kv[pos]) {
          return where + ": after the forward pass " + to_string(seq) + "'s slot " +
                 std::to_string(pos) + " holds another sequence's K/V";
        }
      }
    }
    for (const StepPlan::ScoreRequest& request : plan->score_requests) {
      const SequenceModel& s = engine.at(request.seq);
      std::vector<double> scores(s.kv.size());
      for (size_t i = 0; i < scores.size(); ++i) scores[i] = static_cast<double>(s.kv[i] % 97);
      (void)c.report_attention(request.seq, plan->step, scores);
    }
    if (const Status integrity = c.verify_integrity(); !integrity.ok()) {
      return where + ": " + integrity.to_string();
    }
  }
  return "";
}

// (Such a client found that a compaction left the slots its forward pass writes in a block a
// fork shares.)
TEST(KvContentProperty, EverySequenceReadsItsOwnKvForRandomClients) {
  SCOPED_TRACE(testing::property_trace());
  const uint64_t first = testing::property_seed(1);
  for (uint64_t seed = first; seed < first + testing::property_count(4000); ++seed) {
    const std::string failure = run_client(seed);
    ASSERT_EQ(failure, "");
  }
}

}  // namespace
}  // namespace kvfabric
