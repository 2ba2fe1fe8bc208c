// Replays a Mooncake trace through PagedPrefixCache: each request looks up its prompt, shares the
// cached prefix, takes new blocks (evicting cached ones when the pool is full), indexes its prompt
// and finishes. Measures block and token hit ratios and the prefix cache's time per request.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "bench/trace.h"
#include "kvfabric/common/status.h"
#include "kvfabric/prefix/radix_tree.h"

namespace kvfabric::bench {

struct ReplaySimOptions {
  //! Tokens per trace block (512 in the Mooncake traces); also the pool's block size.
  uint32_t block_tokens = 512;
  //! Pool size in tokens (blocks = this / block_tokens); 0 = unlimited (nothing is evicted).
  uint64_t capacity_tokens = 0;
  RadixEvictionOrder policy = RadixEvictionOrder::kLru;
  //! Also cache each prompt's partly filled last block, so that every hash id is a cache unit
  //! as the trace defines it; false = full blocks only (vLLM, SGLang).
  bool partial_blocks = true;
  size_t max_requests = 0;  //!< 0 = the whole trace
};

struct ReplaySimProgress {
  size_t done = 0;
  size_t total = 0;
  double block_hit_ratio = 0;
};

struct ReplaySimResult {
  size_t requests = 0;
  size_t unfit_requests = 0;  //!< prompts larger than the whole pool: counted as misses
  uint64_t pool_blocks = 0;
  uint64_t block_refs = 0;  //!< hash ids referenced by the prompts
  uint64_t hit_blocks = 0;  //!< of those, served from the cache (the leading run)
  uint64_t prompt_tokens = 0;
  uint64_t hit_tokens = 0;
  double block_hit_ratio = 0;
  double token_hit_ratio = 0;
  //! The trace's own definition, from hash ids alone: a reference is a hit when its id appeared
  //! earlier, counted along the leading run (an unlimited cache). A cross-check, not the index.
  double ideal_block_hit_ratio = 0;
  uint64_t evictions = 0;
  uint64_t evicted_blocks = 0;
  uint64_t inserted_blocks = 0;
  size_t final_cached_blocks = 0;
  //! Wall time of PagedPrefixCache::allocate (match + share + new blocks, eviction included) and
  //! insert, per request, in microseconds. Reported only; never used to decide anything.
  double mean_us = 0;
  double p50_us = 0;
  double p99_us = 0;
  double wall_seconds = 0;   //!< the whole replay, token expansion included
  size_t leaked_blocks = 0;  //!< blocks not free after every request ended and the index emptied
};

//! Token j of the block named `hash_id`: a 31-bit mix of the two, so equal hash ids give equal
//! blocks and different ones differ (but for a 2^-31 chance per token), for any number of ids.
TokenId prompt_token(uint64_t hash_id, size_t offset);

//! The prompt of a request as token ids: the block at position b holds prompt_token(its hash id,
//! j) for j below its length (the last block holds input_length - block_tokens * (blocks - 1)
//! tokens). InvalidArgument when the ids do not fit the length or an id is 2^47 or more.
Result<std::vector<TokenId>> expand_prompt(const MooncakeRequest& request, uint32_t block_tokens);

//! Runs the replay. Deterministic apart from the wall-clock figures.
Result<ReplaySimResult> run_replay_sim(
    const std::vector<MooncakeRequest>& trace, const ReplaySimOptions& options,
    const std::function<void(const ReplaySimProgress&)>& progress = nullptr);

}  // namespace kvfabric::bench
