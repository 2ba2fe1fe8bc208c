#include "coordinator/seen_blocks.h"

#include <algorithm>
#include <array>
#include <bit>

namespace kvfabric::detail {
namespace {

constexpr uint64_t kMinBits = uint64_t{1} << 19;  // 64 KiB
constexpr uint64_t kMaxBits = uint64_t{1} << 30;  // 128 MiB

// The two bits a key sets: its low bits, and a second hash of it (golden-ratio multiply of the
// key with its halves swapped).
std::array<uint64_t, 2> probes(uint64_t key, uint64_t mask) {
  const uint64_t swapped = (key >> 32) | (key << 32);
  return {key & mask, (swapped * 0x9e3779b97f4a7c15ULL) & mask};
}

uint64_t mix(uint64_t x) {  // the SplitMix64 finalizer: every input bit reaches every output bit
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

SeenBlocks::SeenBlocks(uint64_t total_device_blocks) {
  const uint64_t wanted = std::clamp(total_device_blocks * 16, kMinBits, kMaxBits);
  const uint64_t bits = std::bit_ceil(wanted);
  words_.assign(bits / 64, 0);
  mask_ = bits - 1;
}

uint64_t SeenBlocks::key(uint64_t unit, size_t position, bool any_salt) {
  return mix(unit ^ mix(position * 2 + (any_salt ? 1 : 0)));
}

void SeenBlocks::add(uint64_t key) {
  for (const uint64_t bit : probes(key, mask_)) {
    words_[bit / 64] |= uint64_t{1} << (bit % 64);
  }
}

bool SeenBlocks::contains(uint64_t key) const {
  for (const uint64_t bit : probes(key, mask_)) {
    if ((words_[bit / 64] & (uint64_t{1} << (bit % 64))) == 0) return false;
  }
  return true;
}

}  // namespace kvfabric::detail
