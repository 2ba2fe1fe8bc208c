// A model of a serving engine around the coordinator and the ranks, for tests: it writes each
// token's K/V as a function of the token and the K/V cached before it (as a real model does), so
// after any mix of prefix sharing, copy-on-write, swaps, migrations and compactions every
// sequence's gathered K/V can be checked against its own history. ServingWorkload drives a
// scripted, seeded serving load.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <numeric>
#include <random>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kvfabric/coordinator/coordinator.h"
#include "kvfabric/runtime/rank_cache.h"
#include "testing/block_pattern.h"
#include "testing/token_run.h"

namespace kvfabric::testing {

//! The K (or V) element of a token whose prefix hashes to `prefix_hash`. Multiples of 1/64 in
//! [-2, 2): exact in f32, f16 and bf16, so round trips through the pool compare with ==.
inline float token_kv(uint64_t prefix_hash, uint32_t layer, uint32_t kv_head, uint32_t dim,
                      bool is_value) {
  const uint64_t h = splitmix64(prefix_hash ^ (uint64_t{layer} << 56) ^ (uint64_t{kv_head} << 40) ^
                           (uint64_t{dim} << 1) ^ uint64_t{is_value});
  return static_cast<float>(static_cast<int>(h & 0xFF) - 128) / 64.0f;
}

//! What the K/V of cached positions [first, end) are made from (token_kv's first argument), as
//! a forward pass computes them: each from its token (`token_at(pos)`) and the K/V of every
//! position cached before it, read from `kv`. Uncompacted, that is a function of the token
//! history, which is what prefix sharing relies on; after a compaction the tokens computed next
//! attend to the kept tokens only, and differ from an uncompacted copy's.
template <typename TokenAt>
void compute_context_kv(std::vector<uint64_t>& kv, size_t first, size_t end, TokenAt token_at) {
  uint64_t context = 0;
  for (size_t pos = 0; pos < end; ++pos) {
    if (pos >= first) kv[pos] = splitmix64(context ^ (static_cast<uint64_t>(token_at(pos)) << 1));
    context = splitmix64(context + kv[pos]);
  }
}

//! Blocks an allocation on `replica` can take: free plus idle cached.
inline uint64_t available_blocks(const Coordinator& c, uint32_t replica) {
  const ReplicaStats pools = c.replica_stats(replica);
  return pools.free_blocks + pools.cached_blocks;
}

//! A test config: 2 layers, head_dim 64, f16 KV, block size 16.
inline Config serving_config(uint32_t dp, uint32_t tp, uint32_t q_heads, uint32_t kv_heads,
                             uint64_t device_blocks, uint64_t host_blocks) {
  Config c;
  c.model.name = "serving-test";
  c.model.num_layers = 2;
  c.model.num_query_heads = q_heads;
  c.model.num_kv_heads = kv_heads;
  c.model.head_dim = 64;
  c.model.dtype = DType::kF32;
  c.cache.block_size = 16;
  c.cache.num_blocks = device_blocks;
  c.cache.host_num_blocks = host_blocks;
  c.cache.kv_dtype = DType::kF16;
  c.topology.dp = dp;
  c.topology.tp = tp;
  return c;
}

//! What the engine knows of each sequence: its tokens and how many have K/V in the cache. Every
//! rank keeps the same model (it sees the same requests and plans); a rank writes and checks the
//! sequences of its own replica.
class EngineModel {
 public:
  explicit EngineModel(const Config& config) : config_(config) {}

