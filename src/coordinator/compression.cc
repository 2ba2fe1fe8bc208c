// Token compression in the coordinator: which compressed sequences are due, what they keep, and
// the plan's compactions and score requests (DESIGN.md §5).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "common/log.h"
#include "kvfabric/coordinator/coordinator.h"

namespace kvfabric {
namespace {

// Positions in their new order as maximal runs of consecutive ones.
std::vector<StepPlan::TokenRange> ranges_of(std::span<const size_t> positions) {
  std::vector<StepPlan::TokenRange> ranges;
  for (size_t p : positions) {
    if (!ranges.empty() && ranges.back().first + ranges.back().count == p) {
      ++ranges.back().count;
    } else {
      ranges.push_back({p, 1});
    }
  }
  return ranges;
}

}  // namespace

Status Coordinator::check_compression(SeqId seq, const AdmitOptions& options,
                                      size_t prompt_tokens) const {
  if (!options.compression) return ok_status();
  const Status valid = quant::validate(*options.compression);
  if (!valid.ok()) {
    return Status(valid.code(),
                  "admit " + to_string(seq) + ": " + valid.message() + "; nothing was changed");
  }
  if (options.compression->kind == quant::CompressionPolicy::Kind::kPyramid &&
      num_layer_groups() < 2) {
    return invalid_argument("admit " + to_string(seq) +
                            ": compression.policy 'pyramid' keeps a budget per layer group, and "
                            "cache.layers_per_group (" +
                            std::to_string(config_.cache.layers_per_group) +
                            ") makes no groups of the model's " +
                            std::to_string(config_.model.num_layers) +
                            " layers; nothing was changed");
  }
  if (options.compression->kind == quant::CompressionPolicy::Kind::kPyramid) {
    // The per-layer budgets the regrouping computes must be computable.
    const auto budgets = quant::pyramid_group_budgets(
        *options.compression, budget_of(*options.compression, prompt_tokens),
        config_.model.num_layers, config_.cache.layers_per_group);
    if (!budgets.ok()) {
      return invalid_argument("admit " + to_string(seq) + ": compression: " +
                              budgets.status().message() + "; nothing was changed");
    }
  }
  return ok_status();
}

void Coordinator::record_compression(SeqId seq, const AdmitOptions& options, size_t prompt_tokens,
                                     std::optional<uint64_t> probe, bool served_compacted) {
  if (!options.compression) return;
  if (probe) count_compressed_probe(*probe);  // admitted: a refused request counts for nothing
  const quant::CompressionPolicy& policy = *options.compression;
  Compressed& c = compressed_[seq] = Compressed{.policy = policy,
                                .budget = budget_of(policy, prompt_tokens),
                                .prompt_tokens = prompt_tokens,
                                // A kept prompt served is computed, and is snapkv's compaction.
                                .prefilled = served_compacted,
                                .compacted_once = served_compacted,
                                .last_compaction_step = plan_.step,
                                .scores = {},
                                .request = std::nullopt,
                                .arrival = quant::ArrivalOrder(),
                                .shared_as = std::nullopt,
                                .probe = probe,
                                .indexed_on = std::nullopt,
                                .groups = std::nullopt};
  if (!c.settled()) compacting_[seq] = &c;
}

uint64_t Coordinator::budget_of(const quant::CompressionPolicy& policy,
                                size_t prompt_tokens) const {
  const uint64_t budget = quant::budget_for(policy, prompt_tokens);
  if (policy.kind != quant::CompressionPolicy::Kind::kSnapKv) return budget;
  const uint64_t bs = config_.cache.block_size;
  return (budget + bs - 1) / bs * bs;
}

CacheSalt Coordinator::compressed_prompt_identity(const quant::CompressionPolicy& policy,
                                                  uint64_t budget, const CacheSalt& namespace_salt,
                                                  std::span<const TokenId> prompt) {
  // What a SnapKV selection depends on besides the model: the whole prompt (its window votes,
  // and every kept token's K/V attended to all before it), the budget and the window. The
  // namespace keeps tenants and salts apart as it does for full prompts.
  std::string text = "kvfabric compressed prompt 1\nsnapkv budget " + std::to_string(budget) +
                     " window " + std::to_string(policy.window_tokens) + " namespace " +
                     to_string(namespace_salt) + "\n";
  text.append(reinterpret_cast<const char*>(prompt.data()), prompt.size_bytes());
  return CacheSalt::of(text);
}

std::optional<uint64_t> Coordinator::compressed_prompt_probe(
    const quant::CompressionPolicy& policy, uint64_t budget, const CacheSalt& namespace_salt,
    std::span<const TokenId> prompt) const {
  if (policy.kind != quant::CompressionPolicy::Kind::kSnapKv || prompt.size() <= budget) {
    return std::nullopt;
  }
  const uint32_t bs = config_.cache.block_size;
  const size_t edge = std::min<size_t>(bs, prompt.size());
  uint64_t h = detail::radix_unit_key(prompt.first(edge), bs);
  for (uint64_t word : {detail::radix_unit_key(prompt.last(edge), bs), uint64_t{prompt.size()},
                        budget, policy.window_tokens, namespace_salt.hi, namespace_salt.lo}) {
    h = (h ^ word) * 0x9fb21c651e98df25ULL;
    h ^= h >> 29;
  }
  return h;
}

void Coordinator::name_compressed_prompts() {
  if (compressed_.empty()) return;
  for (const AdmittedPrompt& admitted : admitted_now_) {
    const auto it = compressed_.find(admitted.seq);
    const Sequence* s = find(admitted.seq);
    if (it == compressed_.end() || !it->second.probe || s == nullptr ||
        s->incarnation != admitted.incarnation) {
      continue;
    }
    Compressed& c = it->second;
    c.shared_as = compressed_prompt_identity(c.policy, c.budget, admitted.key.scope().salt,
                                             admitted.tokens);
  }
}

RadixKey Coordinator::compressed_prompt_key(const CacheSalt& identity, size_t kept) {
  if (slot_numbers_.size() < kept) {
    const size_t from = slot_numbers_.size();
    slot_numbers_.resize(kept);
    for (size_t i = from; i < kept; ++i) slot_numbers_[i] = static_cast<TokenId>(i);
  }
  return RadixKey(std::span(slot_numbers_).first(kept), config_.cache.block_size, {identity, 0});
}

std::optional<Placement> Coordinator::admit_compressed(SeqId seq, size_t prompt_tokens,
                                                       const CacheSalt& identity, uint64_t kept,
                                                       uint32_t priority, uint32_t tenant) {
  const RadixKey key = compressed_prompt_key(identity, kept);
  index_->lookup(key, compressed_lookup_);
  // Only the whole kept prompt serves: its tokens cannot be computed again without the rest.
  if (compressed_lookup_.tokens() < kept) return std::nullopt;
  const std::span<const uint32_t> holders =
      index_->holders(compressed_lookup_, compressed_lookup_.steps.size() - 1);
  std::optional<uint32_t> chosen;
  double chosen_load = 0;
  for (uint32_t r : holders) {
    if (!accepts(r, priority)) continue;
    const double load = load_of(r);
    if (!chosen || load < chosen_load) {
      chosen = r;
      chosen_load = load;
    }
  }
  const size_t blocks = kept / config_.cache.block_size;
  // No holder takes it: the kept prompt moves from the lowest holder to the least loaded replica
  // that takes the request and has room, where moving tokens costs less than computing them.
  std::optional<uint32_t> source;
  if (!chosen) {
    const CoordinatorConfig& w = config_.coordinator;
    if (!(w.migration_token_cost < w.prefill_token_cost)) return std::nullopt;
    chosen = least_loaded_with_room(blocks, priority);
    if (!chosen) return std::nullopt;
    source = holders.front();
  }
  std::vector<BlockId> kept_blocks;
  index_->blocks_on(compressed_lookup_, source.value_or(*chosen), blocks, kept_blocks);
  PagedKvCache& pool = pool_of(*chosen);
  if (source) {
    const Status allocated = pool.allocate(seq, kept);
    KVF_CHECK(allocated.ok(), "allocating a moved kept prompt failed: " + allocated.to_string());
  } else {
    // Every block is shared: the idle ones become used, and none is taken from the free list.
    index_->use(compressed_lookup_, *chosen);
    const Status allocated = pool.allocate_shared(seq, kept, kept_blocks);
    KVF_CHECK(allocated.ok(), "sharing a compacted prompt failed: " + allocated.to_string());
  }
  if (priority != 0) {
    const Status p = pool.set_priority(seq, priority);
    KVF_CHECK(p.ok(), p.message());  // check_priority() admitted it
  }
  Placement placement;
  placement.replica = *chosen;
  placement.cached_tokens = prompt_tokens;
  placement.compressed_tokens = kept;
  placement.blocks = pool.get_sequence(seq)->block_ids;
  if (source) {
    migrate(*source, kept_blocks, *chosen, placement.blocks);
    placement.migrated_tokens = prompt_tokens;
    stats_.migrated_tokens += prompt_tokens;
  }
  record_admission(seq, prompt_tokens, kept, priority, tenant, placement);
  ++stats_.compressed_hits;
  return placement;
}

bool Coordinator::voted_in_full(const Compressed& c) {
  const uint64_t window = std::min<uint64_t>(c.policy.window_tokens, c.prompt_tokens);
  return c.scores.size() >= c.prompt_tokens - window;
}

bool Coordinator::makes_way_for_kept_prompt(const Sequence& s, const Compressed& c) {
  index_->lookup(compressed_prompt_key(*c.shared_as, c.budget), compressed_lookup_);
  const size_t held = index_->prefix_on(compressed_lookup_, s.replica).tokens;
  if (held >= c.budget) return false;
  // What eviction left of another compaction's kept prompt serves nobody (only a whole one
  // does), and this one's blocks must not be hung below it: another compaction of the prompt
  // may have laid its tokens out in other slots.
  return held == 0 ||
         release_kept_prompt(s.replica, *c.shared_as, c.budget) * config_.cache.block_size == held;
}

size_t Coordinator::release_kept_prompt(uint32_t replica, const CacheSalt& identity,
                                        uint64_t kept) {
  index_->lookup(compressed_prompt_key(identity, kept), compressed_lookup_);
  PagedKvCache& pool = pool_of(replica);
  const std::vector<BlockId> forgotten = index_->forget(compressed_lookup_, replica);
  for (BlockId block : forgotten) {
    const Status released = pool.release_retained_block(block);
    KVF_CHECK(released.ok(), "releasing a kept-prompt block: " + released.to_string());
  }
  mark_load(replica);
  return forgotten.size();
}

bool Coordinator::compressed_probe_seen(uint64_t probe) const {
  return compressed_probe_counts_.count(probe) > 0;
}

void Coordinator::count_compressed_probe(uint64_t probe) {
  // Past this many probes most are of prompts long gone: starting afresh only forgets that
  // some prompts were seen (their kept prompts then leave with their sequences).
  if (compressed_probe_counts_.size() >= num_replicas() * pool_of(0).total_blocks()) {
    compressed_probe_counts_.clear();
  }
  uint8_t& count = compressed_probe_counts_[probe];
  count = std::min<uint8_t>(count + 1, 2);
}

void Coordinator::forget_kept_prompt(const Compressed& c) {
  if (!c.indexed_on) return;
  const auto count = compressed_probe_counts_.find(*c.probe);
  if (count != compressed_probe_counts_.end() && count->second > 1) return;
  (void)release_kept_prompt(*c.indexed_on, *c.shared_as, c.budget);
}

void Coordinator::index_compacted_prompt(SeqId seq, const Sequence& s, Compressed& c) {
  const std::vector<BlockId>& table = running_info(seq, s)->block_ids;
  const Result<size_t> added =
      index_blocks(s.replica, compressed_prompt_key(*c.shared_as, c.budget),
                   std::span(table).first(c.budget / config_.cache.block_size));
  if (!added.ok()) {
    KVF_LOG_WARN(kCoordinator, "not indexing the compacted prompt of {}: {}", to_string(seq),
                 added.status().message());
    return;
  }
  if (*added > 0) ++stats_.compressed_indexed;
  c.indexed_on = s.replica;
}

size_t Coordinator::tokens_of(SeqId seq) const {
  const Sequence* s = find(seq);
  if (s == nullptr) return 0;
  if (s->grouped) {  // what a layer attends to, on average: each attends to its group's
    const std::vector<uint64_t>& tokens = compressed_.at(seq).groups->tokens;
    const uint64_t sum = std::accumulate(tokens.begin(), tokens.end(), uint64_t{0});
    return (sum + tokens.size() - 1) / tokens.size();
  }
  return s->num_tokens;
}

Status Coordinator::report_attention(SeqId seq, uint64_t plan_step,
                                     std::span<const double> scores) {
  const Sequence* s = find(seq);
  if (s == nullptr) return sequence_not_found(seq);
  const auto it = compressed_.find(seq);
  const std::string what =
      "attention scores of " + to_string(seq) + " for step " + std::to_string(plan_step);
  if (it == compressed_.end() || !it->second.policy.needs_scores()) {
    return invalid_argument(what + ": it was admitted without a compression policy that reads "
                                   "scores (h2o, snapkv); nothing was changed");
  }
  Compressed& c = it->second;
  if (!c.request || plan_step < c.request->first_step || plan_step > c.request->last_step) {
    const std::string outstanding =
        !c.request ? "no request of its scores is outstanding"
        : c.request->first_step == c.request->last_step
            ? "its outstanding request is step " + std::to_string(c.request->last_step)
            : "its outstanding requests are steps " + std::to_string(c.request->first_step) +
                  " to " + std::to_string(c.request->last_step);
    return invalid_argument(what + ": " + outstanding +
                            " (a report from before the sequence was compacted, swapped or "
                            "parked, or for an earlier sequence of this id, is numbered by other "
                            "slots); nothing was changed");
  }
  if (scores.size() > c.request->tokens) {
    return invalid_argument(what + ": " + std::to_string(scores.size()) + " scores for " +
                            std::to_string(c.request->tokens) + " tokens; nothing was changed");
  }
  for (size_t i = 0; i < scores.size(); ++i) {
    if (!(std::isfinite(scores[i]) && scores[i] >= 0)) {
      return invalid_argument(what + ": token " + std::to_string(i) + " scores " +
                              std::to_string(scores[i]) +
                              "; scores must be finite and >= 0; nothing was changed");
    }
  }
  if (scores.empty()) return ok_status();  // nothing to select by: the request stands
  c.scores.assign(scores.begin(), scores.end());
  c.has_scores = true;
  return ok_status();
}

bool Coordinator::due(const Sequence& s, const Compressed& c, uint64_t step) const {
  if (s.swapped || !c.prefilled) return false;
  const bool interval_passed = step - c.last_compaction_step >= c.policy.interval_steps;
  switch (c.policy.kind) {
    case quant::CompressionPolicy::Kind::kStreaming:
      return interval_passed && s.num_tokens > c.budget;
    case quant::CompressionPolicy::Kind::kH2o:
      return c.has_scores && interval_passed && s.num_tokens > c.budget;
    case quant::CompressionPolicy::Kind::kSnapKv:
    case quant::CompressionPolicy::Kind::kPyramid:
      return c.has_scores && !c.compacted_once;
  }
  return false;
}

void Coordinator::compact_due_sequences() {
  const uint64_t step = plan_.step;
  for (auto it = compacting_.begin(); it != compacting_.end();) {
    const SeqId seq = it->first;
    Compressed& c = *it->second;
    Sequence& s = *find(seq);
    // Tokens before computed_tokens have their K/V by now (earlier forward passes, or this
    // plan's cached and migrated blocks).
    if (!s.swapped && s.computed_tokens >= c.prompt_tokens) c.prefilled = true;
    // Not due, or room short for the compaction (it stays due, with its scores).
    if (!due(s, c, step) || !compact(seq, s, c)) {
      ++it;
      continue;
    }
    c.last_compaction_step = step;
    c.compacted_once = true;
    c.scores.clear();  // the ranks renumber theirs with the plan; the next report is fresh
    c.has_scores = false;
    c.request.reset();
    it = c.settled() ? compacting_.erase(it) : std::next(it);
  }
}

bool Coordinator::compact(SeqId seq, Sequence& s, Compressed& c) {
  if (c.policy.kind == quant::CompressionPolicy::Kind::kPyramid) return regroup(seq, s, c);
  const size_t before = s.num_tokens;
  const bool sliding = c.policy.kind == quant::CompressionPolicy::Kind::kStreaming;
  c.arrival.note_appended(before);
  const std::vector<size_t> kept =
      quant::select_kept_tokens(c.policy, c.budget, before, s.computed_tokens, c.prompt_tokens,
                                c.scores, config_.cache.block_size, c.arrival.arrival());
  if (kept.size() >= before) return true;  // nothing to drop: the interval restarts
  // A selection fills its dropped slots with later tokens rather than shifting every token
  // after the first one dropped; a sliding window drops whole blocks and moves nothing. SnapKV
  // fills them from the whole prompt, covered by the report or not: its kept prompt comes first,
  // decoded tokens after, and identical selections get identical layouts.
  const bool snapkv = c.policy.kind == quant::CompressionPolicy::Kind::kSnapKv;
  const size_t scored =
      snapkv ? c.prompt_tokens : std::min<size_t>(c.scores.size(), s.computed_tokens);
  const std::vector<size_t> order = sliding ? kept : quant::fill_dropped_slots(kept, scored);
  // A kept prompt chosen by scores of every voter depends on the prompt alone: its blocks
  // become the sequence's own, to be indexed for identical requests.
  const bool shares = c.shared_as && voted_in_full(c) && makes_way_for_kept_prompt(s, c);
  std::vector<StepPlan::TokenRange> ranges = ranges_of(order);
  PagedKvCache& pool = pool_of(s.replica);
  const std::vector<BlockId> old_table = running_info(seq, s)->block_ids;
  // A block shared with the prefix index or a fork is copied, never written: a cached prompt
  // keeps the K/V its key says. A sliding window (a sink and the newest tokens, whole blocks
  // dropped) keeps the window's blocks in place.
  const size_t sink = sliding && ranges.size() == 2 ? ranges.front().count : 0;
  // The tokens not computed yet are kept, last: the blocks this step's forward pass writes them
  // into become the sequence's own too, since a fork sharing them computes them over another
  // context.
  const size_t uncomputed = before - s.computed_tokens;
  const size_t uncomputed_from = kept.size() - uncomputed;
  bool indexes = shares;
  const size_t own_blocks = indexes ? c.budget / config_.cache.block_size : 0;
  Result<size_t> dropped =
      sliding ? pool.apply_streaming_llm(seq, sink, ranges.back().count, uncomputed_from)
              : pool.retain_tokens(seq, order, own_blocks, uncomputed_from);
  if (!dropped.ok() && indexes) {
    indexes = false;  // no room for the copies sharing needs: compacted, not shared
    dropped = pool.retain_tokens(seq, order, 0, uncomputed_from);
  }
  if (!dropped.ok()) {
    KVF_LOG_DEBUG(kCoordinator, "compaction of {} waits: {}", to_string(seq),
                  dropped.status().message());
    return false;
  }
  collect_copies(s.replica);
  const std::vector<BlockId>& table = running_info(seq, s)->block_ids;
  // The ranks keep the leading blocks the compaction left in place.
  const auto unchanged = static_cast<uint32_t>(
      std::mismatch(table.begin(), table.end(), old_table.begin(), old_table.end()).first -
      table.begin());
  s.published_blocks = std::min(s.published_blocks, unchanged);
  s.num_tokens = kept.size();
  s.computed_tokens = kept.size() - uncomputed;
  if (c.policy.kind == quant::CompressionPolicy::Kind::kH2o) {
    c.arrival.follow(order, before);
  }
  charge(s, table.size());
  mark_table(s);
  mark_load(s.replica);
  plan_.compactions.push_back({seq, s.replica, before, std::move(ranges)});
  if (indexes) index_compacted_prompt(seq, s, c);
  ++stats_.compactions;
  stats_.compacted_tokens += before - kept.size();
  stats_.compacted_blocks += old_table.size() - table.size();
  return true;
}

std::vector<size_t> Coordinator::pyramid_kept_prompts(const Compressed& c) const {
  const size_t prompt = c.prompt_tokens;
  const size_t group_block = size_t{num_layer_groups()} * config_.cache.block_size;
  const Result<std::vector<uint64_t>> budgets = quant::pyramid_group_budgets(
      c.policy, c.budget, config_.model.num_layers, config_.cache.layers_per_group);
  KVF_CHECK(budgets.ok(), budgets.status().message());  // validated at admission
  // SnapKV keeps the window and the tokens the scores do not reach whatever the budget.
  const size_t window = static_cast<size_t>(std::min<uint64_t>(c.policy.window_tokens, prompt));
  const size_t always = prompt - std::min(c.scores.size(), prompt - window);
  std::vector<size_t> kept;
  for (const uint64_t budget : *budgets) {
    // Whole group blocks fewer than the prompt, so that every group fills its last block at
    // the same decoded token.
    const size_t floor = std::max<size_t>(budget, always);
    const size_t short_of_prompt = floor >= prompt ? 0 : (prompt - floor) / group_block;
    kept.push_back(prompt - short_of_prompt * group_block);
  }
  return kept;
}

bool Coordinator::regroup(SeqId seq, Sequence& s, Compressed& c) {
  const size_t before = s.num_tokens;
  const size_t decoded = before - c.prompt_tokens;
  const std::vector<size_t> kept_prompts = pyramid_kept_prompts(c);
  std::vector<uint64_t> kept_tokens;
  for (const size_t kept : kept_prompts) kept_tokens.push_back(kept + decoded);
  if (std::all_of(kept_tokens.begin(), kept_tokens.end(), [&](uint64_t n) { return n == before; })) {
    return true;  // every group keeps everything: nothing to regroup
  }
  Compressed::Groups layout = group_layout(kept_tokens, before - s.computed_tokens);
  const size_t blocks = layout.all_full() + layout.tokens.size();
  PagedKvCache& pool = pool_of(s.replica);
  const std::vector<BlockId> old_table = running_info(seq, s)->block_ids;
  // Whole group blocks can take up to a block per group more than the whole table (budgets near
  // the prompt's length in several groups): compression never grows a sequence, it stays whole.
  if (blocks > old_table.size()) return true;
  // The fresh blocks are taken before the whole ones go: until that many are available, it
  // waits (checked before selecting, which sorts the prompt's votes once per group).
  if (pool.available_block_count() < blocks) return false;

  quant::CompressionPolicy snapkv = c.policy;
  snapkv.kind = quant::CompressionPolicy::Kind::kSnapKv;
  std::vector<std::vector<size_t>> kept(kept_prompts.size());
  for (size_t g = 0; g < kept.size(); ++g) {
    kept[g] = quant::select_kept_tokens(snapkv, kept_prompts[g], before, s.computed_tokens,
                                        c.prompt_tokens, c.scores, config_.cache.block_size);
    KVF_CHECK(kept[g].size() == kept_tokens[g],
              "a pyramid selection kept " + std::to_string(kept[g].size()) + " of " +
                  std::to_string(before) + " tokens, not its budget");
  }
  const Status replaced = pool.replace_table(seq, blocks * config_.cache.block_size);
  KVF_CHECK(replaced.ok(), replaced.message());  // the blocks were counted above
  queue_regroup_copies(s.replica, layout, old_table, running_info(seq, s)->block_ids, kept);
  uint64_t dropped = 0;
  for (uint32_t g = 0; g < kept.size(); ++g) {
    plan_.compactions.push_back({seq, s.replica, before, ranges_of(kept[g]), g});
    dropped += before - kept[g].size();
  }
  ++stats_.compactions;
  stats_.compacted_tokens += dropped / kept.size();  // a whole layer's worth on average
  stats_.compacted_blocks += old_table.size() - blocks;
  c.groups = std::move(layout);
  s.grouped = true;
  s.num_tokens = blocks * config_.cache.block_size;
  s.computed_tokens = s.num_tokens;
  s.published_blocks = 0;  // tables new to the ranks, every group's whole
  charge(s, blocks);
  mark_table(s);
  mark_load(s.replica);
  return true;
}

Coordinator::Compressed::Groups Coordinator::group_layout(std::span<const uint64_t> tokens,
                                                          uint64_t uncomputed) const {
  const size_t group_block = size_t{num_layer_groups()} * config_.cache.block_size;
  Compressed::Groups layout{{tokens.begin(), tokens.end()}, {}, uncomputed};
  for (const uint64_t n : tokens) {
    // Every group's blocks but its last; the last ones form the first round.
    layout.full_blocks.push_back(static_cast<uint32_t>((n + group_block - 1) / group_block - 1));
  }
  return layout;
}

void Coordinator::queue_regroup_copies(uint32_t replica, const Compressed::Groups& layout,
                                       std::span<const BlockId> whole, std::span<const BlockId> table,
                                       const std::vector<std::vector<size_t>>& kept) {
  const size_t bs = config_.cache.block_size;
  const size_t group_block = layout.tokens.size() * bs;
  for (uint32_t g = 0; g < kept.size(); ++g) {
    const Compressed::Groups::Placement place = layout.placement(g);
    // The computed kept tokens move, a run of consecutive slots per copy; the uncomputed ones,
    // last, are written by the forward pass through the group's view.
    std::optional<StepPlan::Op> run;
    for (size_t i = 0; i + layout.uncomputed < kept[g].size(); ++i) {
      const size_t from = kept[g][i];
      const TokenCopy next{whole[from / bs], static_cast<uint32_t>(from % bs),
                           table[place[i / group_block]],
                           static_cast<uint32_t>(i % group_block), 1, CopyReason::kCompaction};
      TokenCopy* last = run ? &run->copy : nullptr;
      if (last != nullptr && last->src_block == next.src_block &&
          last->dst_block == next.dst_block &&
          last->src_offset + last->num_tokens == next.src_offset &&
          last->dst_offset + last->num_tokens == next.dst_offset) {
        ++last->num_tokens;
        continue;
      }
      if (run) plan_.ops.push_back(*run);
      run = StepPlan::Op::regroup(replica, next, g);
    }
    if (run) plan_.ops.push_back(*run);
  }
}

void Coordinator::request_scores() {
  const uint64_t next_step = plan_.step + 1;
  for (auto& [seq, compressed] : compacting_) {
    Compressed& c = *compressed;
    if (!c.policy.needs_scores() || c.has_scores) continue;
    const Sequence& s = *find(seq);
    if (s.swapped || !c.prefilled) continue;
    const bool wanted =
        c.compacts_once() ? !c.compacted_once
            : next_step - c.last_compaction_step >= c.policy.interval_steps &&
                  s.num_tokens >= c.budget;
    if (!wanted) continue;
    plan_.score_requests.push_back({seq, s.replica});
    const uint64_t first = c.request ? c.request->first_step : plan_.step;
    c.request = Compressed::ScoreRequest{first, plan_.step, s.num_tokens};
  }
}

void Coordinator::forget_scores(SeqId seq) {
  const auto it = compressed_.find(seq);
  if (it == compressed_.end()) return;
  it->second.scores.clear();
  it->second.has_scores = false;
  it->second.request.reset();
}

Status Coordinator::verify_compression() const {
  size_t walked = 0;  // entries of compacting_ met in compressed_
  for (const auto& [seq, c] : compressed_) {
    const Sequence* s = find(seq);
    if (s == nullptr) {
      return Status(ErrorCode::kInternal, "compression state of " + to_string(seq) +
                                              ", which the coordinator does not hold");
    }
    const auto walk = compacting_.find(seq);
    const bool listed = walk != compacting_.end() && walk->second == &c;
    if (listed == c.settled()) {
      return Status(ErrorCode::kInternal,
                    to_string(seq) + (listed ? " is done compacting but step() still walks it"
                                             : " may compact again but step() does not walk it"));
    }
    walked += listed ? 1 : 0;
    if (s->grouped != c.groups.has_value()) {
      return Status(ErrorCode::kInternal, to_string(seq) + " is " +
                                              (s->grouped ? "" : "not ") +
                                              "compacted per layer group, its state says otherwise");
    }
    if (c.groups) KVF_RETURN_IF_ERROR(verify_groups(seq, *c.groups));
    // Each listed slot's arrival is its own, and slots past them arrived later.
    std::vector<uint32_t> arrivals(c.arrival.arrival().begin(), c.arrival.arrival().end());
    std::sort(arrivals.begin(), arrivals.end());
    if (arrivals.size() > s->num_tokens ||
        std::adjacent_find(arrivals.begin(), arrivals.end()) != arrivals.end()) {
      return Status(ErrorCode::kInternal,
                    to_string(seq) + " lists " + std::to_string(arrivals.size()) +
                        " arrivals for its " + std::to_string(s->num_tokens) +
                        " tokens, or one twice");
    }
  }
  if (walked != compacting_.size()) {
    return Status(ErrorCode::kInternal, "step() walks " + std::to_string(compacting_.size()) +
                                            " compressed sequences, " +
                                            std::to_string(compacting_.size() - walked) +
                                            " of them no longer compressed");
  }
  return ok_status();
}

}  // namespace kvfabric
