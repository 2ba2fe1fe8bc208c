#include "bench/replay_sim.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <unordered_set>

#include "bench/timing.h"
#include "kvfabric/prefix/paged_prefix_cache.h"

namespace kvfabric::bench {

TokenId prompt_token(uint64_t hash_id, size_t offset) {
  // splitmix64's finalizer over (id, offset): a block's tokens are a function of its id, and
  // two ids share a block of tokens with probability about 2^-31 per token. Below 2^31: the
  // replays' generated tokens live above.
  uint64_t h = (hash_id << 16 | offset) + 0x9e3779b97f4a7c15ULL;
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ULL;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebULL;
  h ^= h >> 31;
  return static_cast<TokenId>(h & 0x7FFFFFFFu);
}

Result<std::vector<TokenId>> expand_prompt(const MooncakeRequest& request, uint32_t block_tokens) {
  if (block_tokens == 0) return invalid_argument("block_tokens must be >= 1");
  const size_t blocks = request.hash_ids.size();
  const uint64_t n = block_tokens;
  if (blocks != (request.input_length + n - 1) / n) {
    return invalid_argument(std::to_string(blocks) + " hash ids for " +
                            std::to_string(request.input_length) + " tokens of " +
                            std::to_string(n) + "-token blocks");
  }
  std::vector<TokenId> tokens(request.input_length);
  for (size_t b = 0; b < blocks; ++b) {
    const uint64_t id = request.hash_ids[b];
    if (id >= (uint64_t{1} << 47)) {
      return invalid_argument("hash id " + std::to_string(id) + " is above 2^47");
    }
    const size_t end = std::min<size_t>((b + 1) * n, tokens.size());
    for (size_t pos = b * n; pos < end; ++pos) tokens[pos] = prompt_token(id, pos - b * n);
  }
  return tokens;
}

Result<ReplaySimResult> run_replay_sim(
    const std::vector<MooncakeRequest>& trace, const ReplaySimOptions& options,
    const std::function<void(const ReplaySimProgress&)>& progress) {
  const size_t count =
      options.max_requests ? std::min(options.max_requests, trace.size()) : trace.size();
  const uint64_t n = options.block_tokens;
  if (n == 0) return invalid_argument("block_tokens must be >= 1");
  ReplaySimResult r;
  r.requests = count;
  if (options.capacity_tokens == 0) {
    // Unlimited: room for every block the trace references, so nothing is ever evicted.
    for (size_t i = 0; i < count; ++i)
      r.pool_blocks += (trace[i].input_length + n - 1) / n;
    r.pool_blocks = std::max<uint64_t>(r.pool_blocks, 1);
  } else {
    r.pool_blocks = options.capacity_tokens / n;
    if (r.pool_blocks == 0) {
      return invalid_argument("capacity of " + std::to_string(options.capacity_tokens) +
                              " tokens holds no " + std::to_string(n) + "-token block");
    }
  }
  // Bookkeeping only: the block layout's bytes do not matter here.
  KVF_ASSIGN_OR_RETURN(PagedKvCache pool, PagedKvCache::create(r.pool_blocks, n, 1, 1));
  PrefixIndexOptions index_options;
  index_options.order = options.policy;
  index_options.cache_partial_blocks = options.partial_blocks;
  KVF_ASSIGN_OR_RETURN(PagedPrefixCache cache,
                       PagedPrefixCache::create(std::move(pool), index_options));

  std::unordered_set<uint64_t> seen;  // membership only: never iterated
  uint64_t ideal_hits = 0;
  std::vector<double> latencies_us;
  latencies_us.reserve(count);
  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < count; ++i) {
    const MooncakeRequest& request = trace[i];
    auto expanded = expand_prompt(request, options.block_tokens);
    if (!expanded.ok()) {
      return Status(expanded.status().code(),
                    "request " + std::to_string(i) + ": " + expanded.status().message());
    }
    const std::vector<TokenId>& prompt = expanded.value();
    bool leading = true;
    for (uint64_t id : request.hash_ids) {
      leading = leading && seen.count(id) > 0;
      ideal_hits += leading ? 1 : 0;
    }
    seen.insert(request.hash_ids.begin(), request.hash_ids.end());
    r.block_refs += request.hash_ids.size();
    r.prompt_tokens += prompt.size();

    const SeqId seq{i};
    const auto t0 = std::chrono::steady_clock::now();
    const auto hit = cache.allocate(seq, prompt);
    if (!hit.ok()) {
      if (hit.status().code() != ErrorCode::kOutOfMemory) return hit.status();
      r.unfit_requests += 1;  // larger than the pool even with every cached block evicted
      continue;
    }
    // Without a trace priority, the priority policy ranks a prompt by how much of it was reused:
    // a continued conversation is more likely to be continued again.
    const uint32_t priority =
        request.priority.value_or(static_cast<uint32_t>((hit.value() + n - 1) / n));
    const auto inserted = cache.insert(seq, prompt, priority);
    const auto t1 = std::chrono::steady_clock::now();
    KVF_RETURN_IF_ERROR(inserted);
    latencies_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    r.hit_tokens += hit.value();
    r.hit_blocks += (hit.value() + n - 1) / n;
    KVF_RETURN_IF_ERROR(cache.pool().free(seq));
    // Often enough for a smooth bar; the reporter prints only every few seconds anyway.
    if (progress && ((i + 1) % 64 == 0 || i + 1 == count)) {
      progress(
          {i + 1, count, static_cast<double>(r.hit_blocks) / static_cast<double>(r.block_refs)});
    }
  }
  const auto end = std::chrono::steady_clock::now();
  r.wall_seconds = std::chrono::duration<double>(end - start).count();

  const auto ratio = [](uint64_t a, uint64_t b) {
    return b == 0 ? 0.0 : static_cast<double>(a) / static_cast<double>(b);
  };
  r.block_hit_ratio = ratio(r.hit_blocks, r.block_refs);
  r.token_hit_ratio = ratio(r.hit_tokens, r.prompt_tokens);
  r.ideal_block_hit_ratio = ratio(ideal_hits, r.block_refs);
  const PrefixIndexStats& stats = cache.index().stats();
  r.evictions = stats.evictions;
  r.evicted_blocks = stats.evicted_blocks;
  r.inserted_blocks = stats.inserted_blocks;
  r.final_cached_blocks = cache.index().cached_blocks();
  const LatencySummary latency = summarize_latencies(std::move(latencies_us));
  r.mean_us = latency.mean;
  r.p50_us = latency.p50;
  r.p99_us = latency.p99;
  KVF_RETURN_IF_ERROR(cache.verify_integrity());
  cache.clear_index();
  r.leaked_blocks = cache.pool().total_blocks() - cache.pool().free_block_count();
  return r;
}

}  // namespace kvfabric::bench
