// Cache salts: the namespaces that keep one tenant's cached prefixes from serving another's.
#pragma once

#include <compare>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kvfabric {

//! \brief The 128-bit identity of a cache salt string (the first 128 bits of its SHA-256), as
//! vLLM hashes its `cache_salt` into the first block's key. Keys of different salts never share
//! a cached block: prefix nodes compare the whole identity, not a hash bucket, and finding a
//! second string with the same identity is as hard as breaking SHA-256. The empty salt is the
//! identity {0, 0}: no salt, a key shared by everyone (as before salts existed).
struct CacheSalt {
  uint64_t hi = 0;
  uint64_t lo = 0;

  //! The identity of `salt` ({0, 0} for the empty string).
  static CacheSalt of(std::string_view salt);

  [[nodiscard]] bool empty() const { return hi == 0 && lo == 0; }
  friend auto operator<=>(const CacheSalt&, const CacheSalt&) = default;
};

//! \brief Which part of a key a salt covers: tokens [0, public_tokens) are public (shared with
//! every salt, like a system prompt all tenants send) and the rest belong to `salt`. Public
//! ranges are whole blocks: a block holding both public and salted tokens is salted.
struct SaltScope {
  CacheSalt salt;
  size_t public_tokens = 0;
};

//! Hex digits of the identity, for logs and events.
std::string to_string(const CacheSalt& salt);

}  // namespace kvfabric
