// A generic radix tree over token ids: compressed edges, splits, longest-prefix match, pins, and
// O(log n) eviction of unpinned nodes by LRU on a logical clock or by priority.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <ostream>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kvfabric/common/check.h"
#include "kvfabric/common/status.h"
#include "kvfabric/prefix/cache_salt.h"

namespace kvfabric {

//! A token id as the tokenizer produced it.
using TokenId = uint32_t;

//! Length of the common prefix of `a` and `b` (the seed's common_prefix_len).
size_t common_prefix_len(std::span<const TokenId> a, std::span<const TokenId> b);

//! Which unpinned node eviction takes first.
enum class RadixEvictionOrder : uint8_t {
  kLru,       //!< least recently touched (logical clock), then the older node
  kPriority,  //!< lowest priority, then least recently touched, then the older node
};

//! Which nodes may lose their value.
enum class RadixEvictScope : uint8_t {
  //! Only leaves: a node's value depends on its ancestors' (a block index: a block is usable only
  //! after the blocks before it). Evicting a leaf removes it, and its parent may become a leaf.
  kLeaves,
  //! Any node holding a value: each value is self-contained (a snapshot of a whole prefix).
  //! An inner node that loses its value stays as a path node.
  kEntries,
};

//! \brief How a RadixTree compares and evicts.
struct RadixTreeOptions {
  //! Keys are compared in units of this many tokens (a block size; 1 = token granularity):
  //! matches and splits happen at unit boundaries, and each child is found by its whole first
  //! unit. A key may end with a partial unit; that piece becomes a leaf of its own that matches
  //! only a query ending with exactly the same tokens.
  uint32_t granularity = 1;
  RadixEvictionOrder order = RadixEvictionOrder::kLru;
  RadixEvictScope scope = RadixEvictScope::kLeaves;

  //! InvalidArgument when granularity is 0.
  [[nodiscard]] Status validate() const;
};

//! \brief A node of one RadixTree. Stale ids (of removed nodes) are detected, never reused.
struct RadixNodeId {
  uint32_t index = 0;
  uint32_t generation = 0;

  friend bool operator==(const RadixNodeId&, const RadixNodeId&) = default;
  friend std::ostream& operator<<(std::ostream& os, const RadixNodeId& id) {
    return os << "N" << id.index << "." << id.generation;
  }
};

namespace detail {
//! The child-map key of a unit of tokens: the token itself at granularity 1, otherwise a hash of
//! the whole unit, with partial units (shorter than the granularity) in a separate key space.
uint64_t radix_unit_key(std::span<const TokenId> unit, uint32_t granularity);
//! A unit key moved into `salt`'s key space (the same key for the empty salt); partial units stay
//! apart from full ones.
uint64_t radix_salted_key(uint64_t unit_key, const CacheSalt& salt);
}  // namespace detail

//! \brief Tokens to look up, with the child-map key of each unit computed on first use and kept:
//! looking the same prompt up in several trees of one granularity (one per replica) hashes each
//! unit once. Borrows `tokens`, which must outlive it. Not thread-safe.
//!
//! A salted key (SaltScope) matches only nodes of its salt from public_end() on; before that it
//! matches only public (unsalted) nodes, and no edge of the tree crosses that boundary.
class RadixKey {
 public:
  RadixKey(std::span<const TokenId> tokens, uint32_t granularity, SaltScope scope = {})
      : tokens_(tokens),
        granularity_(granularity),
        scope_(scope),
        public_end_(public_end_of(tokens.size(), granularity, scope)),
        unit_keys_(granularity == 0 ? 0 : (tokens.size() + granularity - 1) / granularity) {}

  [[nodiscard]] std::span<const TokenId> tokens() const { return tokens_; }
  [[nodiscard]] uint32_t granularity() const { return granularity_; }
  [[nodiscard]] const SaltScope& scope() const { return scope_; }
  //! Where the salted part starts: the public tokens rounded down to whole units, at most the
  //! key's whole units (a partial last unit is salted); the length itself for an unsalted key.
  [[nodiscard]] size_t public_end() const { return public_end_; }
  //! The salt of the unit starting at `pos`: none before public_end().
  [[nodiscard]] const CacheSalt& salt_at(size_t pos) const {
    static constexpr CacheSalt kPublic{};
    return pos < public_end_ ? kPublic : scope_.salt;
  }
  //! The key of the unit starting at `pos`, a multiple of the granularity below the length.
  [[nodiscard]] uint64_t unit_key(size_t pos) const {
    std::optional<uint64_t>& known = unit_keys_[pos / granularity_];
    if (!known) {
      const size_t length = std::min<size_t>(granularity_, tokens_.size() - pos);
      known = detail::radix_salted_key(
          detail::radix_unit_key(tokens_.subspan(pos, length), granularity_), salt_at(pos));
    }
    return *known;
  }
  //! The key of the first `length` tokens, in the same scope.
  [[nodiscard]] RadixKey first(size_t length) const {
    return RadixKey(tokens_.first(length), granularity_, scope_);
  }

