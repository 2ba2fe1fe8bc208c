// 100,000 seeded random inserts, matches, touches, pins, splits and evictions on a RadixTree,
// checked after every operation against a brute-force model: a flat map from each node's full
// key to its record, where parents, children, pin totals, counters and the next victim are
// recomputed by scanning instead of being maintained.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <sstream>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "kvfabric/prefix/radix_tree.h"
#include "testing/property_env.h"

namespace kvfabric {
namespace {

using Tokens = std::vector<TokenId>;
constexpr int kOperations = 100'000;

// The value of a kLeaves node is the tokens of its edge (it splits with the edge); a kEntries
// value is the key it was stored under (it never splits). Both weigh 1 byte per token.
struct TestTraits {
  uint32_t granularity = 1;
  bool splits = true;
  size_t bytes(const Tokens& v) const { return v.size(); }
  std::optional<Tokens> split_front(Tokens& v, size_t units) const {
    if (!splits) return std::nullopt;
    const auto at = static_cast<ptrdiff_t>(units * granularity);
    Tokens front(v.begin(), v.begin() + at);
    v.erase(v.begin(), v.begin() + at);
    return front;
  }
};
using Tree = RadixTree<Tokens, TestTraits>;

struct Case {
  uint32_t granularity;
  RadixEvictionOrder order;
  RadixEvictScope scope;
  TokenId alphabet;
  uint64_t seed;
  friend void PrintTo(const Case& c, std::ostream* os) {
    *os << "g" << c.granularity << (c.order == RadixEvictionOrder::kLru ? "_lru" : "_priority")
        << (c.scope == RadixEvictScope::kLeaves ? "_leaves" : "_entries");
  }
};

Tokens prefix_of(const Tokens& t, size_t n) {
  return Tokens(t.begin(), t.begin() + static_cast<ptrdiff_t>(n));
}
bool starts_with(const Tokens& t, const Tokens& p) {
  return p.size() <= t.size() && std::equal(p.begin(), p.end(), t.begin());
}

// ---------------------------------------------------------------------------------------------
// The model: nodes by full key; the root is the empty key.

struct ModelNode {
  std::optional<Tokens> value;
  uint64_t own_pins = 0;
  uint64_t last_access = 0;
  uint32_t priority = 0;
  uint64_t serial = 0;
};

class Model {
 public:
  explicit Model(const Case& c) : c_(c) { nodes_[{}]; }

  // A key whose length is not a multiple of the granularity ends with a partial unit: such a
  // node is a leaf, never anyone's parent.
  bool is_partial(const Tokens& key) const { return key.size() % c_.granularity != 0; }
  // The parent of a key: its longest proper prefix that is a node and not partial. Recomputed
  // for every key whenever the set of keys changes.
  const Tokens& parent(const Tokens& key) const { return structure().parent.at(key); }
  std::vector<Tokens> children(const Tokens& key) const {
    const auto& all = structure().children;
    const auto it = all.find(key);
    return it == all.end() ? std::vector<Tokens>() : it->second;
  }
  Tokens edge(const Tokens& key) const {
    return Tokens(key.begin() + static_cast<ptrdiff_t>(parent(key).size()), key.end());
  }
  uint64_t pins(const Tokens& key) const {
    uint64_t total = 0;
    for (const auto& [k, n] : nodes_) {
      if (k == key || (!is_partial(key) && starts_with(k, key))) total += n.own_pins;
    }
    return total;
  }
  bool evictable(const Tokens& key) const {
    const ModelNode& n = nodes_.at(key);
    return !key.empty() && n.value && pins(key) == 0 &&
           (c_.scope == RadixEvictScope::kEntries || children(key).empty());
  }
  // Child counts and pin totals of every node (by the address of its key in nodes()),
  // recomputed from the keys alone.
  struct Derived {
    std::unordered_map<const Tokens*, size_t> child_count;
    std::unordered_map<const Tokens*, uint64_t> pins;
  };
  Derived derive() const {
    Derived d;
    for (const auto& [k, n] : nodes_) {
      d.pins[&k] = n.own_pins;
      d.child_count[&k] = 0;
    }
    // Deepest first: a node's total is final before it is added to its parent's.
    for (const auto& [key, parent_key] : structure().deepest_first) {
      d.pins[parent_key] += d.pins[key];
      ++d.child_count[parent_key];
    }
    return d;
  }

