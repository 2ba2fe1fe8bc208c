#include "kvfabric/prefix/radix_tree.h"

#include <cstring>
#include <string>

namespace kvfabric {

size_t common_prefix_len(std::span<const TokenId> a, std::span<const TokenId> b) {
  const size_t n = std::min(a.size(), b.size());
  auto equal = [&](size_t at, size_t len) {
    return std::memcmp(a.data() + at, b.data() + at, len * sizeof(TokenId)) == 0;
  };
  // memcmp (vectorized by the C library) over chunks that double while they match: a long equal
  // run, the usual case on a cached path, costs a few large calls instead of one per chunk.
  constexpr size_t kChunk = 32;
  size_t i = 0;
  for (size_t step = kChunk; i < n; step *= 2) {
    const size_t len = std::min(step, n - i);
    if (!equal(i, len)) break;
    i += len;
  }
  // i is n, or the start of a chunk that differs somewhere: find where, chunk by chunk, then by
  // token.
  while (i + kChunk <= n && equal(i, kChunk))
    i += kChunk;
  while (i < n && a[i] == b[i])
    ++i;
  return i;
}

Status RadixTreeOptions::validate() const {
  if (granularity == 0) return invalid_argument("radix tree granularity must be >= 1 (got 0)");
  return ok_status();
}

namespace detail {

uint64_t radix_unit_key(std::span<const TokenId> unit, uint32_t granularity) {
  KVF_CHECK(!unit.empty(), "an empty unit has no key");
  if (granularity == 1) return unit[0];
  // Four independent multiply-xorshift lanes over 64-bit words (two tokens each), so hashing a
  // 512-token block is neither one long dependency chain nor one multiply per token.
  constexpr uint64_t kMul = 0xff51afd7ed558ccdULL;
  uint64_t lanes[4] = {0x9e3779b97f4a7c15ULL, 0xc2b2ae3d27d4eb4fULL, 0x165667b19e3779f9ULL,
                       0x27d4eb2f165667c5ULL};
  const TokenId* p = unit.data();
  size_t i = 0;
  for (; i + 8 <= unit.size(); i += 8) {
    for (size_t l = 0; l < 4; ++l) {
      uint64_t word;
      std::memcpy(&word, p + i + 2 * l, sizeof(word));
      lanes[l] = (lanes[l] ^ word) * kMul;
      lanes[l] ^= lanes[l] >> 29;
    }
  }
  for (; i < unit.size(); ++i) {
    lanes[0] = (lanes[0] ^ p[i]) * kMul;
    lanes[0] ^= lanes[0] >> 29;
  }
  uint64_t h = unit.size();
  for (uint64_t lane : lanes) {
    h = (h ^ lane) * kMul;
    h ^= h >> 32;
  }
  // Full units and partial (shorter) units live in separate key spaces.
  constexpr uint64_t kPartialBit = 1ULL << 63;
  return unit.size() < granularity ? (h | kPartialBit) : (h & ~kPartialBit);
}

uint64_t radix_salted_key(uint64_t unit_key, const CacheSalt& salt) {
  if (salt.empty()) return unit_key;
  constexpr uint64_t kMul = 0x9fb21c651e98df25ULL;
  uint64_t h = unit_key;
  for (uint64_t word : {salt.hi, salt.lo}) {
    h = (h ^ word) * kMul;
    h ^= h >> 31;
  }
  constexpr uint64_t kPartialBit = 1ULL << 63;
  return (h & ~kPartialBit) | (unit_key & kPartialBit);
}

}  // namespace detail
}  // namespace kvfabric