 private:
  static size_t public_end_of(size_t length, uint32_t granularity, const SaltScope& scope) {
    if (scope.salt.empty() || granularity == 0) return length;
    const size_t whole = length - length % granularity;
    return std::min(whole, scope.public_tokens - scope.public_tokens % granularity);
  }

  std::span<const TokenId> tokens_;
  uint32_t granularity_;
  SaltScope scope_;
  size_t public_end_;
  mutable std::vector<std::optional<uint64_t>> unit_keys_;
};

//! \brief What a value contributes to the tree's byte counter, and how it splits when its edge
//! splits. The default suits a value that describes the whole key ending at its node: it stays
//! with the lower half and counts 0 bytes. Specialize or pass another traits type otherwise.
template <typename Value>
struct RadixValueTraits {
  size_t bytes(const Value& /*value*/) const { return 0; }
  //! The part of `value` that belongs to the first `units` units of its edge (nullopt: none);
  //! `value` keeps the rest.
  std::optional<Value> split_front(Value& /*value*/, size_t /*units*/) const {
    return std::nullopt;
  }
};

//! \brief A radix (compressed prefix) tree over token ids whose nodes may carry a Value.
//!
//! Each node owns an edge of tokens; the concatenated edges from the root spell its key. Pins
//! protect a node and its ancestors from eviction (counts propagate to the root, as SGLang's
//! lock_ref does). A logical clock (tick) orders accesses; ties go to the older node, so every
//! decision is deterministic. Counters of entries (nodes with a value), bytes and evictable
//! bytes (values in unpinned nodes) are kept as nodes change, and victims sit in an ordered set:
//! no operation scans the tree, except verify().
//!
//! Cost: match and insert are O(key length) plus O(1) hash lookups per node on the path; touch
//! is O(depth · log n), pin and unpin O(depth) plus O(log n) for each node whose pin count
//! leaves or reaches 0; choosing and evicting a victim is O(log n).
//!
//! Not thread-safe: one owner.
template <typename Value, typename Traits = RadixValueTraits<Value>>
class RadixTree {
 public:
  //! \brief Read-only view of a node.
  class Node {
   public:
    [[nodiscard]] const std::vector<TokenId>& edge() const { return edge_; }
    [[nodiscard]] const std::optional<Value>& value() const { return value_; }
    //! Tokens from the root to the end of this node's edge.
    [[nodiscard]] size_t depth() const { return depth_; }
    [[nodiscard]] RadixNodeId parent() const { return parent_id_; }
    [[nodiscard]] size_t child_count() const { return children_.size(); }
    [[nodiscard]] bool is_leaf() const { return children_.empty(); }
    //! Pins on this node and its descendants.
    [[nodiscard]] uint64_t pins() const { return pins_; }
    //! Pins placed on this node itself.
    [[nodiscard]] uint64_t own_pins() const { return own_pins_; }
    [[nodiscard]] uint64_t last_access() const { return last_access_; }
    [[nodiscard]] uint32_t priority() const { return priority_; }
    [[nodiscard]] size_t bytes() const { return bytes_; }
    //! Creation order; the older node goes first among equals.
    [[nodiscard]] uint64_t serial() const { return serial_; }
    //! The cache salt the node's tokens belong to (empty: public).
    [[nodiscard]] const CacheSalt& salt() const { return salt_; }

   private:
    friend class RadixTree;
    std::vector<TokenId> edge_;
    std::optional<Value> value_;
    // unit key -> index; lookups only. A multimap: two children whose first units hash alike
    // (by chance, or computed by a client) are siblings, told apart by their tokens and salt.
    std::unordered_multimap<uint64_t, uint32_t> children_;
    uint64_t unit_key_ = 0;                            // this node's key in its parent's map
    uint32_t parent_ = kNone;
    RadixNodeId parent_id_;
    uint32_t generation_ = 0;
    bool alive_ = false;
    bool in_victims_ = false;
    size_t depth_ = 0;
    size_t bytes_ = 0;
    uint64_t pins_ = 0;
    uint64_t own_pins_ = 0;
    uint64_t last_access_ = 0;
    uint32_t priority_ = 0;
    uint64_t serial_ = 0;
    CacheSalt salt_;
  };

  //! \brief Result of match(): `node` is the deepest node whose whole key is a prefix of the
  //! query, `length` its depth. When the query continues into a child's edge without finishing
  //! it, `partial` is that child and `partial_length` the tokens matched inside its edge (a
  //! multiple of the granularity); otherwise `partial` is nullopt.
  struct Match {
    RadixNodeId node;
    size_t length = 0;
    std::optional<RadixNodeId> partial;
    size_t partial_length = 0;
  };