  std::optional<Tokens> victim(const Derived& d) const {
    std::optional<std::tuple<uint64_t, uint64_t, uint64_t>> best;
    std::optional<Tokens> out;
    for (const auto& [k, n] : nodes_) {
      const bool evictable = !k.empty() && n.value && d.pins.at(&k) == 0 &&
                             (c_.scope == RadixEvictScope::kEntries || d.child_count.at(&k) == 0);
      if (!evictable) continue;
      const uint64_t rank = c_.order == RadixEvictionOrder::kPriority ? n.priority : 0;
      const auto key = std::make_tuple(rank, n.last_access, n.serial);
      if (!best || key < *best) {
        best = key;
        out = k;
      }
    }
    return out;
  }

  struct Walk {
    Tokens node;
    size_t pos = 0;
    std::optional<Tokens> child;
    size_t child_lcp = 0;
  };
  Walk walk(const Tokens& key) const {
    const size_t g = c_.granularity;
    Tokens cur;
    size_t pos = 0;
    while (pos < key.size()) {
      const Tokens rest(key.begin() + static_cast<ptrdiff_t>(pos), key.end());
      std::optional<Tokens> next;
      for (const Tokens& ch : children(cur)) {
        const Tokens e = edge(ch);
        if (rest.size() < g ? e == rest
                            : e.size() >= g && std::equal(e.begin(), e.begin() + g, rest.begin())) {
          next = ch;
        }
      }
      if (!next) break;
      if (rest.size() < g) {
        cur = *next;
        pos = key.size();
        break;
      }
      const Tokens e = edge(*next);
      const size_t lcp = common_prefix_len(e, rest);
      const size_t units = lcp - lcp % g;
      if (units == e.size()) {
        cur = *next;
        pos += units;
        continue;
      }
      return Walk{cur, pos, next, units};
    }
    return Walk{cur, pos, std::nullopt, 0};
  }

  Tokens split(const Tokens& child, size_t at) {
    const Tokens upper_key = prefix_of(child, parent(child).size() + at);
    ModelNode& lower = nodes_.at(child);
    ModelNode upper;
    upper.last_access = lower.last_access;
    upper.priority = lower.priority;
    upper.serial = ++serial_;
    if (lower.value && c_.scope == RadixEvictScope::kLeaves) {
      upper.value = prefix_of(*lower.value, at);
      lower.value->erase(lower.value->begin(), lower.value->begin() + static_cast<ptrdiff_t>(at));
    }
    nodes_[upper_key] = upper;
    changed();
    return upper_key;
  }

  // Mirrors RadixTree::insert with values that are the covered tokens (kLeaves) or none.
  Tokens insert(const Tokens& key, uint32_t priority) {
    const Walk w = walk(key);
    Tokens cur = w.node;
    size_t pos = w.pos;
    if (w.child) {
      cur = split(*w.child, w.child_lcp);
      pos += w.child_lcp;
    }
    const size_t g = c_.granularity;
    const size_t rest = key.size() - pos;
    for (const size_t length : {rest - rest % g, rest % g}) {
      if (length == 0) continue;
      ModelNode n;
      n.last_access = tick_;
      n.serial = ++serial_;
      if (c_.scope == RadixEvictScope::kLeaves) {
        n.value = Tokens(key.begin() + static_cast<ptrdiff_t>(pos),
                         key.begin() + static_cast<ptrdiff_t>(pos + length));
      }
      pos += length;
      cur = prefix_of(key, pos);
      nodes_[cur] = n;
      changed();
    }
    ++tick_;
    for (Tokens k = cur; !k.empty(); k = parent(k)) {
      ModelNode& n = nodes_.at(k);
      n.last_access = tick_;
      n.priority = std::max(n.priority, priority);
      if (c_.scope == RadixEvictScope::kEntries) break;
    }
    return cur;
  }

