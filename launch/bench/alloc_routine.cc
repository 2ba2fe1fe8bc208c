#include <fmt/format.h>

#include <memory>
#include <string>
#include <vector>

#include "bench/alloc_sim.h"
#include "bench/progress.h"
#include "bench/report.h"
#include "bench/routines.h"
#include "bench/trace.h"

namespace kvfabric::bench {
namespace {

struct AllocCommandOptions {
  std::string trace_path;  // empty: the embedded Azure code trace
  uint64_t num_blocks = 0;
  uint64_t capacity_tokens = 131072;
  std::vector<uint32_t> block_sizes = {16};
  double step_ms = 25.0;
  double time_scale = 1.0;
  std::string strategy = "lru";
  double watermark = 0.01;
  size_t max_requests = 0;
};

Status run_alloc(const AllocCommandOptions& opts, nlohmann::json& results) {
  std::string text_storage;
  std::string_view text = embedded_azure_code_trace();
  std::string trace_name = "AzureLLMInferenceTrace_code.csv (embedded)";
  if (!opts.trace_path.empty()) {
    KVF_ASSIGN_OR_RETURN(text_storage, read_text_file(opts.trace_path, "trace file", kAnyTraceSize));
    text = text_storage;
    trace_name = opts.trace_path;
  }
  KVF_ASSIGN_OR_RETURN(const std::vector<TraceRequest> trace, parse_azure_trace(text, trace_name));
  KVF_ASSIGN_OR_RETURN(const EvictionPolicy policy, parse_eviction_policy(opts.strategy));
  EvictionConfig eviction;
  eviction.strategy = policy;

  const size_t requests =
      opts.max_requests ? std::min(opts.max_requests, trace.size()) : trace.size();
  fmt::print("alloc: {} requests from {}, {} trace s per {} ms step (time scale {})\n", requests,
             trace_name, opts.step_ms / 1000.0 * opts.time_scale, opts.step_ms, opts.time_scale);

  results["routine"] = "alloc";
  results["trace"] = trace_name;
  results["requests"] = requests;
  results["options"] = {{"capacity_tokens", opts.capacity_tokens},
                        {"num_blocks", opts.num_blocks},
                        {"step_ms", opts.step_ms},
                        {"time_scale", opts.time_scale},
                        {"strategy", opts.strategy},
                        {"admit_watermark", opts.watermark}};
  results["runs"] = nlohmann::json::array();

  Table table({"block_size", "blocks", "peak_util", "mean_util", "frag_mean", "frag_at_peak",
               "preemptions", "max_running", "queue_mean_s", "queue_p99_s", "completed", "ops",
               "ops/s"});
  for (uint32_t block_size : opts.block_sizes) {
    if (block_size == 0) return invalid_argument("--block-size must be > 0");
    AllocSimOptions sim;
    sim.block_size = block_size;
    sim.num_blocks = opts.num_blocks ? opts.num_blocks : opts.capacity_tokens / block_size;
    sim.step_seconds = opts.step_ms / 1000.0;
    sim.time_scale = opts.time_scale;
    sim.strategy = EvictionStrategy::from_config(eviction);
    sim.admit_watermark = opts.watermark;
    sim.max_requests = opts.max_requests;

    ProgressReporter reporter(fmt::format("alloc block_size={}", block_size), requests,
                              "requests");
    auto progress = [&](const AllocSimProgress& p) {
      reporter.update(p.completed, [&] {
        return fmt::format("step {}, util {}", p.step, format_percent(p.utilization));
      });
    };
    KVF_ASSIGN_OR_RETURN(const AllocSimResult r, run_alloc_sim(trace, sim, progress));
    reporter.finish();
    if (r.leaked_blocks != 0) {
      return Status(ErrorCode::kInternal,
                    fmt::format("{} blocks still used after the replay", r.leaked_blocks));
    }
    table.add_row(
        {std::to_string(block_size), std::to_string(sim.num_blocks),
         format_percent(r.peak_utilization), format_percent(r.mean_utilization),
         format_percent(r.mean_fragmentation), format_percent(r.fragmentation_at_peak),
         std::to_string(r.preemptions), std::to_string(r.max_running),
         fmt::format("{:.2f}", r.mean_queue_seconds), fmt::format("{:.2f}", r.p99_queue_seconds),
         fmt::format("{}/{}", r.completed, r.requests),
         format_count(static_cast<double>(r.operations)), format_count(r.ops_per_second)});
    results["runs"].push_back({{"block_size", block_size},
                               {"num_blocks", sim.num_blocks},
                               {"completed", r.completed},
                               {"rejected", r.rejected},
                               {"preemptions", r.preemptions},
                               {"steps", r.steps},
                               {"simulated_seconds", r.simulated_seconds},
                               {"peak_blocks_used", r.peak_blocks_used},
                               {"peak_utilization", r.peak_utilization},
                               {"mean_utilization", r.mean_utilization},
                               {"mean_fragmentation", r.mean_fragmentation},
                               {"fragmentation_at_peak", r.fragmentation_at_peak},
                               {"max_running", r.max_running},
                               {"mean_queue_seconds", r.mean_queue_seconds},
                               {"p99_queue_seconds", r.p99_queue_seconds},
                               {"operations", r.operations},
                               {"wall_seconds", r.wall_seconds},
                               {"ops_per_second", r.ops_per_second}});
  }
  fmt::print("\n{}", table.to_string());
  fmt::print(
      "frag = allocated-but-unused token slots / allocated slots (internal fragmentation); "
      "queue = trace seconds from arrival to admission;\npreemptions free a running request's "
      "blocks, which it recomputes when readmitted; ops/s = block-manager calls per second of "
      "replay.\n");
  return ok_status();
}

}  // namespace

void add_alloc_routine(CLI::App& app, RoutineFn& selected) {
  auto opts = std::make_shared<AllocCommandOptions>();
  CLI::App* cmd =
      app.add_subcommand("alloc", "Replay the Azure 2023 code trace through the block manager");
  cmd->add_option("--trace", opts->trace_path,
                  "Azure-format CSV trace (default: embedded code trace)");
  auto* blocks = cmd->add_option("--blocks", opts->num_blocks,
                                 "blocks in the pool (overrides --capacity-tokens)");
  cmd->add_option("--capacity-tokens", opts->capacity_tokens,
                  "pool size in tokens (blocks = this / block size)")
      ->check(CLI::PositiveNumber)
      ->excludes(blocks);
  cmd->add_option("--block-size", opts->block_sizes,
                  "tokens per block; a list runs one replay each")
      ->delimiter(',');
  cmd->add_option("--step-ms", opts->step_ms, "trace milliseconds per decode step")
      ->check(kFiniteNumber)
      ->check(CLI::PositiveNumber);
  cmd->add_option("--time-scale", opts->time_scale, "replay the arrivals this many times faster")
      ->check(kFiniteNumber)
      ->check(CLI::PositiveNumber);
  cmd->add_option("--strategy", opts->strategy,
                  "preemption victim: lru, lfu, longest_first, priority");
  cmd->add_option("--watermark", opts->watermark, "fraction of blocks kept free at admission")
      ->check(kFiniteNumber)
      ->check(CLI::Range(0.0, 0.99));
  cmd->add_option("--max-requests", opts->max_requests, "replay only the first N requests");
  cmd->callback([&selected, opts] {
    selected = [opts](nlohmann::json& results) { return run_alloc(*opts, results); };
  });
}

}  // namespace kvfabric::bench