  //! \brief Result of insert(): `node` ends at `length` tokens of the key (the whole key: units
  //! whose keys collide become siblings); `existing` tokens were in the tree before; `split` is
  //! the node created by splitting an existing edge, if any.
  struct Insertion {
    RadixNodeId node;
    size_t length = 0;
    size_t existing = 0;
    std::optional<RadixNodeId> split;
  };

  explicit RadixTree(RadixTreeOptions options = {}, Traits traits = {})
      : options_(options), traits_(std::move(traits)) {
    KVF_CHECK(options_.validate().ok(), options_.validate().message());
    nodes_.emplace_back();
    nodes_[0].alive_ = true;
  }
  //! Checked construction: InvalidArgument names the bad option.
  static Result<RadixTree> create(RadixTreeOptions options, Traits traits = {}) {
    KVF_RETURN_IF_ERROR(options.validate());
    return RadixTree(options, std::move(traits));
  }

  [[nodiscard]] const RadixTreeOptions& options() const { return options_; }
  [[nodiscard]] const Traits& traits() const { return traits_; }
  [[nodiscard]] RadixNodeId root() const { return RadixNodeId{0, 0}; }
  //! The node, or nullptr for an id that does not name a live node of this tree.
  [[nodiscard]] const Node* find(RadixNodeId id) const {
    if (id.index >= nodes_.size()) return nullptr;
    const Node& n = nodes_[id.index];
    return n.alive_ && n.generation_ == id.generation ? &n : nullptr;
  }

  //! Nodes with a value.
  [[nodiscard]] size_t entries() const { return entries_; }
  //! Sum of Traits::bytes over all values.
  [[nodiscard]] size_t bytes() const { return bytes_; }
  //! Bytes of values in unpinned nodes: what evicting could free.
  [[nodiscard]] size_t evictable_bytes() const { return evictable_bytes_; }
  //! Live nodes, the root excluded.
  [[nodiscard]] size_t node_count() const { return nodes_.size() - 1 - free_slots_.size(); }
  //! The logical clock: advanced by every insert and touch.
  [[nodiscard]] uint64_t tick() const { return tick_; }

  //! Longest match of `key` (see Match). With `split_at_end`, a match ending inside an edge
  //! splits that edge so the result always ends at a node; otherwise nothing changes. Matching
  //! does not touch: call touch() on what the caller uses.
  Match match(std::span<const TokenId> key, bool split_at_end = false) {
    return match(RadixKey(key, options_.granularity), split_at_end);
  }
  //! match() of a key that may be salted.
  Match match(const RadixKey& key, bool split_at_end = false) {
    if (key.granularity() != options_.granularity) {
      return match(RadixKey(key.tokens(), options_.granularity, key.scope()), split_at_end);
    }
    const Walk w = walk(key);
    if (w.child == kNone) return Match{id_of(w.node), w.pos, std::nullopt, 0};
    if (split_at_end) {
      const uint32_t upper = split_node(w.child, w.child_lcp);
      return Match{id_of(upper), w.pos + w.child_lcp, std::nullopt, 0};
    }
    return Match{id_of(w.node), w.pos, id_of(w.child), w.child_lcp};
  }
  //! match() without splitting, for const use.
  [[nodiscard]] Match peek(std::span<const TokenId> key) const {
    return peek(RadixKey(key, options_.granularity));
  }
  //! peek() reusing the unit keys `key` has computed (and keeping the new ones); a key of another
  //! granularity is looked up afresh, in its scope.
  [[nodiscard]] Match peek(const RadixKey& key) const {
    if (key.granularity() != options_.granularity) {
      return peek(RadixKey(key.tokens(), options_.granularity, key.scope()));
    }
    const Walk w = walk(key);
    if (w.child == kNone) return Match{id_of(w.node), w.pos, std::nullopt, 0};
    return Match{id_of(w.node), w.pos, id_of(w.child), w.child_lcp};
  }

