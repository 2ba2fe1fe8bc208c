// The seed PrefixKvCache (oxillama): its 17 tests and the host cache's 16 as behaviours
// (seed-semantics.md §F4), then one test per fixed defect (§E3). Where a seed test relied on a
// defect, the corrected expectation is stated.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "kvfabric/prefix/cached_kv_state.h"
#include "kvfabric/prefix/host_kv_cache.h"
#include "kvfabric/prefix/prefix_kv_cache.h"

namespace kvfabric {
namespace {

using Tokens = std::vector<TokenId>;
using Floats = std::vector<float>;

// The seed's helper: tokens 0..n-1, and per (layer, token) keys base + d*0.01, values base + d*0.02
// with base = layer * 1000 + token.
struct Filled {
  HostKvCache cache;
  Tokens tokens;
};
Filled make_filled_cache(size_t num_layers, size_t kv_dim, size_t num_tokens) {
  HostKvCache cache = HostKvCache::create(num_layers, 128, kv_dim).value();
  Tokens tokens(num_tokens);
  std::iota(tokens.begin(), tokens.end(), 0);
  for (size_t t = 0; t < num_tokens; ++t) {
    for (size_t layer = 0; layer < num_layers; ++layer) {
      const auto base = static_cast<float>(layer * 1000 + t);
      Floats key(kv_dim), value(kv_dim);
      for (size_t d = 0; d < kv_dim; ++d) {
        key[d] = base + static_cast<float>(d) * 0.01f;
        value[d] = base + static_cast<float>(d) * 0.02f;
      }
      EXPECT_TRUE(cache.store_kv(layer, key, value).ok());
    }
    cache.advance();
  }
  return {std::move(cache), std::move(tokens)};
}

PrefixCacheConfig default_config() {
  return PrefixCacheConfig{.max_entries = 64, .max_memory_bytes = 16 << 20, .min_prefix_len = 1};
}

// A snapshot of one layer whose keys and values are `floats` copies of `fill`.
CachedKvState snapshot(float fill, size_t floats, size_t seq_len) {
  return CachedKvState::create({Floats(floats, fill)}, {Floats(floats, fill)}, seq_len).value();
}

// ---------------------------------------------------------------------------------------------
// Seed prefix-cache tests (17; common_prefix_len is CommonPrefixLen.SeedCases).

TEST(SeedPrefixKvCache, InsertAndLookupExact) {
  PrefixKvCache pcache(default_config());
  auto [cache, tokens] = make_filled_cache(2, 4, 5);
  ASSERT_TRUE(pcache.store(tokens, cache, 5, 4, 2).value());
  EXPECT_EQ(pcache.len(), 1u);
  const auto hit = pcache.lookup(tokens);
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->matched_len(), 5u);
  EXPECT_EQ(hit->state().seq_len(), 5u);
}

TEST(SeedPrefixKvCache, LongerQueryReturnsTheCachedPrefix) {
  PrefixKvCache pcache(default_config());
  auto [cache, tokens] = make_filled_cache(2, 4, 5);
  ASSERT_TRUE(pcache.store(tokens, cache, 5, 4, 2).ok());
  Tokens longer(10);
  std::iota(longer.begin(), longer.end(), 0);
  const auto hit = pcache.lookup(longer);
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->matched_len(), 5u);
}

TEST(SeedPrefixKvCache, NoMatchReturnsNone) {
  PrefixKvCache pcache(default_config());
  auto [cache, tokens] = make_filled_cache(1, 4, 5);
  ASSERT_TRUE(pcache.store(tokens, cache, 5, 4, 1).ok());
  EXPECT_FALSE(pcache.lookup(Tokens{100, 200, 300}).has_value());
}

TEST(SeedPrefixKvCache, EmptyCacheLookupReturnsNone) {
  PrefixKvCache pcache(default_config());
  EXPECT_FALSE(pcache.lookup(Tokens{1, 2, 3}).has_value());
}

TEST(SeedPrefixKvCache, EmptyQueryReturnsNone) {
  PrefixKvCache pcache(default_config());
  EXPECT_FALSE(pcache.lookup(Tokens{}).has_value());
  EXPECT_EQ(pcache.misses(), 1u);  // an empty query counts as a miss
}

