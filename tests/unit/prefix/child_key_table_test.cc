// ChildKeyTable: after any mix of inserts, erases and replacements it answers like a multimap,
// colliding keys and long probe runs that wrap around the array included.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <utility>
#include <vector>

#include "kvfabric/prefix/child_key_table.h"
#include "testing/property_env.h"

namespace kvfabric::detail {
namespace {

using testing::property_count;
using testing::property_seed;
using testing::property_trace;

// Every child the table finds under `key`.
std::vector<uint32_t> found(const ChildKeyTable& table, uint64_t key) {
  std::vector<uint32_t> children;
  table.find(key, [&](uint32_t child) -> size_t {
    children.push_back(child);
    return 0;  // keep looking
  });
  std::sort(children.begin(), children.end());
  return children;
}

TEST(ChildKeyTableTest, FindsWhatTheTestAcceptsAmongCollidingKeys) {
  ChildKeyTable table;
  EXPECT_EQ(table.find(7, [](uint32_t) -> size_t { return 1; }).first, ChildKeyTable::kNone);
  table.insert(7, 1);
  table.insert(7, 2);
  table.insert(9, 3);
  const auto [child, what] = table.find(7, [](uint32_t c) -> size_t { return c == 2 ? 5 : 0; });
  EXPECT_EQ(child, 2u);
  EXPECT_EQ(what, 5u);
  EXPECT_EQ(found(table, 7), (std::vector<uint32_t>{1, 2}));
  EXPECT_TRUE(table.replace(7, 2, 4));
  EXPECT_FALSE(table.replace(7, 2, 5));
  EXPECT_EQ(found(table, 7), (std::vector<uint32_t>{1, 4}));
  EXPECT_TRUE(table.erase(7, 1));
  EXPECT_FALSE(table.erase(7, 1));
  EXPECT_FALSE(table.contains(7, 1));
  EXPECT_TRUE(table.contains(9, 3));
  EXPECT_EQ(table.size(), 2u);
  table.clear();
  EXPECT_TRUE(table.empty());
  EXPECT_EQ(table.memory_bytes(), 0u);
}

// Random operations against a multimap. A few keys, each shared by many children, make long runs
// of one home; random keys make runs that wrap around the end of the array.
TEST(ChildKeyTablePropertyTest, AnswersLikeAMultimap) {
  for (const uint64_t key_range : {uint64_t{5}, uint64_t{1} << 62}) {
    std::mt19937_64 rng(property_seed(17 + key_range));
    ChildKeyTable table;
    std::multimap<uint64_t, uint32_t> model;
    uint32_t next_child = 0;
    const uint64_t ops = property_count(20000);
    for (uint64_t op = 0; op < ops; ++op) {
      SCOPED_TRACE(property_trace());
      const uint64_t roll = rng() % 10;
      if (model.empty() || roll < 5) {
        const uint64_t key = rng() % key_range;
        table.insert(key, next_child);
        model.emplace(key, next_child++);
      } else {
        auto it = std::next(model.begin(), static_cast<ptrdiff_t>(rng() % model.size()));
        if (roll < 9) {
          ASSERT_TRUE(table.erase(it->first, it->second));
          model.erase(it);
        } else {
          ASSERT_TRUE(table.replace(it->first, it->second, next_child));
          it->second = next_child++;
        }
      }
      ASSERT_EQ(table.size(), model.size());
      if (op % 97 == 0) {
        for (const auto& [key, child] : model) ASSERT_TRUE(table.contains(key, child));
        for (uint64_t key = 0; key < std::min<uint64_t>(key_range, 5); ++key) {
          std::vector<uint32_t> expected;
          for (auto [it, last] = model.equal_range(key); it != last; ++it) expected.push_back(it->second);
          std::sort(expected.begin(), expected.end());
          ASSERT_EQ(found(table, key), expected);
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvfabric::detail