  void admitted(SeqId seq, std::span<const TokenId> prompt, const Placement& placement) {
    Seq& s = seqs_[seq];
    s.tokens.assign(prompt.begin(), prompt.end());
    s.prompt_size = prompt.size();
    s.computed = placement.cached_tokens;
    if (placement.compressed_tokens > 0) {
      // Served the kept prompt of an identical request: the tokens its compaction kept.
      const auto kept = compacted_prompts_.find(s.tokens);
      if (kept == compacted_prompts_.end() ||
          kept->second.origin.size() != placement.compressed_tokens) {
        if (plan_error_.empty()) {
          plan_error_ = "engine model: " + to_string(seq) + " was served a compacted prompt of " +
                        std::to_string(placement.compressed_tokens) +
                        " tokens that no compaction of its prompt kept";
        }
        s.origin.assign(placement.compressed_tokens, 0);
        s.kv.assign(placement.compressed_tokens, 0);
      } else {
        s.origin = kept->second.origin;
        s.kv = kept->second.kv;
      }
      s.computed = placement.compressed_tokens;
      return;
    }
    s.origin.resize(prompt.size());
    std::iota(s.origin.begin(), s.origin.end(), size_t{0});
    s.kv.assign(prompt.size(), 0);
    compute_kv(s, 0, s.computed);  // the cached prefix: what any sequence of this prompt computed
  }
  void appended(SeqId seq, std::span<const TokenId> tokens) {
    Seq& s = seqs_.at(seq);
    for (TokenId token : tokens) {
      s.origin.push_back(s.tokens.size());
      s.kv.push_back(0);
      for (Cached& group : s.groups) {
        group.origin.push_back(s.tokens.size());
        group.kv.push_back(0);
      }
      s.tokens.push_back(token);
    }
  }
  void forked(SeqId src, SeqId dst) { seqs_[dst] = seqs_.at(src); }
  void freed(SeqId seq) { seqs_.erase(seq); }
  [[nodiscard]] bool knows(SeqId seq) const { return seqs_.count(seq) > 0; }
  [[nodiscard]] const std::vector<TokenId>& tokens(SeqId seq) const { return seqs_.at(seq).tokens; }
  //! Where each cached token of `seq` was in its token list (compaction drops some).
  [[nodiscard]] const std::vector<size_t>& origins(SeqId seq) const { return seqs_.at(seq).origin; }
  //! Of a sequence compacted per layer group: where each token layer group g caches was.
  [[nodiscard]] const std::vector<size_t>& group_origins(SeqId seq, uint32_t g) const {
    return seqs_.at(seq).groups.at(g).origin;
  }
  [[nodiscard]] bool grouped(SeqId seq) const { return !seqs_.at(seq).groups.empty(); }
  //! What the K/V of each cached position of `seq` is made from (testing::token_kv's first
  //! argument), for positions computed.
  [[nodiscard]] const std::vector<uint64_t>& kv_hashes(SeqId seq) const { return seqs_.at(seq).kv; }

  //! Takes in a plan: preempted sequences lose their K/V (the workload re-admits them). Each
  //! table's computed-token count must be what the engine itself knows is computed: the plan
  //! alone tells a TP worker what its forward pass fills.
  void planned(const StepPlan& plan) {
    for (SeqId seq : plan.preempted) seqs_.erase(seq);
    regroup(plan);
    for (const auto& c : plan.compactions) {
      const auto it = seqs_.find(c.seq);
      if (it == seqs_.end() || c.layer_group != StepPlan::kAllLayers) continue;
      Seq& s = it->second;
      std::vector<size_t> kept_origin;
      std::vector<uint64_t> kept_kv;
      size_t kept_computed = 0;
      for (const auto& range : c.kept) {
        for (uint64_t pos = range.first; pos < range.first + range.count; ++pos) {
          kept_origin.push_back(s.origin.at(pos));
          kept_kv.push_back(s.kv.at(pos));
          if (pos < s.computed) ++kept_computed;
        }
      }
      s.origin = std::move(kept_origin);
      s.kv = std::move(kept_kv);
      s.computed = kept_computed;
      remember_compacted_prompt(s);
    }
    for (const auto& t : plan.tables) {
      live_[{t.seq, t.layer_group}] = t.num_tokens;
      const auto it = seqs_.find(t.seq);
      if (it == seqs_.end()) continue;
      const bool grouped = t.layer_group != StepPlan::kAllLayers;
      if (grouped != !it->second.groups.empty() ||
          (grouped && t.layer_group >= it->second.groups.size())) {
        if (plan_error_.empty()) {
          plan_error_ = "engine model: step " + std::to_string(plan.step) + " lists a table of " +
                        to_string(t.seq) + " for layer group " + std::to_string(t.layer_group) +
                        " it was not compacted into";
        }
        continue;
      }
      const size_t computed = grouped ? it->second.groups[t.layer_group].computed : it->second.computed;
      if (computed != t.computed_tokens && plan_error_.empty()) {
        plan_error_ = "engine model: step " + std::to_string(plan.step) + "'s table of " +
                      to_string(t.seq) + (grouped ? " group " + std::to_string(t.layer_group) : "") +
                      " says " + std::to_string(t.computed_tokens) +
                      " tokens are computed, the engine computed " + std::to_string(computed);
      }
    }
    for (SeqId seq : plan.released) {
      const bool retabled = std::any_of(plan.tables.begin(), plan.tables.end(),
                                        [&](const StepPlan::Table& t) { return t.seq == seq; });
      if (!retabled) live_.erase(live_.lower_bound({seq, 0}), live_.upper_bound({seq, UINT32_MAX}));
    }
  }

