// The seed op script: one fixed sequence of block-manager operations (allocate, append, fork,
// free, evict) over a pool of N live sequences, written to a file so that kvfabric's
// PagedKvCache and the seed crate's Rust PagedKvCache (launch/seed-bench) run exactly the same
// work and their rates compare.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kvfabric/common/status.h"

namespace kvfabric::bench {

enum class SeedOpKind : uint64_t { kAllocate = 0, kAppend = 1, kFork = 2, kFree = 3, kEvict = 4 };

//! One operation: allocate(a, b tokens), append(a, b tokens), fork(a -> b), free(a), evict()
//! expecting a (the least recently used sequence) as its victim.
struct SeedOp {
  SeedOpKind kind = SeedOpKind::kAppend;
  uint64_t a = 0;
  uint64_t b = 0;
};

struct SeedOpScript {
  uint64_t num_blocks = 0;
  uint64_t block_size = 0;
  std::vector<SeedOp> setup;  //!< allocates the live sequences (not timed)
  std::vector<SeedOp> timed;
};

struct SeedOpOptions {
  uint64_t live = 1000;      //!< sequences held at once (the population drifts within 5 %)
  uint64_t operations = 1'000'000;
  uint64_t block_size = 16;
  uint64_t seed = 1;
};

//! The script: 80 % one-token appends (decode), 5 % allocations of 64-token prompts, 10 % frees,
//! 4 % forks and 1 % evictions of the least recently used sequence, on a pool large enough that
//! nothing runs out of blocks.
SeedOpScript make_seed_op_script(const SeedOpOptions& options);

//! File format (little endian): "KVFOPS01", num_blocks, block_size, setup count, timed count
//! (u64 each), then per op kind, a, b (u64 each).
Status write_seed_op_script(const SeedOpScript& script, const std::string& path);
Result<SeedOpScript> read_seed_op_script(const std::string& path);

struct SeedOpRun {
  uint64_t operations = 0;
  double seconds = 0;
  uint64_t evict_mismatches = 0;  //!< evictions that chose another victim than the script's
};

//! Runs the script through kvfabric::PagedKvCache (LRU, the seed's default); times the timed part.
//! `progress(done, total)` (optional) is called between timed chunks of operations.
Result<SeedOpRun> run_seed_op_script(const SeedOpScript& script,
                                     const std::function<void(size_t, size_t)>& progress = nullptr);

}  // namespace kvfabric::bench
