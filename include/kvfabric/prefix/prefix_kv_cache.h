// The seed-compatible prefix cache of whole-prefix K/V snapshots (oxillama PrefixKvCache),
// with its defects fixed (README "Seed PrefixKvCache").
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>

#include "kvfabric/common/status.h"
#include "kvfabric/prefix/cached_kv_state.h"
#include "kvfabric/prefix/host_kv_cache.h"
#include "kvfabric/prefix/radix_tree.h"

namespace kvfabric {

//! \brief Limits of a PrefixKvCache (seed PrefixCacheConfig, defaults {256, 512 MiB, 4}).
struct PrefixCacheConfig {
  size_t max_entries = 256;                //!< cached prefixes (entries with a snapshot)
  size_t max_memory_bytes = 512ull << 20;  //!< sum of the snapshots' memory_bytes()
  size_t min_prefix_len = 4;               //!< shorter keys are not stored, shorter hits miss
  //! Opt-in: a query may also be served by a longer stored key it shares a prefix with (the
  //! first matched positions of that snapshot), as vLLM and SGLang allow. Off, the seed's rule:
  //! only a stored key that is a whole prefix of the query matches.
  bool partial_prefix_reuse = false;
};

namespace detail {
struct PrefixKvCacheState;
}

//! \brief A lookup result that pins its entry: the entry cannot be evicted until the handle is
//! released or destroyed (the seed returned a bare reference that nothing protected in C++).
//! Move-only. It may outlive the cache; releasing it then does nothing.
class PrefixHit {
 public:
  PrefixHit(PrefixHit&& other) noexcept;
  PrefixHit& operator=(PrefixHit&& other) noexcept;
  PrefixHit(const PrefixHit&) = delete;
  PrefixHit& operator=(const PrefixHit&) = delete;
  ~PrefixHit();

  //! Tokens of the query the snapshot covers (the stored key's length, or with partial reuse
  //! the common prefix with a longer key).
  [[nodiscard]] size_t matched_len() const { return matched_len_; }
  //! The entry's snapshot; it covers at least matched_len() positions. Valid for the handle's
  //! lifetime, even if the entry is later replaced.
  [[nodiscard]] const CachedKvState& state() const { return state_; }
  [[nodiscard]] bool pinned() const { return !state_owner_.expired() && pinned_; }
  //! Unpins the entry now (the cache enforces its limits again).
  void release();

 private:
  friend class PrefixKvCache;
  PrefixHit(size_t matched_len, CachedKvState state,
            std::weak_ptr<detail::PrefixKvCacheState> owner, RadixNodeId node, uint64_t generation);

  size_t matched_len_ = 0;
  CachedKvState state_;
  std::weak_ptr<detail::PrefixKvCacheState> state_owner_;
  RadixNodeId node_;
  uint64_t generation_ = 0;
  bool pinned_ = false;
};

//! \brief A radix-tree cache of K/V snapshots keyed by token prefix (seed oxillama
//! PrefixKvCache). It keeps the seed's semantics (a hit is the deepest stored key that is a
//! prefix of the query; hits and misses counted after the min_prefix_len gate; LRU eviction by
//! entry count, then by memory; clear() resets the counters) and fixes seed-semantics.md §E3:
//! - a snapshot carries layers, kv_dim, dtype and length, and a store whose length differs from
//!   its key, or whose layers cannot be read in full, is refused with an error;
//! - restore() validates the snapshot against the target and returns an error;
//! - a lookup refreshes only the entry it returns (logical clock; ties to the older entry);
//! - eviction continues past zero-byte entries, and uses running counters, not tree walks;
//! - a returned entry is pinned by its PrefixHit until released;
//! - partial-prefix reuse is an opt-in option.
//! Not thread-safe.
class PrefixKvCache {
 public:
  explicit PrefixKvCache(PrefixCacheConfig config = {});
  PrefixKvCache(PrefixKvCache&&) noexcept;
  PrefixKvCache& operator=(PrefixKvCache&&) noexcept;
  ~PrefixKvCache();

  //! The entry serving the longest prefix of `tokens`, pinned; nullopt on a miss (an empty
  //! query, nothing matching, or a match shorter than min_prefix_len).
  std::optional<PrefixHit> lookup(std::span<const TokenId> tokens);

  //! Snapshots the first seq_len positions of `num_layers` layers of `kv` under the key `tokens`
  //! (replacing an entry with the same key), then evicts down to the limits. Returns false when
  //! the key is shorter than min_prefix_len (skipped, as the seed) or the new entry alone
  //! exceeds the limits, true when it is cached. InvalidArgument (nothing changes) for an empty
  //! key, seq_len != tokens.size(), kv_dim differing from kv.kv_dim(), or a layer that cannot be
  //! read or holds fewer than seq_len * kv_dim floats.
  Result<bool> store(std::span<const TokenId> tokens, const KvCacheAccess& kv, size_t seq_len,
                     size_t kv_dim, size_t num_layers);
  //! Stores a prepared snapshot; same rules (its seq_len must equal tokens.size()).
  Result<bool> store_snapshot(std::span<const TokenId> tokens, CachedKvState snapshot);

  //! Copies the whole snapshot into `target` (HostKvCache::restore_from_snapshot checks it).
  static Status restore(const CachedKvState& cached, HostKvCache& target);
  //! Copies the hit's matched_len() positions into `target`.
  static Status restore(const PrefixHit& hit, HostKvCache& target);

  [[nodiscard]] const PrefixCacheConfig& config() const;
  //! Sum of the cached snapshots' memory_bytes().
  [[nodiscard]] size_t memory_usage() const;
  //! Cached entries.
  [[nodiscard]] size_t len() const;
  [[nodiscard]] bool is_empty() const { return len() == 0; }
  //! Drops every entry and resets hits and misses (as the seed). Outstanding handles stay
  //! valid; releasing them does nothing.
  void clear();
  [[nodiscard]] uint64_t hits() const;
  [[nodiscard]] uint64_t misses() const;
  //! Pins held by live PrefixHit handles.
  [[nodiscard]] uint64_t pinned() const;

  //! The tree's integrity check. For tests.
  [[nodiscard]] Status verify() const;

 private:
  //! Evicts least recently used unpinned entries while over max_entries, then over memory.
  static void enforce_limits(detail::PrefixKvCacheState& state);

  std::shared_ptr<detail::PrefixKvCacheState> state_;  // shared with the handles (weakly)
};

}  // namespace kvfabric