  //! Adds `key`: splits the edge where it diverges and creates at most two nodes (the full units,
  //! then a partial last unit). It touches the nodes the key's value uses, raising their priority
  //! to at least `priority`: the whole path with RadixEvictScope::kLeaves, the last node with
  //! kEntries. `make_value(offset, length)` gives each new node's value for the key's tokens
  //! [offset, offset + length) (nullopt: no value). Existing values are left alone.
  template <typename MakeValue>
  Insertion insert(std::span<const TokenId> key, uint32_t priority, MakeValue&& make_value) {
    auto ins = insert_checked(
        key, priority, [](size_t) { return ok_status(); }, std::forward<MakeValue>(make_value));
    return std::move(ins).value();
  }
  //! insert() that first calls check(existing) with the number of the key's tokens already in
  //! the tree, after matching and before changing anything: an error from it aborts the insert,
  //! so a caller can validate what would become new at the cost of a single walk.
  template <typename Check, typename MakeValue>
  Result<Insertion> insert_checked(std::span<const TokenId> key, uint32_t priority, Check&& check,
                                   MakeValue&& make_value) {
    return insert_checked(RadixKey(key, options_.granularity), priority, std::forward<Check>(check),
                          std::forward<MakeValue>(make_value));
  }
  //! insert_checked() of a key that may be salted: its public part and its salted part become
  //! separate nodes, so that no edge holds tokens of both. The key must have this tree's
  //! granularity.
  template <typename Check, typename MakeValue>
  Result<Insertion> insert_checked(const RadixKey& query, uint32_t priority, Check&& check,
                                   MakeValue&& make_value) {
    if (query.granularity() != options_.granularity) {
      return invalid_argument("a key of granularity " + std::to_string(query.granularity()) +
                              " inserted into a tree of granularity " +
                              std::to_string(options_.granularity));
    }
    const std::span<const TokenId> key = query.tokens();
    const Walk w = walk(query);
    KVF_RETURN_IF_ERROR(check(w.pos + w.child_lcp));
    uint32_t cur = w.node;
    size_t pos = w.pos;
    std::optional<RadixNodeId> split;
    if (w.child != kNone) {
      cur = split_node(w.child, w.child_lcp);
      pos += w.child_lcp;
      split = id_of(cur);
    }
    const size_t existing = pos;
    // New nodes: the rest of the public part, the salted full units, a partial last unit.
    const size_t whole_end = key.size() - key.size() % options_.granularity;
    const size_t public_end = std::min(query.public_end(), whole_end);
    while (pos < key.size()) {
      const size_t end = pos < public_end ? public_end : pos < whole_end ? whole_end : key.size();
      const uint64_t child_key = query.unit_key(pos);
      cur = new_node(cur, key.subspan(pos, end - pos), child_key, query.salt_at(pos),
                     make_value(pos, end - pos));
      pos = end;
    }
    ++tick_;
    for (uint32_t i = cur; i != 0; i = nodes_[i].parent_) {
      rekey(i, [&](Node& n) {
        n.last_access_ = tick_;
        n.priority_ = std::max(n.priority_, priority);
      });
      if (options_.scope == RadixEvictScope::kEntries) break;
    }
    return Insertion{id_of(cur), pos, existing, split};
  }
  //! insert() without values.
  Insertion insert(std::span<const TokenId> key, uint32_t priority = 0) {
    return insert(key, priority, [](size_t, size_t) { return std::optional<Value>(); });
  }

  //! Splits a node's edge after `at` tokens (a positive multiple of the granularity, less than
  //! the edge length). The new upper node takes the front of the edge, Traits::split_front of the
  //! value, and the node's pins, clock and priority; the node keeps its id and the rest.
  Result<RadixNodeId> split(RadixNodeId id, size_t at) {
    KVF_ASSIGN_OR_RETURN(const uint32_t i, index_of(id));
    const Node& n = nodes_[i];
    if (i == 0 || at == 0 || at >= n.edge_.size() || at % options_.granularity != 0) {
      return invalid_argument("cannot split " + node_name(i) + " (edge of " +
                              std::to_string(n.edge_.size()) + " tokens) at " + std::to_string(at) +
                              " (granularity " + std::to_string(options_.granularity) + ")");
    }
    return id_of(split_node(i, at));
  }

  //! Replaces a node's value (the root cannot hold one).
  Status set_value(RadixNodeId id, Value value) {
    KVF_ASSIGN_OR_RETURN(const uint32_t i, index_of(id));
    if (i == 0) return invalid_argument("the root of a radix tree holds no value");
    rekey(i, [&](Node& n) { n.value_ = std::move(value); });
    return ok_status();
  }

  //! Marks the node's value used now (with `with_ancestors`, the whole path from the root).
  Status touch(RadixNodeId id, bool with_ancestors) {
    KVF_ASSIGN_OR_RETURN(const uint32_t i, index_of(id));
    ++tick_;
    for (uint32_t j = i; j != 0; j = nodes_[j].parent_) {
      rekey(j, [&](Node& n) { n.last_access_ = tick_; });
      if (!with_ancestors) break;
    }
    return ok_status();
  }

  Status set_priority(RadixNodeId id, uint32_t priority) {
    KVF_ASSIGN_OR_RETURN(const uint32_t i, index_of(id));
    if (i == 0) return invalid_argument("the root of a radix tree is never evicted");
    rekey(i, [&](Node& n) { n.priority_ = priority; });
    return ok_status();
  }

