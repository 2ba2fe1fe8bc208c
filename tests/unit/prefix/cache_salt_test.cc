// Cache salts: blocks indexed under one salt never match a key of another salt; the public range
// of a salted key is shared with every salt; an index with salts still verifies after any mix of
// inserts, splits and evictions.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "kvfabric/prefix/cache_salt.h"
#include "kvfabric/prefix/prefix_block_index.h"
#include "testing/property_env.h"
#include "testing/token_run.h"

namespace kvfabric {
namespace {

using Tokens = std::vector<TokenId>;
using testing::token_run;
constexpr uint32_t kBlockSize = 4;

TEST(CacheSaltTest, IdentitiesAreStableDistinctAndEmptyMeansNoSalt) {
  EXPECT_TRUE(CacheSalt::of("").empty());
  EXPECT_FALSE(CacheSalt::of("alice").empty());
  EXPECT_EQ(CacheSalt::of("alice"), CacheSalt::of("alice"));
  EXPECT_NE(CacheSalt::of("alice"), CacheSalt::of("bob"));
  EXPECT_NE(CacheSalt::of("alice"), CacheSalt::of("alice "));
  // SHA-256("abc") starts ba7816bf 8f01cfea 414140de 5dae2223.
  EXPECT_EQ(to_string(CacheSalt::of("abc")), "ba7816bf8f01cfea414140de5dae2223");
}

class SaltedIndexTest : public ::testing::Test {
 protected:
  SaltedIndexTest()
      : index_(PrefixBlockIndex::create(PrefixIndexOptions{kBlockSize}, 1024).value()) {}

  // Indexes `tokens` under `scope` on fresh block ids; returns the newly indexed blocks.
  size_t insert(const Tokens& tokens, SaltScope scope) {
    std::vector<BlockId> blocks;
    for (size_t i = 0; i < tokens.size() / kBlockSize; ++i)
      blocks.push_back(BlockId{next_++});
    const auto added = index_->insert(RadixKey(tokens, kBlockSize, scope), blocks);
    EXPECT_TRUE(added.ok()) << added.status();
    EXPECT_TRUE(index_->verify().ok()) << index_->verify();
    return added.ok() ? added->size() : 0;
  }
  size_t cached(const Tokens& tokens, SaltScope scope) const {
    return index_->peek(RadixKey(tokens, kBlockSize, scope)).tokens;
  }

