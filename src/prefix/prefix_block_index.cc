#include "kvfabric/prefix/prefix_block_index.h"

#include <algorithm>
#include <string>

#include "common/log.h"

namespace kvfabric {

std::string_view storage_tier_name(StorageTier tier) {
  switch (tier) {
    case StorageTier::kDevice:
      return "device";
    case StorageTier::kHost:
      return "host";
  }
  return "unknown";
}

std::optional<BlockPlacement> BlockPlacementTraits::split_front(BlockPlacement& p,
                                                                size_t units) const {
  BlockPlacement front{p.replica, p.tier, {}};
  const auto at = static_cast<ptrdiff_t>(units);
  front.blocks.assign(p.blocks.begin(), p.blocks.begin() + at);
  p.blocks.erase(p.blocks.begin(), p.blocks.begin() + at);
  return front;
}

Result<std::unique_ptr<PrefixBlockIndex>> PrefixBlockIndex::create(
    const PrefixIndexOptions& options, uint32_t num_blocks) {
  if (options.block_size == 0) return invalid_argument("prefix index block_size must be >= 1");
  return std::unique_ptr<PrefixBlockIndex>(new PrefixBlockIndex(options, num_blocks));
}

PrefixBlockIndex::PrefixBlockIndex(const PrefixIndexOptions& options, uint32_t num_blocks)
    : options_(options),
      tree_(RadixTreeOptions{options.block_size, options.order, RadixEvictScope::kLeaves}),
      node_of_(num_blocks, kNoNode),
      pinned_at_(num_blocks, kNoNode) {}

void PrefixBlockIndex::adopt_blocks(RadixNodeId node) {
  for (BlockId b : tree_.find(node)->value()->blocks) {
    node_of_[b.value] = node;
    // A use pinned where the block was before the split moves with it: otherwise the node it
    // left stays pinned, neither idle nor evictable, for as long as the block is in use.
    const RadixNodeId pinned = pinned_at_[b.value];
    if (pinned == kNoNode || pinned == node) continue;
    (void)tree_.pin(node);  // first, so that the path above never passes through 0 pins
    const Status unpinned = tree_.unpin(pinned);
    KVF_CHECK(unpinned.ok(), unpinned.message());
    pinned_at_[b.value] = node;
  }
}

PrefixMatch PrefixBlockIndex::collect(RadixNodeId node, std::optional<RadixNodeId> partial,
                                      size_t partial_blocks) const {
  // The path is walked from its end up to the root: count its blocks first, then fill the result
  // backwards, so a lookup allocates once.
  size_t path_blocks = 0;
  for (RadixNodeId id = node; id != tree_.root();) {
    const Tree::Node* n = tree_.find(id);
    path_blocks += n->value()->blocks.size();
    id = n->parent();
  }
  const Tree::Node* partial_node =
      partial && partial_blocks > 0 ? tree_.find(*partial) : nullptr;
  PrefixMatch out;
  out.tokens = node == tree_.root() ? 0 : tree_.find(node)->depth();
  out.blocks.resize(path_blocks + (partial_node != nullptr ? partial_blocks : 0));
  size_t end = path_blocks;
  for (RadixNodeId id = node; id != tree_.root();) {
    const Tree::Node* n = tree_.find(id);
    const auto& blocks = n->value()->blocks;
    end -= blocks.size();
    std::copy(blocks.begin(), blocks.end(), out.blocks.begin() + static_cast<ptrdiff_t>(end));
    if (n->pins() == 0) out.idle_blocks += blocks.size();
    id = n->parent();
  }
  if (partial_node != nullptr) {
    const auto& blocks = partial_node->value()->blocks;
    std::copy(blocks.begin(), blocks.begin() + static_cast<ptrdiff_t>(partial_blocks),
              out.blocks.begin() + static_cast<ptrdiff_t>(path_blocks));
    out.tokens += partial_blocks * options_.block_size;
    if (partial_node->pins() == 0) out.idle_blocks += partial_blocks;
  }
  return out;
}

PrefixMatch PrefixBlockIndex::peek(std::span<const TokenId> tokens) const {
  return peek(RadixKey(tokens, options_.block_size));
}

PrefixMatch PrefixBlockIndex::peek(const RadixKey& tokens) const {
  const auto m = tree_.peek(tokens);
  return collect(m.node, m.partial, m.partial_length / options_.block_size);
}

PrefixMatch PrefixBlockIndex::match(std::span<const TokenId> tokens) {
  return match_if(tokens, nullptr).value();
}

Result<PrefixMatch> PrefixBlockIndex::match_if(
    std::span<const TokenId> tokens, const std::function<Status(const PrefixMatch&)>& admit) {
  return match_if(RadixKey(tokens, options_.block_size), admit);
}

Result<PrefixMatch> PrefixBlockIndex::match_if(
    const RadixKey& key, const std::function<Status(const PrefixMatch&)>& admit) {
  const std::span<const TokenId> tokens = key.tokens();
  const auto m = tree_.peek(key);
  PrefixMatch out = collect(m.node, m.partial, m.partial_length / options_.block_size);
  if (admit) KVF_RETURN_IF_ERROR(admit(out));
  RadixNodeId end = m.node;
  if (m.partial) {
    // Split where the match ends: the matched front becomes its own node, so using it pins only
    // it and the unmatched rest stays evictable.
    auto upper = tree_.split(*m.partial, m.partial_length);
    KVF_CHECK(upper.ok(), upper.status().message());
    end = upper.value();
    adopt_blocks(end);
  }
  if (end != tree_.root()) (void)tree_.touch(end, /*with_ancestors=*/true);
  stats_.lookups += 1;
  stats_.lookup_tokens += tokens.size();
  stats_.hit_tokens += out.tokens;
  stats_.hit_blocks += out.blocks.size();
  KVF_LOG_TRACE(kPrefix, "match {} tokens: {} cached in {} blocks", tokens.size(), out.tokens,
                out.blocks.size());
  return out;
}

Result<std::vector<BlockId>> PrefixBlockIndex::insert(std::span<const TokenId> tokens,
                                                      std::span<const BlockId> blocks,
                                                      uint32_t priority) {
  return insert(RadixKey(tokens, options_.block_size), blocks, priority);
}

Result<std::vector<BlockId>> PrefixBlockIndex::insert(const RadixKey& full_key,
                                                      std::span<const BlockId> blocks,
                                                      uint32_t priority) {
  const size_t bs = options_.block_size;
  const std::span<const TokenId> tokens = full_key.tokens();
  const size_t key_length =
      options_.cache_partial_blocks ? tokens.size() : tokens.size() - tokens.size() % bs;
  const RadixKey key = full_key.first(key_length);
  const size_t needed = (key_length + bs - 1) / bs;
  if (blocks.size() < needed) {
    return invalid_argument(std::to_string(tokens.size()) + " tokens need " +
                            std::to_string(needed) + " blocks to index, got " +
                            std::to_string(blocks.size()));
  }
  // The blocks that would become new are validated after the walk, before anything changes.
  auto check = [&](size_t existing) -> Status {
    const size_t first_new = existing == key_length ? needed : existing / bs;
    std::vector<BlockId> fresh(blocks.begin() + static_cast<ptrdiff_t>(first_new),
                               blocks.begin() + static_cast<ptrdiff_t>(needed));
    for (BlockId b : fresh) {
      if (b.value >= node_of_.size()) {
        return invalid_argument(to_string(b) + " is outside the pool of " +
                                std::to_string(node_of_.size()) + " blocks");
      }
      if (is_indexed(b)) {
        return invalid_argument(to_string(b) + " is already indexed for another prefix");
      }
    }
    std::sort(fresh.begin(), fresh.end());
    if (const auto dup = std::adjacent_find(fresh.begin(), fresh.end()); dup != fresh.end()) {
      return invalid_argument(to_string(*dup) + " is listed twice");
    }
    return ok_status();
  };
  auto make_value = [&](size_t offset, size_t length) {
    const auto first = static_cast<ptrdiff_t>(offset / bs);
    const auto count = static_cast<ptrdiff_t>((length + bs - 1) / bs);
    return std::optional<BlockPlacement>(BlockPlacement{
        options_.replica, options_.tier,
        std::vector<BlockId>(blocks.begin() + first, blocks.begin() + first + count)});
  };
  KVF_ASSIGN_OR_RETURN(const auto ins, tree_.insert_checked(key, priority, check, make_value));
  if (ins.split) adopt_blocks(*ins.split);
  // The new blocks lie in at most three new nodes below the split point: the rest of a public
  // range, the full salted blocks and the partial tail. Each is pinned once per block, because
  // the sequence holds them all.
  std::vector<BlockId> added;
  for (RadixNodeId id = ins.node; id != tree_.root();) {
    const Tree::Node* n = tree_.find(id);
    if (n->depth() <= ins.existing) break;
    const RadixNodeId parent = n->parent();
    const auto& node_blocks = n->value()->blocks;
    for (BlockId b : node_blocks) {
      node_of_[b.value] = id;
      pinned_at_[b.value] = id;
    }
    added.insert(added.begin(), node_blocks.begin(), node_blocks.end());
    (void)tree_.pin(id, node_blocks.size());
    id = parent;
  }
  used_blocks_ += added.size();
  stats_.insertions += 1;
  stats_.inserted_blocks += added.size();
  KVF_CHECK(ins.length == key_length, "a prefix insert stopped short of its key");
  return added;
}

std::vector<BlockPlacement> PrefixBlockIndex::placements(std::span<const TokenId> tokens) const {
  return placements(RadixKey(tokens, options_.block_size));
}

std::vector<BlockPlacement> PrefixBlockIndex::placements(const RadixKey& key) const {
  std::vector<BlockPlacement> out;
  for (RadixNodeId id = tree_.peek(key).node; id != tree_.root();) {
    const Tree::Node* n = tree_.find(id);
    out.insert(out.begin(), *n->value());
    id = n->parent();
  }
  return out;
}

std::vector<BlockId> PrefixBlockIndex::release_idle(size_t count) {
  std::vector<BlockId> released;
  while (released.size() < count) {
    const auto victim = tree_.next_victim();
    if (!victim) break;
    const size_t held = tree_.find(*victim)->value()->blocks.size();
    const size_t take = std::min(held, count - released.size());
    // Trim the leaf from its end when it holds more than needed: its deepest blocks are the
    // least reusable.
    auto evicted = take < held ? tree_.evict_back(*victim, (held - take) * options_.block_size)
                               : tree_.evict(*victim);
    KVF_CHECK(evicted.ok(), evicted.status().message());
    for (BlockId b : evicted.value().blocks) {
      node_of_[b.value] = kNoNode;
      released.push_back(b);
    }
    stats_.evictions += 1;
    stats_.evicted_blocks += take;
  }
  return released;
}

void PrefixBlockIndex::on_block_used(BlockId block) {
  KVF_CHECK(is_indexed(block) && pinned_at_[block.value] == kNoNode,
            to_string(block) + " was not an idle indexed block");
  const RadixNodeId node = node_of_[block.value];
  (void)tree_.pin(node);
  pinned_at_[block.value] = node;
  ++used_blocks_;
}

void PrefixBlockIndex::on_block_idle(BlockId block) {
  KVF_CHECK(block.value < pinned_at_.size() && pinned_at_[block.value] != kNoNode,
            to_string(block) + " was not a used indexed block");
  // Unpin where the pin was placed: a split since then may have moved the block to a new
  // ancestor, whose count includes the pin all the same.
  const Status status = tree_.unpin(pinned_at_[block.value]);
  KVF_CHECK(status.ok(), status.message());
  pinned_at_[block.value] = kNoNode;
  --used_blocks_;
}

std::vector<BlockId> PrefixBlockIndex::clear() {
  std::vector<BlockId> blocks;
  for (uint32_t b = 0; b < node_of_.size(); ++b) {
    if (is_indexed(BlockId{b})) blocks.push_back(BlockId{b});
  }
  tree_.clear();
  std::fill(node_of_.begin(), node_of_.end(), kNoNode);
  std::fill(pinned_at_.begin(), pinned_at_.end(), kNoNode);
  used_blocks_ = 0;
  return blocks;
}

Status PrefixBlockIndex::verify() const {
  KVF_RETURN_IF_ERROR(tree_.verify());
  auto fail = [](const std::string& what) { return Status(ErrorCode::kInternal, what); };
  const size_t bs = options_.block_size;
  size_t indexed = 0;
  size_t own_pins = 0;
  Status status;
  tree_.for_each_node([&](RadixNodeId id, const Tree::Node& n) {
    if (!status.ok()) return;
    if (!n.value()) {
      status = fail("a node without blocks");
      return;
    }
    const auto& p = *n.value();
    if (p.replica != options_.replica || p.tier != options_.tier) {
      status = fail("a node placed elsewhere");
    } else if (p.blocks.size() != (n.edge().size() + bs - 1) / bs) {
      status = fail("a node with " + std::to_string(p.blocks.size()) + " blocks for " +
                    std::to_string(n.edge().size()) + " tokens");
    }
    for (BlockId b : p.blocks) {
      if (b.value >= node_of_.size() || node_of_[b.value] != id) {
        status = fail(to_string(b) + " does not map back to its node");
      }
    }
    indexed += p.blocks.size();
    own_pins += n.own_pins();
  });
  KVF_RETURN_IF_ERROR(status);
  size_t mapped = 0;
  size_t pinned = 0;
  for (uint32_t b = 0; b < node_of_.size(); ++b) {
    if (is_indexed(BlockId{b})) ++mapped;
    if (pinned_at_[b] != kNoNode) {
      if (!is_indexed(BlockId{b}) || tree_.find(pinned_at_[b]) == nullptr) {
        return fail(to_string(BlockId{b}) + " is pinned at a node that is gone");
      }
      ++pinned;
    }
  }
  if (mapped != indexed) return fail("stale block-to-node entries");
  if (pinned != used_blocks_ || own_pins != used_blocks_) {
    return fail(std::to_string(used_blocks_) + " used blocks but " + std::to_string(pinned) +
                " pinned blocks and " + std::to_string(own_pins) + " pins");
  }
  return ok_status();
}

}  // namespace kvfabric
