#include "kvfabric/runtime/rank_cache.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <set>
#include <sstream>
#include <string>

#include "common/log.h"

namespace kvfabric {
namespace {

// "S7's table" or "S7's table of layer group 2", for refusals.
std::string table_name(const StepPlan::Table& t) {
  return to_string(t.seq) + "'s table" +
         (t.layer_group == StepPlan::kAllLayers ? std::string()
                                                : " of layer group " + std::to_string(t.layer_group));
}

std::span<const uint8_t> as_bytes(const uint64_t& value) {
  return {reinterpret_cast<const uint8_t*>(&value), sizeof(value)};
}

}  // namespace

Result<RankLayout> rank_layout(const Config& config, uint32_t rank) {
  KVF_RETURN_IF_ERROR(validate(config));
  const TopologyConfig& t = config.topology;
  RankLayout l;
  l.rank = rank;
  l.tp = t.tp;
  l.dp = t.dp;
  l.world_size = t.tp * t.dp;
  if (rank >= l.world_size) {
    return invalid_argument("rank " + std::to_string(rank) + " is outside the world of " +
                            std::to_string(l.world_size) + " ranks (dp " + std::to_string(t.dp) +
                            " x tp " + std::to_string(t.tp) + ")");
  }
  l.replica = rank / t.tp;
  l.shard = rank % t.tp;
  const uint32_t hkv = config.model.num_kv_heads;
  l.num_kv_heads = local_kv_heads(config.model, t);
  l.first_kv_head = hkv >= t.tp ? l.shard * l.num_kv_heads : l.shard / (t.tp / hkv);
  l.num_q_heads = config.model.num_query_heads / t.tp;
  l.first_q_head = l.shard * l.num_q_heads;
  return l;
}

Result<std::unique_ptr<RankCache>> RankCache::create(const Config& config, uint32_t rank,
                                                     Backend& backend, Transport& transport) {
  KVF_ASSIGN_OR_RETURN(const RankLayout layout, rank_layout(config, rank));
  if (transport.world_size() != static_cast<int>(layout.world_size) ||
      transport.rank().value != static_cast<int32_t>(rank)) {
    return invalid_argument("rank " + std::to_string(rank) + " of a " +
                            std::to_string(layout.world_size) + "-rank topology runs on " +
                            std::string(transport.name()) + " rank " +
                            std::to_string(transport.rank().value) + " of " +
                            std::to_string(transport.world_size()));
  }
  // One pool of whole blocks; layer groups are views of it, not pools of their own (their
  // blocks come from the coordinator's one allocator per replica).
  Config whole = config;
  whole.cache.layers_per_group = 0;
  KVF_ASSIGN_OR_RETURN(const KvStorageSpec spec, KvStorageSpec::from_config(whole));
  KVF_ASSIGN_OR_RETURN(KvStorage storage, KvStorage::create(backend, spec));
  std::vector<PagedKvView> group_views;
  const PagedKvView& pool = storage.view(0, Tier::kDevice);
  for (uint32_t g = 0; g < kvfabric::num_layer_groups(config); ++g) {
    KVF_ASSIGN_OR_RETURN(PagedKvView view,
                         layer_group_view(pool, config.cache.layers_per_group, g));
    group_views.push_back(view);
  }
  return std::unique_ptr<RankCache>(
      new RankCache(layout, std::move(storage), std::move(group_views), backend, transport));
}

std::string RankCache::where() const {
  return "rank " + std::to_string(layout_.rank) + " (replica " + std::to_string(layout_.replica) +
         ", shard " + std::to_string(layout_.shard) + ")";
}

Status RankCache::validate(const StepPlan& plan) const {
  if (plan.step != next_step_) {
    return invalid_operation(where() + " received the plan of step " + std::to_string(plan.step) +
                             " but expects step " + std::to_string(next_step_));
  }
  const uint64_t device_blocks = device_pool().num_blocks, host_blocks = host_pool().num_blocks;
  auto bad = [&](size_t index, const std::string& what) {
    return invalid_argument(where() + ", step " + std::to_string(plan.step) + ", op " +
                            std::to_string(index) + ": " + what);
  };
  auto in_pool = [](BlockId b, uint64_t blocks) { return b.value < blocks; };
  for (size_t i = 0; i < plan.ops.size(); ++i) {
    const StepPlan::Op& op = plan.ops[i];
    // What deserialize() refuses, for plans built in memory too: a swap naming another replica
    // would be put in the wave of the wrong writer.
    if (const std::string problem = StepPlan::op_problem(op); !problem.empty()) {
      return bad(i, problem);
    }
    if (op.replica >= layout_.dp || op.dst_replica >= layout_.dp) {
      return bad(i, "replica " + std::to_string(std::max(op.replica, op.dst_replica)) + " of " +
                        std::to_string(layout_.dp));
    }
    const std::string blocks = to_string(op.src) + " -> " + to_string(op.dst);
    switch (op.kind) {
      case StepPlan::OpKind::kSwapOut:
      case StepPlan::OpKind::kSwapIn: {
        const bool out = op.kind == StepPlan::OpKind::kSwapOut;
        if (!in_pool(out ? op.src : op.dst, device_blocks) || !in_pool(out ? op.dst : op.src, host_blocks)) {
          return bad(i, std::string(out ? "swap-out " : "swap-in ") + blocks + " is outside the pools (" +
                            std::to_string(device_blocks) + " device, " + std::to_string(host_blocks) +
                            " host blocks)");
        }
        break;
      }
      case StepPlan::OpKind::kMigrate:
        if (op.replica == op.dst_replica) return bad(i, "migration within replica " + std::to_string(op.replica));
        if (!in_pool(op.src, device_blocks) || !in_pool(op.dst, device_blocks)) {
          return bad(i, "migration " + blocks + " is outside the pool of " + std::to_string(device_blocks) + " blocks");
        }
        break;
      case StepPlan::OpKind::kCopy: {
        const Status copy = validate_copy(op);
        if (!copy.ok()) return bad(i, copy.message());
        break;
      }
    }
  }
  KVF_RETURN_IF_ERROR(validate_tables(plan));
  return validate_compression(plan);
}

Status RankCache::validate_copy(const StepPlan::Op& op) const {
  const auto group_name = [](uint32_t g) {
    return g == StepPlan::kAllLayers ? std::string("whole blocks")
                                     : "layer group " + std::to_string(g);
  };
  for (const auto& [g, side] : {std::pair{op.from_group, "from"}, std::pair{op.to_group, "into"}}) {
    if (g != StepPlan::kAllLayers && g >= num_layer_groups()) {
      return invalid_argument("copy " + std::string(side) + " " + group_name(g) + " of " +
                              std::to_string(num_layer_groups()) +
                              " (cache.layers_per_group sets the groups)");
    }
  }
  const TokenCopy& c = op.copy;  // a copy between two groups' views: StepPlan::op_problem
  if (op.from_group != op.to_group && c.src_block == c.dst_block) {
    std::ostringstream text;
    text << "regrouping copy " << c << " into " << group_name(op.to_group)
         << " reads and writes one block, whose rows the two views place differently";
    return invalid_argument(text.str());
  }
  const PagedKvView& from = device_view(op.from_group);
  const PagedKvView& to = device_view(op.to_group);
  if (c.src_block.value >= from.num_blocks || c.dst_block.value >= to.num_blocks ||
      c.src_offset > from.block_size || c.num_tokens > from.block_size - c.src_offset ||
      c.dst_offset > to.block_size || c.num_tokens > to.block_size - c.dst_offset) {
    std::ostringstream text;
    text << "copy " << c;
    if (op.from_group == StepPlan::kAllLayers && op.to_group == StepPlan::kAllLayers) {
      text << " does not fit the pool (" << to.num_blocks << " blocks of " << to.block_size
           << " tokens)";
    } else {
      text << " from " << group_name(op.from_group) << " into " << group_name(op.to_group)
           << " does not fit the pool (" << to.num_blocks << " blocks; " << from.block_size
           << " tokens in a block of the source's view, " << to.block_size
           << " in the destination's)";
    }
    return invalid_argument(text.str());
  }
  return ok_status();
}

const PagedKvView& RankCache::device_view(uint32_t layer_group) const {
  return layer_group == StepPlan::kAllLayers ? device_pool() : group_views_.at(layer_group);
}

// A table this replica keeps must mean blocks of its pool holding its tokens: engines read slots
// off it (block_table()), so a table naming no such blocks is refused rather than recorded.
Status RankCache::validate_own_table(const StepPlan::Table& t, std::span<const BlockId> kept,
                                     const std::function<Status(const std::string&)>& bad) const {
  const auto name = [&] { return table_name(t); };  // built only for a refusal: every step runs this
  const PagedKvView& view = device_view(t.layer_group);
  for (const BlockId b : t.blocks) {
    if (b.value >= view.num_blocks) {
      return bad(name() + " names " + to_string(b) + ", outside this rank's pool of " +
                 std::to_string(view.num_blocks) + " blocks");
    }
  }
  if (t.computed_tokens > t.num_tokens) {
    return bad(name() + " has " + std::to_string(t.computed_tokens) + " computed of " +
               std::to_string(t.num_tokens) + " tokens");
  }
  const uint64_t blocks = uint64_t{t.first_block} + t.blocks.size();
  if (t.num_tokens > blocks * view.block_size) {
    return bad(name() + " holds " + std::to_string(t.num_tokens) + " tokens in " +
               std::to_string(blocks) + " blocks of " + std::to_string(view.block_size));
  }
  std::vector<BlockId> listed(t.blocks.begin(), t.blocks.end());
  std::sort(listed.begin(), listed.end());
  if (const auto twice = std::adjacent_find(listed.begin(), listed.end()); twice != listed.end()) {
    return bad(name() + " names " + to_string(*twice) + " twice");
  }
  if (!listed.empty()) {  // the blocks it keeps (before first_block) and the new ones
    for (const BlockId b : kept) {
      if (std::binary_search(listed.begin(), listed.end(), b)) {
        return bad(name() + " keeps " + to_string(b) + " and lists it again");
      }
    }
  }
  return ok_status();
}

Status RankCache::validate_group_blocks(
    SeqId seq, std::span<const StepPlan::Table* const> tables,
    const std::function<const std::vector<BlockId>*(SeqId, uint32_t)>& held_table,
    const std::function<Status(const std::string&)>& bad) const {
  std::vector<std::pair<BlockId, uint32_t>> blocks;  // every group's table after the plan
  for (uint32_t g = 0; g < num_layer_groups(); ++g) {
    const auto listed = std::find_if(tables.begin(), tables.end(),
                                     [&](const StepPlan::Table* t) { return t->layer_group == g; });
    const std::vector<BlockId>* held = held_table(seq, g);
    const size_t kept = listed != tables.end() ? (*listed)->first_block : (held ? held->size() : 0);
    for (size_t i = 0; i < kept && held != nullptr; ++i) blocks.emplace_back((*held)[i], g);
    if (listed != tables.end()) {
      for (const BlockId b : (*listed)->blocks) blocks.emplace_back(b, g);
    }
  }
  std::sort(blocks.begin(), blocks.end());
  for (size_t i = 1; i < blocks.size(); ++i) {
    if (blocks[i].first == blocks[i - 1].first) {
      return bad(to_string(seq) + "'s tables of layer groups " + std::to_string(blocks[i - 1].second) +
                 " and " + std::to_string(blocks[i].second) + " both hold " +
                 to_string(blocks[i].first));
    }
  }
  return ok_status();
}

Status RankCache::validate_tables(const StepPlan& plan) const {
  const auto bad = [&](const std::string& what) {
    return invalid_argument(where() + ", step " + std::to_string(plan.step) + ": " + what);
  };
  const auto name = table_name;
  const std::set<SeqId> released(plan.released.begin(), plan.released.end());
  // A preempted sequence is dropped: the coordinator lists it released too. Kept, its table would
  // point at blocks the engine is told to recompute into.
  for (const SeqId seq : plan.preempted) {
    if (released.count(seq) == 0) {
      return bad(to_string(seq) + " is preempted but not released");
    }
  }
  // The table this replica holds for (seq, group), unless the plan releases it first.
  const auto held_table = [&](SeqId seq, uint32_t group) -> const std::vector<BlockId>* {
    if (released.count(seq) != 0) return nullptr;
    if (group != StepPlan::kAllLayers) {
      const auto held = group_tables_.find(seq);
      return held == group_tables_.end() ? nullptr : &held->second[group].blocks;
    }
    const auto held = tables_.find(seq);
    return held == tables_.end() ? nullptr : &held->second.blocks;
  };
  // Per sequence: the replica of its first table, whether they are per group, and their groups.
  struct Listed {
    uint32_t replica = 0;
    bool grouped = false;
    std::set<uint32_t> groups;
    bool continues = false;  // some table of it continues a held one
    bool adds_blocks = false;  // some table of it lists blocks
    std::vector<const StepPlan::Table*> tables;
  };
  std::map<SeqId, Listed> listed;
  for (const auto& t : plan.tables) {
    if (t.replica >= layout_.dp) {
      return bad(name(t) + " on replica " + std::to_string(t.replica) + " of " +
                 std::to_string(layout_.dp));
    }
    const bool grouped = t.layer_group != StepPlan::kAllLayers;
    if (grouped && t.layer_group >= num_layer_groups()) {
      return bad(name(t) + ": this rank's pool has " + std::to_string(num_layer_groups()) +
                 " layer groups (cache.layers_per_group sets them)");
    }
    const auto [it, first] = listed.try_emplace(t.seq, Listed{t.replica, grouped, {}, false, false, {}});
    Listed& l = it->second;
    if (!first && (l.grouped != grouped || l.replica != t.replica)) {
      return bad("the plan lists " + to_string(t.seq) +
                 "'s tables on two replicas or both whole and per layer group");
    }
    if (!l.groups.insert(t.layer_group).second) return bad("the plan lists " + name(t) + " twice");
    if (t.replica != layout_.replica) continue;
    l.tables.push_back(&t);
    l.adds_blocks |= !t.blocks.empty();
    // A change continues the table this replica holds (released ones are gone by then).
    const std::vector<BlockId>* held = t.first_block == 0 ? nullptr : held_table(t.seq, t.layer_group);
    if (t.first_block > 0) {
      l.continues = true;
      const size_t blocks = held == nullptr ? 0 : held->size();
      if (t.first_block > blocks) {
        return bad("the table of " + to_string(t.seq) +
                   (grouped ? " in layer group " + std::to_string(t.layer_group) : std::string()) +
                   " continues from block " + std::to_string(t.first_block) +
                   " but this replica holds " + std::to_string(blocks));
      }
    }
    const std::span<const BlockId> kept =
        held == nullptr ? std::span<const BlockId>{} : std::span(*held).first(t.first_block);
    KVF_RETURN_IF_ERROR(validate_own_table(t, kept, bad));
  }
  // A sequence that becomes one compacted per layer group here comes with every group's table.
  for (const auto& [seq, l] : listed) {
    if (!l.grouped || l.replica != layout_.replica) continue;
    const bool held = group_tables_.count(seq) != 0 && released.count(seq) == 0;
    if (!held && (l.groups.size() != num_layer_groups() || l.continues)) {
      return bad(to_string(seq) + " becomes compacted per layer group on replica " +
                 std::to_string(l.replica) + " with " + std::to_string(l.groups.size()) +
                 " tables; it needs all " + std::to_string(num_layer_groups()) + ", whole");
    }
    // A group's view of a block spans the block's whole bytes: no block serves two groups.
    if (l.adds_blocks) KVF_RETURN_IF_ERROR(validate_group_blocks(seq, l.tables, held_table, bad));
  }
  return ok_status();
}

Status RankCache::validate_compression(const StepPlan& plan) const {
  const auto bad = [&](const std::string& what) {
    return invalid_argument(where() + ", step " + std::to_string(plan.step) + ": " + what);
  };
  // The plan's tables by (sequence, layer group), the first listed first: a compaction finds
  // its table in O(log tables), however many compactions a step has.
  const auto key = [](const StepPlan::Table& t) { return std::pair(t.seq, t.layer_group); };
  std::vector<const StepPlan::Table*> by_key;
  if (!plan.compactions.empty()) {
    by_key.reserve(plan.tables.size());
    for (const auto& t : plan.tables) by_key.push_back(&t);
    std::stable_sort(by_key.begin(), by_key.end(),
                     [&](const auto* a, const auto* b) { return key(*a) < key(*b); });
  }
  std::set<std::pair<SeqId, uint32_t>> compacted;
  for (const auto& c : plan.compactions) {
    if (c.replica >= layout_.dp) {
      return bad("compaction of " + to_string(c.seq) + " on replica " +
                 std::to_string(c.replica) + " of " + std::to_string(layout_.dp));
    }
    if (const std::string problem = StepPlan::compaction_problem(c); !problem.empty()) {
      return bad(problem);
    }
    // A second one would renumber the sequence's scores twice.
    if (!compacted.emplace(c.seq, c.layer_group).second) {
      return bad("the plan compacts " + to_string(c.seq) +
                 (c.layer_group == StepPlan::kAllLayers
                      ? std::string()
                      : " in layer group " + std::to_string(c.layer_group)) +
                 " twice");
    }
    // Its table (of its layer group), listed in the same plan, holds what it keeps.
    const auto wanted = std::pair(c.seq, c.layer_group);
    const auto found = std::lower_bound(
        by_key.begin(), by_key.end(), wanted,
        [&](const StepPlan::Table* t, const auto& k) { return key(*t) < k; });
    const StepPlan::Table* table =
        found == by_key.end() || key(**found) != wanted ? nullptr : *found;
    if (table == nullptr || table->replica != c.replica ||
        table->num_tokens != c.tokens_after()) {
      return bad("compaction of " + to_string(c.seq) +
                 (c.layer_group == StepPlan::kAllLayers
                      ? std::string()
                      : " in layer group " + std::to_string(c.layer_group)) +
                 " keeps " + std::to_string(c.tokens_after()) + " tokens on replica " +
                 std::to_string(c.replica) + " but the plan lists no table of that length there");
    }
  }
  for (const auto& request : plan.score_requests) {
    if (request.replica >= layout_.dp) {
      return bad("score request of " + to_string(request.seq) + " on replica " +
                 std::to_string(request.replica) + " of " + std::to_string(layout_.dp));
    }
  }
  return ok_status();
}

Status RankCache::accumulate_attention(SeqId seq, std::span<const float> mass) {
  const auto table = tables_.find(seq);
  if (table == tables_.end()) {
    return invalid_argument(where() + ": attention of " + to_string(seq) +
                            (group_tables_.count(seq) != 0
                                 ? ", which is compacted per layer group: its tokens have no "
                                   "one slot order to score"
                                 : ", which this replica does not hold"));
  }
  if (mass.size() > table->second.num_tokens) {
    return invalid_argument(where() + ": attention over " + std::to_string(mass.size()) +
                            " tokens of " + to_string(seq) + ", which holds " +
                            std::to_string(table->second.num_tokens));
  }
  for (size_t i = 0; i < mass.size(); ++i) {
    if (!(std::isfinite(mass[i]) && mass[i] >= 0.0f)) {
      return invalid_argument(where() + ": attention of " + to_string(seq) + " at token " +
                              std::to_string(i) + " is " + std::to_string(mass[i]) +
                              "; mass must be finite and >= 0");
    }
  }
  std::vector<double>& scores = scores_[seq];
  if (scores.size() < mass.size()) scores.resize(mass.size(), 0.0);
  for (size_t i = 0; i < mass.size(); ++i) scores[i] += mass[i];
  return ok_status();
}

std::span<const double> RankCache::attention_scores(SeqId seq) const {
  const auto it = scores_.find(seq);
  if (it == scores_.end()) return {};
  return it->second;
}

void RankCache::follow_scores(const StepPlan& plan) {
  if (scores_.empty()) return;  // nothing scored on this rank: nothing to renumber or drop
  for (SeqId seq : plan.released) scores_.erase(seq);
  for (const auto& t : plan.tables) {
    // Scores number whole-block slots: a sequence now kept per layer group starts none.
    if (t.replica != layout_.replica || t.layer_group != StepPlan::kAllLayers) {
      scores_.erase(t.seq);
    }
  }
  for (const auto& c : plan.compactions) {
    const auto it = scores_.find(c.seq);
    if (c.replica != layout_.replica || c.layer_group != StepPlan::kAllLayers ||
        it == scores_.end()) {
      continue;
    }
    const std::vector<double>& before = it->second;
    // The scores cover the leading slots; they end at the first kept token they do not cover.
    std::vector<double> after;
    after.reserve(std::min<uint64_t>(before.size(), c.tokens_after()));
    for (const auto& range : c.kept) {
      const uint64_t covered_end = std::min<uint64_t>(range.first + range.count, before.size());
      for (uint64_t i = range.first; i < covered_end; ++i) after.push_back(before[i]);
      if (covered_end < range.first + range.count) break;
    }
    it->second = std::move(after);
  }
}

Status RankCache::run_migrations(std::span<const StepPlan::Op> migrations) {
  // One batch per peer and direction, blocks in plan order on both sides.
  std::map<uint32_t, std::vector<uint8_t*>> sends, recvs;
  for (const auto& m : migrations) {
    if (m.replica == layout_.replica) {
      sends[layout_.rank_of(m.dst_replica, layout_.shard)].push_back(device_pool().block(m.src.value));
    }
    if (m.dst_replica == layout_.replica) {
      recvs[layout_.rank_of(m.replica, layout_.shard)].push_back(device_pool().block(m.dst.value));
    }
  }
  std::vector<BlockBatch> send_batches, recv_batches;
  uint64_t sent = 0, received = 0;
  for (const auto& [peer, blocks] : sends) {
    send_batches.push_back({RankId{static_cast<int32_t>(peer)}, blocks, device_pool().block_bytes});
    sent += blocks.size();
  }
  for (const auto& [peer, blocks] : recvs) {
    recv_batches.push_back({RankId{static_cast<int32_t>(peer)}, blocks, device_pool().block_bytes});
    received += blocks.size();
  }
  KVF_RETURN_IF_ERROR(transport_->exchange_blocks(send_batches, recv_batches));
  stats_.migrated_blocks_sent += sent;
  stats_.migrated_blocks_received += received;
  return ok_status();
}

Status RankCache::run_copies(std::span<const StepPlan::Op> copies) {
  // In plan order: one batch entry per run of copies between the same two views.
  std::vector<TokenCopy> token_copies;
  token_copies.reserve(copies.size());
  for (const StepPlan::Op& op : copies) token_copies.push_back(op.copy);
  std::vector<GroupTokenCopies> batch;
  size_t first = 0;
  for (size_t i = 1; i <= copies.size(); ++i) {
    const bool run_ends = i == copies.size() || copies[i].from_group != copies[first].from_group ||
                          copies[i].to_group != copies[first].to_group;
    if (!run_ends) continue;
    const PagedKvView& to = device_view(copies[first].to_group);
    const PagedKvView& from = device_view(copies[first].from_group);
    batch.push_back({to, std::span(token_copies).subspan(first, i - first),
                     &from == &to ? PagedKvView{} : from});
    first = i;
  }
  return backend_->compact_tokens(batch);
}

Status RankCache::run_wave(std::span<const StepPlan::Op> wave) {
  const uint32_t me = layout_.replica;
  std::vector<BlockMove> out, in;
  std::vector<StepPlan::Op> migrations;
  std::vector<StepPlan::Op> copies;
  for (const StepPlan::Op& op : wave) {
    const bool mine = op.replica == me;
    switch (op.kind) {
      case StepPlan::OpKind::kSwapOut:
        if (mine) out.push_back({op.src.value, op.dst.value});
        break;
      case StepPlan::OpKind::kSwapIn:
        if (mine) in.push_back({op.src.value, op.dst.value});
        break;
      case StepPlan::OpKind::kMigrate:
        if (mine || op.dst_replica == me) migrations.push_back(op);
        break;
      case StepPlan::OpKind::kCopy:
        if (mine) copies.push_back(op);
        break;
    }
  }
  // The transport works outside the backend's queue: what earlier waves queued (swaps and copies
  // writing blocks this wave sends, or reading blocks it overwrites) must land first.
  if (!migrations.empty() && backend_work_queued_) {
    KVF_RETURN_IF_ERROR(backend_->synchronize());
    backend_work_queued_ = false;
  }
  // Within a wave no op touches a block another op writes (plan_waves), so the swaps and copies
  // are queued before the transfer and, on a backend that queues work (CUDA), run during it.
  if (!out.empty()) KVF_RETURN_IF_ERROR(backend_->swap_blocks(device_pool(), host_pool(), out));
  if (!in.empty()) KVF_RETURN_IF_ERROR(backend_->swap_blocks(host_pool(), device_pool(), in));
  if (!copies.empty()) KVF_RETURN_IF_ERROR(run_copies(copies));
  const bool queued_now = !out.empty() || !in.empty() || !copies.empty();
  backend_work_queued_ = backend_work_queued_ || queued_now;
  if (!migrations.empty()) {
    KVF_RETURN_IF_ERROR(run_migrations(migrations));
    if (queued_now) ++stats_.overlapped_waves;
  }
  stats_.swapped_out_blocks += out.size();
  stats_.swapped_in_blocks += in.size();
  stats_.token_copies += copies.size();
  ++stats_.waves;
  return ok_status();
}

Status RankCache::execute(const StepPlan& plan) {
  KVF_RETURN_IF_ERROR(validate(plan));
  return run(plan);
}

Status RankCache::run(const StepPlan& plan) {
  // Group the ops by wave, keeping plan order inside each wave.
  const std::vector<uint32_t> waves = plan_waves(plan.ops);
  const uint32_t num_waves = waves.empty() ? 0 : *std::max_element(waves.begin(), waves.end()) + 1;
  std::vector<std::vector<StepPlan::Op>> by_wave(num_waves);
  for (size_t i = 0; i < plan.ops.size(); ++i) by_wave[waves[i]].push_back(plan.ops[i]);
  Status ran = ok_status();
  for (size_t w = 0; w < by_wave.size() && ran.ok(); ++w) ran = run_wave(by_wave[w]);
  // On return every block of the plan holds its data, also when a wave failed midway.
  const Status synced = backend_->synchronize();
  backend_work_queued_ = false;
  KVF_RETURN_IF_ERROR(ran);
  KVF_RETURN_IF_ERROR(synced);

  apply_tables(plan);
  follow_scores(plan);
  KVF_LOG_DEBUG(kRuntime, "{} executed step {}: {} ops in {} waves, {} tables", where(), plan.step,
                plan.ops.size(), num_waves, plan.tables.size());
  ++next_step_;
  ++stats_.steps;
  return ok_status();
}

void RankCache::apply_tables(const StepPlan& plan) {
  const uint32_t me = layout_.replica;
  for (SeqId seq : plan.released) {
    tables_.erase(seq);
    group_tables_.erase(seq);
  }
  for (const auto& t : plan.tables) {
    if (t.replica != me) {  // served by another replica now
      tables_.erase(t.seq);
      group_tables_.erase(t.seq);
      continue;
    }
    StepPlan::Table* held = nullptr;
    if (t.layer_group == StepPlan::kAllLayers) {
      group_tables_.erase(t.seq);
      held = &tables_[t.seq];
    } else {
      tables_.erase(t.seq);
      std::vector<StepPlan::Table>& groups = group_tables_[t.seq];
      groups.resize(num_layer_groups());
      held = &groups[t.layer_group];
    }
    const Status applied = apply_table_change(held->blocks, t);
    KVF_CHECK(applied.ok(), applied.message());  // validate() checked every change
    held->seq = t.seq;
    held->replica = t.replica;
    held->layer_group = t.layer_group;
    held->num_tokens = t.num_tokens;
    held->computed_tokens = t.computed_tokens;
  }
}

Status RankCache::receive_and_execute(std::vector<uint8_t>& plan_bytes, RankId root) {
  KVF_RETURN_IF_ERROR(transport_->broadcast(plan_bytes, root));
  return execute_agreed(plan_bytes, root);
}

Status RankCache::execute_agreed(std::span<const uint8_t> plan_bytes, RankId root,
                                 StepPlan* executed) {
  reported_scores_.clear();  // a refused plan gathers none: no earlier plan's sums linger
  Result<StepPlan> plan = StepPlan::deserialize(plan_bytes);
  const Status verdict = plan.ok() ? validate(*plan) : plan.status();
  // Every rank learns every verdict before any block moves: a rank that refused the plan must not
  // leave its peers waiting for it in a migration.
  KVF_ASSIGN_OR_RETURN(const std::vector<uint64_t> verdicts, agree(verdict, root));
  std::string refused_by;
  for (size_t r = 0; r < verdicts.size(); ++r) {
    if ((verdicts[r] & 1) == 0) continue;
    if (!refused_by.empty()) refused_by += ", ";
    refused_by += "rank " + std::to_string(r) + " (replica " + std::to_string(r / layout_.tp) +
                  ", shard " + std::to_string(r % layout_.tp) + ", expecting step " +
                  std::to_string(verdicts[r] >> 1) + ")";
  }
  if (refused_by.empty()) {  // every rank validated it
    const Status reported = report(run(*plan), root, *plan);
    if (reported.ok() && executed != nullptr) *executed = std::move(plan).value();
    return reported;
  }
  const std::string which =
      plan.ok() ? "the plan of step " + std::to_string(plan->step) : "the plan";
  const std::string what = which + " broadcast by rank " + std::to_string(root.value) +
                           " was refused by " + refused_by + "; no rank executed it";
  if (!verdict.ok()) return Status(verdict.code(), verdict.message() + "; " + what);
  return invalid_operation(where() + ": " + what);
}

Result<std::vector<uint64_t>> RankCache::agree(const Status& verdict, RankId root) {
  // Each value: the step the rank expects, and whether it refused. Gathered point to point, so a
  // rank that does not answer is named; then every rank gets all of them.
  const uint64_t mine = (next_step_ << 1) | (verdict.ok() ? 0u : 1u);
  std::vector<std::vector<uint8_t>> gathered;
  KVF_RETURN_IF_ERROR(transport_->gather(as_bytes(mine), root, gathered));
  std::vector<uint8_t> all;
  for (const auto& bytes : gathered) all.insert(all.end(), bytes.begin(), bytes.end());
  KVF_RETURN_IF_ERROR(transport_->broadcast(all, root));
  if (all.size() != layout_.world_size * sizeof(uint64_t)) {
    return Status(ErrorCode::kInternal, where() + ": the verdicts of " +
                                            std::to_string(layout_.world_size) + " ranks came as " +
                                            std::to_string(all.size()) + " bytes");
  }
  std::vector<uint64_t> verdicts(layout_.world_size);
  std::memcpy(verdicts.data(), all.data(), all.size());
  return verdicts;
}

namespace {

// RankCacheStats as the words a report carries, and back.
constexpr size_t kStatsWords = 9;
constexpr size_t kReportHeader = 1 + kStatsWords * sizeof(uint64_t) + sizeof(uint32_t);
std::array<uint64_t, kStatsWords> stats_words(const RankCacheStats& s) {
  return {s.steps, s.waves, s.swapped_out_blocks, s.swapped_in_blocks, s.migrated_blocks_sent,
          s.migrated_blocks_received, s.token_copies, s.overlapped_waves, s.scores_sent};
}
RankCacheStats stats_from(const std::array<uint64_t, kStatsWords>& w) {
  return RankCacheStats{w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]};
}

}  // namespace

