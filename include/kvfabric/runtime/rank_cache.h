// One rank's KV cache: its shard of every layer's KV heads, and the executor of step plans.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <vector>
#include <span>

#include "kvfabric/backend/backend.h"
#include "kvfabric/backend/kv_storage.h"
#include "kvfabric/config/config.h"
#include "kvfabric/plan/step_plan.h"
#include "kvfabric/transport/transport.h"

namespace kvfabric {

//! \brief Where a rank sits in a dp x tp job (DESIGN.md §2): rank r is shard r % tp of replica
//! r / tp and holds KV heads [first_kv_head, first_kv_head + num_kv_heads) of every layer and the
//! query heads that attend to them. With fewer KV heads than shards (Hkv < tp) each KV head is
//! replicated on tp / Hkv consecutive shards.
struct RankLayout {
  uint32_t rank = 0;
  uint32_t world_size = 1;
  uint32_t tp = 1;
  uint32_t dp = 1;
  uint32_t replica = 0;
  uint32_t shard = 0;
  uint32_t first_kv_head = 0;
  uint32_t num_kv_heads = 0;
  uint32_t first_q_head = 0;
  uint32_t num_q_heads = 0;

  //! The rank holding shard `shard` of `replica`.
  [[nodiscard]] uint32_t rank_of(uint32_t replica_id, uint32_t shard_id) const {
    return replica_id * tp + shard_id;
  }
};

//! The layout of `rank` in the topology of `config`; InvalidArgument past the world size.
Result<RankLayout> rank_layout(const Config& config, uint32_t rank);

//! What a rank's plan executor has done, in blocks (each block: every layer of the rank's heads).
//! What a rank has done, counted since it started. (The fields travel between ranks in this
//! order: see RankCache::report.)
struct RankCacheStats {
  uint64_t steps = 0;
  uint64_t waves = 0;
  uint64_t swapped_out_blocks = 0;
  uint64_t swapped_in_blocks = 0;
  uint64_t migrated_blocks_sent = 0;
  uint64_t migrated_blocks_received = 0;
  uint64_t token_copies = 0;
  //! Waves whose block transfer ran while the same wave's swaps or copies were queued on the
  //! backend (concurrent on backends that queue work, such as CUDA).
  uint64_t overlapped_waves = 0;
  //! Attention scores (one f32 per token) this rank sent with its reports for the plans' score
  //! requests (token compression).
  uint64_t scores_sent = 0;
};

//! A sequence's attention scores summed over the shards of its replica, in shard order (what
//! the root of execute_agreed() gathered for a plan's score request).
struct ReplicaScores {
  SeqId seq;
  uint32_t replica = 0;
  std::vector<double> scores;  //!< per token, as long as the shortest shard's
};

//! Which view of the device pool a forward-pass call reads: whole blocks (every layer,
//! block_size tokens), or the layer group of the call's layer (PyramidKV's per-group tables).
enum class BlockView : uint8_t {
  kWhole,
  kLayerGroup,
};

//! \brief A rank's arenas (its KV-head shard of every layer, device and host tier) and the
//! executor of the coordinator's step plans. A serving engine's TP worker owns one and calls
//! append_kv / attention from its forward pass.
//!
//! execute() checks the plan's step number and validates every op against this rank's pools
//! (nothing runs when one is wrong), then runs the plan wave by wave (plan_waves()) and records
//! the block tables. The ops of one wave touch disjoint blocks, so each wave queues its swap-outs,
//! swap-ins and copies on the backend and then runs its migrations (shard s of one replica to
//! shard s of another, through the transport, one batch per peer): on a backend that queues work
//! (CUDA) the swaps run while the transfer is in flight. The backend is synchronized only before
//! a wave whose migrations follow queued work, and at the end of the plan. Not thread-safe;
//! `backend` and `transport` must outlive it.
//!
//! With cache.layers_per_group set (it must divide the model's layers), the device pool is also
//! seen per layer group (layer_group_view()): the plans' tables, copies and compactions of a
//! sequence compacted per layer group (PyramidKV) address those views, and the forward pass
//! reads them with BlockView::kLayerGroup.
class RankCache {
 public:
  static Result<std::unique_ptr<RankCache>> create(const Config& config, uint32_t rank,
                                                   Backend& backend, Transport& transport);