  std::unique_ptr<PrefixBlockIndex> index_;
  uint32_t next_ = 0;
};

TEST_F(SaltedIndexTest, ASaltedPrefixMatchesOnlyItsOwnSalt) {
  const SaltScope alice{CacheSalt::of("alice")}, bob{CacheSalt::of("bob")};
  const Tokens prompt = token_run(16, 100);
  EXPECT_EQ(insert(prompt, alice), 4u);
  EXPECT_EQ(cached(prompt, alice), 16u);
  EXPECT_EQ(cached(prompt, bob), 0u);
  EXPECT_EQ(cached(prompt, {}), 0u);  // an unsalted key does not see salted blocks
  // Bob computes his own copy; both then hit their own.
  EXPECT_EQ(insert(prompt, bob), 4u);
  EXPECT_EQ(cached(prompt, bob), 16u);
  EXPECT_EQ(cached(prompt, alice), 16u);
  // And unsalted blocks are not served to a salted key without a public range.
  const Tokens other = token_run(8, 500);
  EXPECT_EQ(insert(other, {}), 2u);
  EXPECT_EQ(cached(other, alice), 0u);
}

TEST_F(SaltedIndexTest, APublicRangeIsSharedAcrossSaltsAndNothingAfterIt) {
  const Tokens system = token_run(8, 1);  // two blocks every tenant sends
  Tokens a = system, b = system;
  a.insert(a.end(), {50, 51, 52, 53, 54, 55, 56, 57});
  b.insert(b.end(), {50, 51, 52, 53, 90, 91, 92, 93});
  const SaltScope alice{CacheSalt::of("alice"), 8}, bob{CacheSalt::of("bob"), 8};
  EXPECT_EQ(insert(a, alice), 4u);
  // Bob shares the public blocks, not Alice's next block although his tokens are the same.
  EXPECT_EQ(cached(b, bob), 8u);
  EXPECT_EQ(insert(b, bob), 2u);
  EXPECT_EQ(cached(b, bob), 16u);
  // A public range that is not whole blocks is rounded down: 11 tokens share two blocks.
  EXPECT_EQ(cached(a, SaltScope{CacheSalt::of("carol"), 11}), 8u);
  // The public blocks are unsalted ones: a key without salt sees them too, and a salted key
  // without a public range does not.
  EXPECT_EQ(cached(a, {}), 8u);
  EXPECT_EQ(cached(a, SaltScope{CacheSalt::of("alice"), 0}), 0u);
}

TEST_F(SaltedIndexTest, APublicRangeEndingInsideAnUnsaltedEdgeSplitsIt) {
  const Tokens prompt = token_run(16, 7);
  EXPECT_EQ(insert(prompt, {}), 4u);  // one unsalted edge of four blocks
  const SaltScope alice{CacheSalt::of("alice"), 8};
  EXPECT_EQ(cached(prompt, alice), 8u);  // compared up to the public end only
  EXPECT_EQ(insert(prompt, alice), 2u);  // splits the edge at 8 and adds Alice's two blocks
  EXPECT_EQ(cached(prompt, alice), 16u);
  EXPECT_EQ(cached(prompt, {}), 16u);
  EXPECT_EQ(cached(prompt, SaltScope{CacheSalt::of("bob"), 8}), 8u);
  EXPECT_EQ(index_->cached_blocks(), 6u);
}

// Random keys under random salts and public ranges against a model: block i of a key is the same
// cached block as block i of another key exactly when their tokens up to it, their salts and their
// public ends (up to that block) agree.
TEST_F(SaltedIndexTest, PropertyMatchesTheModelOfSaltedBlocks) {
  std::mt19937_64 rng(testing::property_seed(18));
  const std::vector<CacheSalt> salts = {{}, CacheSalt::of("a"), CacheSalt::of("b")};
  using BlockKey = std::tuple<CacheSalt, size_t, Tokens>;  // salt, public blocks, tokens
  std::set<BlockKey> model;
  auto block_key = [&](const Tokens& t, const RadixKey& key, size_t i) {
    const size_t public_blocks = key.public_end() / kBlockSize;
    const bool salted = i >= public_blocks;
    return BlockKey{salted ? key.scope().salt : CacheSalt{}, salted ? public_blocks : i + 1,
                    Tokens(t.begin(), t.begin() + static_cast<ptrdiff_t>((i + 1) * kBlockSize))};
  };
  const size_t rounds = testing::property_count(300);
  for (size_t round = 0; round < rounds && next_ + 8 < 1024; ++round) {
    Tokens t(kBlockSize * (1 + rng() % 6));
    for (TokenId& x : t)
      x = static_cast<TokenId>(rng() % 2);  // few symbols: long shared runs
    const SaltScope scope{salts[rng() % salts.size()], static_cast<size_t>(rng() % 30)};
    const RadixKey key(t, kBlockSize, scope);
    size_t expected = 0;
    while (expected < t.size() / kBlockSize && model.count(block_key(t, key, expected)) > 0) {
      ++expected;
    }
    ASSERT_EQ(index_->peek(key).tokens, expected * kBlockSize) << testing::property_trace();
    if (rng() % 3 != 0) {
      insert(t, scope);
      for (size_t i = 0; i < t.size() / kBlockSize; ++i)
        model.insert(block_key(t, key, i));
    }
  }
}

TEST_F(SaltedIndexTest, EvictionKeepsASaltedIndexConsistent) {
  const SaltScope alice{CacheSalt::of("alice"), 8};
  const Tokens prompt = token_run(16, 7);
  insert(prompt, {});
  insert(prompt, alice);
  // Every block is in use by the sequence that indexed it; idle them all, then evict.
  for (uint32_t b = 0; b < next_; ++b) {
    if (index_->is_indexed(BlockId{b})) index_->on_block_idle(BlockId{b});
  }
  ASSERT_TRUE(index_->verify().ok()) << index_->verify();
  // The least recently used leaf is the unsalted second half (Alice's insert touched the
  // shared public half and her own leaf).
  const auto freed = index_->release_idle(2);
  EXPECT_EQ(freed, (std::vector<BlockId>{BlockId{2}, BlockId{3}}));
  EXPECT_EQ(cached(prompt, {}), 8u);
  EXPECT_EQ(cached(prompt, alice), 16u);
  ASSERT_TRUE(index_->verify().ok()) << index_->verify();
  const auto rest = index_->release_idle(100);
  EXPECT_EQ(freed.size() + rest.size(), 6u);
  EXPECT_EQ(index_->cached_blocks(), 0u);
  EXPECT_EQ(cached(prompt, alice), 0u);
  ASSERT_TRUE(index_->verify().ok()) << index_->verify();
}

}  // namespace
}  // namespace kvfabric