  //! The forward pass: writes the K/V of every slot not yet computed of the rank's replica
  //! (every layer, the rank's KV heads). Afterwards every running sequence counts as computed on
  //! every rank, as the engine's ranks all finish the same step.
  Status forward(RankCache& rank) {
    RankCache* const ranks[] = {&rank};
    return forward(ranks);
  }

  //! The forward pass of one step on every rank of the engine: each writes its own replica's
  //! sequences, then every running sequence counts as computed.
  Status forward(std::span<RankCache* const> ranks) {
    if (!plan_error_.empty()) return Status(ErrorCode::kInternal, plan_error_);
    for (RankCache* rank : ranks) KVF_RETURN_IF_ERROR(write_uncomputed(*rank));
    computed_everywhere();
    return ok_status();
  }

  //! One rank's share of the forward pass: the K/V of every slot not yet computed of its
  //! replica's sequences.
  Status write_uncomputed(RankCache& rank) {
    for (const auto& [seq, table] : rank.tables()) {
      Seq& s = seqs_.at(seq);
      if (s.computed >= table.num_tokens) continue;
      if (s.origin.size() < table.num_tokens) {
        return invalid_argument("engine model: " + to_string(seq) + " has " +
                                std::to_string(s.origin.size()) + " tokens, its table " +
                                std::to_string(table.num_tokens));
      }
      compute_kv(s, s.computed, table.num_tokens);
      KVF_RETURN_IF_ERROR(write_kv(rank, s.kv, s.computed, table, whole_layers()));
    }
    for (const auto& [seq, tables] : rank.group_tables()) {
      for (uint32_t g = 0; g < tables.size(); ++g) {
        KVF_RETURN_IF_ERROR(forward_group(rank, seq, g, tables[g]));
      }
    }
    return ok_status();
  }

  //! The attention part of token compression: adds `mass(seq, origin, shard)` for every cached
  //! token of every sequence of the rank's replica to its scores (origin: the token's index in
  //! the sequence's token list), as a shard's decode attention would.
  Status attend(RankCache& rank,
                const std::function<float(SeqId, size_t origin, uint32_t shard)>& mass) const {
    for (const auto& [seq, table] : rank.tables()) {
      const auto it = seqs_.find(seq);
      if (it == seqs_.end()) continue;
      const size_t n = std::min<size_t>(table.num_tokens, it->second.computed);
      std::vector<float> values(n);
      for (size_t pos = 0; pos < n; ++pos) {
        values[pos] = mass(seq, it->second.origin[pos], rank.layout().shard);
      }
      KVF_RETURN_IF_ERROR(rank.accumulate_attention(seq, values));
    }
    return ok_status();
  }

  //! What the forward pass leaves behind on every rank: each running sequence computed to its
  //! table's end. (A run of the coordinator alone calls this instead of forward().)
  void computed_everywhere() {
    for (const auto& [key, num_tokens] : live_) {
      const auto it = seqs_.find(key.first);
      if (it == seqs_.end()) continue;
      Seq& s = it->second;
      if (key.second != StepPlan::kAllLayers) {
        if (key.second >= s.groups.size()) continue;
        Cached& group = s.groups[key.second];
        if (group.computed >= num_tokens) continue;
        compute_kv(s, group, group.computed, num_tokens);
        group.computed = num_tokens;
        continue;
      }
      if (s.computed >= num_tokens) continue;
      compute_kv(s, s.computed, num_tokens);
      s.computed = num_tokens;
    }
  }

  //! The first plan table whose computed-token count differed from the engine's ("" if none).
  [[nodiscard]] const std::string& plan_error() const { return plan_error_; }

  //! Gathers every sequence of the rank's replica and compares it with its tokens' K/V.
  ::testing::AssertionResult verify(RankCache& rank) const {
    for (const auto& [seq, table] : rank.tables()) {
      const auto it = seqs_.find(seq);
      if (it == seqs_.end()) return ::testing::AssertionFailure() << "rank holds unknown " << seq;
      if (auto checked = check_kv(rank, seq, it->second.kv, table, whole_layers()); !checked) {
        return checked;
      }
    }
    for (const auto& [seq, tables] : rank.group_tables()) {
      const auto it = seqs_.find(seq);
      if (it == seqs_.end()) return ::testing::AssertionFailure() << "rank holds unknown " << seq;
      for (uint32_t g = 0; g < tables.size(); ++g) {
        auto checked = check_kv(rank, seq, it->second.groups.at(g).kv, tables[g], group_layers(g));
        if (!checked) return checked << " (layer group " << g << ")";
      }
    }
    return ::testing::AssertionSuccess();
  }

  //! The rank keeps its KV in `backend`'s device memory (a CUDA rank): forward() and verify()
  //! pass it their tensors through device buffers. Without this, tensors are host memory.
  void use_device_buffers(Backend& backend) { device_ = &backend; }