TEST(SeedPrefixKvCache, MultiplePrefixesWithASharedRoot) {
  PrefixKvCache pcache(default_config());
  const Tokens a = {0, 1, 2, 3, 4}, b = {0, 1, 2, 10, 11};
  auto filled_a = make_filled_cache(1, 4, 5);
  auto filled_b = make_filled_cache(1, 4, 5);
  ASSERT_TRUE(pcache.store(a, filled_a.cache, 5, 4, 1).ok());
  ASSERT_TRUE(pcache.store(b, filled_b.cache, 5, 4, 1).ok());
  EXPECT_EQ(pcache.len(), 2u);
  EXPECT_EQ(pcache.lookup(a)->matched_len(), 5u);
  EXPECT_EQ(pcache.lookup(b)->matched_len(), 5u);
  // No entry ends at [0,1,2]: a strict prefix of stored keys misses (seed rule).
  EXPECT_FALSE(pcache.lookup(Tokens{0, 1, 2}).has_value());
}

TEST(SeedPrefixKvCache, LruEvictionByEntries) {
  PrefixKvCache pcache(
      PrefixCacheConfig{.max_entries = 2, .max_memory_bytes = SIZE_MAX, .min_prefix_len = 1});
  for (TokenId i = 0; i < 3; ++i) {
    ASSERT_TRUE(
        pcache.store_snapshot(Tokens{100 + i, 200 + i}, snapshot(static_cast<float>(i), 4, 2))
            .ok());
  }
  EXPECT_LE(pcache.len(), 2u);
  EXPECT_FALSE(pcache.lookup(Tokens{100, 200}).has_value());  // the oldest went
}

TEST(SeedPrefixKvCache, LruEvictionByMemory) {
  PrefixKvCache pcache(
      PrefixCacheConfig{.max_entries = 100, .max_memory_bytes = 64, .min_prefix_len = 1});
  for (TokenId i = 0; i < 5; ++i) {  // 32 bytes each
    ASSERT_TRUE(
        pcache.store_snapshot(Tokens{100 + i, 200 + i}, snapshot(static_cast<float>(i), 4, 2))
            .ok());
  }
  EXPECT_LE(pcache.memory_usage(), 64u);
  EXPECT_EQ(pcache.len(), 2u);
}

TEST(SeedPrefixKvCache, ClearResetsEverything) {
  PrefixKvCache pcache(default_config());
  auto [cache, tokens] = make_filled_cache(1, 4, 5);
  ASSERT_TRUE(pcache.store(tokens, cache, 5, 4, 1).ok());
  (void)pcache.lookup(tokens);
  pcache.clear();
  EXPECT_TRUE(pcache.is_empty());
  EXPECT_EQ(pcache.len(), 0u);
  EXPECT_EQ(pcache.memory_usage(), 0u);
  EXPECT_EQ(pcache.hits(), 0u);
  EXPECT_EQ(pcache.misses(), 0u);
}

TEST(SeedPrefixKvCache, StoreAndRestoreRoundTrip) {
  constexpr size_t kLayers = 2, kKvDim = 4, kTokens = 5;
  PrefixKvCache pcache(default_config());
  auto [source, tokens] = make_filled_cache(kLayers, kKvDim, kTokens);
  ASSERT_TRUE(pcache.store(tokens, source, kTokens, kKvDim, kLayers).ok());
  const auto hit = pcache.lookup(tokens);
  ASSERT_TRUE(hit.has_value());
  const CachedKvState copy = hit->state();
  HostKvCache target = HostKvCache::create(kLayers, 128, kKvDim).value();
  ASSERT_TRUE(PrefixKvCache::restore(copy, target).ok());
  EXPECT_EQ(target.seq_len(), kTokens);
  for (size_t layer = 0; layer < kLayers; ++layer) {
    const auto src_k = source.get_keys(layer).value(), dst_k = target.get_keys(layer).value();
    const auto src_v = source.get_values(layer).value(), dst_v = target.get_values(layer).value();
    ASSERT_EQ(src_k.size(), dst_k.size());
    ASSERT_EQ(src_v.size(), dst_v.size());
    for (size_t i = 0; i < src_k.size(); ++i) {
      EXPECT_NEAR(src_k[i], dst_k[i], 1e-7) << "layer " << layer << " key " << i;
      EXPECT_NEAR(src_v[i], dst_v[i], 1e-7) << "layer " << layer << " value " << i;
    }
  }
}

