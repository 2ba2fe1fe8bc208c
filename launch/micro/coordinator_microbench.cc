// Google Benchmark micro-benchmarks of the coordinator's per-step work: every running sequence
// decodes one token (append) and step() publishes the plan, at 1,000 to 100,000 running
// sequences over 8 replicas, and at 1,000 and 10,000 sequences compressed by PyramidKV (tables
// per layer group). The figure is the time per running sequence per step.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "kvfabric/kvfabric.h"

namespace {

using kvfabric::Config;
using kvfabric::Coordinator;
using kvfabric::SeqId;
using kvfabric::TokenId;

constexpr uint32_t kReplicas = 8;
constexpr uint32_t kBlockSize = 16;
constexpr size_t kPromptTokens = 64;

// A coordinator with `running` sequences admitted and computed, and room for 4,096 more tokens
// each.
Coordinator running_coordinator(size_t running) {
  Config config;
  config.model.num_layers = 1;
  config.model.num_query_heads = 1;
  config.model.num_kv_heads = 1;
  config.model.head_dim = 8;
  config.cache.block_size = kBlockSize;
  config.cache.num_blocks = (running / kReplicas + 1) * (kPromptTokens + 4096) / kBlockSize;
  config.topology.dp = kReplicas;
  config.coordinator.max_sequences_per_replica = static_cast<uint32_t>(running);
  auto created = Coordinator::create(config);
  if (!created.ok()) std::abort();
  Coordinator c = std::move(created).value();
  std::vector<TokenId> prompt(kPromptTokens);
  for (size_t s = 0; s < running; ++s) {
    for (size_t t = 0; t < kPromptTokens; ++t) prompt[t] = static_cast<TokenId>(s * kPromptTokens + t);
    if (!c.admit(SeqId{s}, prompt).ok()) std::abort();
  }
  if (!c.step().ok() || !c.step().ok()) std::abort();
  return c;
}

// One decode step per iteration: `append_all` gives every running sequence a token, then step();
// the figure is the time per running sequence.
template <typename AppendAll>
void decode_steps(benchmark::State& state, Coordinator c, AppendAll&& append_all) {
  const auto running = static_cast<size_t>(state.range(0));
  for (auto _ : state) {
    if (!append_all(c, running)) state.SkipWithError("append failed");
    auto plan = c.step();
    if (!plan.ok()) state.SkipWithError("step failed");
    benchmark::DoNotOptimize(plan);
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(running));
  state.counters["ns_per_sequence"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * static_cast<double>(running),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// append(seq, 1) for every running sequence.
bool append_each(Coordinator& c, size_t running) {
  for (size_t s = 0; s < running; ++s) {
    if (!c.append(SeqId{s}, 1).ok()) return false;
  }
  return true;
}

void BM_CoordinatorDecodeStep(benchmark::State& state) {
  decode_steps(state, running_coordinator(static_cast<size_t>(state.range(0))), append_each);
}
BENCHMARK(BM_CoordinatorDecodeStep)->Arg(1000)->Arg(10000)->Arg(100000)->Iterations(64)
    ->Unit(benchmark::kMillisecond);

// The batch's appends in one call (Coordinator::append(span, n)), ids looked up ahead.
void BM_CoordinatorDecodeStepBatched(benchmark::State& state) {
  std::vector<SeqId> batch(static_cast<size_t>(state.range(0)));
  for (size_t s = 0; s < batch.size(); ++s) batch[s] = SeqId{s};
  decode_steps(state, running_coordinator(batch.size()),
               [&](Coordinator& c, size_t) { return c.append(batch, 1).status.ok(); });
}
BENCHMARK(BM_CoordinatorDecodeStepBatched)->Arg(1000)->Arg(10000)->Arg(100000)->Iterations(64)
    ->Unit(benchmark::kMillisecond);

// Sequences compressed by PyramidKV: 4 layer groups, each prompt of 512 tokens regrouped to
// half its tokens on average before the steps are timed; every step then publishes each
// sequence's 4 group tables (only the blocks its ranks do not hold yet).
constexpr size_t kPyramidPrompt = 512;
constexpr uint32_t kPyramidGroups = 4;

Coordinator pyramid_coordinator(size_t running) {
  Config config;
  config.model.num_layers = kPyramidGroups;
  config.model.num_query_heads = 1;
  config.model.num_kv_heads = 1;
  config.model.head_dim = 8;
  config.cache.block_size = kBlockSize;
  config.cache.layers_per_group = 1;
  config.cache.num_blocks = (running / kReplicas + 1) * (2 * kPyramidPrompt + 4096) / kBlockSize;
  config.topology.dp = kReplicas;
  config.coordinator.max_sequences_per_replica = static_cast<uint32_t>(running);
  auto created = Coordinator::create(config);
  if (!created.ok()) std::abort();
  Coordinator c = std::move(created).value();
  kvfabric::quant::CompressionPolicy pyramid;
  pyramid.kind = kvfabric::quant::CompressionPolicy::Kind::kPyramid;
  pyramid.budget_ratio = 0.5;
  pyramid.window_tokens = 16;
  kvfabric::AdmitOptions options;
  options.compression = pyramid;
  std::vector<TokenId> prompt(kPyramidPrompt);
  for (size_t s = 0; s < running; ++s) {
    for (size_t t = 0; t < kPyramidPrompt; ++t) {
      prompt[t] = static_cast<TokenId>(s * kPyramidPrompt + t);
    }
    if (!c.admit(SeqId{s}, prompt, options).ok()) std::abort();
  }
  // The forward pass's votes: a falling ramp, so each group keeps the prompt's first tokens.
  std::vector<double> votes(kPyramidPrompt);
  for (size_t t = 0; t < votes.size(); ++t) votes[t] = static_cast<double>(votes.size() - t);
  for (int step = 0; step < 4; ++step) {
    auto plan = c.step();
    if (!plan.ok()) std::abort();
    for (const auto& request : plan->score_requests) {
      if (!c.report_attention(request.seq, plan->step, votes).ok()) std::abort();
    }
  }
  return c;
}

void BM_CoordinatorDecodeStepPyramid(benchmark::State& state) {
  const auto running = static_cast<size_t>(state.range(0));
  Coordinator c = pyramid_coordinator(running);
  if (c.stats().compactions < running) state.SkipWithError("the prompts were not regrouped");
  decode_steps(state, std::move(c), append_each);
}
BENCHMARK(BM_CoordinatorDecodeStepPyramid)->Arg(1000)->Arg(10000)->Iterations(64)
    ->Unit(benchmark::kMillisecond);

}  // namespace