Status RankCache::report(const Status& ran, RankId root, const StepPlan& plan) {
  // [code][this rank's stats][message length][message][requested scores]: rank `root` answers
  // for the whole step, keeps every rank's figures for its metrics, and sums the scores.
  const std::vector<uint8_t> scores = ran.ok() ? requested_scores(plan) : std::vector<uint8_t>();
  const std::array<uint64_t, kStatsWords> words = stats_words(stats_);
  const std::string& message = ran.message();
  const auto message_length = static_cast<uint32_t>(message.size());
  std::vector<uint8_t> mine(kReportHeader);
  mine[0] = static_cast<uint8_t>(ran.code());
  std::memcpy(mine.data() + 1, words.data(), sizeof words);
  std::memcpy(mine.data() + 1 + sizeof words, &message_length, sizeof message_length);
  mine.insert(mine.end(), message.begin(), message.end());
  mine.insert(mine.end(), scores.begin(), scores.end());
  std::vector<std::vector<uint8_t>> reports;
  KVF_RETURN_IF_ERROR(transport_->gather(mine, root, reports));
  if (transport_->rank() != root) return ran;
  std::string failures;
  ErrorCode first = ErrorCode::kOk;
  const auto fail = [&](size_t r, ErrorCode code, const std::string& what) {
    failures += (failures.empty() ? "" : "; ") +
                transport_->describe(RankId{static_cast<int32_t>(r)}) + ": " + what;
    if (first == ErrorCode::kOk) first = code;
  };
  job_stats_.resize(reports.size());  // a rank that cannot report keeps its last figures
  std::vector<std::span<const uint8_t>> payloads(reports.size());
  for (size_t r = 0; r < reports.size(); ++r) {
    const std::vector<uint8_t>& report = reports[r];
    uint32_t length = 0;
    if (report.size() >= kReportHeader) {
      std::memcpy(&length, report.data() + 1 + sizeof words, sizeof length);
    }
    if (report.size() < kReportHeader || report.size() - kReportHeader < length) {
      fail(r, ErrorCode::kInternal, "a report of " + std::to_string(report.size()) + " bytes");
      continue;
    }
    std::array<uint64_t, kStatsWords> theirs{};
    std::memcpy(theirs.data(), report.data() + 1, sizeof theirs);
    job_stats_[r] = stats_from(theirs);
    payloads[r] = std::span(report).subspan(kReportHeader + length);
    if (report[0] == 0) continue;
    fail(r, static_cast<ErrorCode>(report[0]),
         std::string(report.begin() + kReportHeader, report.begin() + kReportHeader + length));
  }
  if (failures.empty()) {
    const Status summed = sum_reported_scores(plan, payloads);
    if (summed.ok()) return summed;
    failures = summed.message();
    first = summed.code();
  }
  return Status(first, "step " + std::to_string(plan.step) + " failed on " + failures);
}