TEST(SeedPrefixKvCache, MemoryUsageTracking) {
  PrefixKvCache pcache(default_config());
  EXPECT_EQ(pcache.memory_usage(), 0u);
  ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2}, snapshot(0.0f, 8, 2)).ok());
  EXPECT_EQ(pcache.memory_usage(), 64u);  // 8 floats * 4 bytes * (keys + values)
}

TEST(SeedPrefixKvCache, HitMissCounters) {
  PrefixKvCache pcache(default_config());
  EXPECT_EQ(pcache.hits(), 0u);
  EXPECT_EQ(pcache.misses(), 0u);
  (void)pcache.lookup(Tokens{1, 2, 3});
  EXPECT_EQ(pcache.misses(), 1u);
  ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2}, snapshot(0.0f, 4, 2)).ok());
  (void)pcache.lookup(Tokens{1, 2});
  EXPECT_EQ(pcache.hits(), 1u);
  EXPECT_EQ(pcache.misses(), 1u);
  (void)pcache.lookup(Tokens{99, 100});
  EXPECT_EQ(pcache.hits(), 1u);
  EXPECT_EQ(pcache.misses(), 2u);
}

TEST(SeedPrefixKvCache, MinPrefixLenFiltersAShortStore) {
  PrefixKvCache pcache(
      PrefixCacheConfig{.max_entries = 64, .max_memory_bytes = 16 << 20, .min_prefix_len = 5});
  auto [cache, tokens] = make_filled_cache(1, 4, 3);
  const auto stored = pcache.store(Tokens{0, 1, 2}, cache, 3, 4, 1);
  ASSERT_TRUE(stored.ok());
  EXPECT_FALSE(stored.value());  // skipped, and now the caller can tell
  EXPECT_TRUE(pcache.is_empty());
}

TEST(SeedPrefixKvCache, MinPrefixLenFiltersAShortLookup) {
  PrefixKvCache pcache(
      PrefixCacheConfig{.max_entries = 64, .max_memory_bytes = 16 << 20, .min_prefix_len = 5});
  auto [cache, tokens] = make_filled_cache(1, 4, 10);
  ASSERT_TRUE(pcache.store(tokens, cache, 10, 4, 1).value());
  EXPECT_EQ(pcache.len(), 1u);
  EXPECT_FALSE(pcache.lookup(Tokens{0, 1, 2}).has_value());
}

TEST(SeedPrefixKvCache, IsEmptyAndLen) {
  PrefixKvCache pcache(default_config());
  EXPECT_TRUE(pcache.is_empty());
  EXPECT_EQ(pcache.len(), 0u);
  ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2}, snapshot(0.0f, 4, 2)).ok());
  EXPECT_FALSE(pcache.is_empty());
  EXPECT_EQ(pcache.len(), 1u);
}

TEST(SeedPrefixKvCache, NodeSplitPreservesData) {
  PrefixKvCache pcache(default_config());
  ASSERT_TRUE(
      pcache
          .store_snapshot(Tokens{1, 2, 3, 4},
                          CachedKvState::create({Floats(4, 1.0f)}, {Floats(4, 2.0f)}, 4).value())
          .ok());
  ASSERT_TRUE(
      pcache
          .store_snapshot(Tokens{1, 2, 5, 6},
                          CachedKvState::create({Floats(4, 3.0f)}, {Floats(4, 4.0f)}, 4).value())
          .ok());
  EXPECT_EQ(pcache.len(), 2u);
  const auto a = pcache.lookup(Tokens{1, 2, 3, 4});
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->matched_len(), 4u);
  EXPECT_EQ(a->state().keys()[0][0], 1.0f);
  const auto b = pcache.lookup(Tokens{1, 2, 5, 6});
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(b->matched_len(), 4u);
  EXPECT_EQ(b->state().keys()[0][0], 3.0f);
  EXPECT_TRUE(pcache.verify().ok()) << pcache.verify();
}