 private:
  // What one layer group of a sequence compacted per group caches (pyramid).
  struct Cached {
    std::vector<size_t> origin;
    std::vector<uint64_t> kv;
    size_t computed = 0;
  };
  struct Seq {
    std::vector<TokenId> tokens;
    size_t prompt_size = 0;
    std::vector<size_t> origin;  // cached position -> index in tokens (identity until compacted)
    std::vector<uint64_t> kv;    // cached position -> what its K/V is made from, once computed
    size_t computed = 0;         // cached positions with K/V
    std::vector<Cached> groups;  // once compacted per layer group: each group's, instead
  };
  struct KeptPrompt {
    std::vector<size_t> origin;
    std::vector<uint64_t> kv;
  };

  // Computes positions [first, end) of `s`, as a forward pass does.
  static void compute_kv(Seq& s, size_t first, size_t end) {
    compute_context_kv(s.kv, first, end, [&](size_t pos) { return s.tokens[s.origin[pos]]; });
  }
  // The same for one layer group's positions (its layers attend to what the group keeps).
  static void compute_kv(const Seq& s, Cached& group, size_t first, size_t end) {
    compute_context_kv(group.kv, first, end,
                       [&](size_t pos) { return s.tokens[group.origin[pos]]; });
  }

  // The plan's compactions per layer group, each from what the sequence cached whole.
  void regroup(const StepPlan& plan) {
    for (const auto& c : plan.compactions) {
      const auto it = seqs_.find(c.seq);
      if (it == seqs_.end() || c.layer_group == StepPlan::kAllLayers) continue;
      Seq& s = it->second;
      if (s.groups.empty()) s.groups.resize(num_layer_groups(config_));
      Cached& group = s.groups.at(c.layer_group);
      group = Cached{};
      for (const auto& range : c.kept) {
        for (uint64_t pos = range.first; pos < range.first + range.count; ++pos) {
          group.origin.push_back(s.origin.at(pos));
          group.kv.push_back(s.kv.at(pos));
          if (pos < s.computed) ++group.computed;
        }
      }
    }
  }

  Status forward_group(RankCache& rank, SeqId seq, uint32_t g, const StepPlan::Table& table) {
    Seq& s = seqs_.at(seq);
    Cached& group = s.groups.at(g);
    if (group.computed >= table.num_tokens) return ok_status();
    if (group.origin.size() < table.num_tokens) {
      return invalid_argument("engine model: " + to_string(seq) + " group " + std::to_string(g) +
                              " has " + std::to_string(group.origin.size()) +
                              " tokens, its table " + std::to_string(table.num_tokens));
    }
    compute_kv(s, group, group.computed, table.num_tokens);
    return write_kv(rank, group.kv, group.computed, table, group_layers(g));
  }

  // Where a table's K/V lives: the model layers it holds, the view they are read through, and
  // the tokens a block holds in that view.
  struct TableLayers {
    uint32_t first_layer = 0;
    uint32_t num_layers = 0;
    size_t block_tokens = 0;
    BlockView view = BlockView::kWhole;
  };
  [[nodiscard]] TableLayers whole_layers() const {
    return {0, config_.model.num_layers, config_.cache.block_size, BlockView::kWhole};
  }
  [[nodiscard]] TableLayers group_layers(uint32_t g) const {
    const uint32_t per_group = config_.cache.layers_per_group;
    return {g * per_group, per_group,
            size_t{config_.cache.block_size} * (config_.model.num_layers / per_group),
            BlockView::kLayerGroup};
  }

  // The forward pass's writes: positions [first, table.num_tokens) of `kv` into the table's
  // slots, every layer it holds, the rank's KV heads.
  Status write_kv(RankCache& rank, const std::vector<uint64_t>& kv, size_t first,
                  const StepPlan::Table& table, const TableLayers& at) {
    const RankLayout& l = rank.layout();
    const size_t n = table.num_tokens - first;
    std::vector<int64_t> slots(n);
    for (size_t i = 0; i < n; ++i) {
      const size_t pos = first + i;
      slots[i] = static_cast<int64_t>(table.blocks[pos / at.block_tokens].value * at.block_tokens +
                                      pos % at.block_tokens);
    }
    std::vector<float> k(n * l.num_kv_heads * config_.model.head_dim), v(k.size());
    RankBuffer rank_k(device_, k.size()), rank_v(device_, k.size());
    for (uint32_t layer = at.first_layer; layer < at.first_layer + at.num_layers; ++layer) {
      fill(kv, first, n, layer, l, k.data(), v.data());
      KVF_RETURN_IF_ERROR(rank_k.upload(k));
      KVF_RETURN_IF_ERROR(rank_v.upload(v));
      AppendKvArgs args;
      args.key = rank_k.data(k);
      args.value = rank_v.data(v);
      args.input_dtype = DType::kF32;
      args.num_tokens = static_cast<uint32_t>(n);
      args.slot_mapping = slots.data();
      KVF_RETURN_IF_ERROR(rank.append_kv(layer, args, at.view));
    }
    return ok_status();
  }