std::vector<uint8_t> RankCache::requested_scores(const StepPlan& plan) {
  std::vector<uint8_t> bytes;
  const auto put = [&bytes](const void* p, size_t n) {
    const size_t at = bytes.size();
    bytes.resize(at + n);
    std::memcpy(bytes.data() + at, p, n);
  };
  for (const auto& request : plan.score_requests) {
    if (request.replica != layout_.replica) continue;
    const std::span<const double> scores = attention_scores(request.seq);
    const uint64_t count = scores.size();
    put(&request.seq.value, sizeof request.seq.value);
    put(&count, sizeof count);
    for (double score : scores) {
      const auto narrow = static_cast<float>(score);  // half the bytes; summed in double
      put(&narrow, sizeof narrow);
    }
    stats_.scores_sent += count;
  }
  return bytes;
}

Status RankCache::sum_reported_scores(const StepPlan& plan,
                                      const std::vector<std::span<const uint8_t>>& payloads) {
  std::vector<size_t> read(payloads.size(), 0);
  for (const auto& request : plan.score_requests) {
    ReplicaScores summed{request.seq, request.replica, {}};
    for (uint32_t shard = 0; shard < layout_.tp; ++shard) {
      const uint32_t r = layout_.rank_of(request.replica, shard);
      const std::span<const uint8_t> payload = payloads[r].subspan(read[r]);
      uint64_t seq = 0, count = 0;
      if (payload.size() >= 16) {
        std::memcpy(&seq, payload.data(), 8);
        std::memcpy(&count, payload.data() + 8, 8);
      }
      if (payload.size() < 16 || seq != request.seq.value || (payload.size() - 16) / 4 < count) {
        return Status(ErrorCode::kInternal,
                      transport_->describe(RankId{static_cast<int32_t>(r)}) +
                          ": its report does not carry the scores of " + to_string(request.seq) +
                          " that step " + std::to_string(plan.step) + " requested");
      }
      read[r] += 16 + count * 4;
      // Only tokens every shard scored count: a shorter shard bounds the sum.
      if (shard == 0 || count < summed.scores.size()) summed.scores.resize(count, 0.0);
      for (size_t i = 0; i < summed.scores.size(); ++i) {
        float value = 0;
        std::memcpy(&value, payload.data() + 16 + i * 4, 4);
        summed.scores[i] += value;
      }
    }
    // A sequence no shard has scored yet is not reported: there is nothing to select by.
    if (!summed.scores.empty()) reported_scores_.push_back(std::move(summed));
  }
  return ok_status();
}