// The engine test prime_with_prefix_returns_model_not_loaded relied on store() accepting a
// kv_dim (32) that differs from the cache's (4). Corrected: the store is refused.
TEST(SeedPrefixKvCache, StoreRefusesAKvDimThatDiffersFromTheCache) {
  PrefixKvCache pcache(default_config());
  auto [cache, tokens] = make_filled_cache(1, 4, 5);
  const auto stored = pcache.store(tokens, cache, 5, 32, 1);
  EXPECT_EQ(stored.status().message(), "kv_dim 32 differs from the cache's 4");
  EXPECT_TRUE(pcache.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Seed host cache tests (16), on HostKvCache.

TEST(SeedHostKvCache, StartsAtPositionZeroAndKeepsItsDimensions) {
  EXPECT_EQ(HostKvCache::create(4, 128, 64).value().seq_len(), 0u);
  const HostKvCache cache = HostKvCache::create(8, 512, 128).value();
  EXPECT_EQ(cache.num_layers(), 8u);
  EXPECT_EQ(cache.max_seq_len(), 512u);
  EXPECT_EQ(cache.kv_dim(), 128u);
}

TEST(SeedHostKvCache, AdvanceIncrementsAndStopsAtMax) {
  HostKvCache cache = HostKvCache::create(2, 8, 4).value();
  cache.advance();
  EXPECT_EQ(cache.seq_len(), 1u);
  cache.advance();
  EXPECT_EQ(cache.seq_len(), 2u);
  HostKvCache small = HostKvCache::create(1, 3, 4).value();
  for (int i = 0; i < 8; ++i)
    small.advance();
  EXPECT_EQ(small.seq_len(), 3u);
}

TEST(SeedHostKvCache, ClearResetsPositionAndZeroesData) {
  HostKvCache cache = HostKvCache::create(1, 8, 4).value();
  ASSERT_TRUE(cache.store_kv(0, Floats{1, 2, 3, 4}, Floats{5, 6, 7, 8}).ok());
  cache.advance();
  cache.advance();
  EXPECT_EQ(cache.seq_len(), 2u);
  cache.clear();
  EXPECT_EQ(cache.seq_len(), 0u);
  EXPECT_TRUE(cache.get_keys(0).value().empty());
  cache.advance();
  EXPECT_EQ(cache.get_keys(0).value()[0], 0.0f);  // zeroed, not just hidden
}

TEST(SeedHostKvCache, StoreThenGetKeysAndValuesRoundTrip) {
  HostKvCache cache = HostKvCache::create(2, 16, 8).value();
  Floats key(8), value(8);
  for (int i = 0; i < 8; ++i) {
    key[i] = static_cast<float>(i) * 0.1f;
    value[i] = static_cast<float>(i) * -0.1f;
  }
  ASSERT_TRUE(cache.store_kv(0, key, value).ok());
  cache.advance();
  const auto keys = cache.get_keys(0).value();
  const auto values = cache.get_values(0).value();
  ASSERT_EQ(keys.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    EXPECT_NEAR(keys[i], key[i], 1e-7);
    EXPECT_NEAR(values[i], value[i], 1e-6);
  }
}

TEST(SeedHostKvCache, StoresAccumulateAcrossTokens) {
  HostKvCache cache = HostKvCache::create(1, 8, 2).value();
  for (int t = 0; t < 3; ++t) {
    ASSERT_TRUE(
        cache.store_kv(0, Floats{static_cast<float>(t), t + 0.5f}, Floats{0.0f, 0.0f}).ok());
    cache.advance();
  }
  const auto keys = cache.get_keys(0).value();
  ASSERT_EQ(keys.size(), 6u);
  EXPECT_EQ(keys[0], 0.0f);
  EXPECT_EQ(keys[1], 0.5f);
  EXPECT_EQ(keys[2], 1.0f);
}

TEST(SeedHostKvCache, OutOfRangeLayersAreErrors) {
  HostKvCache cache = HostKvCache::create(2, 8, 4).value();
  EXPECT_EQ(cache.store_kv(99, Floats(4), Floats(4)).code(), ErrorCode::kNotFound);
  EXPECT_EQ(cache.get_keys(99).status().message(), "layer 99 out of range (2 layers)");
  EXPECT_EQ(cache.get_values(99).status().code(), ErrorCode::kNotFound);
}

TEST(SeedHostKvCache, LayersAreIndependent) {
  HostKvCache cache = HostKvCache::create(2, 8, 4).value();
  ASSERT_TRUE(cache.store_kv(0, Floats(4, 1.0f), Floats(4, 3.0f)).ok());
  ASSERT_TRUE(cache.store_kv(1, Floats(4, 2.0f), Floats(4, 4.0f)).ok());
  cache.advance();
  const std::span<const float> layer0 = cache.get_keys(0).value();
  const std::span<const float> layer1 = cache.get_keys(1).value();
  for (float v : layer0)
    EXPECT_EQ(v, 1.0f);
  for (float v : layer1)
    EXPECT_EQ(v, 2.0f);
}

TEST(SeedHostKvCache, ForEachKeyAndValueVisitPositionsInOrder) {
  HostKvCache cache = HostKvCache::create(1, 16, 4).value();
  for (int t = 0; t < 4; ++t) {
    Floats key(4), value(4);
    for (int d = 0; d < 4; ++d) {
      key[d] = static_cast<float>(t * 10 + d);
      value[d] = static_cast<float>(t * 100 + d);
    }
    ASSERT_TRUE(cache.store_kv(0, key, value).ok());
    cache.advance();
  }
  std::vector<size_t> positions;
  ASSERT_TRUE(cache
                  .for_each_key(0,
                                [&](size_t pos, std::span<const float> row) {
                                  positions.push_back(pos);
                                  ASSERT_EQ(row.size(), 4u);
                                  for (int d = 0; d < 4; ++d)
                                    EXPECT_EQ(row[d], static_cast<float>(pos * 10 + d));
                                })
                  .ok());
  EXPECT_EQ(positions, (std::vector<size_t>{0, 1, 2, 3}));
  size_t rows = 0;
  ASSERT_TRUE(cache.for_each_value(0, [&](size_t, std::span<const float>) { ++rows; }).ok());
  EXPECT_EQ(rows, 4u);
  EXPECT_EQ(cache.for_each_key(3, [](size_t, std::span<const float>) {}).code(),
            ErrorCode::kNotFound);
}

// Seed defects of the host cache: a full cache and short rows are errors, not silence or panic.
TEST(SeedHostKvCache, FullCachesAndShortRowsAreErrors) {
  HostKvCache cache = HostKvCache::create(1, 1, 2).value();
  EXPECT_EQ(cache.store_kv(0, Floats{1}, Floats{1, 2}).code(), ErrorCode::kInvalidArgument);
  ASSERT_TRUE(cache.store_kv(0, Floats{1, 2}, Floats{1, 2}).ok());
  cache.advance();
  EXPECT_EQ(cache.store_kv(0, Floats{3, 4}, Floats{3, 4}).code(), ErrorCode::kOutOfMemory);
  EXPECT_EQ(cache.get_keys(0).value()[0], 1.0f);
  EXPECT_EQ(HostKvCache::create(0, 8, 4).status().code(), ErrorCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Fixed defects (seed-semantics.md §E3).

// E3.1: the seed matched 5 tokens against a 3-position snapshot, or stored completion K/V under
// a prompt key.
TEST(PrefixKvCacheFixes, AStoreWhoseLengthDiffersFromItsKeyIsRefused) {
  PrefixKvCache pcache(default_config());
  auto [cache, tokens] = make_filled_cache(1, 2, 10);
  EXPECT_EQ(pcache.store(Tokens{1, 2, 3, 4, 5}, cache, 3, 2, 1).status().message(),
            "a snapshot of 3 positions for a key of 5 tokens");
  EXPECT_EQ(pcache.store(Tokens{1, 2}, cache, 10, 2, 1).status().code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(pcache.store_snapshot(Tokens{1, 2, 3}, snapshot(0.0f, 4, 2)).status().code(),
            ErrorCode::kInvalidArgument);
  EXPECT_TRUE(pcache.is_empty());
}

// E3.2: the seed stored empty buffers for layers it could not read.
TEST(PrefixKvCacheFixes, UnreadableOrShortLayersRefuseTheStore) {
  PrefixKvCache pcache(default_config());
  auto [cache, tokens] = make_filled_cache(1, 2, 4);
  EXPECT_EQ(pcache.store(tokens, cache, 4, 2, 3).status().message(),
            "layer 1 cannot be read: layer 1 out of range (1 layers)");
  // Positions the cache does not hold yet.
  Tokens six = {0, 1, 2, 3, 4, 5};
  EXPECT_EQ(pcache.store(six, cache, 6, 2, 1).status().message(),
            "layer 0 holds 8 floats, 12 needed");
  EXPECT_TRUE(pcache.is_empty());
  EXPECT_EQ(CachedKvState::create({Floats(4)}, {Floats(3)}, 2, 2).status().code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(CachedKvState::create({Floats(4)}, {}, 2, 2).status().code(),
            ErrorCode::kInvalidArgument);
}

// E3.3: the seed's restore copied what it could and marked stale rows valid.
TEST(PrefixKvCacheFixes, RestoreValidatesTheSnapshot) {
  HostKvCache target = HostKvCache::create(2, 4, 2).value();
  const CachedKvState one_layer = snapshot(1.0f, 2, 1);
  EXPECT_EQ(PrefixKvCache::restore(one_layer, target).message(),
            "snapshot of 1 layers, kv_dim 2 does not fit a cache of 2 layers, "
            "kv_dim 2");
  const CachedKvState too_long =
      CachedKvState::create({Floats(10), Floats(10)}, {Floats(10), Floats(10)}, 5, 2).value();
  EXPECT_EQ(PrefixKvCache::restore(too_long, target).code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(target.seq_len(), 0u);  // unchanged
  const CachedKvState fits =
      CachedKvState::create({Floats(2, 7.0f), Floats(2, 8.0f)}, {Floats(2), Floats(2)}, 1, 2)
          .value();
  ASSERT_TRUE(PrefixKvCache::restore(fits, target).ok());
  EXPECT_EQ(target.seq_len(), 1u);
  EXPECT_EQ(target.get_keys(1).value()[0], 8.0f);
  EXPECT_EQ(fits.dtype(), DType::kF32);
  EXPECT_EQ(fits.num_layers(), 2u);
  EXPECT_EQ(fits.kv_dim(), 2u);
}

// E3.4: the seed refreshed every node on the lookup path, so [1,2] outlived the newer [5,5].
TEST(PrefixKvCacheFixes, ALookupRefreshesOnlyTheEntryItReturns) {
  PrefixKvCache pcache(
      PrefixCacheConfig{.max_entries = 3, .max_memory_bytes = SIZE_MAX, .min_prefix_len = 1});
  ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2}, snapshot(0.0f, 2, 2)).ok());
  ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2, 3, 4}, snapshot(0.0f, 4, 4)).ok());
  ASSERT_TRUE(pcache.store_snapshot(Tokens{5, 5}, snapshot(0.0f, 2, 2)).ok());
  EXPECT_EQ(pcache.lookup(Tokens{1, 2, 3, 4})->matched_len(), 4u);
  ASSERT_TRUE(pcache.store_snapshot(Tokens{7, 7}, snapshot(0.0f, 2, 2)).ok());
  EXPECT_EQ(pcache.len(), 3u);
  EXPECT_FALSE(pcache.lookup(Tokens{1, 2}).has_value());  // the least recently used went
  EXPECT_TRUE(pcache.lookup(Tokens{5, 5}).has_value());
  EXPECT_TRUE(pcache.verify().ok()) << pcache.verify();
}

TEST(PrefixKvCacheFixes, AMissDoesNotRefresh) {
  PrefixKvCache pcache(
      PrefixCacheConfig{.max_entries = 2, .max_memory_bytes = SIZE_MAX, .min_prefix_len = 3});
  ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2, 3}, snapshot(0.0f, 3, 3)).ok());
  ASSERT_TRUE(pcache.store_snapshot(Tokens{4, 5, 6}, snapshot(0.0f, 3, 3)).ok());
  EXPECT_FALSE(pcache.lookup(Tokens{1, 2}).has_value());  // below min_prefix_len
  ASSERT_TRUE(pcache.store_snapshot(Tokens{7, 8, 9}, snapshot(0.0f, 3, 3)).ok());
  EXPECT_FALSE(pcache.lookup(Tokens{1, 2, 3}).has_value());
  EXPECT_TRUE(pcache.lookup(Tokens{4, 5, 6}).has_value());
}