  // Gathers a table's tokens of every layer it holds and compares them with `kv`'s K/V.
  ::testing::AssertionResult check_kv(RankCache& rank, SeqId seq, const std::vector<uint64_t>& kv,
                                      const StepPlan::Table& table,
                                      const TableLayers& at) const {
    const RankLayout& l = rank.layout();
    const uint32_t hd = config_.model.head_dim;
    const size_t n = table.num_tokens;
    std::vector<uint32_t> blocks;
    for (BlockId b : table.blocks) blocks.push_back(b.value);
    std::vector<float> k(n * l.num_kv_heads * hd), v(k.size()), want_k(k.size()), want_v(k.size());
    RankBuffer rank_k(device_, k.size()), rank_v(device_, k.size());
    for (uint32_t layer = at.first_layer; layer < at.first_layer + at.num_layers; ++layer) {
      GatherKvArgs args;
      args.block_table = blocks.data();
      args.num_tokens = static_cast<uint32_t>(n);
      args.key_out = rank_k.data(k);
      args.value_out = rank_v.data(v);
      Status gathered = rank.gather_kv(layer, args, at.view);
      if (gathered.ok()) gathered = rank_k.download(k);
      if (gathered.ok()) gathered = rank_v.download(v);
      if (!gathered.ok()) return ::testing::AssertionFailure() << gathered;
      fill(kv, 0, n, layer, l, want_k.data(), want_v.data());
      for (size_t i = 0; i < k.size(); ++i) {
        if (k[i] != want_k[i] || v[i] != want_v[i]) {
          const size_t token = i / (l.num_kv_heads * hd);
          return ::testing::AssertionFailure()
                 << "rank " << l.rank << ": " << seq << " token " << token << " of " << n
                 << ", layer " << layer << ", element " << i << ": K " << k[i] << " V " << v[i]
                 << ", expected K " << want_k[i] << " V " << want_v[i];
        }
      }
    }
    return ::testing::AssertionSuccess();
  }

  // A compaction that laid the kept prompt out first (SnapKV) may be shared with identical
  // requests: what it kept, by prompt. The tests' scores depend on the prompt alone wherever
  // they check the K/V of shared compacted prompts, so every compaction of a prompt keeps the same.
  void remember_compacted_prompt(const Seq& s) {
    const auto prompt_end =
        std::find_if(s.origin.begin(), s.origin.end(), [&](size_t o) { return o >= s.prompt_size; });
    if (std::any_of(prompt_end, s.origin.end(), [&](size_t o) { return o < s.prompt_size; })) return;
    const std::vector<TokenId> prompt(s.tokens.begin(),
                                      s.tokens.begin() + static_cast<ptrdiff_t>(s.prompt_size));
    const auto kept = static_cast<size_t>(prompt_end - s.origin.begin());
    compacted_prompts_[prompt] = {std::vector<size_t>(s.origin.begin(), prompt_end),
                                  std::vector<uint64_t>(s.kv.begin(), s.kv.begin() + static_cast<ptrdiff_t>(kept))};
  }

  // A tensor where the rank's kernels read or write it: the host vector itself, or (with a
  // device backend) a device buffer copied to or from it.
  class RankBuffer {
   public:
    RankBuffer(Backend* device, size_t floats) : device_(device) {
      if (device_ == nullptr) return;
      auto arena = device_->allocate_arena(std::max<size_t>(floats, 4) * sizeof(float), Tier::kDevice);
      if (arena.ok()) arena_ = std::move(arena).value();
      status_ = arena.status();
    }
    float* data(std::vector<float>& host) {
      return device_ ? reinterpret_cast<float*>(arena_.data()) : host.data();
    }
    Status upload(const std::vector<float>& host) {
      if (device_ == nullptr || !status_.ok()) return status_;
      return device_->upload(arena_.data(), host.data(), host.size() * sizeof(float));
    }
    Status download(std::vector<float>& host) {
      if (device_ == nullptr || !status_.ok()) return status_;
      return device_->download(host.data(), arena_.data(), host.size() * sizeof(float));
    }

   private:
    Backend* device_;
    KvArena arena_;
    Status status_ = ok_status();
  };

