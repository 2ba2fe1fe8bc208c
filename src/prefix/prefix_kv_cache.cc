#include "kvfabric/prefix/prefix_kv_cache.h"

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/log.h"

namespace kvfabric {
namespace detail {

// A snapshot describes its whole key: it stays with the lower node of a split.
struct SnapshotTraits {
  size_t bytes(const CachedKvState& s) const { return s.memory_bytes(); }
  std::optional<CachedKvState> split_front(CachedKvState&, size_t) const { return std::nullopt; }
};

struct PrefixKvCacheState {
  explicit PrefixKvCacheState(const PrefixCacheConfig& c)
      : config(c), tree(RadixTreeOptions{1, RadixEvictionOrder::kLru, RadixEvictScope::kEntries}) {}

  PrefixCacheConfig config;
  RadixTree<CachedKvState, SnapshotTraits> tree;
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t generation = 0;  // bumped by clear(): older handles no longer name a node
};

namespace {

void enforce_limits(PrefixKvCacheState& st) {
  // Zero-byte entries do not end a loop: only "no victim left" (everything pinned) does.
  while (st.tree.entries() > st.config.max_entries) {
    const auto victim = st.tree.next_victim();
    if (!victim) break;
    (void)st.tree.evict(*victim);
  }
  while (st.tree.bytes() > st.config.max_memory_bytes) {
    const auto victim = st.tree.next_victim();
    if (!victim) break;
    (void)st.tree.evict(*victim);
  }
}

// With partial reuse, a query that stops matching at or inside a node can use any entry below
// it. The choice is deterministic: the first entry met going down, taking at each level the
// most recently used child (then the older one).
std::optional<RadixNodeId> entry_below(const RadixTree<CachedKvState, SnapshotTraits>& tree,
                                       RadixNodeId start) {
  RadixNodeId id = start;
  while (true) {
    const auto* node = tree.find(id);
    if (node->value()) return id;
    std::optional<RadixNodeId> best;
    std::tuple<uint64_t, uint64_t> best_key{0, 0};
    (void)tree.for_each_child(id, [&](RadixNodeId child, const auto& n) {
      const std::tuple<uint64_t, uint64_t> key{n.last_access(), UINT64_MAX - n.serial()};
      if (!best || key > best_key) {
        best = child;
        best_key = key;
      }
    });
    if (!best) return std::nullopt;
    id = *best;
  }
}

}  // namespace
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// PrefixHit

PrefixHit::PrefixHit(size_t matched_len, CachedKvState state,
                     std::weak_ptr<detail::PrefixKvCacheState> owner, RadixNodeId node,
                     uint64_t generation)
    : matched_len_(matched_len),
      state_(std::move(state)),
      state_owner_(std::move(owner)),
      node_(node),
      generation_(generation),
      pinned_(true) {}

PrefixHit::PrefixHit(PrefixHit&& other) noexcept
    : matched_len_(other.matched_len_),
      state_(other.state_),
      state_owner_(std::move(other.state_owner_)),
      node_(other.node_),
      generation_(other.generation_),
      pinned_(other.pinned_) {
  other.pinned_ = false;
}

PrefixHit& PrefixHit::operator=(PrefixHit&& other) noexcept {
  if (this != &other) {
    release();
    matched_len_ = other.matched_len_;
    state_ = other.state_;
    state_owner_ = std::move(other.state_owner_);
    node_ = other.node_;
    generation_ = other.generation_;
    pinned_ = other.pinned_;
    other.pinned_ = false;
  }
  return *this;
}

PrefixHit::~PrefixHit() {
  release();
}

void PrefixHit::release() {
  if (!pinned_) return;
  pinned_ = false;
  const auto st = state_owner_.lock();
  if (!st || st->generation != generation_) return;
  const Status status = st->tree.unpin(node_);
  KVF_CHECK(status.ok(), "a prefix hit lost its pin: " + status.to_string());
  detail::enforce_limits(*st);
}

// ---------------------------------------------------------------------------------------------
// PrefixKvCache

PrefixKvCache::PrefixKvCache(PrefixCacheConfig config)
    : state_(std::make_shared<detail::PrefixKvCacheState>(config)) {}

// A moved-from cache is a valid empty cache with the same limits.
PrefixKvCache::PrefixKvCache(PrefixKvCache&& other) noexcept
    : state_(std::exchange(other.state_,
                           std::make_shared<detail::PrefixKvCacheState>(other.state_->config))) {}

PrefixKvCache& PrefixKvCache::operator=(PrefixKvCache&& other) noexcept {
  if (this != &other) {
    state_ = std::exchange(other.state_,
                           std::make_shared<detail::PrefixKvCacheState>(other.state_->config));
  }
  return *this;
}

PrefixKvCache::~PrefixKvCache() = default;

const PrefixCacheConfig& PrefixKvCache::config() const {
  return state_->config;
}
size_t PrefixKvCache::memory_usage() const {
  return state_->tree.bytes();
}
size_t PrefixKvCache::len() const {
  return state_->tree.entries();
}
uint64_t PrefixKvCache::hits() const {
  return state_->hits;
}
uint64_t PrefixKvCache::misses() const {
  return state_->misses;
}
uint64_t PrefixKvCache::pinned() const {
  return state_->tree.find(state_->tree.root())->pins();
}
Status PrefixKvCache::verify() const {
  return state_->tree.verify();
}

void PrefixKvCache::clear() {
  state_->tree.clear();
  state_->hits = 0;
  state_->misses = 0;
  state_->generation += 1;
}

std::optional<PrefixHit> PrefixKvCache::lookup(std::span<const TokenId> tokens) {
  detail::PrefixKvCacheState& st = *state_;
  auto& tree = st.tree;
  if (tokens.empty()) {
    st.misses += 1;
    return std::nullopt;
  }
  const auto m = tree.peek(tokens);
  // The seed's answer: the deepest stored key on the path, a whole prefix of the query.
  std::optional<RadixNodeId> entry;
  size_t matched = 0;
  for (RadixNodeId id = m.node; id != tree.root(); id = tree.find(id)->parent()) {
    if (tree.find(id)->value()) {
      entry = id;
      matched = tree.find(id)->depth();
      break;
    }
  }
  if (st.config.partial_prefix_reuse) {
    // A longer stored key that shares more of the query: below the partly matched child, or
    // below the deepest matched node when that node is not an entry itself.
    std::optional<RadixNodeId> start;
    size_t common = 0;
    if (m.partial) {
      start = m.partial;
      common = m.length + m.partial_length;
    } else if (m.node != tree.root() && !tree.find(m.node)->value()) {
      start = m.node;
      common = m.length;
    }
    if (start && common > matched) {
      if (const auto below = detail::entry_below(tree, *start)) {
        entry = below;
        matched = common;
      }
    }
  }
  if (!entry || matched < st.config.min_prefix_len) {
    st.misses += 1;
    return std::nullopt;
  }
  st.hits += 1;
  (void)tree.touch(*entry, /*with_ancestors=*/false);  // only the entry returned
  (void)tree.pin(*entry);
  return PrefixHit(matched, *tree.find(*entry)->value(), state_, *entry, st.generation);
}

Result<bool> PrefixKvCache::store(std::span<const TokenId> tokens, const KvCacheAccess& kv,
                                  size_t seq_len, size_t kv_dim, size_t num_layers) {
  if (tokens.size() < state_->config.min_prefix_len) return false;
  if (tokens.empty()) return invalid_argument("cannot store a snapshot under an empty key");
  if (seq_len != tokens.size()) {
    return invalid_argument("a snapshot of " + std::to_string(seq_len) +
                            " positions for a key of " + std::to_string(tokens.size()) + " tokens");
  }
  if (kv_dim != kv.kv_dim()) {
    return invalid_argument("kv_dim " + std::to_string(kv_dim) + " differs from the cache's " +
                            std::to_string(kv.kv_dim()));
  }
  std::vector<std::vector<float>> keys, values;
  keys.reserve(num_layers);
  values.reserve(num_layers);
  const size_t needed = seq_len * kv_dim;
  for (size_t layer = 0; layer < num_layers; ++layer) {
    const auto k = kv.get_keys(layer);
    const auto v = kv.get_values(layer);
    for (const auto* part : {&k, &v}) {
      if (!part->ok()) {
        return invalid_argument("layer " + std::to_string(layer) +
                                " cannot be read: " + part->status().message());
      }
      if (part->value().size() < needed) {
        return invalid_argument("layer " + std::to_string(layer) + " holds " +
                                std::to_string(part->value().size()) + " floats, " +
                                std::to_string(needed) + " needed");
      }
    }
    keys.emplace_back(k.value().begin(), k.value().begin() + static_cast<ptrdiff_t>(needed));
    values.emplace_back(v.value().begin(), v.value().begin() + static_cast<ptrdiff_t>(needed));
  }
  KVF_ASSIGN_OR_RETURN(CachedKvState snapshot,
                       CachedKvState::create(std::move(keys), std::move(values), seq_len, kv_dim));
  return store_snapshot(tokens, std::move(snapshot));
}

Result<bool> PrefixKvCache::store_snapshot(std::span<const TokenId> tokens,
                                           CachedKvState snapshot) {
  detail::PrefixKvCacheState& st = *state_;
  if (tokens.size() < st.config.min_prefix_len) return false;
  if (tokens.empty()) return invalid_argument("cannot store a snapshot under an empty key");
  if (snapshot.seq_len() != tokens.size()) {
    return invalid_argument("a snapshot of " + std::to_string(snapshot.seq_len()) +
                            " positions for a key of " + std::to_string(tokens.size()) + " tokens");
  }
  const auto ins = st.tree.insert(tokens);
  KVF_CHECK(ins.length == tokens.size(), "token-granular keys never collide");
  const Status status = st.tree.set_value(ins.node, std::move(snapshot));
  KVF_CHECK(status.ok(), status.message());
  detail::enforce_limits(st);
  const auto* node = st.tree.find(ins.node);
  const bool cached = node != nullptr && node->value().has_value();
  if (!cached) KVF_LOG_DEBUG(kPrefix, "a {}-token entry exceeded the limits alone", tokens.size());
  return cached;
}

Status PrefixKvCache::restore(const CachedKvState& cached, HostKvCache& target) {
  return target.restore_from_snapshot(cached, cached.seq_len());
}

Status PrefixKvCache::restore(const PrefixHit& hit, HostKvCache& target) {
  return target.restore_from_snapshot(hit.state(), hit.matched_len());
}

}  // namespace kvfabric