  //! Protects the node and its ancestors from eviction until as many unpin() calls; `count`
  //! pins at once.
  Status pin(RadixNodeId id, uint64_t count = 1) {
    KVF_ASSIGN_OR_RETURN(const uint32_t i, index_of(id));
    nodes_[i].own_pins_ += count;
    change_path_pins(i, count, /*add=*/true);
    return ok_status();
  }
  //! Drops `count` pins placed by pin(id). A value-less leaf left unpinned is removed.
  Status unpin(RadixNodeId id, uint64_t count = 1) {
    KVF_ASSIGN_OR_RETURN(const uint32_t i, index_of(id));
    if (nodes_[i].own_pins_ < count) {
      return invalid_operation(node_name(i) + " holds " + std::to_string(nodes_[i].own_pins_) +
                               " pins, fewer than the " + std::to_string(count) + " to drop");
    }
    nodes_[i].own_pins_ -= count;
    change_path_pins(i, count, /*add=*/false);
    if (i != 0 && !nodes_[i].value_ && nodes_[i].children_.empty() && nodes_[i].pins_ == 0) {
      remove_leaf(i);
    } else {
      compact(i);
    }
    return ok_status();
  }

  //! The node eviction takes next: an unpinned node with a value that is a leaf (or, with
  //! RadixEvictScope::kEntries, any such node). nullopt when none is evictable.
  [[nodiscard]] std::optional<RadixNodeId> next_victim() const {
    if (victims_.empty()) return std::nullopt;
    return id_of(std::get<3>(*victims_.begin()));
  }
  //! Removes an evictable node's value and returns it. A leaf is removed (its value-less,
  //! unpinned ancestors left childless go too); an inner kEntries node stays as a path node.
  //! InvalidOperation when the node is pinned, holds no value, or is an inner node of a kLeaves
  //! tree.
  Result<Value> evict(RadixNodeId id) {
    KVF_ASSIGN_OR_RETURN(const uint32_t i, index_of(id));
    if (!evictable(nodes_[i])) {
      return invalid_operation(node_name(i) + " is not evictable (" + describe(nodes_[i]) + ")");
    }
    Value value = std::move(*nodes_[i].value_);
    rekey(i, [](Node& n) { n.value_.reset(); });
    if (nodes_[i].children_.empty()) {
      remove_leaf(i);
    } else {
      compact(i);
    }
    return value;
  }

  //! Evicts the end of an evictable leaf: its edge keeps its first `keep` tokens (a positive
  //! multiple of the granularity, less than the edge length) and Traits::split_front's front of
  //! the value; the rest of the value is returned. The node keeps its id, clock and priority and
  //! stays a leaf (when split_front gives no front, the node is removed as evict() removes it). Nothing is copied, so trimming a long edge costs what evicting it does.
  //! InvalidArgument for a bad `keep`, InvalidOperation when the node is not an evictable leaf.
  Result<Value> evict_back(RadixNodeId id, size_t keep) {
    KVF_ASSIGN_OR_RETURN(const uint32_t i, index_of(id));
    Node& n = nodes_[i];
    if (!evictable(n) || !n.children_.empty()) {
      return invalid_operation(node_name(i) + " is not an evictable leaf (" + describe(n) + ")");
    }
    if (keep == 0 || keep >= n.edge_.size() || keep % options_.granularity != 0) {
      return invalid_argument("cannot keep " + std::to_string(keep) + " tokens of the " +
                              std::to_string(n.edge_.size()) + "-token edge of " + node_name(i) +
                              " (granularity " + std::to_string(options_.granularity) + ")");
    }
    std::optional<Value> back;
    rekey(i, [&](Node& m) {
      back = std::move(m.value_);
      m.value_ = traits_.split_front(*back, keep / options_.granularity);
      m.depth_ -= m.edge_.size() - keep;
      m.edge_.resize(keep);
    });
    if (!nodes_[i].value_) remove_leaf(i);  // no front part: nothing left to keep
    return std::move(*back);
  }

  //! Removes every node; ids handed out before become stale. Counters restart at 0, the clock
  //! does not (ticks stay increasing).
  void clear() {
    for (size_t i = 1; i < nodes_.size(); ++i) {
      if (nodes_[i].alive_) free_node(static_cast<uint32_t>(i));
    }
    nodes_[0].children_.clear();
    nodes_[0].pins_ = nodes_[0].own_pins_ = 0;
    victims_.clear();
    entries_ = bytes_ = evictable_bytes_ = 0;
  }

  //! Calls f(id, node) for each child of `id`, in no particular order: a caller choosing among
  //! them must decide by their fields (clock, serial), never by the visiting order.
  template <typename F>
  Status for_each_child(RadixNodeId id, F&& f) const {
    KVF_ASSIGN_OR_RETURN(const uint32_t i, index_of(id));
    for (const auto& [key, child] : nodes_[i].children_)
      f(id_of(child), nodes_[child]);
    return ok_status();
  }