  // K and V of cached positions [first, first + n) for the rank's KV heads: [n, local heads,
  // head_dim], from what compute_kv() made them of (`kv`).
  void fill(const std::vector<uint64_t>& kv, size_t first, size_t n, uint32_t layer,
            const RankLayout& l, float* k, float* v) const {
    const uint32_t hd = config_.model.head_dim;
    for (size_t pos = first; pos < first + n; ++pos) {
      const uint64_t h = kv[pos];
      for (uint32_t head = 0; head < l.num_kv_heads; ++head) {
        for (uint32_t d = 0; d < hd; ++d) {
          const size_t at = ((pos - first) * l.num_kv_heads + head) * hd + d;
          k[at] = token_kv(h, layer, l.first_kv_head + head, d, false);
          v[at] = token_kv(h, layer, l.first_kv_head + head, d, true);
        }
      }
    }
  }

  Config config_;
  std::map<SeqId, Seq> seqs_;
  // Running sequences and their lengths (per layer group, or kAllLayers), every replica.
  std::map<std::pair<SeqId, uint32_t>, uint64_t> live_;
  std::map<std::vector<TokenId>, KeptPrompt> compacted_prompts_;
  std::string plan_error_;          // the first table whose computed-token count was wrong
  Backend* device_ = nullptr;       // see use_device_buffers()
};

//! Counts of what a workload did, to check that a run exercised what it claims to.
struct WorkloadCounts {
  uint64_t admitted = 0, refused = 0, forks = 0, cross_replica_forks = 0, appends = 0, frees = 0,
           readmitted = 0, reused_ids = 0;
};

//! A seeded serving load: requests that share one of a few system prompts, long and short
//! prompts, decoding, beam-search forks (some onto other replicas), and frees when a sequence
//! reaches its length. Every rank can run it with its own coordinator and get the same calls.
//! With `reuse_ids` it also plays a careless scheduler: now and then it cancels a request in the
//! step it arrived, gives the id at once to another prompt or to a fork, and retries the
//! cancelled prompt under a new id a few steps later.
class ServingWorkload {
 public:
  ServingWorkload(uint64_t seed, uint32_t num_replicas, bool reuse_ids = false)
      : rng_(seed), replicas_(num_replicas), reuse_ids_(reuse_ids) {
    for (int p = 0; p < 3; ++p) system_prompts_.push_back(random_tokens(40 + 24 * p));
  }

  //! Issues one step's requests, mirroring the accepted ones into `engine`.
  Status issue(Coordinator& c, EngineModel& engine) {
    // Preempted sequences come back as fresh requests with everything they had, in order, as
    // soon as there is room.
    while (!to_readmit_.empty() && admit(c, engine, to_readmit_.front().first, to_readmit_.front().second)) {
      to_readmit_.pop_front();
      ++counts_.readmitted;
    }
    const int arrivals = std::uniform_int_distribution<int>(0, 3)(rng_);
    std::vector<SeqId> arrived;
    ++steps_;
    while (!to_retry_.empty() && to_retry_.front().first <= steps_) {
      admit(c, engine, SeqId{next_seq_++}, to_retry_.front().second);
      to_retry_.pop_front();
    }
    for (int i = 0; i < arrivals; ++i) {
      const SeqId seq{next_seq_++};
      if (admit(c, engine, seq, new_prompt())) arrived.push_back(seq);
    }
    // Beam search: a running sequence spawns a beam, now and then on another replica.
    if (!live_.empty() && coin(0.3)) {
      const SeqId parent = nth_live(pick(live_.size()));
      if (!c.is_swapped(parent)) {
        const SeqId child{next_seq_++};
        std::optional<uint32_t> where;
        if (replicas_ > 1 && coin(0.4)) where = static_cast<uint32_t>(pick(replicas_));
        if (c.fork(parent, child, where).ok()) {
          engine.forked(parent, child);
          live_[child] = live_.at(parent);
          ++counts_.forks;
          if (where && *where != *c.replica_of(parent)) ++counts_.cross_replica_forks;
        }
      }
    }
    // Decode one token for every running sequence; free those that reached their length.
    for (auto it = live_.begin(); it != live_.end();) {
      const SeqId seq = it->first;
      // Swapped sequences wait; preempted ones (by this step's pressure) return with the plan.
      if (c.is_swapped(seq) || !c.replica_of(seq)) {
        ++it;
        continue;
      }
      if (engine.tokens(seq).size() >= it->second) {
        KVF_RETURN_IF_ERROR(c.free(seq));
        engine.freed(seq);
        it = live_.erase(it);
        ++counts_.frees;
        continue;
      }
      const TokenId token = static_cast<TokenId>(splitmix64(seq.value * 1315423911u + engine.tokens(seq).size()) % 32000);
      if (c.append(seq, 1).ok()) {
        engine.appended(seq, std::span(&token, 1));
        ++counts_.appends;
      }
      ++it;
    }
    if (reuse_ids_ && !arrived.empty() && coin(0.7)) {
      KVF_RETURN_IF_ERROR(cancel_and_reuse(c, engine, arrived[pick(arrived.size())]));
    }
    return ok_status();
  }

