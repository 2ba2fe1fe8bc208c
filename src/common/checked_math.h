// Size arithmetic that reports overflow instead of wrapping: every product of config sizes goes
// through these (a wrapped block size divides by zero or sizes a pool of 4-byte blocks).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>

namespace kvfabric::detail {

//! The product of `factors`, or nullopt when it does not fit in 64 bits.
inline std::optional<uint64_t> checked_product(std::initializer_list<uint64_t> factors) {
  uint64_t product = 1;
  for (uint64_t f : factors) {
    if (__builtin_mul_overflow(product, f, &product)) return std::nullopt;
  }
  return product;
}

//! a + b, or nullopt when it does not fit in 64 bits.
inline std::optional<uint64_t> checked_sum(uint64_t a, uint64_t b) {
  uint64_t sum = 0;
  if (__builtin_add_overflow(a, b, &sum)) return std::nullopt;
  return sum;
}

}  // namespace kvfabric::detail