uint64_t RankCache::tables_digest() const {
  // FNV-1a over the ordered tables: deterministic across ranks and runs.
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= (v >> (8 * i)) & 0xFF;
      h *= 1099511628211ull;
    }
  };
  const auto mix_table = [&mix](const StepPlan::Table& t) {
    mix(t.seq.value);
    mix(t.layer_group);
    mix(t.num_tokens);
    for (BlockId b : t.blocks) mix(b.value);
  };
  for (const auto& [seq, t] : tables_) mix_table(t);
  for (const auto& [seq, groups] : group_tables_) {
    for (const StepPlan::Table& t : groups) mix_table(t);
  }
  return h;
}

template <typename Args>
Status RankCache::on_layer(uint32_t layer, Args args, BlockView view,
                           Status (Backend::*op)(const PagedKvView&, const Args&)) {
  if (view == BlockView::kWhole) {
    KVF_ASSIGN_OR_RETURN(const auto where_layer, storage_.locate(layer));
    args.layer = where_layer.layer;  // the layer within its group's pool
    return (backend_->*op)(storage_.view(where_layer.group, Tier::kDevice), args);
  }
  if (group_views_.empty()) {
    return invalid_argument(where() + ": layer " + std::to_string(layer) +
                            " through a layer group's view, but cache.layers_per_group is unset");
  }
  const uint32_t per_group = group_views_[0].num_layers;
  if (layer >= per_group * num_layer_groups()) {
    return invalid_argument(where() + ": layer " + std::to_string(layer) + " is outside the " +
                            std::to_string(per_group * num_layer_groups()) + " layers");
  }
  args.layer = layer % per_group;
  return (backend_->*op)(group_views_[layer / per_group], args);
}

Status RankCache::append_kv(uint32_t layer, AppendKvArgs args, BlockView view) {
  return on_layer(layer, args, view, &Backend::append_kv);
}
Status RankCache::gather_kv(uint32_t layer, GatherKvArgs args, BlockView view) {
  return on_layer(layer, args, view, &Backend::gather_kv);
}
Status RankCache::decode_attention(uint32_t layer, DecodeAttentionArgs args, BlockView view) {
  return on_layer(layer, args, view, &Backend::paged_decode_attention);
}
Status RankCache::prefill_attention(uint32_t layer, PrefillAttentionArgs args, BlockView view) {
  return on_layer(layer, args, view, &Backend::paged_prefill_attention);
}

}  // namespace kvfabric