  //! Admits about half of the requests from now on with `policy` (their ids: compressed()).
  void compress_some(const quant::CompressionPolicy& policy) { compression_ = policy; }
  //! From now on about 40 % of the new requests repeat whole one of the last few new prompts
  //! that arrived at least three steps before (so that a compressed one may be compacted), with
  //! the compression its first request had.
  void repeat_some_prompts() { repeat_prompts_ = true; }
  [[nodiscard]] const std::set<SeqId>& compressed() const { return compressed_; }

  //! Takes in the step's plan, for the workload and the engine: preempted sequences are
  //! re-admitted at the next step.
  void planned(const StepPlan& plan, EngineModel& engine) {
    for (SeqId seq : plan.preempted) {
      const auto it = live_.find(seq);
      if (it == live_.end()) continue;
      to_readmit_.emplace_back(seq, engine.tokens(seq));
      live_.erase(it);
    }
    engine.planned(plan);
  }

  //! Frees every sequence (the end of the run).
  Status drain(Coordinator& c, EngineModel& engine) {
    for (const auto& [seq, target] : live_) {
      KVF_RETURN_IF_ERROR(c.free(seq));
      engine.freed(seq);
    }
    live_.clear();
    to_readmit_.clear();
    return ok_status();
  }

  [[nodiscard]] const WorkloadCounts& counts() const { return counts_; }
  [[nodiscard]] size_t live() const { return live_.size(); }

 private:
  // Mostly a shared system prompt and a suffix; now and then a long prompt.
  std::vector<TokenId> new_prompt() {
    if (repeat_prompts_ && !recent_prompts_.empty() && recent_prompts_.front().first + 3 <= steps_ &&
        coin(0.4)) {
      size_t old_enough = 0;
      while (old_enough < recent_prompts_.size() && recent_prompts_[old_enough].first + 3 <= steps_) {
        ++old_enough;
      }
      return recent_prompts_[pick(old_enough)].second;
    }
    std::vector<TokenId> prompt;
    if (coin(0.7)) prompt = system_prompts_[pick(system_prompts_.size())];
    const size_t suffix = coin(0.15) ? 150 + pick(120) : 4 + pick(40);
    const auto tail = random_tokens(suffix);
    prompt.insert(prompt.end(), tail.begin(), tail.end());
    if (repeat_prompts_) {
      if (recent_prompts_.size() == 6) recent_prompts_.pop_front();
      recent_prompts_.emplace_back(steps_, prompt);
    }
    return prompt;
  }
  // Frees `seq`, admitted in this step, and gives its id at once to a new prompt or to a fork of
  // another running sequence.
  Status cancel_and_reuse(Coordinator& c, EngineModel& engine, SeqId seq) {
    if (live_.count(seq) == 0 || !c.replica_of(seq)) return ok_status();  // preempted meanwhile
    to_retry_.emplace_back(steps_ + 2 + pick(3), engine.tokens(seq));
    KVF_RETURN_IF_ERROR(c.free(seq));
    engine.freed(seq);
    live_.erase(seq);
    ++counts_.frees;
    if (!live_.empty() && coin(0.5)) {
      const SeqId parent = nth_live(pick(live_.size()));
      if (!c.is_swapped(parent) && c.fork(parent, seq).ok()) {
        engine.forked(parent, seq);
        live_[seq] = live_.at(parent);
        ++counts_.forks;
        ++counts_.reused_ids;
      }
      return ok_status();
    }
    if (admit(c, engine, seq, new_prompt())) ++counts_.reused_ids;
    return ok_status();
  }
  bool admit(Coordinator& c, EngineModel& engine, SeqId seq, const std::vector<TokenId>& prompt) {
    AdmitOptions options;
    options.priority = static_cast<uint32_t>(pick(3));
    // A repeated prompt comes with its first request's compression, as identical requests do.
    const bool repeated = repeat_prompts_ && compressed_prompts_.count(prompt) > 0;
    if (compression_ && (repeated || coin(0.5))) options.compression = compression_;
    const auto placed = c.admit(seq, prompt, options);
    if (!placed.ok()) {
      ++counts_.refused;
      return false;
    }
    if (options.compression) compressed_.insert(seq);
    if (options.compression && repeat_prompts_) compressed_prompts_.insert(prompt);
    engine.admitted(seq, prompt, *placed);
    live_[seq] = prompt.size() + 4 + pick(coin(0.2) ? 60 : 16);
    ++counts_.admitted;
    return true;
  }
  std::vector<TokenId> random_tokens(size_t n) {
    std::vector<TokenId> t(n);
    for (auto& x : t) x = static_cast<TokenId>(rng_() % 32000);
    return t;
  }
  size_t pick(size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng_); }
  bool coin(double p) { return std::bernoulli_distribution(p)(rng_); }
  SeqId nth_live(size_t n) const { return std::next(live_.begin(), static_cast<ptrdiff_t>(n))->first; }

