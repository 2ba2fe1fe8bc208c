// Google Benchmark micro-benchmarks of the block manager's hot operations at 1,000 and 100,000
// live sequences, with a bare free-list push/pop in the same binary as the baseline; and of
// token-level compression (H2O selection against the seed's removal loop, retain_tokens).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "kvfabric/kvfabric.h"

namespace {

using kvfabric::PagedKvCache;
using kvfabric::SeqId;

constexpr size_t kBlockSize = 16;
constexpr size_t kTokensPerLiveSequence = 64;  // 4 blocks each
constexpr size_t kBatch = 4096;                // work done between untimed clean-ups
constexpr int64_t kAppendIterations = 2'000'000;

// A pool holding `live` sequences of kTokensPerLiveSequence tokens plus `headroom` blocks.
PagedKvCache make_cache(size_t live, size_t headroom) {
  PagedKvCache cache(live * (kTokensPerLiveSequence / kBlockSize) + headroom, kBlockSize, 8, 128);
  for (size_t i = 0; i < live; ++i) {
    if (!cache.allocate(SeqId{i}, kTokensPerLiveSequence).ok()) std::abort();
  }
  return cache;
}

// Baseline: the cheapest possible allocator, a vector of free ids used as a stack.
void BM_FreeListPushPop(benchmark::State& state) {
  std::vector<uint32_t> free_list(1 << 20);
  for (uint32_t i = 0; i < free_list.size(); ++i)
    free_list[i] = i;
  for (auto _ : state) {
    const uint32_t block = free_list.back();
    free_list.pop_back();
    benchmark::DoNotOptimize(block);
    free_list.push_back(block);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_FreeListPushPop);

// allocate(): a new 16-token (one block) sequence; the batch is freed outside the timing.
void BM_Allocate(benchmark::State& state) {
  const auto live = static_cast<size_t>(state.range(0));
  PagedKvCache cache = make_cache(live, kBatch + 16);
  uint64_t next = live;
  size_t in_batch = 0;
  for (auto _ : state) {
    if (!cache.allocate(SeqId{next++}, kBlockSize).ok()) state.SkipWithError("allocate failed");
    if (++in_batch == kBatch) {
      state.PauseTiming();
      for (uint64_t s = next - kBatch; s < next; ++s)
        (void)cache.free(SeqId{s});
      in_batch = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Allocate)->Arg(1000)->Arg(100000);

// append(seq, 1): one decode token per sequence, round robin; every 16th append takes a block.
void BM_AppendDecodeToken(benchmark::State& state) {
  const auto live = static_cast<size_t>(state.range(0));
  const size_t growth_blocks = static_cast<size_t>(kAppendIterations) / kBlockSize + live + 16;
  PagedKvCache cache = make_cache(live, growth_blocks);
  uint64_t seq = 0;
  for (auto _ : state) {
    if (!cache.append(SeqId{seq}, 1).ok()) state.SkipWithError("append failed");
    if (++seq == live) seq = 0;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_AppendDecodeToken)->Arg(1000)->Arg(100000)->Iterations(kAppendIterations);

// fork(): shares the 4 blocks of a live sequence; the forks are freed outside the timing.
void BM_Fork(benchmark::State& state) {
  const auto live = static_cast<size_t>(state.range(0));
  PagedKvCache cache = make_cache(live, 16);
  uint64_t next = live;
  size_t in_batch = 0;
  for (auto _ : state) {
    if (!cache.fork(SeqId{next % live}, SeqId{next}).ok()) state.SkipWithError("fork failed");
    ++next;
    if (++in_batch == kBatch) {
      state.PauseTiming();
      for (uint64_t s = next - kBatch; s < next; ++s)
        (void)cache.free(SeqId{s});
      in_batch = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Fork)->Arg(1000)->Arg(100000);

// free(): releases a 4-block sequence; the batch to free is allocated outside the timing.
void BM_Free(benchmark::State& state) {
  const auto live = static_cast<size_t>(state.range(0));
  PagedKvCache cache = make_cache(live, kBatch * 4 + 16);
  uint64_t next = live;
  size_t remaining = 0;
  for (auto _ : state) {
    if (remaining == 0) {
      state.PauseTiming();
      for (size_t i = 0; i < kBatch; ++i)
        (void)cache.allocate(SeqId{next + i}, kTokensPerLiveSequence);
      remaining = kBatch;
      state.ResumeTiming();
    }
    if (!cache.free(SeqId{next++}).ok()) state.SkipWithError("free failed");
    --remaining;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Free)->Arg(1000)->Arg(100000);

// Accumulated attention scores of n tokens with ties, as decode steps leave them.
std::vector<double> h2o_scores(size_t n) {
  std::mt19937 rng(7);
  std::vector<double> scores(n);
  for (double& s : scores)
    s = static_cast<double>(rng() % 1000) / 1000.0;
  return scores;
}

// Baseline: the seed's H2O eviction, removing the minimum (oldest on ties) until half remain.
void BM_SeedH2oRemovalLoop(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  const std::vector<double> scores = h2o_scores(n);
  for (auto _ : state) {
    std::vector<double> kept = scores;
    while (kept.size() > n / 2) {
      size_t victim = 0;
      for (size_t i = 1; i < kept.size(); ++i) {
        if (kept[i] < kept[victim]) victim = i;
      }
      kept.erase(kept.begin() + static_cast<std::ptrdiff_t>(victim));
    }
    benchmark::DoNotOptimize(kept.data());
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(n));
}
BENCHMARK(BM_SeedH2oRemovalLoop)->Arg(1024)->Arg(8192);

// The same choice (no recent window, as the seed) with one partial selection.
void BM_SelectHeavyHitters(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  const std::vector<double> scores = h2o_scores(n);
  for (auto _ : state)
    benchmark::DoNotOptimize(kvfabric::quant::select_heavy_hitters(scores, n / 2, 0).data());
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(n));
}
BENCHMARK(BM_SelectHeavyHitters)->Arg(1024)->Arg(8192);

// retain_tokens(): keeps an H2O selection of half of an n-token sequence (bookkeeping and the
// queued copies; the storage copies are the backend's). The sequence is rebuilt untimed.
void BM_RetainTokens(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  const std::vector<size_t> keep =
      kvfabric::quant::select_heavy_hitters(h2o_scores(n), n / 2, n / 4);
  PagedKvCache cache(n / kBlockSize + 1, kBlockSize, 8, 128);
  for (auto _ : state) {
    state.PauseTiming();
    (void)cache.free(SeqId{1});
    if (!cache.allocate(SeqId{1}, n).ok()) state.SkipWithError("allocate failed");
    (void)cache.take_pending_copies();
    state.ResumeTiming();
    if (!cache.retain_tokens(SeqId{1}, keep).ok()) state.SkipWithError("retain_tokens failed");
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(n));
}
BENCHMARK(BM_RetainTokens)->Arg(1024)->Arg(8192);

}  // namespace
