// Helpers for backend tests: CPU backends for every ISA this machine runs, and a pool to test on.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "kvfabric/backend/backend.h"

namespace kvfabric::testing {

//! The ISAs to test: generic always, AVX2 when the processor has it.
inline std::vector<CpuIsa> cpu_isas() {
  std::vector<CpuIsa> isas = {CpuIsa::kGeneric};
  for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx2Vnni}) {
    if (make_cpu_backend(CpuBackendOptions{isa, 1}).ok()) isas.push_back(isa);
  }
  return isas;
}

inline std::unique_ptr<Backend> cpu_backend(CpuIsa isa, int threads = 2) {
  auto backend = make_cpu_backend(CpuBackendOptions{isa, threads});
  EXPECT_TRUE(backend.ok()) << backend.status();
  return std::move(backend).value();
}

//! One layer group's pool on the device tier of a backend.
struct TestPool {
  BlockLayout layout;
  KvArena arena;
  PagedKvView view;

  static TestPool create(Backend& backend, uint32_t layers, uint32_t heads, uint32_t block_size,
                         uint32_t head_dim, DType dtype, uint32_t group_size, uint64_t blocks) {
    TestPool pool;
    pool.layout =
        BlockLayout::create(layers, heads, block_size, head_dim, dtype, group_size).value();
    pool.arena = backend.allocate_arena(blocks * pool.layout.block_bytes(), Tier::kDevice).value();
    pool.view = PagedKvView::make(pool.layout, pool.arena.data(), blocks);
    return pool;
  }

  [[nodiscard]] std::vector<uint8_t> snapshot() const {
    return std::vector<uint8_t>(arena.data(), arena.data() + arena.bytes());
  }
};

//! `count` distinct block ids in a shuffled order (tables that are not 0, 1, 2, ...).
inline std::vector<uint32_t> shuffled_blocks(uint32_t count, uint32_t pool_blocks,
                                             std::mt19937& rng) {
  std::vector<uint32_t> all(pool_blocks);
  std::iota(all.begin(), all.end(), 0u);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(count);
  return all;
}

}  // namespace kvfabric::testing