  void touch(const Tokens& key, bool with_ancestors) {
    ++tick_;
    for (Tokens k = key; !k.empty(); k = parent(k)) {
      nodes_.at(k).last_access = tick_;
      if (!with_ancestors) break;
    }
  }

  void compact(const Tokens& key) {
    if (key.empty()) return;
    const ModelNode& n = nodes_.at(key);
    const auto kids = children(key);
    if (n.value || kids.size() != 1 || n.own_pins != 0) return;
    if (edge(kids[0]).size() % c_.granularity != 0) return;
    nodes_.erase(key);
    changed();
  }
  void remove_leaf(const Tokens& key) {
    const Tokens p = parent(key);
    nodes_.erase(key);
    changed();
    if (!p.empty() && !nodes_.at(p).value && children(p).empty() && pins(p) == 0) {
      remove_leaf(p);
    } else {
      compact(p);
    }
  }
  void evict(const Tokens& key) {
    nodes_.at(key).value.reset();
    if (children(key).empty()) {
      remove_leaf(key);
    } else {
      compact(key);
    }
  }
  // Mirrors RadixTree::evict_back on a leaf: the node (its record, serial included) moves to its
  // first `keep` edge tokens with the front of its value, and the rest of the value goes.
  Tokens evict_back(const Tokens& key, size_t keep) {
    const Tokens front = prefix_of(key, parent(key).size() + keep);
    ModelNode node = nodes_.at(key);
    if (c_.scope == RadixEvictScope::kLeaves) {
      node.value = prefix_of(*node.value, keep);
    } else {
      node.value.reset();  // an entry describes its whole key: no front part
    }
    nodes_.erase(key);
    nodes_[front] = node;
    changed();
    if (!node.value) remove_leaf(front);
    return front;
  }
  void unpin(const Tokens& key) {
    --nodes_.at(key).own_pins;
    if (!key.empty() && !nodes_.at(key).value && children(key).empty() && pins(key) == 0) {
      remove_leaf(key);
    } else {
      compact(key);
    }
  }
  void clear() {
    nodes_.clear();
    nodes_[{}];
    changed();
  }

  // Callers may change records, not keys; key changes go through the methods above.
  std::map<Tokens, ModelNode>& nodes() { return nodes_; }
  const std::map<Tokens, ModelNode>& nodes() const { return nodes_; }

 private:
  struct Structure {
    std::map<Tokens, Tokens> parent;
    std::map<Tokens, std::vector<Tokens>> children;
    // (key, parent's key) as stored in nodes_, deepest keys first.
    std::vector<std::pair<const Tokens*, const Tokens*>> deepest_first;
  };
  const Structure& structure() const {
    if (structure_) return *structure_;
    Structure st;
    for (const auto& [key, n] : nodes_) {
      if (key.empty()) continue;
      Tokens p;
      for (size_t len = key.size(); len-- > 0;) {
        if (len % c_.granularity == 0 && nodes_.count(prefix_of(key, len))) {
          p = prefix_of(key, len);
          break;
        }
      }
      st.children[p].push_back(key);
      st.deepest_first.emplace_back(&key, &nodes_.find(p)->first);
      st.parent[key] = std::move(p);
    }
    std::stable_sort(
        st.deepest_first.begin(), st.deepest_first.end(),
        [](const auto& a, const auto& b) { return a.first->size() > b.first->size(); });
    structure_ = std::move(st);
    return *structure_;
  }
  void changed() { structure_.reset(); }

  Case c_;
  std::map<Tokens, ModelNode> nodes_;
  mutable std::optional<Structure> structure_;
  uint64_t tick_ = 0;
  uint64_t serial_ = 0;
};

// ---------------------------------------------------------------------------------------------

class RadixTreeProperty : public ::testing::TestWithParam<Case> {
 protected:
  RadixTreeProperty()
      : tree_(RadixTreeOptions{GetParam().granularity, GetParam().order, GetParam().scope},
              TestTraits{GetParam().granularity, GetParam().scope == RadixEvictScope::kLeaves}),
        model_(GetParam()),
        rng_(testing::property_seed(GetParam().seed)) {}

