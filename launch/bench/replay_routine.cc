#include <fmt/format.h>

#include <memory>
#include <string>
#include <vector>

#include "bench/cluster_routine.h"
#include "bench/progress.h"
#include "bench/replay_sim.h"
#include "bench/report.h"
#include "bench/routines.h"
#include "bench/trace.h"

namespace kvfabric::bench {
namespace {

struct ReplayCommandOptions {
  std::string trace_path;  // empty: the embedded Mooncake conversation trace
  uint32_t block_tokens = 512;
  std::vector<uint64_t> capacities = {0};
  std::string policy = "lru";
  bool full_blocks_only = false;
  size_t max_requests = 0;
  uint32_t trace_copies = 1;
  // Across replicas (--dp > 1).
  ClusterCommand cluster;
  std::string routings = "independent,global-routing,global-migration";
  std::vector<std::string> compressions = {"none"};
  bool capacity_given = false;
  //! An option of the replay across replicas was given (--tp, --routing, --config, ...): the run
  //! is that replay even with --dp 1, not the single-process one, which would ignore them (and,
  //! under mpirun, run once per rank).
  bool across_given = false;
};

Status run_replay_across_replicas(ReplayCommandOptions opts, const std::vector<MooncakeRequest>& trace,
                                  const std::string& trace_name, nlohmann::json& results) {
  ClusterCommand& command = opts.cluster;
  if (opts.capacity_given) {
    if (opts.capacities.size() != 1 || opts.capacities[0] == 0) {
      return invalid_argument("with --dp, give one --capacity-tokens > 0 (the device KV of all replicas together)");
    }
    command.sim.capacity_tokens = opts.capacities[0];
  }
  command.sim.block_tokens = opts.block_tokens;
  command.sim.max_requests = opts.max_requests;
  KVF_ASSIGN_OR_RETURN(command.routings, parse_cluster_routings(opts.routings));
  command.compressions.clear();
  command.compression_names.clear();
  for (const std::string& spec : opts.compressions) {
    KVF_ASSIGN_OR_RETURN(auto policy, parse_compression_spec(spec));
    command.compressions.push_back(policy);
    command.compression_names.push_back(spec);
  }
  return run_cluster_command(command, trace, trace_name, results);
}

Status run_replay(const ReplayCommandOptions& opts, nlohmann::json& results) {
  std::string text_storage;
  std::string_view text = embedded_mooncake_conversation_trace();
  std::string trace_name = "conversation_trace.jsonl (embedded)";
  if (!opts.trace_path.empty()) {
    KVF_ASSIGN_OR_RETURN(text_storage, read_text_file(opts.trace_path, "trace file", kAnyTraceSize));
    text = text_storage;
    trace_name = opts.trace_path;
  }
  KVF_ASSIGN_OR_RETURN(std::vector<MooncakeRequest> trace, parse_mooncake_trace(text, trace_name));
  if (opts.trace_copies > 1) {
    trace = scale_out_trace(trace, opts.trace_copies);
    trace_name += fmt::format(" x {} copies", opts.trace_copies);
  }
  if (opts.cluster.sim.config.topology.dp > 1 || opts.across_given) {
    return run_replay_across_replicas(opts, trace, trace_name, results);
  }
  ReplaySimOptions sim;
  sim.block_tokens = opts.block_tokens;
  sim.partial_blocks = !opts.full_blocks_only;
  sim.max_requests = opts.max_requests;
  if (opts.policy == "lru") {
    sim.policy = RadixEvictionOrder::kLru;
  } else if (opts.policy == "priority") {
    sim.policy = RadixEvictionOrder::kPriority;
  } else {
    return invalid_argument("--policy must be lru or priority (got '" + opts.policy + "')");
  }
  const size_t requests =
      opts.max_requests ? std::min(opts.max_requests, trace.size()) : trace.size();
  fmt::print("replay: {} requests from {}, {}-token blocks, {} eviction, {}\n", requests,
             trace_name, opts.block_tokens, opts.policy,
             opts.full_blocks_only ? "full blocks only" : "partly filled last blocks cached too");

  results["routine"] = "replay";
  results["trace"] = trace_name;
  results["requests"] = requests;
  results["options"] = {{"block_tokens", opts.block_tokens},
                        {"policy", opts.policy},
                        {"full_blocks_only", opts.full_blocks_only}};
  results["runs"] = nlohmann::json::array();

  Table table({"capacity_tokens", "blocks", "block_hit", "token_hit", "ideal_block_hit",
               "evicted_blocks", "us/request", "p50_us", "p99_us", "unfit"});
  for (uint64_t capacity : opts.capacities) {
    sim.capacity_tokens = capacity;
    ProgressReporter reporter(
        fmt::format("replay {}", capacity == 0 ? "unlimited" : format_count(capacity)), requests,
        "requests");
    auto progress = [&](const ReplaySimProgress& p) {
      reporter.update(p.done, [&] { return fmt::format("block hit {:.4f}", p.block_hit_ratio); });
    };
    KVF_ASSIGN_OR_RETURN(const ReplaySimResult r, run_replay_sim(trace, sim, progress));
    reporter.finish();
    if (r.leaked_blocks != 0) {
      return Status(ErrorCode::kInternal,
                    fmt::format("{} blocks not free after the replay", r.leaked_blocks));
    }
    table.add_row({capacity == 0 ? "unlimited" : std::to_string(capacity),
                   std::to_string(r.pool_blocks), fmt::format("{:.4f}", r.block_hit_ratio),
                   fmt::format("{:.4f}", r.token_hit_ratio),
                   fmt::format("{:.4f}", r.ideal_block_hit_ratio), std::to_string(r.evicted_blocks),
                   fmt::format("{:.2f}", r.mean_us), fmt::format("{:.2f}", r.p50_us),
                   fmt::format("{:.2f}", r.p99_us), std::to_string(r.unfit_requests)});
    results["runs"].push_back({{"capacity_tokens", capacity},
                               {"pool_blocks", r.pool_blocks},
                               {"requests", r.requests},
                               {"unfit_requests", r.unfit_requests},
                               {"block_refs", r.block_refs},
                               {"hit_blocks", r.hit_blocks},
                               {"prompt_tokens", r.prompt_tokens},
                               {"hit_tokens", r.hit_tokens},
                               {"block_hit_ratio", r.block_hit_ratio},
                               {"token_hit_ratio", r.token_hit_ratio},
                               {"ideal_block_hit_ratio", r.ideal_block_hit_ratio},
                               {"evictions", r.evictions},
                               {"evicted_blocks", r.evicted_blocks},
                               {"inserted_blocks", r.inserted_blocks},
                               {"final_cached_blocks", r.final_cached_blocks},
                               {"mean_us_per_request", r.mean_us},
                               {"p50_us_per_request", r.p50_us},
                               {"p99_us_per_request", r.p99_us},
                               {"wall_seconds", r.wall_seconds}});
  }
  fmt::print("\n{}", table.to_string());
  fmt::print(
      "block_hit = prompt blocks served from the cache / prompt blocks (the leading run of "
      "cached blocks);\ntoken_hit = prompt tokens served / prompt tokens; ideal_block_hit = hash "
      "ids seen before, from the ids alone (unlimited cache);\nus/request = wall time of the "
      "prefix cache's allocate (match + share + new blocks, eviction included) and insert.\n");
  return ok_status();
}

}  // namespace

void add_replay_routine(CLI::App& app, RoutineFn& selected) {
  auto opts = std::make_shared<ReplayCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "replay", "Replay a Mooncake trace through the block-granular prefix cache");
  cmd->add_option("--trace", opts->trace_path,
                  "Mooncake JSON-lines trace (default: embedded conversation trace)");
  cmd->add_option("--block-tokens", opts->block_tokens,
                  "tokens per trace block (hash id) and per cache block")
      ->check(CLI::Range(1u, 65536u));
  cmd->add_option("--capacity-tokens", opts->capacities,
                  "cache size in tokens, 0 = unlimited; a list runs one replay each (with --dp: one "
                  "size, the device KV of all replicas together; default 1Mi)")
      ->delimiter(',')
      ->each([opts](const std::string&) { opts->capacity_given = true; });
  cmd->add_option("--policy", opts->policy, "eviction: lru or priority")
      ->check(CLI::IsMember({"lru", "priority"}));
  cmd->add_flag("--full-blocks-only", opts->full_blocks_only,
                "cache full blocks only (the last, partly filled block of a prompt is not cached)");
  cmd->add_option("--max-requests", opts->max_requests, "replay only the first N requests");
  cmd->add_option("--trace-copies", opts->trace_copies,
                  "replay this many copies of the trace at once (disjoint hash ids, arrivals "
                  "interleaved): more users for more replicas")
      ->check(CLI::Range(1u, 100000u));
  ClusterReplayOptions& sim = opts->cluster.sim;
  auto* across = "Across replicas";
  cmd->add_option("--dp", sim.config.topology.dp,
                  "replicas: above 1, a serving loop through the Coordinator compares routings "
                  "(run it under mpirun with dp x tp ranks to execute every plan)")
      ->check(CLI::Range(1u, 1024u))
      ->group(across)
      ->each([opts](const std::string&) { opts->across_given = true; });
  cmd->add_option("--tp", sim.config.topology.tp, "shards per replica (with --dp)")
      ->check(CLI::Range(1u, 64u))
      ->group(across)
      ->each([opts](const std::string&) { opts->across_given = true; });
  cmd->add_option("--routing", opts->routings,
                  "routings to compare: independent, global-routing, global-migration (a list)")
      ->group(across)
      ->each([opts](const std::string&) { opts->across_given = true; });
  cmd->add_option("--host-capacity-tokens", sim.host_capacity_tokens,
                  "host (swap) tier tokens of all replicas together")
      ->group(across)
      ->each([opts](const std::string&) { opts->across_given = true; });
  cmd->add_option("--step-ms", sim.step_ms, "trace milliseconds per serving step (one decoded token)")
      ->check(kFiniteNumber)
      ->check(CLI::PositiveNumber)
      ->group(across)
      ->each([opts](const std::string&) { opts->across_given = true; });
  cmd->add_option("--time-scale", sim.time_scale, "arrivals this many times faster than recorded")
      ->check(kFiniteNumber)
      ->check(CLI::PositiveNumber)
      ->group(across)
      ->each([opts](const std::string&) { opts->across_given = true; });
  cmd->add_option("--max-output-tokens", sim.max_output_tokens, "cap each request's output (0 = as traced)")
      ->group(across)
      ->each([opts](const std::string&) { opts->across_given = true; });
  cmd->add_option("--compression", opts->compressions,
                  "token compression of every request: none, or KIND[:KEY=VALUE,...] with KIND "
                  "streaming, h2o or snapkv and KEY tokens, ratio, interval, sink, recent, window "
                  "(e.g. h2o:ratio=0.25,interval=16); given twice or ';'-separated, one replay each")
      ->delimiter(';')
      ->group(across)
      ->each([opts](const std::string&) { opts->across_given = true; });
  cmd->add_option("--config", opts->cluster.config_path,
                  "YAML config for the model shape and KV dtype (default: a 2-layer model, 1 KiB/token)")
      ->group(across)
      ->each([opts](const std::string&) { opts->across_given = true; });
  cmd->callback([&selected, opts] {
    selected = [opts](nlohmann::json& results) { return run_replay(*opts, results); };
  });
}

}  // namespace kvfabric::bench
