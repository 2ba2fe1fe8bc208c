// Google Benchmark: the prefix index's match + insert cost per request of the Mooncake
// conversation trace (12,031 prompts expanded to tokens, 512-token blocks, full blocks only,
// unlimited capacity), against a chained-block-hash index as vLLM's automatic prefix caching
// keeps it (std::unordered_map from a block's prefix hash to its block), in the same binary;
// then lookups alone on indexes that hold the whole trace.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <unordered_map>
#include <vector>

#include "bench/replay_sim.h"
#include "bench/trace.h"
#include "kvfabric/kvfabric.h"

namespace {

using kvfabric::BlockId;
using kvfabric::TokenId;
constexpr uint32_t kBlockTokens = 512;

// Every prompt of the trace as tokens, expanded once and shared by the benchmarks (~0.6 GB).
struct Prompts {
  std::vector<std::vector<TokenId>> tokens;
  uint64_t full_blocks = 0;
};

const Prompts& prompts() {
  static const Prompts all = [] {
    Prompts p;
    auto trace = kvfabric::bench::parse_mooncake_trace(
        kvfabric::bench::embedded_mooncake_conversation_trace(), "conversation_trace.jsonl");
    if (!trace.ok()) {
      std::fprintf(stderr, "%s\n", trace.status().to_string().c_str());
      std::abort();
    }
    for (const auto& request : trace.value()) {
      auto tokens = kvfabric::bench::expand_prompt(request, kBlockTokens);
      if (!tokens.ok()) std::abort();
      p.full_blocks += tokens.value().size() / kBlockTokens;
      p.tokens.push_back(std::move(tokens).value());
    }
    return p;
  }();
  return all;
}

// The baseline: vLLM-style block hashes, hash(parent hash, block tokens), in one hash map. A
// lookup hashes each full block of the prompt until the first miss; an insert hashes and stores
// the rest. The block hash uses the same 64-bit token hash as the radix tree's child keys.
class ChainedHashIndex {
 public:
  // Returns the number of leading full blocks found.
  size_t match(const std::vector<TokenId>& tokens, std::vector<uint64_t>& hashes) {
    hashes.clear();
    uint64_t parent = 0x2545f4914f6cdd1dULL;
    size_t hits = 0;
    bool leading = true;
    for (size_t pos = 0; pos + kBlockTokens <= tokens.size(); pos += kBlockTokens) {
      const std::span<const TokenId> block(tokens.data() + pos, kBlockTokens);
      parent = mix(parent, kvfabric::detail::radix_unit_key(block, kBlockTokens));
      hashes.push_back(parent);
      if (!leading) continue;  // vLLM hashes every full block of the request
      if (blocks_.find(parent) == blocks_.end()) {
        leading = false;
      } else {
        ++hits;
      }
    }
    return hits;
  }
  void insert(const std::vector<uint64_t>& hashes, size_t from) {
    for (size_t i = from; i < hashes.size(); ++i)
      blocks_.emplace(hashes[i], BlockId{next_block_++});
  }
  [[nodiscard]] size_t size() const { return blocks_.size(); }

 private:
  static uint64_t mix(uint64_t parent, uint64_t block) {
    uint64_t h = (parent ^ block) * 0x9e3779b97f4a7c15ULL;
    return h ^ (h >> 29);
  }
  std::unordered_map<uint64_t, BlockId> blocks_;
  uint32_t next_block_ = 0;
};

// One iteration = one request (match, then insert of its new full blocks). The index restarts
// empty, outside the timing, each time the trace is exhausted.
void BM_ChainedHashIndex(benchmark::State& state) {
  const Prompts& p = prompts();
  auto index = std::make_unique<ChainedHashIndex>();
  std::vector<uint64_t> hashes;
  size_t i = 0;
  uint64_t blocks = 0;
  for (auto _ : state) {
    const auto& tokens = p.tokens[i];
    const size_t hits = index->match(tokens, hashes);
    index->insert(hashes, hits);
    blocks += tokens.size() / kBlockTokens;
    if (++i == p.tokens.size()) {
      state.PauseTiming();
      index = std::make_unique<ChainedHashIndex>();
      i = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["blocks_per_request"] =
      static_cast<double>(blocks) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_ChainedHashIndex)->Iterations(3 * 12031)->Unit(benchmark::kMicrosecond);

// The radix index as a pool uses it: match (which splits where the match ends and refreshes the
// path), then insert with the matched blocks followed by new block ids.
void BM_RadixPrefixIndex(benchmark::State& state) {
  const Prompts& p = prompts();
  kvfabric::PrefixIndexOptions options;
  options.block_size = kBlockTokens;
  const auto pool_blocks = static_cast<uint32_t>(p.full_blocks + 1);
  auto index = kvfabric::PrefixBlockIndex::create(options, pool_blocks).value();
  std::vector<BlockId> table;
  uint32_t next_block = 0;
  size_t i = 0;
  uint64_t blocks = 0;
  for (auto _ : state) {
    const auto& tokens = p.tokens[i];
    const kvfabric::PrefixMatch hit = index->match(tokens);
    table = hit.blocks;
    while (table.size() < tokens.size() / kBlockTokens)
      table.push_back(BlockId{next_block++});
    if (!index->insert(tokens, table).ok()) state.SkipWithError("insert failed");
    blocks += tokens.size() / kBlockTokens;
    if (++i == p.tokens.size()) {
      state.PauseTiming();
      index = kvfabric::PrefixBlockIndex::create(options, pool_blocks).value();
      next_block = 0;
      i = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["blocks_per_request"] =
      static_cast<double>(blocks) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_RadixPrefixIndex)->Iterations(3 * 12031)->Unit(benchmark::kMicrosecond);

// Lookups only, on an index that already holds the whole trace (filled outside the timing): every
// prompt is then cached in full, the serving case where prefix caching pays.
void BM_ChainedHashIndexLookup(benchmark::State& state) {
  const Prompts& p = prompts();
  ChainedHashIndex index;
  std::vector<uint64_t> hashes;
  for (const auto& tokens : p.tokens)
    index.insert(hashes, index.match(tokens, hashes));
  size_t i = 0;
  uint64_t hits = 0;
  for (auto _ : state) {
    hits += index.match(p.tokens[i], hashes);
    if (++i == p.tokens.size()) i = 0;
  }
  benchmark::DoNotOptimize(hits);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_ChainedHashIndexLookup)->Iterations(3 * 12031)->Unit(benchmark::kMicrosecond);

void BM_RadixPrefixIndexLookup(benchmark::State& state) {
  const Prompts& p = prompts();
  kvfabric::PrefixIndexOptions options;
  options.block_size = kBlockTokens;
  auto index =
      kvfabric::PrefixBlockIndex::create(options, static_cast<uint32_t>(p.full_blocks + 1)).value();
  std::vector<BlockId> table;
  uint32_t next_block = 0;
  for (const auto& tokens : p.tokens) {
    table = index->match(tokens).blocks;
    while (table.size() < tokens.size() / kBlockTokens)
      table.push_back(BlockId{next_block++});
    (void)index->insert(tokens, table);
  }
  size_t i = 0;
  uint64_t hits = 0;
  for (auto _ : state) {
    hits += index->match(p.tokens[i]).blocks.size();
    if (++i == p.tokens.size()) i = 0;
  }
  benchmark::DoNotOptimize(hits);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_RadixPrefixIndexLookup)->Iterations(3 * 12031)->Unit(benchmark::kMicrosecond);

}  // namespace