  //! Calls f(id, node) for every live node except the root, in slot order. O(n): for tests,
  //! dumps and statistics, never for a decision on the hot path.
  template <typename F>
  void for_each_node(F&& f) const {
    for (size_t i = 1; i < nodes_.size(); ++i) {
      if (nodes_[i].alive_) f(id_of(static_cast<uint32_t>(i)), nodes_[i]);
    }
  }

  //! Recomputes every counter, link, pin count and the victim set from scratch. For tests.
  [[nodiscard]] Status verify() const;

 private:
  static constexpr uint32_t kNone = UINT32_MAX;
  // (rank, last access, serial, index): the smallest is the next victim.
  using VictimKey = std::tuple<uint64_t, uint64_t, uint64_t, uint32_t>;

  struct Walk {
    uint32_t node = 0;
    size_t pos = 0;
    uint32_t child = kNone;  // a child whose edge the key enters without finishing it
    size_t child_lcp = 0;
  };

  // The key of a node's edge in its parent's map.
  uint64_t unit_key_of(const Node& n) const {
    const size_t g = options_.granularity;
    return detail::radix_salted_key(
        detail::radix_unit_key(std::span(n.edge_).first(std::min(n.edge_.size(), g)), g), n.salt_);
  }

  Walk walk(const RadixKey& query) const {
    const size_t g = options_.granularity;
    const std::span<const TokenId> key = query.tokens();
    uint32_t cur = 0;
    size_t pos = 0;
    while (pos < key.size()) {
      // The public part of a salted key is compared only up to its end (edges never cross it).
      const auto rest =
          pos < query.public_end() ? key.subspan(pos, query.public_end() - pos) : key.subspan(pos);
      // find_child() matched the first unit (a partial one: the whole edge), so at least one
      // unit of the child is matched.
      const uint32_t child = find_child(cur, query, pos, rest);
      if (child == kNone) break;
      const std::vector<TokenId>& edge = nodes_[child].edge_;
      if (rest.size() < g) {  // a partial leaf with exactly these tokens
        pos += rest.size();
        cur = child;
        break;
      }
      const size_t lcp = common_prefix_len(edge, rest);
      const size_t units = lcp - lcp % g;
      if (units < edge.size()) return Walk{cur, pos, child, units};
      pos += units;
      cur = child;
    }
    return Walk{cur, pos, kNone, 0};
  }

  // The child of `parent` that `query`'s unit at `pos` enters (`rest`: the query from there):
  // same salt and same first unit (a partial unit: the whole edge). kNone when there is none.
  uint32_t find_child(uint32_t parent, const RadixKey& query, size_t pos,
                      std::span<const TokenId> rest) const {
    const size_t g = options_.granularity;
    const auto [first, last] = nodes_[parent].children_.equal_range(query.unit_key(pos));
    for (auto it = first; it != last; ++it) {
      const Node& c = nodes_[it->second];
      if (c.salt_ != query.salt_at(pos)) continue;
      const size_t unit = std::min(rest.size(), g);
      if (rest.size() < g ? c.edge_.size() != rest.size() : c.edge_.size() < g) continue;
      if (std::equal(rest.begin(), rest.begin() + static_cast<ptrdiff_t>(unit), c.edge_.begin())) {
        return it->second;
      }
    }
    return kNone;
  }
  // Where `parent` lists child `index` under `key`.
  auto child_entry(uint32_t parent, uint64_t key, uint32_t index) {
    auto [first, last] = nodes_[parent].children_.equal_range(key);
    for (auto it = first; it != last; ++it) {
      if (it->second == index) return it;
    }
    KVF_CHECK(false, "a radix node is missing from its parent's children");
    return last;
  }

  RadixNodeId id_of(uint32_t i) const { return RadixNodeId{i, nodes_[i].generation_}; }
  Result<uint32_t> index_of(RadixNodeId id) const {
    if (find(id) == nullptr) {
      std::ostringstream os;
      os << id;
      return Status(ErrorCode::kNotFound, "radix tree node " + os.str() + " does not exist");
    }
    return id.index;
  }
  std::string node_name(uint32_t i) const {
    return "radix tree node at depth " + std::to_string(nodes_[i].depth_);
  }
  static std::string describe(const Node& n) {
    return std::string(n.value_ ? "has a value" : "no value") + ", " + std::to_string(n.pins_) +
           " pins, " + std::to_string(n.children_.size()) + " children";
  }

  bool evictable(const Node& n) const {
    return &n != &nodes_[0] && n.value_.has_value() && n.pins_ == 0 &&
           (n.children_.empty() || options_.scope == RadixEvictScope::kEntries);
  }
  VictimKey victim_key(uint32_t i) const {
    const Node& n = nodes_[i];
    const uint64_t rank = options_.order == RadixEvictionOrder::kPriority ? n.priority_ : 0;
    return {rank, n.last_access_, n.serial_, i};
  }

