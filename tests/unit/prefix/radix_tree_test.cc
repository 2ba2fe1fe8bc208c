// RadixTree: splits, matching at unit granularity, partial last units, pins, eviction order.
#include <gtest/gtest.h>

#include <vector>

#include "kvfabric/prefix/radix_tree.h"

namespace kvfabric {
namespace {

using Tokens = std::vector<TokenId>;

// A value that is the tokens of its node's edge: it splits with the edge and weighs 1 per token.
struct EdgeTraits {
  uint32_t granularity = 1;
  size_t bytes(const Tokens& v) const { return v.size(); }
  std::optional<Tokens> split_front(Tokens& v, size_t units) const {
    const auto at = static_cast<ptrdiff_t>(units * granularity);
    Tokens front(v.begin(), v.begin() + at);
    v.erase(v.begin(), v.begin() + at);
    return front;
  }
};
using EdgeTree = RadixTree<Tokens, EdgeTraits>;

EdgeTree make_edge_tree(uint32_t granularity, RadixEvictionOrder order = RadixEvictionOrder::kLru) {
  return EdgeTree(RadixTreeOptions{granularity, order, RadixEvictScope::kLeaves},
                  EdgeTraits{granularity});
}

// Inserts with values equal to the key's tokens they cover.
EdgeTree::Insertion put(EdgeTree& tree, const Tokens& key, uint32_t priority = 0) {
  return tree.insert(key, priority, [&](size_t offset, size_t length) {
    return std::optional<Tokens>(Tokens(key.begin() + static_cast<ptrdiff_t>(offset),
                                        key.begin() + static_cast<ptrdiff_t>(offset + length)));
  });
}

TEST(CommonPrefixLen, SeedCases) {
  EXPECT_EQ(common_prefix_len({}, {}), 0u);
  EXPECT_EQ(common_prefix_len(Tokens{1, 2, 3}, {}), 0u);
  EXPECT_EQ(common_prefix_len({}, Tokens{1, 2, 3}), 0u);
  EXPECT_EQ(common_prefix_len(Tokens{1, 2, 3}, Tokens{1, 2, 3}), 3u);
  EXPECT_EQ(common_prefix_len(Tokens{1, 2, 3}, Tokens{1, 2, 4}), 2u);
  EXPECT_EQ(common_prefix_len(Tokens{1, 2, 3}, Tokens{4, 5, 6}), 0u);
  EXPECT_EQ(common_prefix_len(Tokens{1, 2}, Tokens{1, 2, 3, 4}), 2u);
}

TEST(CommonPrefixLen, LongRunsAcrossChunks) {
  Tokens a(1000), b(1000);
  for (TokenId i = 0; i < 1000; ++i)
    a[i] = b[i] = i;
  EXPECT_EQ(common_prefix_len(a, b), 1000u);
  b[777] = 0;
  EXPECT_EQ(common_prefix_len(a, b), 777u);
}

// Every position of the first difference, for lengths around the chunk and gallop boundaries,
// against a token-by-token count.
TEST(CommonPrefixLen, FindsTheFirstDifferenceAnywhere) {
  for (const size_t n : {1u, 31u, 32u, 33u, 95u, 96u, 97u, 223u, 224u, 225u, 1500u}) {
    Tokens a(n);
    for (size_t i = 0; i < n; ++i)
      a[i] = static_cast<TokenId>(i * 2654435761u);
    for (size_t at = 0; at <= n; ++at) {
      Tokens b = a;
      if (at < n) b[at] ^= 1;
      if (at + 1 < n) b[n - 1] ^= 2;  // a later difference must not matter
      ASSERT_EQ(common_prefix_len(a, b), at) << "length " << n;
      ASSERT_EQ(common_prefix_len(b, a), at) << "length " << n;
      ASSERT_EQ(common_prefix_len(std::span(a).first(at), b), at) << "length " << n;
    }
  }
}

TEST(RadixTree, RejectsZeroGranularity) {
  const auto tree = RadixTree<int>::create(RadixTreeOptions{0});
  EXPECT_EQ(tree.status().message(),
            "radix tree granularity must be >= 1 (got 0)");
}

TEST(RadixTree, SplitsAtTheDivergenceAndSharesThePrefix) {
  EdgeTree tree = make_edge_tree(1);
  put(tree, {1, 2, 3, 4});
  const auto second = put(tree, {1, 2, 5, 6});
  EXPECT_EQ(second.existing, 2u);
  ASSERT_TRUE(second.split.has_value());
  EXPECT_EQ(tree.find(*second.split)->edge(), (Tokens{1, 2}));
  EXPECT_EQ(tree.find(*second.split)->value(), (Tokens{1, 2}));  // the value split too
  EXPECT_EQ(tree.node_count(), 3u);
  EXPECT_EQ(tree.bytes(), 6u);
  const auto m = tree.peek(Tokens{1, 2, 5, 6, 7});
  EXPECT_EQ(m.length, 4u);
  EXPECT_EQ(tree.find(m.node)->edge(), (Tokens{5, 6}));
  EXPECT_TRUE(tree.verify().ok()) << tree.verify();
}

TEST(RadixTree, MatchReportsAPartialEdgeAndCanSplitThere) {
  EdgeTree tree = make_edge_tree(1);
  put(tree, {1, 2, 3, 4});
  auto m = tree.peek(Tokens{1, 2, 3, 9});
  EXPECT_EQ(m.length, 0u);
  ASSERT_TRUE(m.partial.has_value());
  EXPECT_EQ(m.partial_length, 3u);
  EXPECT_EQ(tree.node_count(), 1u);  // peek changes nothing
  m = tree.match(Tokens{1, 2, 3, 9}, /*split_at_end=*/true);
  EXPECT_EQ(m.length, 3u);
  EXPECT_FALSE(m.partial.has_value());
  EXPECT_EQ(tree.find(m.node)->edge(), (Tokens{1, 2, 3}));
  EXPECT_EQ(tree.node_count(), 2u);
}

TEST(RadixTree, GranularityKeepsSplitsOnUnitBoundaries) {
  EdgeTree tree = make_edge_tree(4);
  put(tree, {1, 2, 3, 4, 5, 6, 7, 8});
  // Diverges inside the second unit: only the first whole unit is shared.
  const auto ins = put(tree, {1, 2, 3, 4, 5, 6, 0, 0});
  EXPECT_EQ(ins.existing, 4u);
  EXPECT_EQ(tree.peek(Tokens{1, 2, 3, 4, 5, 6, 7, 9}).length, 4u);
  // Siblings may share their first token: children are found by their whole first unit.
  put(tree, {1, 2, 3, 9});
  EXPECT_EQ(tree.peek(Tokens{1, 2, 3, 9}).length, 4u);
  EXPECT_EQ(tree.peek(Tokens{1, 2, 3, 4}).length, 4u);
  EXPECT_TRUE(tree.verify().ok()) << tree.verify();
}

TEST(RadixTree, APartialLastUnitMatchesOnlyTheSameEnding) {
  EdgeTree tree = make_edge_tree(4);
  const auto ins = put(tree, {1, 2, 3, 4, 5, 6});  // one unit + a 2-token tail
  EXPECT_EQ(ins.length, 6u);
  EXPECT_EQ(tree.node_count(), 2u);
  EXPECT_EQ(tree.peek(Tokens{1, 2, 3, 4, 5, 6}).length, 6u);
  EXPECT_EQ(tree.peek(Tokens{1, 2, 3, 4, 5}).length, 4u);           // shorter ending
  EXPECT_EQ(tree.peek(Tokens{1, 2, 3, 4, 5, 6, 7}).length, 4u);     // longer ending
  EXPECT_EQ(tree.peek(Tokens{1, 2, 3, 4, 5, 6, 7, 8}).length, 4u);  // a full unit
  // Another ending of the same unit is another leaf; a full unit beside them too.
  put(tree, {1, 2, 3, 4, 5, 7});
  put(tree, {1, 2, 3, 4, 5, 6, 7, 8});
  EXPECT_EQ(tree.node_count(), 4u);
  EXPECT_EQ(tree.peek(Tokens{1, 2, 3, 4, 5, 7}).length, 6u);
  EXPECT_EQ(tree.peek(Tokens{1, 2, 3, 4, 5, 6, 7, 8}).length, 8u);
  EXPECT_TRUE(tree.verify().ok()) << tree.verify();
}

TEST(RadixTree, LeavesGoInLruOrderAndParentsFollow) {
  EdgeTree tree = make_edge_tree(1);
  const auto a = put(tree, {1, 2, 3});
  const auto b = put(tree, {1, 2, 4});
  const auto c = put(tree, {7});
  ASSERT_TRUE(tree.touch(a.node, true).ok());
  // Victims: leaves only, least recently touched first: {1,2,4}, {7}, {1,2,3}, then {1,2}.
  std::vector<Tokens> order;
  while (auto victim = tree.next_victim()) {
    order.push_back(tree.find(*victim)->value().value());
    ASSERT_TRUE(tree.evict(*victim).ok());
    ASSERT_TRUE(tree.verify().ok()) << tree.verify();
  }
  EXPECT_EQ(order, (std::vector<Tokens>{{4}, {7}, {3}, {1, 2}}));
  EXPECT_EQ(tree.node_count(), 0u);
  EXPECT_EQ(tree.bytes(), 0u);
  EXPECT_EQ(tree.find(b.node), nullptr);  // removed nodes' ids are stale
  EXPECT_EQ(tree.touch(c.node, false).code(), ErrorCode::kNotFound);
}

TEST(RadixTree, PriorityOrderEvictsLowPriorityFirstThenLru) {
  EdgeTree tree = make_edge_tree(1, RadixEvictionOrder::kPriority);
  put(tree, {1}, 2);
  put(tree, {2}, 0);
  put(tree, {3}, 0);
  put(tree, {4}, 1);
  std::vector<Tokens> order;
  while (auto victim = tree.next_victim())
    order.push_back(tree.evict(*victim).value());
  EXPECT_EQ(order, (std::vector<Tokens>{{2}, {3}, {4}, {1}}));
}

TEST(RadixTree, InsertRaisesThePathsPriority) {
  EdgeTree tree = make_edge_tree(1, RadixEvictionOrder::kPriority);
  put(tree, {1, 2}, 0);
  const auto ins = put(tree, {1, 2, 3}, 5);
  EXPECT_EQ(tree.find(tree.find(ins.node)->parent())->priority(), 5u);
  ASSERT_TRUE(tree.set_priority(ins.node, 1).ok());
  EXPECT_EQ(tree.find(ins.node)->priority(), 1u);
}

TEST(RadixTree, PinsProtectANodeAndItsAncestors) {
  EdgeTree tree = make_edge_tree(1);
  const auto deep = put(tree, {1, 2, 3});
  put(tree, {1, 2, 4});
  put(tree, {9});
  ASSERT_TRUE(tree.pin(deep.node).ok());
  const RadixNodeId shared = tree.find(deep.node)->parent();
  EXPECT_EQ(tree.find(shared)->pins(), 1u);
  EXPECT_EQ(tree.evictable_bytes(), 2u);  // {4} and {9}
  EXPECT_EQ(tree.evict(deep.node).status().code(), ErrorCode::kInvalidOperation);
  while (auto victim = tree.next_victim())
    ASSERT_TRUE(tree.evict(*victim).ok());
  EXPECT_EQ(tree.node_count(), 2u);  // the pinned leaf and its ancestor survive
  ASSERT_TRUE(tree.unpin(deep.node).ok());
  EXPECT_EQ(tree.unpin(deep.node).code(), ErrorCode::kInvalidOperation);
  EXPECT_EQ(tree.evictable_bytes(), 3u);
  EXPECT_TRUE(tree.verify().ok()) << tree.verify();
}

TEST(RadixTree, SplitKeepsTheLowerNodesIdAndPins) {
  EdgeTree tree = make_edge_tree(2);
  const auto ins = put(tree, {1, 2, 3, 4, 5, 6});
  ASSERT_TRUE(tree.pin(ins.node).ok());
  EXPECT_EQ(tree.split(ins.node, 3).status().code(), ErrorCode::kInvalidArgument);  // mid-unit
  EXPECT_EQ(tree.split(ins.node, 6).status().code(), ErrorCode::kInvalidArgument);
  const auto upper = tree.split(ins.node, 4);
  ASSERT_TRUE(upper.ok());
  EXPECT_EQ(tree.find(ins.node)->edge(), (Tokens{5, 6}));
  EXPECT_EQ(tree.find(*upper)->value(), (Tokens{1, 2, 3, 4}));
  EXPECT_EQ(tree.find(*upper)->pins(), 1u);
  ASSERT_TRUE(tree.unpin(ins.node).ok());
  EXPECT_EQ(tree.find(*upper)->pins(), 0u);
  EXPECT_TRUE(tree.verify().ok()) << tree.verify();
}

TEST(RadixTree, EvictBackTrimsALeafInPlace) {
  EdgeTree tree = make_edge_tree(2);
  put(tree, {1, 2, 3, 4});
  const auto leaf = put(tree, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
  const auto other = put(tree, {1, 2, 3, 4, 7, 7});
  ASSERT_TRUE(tree.pin(other.node).ok());
  const uint64_t clock = tree.find(leaf.node)->last_access();
  EXPECT_EQ(tree.evict_back(leaf.node, 3).status().code(), ErrorCode::kInvalidArgument);  // mid-unit
  EXPECT_EQ(tree.evict_back(leaf.node, 6).status().code(), ErrorCode::kInvalidArgument);  // all
  EXPECT_EQ(tree.evict_back(leaf.node, 0).status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(tree.evict_back(other.node, 0).status().code(), ErrorCode::kInvalidOperation);  // pinned
  EXPECT_EQ(tree.evict_back(tree.find(leaf.node)->parent(), 2).status().code(),
            ErrorCode::kInvalidOperation);  // not a leaf
  const auto back = tree.evict_back(leaf.node, 2);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, (Tokens{7, 8, 9, 10}));
  const auto* trimmed = tree.find(leaf.node);  // same id, shorter key
  ASSERT_NE(trimmed, nullptr);
  EXPECT_EQ(trimmed->edge(), (Tokens{5, 6}));
  EXPECT_EQ(trimmed->value(), (Tokens{5, 6}));
  EXPECT_EQ(trimmed->depth(), 6u);
  EXPECT_EQ(trimmed->last_access(), clock);
  EXPECT_EQ(tree.peek(Tokens{1, 2, 3, 4, 5, 6, 7, 8}).length, 6u);
  EXPECT_EQ(tree.bytes(), 4u + 2u + 2u);
  EXPECT_TRUE(tree.verify().ok()) << tree.verify();
  // A value without a front part leaves nothing to keep: the node goes.
  RadixTree<int> plain(RadixTreeOptions{1});
  const auto ins = plain.insert(Tokens{1, 2, 3}, 0, [](size_t, size_t) { return std::optional<int>(7); });
  EXPECT_EQ(plain.evict_back(ins.node, 1).value(), 7);
  EXPECT_EQ(plain.find(ins.node), nullptr);
  EXPECT_EQ(plain.node_count(), 0u);
  EXPECT_TRUE(plain.verify().ok()) << plain.verify();
}

// Self-contained entries at any depth (the seed cache's use).
struct EntryTraits {
  size_t bytes(const Tokens& v) const { return 4 * v.size(); }
  std::optional<Tokens> split_front(Tokens&, size_t) const { return std::nullopt; }
};

TEST(RadixTree, EntryScopeEvictsInnerEntriesAndMergesPathNodes) {
  RadixTree<Tokens, EntryTraits> tree(
      RadixTreeOptions{1, RadixEvictionOrder::kLru, RadixEvictScope::kEntries});
  auto store = [&](const Tokens& key) {
    const auto ins = tree.insert(key);
    ASSERT_TRUE(tree.set_value(ins.node, key).ok());
  };
  store({1, 2});
  store({1, 2, 3, 4});
  store({5, 5});
  // The oldest entry goes first although it is an inner node; its node stays as a path node and
  // merges with its only child.
  const auto victim = tree.next_victim();
  ASSERT_TRUE(victim.has_value());
  EXPECT_EQ(tree.evict(*victim).value(), (Tokens{1, 2}));
  EXPECT_EQ(tree.node_count(), 2u);
  EXPECT_EQ(tree.peek(Tokens{1, 2, 3, 4}).length, 4u);
  EXPECT_EQ(tree.find(tree.peek(Tokens{1, 2, 3, 4}).node)->edge(), (Tokens{1, 2, 3, 4}));
  EXPECT_EQ(tree.entries(), 2u);
  EXPECT_EQ(tree.bytes(), 24u);
  EXPECT_TRUE(tree.verify().ok()) << tree.verify();
}

TEST(RadixTree, ClearMakesEveryIdStale) {
  EdgeTree tree = make_edge_tree(1);
  const auto ins = put(tree, {1, 2, 3});
  ASSERT_TRUE(tree.pin(ins.node).ok());
  tree.clear();
  EXPECT_EQ(tree.find(ins.node), nullptr);
  EXPECT_EQ(tree.node_count(), 0u);
  EXPECT_EQ(tree.entries(), 0u);
  EXPECT_EQ(tree.evictable_bytes(), 0u);
  EXPECT_FALSE(tree.next_victim().has_value());
  const auto again = put(tree, {1, 2, 3});
  EXPECT_NE(again.node, ins.node);  // a reused slot gets a new generation
  EXPECT_TRUE(tree.verify().ok()) << tree.verify();
}

TEST(RadixTree, RootHoldsNoValue) {
  EdgeTree tree = make_edge_tree(1);
  EXPECT_EQ(tree.set_value(tree.root(), Tokens{}).code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(tree.insert(Tokens{}).node, tree.root());
}

}  // namespace
}  // namespace kvfabric
