// Sequences compacted per layer group (PyramidKV across ranks): their appends, forks, plan tables
// and checks. The compaction that makes one is in compression.cc (Coordinator::regroup).
#include <algorithm>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kvfabric/coordinator/coordinator.h"

namespace kvfabric {
namespace {

size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

}  // namespace

uint32_t Coordinator::num_layer_groups() const {
  return kvfabric::num_layer_groups(config_);
}

std::vector<BlockId> Coordinator::group_table(std::span<const BlockId> pool_table,
                                              const Compressed::Groups& groups, uint32_t g,
                                              size_t first) {
  const Compressed::Groups::Placement place = groups.placement(g);
  const size_t blocks = place.full + (pool_table.size() - place.all_full) / place.groups;
  std::vector<BlockId> table;
  table.reserve(blocks - std::min(first, blocks));
  for (size_t j = first; j < blocks; ++j)
    table.push_back(pool_table[place[j]]);
  return table;
}

Status Coordinator::append_grouped(SeqId seq, Sequence& s, size_t num_tokens) {
  Compressed::Groups& groups = *compressed_.at(seq).groups;
  const size_t group_block = num_layer_groups() * size_t{config_.cache.block_size};
  if (num_tokens > std::numeric_limits<size_t>::max() - group_block - groups.tokens[0]) {
    return invalid_argument("appending " + std::to_string(num_tokens) + " tokens to " +
                            to_string(seq) + " overflows its length");
  }
  // Every group's tail is the same: a round of blocks when its last ones fill.
  const size_t rounds = ceil_div(groups.tokens[0] + num_tokens, group_block) -
                        ceil_div(groups.tokens[0], group_block);
  const size_t grown = rounds * groups.tokens.size();
  const auto request = [&] { return "append " + to_string(seq); };
  KVF_RETURN_IF_ERROR(check_quota(request, s.tenant, 0, grown));
  PagedKvCache& pool = pool_of(s.replica);
  if (pool.available_block_count() < grown) {
    const Relief relief = plan_relief(s.replica, {grown, seq, kAnyPriority, {}, {}});
    if (!relief.enough) return no_room(request(), s.replica, grown, relief);
    relieve(s.replica, relief.victims);
  }
  // The pool counts whole blocks of slots: its table never has a partly filled block to copy.
  KVF_RETURN_IF_ERROR(pool.append(seq, s.slot, grown * config_.cache.block_size));
  for (uint64_t& tokens : groups.tokens) tokens += num_tokens;
  groups.uncomputed += num_tokens;
  const SequenceInfo* info = running_info(seq, s);
  s.num_tokens = info->num_tokens;
  charge(s, info->num_blocks());
  mark_load(s.replica);
  mark_table(s);
  return ok_status();
}

Status Coordinator::fork_grouped(SeqId src, const Sequence& s, SeqId dst) {
  const Compressed::Groups& groups = *compressed_.at(src).groups;
  const size_t group_block = num_layer_groups() * size_t{config_.cache.block_size};
  PagedKvCache& pool = pool_of(s.replica);
  if (groups.tokens[0] % group_block == 0) return pool.fork(src, dst);  // every block is full
  // The last round is written next, by either sequence: the child gets its own copies.
  const SequenceInfo* info = pool.get_sequence(src);
  const size_t round = groups.tokens.size();
  if (pool.available_block_count() < round) {
    const Relief relief = plan_relief(s.replica, {round, src, info->priority, {}, {}});
    if (!relief.enough) {
      return no_room("fork " + to_string(src) + " -> " + to_string(dst), s.replica, round, relief);
    }
    relieve(s.replica, relief.victims);
  }
  const std::vector<BlockId> parent = info->block_ids;
  const uint32_t priority = info->priority;
  const std::span<const BlockId> shared = std::span(parent).first(parent.size() - round);
  KVF_RETURN_IF_ERROR(pool.allocate_shared(dst, info->num_tokens, shared));
  (void)pool.set_priority(dst, priority);
  const std::vector<BlockId>& child = pool.get_sequence(dst)->block_ids;
  const auto bs = config_.cache.block_size;
  for (size_t i = parent.size() - round; i < parent.size(); ++i) {
    // block_size tokens of every layer: the whole block, whichever view it is read through.
    plan_.ops.push_back(StepPlan::Op::token_copy(
        s.replica, TokenCopy{parent[i], 0, child[i], 0, bs, CopyReason::kCopyOnWrite}));
  }
  return ok_status();
}

void Coordinator::publish_group_tables(SeqId seq, Sequence& s) {
  Compressed::Groups& groups = *compressed_.at(seq).groups;
  const std::vector<BlockId>& pool_table = running_info(seq, s)->block_ids;
  // The ranks hold the leading published_blocks of the pool table: of each group, the blocks
  // among those. Only the others are listed, so a decode step costs what it adds.
  const size_t published = s.published_blocks;
  for (uint32_t g = 0; g < groups.tokens.size(); ++g) {
    const size_t held = groups.placement(g).count_before(published);
    std::vector<BlockId> table = group_table(pool_table, groups, g, held);
    plan_.tables.push_back(StepPlan::Table{seq, s.replica, groups.tokens[g],
                                           groups.tokens[g] - groups.uncomputed,
                                           static_cast<uint32_t>(held), std::move(table), g});
  }
  s.published_blocks = static_cast<uint32_t>(pool_table.size());
  groups.uncomputed = 0;  // the forward pass after this plan computes them
  s.computed_tokens = s.num_tokens;
}

Status Coordinator::verify_groups(SeqId seq, const Compressed::Groups& groups) const {
  const Sequence* s = find(seq);
  const auto bad = [&](const std::string& what) {
    return Status(ErrorCode::kInternal, to_string(seq) + ", compacted per layer group, " + what);
  };
  const uint32_t count = num_layer_groups();
  if (!s->grouped || groups.tokens.size() != count || groups.full_blocks.size() != count) {
    return bad("has " + std::to_string(groups.tokens.size()) + " groups of " +
               std::to_string(count));
  }
  const size_t group_block = count * size_t{config_.cache.block_size};
  const size_t all_full = groups.all_full();
  const size_t blocks = s->num_tokens / config_.cache.block_size;
  if (s->num_tokens % config_.cache.block_size != 0 || blocks < all_full ||
      (blocks - all_full) % count != 0) {
    return bad("holds " + std::to_string(s->num_tokens) + " slots, not whole rounds of blocks");
  }
  const size_t rounds = (blocks - all_full) / count;
  for (uint32_t g = 0; g < count; ++g) {
    if (groups.tokens[g] % group_block != groups.tokens[0] % group_block ||
        ceil_div(groups.tokens[g], group_block) != groups.full_blocks[g] + rounds) {
      return bad("group " + std::to_string(g) + " holds " + std::to_string(groups.tokens[g]) +
                 " tokens in " + std::to_string(groups.full_blocks[g] + rounds) + " blocks");
    }
    if (groups.uncomputed > groups.tokens[g]) {
      return bad("group " + std::to_string(g) + " holds " + std::to_string(groups.tokens[g]) +
                 " tokens, fewer than the " + std::to_string(groups.uncomputed) +
                 " it has to compute");
    }
  }
  return ok_status();
}

}  // namespace kvfabric
