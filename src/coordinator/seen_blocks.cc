#include "coordinator/seen_blocks.h"

#include <algorithm>
#include <bit>

namespace kvfabric::detail {
namespace {

constexpr uint64_t kMinBits = uint64_t{1} << 19;  // 64 KiB
constexpr uint64_t kMaxBits = uint64_t{1} << 29;  // 64 MiB

uint64_t bits_for(uint64_t total_device_blocks) {
  return std::bit_ceil(std::clamp(total_device_blocks * 16, kMinBits, kMaxBits));
}

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
  const uint64_t bits = bits_for(total_device_blocks);
  for (Bits& generation : generations_) generation.assign(bits / 64, 0);
  mask_ = bits - 1;
  capacity_ = bits / 8;
}

uint64_t SeenBlocks::bytes_for(uint64_t total_device_blocks) {
  return 2 * bits_for(total_device_blocks) / 8;
}

size_t SeenBlocks::memory_bytes() const {
  return (generations_[0].size() + generations_[1].size()) * sizeof(uint64_t);
}

uint64_t SeenBlocks::sample(std::span<const TokenId> tokens) {
  const size_t head = std::min(tokens.size(), kSampled);
  const size_t tail_from = std::max(head, tokens.size() - std::min(tokens.size(), kSampled));
  uint64_t h = mix(tokens.size());
  for (size_t i = 0; i < head; ++i) h = mix(h + tokens[i]);
  for (size_t i = tail_from; i < tokens.size(); ++i) h = mix(h + tokens[i]);
  return h;
}

uint64_t SeenBlocks::key(uint64_t sampled, size_t position, const CacheSalt& salt, bool any_salt) {
  uint64_t h = mix(position * 2 + (any_salt ? 1 : 0));
  if (!any_salt) h = mix(h ^ salt.hi) ^ mix(salt.lo + 1);
  return mix(h ^ sampled);
}

void SeenBlocks::add(uint64_t key) {
  if (added_ == capacity_) {  // full: it becomes the old generation, the oldest is forgotten
    current_ ^= 1;
    std::fill(generations_[current_].begin(), generations_[current_].end(), 0);
    added_ = 0;
  }
  for (const uint64_t bit : probes(key, mask_)) {
    generations_[current_][bit / 64] |= uint64_t{1} << (bit % 64);
  }
  ++added_;
}

bool SeenBlocks::in(const Bits& bits, uint64_t key) const {
  for (const uint64_t bit : probes(key, mask_)) {
    if ((bits[bit / 64] & (uint64_t{1} << (bit % 64))) == 0) return false;
  }
  return true;
}

bool SeenBlocks::contains(uint64_t key) const {
  return in(generations_[0], key) || in(generations_[1], key);
}

}  // namespace kvfabric::detail