// E3.5: the seed stopped evicting when the LRU entry freed 0 bytes (memory stayed at 128 > 64).
TEST(PrefixKvCacheFixes, ZeroByteEntriesDoNotStopEviction) {
  PrefixKvCache pcache(
      PrefixCacheConfig{.max_entries = 100, .max_memory_bytes = 64, .min_prefix_len = 1});
  const CachedKvState empty = CachedKvState::create({}, {}, 2, 4).value();
  EXPECT_EQ(empty.memory_bytes(), 0u);
  ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 1}, empty).ok());
  ASSERT_TRUE(pcache.store_snapshot(Tokens{2, 2}, snapshot(0.0f, 8, 2)).ok());  // 64 bytes
  ASSERT_TRUE(pcache.store_snapshot(Tokens{3, 3}, snapshot(0.0f, 8, 2)).ok());  // 64 bytes
  EXPECT_EQ(pcache.memory_usage(), 64u);
  EXPECT_EQ(pcache.len(), 1u);
  EXPECT_TRUE(pcache.lookup(Tokens{3, 3}).has_value());
}

TEST(PrefixKvCacheFixes, AnEntryLargerThanTheLimitIsNotKept) {
  PrefixKvCache pcache(
      PrefixCacheConfig{.max_entries = 100, .max_memory_bytes = 16, .min_prefix_len = 1});
  const auto stored = pcache.store_snapshot(Tokens{1, 2}, snapshot(0.0f, 8, 2));
  ASSERT_TRUE(stored.ok());
  EXPECT_FALSE(stored.value());
  EXPECT_TRUE(pcache.is_empty());
}