  // Every change to a node's value, children, clock or priority, and every pin change that can
  // make it evictable or not, goes through here, so the counters and the victim set follow it.
  template <typename Change>
  void rekey(uint32_t i, Change&& change) {
    detach(i);
    change(nodes_[i]);
    attach(i);
  }
  // Adds or removes `count` pins on node i and every ancestor. A node's pins count its whole
  // subtree's, so they never decrease towards the root: only the nodes at the bottom of the path
  // whose count leaves 0 (add) or reaches it (remove) change evictability and are rekeyed; above
  // them the path only counts.
  void change_path_pins(uint32_t i, uint64_t count, bool add) {
    auto change = [count, add](Node& n) { n.pins_ = add ? n.pins_ + count : n.pins_ - count; };
    const uint64_t crossing = add ? 0 : count;  // the count at which evictability changes
    uint32_t j = i;
    for (; j != kNone && nodes_[j].pins_ == crossing; j = nodes_[j].parent_)
      rekey(j, change);
    for (; j != kNone; j = nodes_[j].parent_)
      change(nodes_[j]);
  }
  void detach(uint32_t i) {
    Node& n = nodes_[i];
    if (n.value_) {
      --entries_;
      bytes_ -= n.bytes_;
      if (n.pins_ == 0) evictable_bytes_ -= n.bytes_;
    }
    if (n.in_victims_) {
      victims_.erase(victim_key(i));
      n.in_victims_ = false;
    }
  }
  void attach(uint32_t i) {
    Node& n = nodes_[i];
    n.bytes_ = n.value_ ? traits_.bytes(*n.value_) : 0;
    if (n.value_) {
      ++entries_;
      bytes_ += n.bytes_;
      if (n.pins_ == 0) evictable_bytes_ += n.bytes_;
    }
    if (evictable(n)) {
      victims_.insert(victim_key(i));
      n.in_victims_ = true;
    }
  }

  // A slot for a new node: a freed one (its generation already bumped) or a new one.
  uint32_t take_slot() {
    if (free_slots_.empty()) {
      nodes_.emplace_back();
      return static_cast<uint32_t>(nodes_.size() - 1);
    }
    const uint32_t i = free_slots_.back();
    free_slots_.pop_back();
    return i;
  }

  // `key`: the unit key of the edge's first unit.
  uint32_t new_node(uint32_t parent, std::span<const TokenId> edge, uint64_t key,
                    const CacheSalt& salt, std::optional<Value> value) {
    const uint32_t i = take_slot();
    Node& n = nodes_[i];
    n.alive_ = true;
    n.salt_ = salt;
    n.edge_.assign(edge.begin(), edge.end());
    n.parent_ = parent;
    n.parent_id_ = id_of(parent);
    n.depth_ = nodes_[parent].depth_ + edge.size();
    n.last_access_ = tick_;
    n.serial_ = ++serial_;
    n.unit_key_ = key;
    rekey(parent, [&](Node& p) { p.children_.emplace(n.unit_key_, i); });
    rekey(i, [&](Node& m) { m.value_ = std::move(value); });
    return i;
  }

  // Splits node i after `at` tokens; returns the new upper node (i keeps the lower part).
  uint32_t split_node(uint32_t i, size_t at) {
    const uint32_t parent = nodes_[i].parent_;
    const uint64_t key_in_parent = nodes_[i].unit_key_;
    const uint32_t u = take_slot();
    detach(i);
    Node& n = nodes_[i];
    Node& upper = nodes_[u];
    upper.alive_ = true;
    upper.edge_.assign(n.edge_.begin(), n.edge_.begin() + static_cast<ptrdiff_t>(at));
    n.edge_.erase(n.edge_.begin(), n.edge_.begin() + static_cast<ptrdiff_t>(at));
    upper.parent_ = parent;
    upper.parent_id_ = n.parent_id_;
    upper.depth_ = nodes_[parent].depth_ + at;
    upper.pins_ = n.pins_;
    upper.last_access_ = n.last_access_;
    upper.priority_ = n.priority_;
    upper.serial_ = ++serial_;
    upper.salt_ = n.salt_;
    if (n.value_) upper.value_ = traits_.split_front(*n.value_, at / options_.granularity);
    upper.unit_key_ = key_in_parent;
    n.unit_key_ = unit_key_of(n);
    upper.children_.emplace(n.unit_key_, i);
    n.parent_ = u;
    n.parent_id_ = id_of(u);
    child_entry(parent, key_in_parent, i)->second = u;
    attach(u);
    attach(i);
    return u;
  }