  [[nodiscard]] const RankLayout& layout() const { return layout_; }
  [[nodiscard]] const KvStorage& storage() const { return storage_; }
  [[nodiscard]] const PagedKvView& device_pool() const { return storage_.view(0, Tier::kDevice); }
  [[nodiscard]] const PagedKvView& host_pool() const { return storage_.view(0, Tier::kHost); }
  //! Layer groups of the device pool's per-group views (0: none, cache.layers_per_group unset).
  [[nodiscard]] uint32_t num_layer_groups() const {
    return static_cast<uint32_t>(group_views_.size());
  }
  //! Layer group `group`'s view of the device pool (group < num_layer_groups()).
  [[nodiscard]] const PagedKvView& group_pool(uint32_t group) const {
    return group_views_.at(group);
  }
  [[nodiscard]] const RankCacheStats& stats() const { return stats_; }
  //! On the root of execute_agreed(): every rank's stats as each reported them after the last
  //! plan it executed, in rank order (empty before the first plan).
  [[nodiscard]] const std::vector<RankCacheStats>& job_stats() const { return job_stats_; }
  //! The step number the next plan must carry.
  [[nodiscard]] uint64_t next_step() const { return next_step_; }

  Status execute(const StepPlan& plan);
  //! The checks execute() makes before anything runs: the step number, and every op against this
  //! rank's pools. The error names this rank, the step and the op.
  [[nodiscard]] Status validate(const StepPlan& plan) const;
  //! Collective: receives the plan broadcast by `root` (whose `plan_bytes` hold it) and executes
  //! it. The ranks agree first: when any rank refuses the plan (a wrong step number, an invalid
  //! op, unreadable bytes), none executes it and every rank's error names the refusing ranks and
  //! the steps they expect. Then every rank reports to `root`, which returns OK only when every
  //! rank executed the plan, and otherwise an error naming the ranks that failed and why. The
  //! waits are bounded by the transport's timeout (a rank that does not answer is named).
  Status receive_and_execute(std::vector<uint8_t>& plan_bytes, RankId root);
  //! The second half of receive_and_execute(), for callers that broadcast the plan themselves:
  //! collective, every rank passes the bytes `root` sent. When every rank executed the plan,
  //! `executed` (if given) receives it, parsed, for what the caller runs after it.
  Status execute_agreed(std::span<const uint8_t> plan_bytes, RankId root,
                        StepPlan* executed = nullptr);

  //! Token compression: adds this shard's attention mass of `seq` per slot (cache position; its
  //! query heads, summed over whatever layers the engine counts; DecodeAttentionArgs::
  //! attention_mass gives it per layer) to the sequence's scores, from slot 0. The scores
  //! follow the plans' compactions (renumbered) and go when the sequence leaves this replica. A
  //! plan's score request sends them to the root with this rank's report (execute_agreed()),
  //! which sums the shards. InvalidArgument (nothing changes): a sequence this replica does not hold, more
  //! values than its tokens, a value that is negative or not finite.
  Status accumulate_attention(SeqId seq, std::span<const float> mass);
  //! The accumulated scores of `seq` (empty when none).
  [[nodiscard]] std::span<const double> attention_scores(SeqId seq) const;
  //! On the root of execute_agreed(): the scores the last plan's score requests gathered,
  //! summed over each replica's shards, in request order (a sequence no shard has scored yet
  //! is left out).
  [[nodiscard]] const std::vector<ReplicaScores>& reported_scores() const {
    return reported_scores_;
  }

  //! The block tables of this replica's sequences as of the last executed plan (whole: the
  //! plans' changes applied, first_block 0), but for those compacted per layer group.
  [[nodiscard]] const std::map<SeqId, StepPlan::Table>& tables() const { return tables_; }
  //! The tables of this replica's sequences compacted per layer group: one per group, in group
  //! order, read through group_pool(g) (BlockView::kLayerGroup).
  [[nodiscard]] const std::map<SeqId, std::vector<StepPlan::Table>>& group_tables() const {
    return group_tables_;
  }
  //! A digest of tables() and group_tables(): equal on every shard of a replica that executed
  //! the same plans.
  [[nodiscard]] uint64_t tables_digest() const;