// E3.7: in C++ nothing protected the seed's returned reference; a PrefixHit pins its entry.
TEST(PrefixKvCacheFixes, AHitPinsItsEntryUntilReleased) {
  PrefixKvCache pcache(
      PrefixCacheConfig{.max_entries = 2, .max_memory_bytes = 64, .min_prefix_len = 1});
  ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2}, snapshot(1.0f, 2, 2)).ok());
  auto hit = pcache.lookup(Tokens{1, 2});
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(pcache.pinned(), 1u);
  // Over the entry limit the least recently used unpinned entry goes: not the pinned [1,2].
  ASSERT_TRUE(pcache.store_snapshot(Tokens{3, 4}, snapshot(3.0f, 2, 2)).ok());
  ASSERT_TRUE(pcache.store_snapshot(Tokens{5, 6}, snapshot(5.0f, 2, 2)).ok());
  EXPECT_EQ(pcache.len(), 2u);
  EXPECT_FALSE(pcache.lookup(Tokens{3, 4}).has_value());
  // Replacing the pinned entry by a larger one puts the cache over its memory limit, with
  // nothing else to evict but [5,6]; the pinned entry stays until its release.
  ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2}, snapshot(7.0f, 16, 2)).value());
  EXPECT_EQ(pcache.len(), 1u);
  EXPECT_EQ(pcache.memory_usage(), 128u);
  PrefixHit moved = std::move(*hit);
  EXPECT_FALSE(hit->pinned());
  EXPECT_TRUE(moved.pinned());
  moved.release();
  EXPECT_EQ(pcache.pinned(), 0u);
  EXPECT_TRUE(pcache.is_empty());               // the release enforced the limit
  EXPECT_EQ(moved.state().keys()[0][0], 1.0f);  // the handle's snapshot stays readable
  EXPECT_TRUE(pcache.verify().ok()) << pcache.verify();
}