  void free_node(uint32_t i) {
    Node fresh;
    fresh.generation_ = nodes_[i].generation_ + 1;
    nodes_[i] = std::move(fresh);
    free_slots_.push_back(i);
  }

  // Removes leaf i (already without value or evicted), then prunes and merges upward.
  void remove_leaf(uint32_t i) {
    detach(i);
    const uint32_t parent = nodes_[i].parent_;
    const uint64_t key = nodes_[i].unit_key_;
    free_node(i);
    const auto entry = child_entry(parent, key, i);
    rekey(parent, [&](Node& p) { p.children_.erase(entry); });
    if (parent != 0 && !nodes_[parent].value_ && nodes_[parent].children_.empty() &&
        nodes_[parent].pins_ == 0) {
      remove_leaf(parent);
    } else {
      compact(parent);
    }
  }

  // A value-less inner node with one child and no pins of its own adds nothing: its child
  // absorbs its edge (unless that would leave a partial unit inside an edge).
  void compact(uint32_t i) {
    Node& n = nodes_[i];
    if (i == 0 || n.value_ || n.children_.size() != 1 || n.own_pins_ != 0) return;
    const uint32_t c = n.children_.begin()->second;
    Node& child = nodes_[c];
    if (child.edge_.size() % options_.granularity != 0) return;
    if (child.salt_ != n.salt_) return;  // a public edge and a salted one stay apart
    const uint32_t parent = n.parent_;
    const uint64_t key = n.unit_key_;
    child.edge_.insert(child.edge_.begin(), n.edge_.begin(), n.edge_.end());
    child.unit_key_ = key;
    child.parent_ = parent;
    child.parent_id_ = n.parent_id_;
    detach(i);
    free_node(i);
    child_entry(parent, key, i)->second = c;
  }

  RadixTreeOptions options_;
  Traits traits_;
  std::deque<Node> nodes_;  // index 0 is the root; a deque keeps references stable as it grows
  std::vector<uint32_t> free_slots_;
  std::set<VictimKey> victims_;
  size_t entries_ = 0;
  size_t bytes_ = 0;
  size_t evictable_bytes_ = 0;
  uint64_t tick_ = 0;
  uint64_t serial_ = 0;
};

template <typename Value, typename Traits>
Status RadixTree<Value, Traits>::verify() const {
  auto fail = [](const std::string& what) { return Status(ErrorCode::kInternal, what); };
  size_t entries = 0, bytes = 0, evictable_bytes = 0, victims = 0;
  std::vector<uint64_t> child_pins(nodes_.size(), 0);
  for (size_t i = 1; i < nodes_.size(); ++i) {
    const Node& n = nodes_[i];
    if (!n.alive_) continue;
    if (n.parent_ >= nodes_.size() || !nodes_[n.parent_].alive_) return fail("dangling parent");
    const Node& p = nodes_[n.parent_];
    const auto [first, last] = p.children_.equal_range(unit_key_of(n));
    if (std::find_if(first, last, [&](const auto& e) { return e.second == i; }) == last) {
      return fail("parent does not list its child");
    }
    if (unit_key_of(n) != n.unit_key_) return fail("stale unit key");
    if (n.parent_id_ != id_of(n.parent_)) return fail("stale parent id");
    if (n.edge_.empty()) return fail("empty edge");
    if (n.parent_ != 0 && !p.salt_.empty() && p.salt_ != n.salt_) {
      return fail("a salted node with a child of another salt");
    }
    if (n.depth_ != p.depth_ + n.edge_.size()) return fail("wrong depth");
    if (n.edge_.size() % options_.granularity != 0 &&
        (n.edge_.size() > options_.granularity || !n.children_.empty())) {
      return fail("a partial unit inside the tree");
    }
    child_pins[n.parent_] += n.pins_;
    if (n.value_) {
      ++entries;
      if (n.bytes_ != traits_.bytes(*n.value_)) return fail("stale byte count");
      bytes += n.bytes_;
      if (n.pins_ == 0) evictable_bytes += n.bytes_;
    }
    if (n.in_victims_ != evictable(n) || (n.in_victims_ && !victims_.count(victim_key(i)))) {
      return fail("victim set out of date at depth " + std::to_string(n.depth_));
    }
    victims += n.in_victims_ ? 1 : 0;
  }
  for (size_t i = 0; i < nodes_.size(); ++i) {
    const Node& n = nodes_[i];
    if (n.alive_ && n.pins_ != n.own_pins_ + child_pins[i]) return fail("pin counts disagree");
  }
  if (entries != entries_ || bytes != bytes_ || evictable_bytes != evictable_bytes_) {
    return fail("counters disagree with the nodes");
  }
  if (victims != victims_.size()) return fail("victim set holds stale nodes");
  return ok_status();
}

}  // namespace kvfabric