  Tokens key_of(RadixNodeId id) const {
    Tokens key;
    for (const auto* n = tree_.find(id); n != nullptr && id != tree_.root();
         id = n->parent(), n = tree_.find(id)) {
      key.insert(key.begin(), n->edge().begin(), n->edge().end());
    }
    return key;
  }
  Tokens random_key(size_t max_len) {
    Tokens key(rng_() % (max_len + 1));
    for (auto& t : key)
      t = static_cast<TokenId>(rng_() % GetParam().alphabet);
    return key;
  }
  std::optional<Tokens> random_node(bool include_root) {
    std::vector<Tokens> keys;
    for (const auto& [k, n] : model_.nodes()) {
      if (include_root || !k.empty()) keys.push_back(k);
    }
    if (keys.empty()) return std::nullopt;
    return keys[rng_() % keys.size()];
  }
  // The tree's node for a key the model holds (compare() has checked that both hold the same).
  RadixNodeId id_for(const Tokens& key) const {
    const auto m = tree_.peek(key);
    EXPECT_EQ(m.length, key.size());
    return m.node;
  }

  void compare() {
    ASSERT_TRUE(tree_.verify().ok()) << tree_.verify();
    ASSERT_EQ(tree_.node_count() + 1, model_.nodes().size());
    const Model::Derived derived = model_.derive();
    ASSERT_EQ(tree_.find(tree_.root())->pins(), derived.pins.at(&model_.nodes().begin()->first));
    // Every tree node is a model node with the same record: with equal counts, the same sets.
    size_t entries = 0, bytes = 0, evictable = 0;
    bool all_found = true;
    tree_.for_each_node([&](RadixNodeId id, const Tree::Node& n) {
      const auto it = model_.nodes().find(key_of(id));
      if (it == model_.nodes().end()) {
        all_found = false;
        return;
      }
      const auto& [key, m] = *it;
      const uint64_t pins = derived.pins.at(&key);
      EXPECT_EQ(n.value(), m.value);
      EXPECT_EQ(n.own_pins(), m.own_pins);
      EXPECT_EQ(n.pins(), pins);
      EXPECT_EQ(n.last_access(), m.last_access);
      EXPECT_EQ(n.priority(), m.priority);
      EXPECT_EQ(n.serial(), m.serial);
      if (m.value) {
        ++entries;
        bytes += m.value->size();
        if (pins == 0) evictable += m.value->size();
        if (GetParam().scope == RadixEvictScope::kLeaves) {
          EXPECT_EQ(*m.value, n.edge());
        }
      }
    });
    ASSERT_TRUE(all_found) << "the tree holds a node the model does not";
    ASSERT_FALSE(HasFailure());
    ASSERT_EQ(tree_.entries(), entries);
    ASSERT_EQ(tree_.bytes(), bytes);
    ASSERT_EQ(tree_.evictable_bytes(), evictable);
    const auto victim = tree_.next_victim();
    const auto model_victim = model_.victim(derived);
    ASSERT_EQ(victim.has_value(), model_victim.has_value());
    if (victim) {
      ASSERT_EQ(key_of(*victim), *model_victim);
    }
    // Ids of pinned nodes stay valid and keep naming the same key.
    for (const auto& [key, id] : pinned_)
      ASSERT_EQ(key_of(id), key);
  }

  static std::string text(const Tokens& key) {
    std::ostringstream os;
    os << "[";
    for (TokenId t : key)
      os << t << " ";
    os << "]";
    return os.str();
  }

