// The global prefix index: one tree over several replicas' pools, each replica holding, sharing and
// evicting its own blocks.
#include "kvfabric/prefix/global_prefix_index.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "kvfabric/block/paged_kv_cache.h"
#include "testing/token_run.h"

namespace kvfabric {
namespace {

using testing::token_run;
using Tokens = std::vector<TokenId>;
constexpr uint32_t kBlockSize = 4;

Tokens concat(Tokens a, const Tokens& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// `replicas` pools of `blocks` blocks, each with the index as its retainer.
class Cluster {
 public:
  Cluster(uint32_t replicas, uint32_t blocks) {
    index_ = GlobalPrefixIndex::create({kBlockSize, replicas, blocks}).value();
    for (uint32_t r = 0; r < replicas; ++r) {
      pools_.push_back(std::make_unique<PagedKvCache>(blocks, kBlockSize, 1, 8));
      EXPECT_TRUE(pools_.back()->set_block_retainer(&index_->retainer(r)).ok());
    }
  }

  GlobalPrefixIndex& index() { return *index_; }
  PagedKvCache& pool(uint32_t r) { return *pools_[r]; }

  ReplicaPrefix peek(uint32_t r, const Tokens& prompt) {
    index_->lookup(RadixKey(prompt, kBlockSize), lookup_);
    return index_->prefix_on(lookup_, r);
  }

  // Creates `seq` on replica `r` sharing what r caches of the prompt; returns the cached tokens.
  size_t admit(uint32_t r, uint64_t seq, const Tokens& prompt, SaltScope scope = {}) {
    const RadixKey key(prompt, kBlockSize, scope);
    index_->lookup(key, lookup_);
    const ReplicaPrefix held = index_->prefix_on(lookup_, r);
    std::vector<BlockId> shared;
    index_->blocks_on(lookup_, r, held.blocks, shared);
    index_->use(lookup_, r);
    EXPECT_TRUE(pools_[r]->allocate_shared(SeqId{seq}, prompt.size(), shared).ok());
    return held.tokens;
  }

  // Indexes the full blocks of `seq` (which holds `prompt`) on replica `r`.
  size_t index_prompt(uint32_t r, uint64_t seq, const Tokens& prompt, SaltScope scope = {}) {
    const RadixKey key(prompt, kBlockSize, scope);
    auto added = index_->insert(r, key, pools_[r]->get_sequence(SeqId{seq})->block_ids);
    EXPECT_TRUE(added.ok()) << added.status().to_string();
    for (BlockId b : *added) EXPECT_TRUE(pools_[r]->retain_block(b).ok());
    return added->size();
  }

  // Forgets what replica `r` holds of `key` that eviction could take, freeing those blocks in its
  // pool; returns how many.
  size_t forget(uint32_t r, const Tokens& key) {
    index_->lookup(RadixKey(key, kBlockSize), lookup_);
    const std::vector<BlockId> forgotten = index_->forget(lookup_, r);
    for (BlockId b : forgotten) EXPECT_TRUE(pools_[r]->release_retained_block(b).ok());
    return forgotten.size();
  }

  void check() {
    ASSERT_TRUE(index_->verify().ok()) << index_->verify().to_string();
    for (auto& pool : pools_) ASSERT_TRUE(pool->verify_integrity().ok());
  }

 private:
  std::unique_ptr<GlobalPrefixIndex> index_;
  std::vector<std::unique_ptr<PagedKvCache>> pools_;
  PrefixLookup lookup_;
};

TEST(GlobalPrefixIndex, RefusesBadOptions) {
  EXPECT_FALSE(GlobalPrefixIndex::create({0, 2, 8}).ok());
  EXPECT_FALSE(GlobalPrefixIndex::create({4, 0, 8}).ok());
}

// A node is split for one replica where others hold it too. Regression: when another replica
// used only the front of its holding (its sequence had let go of the rest), the split left that
// rest idle and nobody told its owner, whose load then went stale.
TEST(GlobalPrefixIndex, ASplitForOneReplicaReportsTheIdleBlocksItGaveAnother) {
  Cluster c(2, 16);
  const Tokens prompt = token_run(16, 100);  // 4 blocks
  for (uint32_t r = 0; r < 2; ++r) {
    c.admit(r, 1, prompt);
    c.index_prompt(r, 1, prompt);
  }
  // Replica 1's sequence keeps its first 2 blocks: it uses the front of its holding only.
  std::vector<size_t> front(8);
  for (size_t i = 0; i < front.size(); ++i) front[i] = i;
  ASSERT_TRUE(c.pool(1).retain_tokens(SeqId{1}, front).ok());
  EXPECT_EQ(c.index().idle_blocks(1), 0u);  // the holding is still in use as a whole
  c.index().clear_idle_changes();
  // Replica 0 shares the first 3 blocks of the node: it is split there for both replicas, and
  // replica 1's last block turns idle.
  ASSERT_TRUE(c.pool(0).free(SeqId{1}).ok());
  c.admit(0, 2, token_run(12, 100));
  EXPECT_EQ(c.index().idle_blocks(1), 1u);
  EXPECT_TRUE(c.index().idle_changed(1));
  EXPECT_EQ(std::vector<uint32_t>(c.index().idle_changes().begin(), c.index().idle_changes().end()),
            std::vector<uint32_t>{1});
  c.index().clear_idle_changes();
  EXPECT_FALSE(c.index().idle_changed(1));
  EXPECT_TRUE(c.index().idle_changes().empty());
  c.check();
}

TEST(GlobalPrefixIndex, EachReplicaSeesItsOwnBlocksOfOnePath) {
  Cluster c(3, 16);
  const Tokens prompt = token_run(12, 100);
  EXPECT_EQ(c.admit(0, 1, prompt), 0u);
  EXPECT_EQ(c.index_prompt(0, 1, prompt), 3u);
  EXPECT_EQ(c.admit(2, 1, prompt), 0u);  // another replica: not cached there
  EXPECT_EQ(c.index_prompt(2, 1, prompt), 3u);
  c.check();
  EXPECT_EQ(c.index().node_count(), 1u);

  PrefixLookup lookup;
  c.index().lookup(RadixKey(prompt, kBlockSize), lookup);
  ASSERT_EQ(lookup.steps.size(), 1u);
  EXPECT_EQ(lookup.tokens(), 12u);
  const auto holders = c.index().holders(lookup, 0);
  EXPECT_EQ(std::vector<uint32_t>(holders.begin(), holders.end()), (std::vector<uint32_t>{0, 2}));
  EXPECT_EQ(c.index().prefix_on(lookup, 1).tokens, 0u);
  for (uint32_t r : {0u, 2u}) {
    std::vector<BlockId> blocks;
    c.index().blocks_on(lookup, r, 3, blocks);
    EXPECT_EQ(blocks, c.pool(r).get_sequence(SeqId{1})->block_ids);
  }
  // A new request shares on the replica holding the prefix, partly filled tail excepted.
  EXPECT_EQ(c.admit(0, 2, concat(prompt, {7, 7})), 12u);
  EXPECT_EQ(c.pool(0).get_sequence(SeqId{2})->block_ids.front(),
            c.pool(0).get_sequence(SeqId{1})->block_ids.front());
  c.check();
}

TEST(GlobalPrefixIndex, HoldingsThatEndInsideAnEdgeSplitIt) {
  Cluster c(2, 16);
  const Tokens long_prompt = token_run(16, 1);
  const Tokens short_prompt = token_run(8, 1);
  c.admit(0, 1, long_prompt);
  c.index_prompt(0, 1, long_prompt);
  c.admit(1, 1, short_prompt);
  EXPECT_EQ(c.index_prompt(1, 1, short_prompt), 2u);
  c.check();
  EXPECT_EQ(c.index().node_count(), 2u);  // [0, 8) held by both, [8, 16) by replica 0
  EXPECT_EQ(c.peek(0, long_prompt).tokens, 16u);
  EXPECT_EQ(c.peek(1, long_prompt).tokens, 8u);
  EXPECT_EQ(c.peek(1, long_prompt).steps, 1u);
  // A prompt that leaves the edge inside it splits it too, for every holder.
  const Tokens fork = concat(token_run(12, 1), {99, 99, 99, 99});
  c.admit(1, 2, fork);
  c.index_prompt(1, 2, fork);
  c.check();
  EXPECT_EQ(c.peek(0, fork).tokens, 12u);
  EXPECT_EQ(c.peek(1, fork).tokens, 16u);
  EXPECT_EQ(c.peek(1, long_prompt).tokens, 12u);
}

TEST(GlobalPrefixIndex, EvictionIsPerReplicaLeastRecentlyUsedLeafFirst) {
  Cluster c(2, 6);
  const Tokens a = token_run(8, 1);    // 2 blocks
  const Tokens b = token_run(8, 100);  // 2 blocks
  for (uint32_t r : {0u, 1u}) {
    c.admit(r, 1, a);
    c.index_prompt(r, 1, a);
    c.admit(r, 2, b);
    c.index_prompt(r, 2, b);
    ASSERT_TRUE(c.pool(r).free(SeqId{1}).ok());
    ASSERT_TRUE(c.pool(r).free(SeqId{2}).ok());
  }
  c.admit(0, 3, a);  // a is now more recent than b on replica 0 only
  ASSERT_TRUE(c.pool(0).free(SeqId{3}).ok());
  EXPECT_EQ(c.index().idle_blocks(0), 4u);
  // Four blocks on replica 0: its two free ones, then b's (its least recently used prefix).
  ASSERT_TRUE(c.pool(0).allocate(SeqId{4}, 4 * kBlockSize).ok());
  c.check();
  EXPECT_EQ(c.peek(0, a).tokens, 8u);
  EXPECT_EQ(c.peek(0, b).tokens, 0u);
  EXPECT_EQ(c.index().evicted_blocks(0), 2u);
  // Replica 1 evicted nothing: both prefixes still live there.
  EXPECT_EQ(c.peek(1, a).tokens, 8u);
  EXPECT_EQ(c.peek(1, b).tokens, 8u);
  // One more block takes a's last block, trimmed from its end.
  ASSERT_TRUE(c.pool(0).append(SeqId{4}, kBlockSize).ok());
  c.check();
  EXPECT_EQ(c.peek(0, a).tokens, 4u);
  EXPECT_EQ(c.peek(1, a).tokens, 8u);
}

TEST(GlobalPrefixIndex, ANodeNobodyHoldsLeavesTheTree) {
  Cluster c(2, 4);
  const Tokens a = token_run(8, 1);
  c.admit(0, 1, a);
  c.index_prompt(0, 1, a);
  ASSERT_TRUE(c.pool(0).free(SeqId{1}).ok());
  EXPECT_EQ(c.index().node_count(), 1u);
  ASSERT_TRUE(c.pool(0).allocate(SeqId{2}, 4 * kBlockSize).ok());
  c.check();
  EXPECT_EQ(c.index().node_count(), 0u);
  EXPECT_EQ(c.index().cached_blocks(0), 0u);
}

TEST(GlobalPrefixIndex, TrimmingAHoldingOthersShareKeepsTheirWholeEdge) {
  Cluster c(2, 4);
  const Tokens a = token_run(16, 1);  // 4 blocks
  for (uint32_t r : {0u, 1u}) {
    c.admit(r, 1, a);
    c.index_prompt(r, 1, a);
    ASSERT_TRUE(c.pool(r).free(SeqId{1}).ok());
  }
  ASSERT_TRUE(c.pool(0).allocate(SeqId{2}, kBlockSize).ok());  // one block: trims a's end
  c.check();
  EXPECT_EQ(c.peek(0, a).tokens, 12u);
  EXPECT_EQ(c.peek(1, a).tokens, 16u);
  EXPECT_EQ(c.index().node_count(), 2u);
  // The kept front stays replica 0's least recently used leaf: the next block comes from it.
  ASSERT_TRUE(c.pool(0).append(SeqId{2}, kBlockSize).ok());
  c.check();
  EXPECT_EQ(c.peek(0, a).tokens, 8u);
}

TEST(GlobalPrefixIndex, UsingAPartOfAnEdgeLeavesTheRestEvictable) {
  Cluster c(1, 6);
  const Tokens a = token_run(16, 1);  // 4 blocks
  c.admit(0, 1, a);
  c.index_prompt(0, 1, a);
  ASSERT_TRUE(c.pool(0).free(SeqId{1}).ok());
  // A prompt sharing the first 2 blocks of the edge pins them only.
  EXPECT_EQ(c.admit(0, 2, concat(token_run(8, 1), {50, 51, 52, 53})), 8u);
  c.check();
  EXPECT_EQ(c.index().idle_blocks(0), 2u);
  EXPECT_EQ(c.pool(0).available_block_count(), 2u + 1u);  // 2 idle cached + 1 free
  ASSERT_TRUE(c.pool(0).allocate(SeqId{3}, 3 * kBlockSize).ok());
  c.check();
  EXPECT_EQ(c.peek(0, a).tokens, 8u);
}

TEST(GlobalPrefixIndex, ADeeperBlockInUseKeepsItsIdleAncestorsCached) {
  Cluster c(1, 8);
  const Tokens a = token_run(8, 1);
  // Two sequences compute the same prompt in one step; the first indexes it, the second's
  // blocks then add nothing, and a third extends it from the second's blocks.
  c.admit(0, 1, a);
  c.admit(0, 2, concat(a, token_run(4, 60)));
  c.index_prompt(0, 1, a);
  EXPECT_EQ(c.index_prompt(0, 2, concat(a, token_run(4, 60))), 1u);  // only the third block
  ASSERT_TRUE(c.pool(0).free(SeqId{1}).ok());
  c.check();
  // Sequence 2 uses the deeper block, so the path above it cannot be evicted before it.
  EXPECT_EQ(c.index().idle_blocks(0), 0u);
  // What ending sequence 2's use of that block would leave idle: the whole path.
  const BlockId deeper = c.pool(0).get_sequence(SeqId{2})->block_ids[2];
  EXPECT_EQ(c.index().idle_blocks_after(0, std::vector<BlockId>{deeper}), 3u);
  EXPECT_EQ(c.index().idle_blocks_after(0, std::vector<BlockId>{}), 0u);
  // A request that shares the first block keeps it in use: only the two below it turn idle (the
  // holding is split where the shared part ends); sharing the whole path leaves only the third.
  PrefixLookup lookup;
  c.index().lookup(RadixKey(concat(a, token_run(4, 60)), kBlockSize), lookup);
  std::vector<BlockId> path;
  c.index().blocks_on(lookup, 0, 3, path);
  EXPECT_EQ(c.index().idle_blocks_after(0, std::vector<BlockId>{deeper},
                                        std::span(path).first(1)),
            2u);
  EXPECT_EQ(c.index().idle_blocks_after(0, std::vector<BlockId>{deeper},
                                        std::span(path).first(2)),
            1u);
  ASSERT_TRUE(c.pool(0).free(SeqId{2}).ok());
  EXPECT_EQ(c.index().idle_blocks(0), 3u);
  c.check();
}

// forget() drops what a replica holds of one key that eviction could take now, deepest first:
// it stops where a sequence uses a block, where a deeper holding depends on one, and where the
// key ends inside a node; other replicas' holdings stay.
TEST(GlobalPrefixIndex, ForgettingAKeyDropsOnlyItsIdleEnd) {
  Cluster c(2, 8);
  const Tokens a = token_run(8, 1);  // 2 blocks
  const Tokens longer = concat(a, token_run(4, 50));
  for (uint32_t r : {0u, 1u}) {
    c.admit(r, 1, longer);
    c.index_prompt(r, 1, longer);
  }
  EXPECT_EQ(c.forget(0, a), 0u);  // in use
  ASSERT_TRUE(c.pool(0).free(SeqId{1}).ok());
  EXPECT_EQ(c.forget(0, a), 0u);  // the longer prompt's block hangs below
  EXPECT_EQ(c.forget(0, longer), 3u);
  c.check();
  EXPECT_EQ(c.peek(0, longer).tokens, 0u);
  EXPECT_EQ(c.peek(1, longer).tokens, 12u);
  EXPECT_EQ(c.pool(0).free_block_count(), 8u);
  // A replica holding less of the key than another forgets what it holds.
  c.admit(0, 2, a);
  c.index_prompt(0, 2, a);  // replica 1 holds the key one block deeper
  ASSERT_TRUE(c.pool(0).free(SeqId{2}).ok());
  EXPECT_EQ(c.forget(0, longer), 2u);
  c.check();
  EXPECT_EQ(c.peek(1, longer).tokens, 12u);
  // A key that ends inside a node forgets nothing of it.
  ASSERT_TRUE(c.pool(1).free(SeqId{1}).ok());
  EXPECT_EQ(c.forget(1, concat(a, token_run(2, 50))), 0u);
  c.check();
}

// Above a few children a node finds them by key, and compares them one by one again once most
// are gone; splits hand the key map entry to the new upper node.
TEST(GlobalPrefixIndex, ManyChildrenAreFoundThroughTheirKeys) {
  Cluster c(1, 64);
  const Tokens system = token_run(8, 1);
  for (uint64_t s = 0; s < 10; ++s) {
    const Tokens prompt = concat(system, token_run(8, 100 + 10 * static_cast<TokenId>(s)));
    c.admit(0, s, prompt);
    c.index_prompt(0, s, prompt);
  }
  c.check();
  // A partial hit splits a mapped child; the new upper part must be found under the same key.
  EXPECT_EQ(c.admit(0, 20, concat(system, concat(token_run(4, 130), {7, 7, 7, 7}))), 12u);
  c.check();
  for (uint64_t s = 0; s < 10; ++s) {
    EXPECT_EQ(c.peek(0, concat(system, token_run(8, 100 + 10 * static_cast<TokenId>(s)))).tokens, 16u);
  }
  for (uint64_t s = 0; s < 10; ++s) ASSERT_TRUE(c.pool(0).free(SeqId{s}).ok());
  ASSERT_TRUE(c.pool(0).free(SeqId{20}).ok());
  // 42 free blocks, then 17 evicted in LRU order: prompts 0-2, 3's unused half, 4-8. The system
  // node keeps two children (prompt 9 and 3's used half) and compares them one by one again.
  ASSERT_TRUE(c.pool(0).allocate(SeqId{30}, 59 * kBlockSize).ok());
  c.check();
  EXPECT_EQ(c.peek(0, concat(system, token_run(8, 190))).tokens, 16u);
  EXPECT_EQ(c.peek(0, concat(system, token_run(8, 130))).tokens, 12u);
  EXPECT_EQ(c.peek(0, concat(system, token_run(8, 180))).tokens, 8u);
  EXPECT_EQ(c.index().node_count(), 3u);
}

TEST(GlobalPrefixIndex, SaltsKeepPrefixesApartExceptPublicRanges) {
  Cluster c(2, 16);
  const Tokens system = token_run(8, 1);
  const Tokens prompt = concat(system, token_run(8, 500));
  const SaltScope alice{CacheSalt::of("alice"), 8};
  const SaltScope bob{CacheSalt::of("bob"), 8};
  c.admit(0, 1, prompt, alice);
  c.index_prompt(0, 1, prompt, alice);
  c.check();
  PrefixLookup lookup;
  c.index().lookup(RadixKey(prompt, kBlockSize, bob), lookup);
  EXPECT_EQ(c.index().prefix_on(lookup, 0).tokens, 8u);  // the public system prompt only
  c.index().lookup(RadixKey(prompt, kBlockSize, alice), lookup);
  EXPECT_EQ(c.index().prefix_on(lookup, 0).tokens, 16u);
  c.index().lookup(RadixKey(prompt, kBlockSize), lookup);
  EXPECT_EQ(c.index().prefix_on(lookup, 0).tokens, 8u);  // unsalted: public part only
  // Bob's own prompt on replica 1 shares nothing there, and leaves alice's blocks alone.
  c.admit(1, 1, prompt, bob);
  c.index_prompt(1, 1, prompt, bob);
  c.check();
  c.index().lookup(RadixKey(prompt, kBlockSize, alice), lookup);
  EXPECT_EQ(c.index().prefix_on(lookup, 1).tokens, 8u);
  EXPECT_EQ(c.index().prefix_on(lookup, 0).tokens, 16u);
}

TEST(GlobalPrefixIndex, BadInsertsAreRefusedAndChangeNothing) {
  Cluster c(2, 8);
  const Tokens a = token_run(8, 1);
  c.admit(0, 1, a);
  c.index_prompt(0, 1, a);
  const std::vector<BlockId> blocks = c.pool(0).get_sequence(SeqId{1})->block_ids;
  const Tokens b = token_run(8, 40);
  const RadixKey key(b, kBlockSize);
  auto expect_refused = [&](uint32_t r, std::vector<BlockId> given, const char* why) {
    const auto inserted = c.index().insert(r, key, given);
    ASSERT_FALSE(inserted.ok()) << why;
    EXPECT_EQ(inserted.status().code(), ErrorCode::kInvalidArgument) << why;
    EXPECT_EQ(c.index().node_count(), 1u) << why;
    EXPECT_EQ(c.peek(r, b).tokens, 0u) << why;
    c.check();
  };
  expect_refused(0, {BlockId{5}}, "too few blocks");
  expect_refused(0, {BlockId{5}, BlockId{8}}, "outside the pool");
  expect_refused(0, {BlockId{5}, blocks[0]}, "already indexed");
  expect_refused(0, {BlockId{5}, BlockId{5}}, "listed twice");
  expect_refused(2, {BlockId{5}, BlockId{6}}, "unknown replica");
  // The same block id is fine on another replica: each replica has its own pool.
  c.admit(1, 1, b);
  EXPECT_EQ(c.index_prompt(1, 1, b), 2u);
  c.check();
}

// ---------------------------------------------------------------------------------------------
// KV events

// The hashes a router computes for a prompt's full blocks, the way kv_block_hash defines them.
std::vector<uint64_t> chain(const Tokens& prompt, const SaltScope& scope = {}) {
  std::vector<uint64_t> hashes;
  std::optional<uint64_t> parent;
  for (size_t at = 0; at + kBlockSize <= prompt.size(); at += kBlockSize) {
    const CacheSalt salt = at < scope.public_tokens ? CacheSalt{} : scope.salt;
    parent = kv_block_hash(parent, std::span(prompt).subspan(at, kBlockSize), salt);
    hashes.push_back(*parent);
  }
  return hashes;
}

TEST(KvBlockHash, IsSha256OfParentSaltAndTokens) {
  // Reference values from Python: sha256(parent.to_bytes(8, 'little') + salt identity +
  // tokens as '<I'), the digest's first 8 bytes read little-endian.
  const Tokens first = {1, 2, 3, 4};
  const Tokens second = {5, 6, 7, 8};
  const uint64_t a = kv_block_hash(std::nullopt, first, CacheSalt{});
  EXPECT_EQ(a, 0x30238dd4b4b13f9cULL);
  EXPECT_EQ(kv_block_hash(a, second, CacheSalt{}), 0x3988b1a413934004ULL);
  EXPECT_EQ(kv_block_hash(std::nullopt, first, CacheSalt::of("tenant")), 0x06b9909f9ffe88b2ULL);
  EXPECT_EQ(kv_event_type_name(KvEventType::kBlockStored), "BlockStored");
  EXPECT_EQ(kv_event_type_name(KvEventType::kBlockRemoved), "BlockRemoved");
  EXPECT_EQ(kv_event_type_name(KvEventType::kAllBlocksCleared), "AllBlocksCleared");
}

TEST(GlobalPrefixIndex, RecordsNothingUntilAskedTo) {
  Cluster c(1, 8);
  const Tokens a = token_run(8, 1);
  c.admit(0, 1, a);
  c.index_prompt(0, 1, a);
  EXPECT_TRUE(c.index().take_events().empty());
  EXPECT_TRUE(c.index().holdings_as_events().empty());
  // Starting on a filled index hashes what it holds; stopping forgets the hashes again.
  c.index().record_events(true);
  c.check();
  const std::vector<KvEvent> held = c.index().holdings_as_events();
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(held[0].block_hashes, chain(a));
  c.index().record_events(false);
  c.check();
  EXPECT_TRUE(c.index().holdings_as_events().empty());
}

TEST(GlobalPrefixIndex, EventsNameEachReplicasStoredRunsAndEvictions) {
  Cluster c(2, 4);
  c.index().record_events(true);
  const Tokens a = token_run(12, 1);                          // 3 blocks
  const Tokens b = concat(token_run(8, 1), token_run(4, 90));  // a's first 2, then its own
  c.admit(0, 1, a);
  c.index_prompt(0, 1, a);
  std::vector<KvEvent> events = c.index().take_events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, KvEventType::kBlockStored);
  EXPECT_EQ(events[0].replica, 0u);
  EXPECT_EQ(events[0].block_hashes, chain(a));
  EXPECT_FALSE(events[0].parent_block_hash);
  EXPECT_EQ(events[0].num_tokens, 12u);
  EXPECT_TRUE(events[0].salt.empty());
  // Replica 1 stores b across the node a's split leaves: one run of three blocks.
  c.admit(1, 1, b);
  c.index_prompt(1, 1, b);
  events = c.index().take_events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].replica, 1u);
  EXPECT_EQ(events[0].block_hashes, chain(b));
  // Replica 0 shares a's first two blocks and stores b's third after them.
  ASSERT_TRUE(c.pool(0).free(SeqId{1}).ok());
  EXPECT_EQ(c.admit(0, 2, b), 8u);
  c.index_prompt(0, 2, b);  // takes a free block: nothing evicted yet
  events = c.index().take_events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].block_hashes, std::vector<uint64_t>{chain(b)[2]});
  EXPECT_EQ(events[0].parent_block_hash, chain(a)[1]);
  EXPECT_EQ(events[0].num_tokens, 4u);
  // Two more blocks on replica 0 evict a's last block (its only idle leaf) and b's, in LRU order.
  ASSERT_TRUE(c.pool(0).free(SeqId{2}).ok());
  ASSERT_TRUE(c.pool(0).allocate(SeqId{3}, 2 * kBlockSize).ok());
  c.check();
  events = c.index().take_events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, KvEventType::kBlockRemoved);
  EXPECT_EQ(events[0].replica, 0u);
  std::vector<uint64_t> removed = events[0].block_hashes;
  std::sort(removed.begin(), removed.end());
  std::vector<uint64_t> expected = {chain(a)[2], chain(b)[2]};
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(removed, expected);
  EXPECT_EQ(c.peek(1, b).tokens, 12u);  // replica 1 keeps its copy
}

TEST(GlobalPrefixIndex, EventsCarryTheSaltOfSaltedBlocks) {
  Cluster c(1, 8);
  c.index().record_events(true);
  const Tokens prompt = concat(token_run(8, 1), token_run(8, 500));
  const SaltScope alice{CacheSalt::of("alice"), 8};
  c.admit(0, 1, prompt, alice);
  c.index_prompt(0, 1, prompt, alice);
  const std::vector<KvEvent> events = c.index().take_events();
  // The public system prompt and alice's own blocks: two runs, the second chained to the first.
  ASSERT_EQ(events.size(), 2u);
  const std::vector<uint64_t> hashes = chain(prompt, alice);
  EXPECT_TRUE(events[0].salt.empty());
  EXPECT_EQ(events[0].block_hashes, std::vector<uint64_t>(hashes.begin(), hashes.begin() + 2));
  EXPECT_EQ(events[1].salt, alice.salt);
  EXPECT_EQ(events[1].parent_block_hash, hashes[1]);
  EXPECT_EQ(events[1].block_hashes, std::vector<uint64_t>(hashes.begin() + 2, hashes.end()));
  EXPECT_NE(hashes[2], chain(prompt)[2]);  // the salt is in the hash
}

}  // namespace
}  // namespace kvfabric
