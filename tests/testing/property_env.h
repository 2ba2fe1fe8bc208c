// The knobs of the seeded property tests: KVF_TEST_SEED shifts every test's seed (default 0: the
// seeds the tests name) and KVF_TEST_SCALE multiplies their operation counts (default 1), so that
// a soak runs them longer or on other seeds, e.g.
//   KVF_TEST_SCALE=10 KVF_TEST_SEED=7 ctest --test-dir build -R 'Property|Workload'
// Each test adds property_trace() to its failure messages, which says how to rerun it.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace kvfabric::testing {

inline uint64_t env_u64(const char* name, uint64_t fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text, &end, 10);
  // strtoull takes "-1" (as 2^64 - 1) and saturates on overflow: refuse both, and typos. A soak
  // that silently ran other counts than asked would prove nothing.
  if (*end != '\0' || *text == '-' || errno == ERANGE) {
    std::fprintf(stderr, "%s=%s is not a non-negative 64-bit integer\n", name, text);
    std::exit(2);
  }
  return value;
}

//! A test's own seed, shifted by KVF_TEST_SEED.
inline uint64_t property_seed(uint64_t base) { return base + env_u64("KVF_TEST_SEED", 0); }
//! A test's operation count, times KVF_TEST_SCALE (at least 1).
inline uint64_t property_count(uint64_t base) {
  const uint64_t scale = std::max<uint64_t>(env_u64("KVF_TEST_SCALE", 1), 1);
  uint64_t count = 0;
  if (__builtin_mul_overflow(base, scale, &count)) {
    std::fprintf(stderr, "KVF_TEST_SCALE=%llu overflows an operation count\n",
                 static_cast<unsigned long long>(scale));
    std::exit(2);
  }
  return count;
}
//! "KVF_TEST_SEED=7 KVF_TEST_SCALE=10": what reproduces a failed run.
inline std::string property_trace() {
  return "KVF_TEST_SEED=" + std::to_string(env_u64("KVF_TEST_SEED", 0)) +
         " KVF_TEST_SCALE=" + std::to_string(env_u64("KVF_TEST_SCALE", 1));
}

}  // namespace kvfabric::testing
