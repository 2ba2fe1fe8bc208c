#include "kvfabric/prefix/global_prefix_index.h"

#include <set>

#include <algorithm>
#include <map>
#include <string>

namespace kvfabric {

struct GlobalPrefixIndex::ReplicaState {
  std::vector<uint32_t> node_of;  // block -> node holding it there (kNone: not indexed)
  std::vector<uint8_t> in_use;    // block -> a sequence uses it
  std::set<VictimKey> victims;  // evictable holdings: idle subtree, no held child
  size_t cached = 0;  // indexed blocks
  size_t used = 0;    // of those, in use
  size_t idle = 0;    // blocks of holdings with an idle subtree
  uint64_t evicted = 0;
  bool idle_changed = false;  // listed in idle_changes_
};

size_t GlobalPrefixIndex::cached_blocks(uint32_t replica) const { return replicas_[replica].cached; }
size_t GlobalPrefixIndex::used_blocks(uint32_t replica) const { return replicas_[replica].used; }
size_t GlobalPrefixIndex::idle_blocks(uint32_t replica) const { return replicas_[replica].idle; }
uint64_t GlobalPrefixIndex::evicted_blocks(uint32_t replica) const {
  return replicas_[replica].evicted;
}

// One replica's view of the index, as its pool sees it.
class GlobalPrefixIndex::Retainer final : public BlockRetainer {
 public:
  Retainer(GlobalPrefixIndex& index, uint32_t replica) : index_(index), replica_(replica) {}
  [[nodiscard]] size_t idle_blocks() const override { return index_.idle_blocks(replica_); }
  std::vector<BlockId> release_idle(size_t count) override {
    return index_.release_idle(replica_, count);
  }
  void on_block_used(BlockId block) override { on_blocks_used(std::span(&block, 1)); }
  void on_block_idle(BlockId block) override { on_blocks_idle(std::span(&block, 1)); }
  void on_blocks_used(std::span<const BlockId> blocks) override {
    index_.on_blocks_used(replica_, blocks, /*used=*/true);
  }
  void on_blocks_idle(std::span<const BlockId> blocks) override {
    index_.on_blocks_used(replica_, blocks, /*used=*/false);
  }