  // The forward pass: `layer` is the model layer; tensors hold this rank's heads only. Block
  // tables and slots address `view`: a batch mixing sequences compacted per layer group with
  // whole ones calls once per view.
  Status append_kv(uint32_t layer, AppendKvArgs args, BlockView view = BlockView::kWhole);
  Status gather_kv(uint32_t layer, GatherKvArgs args, BlockView view = BlockView::kWhole);
  Status decode_attention(uint32_t layer, DecodeAttentionArgs args,
                          BlockView view = BlockView::kWhole);
  Status prefill_attention(uint32_t layer, PrefillAttentionArgs args,
                           BlockView view = BlockView::kWhole);

 private:
  RankCache(const RankLayout& layout, KvStorage storage, std::vector<PagedKvView> group_views,
            Backend& backend, Transport& transport)
      : layout_(layout),
        storage_(std::move(storage)),
        group_views_(std::move(group_views)),
        backend_(&backend),
        transport_(&transport) {}

  Status run(const StepPlan& plan);  // executes a validated plan
  [[nodiscard]] Status validate_copy(const StepPlan::Op& op) const;
  [[nodiscard]] Status validate_tables(const StepPlan& plan) const;
  //! A table of this replica: blocks of the pool, no block twice in what it lists, enough
  //! blocks for its tokens, no more computed tokens than tokens.
  //! `kept`: the blocks it keeps of the table held (those before first_block).
  [[nodiscard]] Status validate_own_table(const StepPlan::Table& table, std::span<const BlockId> kept,
                                          const std::function<Status(const std::string&)>& bad) const;
  //! No block in two of a grouped sequence's tables once the plan's `tables` of it apply.
  [[nodiscard]] Status validate_group_blocks(
      SeqId seq, std::span<const StepPlan::Table* const> tables,
      const std::function<const std::vector<BlockId>*(SeqId, uint32_t)>& held_table,
      const std::function<Status(const std::string&)>& bad) const;
  [[nodiscard]] Status validate_compression(const StepPlan& plan) const;
  //! The device view of a plan's layer group (kAllLayers: the whole pool).
  [[nodiscard]] const PagedKvView& device_view(uint32_t layer_group) const;
  void apply_tables(const StepPlan& plan);
  //! Every rank's verdict on a plan (the step it expects << 1 | refused), known to all.
  Result<std::vector<uint64_t>> agree(const Status& verdict, RankId root);
  //! Gathers every rank's outcome of `plan` on `root` (and the scores it requests); there, the
  //! step's overall outcome.
  Status report(const Status& ran, RankId root, const StepPlan& plan);
  //! This rank's scores for the plan's requests on its replica: [seq][count][count x f32] each.
  //! (Counted in stats().scores_sent.)
  std::vector<uint8_t> requested_scores(const StepPlan& plan);
  //! On the root: the shards' scores summed per request from every rank's `payloads`; an error
  //! names a rank whose payload does not match the requests.
  Status sum_reported_scores(const StepPlan& plan,
                             const std::vector<std::span<const uint8_t>>& payloads);
  //! Renumbers the scores of the plan's compactions on this replica, drops those of sequences
  //! that left it.
  void follow_scores(const StepPlan& plan);
  // Runs a backend call on the pool of `layer`'s group (or layer group view) with the layer
  // index inside the group.
  template <typename Args>
  Status on_layer(uint32_t layer, Args args, BlockView view,
                  Status (Backend::*op)(const PagedKvView&, const Args&));
  Status run_wave(std::span<const StepPlan::Op> wave);
  //! A wave's copies, in plan order, each between the views its op names.
  Status run_copies(std::span<const StepPlan::Op> copies);
  Status run_migrations(std::span<const StepPlan::Op> migrations);
  std::string where() const;

  RankLayout layout_;
  KvStorage storage_;
  std::vector<PagedKvView> group_views_;  // the device pool per layer group (PyramidKV)
  Backend* backend_;
  Transport* transport_;
  uint64_t next_step_ = 0;
  bool backend_work_queued_ = false;  // swaps or copies queued since the last synchronize()
  RankCacheStats stats_;
  std::vector<RankCacheStats> job_stats_;  // the root's view of every rank (report())
  std::map<SeqId, StepPlan::Table> tables_;
  std::map<SeqId, std::vector<StepPlan::Table>> group_tables_;
  std::map<SeqId, std::vector<double>> scores_;   // accumulate_attention()
  std::vector<ReplicaScores> reported_scores_;    // the root's, of the last plan
};

}  // namespace kvfabric