  std::mt19937_64 rng_;
  uint32_t replicas_;
  bool reuse_ids_;
  std::vector<std::vector<TokenId>> system_prompts_;
  std::map<SeqId, size_t> live_;  // running or swapped sequences -> their final length
  std::deque<std::pair<SeqId, std::vector<TokenId>>> to_readmit_;
  std::deque<std::pair<uint64_t, std::vector<TokenId>>> to_retry_;  // cancelled prompts, by step due
  uint64_t steps_ = 0;
  uint64_t next_seq_ = 1;
  WorkloadCounts counts_;
  std::optional<quant::CompressionPolicy> compression_;
  std::set<SeqId> compressed_;  // ever admitted with compression_
  bool repeat_prompts_ = false;
  std::set<std::vector<TokenId>> compressed_prompts_;  // with repeat_prompts_
  // repeat_some_prompts()' choices, with the step each arrived in, oldest first
  std::deque<std::pair<uint64_t, std::vector<TokenId>>> recent_prompts_;
};

//! The scripted workload on one rank (dp 1, tp 1) whose KV lives in `backend` and whose blocks
//! travel on `transport`; with `device_buffers` the forward pass hands the rank device tensors
//! (a CUDA rank). After every step every sequence's gathered K/V must be its tokens' K/V; at the
//! end no block is held, and the run must have made forks, copies, swaps and prefix hits.
inline void run_one_rank_workload(Backend& backend, Transport& transport, bool device_buffers) {
  const Config c = serving_config(1, 1, 4, 2, 40, 12);
  auto rank = RankCache::create(c, 0, backend, transport);
  ASSERT_TRUE(rank.ok()) << rank.status();
  auto coordinator = Coordinator::create(c);
  ASSERT_TRUE(coordinator.ok()) << coordinator.status();
  EngineModel engine(c);
  if (device_buffers) engine.use_device_buffers(backend);
  ServingWorkload workload(11, 1);
  uint64_t copies = 0, swap_ins = 0;
  auto run_step = [&](int step) {
    const auto plan = coordinator->step();
    ASSERT_TRUE(plan.ok()) << plan.status();
    copies += plan->count(StepPlan::OpKind::kCopy);
    swap_ins += plan->count(StepPlan::OpKind::kSwapIn);
    const Status executed = (*rank)->execute(*plan);
    ASSERT_TRUE(executed.ok()) << "step " << step << ": " << executed;
    workload.planned(*plan, engine);
    const Status forward = engine.forward(**rank);
    ASSERT_TRUE(forward.ok()) << "step " << step << ": " << forward;
    ASSERT_TRUE(engine.verify(**rank)) << "step " << step;
  };
  for (int step = 0; step < 120; ++step) {
    ASSERT_TRUE(workload.issue(*coordinator, engine).ok());
    ASSERT_NO_FATAL_FAILURE(run_step(step));
  }
  ASSERT_TRUE(workload.drain(*coordinator, engine).ok());
  ASSERT_NO_FATAL_FAILURE(run_step(120));

  EXPECT_TRUE((*rank)->tables().empty());
  EXPECT_TRUE(coordinator->verify_integrity().ok()) << coordinator->verify_integrity();
  const ReplicaStats pools = coordinator->replica_stats(0);
  EXPECT_EQ(pools.used_blocks, 0u);
  EXPECT_EQ(pools.free_blocks + pools.cached_blocks, pools.device_blocks);
  EXPECT_EQ(coordinator->host_free_blocks(0), c.cache.host_num_blocks);
  EXPECT_GT(workload.counts().forks, 0u);
  EXPECT_GT(copies, 0u);
  EXPECT_GT(swap_ins, 0u);
  EXPECT_GT(coordinator->stats().local_hit_tokens, 0u);
}

}  // namespace kvfabric::testing