TEST(PrefixKvCacheFixes, HandlesOutliveClearAndTheCache) {
  std::optional<PrefixHit> hit;
  {
    PrefixKvCache pcache(default_config());
    ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2}, snapshot(1.0f, 2, 2)).ok());
    hit = pcache.lookup(Tokens{1, 2});
    pcache.clear();
    EXPECT_EQ(pcache.pinned(), 0u);
    ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2}, snapshot(2.0f, 2, 2)).ok());
    hit->release();  // a handle from before clear() touches nothing
    EXPECT_EQ(pcache.len(), 1u);
    hit = pcache.lookup(Tokens{1, 2});
  }
  EXPECT_EQ(hit->state().keys()[0][0], 2.0f);
  hit->release();  // the cache is gone: a no-op
}

// E3.8: partial-prefix reuse is an opt-in extension; the default keeps the seed's rule.
TEST(PrefixKvCacheFixes, PartialPrefixReuseIsOptIn) {
  const auto source = make_filled_cache(1, 2, 4);
  PrefixCacheConfig config = default_config();
  PrefixKvCache strict(config);
  ASSERT_TRUE(strict.store(Tokens{1, 2, 3, 4}, source.cache, 4, 2, 1).ok());
  EXPECT_FALSE(strict.lookup(Tokens{1, 2, 3}).has_value());

  config.partial_prefix_reuse = true;
  PrefixKvCache reuse(config);
  ASSERT_TRUE(reuse.store(Tokens{1, 2, 3, 4}, source.cache, 4, 2, 1).ok());
  const auto hit = reuse.lookup(Tokens{1, 2, 3});
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->matched_len(), 3u);
  EXPECT_EQ(hit->state().seq_len(), 4u);
  HostKvCache target = HostKvCache::create(1, 8, 2).value();
  ASSERT_TRUE(PrefixKvCache::restore(*hit, target).ok());
  EXPECT_EQ(target.seq_len(), 3u);  // only the shared positions
  EXPECT_EQ(target.get_keys(0).value()[4], source.cache.get_keys(0).value()[4]);
  // Diverging in the middle of two keys: the more recently used one serves the common part.
  ASSERT_TRUE(reuse.store_snapshot(Tokens{1, 2, 5, 6}, snapshot(5.0f, 8, 4)).ok());
  const auto mid = reuse.lookup(Tokens{1, 2, 9});
  ASSERT_TRUE(mid.has_value());
  EXPECT_EQ(mid->matched_len(), 2u);
  EXPECT_EQ(mid->state().keys()[0][0], 5.0f);
  // A whole stored prefix still wins over a partial one of the same length.
  ASSERT_TRUE(reuse.store_snapshot(Tokens{1, 2}, snapshot(9.0f, 4, 2)).ok());
  EXPECT_EQ(reuse.lookup(Tokens{1, 2, 9})->state().keys()[0][0], 9.0f);
  EXPECT_TRUE(reuse.verify().ok()) << reuse.verify();
}