 private:
  GlobalPrefixIndex& index_;
  uint32_t replica_;
};

Result<std::unique_ptr<GlobalPrefixIndex>> GlobalPrefixIndex::create(
    const GlobalPrefixOptions& options) {
  if (options.block_size == 0) return invalid_argument("global prefix index block_size must be >= 1");
  if (options.num_replicas == 0) {
    return invalid_argument("global prefix index num_replicas must be >= 1");
  }
  return std::unique_ptr<GlobalPrefixIndex>(new GlobalPrefixIndex(options));
}

GlobalPrefixIndex::GlobalPrefixIndex(const GlobalPrefixOptions& options)
    : options_(options), replicas_(options.num_replicas) {
  nodes_.emplace_back();
  nodes_[0].alive = true;
  for (uint32_t r = 0; r < options.num_replicas; ++r) {
    replicas_[r].node_of.assign(options.blocks_per_replica, kNone);
    replicas_[r].in_use.assign(options.blocks_per_replica, 0);
    retainers_.push_back(std::make_unique<Retainer>(*this, r));
  }
}

GlobalPrefixIndex::~GlobalPrefixIndex() = default;

BlockRetainer& GlobalPrefixIndex::retainer(uint32_t replica) {
  KVF_CHECK(replica < retainers_.size(), "no replica " + std::to_string(replica));
  return *retainers_[replica];
}

bool GlobalPrefixIndex::is_indexed(uint32_t replica, BlockId block) const {
  return replica < replicas_.size() && block.value < options_.blocks_per_replica &&
         replicas_[replica].node_of[block.value] != kNone;
}

size_t GlobalPrefixIndex::idle_blocks_after(uint32_t replica, std::span<const BlockId> released,
                                            std::span<const BlockId> pinned) const {
  const ReplicaState& rs = replicas_[replica];
  std::map<uint32_t, uint64_t> dropped;  // uses each holding's subtree would lose
  for (BlockId b : released) {
    if (!is_indexed(replica, b) || rs.in_use[b.value] == 0) continue;
    for (uint32_t n = rs.node_of[b.value]; n != 0; n = nodes_[n].parent) ++dropped[n];
  }
  std::map<uint32_t, size_t> kept;  // blocks of each holding the request uses again
  for (BlockId b : pinned) {
    if (is_indexed(replica, b)) ++kept[rs.node_of[b.value]];
  }
  size_t idle = rs.idle;
  for (const auto& [node, uses] : dropped) {
    const Holding* h = holding(node, replica);
    if (h->subtree_used != uses) continue;
    // A holding the request reuses stays in use up to where its use ends: use() splits the
    // rest off, which alone turns idle.
    const auto reused = kept.find(node);
    idle += h->blocks.size() - (reused == kept.end() ? 0 : reused->second);
  }
  return idle;
}

bool GlobalPrefixIndex::idle_changed(uint32_t replica) const {
  return replicas_[replica].idle_changed;
}

void GlobalPrefixIndex::clear_idle_changes() {
  for (uint32_t r : idle_changes_) replicas_[r].idle_changed = false;
  idle_changes_.clear();
}

size_t GlobalPrefixIndex::node_blocks(uint32_t node) const {
  return nodes_[node].edge_size() / options_.block_size;
}

GlobalPrefixIndex::Holding* GlobalPrefixIndex::holding(uint32_t node, uint32_t replica) {
  Node& n = nodes_[node];
  const auto it = std::lower_bound(n.holders.begin(), n.holders.end(), replica);
  if (it == n.holders.end() || *it != replica) return nullptr;
  return &n.holdings[static_cast<size_t>(it - n.holders.begin())];
}

const GlobalPrefixIndex::Holding* GlobalPrefixIndex::holding(uint32_t node, uint32_t replica) const {
  return const_cast<GlobalPrefixIndex*>(this)->holding(node, replica);
}

// ---------------------------------------------------------------------------------------------
// Lookups

std::pair<uint32_t, size_t> GlobalPrefixIndex::find_child(uint32_t parent, const RadixKey& key,
                                                          size_t pos,
                                                          std::span<const TokenId> rest) const {
  const Node& p = nodes_[parent];
  const CacheSalt& salt = key.salt_at(pos);
  // A child shares at least its first block with the key; siblings differ inside theirs.
  auto shared = [&](uint32_t c) -> size_t {
    const Node& child = nodes_[c];
    if (child.salt != salt) return 0;
    const size_t lcp = common_prefix_len(child.edge(), rest);
    return lcp >= options_.block_size ? lcp : 0;
  };
  if (p.by_key.empty()) {
    for (uint32_t c : p.children) {
      if (const size_t lcp = shared(c); lcp > 0) return {c, lcp};
    }
    return {kNone, 0};
  }
  return p.by_key.find(key.unit_key(pos), shared);
}

uint64_t GlobalPrefixIndex::unit_key_of(const Node& n) const {
  const uint32_t bs = options_.block_size;
  return detail::radix_salted_key(detail::radix_unit_key(n.edge().first(bs), bs), n.salt);
}

void GlobalPrefixIndex::add_child(uint32_t parent, uint32_t child) {
  Node& p = nodes_[parent];
  nodes_[child].child_pos = static_cast<uint32_t>(p.children.size());
  p.children.push_back(child);
  auto keyed = [&](uint32_t c) {
    Node& n = nodes_[c];
    if (!n.unit_key) n.unit_key = unit_key_of(n);
    return *n.unit_key;
  };
  if (!p.by_key.empty()) {
    p.by_key.insert(keyed(child), child);
  } else if (p.children.size() > kMappedChildren) {
    for (uint32_t c : p.children) p.by_key.insert(keyed(c), c);
  }
}

void GlobalPrefixIndex::remove_child(uint32_t parent, uint32_t child) {
  Node& p = nodes_[parent];
  const uint32_t pos = nodes_[child].child_pos;
  KVF_CHECK(pos < p.children.size() && p.children[pos] == child,
            "a radix node is missing from its parent's children");
  p.children[pos] = p.children.back();  // the last child takes its place
  nodes_[p.children[pos]].child_pos = pos;
  p.children.pop_back();
  if (p.by_key.empty()) return;
  if (p.children.size() <= kMappedChildren / 2) {
    p.by_key.clear();  // few enough to compare one by one again
    return;
  }
  const bool erased = p.by_key.erase(*nodes_[child].unit_key, child);
  KVF_CHECK(erased, "a radix node is missing from its parent's key map");
}

void GlobalPrefixIndex::walk(const RadixKey& key, size_t length, PrefixLookup& out) const {
  out.steps.clear();
  const size_t bs = options_.block_size;
  const std::span<const TokenId> tokens = key.tokens();
  uint32_t cur = 0;
  size_t pos = 0;
  while (pos < length) {
    // The public part of a salted key is compared only up to its end (no edge crosses it).
    const size_t limit = pos < key.public_end() ? std::min(key.public_end(), length) : length;
    const auto [child, lcp] = find_child(cur, key, pos, tokens.subspan(pos, limit - pos));
    if (child == kNone) break;
    const size_t matched = lcp - lcp % bs;
    out.steps.push_back({child, static_cast<uint32_t>(matched / bs), pos + matched});
    if (matched < nodes_[child].edge_size()) break;
    pos += matched;
    cur = child;
  }
}

void GlobalPrefixIndex::lookup(const RadixKey& key, PrefixLookup& out) const {
  const size_t bs = options_.block_size;
  if (key.granularity() != bs) {
    lookup(RadixKey(key.tokens(), options_.block_size, key.scope()), out);
    return;
  }
  const size_t length = key.tokens().size() - key.tokens().size() % bs;
  walk(key, length, out);
}

ReplicaPrefix GlobalPrefixIndex::prefix_on(const PrefixLookup& lookup, uint32_t replica) const {
  ReplicaPrefix prefix;
  for (const PrefixLookup::Step& step : lookup.steps) {
    const Holding* h = holding(step.node, replica);
    if (h == nullptr) break;
    prefix.tokens = step.end;
    prefix.blocks += step.blocks;
    if (h->subtree_used == 0) prefix.idle_blocks += step.blocks;
    ++prefix.steps;
  }
  return prefix;
}

std::span<const uint32_t> GlobalPrefixIndex::holders(const PrefixLookup& lookup,
                                                     size_t step) const {
  return nodes_[lookup.steps.at(step).node].holders;
}

void GlobalPrefixIndex::blocks_on(const PrefixLookup& lookup, uint32_t replica, size_t blocks,
                                  std::vector<BlockId>& out) const {
  out.reserve(out.size() + blocks);
  for (const PrefixLookup::Step& step : lookup.steps) {
    if (blocks == 0) return;
    const Holding* h = holding(step.node, replica);
    KVF_CHECK(h != nullptr, "replica " + std::to_string(replica) + " does not hold the prefix asked for");
    const size_t take = std::min<size_t>(step.blocks, blocks);
    out.insert(out.end(), h->blocks.begin(), h->blocks.begin() + static_cast<ptrdiff_t>(take));
    blocks -= take;
  }
  KVF_CHECK(blocks == 0, "a lookup holds fewer blocks than asked for");
}

void GlobalPrefixIndex::use(const PrefixLookup& lookup, uint32_t replica) {
  const ReplicaPrefix held = prefix_on(lookup, replica);
  if (held.steps == 0) return;
  const PrefixLookup::Step& last = lookup.steps[held.steps - 1];
  uint32_t end = last.node;
  // The used front becomes its own node, so that using it pins only it and the rest of the edge
  // stays evictable.
  if (last.blocks < node_blocks(last.node)) end = split(last.node, last.blocks);
  touch_path(end, replica);
}

// ---------------------------------------------------------------------------------------------
// Holdings, clocks and counts

template <typename Change>
void GlobalPrefixIndex::update(uint32_t node, uint32_t replica, Change&& change) {
  update(node, *holding(node, replica), replica, std::forward<Change>(change));
}

template <typename Change>
void GlobalPrefixIndex::update(uint32_t node, Holding& h, uint32_t replica, Change&& change) {
  auto& victims = replicas_[replica].victims;
  if (h.in_victims) victims.erase(VictimKey{h.last_access, h.serial, node});
  change(h);
  h.in_victims = evictable(h);
  if (h.in_victims) victims.insert(VictimKey{h.last_access, h.serial, node});
}

void GlobalPrefixIndex::touch_path(uint32_t node, uint32_t replica) {
  ++tick_;
  for (uint32_t n = node; n != 0; n = nodes_[n].parent) {
    Holding& h = *holding(n, replica);
    if (h.in_victims) {
      update(n, h, replica, [&](Holding& x) { x.last_access = tick_; });
    } else {
      h.last_access = tick_;  // not a victim: no place in the victim set to move
    }
  }
}

void GlobalPrefixIndex::change_used(uint32_t node, uint32_t replica, uint32_t count, bool add) {
  ReplicaState& rs = replicas_[replica];
  Holding* own = holding(node, replica);
  own->own_used = add ? own->own_used + count : own->own_used - count;
  // A subtree count never decreases towards the root: only the holdings at the bottom of the
  // path whose count leaves 0 (add) or reaches it (remove) change idleness; above them the path
  // only counts.
  const uint64_t crossing = add ? 0 : count;
  for (uint32_t n = node; n != 0; n = nodes_[n].parent) {
    Holding& h = n == node ? *own : *holding(n, replica);
    if (h.subtree_used != crossing) {
      h.subtree_used = add ? h.subtree_used + count : h.subtree_used - count;
      continue;
    }
    update(n, h, replica, [&](Holding& x) { x.subtree_used = add ? x.subtree_used + count : 0; });
    const size_t blocks = h.blocks.size();
    rs.idle = add ? rs.idle - blocks : rs.idle + blocks;
  }
}

uint32_t GlobalPrefixIndex::take_slot() {
  if (free_slots_.empty()) {
    nodes_.emplace_back();
    return static_cast<uint32_t>(nodes_.size() - 1);
  }
  const uint32_t i = free_slots_.back();
  free_slots_.pop_back();
  spare_tokens_ -= nodes_[i].tokens.capacity();
  return i;
}

uint32_t GlobalPrefixIndex::new_node(uint32_t parent, std::span<const TokenId> edge,
                                     std::optional<uint64_t> key, const CacheSalt& salt) {
  const uint32_t i = take_slot();
  Node& n = nodes_[i];
  n.alive = true;
  set_edge(n, edge);
  n.parent = parent;
  n.depth = nodes_[parent].depth + edge.size();
  n.unit_key = key;
  n.salt = salt;
  add_child(parent, i);
  if (recording_) hash_blocks(i);
  return i;
}

uint32_t GlobalPrefixIndex::split(uint32_t node, size_t blocks) {
  const size_t at = blocks * options_.block_size;
  const uint32_t u = take_slot();
  Node& n = nodes_[node];
  Node& upper = nodes_[u];
  // The upper part takes the node's place under its parent (same first block, same key) and the
  // node hangs below it; the node's new first block gets a key only if it is ever needed.
  upper.alive = true;
  const std::span<const TokenId> front = n.edge().first(at);
  set_edge(upper, front);
  upper.parent = n.parent;
  upper.depth = nodes_[n.parent].depth + at;
  upper.salt = n.salt;
  upper.unit_key = n.unit_key;
  upper.children.push_back(node);
  upper.child_pos = n.child_pos;
  Node& p = nodes_[n.parent];
  p.children[n.child_pos] = u;
  n.child_pos = 0;
  if (!p.by_key.empty()) {
    const bool moved = p.by_key.replace(*n.unit_key, node, u);
    KVF_CHECK(moved, "a radix node is missing from its parent's key map");
  }
  n.edge_begin += at;
  n.parent = u;
  n.unit_key.reset();
  if (recording_) {
    upper.block_hashes.assign(n.block_hashes.begin(), n.block_hashes.begin() + static_cast<ptrdiff_t>(blocks));
    n.block_hashes.erase(n.block_hashes.begin(), n.block_hashes.begin() + static_cast<ptrdiff_t>(blocks));
  }
  upper.holders = n.holders;
  upper.holdings.resize(n.holdings.size());
  for (size_t i = 0; i < n.holders.size(); ++i) {
    const uint32_t r = n.holders[i];
    ReplicaState& rs = replicas_[r];
    Holding& lower = n.holdings[i];
    Holding& up = upper.holdings[i];
    up.blocks.assign(lower.blocks.begin(), lower.blocks.begin() + static_cast<ptrdiff_t>(blocks));
    lower.blocks.erase(lower.blocks.begin(), lower.blocks.begin() + static_cast<ptrdiff_t>(blocks));
    uint32_t front_used = 0;
    for (BlockId b : up.blocks) {
      rs.node_of[b.value] = u;
      front_used += rs.in_use[b.value];
    }
    up.own_used = front_used;
    up.subtree_used = lower.subtree_used;
    up.held_children = 1;
    up.last_access = lower.last_access;
    up.serial = ++serial_;
    // The lower part loses the front's uses: it may become idle, and evictable.
    const bool was_idle = lower.subtree_used == 0;
    if (lower.in_victims) rs.victims.erase(VictimKey{lower.last_access, lower.serial, node});
    lower.own_used -= front_used;
    lower.subtree_used -= front_used;
    if (!was_idle && lower.subtree_used == 0) {
      rs.idle += lower.blocks.size();
      if (!rs.idle_changed) {  // on behalf of whichever replica split the node: tell the owner
        rs.idle_changed = true;
        idle_changes_.push_back(r);
      }
    }
    lower.in_victims = evictable(lower);
    if (lower.in_victims) rs.victims.insert(VictimKey{lower.last_access, lower.serial, node});
  }
  return u;
}

void GlobalPrefixIndex::add_holding(uint32_t node, uint32_t replica,
                                    std::span<const BlockId> blocks) {
  ReplicaState& rs = replicas_[replica];
  Node& n = nodes_[node];
  const auto at = std::lower_bound(n.holders.begin(), n.holders.end(), replica);
  const auto index = at - n.holders.begin();
  n.holders.insert(at, replica);
  Holding h;
  h.blocks.assign(blocks.begin(), blocks.end());
  h.last_access = tick_;
  h.serial = ++serial_;
  n.holdings.insert(n.holdings.begin() + index, std::move(h));
  for (BlockId b : blocks) {
    rs.node_of[b.value] = node;
    rs.in_use[b.value] = 1;
  }
  rs.cached += blocks.size();
  rs.used += blocks.size();
  rs.idle += blocks.size();  // until change_used() counts the uses below
  if (n.parent != 0) update(n.parent, replica, [](Holding& p) { ++p.held_children; });
  change_used(node, replica, static_cast<uint32_t>(blocks.size()), /*add=*/true);
  if (recording_) note_stored(node, replica);
}

void GlobalPrefixIndex::drop_holding(uint32_t node, uint32_t replica,
                                     std::vector<BlockId>& released) {
  ReplicaState& rs = replicas_[replica];
  Node& n = nodes_[node];
  const auto at = std::lower_bound(n.holders.begin(), n.holders.end(), replica);
  const auto index = at - n.holders.begin();
  Holding& h = n.holdings[static_cast<size_t>(index)];
  KVF_CHECK(evictable(h), "dropping a holding that is in use or has a held child");
  if (h.in_victims) rs.victims.erase(VictimKey{h.last_access, h.serial, node});
  for (BlockId b : h.blocks) {
    rs.node_of[b.value] = kNone;
    released.push_back(b);
  }
  rs.cached -= h.blocks.size();
  rs.idle -= h.blocks.size();
  rs.evicted += h.blocks.size();
  if (recording_) note_removed(replica, n.block_hashes);
  n.holders.erase(at);
  n.holdings.erase(n.holdings.begin() + index);
  const uint32_t parent = n.parent;
  if (parent != 0) update(parent, replica, [](Holding& p) { --p.held_children; });
  if (nodes_[node].holders.empty()) remove_node(node);
}

void GlobalPrefixIndex::trim_holding(uint32_t node, uint32_t replica, size_t keep,
                                     std::vector<BlockId>& released) {
  ReplicaState& rs = replicas_[replica];
  if (nodes_[node].holders.size() > 1) {
    // Others hold the whole edge: the replica keeps the front as a node of its own, which keeps
    // the trimmed holding's place in the eviction order.
    const uint64_t serial = holding(node, replica)->serial;
    const uint32_t front = split(node, keep);
    drop_holding(node, replica, released);
    update(front, replica, [&](Holding& h) { h.serial = serial; });
    return;
  }
  // The replica alone holds the node, so nothing hangs below it: shorten it in place.
  Node& n = nodes_[node];
  KVF_CHECK(n.children.empty(), "a node held by one replica has children it does not hold");
  Holding& h = n.holdings.front();
  for (size_t i = keep; i < h.blocks.size(); ++i) {
    rs.node_of[h.blocks[i].value] = kNone;
    released.push_back(h.blocks[i]);
  }
  const size_t dropped = h.blocks.size() - keep;
  rs.cached -= dropped;
  rs.idle -= dropped;
  rs.evicted += dropped;
  h.blocks.resize(keep);
  if (recording_) {
    note_removed(replica, std::span(n.block_hashes).subspan(keep));
    n.block_hashes.resize(keep);
  }
  n.tokens.resize(n.edge_begin + keep * options_.block_size);
  if (n.edge_begin > n.edge_size()) {  // more dead front than edge: keep the edge alone
    n.tokens.erase(n.tokens.begin(), n.tokens.begin() + static_cast<ptrdiff_t>(n.edge_begin));
    n.tokens.shrink_to_fit();
    n.edge_begin = 0;
  }
  n.depth = nodes_[n.parent].depth + n.edge_size();
}

void GlobalPrefixIndex::trim_spare() {
  const size_t budget = kSpareBlocks * options_.block_size;
  for (size_t i = 0; i < free_slots_.size() && spare_tokens_ > budget; ++i) {
    std::vector<TokenId>& buffer = nodes_[free_slots_[i]].tokens;
    spare_tokens_ -= buffer.capacity();
    buffer = std::vector<TokenId>();
  }
}

void GlobalPrefixIndex::remove_node(uint32_t node) {
  KVF_CHECK(nodes_[node].children.empty(), "removing a node that has children");
  remove_child(nodes_[node].parent, node);
  clear_node(nodes_[node]);
  free_slots_.push_back(node);
}

void GlobalPrefixIndex::set_edge(Node& n, std::span<const TokenId> edge) {
  if (n.tokens.capacity() > 2 * edge.size()) n.tokens = std::vector<TokenId>();
  n.tokens.assign(edge.begin(), edge.end());
  n.edge_begin = 0;
}

void GlobalPrefixIndex::clear_node(Node& n) {
  spare_tokens_ += n.tokens.capacity();
  n.tokens.clear();
  n.edge_begin = 0;
  n.parent = kNone;
  n.depth = 0;
  n.salt = {};
  n.children.clear();
  n.child_pos = 0;
  n.by_key.clear();  // the table of a node that had many children is not kept
  n.unit_key.reset();
  n.block_hashes.clear();
  n.holders.clear();
  n.holdings.clear();
  n.alive = false;
}

// ---------------------------------------------------------------------------------------------
// KV events

void GlobalPrefixIndex::hash_blocks(uint32_t node) {
  Node& n = nodes_[node];
  const Node& parent = nodes_[n.parent];
  std::optional<uint64_t> previous;
  if (!parent.block_hashes.empty()) previous = parent.block_hashes.back();
  const std::span<const TokenId> edge = n.edge();
  const size_t bs = options_.block_size;
  n.block_hashes.clear();
  n.block_hashes.reserve(edge.size() / bs);
  for (size_t at = 0; at + bs <= edge.size(); at += bs) {
    previous = kv_block_hash(previous, edge.subspan(at, bs), n.salt);
    n.block_hashes.push_back(*previous);
  }
}

namespace {

// Appends a BlockStored event for `replica`'s holding of a node (its blocks' hashes, the hash of
// its parent's last block), merged into the last event when that one ends where it starts: a
// prompt indexed across several nodes is one run of blocks, as vLLM sends it.
void add_stored(std::vector<KvEvent>& out, uint32_t replica, std::span<const uint64_t> hashes,
                std::span<const uint64_t> parent_hashes, const CacheSalt& salt,
                uint32_t block_size) {
  const std::optional<uint64_t> parent =
      parent_hashes.empty() ? std::nullopt : std::optional(parent_hashes.back());
  const auto tokens = static_cast<uint32_t>(hashes.size() * block_size);
  if (!out.empty()) {
    KvEvent& last = out.back();
    if (last.type == KvEventType::kBlockStored && last.replica == replica && last.salt == salt &&
        parent && last.block_hashes.back() == *parent) {
      last.block_hashes.insert(last.block_hashes.end(), hashes.begin(), hashes.end());
      last.num_tokens += tokens;
      return;
    }
  }
  out.push_back(KvEvent{KvEventType::kBlockStored, replica,
                        std::vector<uint64_t>(hashes.begin(), hashes.end()), parent, tokens, salt});
}

}  // namespace

void GlobalPrefixIndex::note_stored(uint32_t node, uint32_t replica) {
  const Node& n = nodes_[node];
  add_stored(events_, replica, n.block_hashes, nodes_[n.parent].block_hashes, n.salt,
             options_.block_size);
}

void GlobalPrefixIndex::note_removed(uint32_t replica, std::span<const uint64_t> hashes) {
  if (!events_.empty() && events_.back().type == KvEventType::kBlockRemoved &&
      events_.back().replica == replica) {
    events_.back().block_hashes.insert(events_.back().block_hashes.end(), hashes.begin(),
                                       hashes.end());
    return;
  }
  KvEvent removed;
  removed.type = KvEventType::kBlockRemoved;
  removed.replica = replica;
  removed.block_hashes.assign(hashes.begin(), hashes.end());
  events_.push_back(std::move(removed));
}

void GlobalPrefixIndex::record_events(bool on) {
  if (on == recording_) return;
  recording_ = on;
  events_.clear();
  // Parents before children, so that each node hashes on from its parent's last block.
  std::vector<uint32_t> pending(nodes_[0].children.begin(), nodes_[0].children.end());
  while (!pending.empty()) {
    const uint32_t node = pending.back();
    pending.pop_back();
    if (on) {
      hash_blocks(node);
    } else {
      nodes_[node].block_hashes = {};
    }
    pending.insert(pending.end(), nodes_[node].children.begin(), nodes_[node].children.end());
  }
}

std::vector<KvEvent> GlobalPrefixIndex::take_events() { return std::exchange(events_, {}); }

std::vector<KvEvent> GlobalPrefixIndex::holdings_as_events() const {
  std::vector<KvEvent> out;
  if (!recording_) return out;
  for (uint32_t r = 0; r < replicas_.size(); ++r) {
    // Depth first, so that a node's first child continues its run of blocks.
    std::vector<uint32_t> pending(nodes_[0].children.rbegin(), nodes_[0].children.rend());
    while (!pending.empty()) {
      const uint32_t node = pending.back();
      pending.pop_back();
      const Node& n = nodes_[node];
      if (!std::binary_search(n.holders.begin(), n.holders.end(), r)) continue;
      add_stored(out, r, n.block_hashes, nodes_[n.parent].block_hashes, n.salt,
                 options_.block_size);
      pending.insert(pending.end(), n.children.rbegin(), n.children.rend());
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Indexing and eviction

Result<std::vector<BlockId>> GlobalPrefixIndex::insert(uint32_t replica, const RadixKey& key,
                                                       std::span<const BlockId> blocks) {
  const size_t bs = options_.block_size;
  if (key.granularity() != bs) {
    return insert(replica, RadixKey(key.tokens(), options_.block_size, key.scope()), blocks);
  }
  if (replica >= replicas_.size()) {
    return invalid_argument("replica " + std::to_string(replica) + " of " +
                            std::to_string(replicas_.size()));
  }
  const std::span<const TokenId> tokens = key.tokens();
  const size_t length = tokens.size() - tokens.size() % bs;
  const size_t needed = length / bs;
  if (blocks.size() < needed) {
    return invalid_argument(std::to_string(tokens.size()) + " tokens need " +
                            std::to_string(needed) + " blocks to index, got " +
                            std::to_string(blocks.size()));
  }
  PrefixLookup path;
  walk(key, length, path);
  const ReplicaPrefix held = prefix_on(path, replica);
  // The blocks that would become new are checked before anything changes.
  std::vector<BlockId> fresh(blocks.begin() + static_cast<ptrdiff_t>(held.blocks),
                             blocks.begin() + static_cast<ptrdiff_t>(needed));
  for (BlockId b : fresh) {
    if (b.value >= options_.blocks_per_replica) {
      return invalid_argument(to_string(b) + " is outside the pool of " +
                              std::to_string(options_.blocks_per_replica) + " blocks");
    }
    if (is_indexed(replica, b)) {
      return invalid_argument(to_string(b) + " is already indexed on replica " +
                              std::to_string(replica) + " for another prefix");
    }
  }
  {
    std::vector<BlockId> sorted = fresh;
    std::sort(sorted.begin(), sorted.end());
    if (const auto dup = std::adjacent_find(sorted.begin(), sorted.end()); dup != sorted.end()) {
      return invalid_argument(to_string(*dup) + " is listed twice");
    }
  }
  uint32_t cur = 0;
  size_t pos = 0;
  for (size_t i = 0; i < path.steps.size(); ++i) {
    const PrefixLookup::Step& step = path.steps[i];
    uint32_t node = step.node;
    // The key leaves this edge (or ends) inside it: the shared front becomes its own node.
    if (step.blocks < node_blocks(node)) node = split(node, step.blocks);
    if (i >= held.steps) add_holding(node, replica, blocks.subspan(pos / bs, step.blocks));
    cur = node;
    pos = step.end;
  }
  // New nodes for the rest: the rest of the public part, then the salted part.
  const size_t public_end = std::min(key.public_end(), length);
  while (pos < length) {
    const size_t end = pos < public_end ? public_end : length;
    // The key's hash of this block, when the parent looks children up by key anyway.
    const std::optional<uint64_t> unit =
        nodes_[cur].by_key.empty() ? std::nullopt : std::optional(key.unit_key(pos));
    cur = new_node(cur, tokens.subspan(pos, end - pos), unit, key.salt_at(pos));
    add_holding(cur, replica, blocks.subspan(pos / bs, (end - pos) / bs));
    pos = end;
  }
  if (cur != 0) touch_path(cur, replica);
  trim_spare();
  return fresh;
}

std::vector<BlockId> GlobalPrefixIndex::forget(const PrefixLookup& lookup, uint32_t replica) {
  std::vector<BlockId> released;
  // From the deepest step the replica holds (others may hold the key deeper).
  for (size_t i = prefix_on(lookup, replica).steps; i-- > 0;) {
    const PrefixLookup::Step& step = lookup.steps[i];
    const Holding* h = holding(step.node, replica);
    if (step.blocks < node_blocks(step.node) || h == nullptr || !evictable(*h)) break;
    drop_holding(step.node, replica, released);
  }
  return released;
}

std::vector<BlockId> GlobalPrefixIndex::release_idle(uint32_t replica, size_t count) {
  std::vector<BlockId> released;
  released.reserve(count);
  auto& victims = replicas_[replica].victims;
  while (released.size() < count && !victims.empty()) {
    const uint32_t node = std::get<2>(*victims.begin());
    const size_t held = node_blocks(node);
    const size_t take = std::min(held, count - released.size());
    // A leaf holding more than needed is trimmed from its end: its deepest blocks are the least
    // reusable.
    if (take < held) {
      trim_holding(node, replica, held - take, released);
    } else {
      drop_holding(node, replica, released);
    }
  }
  return released;
}

void GlobalPrefixIndex::on_blocks_used(uint32_t replica, std::span<const BlockId> blocks,
                                       bool used) {
  ReplicaState& rs = replicas_[replica];
  for (size_t i = 0; i < blocks.size();) {
    // A run of blocks in one node (a shared prefix lists its nodes' blocks in order).
    const uint32_t node = is_indexed(replica, blocks[i]) ? rs.node_of[blocks[i].value] : kNone;
    uint32_t run = 0;
    for (; i < blocks.size(); ++i, ++run) {
      const BlockId b = blocks[i];
      if (!is_indexed(replica, b) || rs.node_of[b.value] != node) break;
      KVF_CHECK(rs.in_use[b.value] == (used ? 0 : 1),
                to_string(b) + " was not " + (used ? "an idle" : "a used") +
                    " indexed block of replica " + std::to_string(replica));
      rs.in_use[b.value] = used ? 1 : 0;
    }
    KVF_CHECK(run > 0, to_string(blocks[i]) + " is not indexed on replica " + std::to_string(replica));
    rs.used = used ? rs.used + run : rs.used - run;
    change_used(node, replica, run, used);
  }
}

// ---------------------------------------------------------------------------------------------
// Accounting and checks

size_t GlobalPrefixIndex::memory_bytes() const {
  size_t bytes = nodes_.size() * sizeof(Node) + free_slots_.capacity() * sizeof(uint32_t);
  for (const Node& n : nodes_) {
    bytes += n.tokens.capacity() * sizeof(TokenId) + n.holders.capacity() * sizeof(uint32_t) +
             n.holdings.capacity() * sizeof(Holding) +
             n.children.capacity() * sizeof(uint32_t) +
             n.block_hashes.capacity() * sizeof(uint64_t) +
             n.by_key.memory_bytes();
    for (const Holding& h : n.holdings) bytes += h.blocks.capacity() * sizeof(BlockId);
  }
  for (const ReplicaState& rs : replicas_) {
    bytes += rs.node_of.capacity() * sizeof(uint32_t) + rs.in_use.capacity() +
             rs.victims.size() * (sizeof(VictimKey) + 4 * sizeof(void*));
  }
  return bytes;
}

Status GlobalPrefixIndex::verify() const {
  auto fail = [](const std::string& what) { return Status(ErrorCode::kInternal, what); };
  const size_t bs = options_.block_size;
  struct Counts {
    size_t cached = 0, used = 0, idle = 0, victims = 0;
  };
  std::vector<Counts> counts(replicas_.size());
  // Subtree uses recomputed bottom-up need children first: collect them per node.
  std::vector<std::vector<uint32_t>> children(nodes_.size());
  for (uint32_t i = 1; i < nodes_.size(); ++i) {
    const Node& n = nodes_[i];
    if (!n.alive) continue;
    const std::string where = "node at depth " + std::to_string(n.depth);
    if (n.parent >= nodes_.size() || !nodes_[n.parent].alive) return fail(where + ": dangling parent");
    const Node& p = nodes_[n.parent];
    children[n.parent].push_back(i);
    if (n.child_pos >= p.children.size() || p.children[n.child_pos] != i) {
      return fail(where + ": its parent does not list it where it says");
    }
    if (n.edge_size() == 0 || n.edge_size() % bs != 0) return fail(where + ": an edge of partial blocks");
    if (n.unit_key && *n.unit_key != unit_key_of(n)) return fail(where + ": stale unit key");
    if (!p.by_key.empty()) {
      if (!n.unit_key) return fail(where + ": no key under a parent that maps its children");
      if (!p.by_key.contains(*n.unit_key, i)) {
        return fail(where + ": its parent's key map does not list it");
      }
    }
    if (n.depth != p.depth + n.edge_size()) return fail(where + ": wrong depth");
    if (n.parent != 0 && !p.salt.empty() && p.salt != n.salt) {
      return fail(where + ": a salted node with a child of another salt");
    }
    if (recording_) {
      // The hashes chain on from the parent's last block, as a router computes them.
      std::optional<uint64_t> previous;
      if (!p.block_hashes.empty()) previous = p.block_hashes.back();
      if (n.block_hashes.size() != n.edge_size() / bs) return fail(where + ": wrong hash count");
      for (size_t b = 0; b < n.block_hashes.size(); ++b) {
        previous = kv_block_hash(previous, n.edge().subspan(b * bs, bs), n.salt);
        if (n.block_hashes[b] != *previous) return fail(where + ": a stale block hash");
      }
    } else if (!n.block_hashes.empty()) {
      return fail(where + ": block hashes kept while not recording events");
    }
    if (n.holders.empty()) return fail(where + ": nobody holds it");
    if (n.holders.size() != n.holdings.size() ||
        !std::is_sorted(n.holders.begin(), n.holders.end()) ||
        std::adjacent_find(n.holders.begin(), n.holders.end()) != n.holders.end()) {
      return fail(where + ": holders out of order");
    }
    for (size_t k = 0; k < n.holders.size(); ++k) {
      const uint32_t r = n.holders[k];
      const Holding& h = n.holdings[k];
      const ReplicaState& rs = replicas_[r];
      if (n.parent != 0 && holding(n.parent, r) == nullptr) {
        return fail(where + ": replica " + std::to_string(r) + " holds it without its parent");
      }
      if (h.blocks.size() != n.edge_size() / bs) return fail(where + ": wrong block count");
      uint32_t used = 0;
      for (BlockId b : h.blocks) {
        if (b.value >= rs.node_of.size() || rs.node_of[b.value] != i) {
          return fail(to_string(b) + " of replica " + std::to_string(r) + " does not map back");
        }
        used += rs.in_use[b.value];
      }
      if (used != h.own_used) return fail(where + ": stale own use count");
      counts[r].cached += h.blocks.size();
      counts[r].used += used;
    }
  }
  // Subtree counts, held children, idleness and victims, per holding.
  for (uint32_t i = 1; i < nodes_.size(); ++i) {
    const Node& n = nodes_[i];
    if (!n.alive) continue;
    if (n.children.size() != children[i].size() ||
        (!n.by_key.empty() && n.by_key.size() != n.children.size())) {
      return fail("stale child entries");
    }
    for (size_t k = 0; k < n.holders.size(); ++k) {
      const uint32_t r = n.holders[k];
      const Holding& h = n.holdings[k];
      uint64_t below = 0;
      uint32_t held_children = 0;
      for (uint32_t c : children[i]) {
        if (const Holding* ch = holding(c, r)) {
          below += ch->subtree_used;
          ++held_children;
        }
      }
      if (h.subtree_used != h.own_used + below) return fail("stale subtree use count");
      if (h.held_children != held_children) return fail("stale held-children count");
      if (h.subtree_used == 0) counts[r].idle += h.blocks.size();
      const bool listed = replicas_[r].victims.count(VictimKey{h.last_access, h.serial, i}) > 0;
      if (h.in_victims != evictable(h) || listed != h.in_victims) return fail("victim set out of date");
      counts[r].victims += h.in_victims ? 1 : 0;
    }
  }
  if (nodes_[0].children.size() != children[0].size() ||
      (!nodes_[0].by_key.empty() && nodes_[0].by_key.size() != nodes_[0].children.size())) {
    return fail("stale child entries at the root");
  }
  size_t spare = 0;
  for (uint32_t slot : free_slots_) spare += nodes_[slot].tokens.capacity();
  if (spare != spare_tokens_) return fail("the free slots keep another count of spare tokens");
  for (uint32_t r = 0; r < replicas_.size(); ++r) {
    const ReplicaState& rs = replicas_[r];
    size_t mapped = 0, in_use = 0;
    for (uint32_t b = 0; b < rs.node_of.size(); ++b) {
      if (rs.node_of[b] != kNone) ++mapped;
      if (rs.in_use[b] != 0) {
        if (rs.node_of[b] == kNone) return fail("an unindexed block marked in use");
        ++in_use;
      }
    }
    const Counts& c = counts[r];
    if (mapped != c.cached || rs.cached != c.cached || rs.used != c.used || in_use != c.used ||
        rs.idle != c.idle || rs.victims.size() != c.victims) {
      return fail("replica " + std::to_string(r) + " counts " + std::to_string(rs.cached) +
                  " cached, " + std::to_string(rs.used) + " used, " + std::to_string(rs.idle) +
                  " idle; its holdings " + std::to_string(c.cached) + ", " +
                  std::to_string(c.used) + ", " + std::to_string(c.idle));
    }
  }
  return ok_status();
}

}  // namespace kvfabric