  void step() {
    const int op = static_cast<int>(rng_() % 100);
    last_op_ = "op " + std::to_string(op);
    const uint32_t g = GetParam().granularity;
    if (op < 30) {  // insert
      const Tokens key = random_key(12);
      const uint32_t priority = static_cast<uint32_t>(rng_() % 4);
      last_op_ += " insert " + text(key);
      const auto ins = tree_.insert(key, priority, [&](size_t offset, size_t length) {
        if (GetParam().scope == RadixEvictScope::kEntries) return std::optional<Tokens>();
        return std::optional<Tokens>(Tokens(key.begin() + static_cast<ptrdiff_t>(offset),
                                            key.begin() + static_cast<ptrdiff_t>(offset + length)));
      });
      const Tokens end = model_.insert(key, priority);
      ASSERT_EQ(ins.length, key.size());
      ASSERT_EQ(key_of(ins.node), end);
      if (GetParam().scope == RadixEvictScope::kEntries && !key.empty()) {
        ASSERT_TRUE(tree_.set_value(ins.node, key).ok());
        model_.nodes().at(key).value = key;
      }
    } else if (op < 45) {  // peek / match
      const Tokens key = random_key(14);
      const bool split = rng_() % 3 == 0;
      last_op_ += (split ? " match+split " : " peek ") + text(key);
      const auto m = split ? tree_.match(key, true) : tree_.peek(key);
      const auto w = model_.walk(key);
      if (split && w.child) {
        const Tokens upper = model_.split(*w.child, w.child_lcp);
        ASSERT_EQ(key_of(m.node), upper);
        ASSERT_EQ(m.length, upper.size());
        ASSERT_FALSE(m.partial.has_value());
      } else {
        ASSERT_EQ(key_of(m.node), w.node);
        ASSERT_EQ(m.length, w.pos);
        ASSERT_EQ(m.partial.has_value(), w.child.has_value());
        if (w.child) {
          ASSERT_EQ(key_of(*m.partial), *w.child);
          ASSERT_EQ(m.partial_length, w.child_lcp);
        }
      }
    } else if (op < 55) {  // touch
      if (auto key = random_node(false)) {
        const bool ancestors = rng_() % 2 == 0;
        ASSERT_TRUE(tree_.touch(id_for(*key), ancestors).ok());
        model_.touch(*key, ancestors);
      }
    } else if (op < 65) {  // pin
      if (auto key = random_node(true)) {
        const RadixNodeId id = id_for(*key);
        ASSERT_TRUE(tree_.pin(id).ok());
        ++model_.nodes().at(*key).own_pins;
        pinned_.emplace_back(*key, id);
      }
    } else if (op < 75) {  // unpin (sometimes a node that is not pinned)
      if (!pinned_.empty() && rng_() % 8 != 0) {
        const size_t i = rng_() % pinned_.size();
        const auto [key, id] = pinned_[i];
        pinned_.erase(pinned_.begin() + static_cast<ptrdiff_t>(i));
        ASSERT_TRUE(tree_.unpin(id).ok());
        model_.unpin(key);
      } else if (auto key = random_node(false)) {
        const Status status = tree_.unpin(id_for(*key));
        ASSERT_EQ(status.ok(), model_.nodes().at(*key).own_pins > 0);
        if (status.ok()) {
          model_.unpin(*key);
          const auto it = std::find_if(pinned_.begin(), pinned_.end(),
                                       [&](const auto& p) { return p.first == *key; });
          pinned_.erase(it);
        }
      }
    } else if (op < 85) {  // evict the next victim, or try a random node
      if (rng_() % 2 == 0) {
        const auto victim = tree_.next_victim();
        if (victim) {
          const Tokens key = key_of(*victim);
          const auto value = tree_.evict(*victim);
          ASSERT_TRUE(value.ok()) << value.status();
          ASSERT_EQ(value.value(), model_.nodes().at(key).value.value());
          model_.evict(key);
        }
      } else if (auto key = random_node(false)) {
        const bool allowed = model_.evictable(*key);
        last_op_ += " evict " + text(*key);
        const auto value = tree_.evict(id_for(*key));
        ASSERT_EQ(value.ok(), allowed) << value.status();
        if (allowed) model_.evict(*key);
      }
    } else if (op < 88) {  // trim the end of the next victim: a split, then evicting the lower part
      if (const auto victim = tree_.next_victim()) {
        const Tokens key = key_of(*victim);
        const size_t edge = model_.edge(key).size();
        const size_t keep = (rng_() % (edge / g + 1)) * g;
        last_op_ += " evict_back " + text(key) + " keeping " + std::to_string(keep);
        const bool leaf = tree_.find(*victim)->is_leaf();
        const auto value = tree_.evict_back(*victim, keep);
        ASSERT_EQ(value.ok(), leaf && keep > 0 && keep < edge) << value.status();
        if (value.ok()) {
          const Tokens& old_value = model_.nodes().at(key).value.value();
          ASSERT_EQ(value.value(), GetParam().scope == RadixEvictScope::kLeaves
                                       ? Tokens(old_value.begin() + static_cast<ptrdiff_t>(keep), old_value.end())
                                       : old_value);
          const Tokens front = model_.evict_back(key, keep);
          if (model_.nodes().count(front) > 0) {
            ASSERT_EQ(key_of(*victim), front);
          }
        }
      }
    } else if (op < 93) {  // split a random node at a random unit boundary
      if (auto key = random_node(false)) {
        const size_t edge = model_.edge(*key).size();
        const size_t at = (rng_() % (edge / g + 1)) * g;
        const auto upper = tree_.split(id_for(*key), at);
        ASSERT_EQ(upper.ok(), at > 0 && at < edge && edge % g == 0) << upper.status();
        if (upper.ok()) {
          const Tokens model_upper = model_.split(*key, at);
          ASSERT_EQ(key_of(upper.value()), model_upper);
        }
      }
    } else if (op < 98) {  // set a priority
      if (auto key = random_node(false)) {
        const auto p = static_cast<uint32_t>(rng_() % 4);
        ASSERT_TRUE(tree_.set_priority(id_for(*key), p).ok());
        model_.nodes().at(*key).priority = p;
      }
    } else if (op < 99) {  // a stale id is an error, never a crash
      if (stale_) {
        ASSERT_EQ(tree_.touch(*stale_, true).code(), ErrorCode::kNotFound);
      }
      if (auto key = random_node(false)) {
        if (!model_.evictable(*key)) return;
        stale_ = id_for(*key);
        ASSERT_TRUE(tree_.evict(*stale_).ok());
        model_.evict(*key);
        if (tree_.find(*stale_) != nullptr) stale_.reset();  // an inner entry stays
      }
    } else if (rng_() % 20 == 0) {  // clear, rarely
      tree_.clear();
      model_.clear();
      pinned_.clear();
    }
    // Keep the tree small so the brute-force model stays fast.
    while (tree_.node_count() > 24) {
      const auto victim = tree_.next_victim();
      if (!victim) break;
      const Tokens key = key_of(*victim);
      ASSERT_TRUE(tree_.evict(*victim).ok());
      model_.evict(key);
      ++evictions_;
    }
  }