TEST(PrefixKvCacheFixes, StoringAgainReplacesTheEntry) {
  PrefixKvCache pcache(default_config());
  ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2}, snapshot(1.0f, 2, 2)).ok());
  ASSERT_TRUE(pcache.store_snapshot(Tokens{1, 2}, snapshot(2.0f, 4, 2)).ok());
  EXPECT_EQ(pcache.len(), 1u);
  EXPECT_EQ(pcache.memory_usage(), 32u);
  EXPECT_EQ(pcache.lookup(Tokens{1, 2})->state().keys()[0][0], 2.0f);
}

TEST(PrefixKvCacheFixes, AMovedFromCacheIsEmptyAndUsable) {
  PrefixKvCache a(default_config());
  ASSERT_TRUE(a.store_snapshot(Tokens{1, 2}, snapshot(1.0f, 2, 2)).ok());
  auto hit = a.lookup(Tokens{1, 2});
  PrefixKvCache b = std::move(a);
  EXPECT_EQ(b.len(), 1u);
  EXPECT_EQ(b.pinned(), 1u);
  EXPECT_TRUE(a.is_empty());  // NOLINT(bugprone-use-after-move): documented state
  ASSERT_TRUE(a.store_snapshot(Tokens{3}, snapshot(1.0f, 2, 1)).ok());
  hit->release();
  EXPECT_EQ(b.pinned(), 0u);
}

}  // namespace
}  // namespace kvfabric