  Tree tree_;
  Model model_;
  std::mt19937_64 rng_;
  std::vector<std::pair<Tokens, RadixNodeId>> pinned_;
  std::optional<RadixNodeId> stale_;
  uint64_t evictions_ = 0;
  std::string last_op_;  // for failure messages
};

TEST_P(RadixTreeProperty, RandomOperationsMatchTheModel) {
  SCOPED_TRACE(testing::property_trace());
  for (uint64_t i = 0; i < testing::property_count(kOperations); ++i) {
    ASSERT_NO_FATAL_FAILURE(step()) << "operation " << i << ": " << last_op_;
    ASSERT_NO_FATAL_FAILURE(compare()) << "after operation " << i << ": " << last_op_;
  }
  EXPECT_GT(evictions_, 1000u);  // the size cap kept evicting: the eviction paths ran
}

INSTANTIATE_TEST_SUITE_P(
    Trees, RadixTreeProperty,
    ::testing::Values(Case{1, RadixEvictionOrder::kLru, RadixEvictScope::kLeaves, 3, 1},
                      Case{3, RadixEvictionOrder::kLru, RadixEvictScope::kLeaves, 2, 2},
                      Case{2, RadixEvictionOrder::kPriority, RadixEvictScope::kLeaves, 3, 3},
                      Case{1, RadixEvictionOrder::kLru, RadixEvictScope::kEntries, 3, 4},
                      Case{1, RadixEvictionOrder::kPriority, RadixEvictScope::kEntries, 2, 5}),
    [](const auto& param_info) {
      std::ostringstream os;
      PrintTo(param_info.param, &os);
      return os.str();
    });

}  // namespace
}  // namespace kvfabric
