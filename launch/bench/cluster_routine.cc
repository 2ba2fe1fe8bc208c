#include "bench/cluster_routine.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <iterator>
#include <sstream>
#include <string_view>
#include <utility>

#include "bench/progress.h"
#include "bench/report.h"
#include "kvfabric/runtime/mpi_job.h"

namespace kvfabric::bench {
namespace {

std::string gib(uint64_t bytes) {
  return fmt::format("{:.2f}", static_cast<double>(bytes) / (1u << 30));
}

void print_summary(const std::vector<ClusterReplayResult>& runs) {
  const ClusterReplayResult* base = nullptr;
  const ClusterReplayResult* best = nullptr;
  for (const auto& r : runs) {
    if (r.routing == ClusterRouting::kIndependent) base = &r;
    if (r.routing == ClusterRouting::kGlobalMigration) best = &r;
  }
  if (base == nullptr || best == nullptr || base->prefill_tokens == 0) return;
  fmt::print(
      "\nWith one global prefix view and migration, the {} replicas served {} of prompt tokens "
      "from cache\n(independent caches: {}), computed {} fewer prefill tokens ({} vs {}), and "
      "moved {} GiB of KV between replicas.\nThe coordinator spent {:.2f} us per admission "
      "(p99 {:.2f} us).\n",
      best->admitted_per_replica.size(), format_percent(best->hit_ratio),
      format_percent(base->hit_ratio),
      format_percent(1.0 - static_cast<double>(best->prefill_tokens) /
                               static_cast<double>(base->prefill_tokens)),
      format_count(static_cast<double>(best->prefill_tokens)),
      format_count(static_cast<double>(base->prefill_tokens)), gib(best->migrated_bytes),
      best->admit_mean_us, best->admit_p99_us);
}

// Waiting requests per bucket: three decimals of the means (and the integer maxima) are plenty
// for a figure and keep the JSON small.
nlohmann::json queue_length_json(const ClusterReplayResult& r) {
  nlohmann::json mean = nlohmann::json::array(), max = nlohmann::json::array();
  for (double m : r.queue_mean) mean.push_back(std::round(m * 1000) / 1000);
  for (double m : r.queue_max) max.push_back(static_cast<uint64_t>(m));
  return {{"steps_per_point", r.queue_steps_per_point}, {"mean", mean}, {"max", max}};
}

}  // namespace

Result<std::vector<ClusterRouting>> parse_cluster_routings(const std::string& list) {
  std::vector<ClusterRouting> out;
  std::stringstream in(list);
  std::string name;
  while (std::getline(in, name, ',')) {
    std::optional<ClusterRouting> found;
    for (auto r : {ClusterRouting::kIndependent, ClusterRouting::kGlobalRouting,
                   ClusterRouting::kGlobalMigration}) {
      if (name == cluster_routing_name(r)) found = r;
    }
    if (!found) {
      return invalid_argument("unknown routing '" + name +
                              "' (independent, global-routing or global-migration)");
    }
    out.push_back(*found);
  }
  if (out.empty()) return invalid_argument("no routing given");
  return out;
}

Result<std::optional<quant::CompressionPolicy>> parse_compression_spec(const std::string& spec) {
  if (spec == "none") return std::optional<quant::CompressionPolicy>();
  const size_t colon = spec.find(':');
  quant::CompressionPolicy policy;
  KVF_ASSIGN_OR_RETURN(policy.kind, quant::parse_compression_kind(spec.substr(0, colon)));
  std::stringstream in(colon == std::string::npos ? "" : spec.substr(colon + 1));
  // The spec's short keys, for the policy's fields.
  constexpr std::pair<std::string_view, std::string_view> kFields[] = {
      {"tokens", "budget_tokens"}, {"ratio", "budget_ratio"},   {"interval", "interval_steps"},
      {"sink", "sink_tokens"},     {"recent", "recent_tokens"}, {"window", "window_tokens"},
      {"beta", "beta"}};
  std::string pair;
  while (std::getline(in, pair, ',')) {
    const size_t eq = pair.find('=');
    const std::string key = pair.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : pair.substr(eq + 1);
    const auto* field = std::find_if(std::begin(kFields), std::end(kFields),
                                     [&](const auto& f) { return f.first == key; });
    if (field == std::end(kFields)) {
      return invalid_argument("--compression '" + spec + "': unknown key '" + key +
                              "' (tokens, ratio, interval, sink, recent, window, beta)");
    }
    char* end = nullptr;
    const double number = std::strtod(value.c_str(), &end);
    if (value.empty() || end != value.c_str() + value.size()) {
      return invalid_argument("--compression '" + spec + "': " + key + "=" + value +
                              " is not a number");
    }
    const Status set = quant::set_compression_field(policy, field->second, number);
    if (!set.ok()) {
      return invalid_argument("--compression '" + spec + "': " + key + "=" + value + ": " +
                              set.message());
    }
  }
  const Status valid = quant::validate(policy);
  if (!valid.ok()) return invalid_argument("--compression '" + spec + "': " + valid.message());
  return std::optional(policy);
}

Status run_cluster_command(const ClusterCommand& command, const std::vector<MooncakeRequest>& trace,
                           const std::string& trace_name, nlohmann::json& results) {
  ClusterReplayOptions sim = command.sim;
  Config model = cluster_replay_model();
  if (!command.config_path.empty()) {
    KVF_ASSIGN_OR_RETURN(model, load_config_file(command.config_path));
  } else {
    model.cache.num_blocks = 1;  // a valid config until cluster_replay_config sizes each run's
  }
  // The built-in model too: without --config, KVF_RUNTIME_BACKEND=cuda (say) was ignored and the
  // ranks ran on whatever auto picked.
  KVF_RETURN_IF_ERROR(apply_env_overrides(model));
  model.topology = sim.config.topology;
  sim.config = model;

  // Under mpirun the ranks hold the caches and execute the plans; otherwise the coordinator
  // runs alone and nothing moves.
  KVF_ASSIGN_OR_RETURN(const std::unique_ptr<MpiJob> job, MpiJob::launch(sim.config));
  const bool root = !job || job->transport().rank().value == 0;
  std::vector<std::string> placements;  // every rank's, at rank 0
  if (job) {
    KVF_ASSIGN_OR_RETURN(placements, job->gather_placements());
  }
  if (root) {
    KVF_ASSIGN_OR_RETURN(const Config shown,
                         cluster_replay_config(sim, ClusterRouting::kGlobalMigration));
    fmt::print(
        "replay across replicas: {} requests from {}, dp {} x tp {}, {}-token blocks, {} tokens "
        "of device KV in all ({} per replica), {} host tokens, {} ms per step{}\n",
        sim.max_requests ? std::min(sim.max_requests, trace.size()) : trace.size(), trace_name,
        shown.topology.dp, shown.topology.tp, sim.block_tokens,
        format_count(static_cast<double>(sim.capacity_tokens)),
        format_count(static_cast<double>(shown.cache.num_blocks * sim.block_tokens)),
        format_count(static_cast<double>(sim.host_capacity_tokens)), sim.step_ms,
        job ? fmt::format(", plans executed by {} MPI ranks (rank 0: {}; model {})",
                          job->transport().world_size(), placements.front(), shown.model.name)
                  : ", coordinator only (no MPI launcher: no KV moves)");
    results["routine"] = "replay";
    results["trace"] = trace_name;
    results["dp"] = shown.topology.dp;
    results["tp"] = shown.topology.tp;
    results["mpi_ranks"] = job ? job->transport().world_size() : 0;
    results["rank_placements"] = placements;
    results["block_tokens"] = sim.block_tokens;
    results["capacity_tokens"] = sim.capacity_tokens;
    results["host_capacity_tokens"] = sim.host_capacity_tokens;
    results["step_ms"] = sim.step_ms;
    results["time_scale"] = sim.time_scale;
    results["runs"] = nlohmann::json::array();
  }

  std::vector<ClusterReplayResult> runs;
  std::vector<std::string> run_compressions;  // each run's compression, as given
  for (size_t c = 0; c < command.compressions.size(); ++c) {
  sim.compression = command.compressions[c];
  for (ClusterRouting routing : command.routings) {
    KVF_ASSIGN_OR_RETURN(const Config config, cluster_replay_config(sim, routing));
    if (job) {
      if (const Status started = job->start(config); !started.ok()) {
        // A rank's own failure (its arenas, say): returning would leave the other ranks waiting
        // for it until the transport's deadline, and this rank's MPI_Finalize waiting for them,
        // its message unprinted meanwhile. Say which rank and why, and end the job now.
        fmt::print(stderr, "kvfabric-bench: {}: {}\n", job->who(), started.to_string());
        std::fflush(stderr);
        job->abort(1);
      }
    }
    RankJob* const ranks = job ? &job->ranks() : nullptr;
    if (ranks) ranks->set_forward_pass(synthetic_forward_pass);
    if (!root) {
      KVF_RETURN_IF_ERROR(ranks->serve());
      KVF_RETURN_IF_ERROR(ranks->received_blocks());
      continue;
    }
    PlanExecutor execute;
    if (ranks) {
      execute = [&](const StepPlan& plan) -> Result<std::vector<ReplicaScores>> {
        KVF_RETURN_IF_ERROR(ranks->execute(plan));
        return ranks->cache().reported_scores();
      };
    }
    const size_t requests = sim.max_requests ? std::min(sim.max_requests, trace.size()) : trace.size();
    ProgressReporter reporter(fmt::format("replay {}", cluster_routing_name(routing)), requests,
                              "requests");
    auto progress = [&](const ClusterReplayProgress& p) {
      reporter.update(p.finished,
                      [&] { return fmt::format("step {}, {} waiting", p.step, p.waiting); });
    };
    auto r = run_cluster_replay(trace, sim, routing, execute, progress);
    reporter.finish();
    if (ranks && r.ok()) {
      // What the ranks sent for the score requests, as each counted it.
      r->score_bytes = 0;
      for (const RankCacheStats& s : ranks->rank_stats()) r->score_bytes += s.scores_sent * sizeof(float);
    }
    if (ranks) {
      // The other ranks wait for the end of the run whatever happened here.
      KVF_RETURN_IF_ERROR(ranks->finish());
      KVF_ASSIGN_OR_RETURN(const std::vector<uint64_t> received, ranks->received_blocks());
      KVF_RETURN_IF_ERROR(r.status());
      uint64_t total = 0;
      for (uint64_t b : received)
        total += b;
      // Every migrated block arrived once on each of the tp shards of its destination.
      if (total != r->migrated_blocks * config.topology.tp) {
        return Status(
            ErrorCode::kInternal,
            fmt::format("the ranks received {} migrated blocks, the coordinator planned {}", total,
                        r->migrated_blocks * config.topology.tp));
      }
      fmt::print("[{}] {} ranks executed {} step plans; the {} migrated blocks arrived as planned\n",
                 cluster_routing_name(routing), ranks->world_size(), r->steps, total);
    }
    KVF_RETURN_IF_ERROR(r.status());
    runs.push_back(*r);
    run_compressions.push_back(command.compression_names[c]);
    results["runs"].push_back({{"routing", cluster_routing_name(routing)},
                               {"compression", command.compression_names[c]},
                               {"requests", r->requests},
                               {"unfit_requests", r->unfit_requests},
                               {"steps", r->steps},
                               {"admissions", r->admissions},
                               {"readmissions", r->readmissions},
                               {"prompt_tokens", r->prompt_tokens},
                               {"local_hit_tokens", r->local_hit_tokens},
                               {"migrated_tokens", r->migrated_tokens},
                               {"prefill_tokens", r->prefill_tokens},
                               {"prefill_tokens_saved", r->prompt_tokens - r->prefill_tokens},
                               {"hit_ratio", r->hit_ratio},
                               {"migrated_blocks", r->migrated_blocks},
                               {"migrated_bytes", r->migrated_bytes},
                               {"swapped_out", r->swapped_out},
                               {"swapped_in", r->swapped_in},
                               {"parked", r->parked},
                               {"preempted", r->preempted},
                               {"mean_queue_steps", r->mean_queue_steps},
                               {"max_waiting", r->max_waiting},
                               {"queue_length", queue_length_json(*r)},
                               {"admitted_per_replica", r->admitted_per_replica},
                               {"admit_mean_us", r->admit_mean_us},
                               {"admit_p50_us", r->admit_p50_us},
                               {"admit_p99_us", r->admit_p99_us},
                               {"admit_quantiles_us",
                                {{"p50", r->admit_p50_us},
                                 {"p90", r->admit_p90_us},
                                 {"p99", r->admit_p99_us},
                                 {"p99.9", r->admit_p999_us},
                                 {"max", r->admit_max_us}}},
                               {"admit_histogram",
                                {{"edges_us", r->admit_histogram_edges_us},
                                 {"counts", r->admit_histogram}}},
                               {"matched_memcpy_us", r->matched_memcpy_us},
                               {"admissions_per_second",
                                r->admit_mean_us > 0 ? 1e6 / r->admit_mean_us : 0.0},
                               {"coordinator_bytes", r->coordinator_bytes},
                               {"index_nodes", r->index_nodes},
                               {"coordinator_us_per_request", r->coordinator_us_per_request},
                               {"executor_seconds", r->executor_seconds},
                               {"wall_seconds", r->wall_seconds},
                               {"kv_tokens_per_sequence", r->kv_tokens_per_sequence},
                               {"decode_context_tokens_per_step", r->decode_context_tokens_per_step},
                               {"compactions", r->compactions},
                               {"compacted_tokens", r->compacted_tokens},
                               {"compressed_hits", r->compressed_hits},
                               {"compaction_copied_tokens", r->compaction_copied_tokens},
                               {"score_requests", r->score_requests},
                               {"score_bytes", r->score_bytes}});
  }
  }
  if (!root) {
    results = nullptr;
    return ok_status();
  }
  const bool compressing = command.compressions.size() > 1 || command.compressions[0].has_value();
  std::vector<std::string> columns = {"routing", "hit_ratio", "prefill_tokens", "saved",
                                      "migrated_GiB", "swap_out/in", "parked", "preempted",
                                      "queue_steps", "admit_us", "admit_p99", "memcpy_us",
                                      "coord_us/req", "coord_MiB", "wall_s"};
  if (compressing) {
    columns.insert(columns.begin(), "compression");
    columns.insert(columns.end(), {"kv_tok/seq", "compactions", "shared", "copied_tok",
                                   "score_MiB", "exec_s"});
  }
  Table table(columns);
  for (size_t i = 0; i < runs.size(); ++i) {
    const ClusterReplayResult& r = runs[i];
    std::vector<std::string> row = {std::string(cluster_routing_name(r.routing)), fmt::format("{:.4f}", r.hit_ratio),
                   format_count(static_cast<double>(r.prefill_tokens)),
                   format_count(static_cast<double>(r.prompt_tokens - r.prefill_tokens)),
                   gib(r.migrated_bytes), fmt::format("{}/{}", r.swapped_out, r.swapped_in),
                   std::to_string(r.parked), std::to_string(r.preempted),
                   fmt::format("{:.1f}", r.mean_queue_steps),
                   fmt::format("{:.2f}", r.admit_mean_us), fmt::format("{:.2f}", r.admit_p99_us),
                   fmt::format("{:.2f}", r.matched_memcpy_us),
                   fmt::format("{:.1f}", r.coordinator_us_per_request),
                   fmt::format("{:.0f}", static_cast<double>(r.coordinator_bytes) / (1 << 20)),
                   fmt::format("{:.1f}", r.wall_seconds)};
    if (compressing) {
      row.insert(row.begin(), run_compressions[i]);
      row.insert(row.end(),
                 {fmt::format("{:.0f}", r.kv_tokens_per_sequence), std::to_string(r.compactions),
                  std::to_string(r.compressed_hits),
                  format_count(static_cast<double>(r.compaction_copied_tokens)),
                  fmt::format("{:.1f}", static_cast<double>(r.score_bytes) / (1 << 20)),
                  fmt::format("{:.2f}", r.executor_seconds)});
    }
    table.add_row(row);
  }
  fmt::print("\n{}", table.to_string());
  fmt::print(
      "hit_ratio = prompt tokens found cached on the chosen replica or migrated to it / prompt "
      "tokens "
      "admitted;\nprefill_tokens = prompt tokens computed (re-admissions after preemption "
      "included); "
      "admit_us = wall time of\nCoordinator::admit (global lookup, placement, allocation); "
      "memcpy_us = a memcpy of the prompt tokens it found\ncached (what reading them once costs); "
      "coord_us/req = every coordinator call (admit, append per decoded\ntoken, free, step) per "
      "request; coord_MiB = the coordinator's bookkeeping at the end.\n");
  if (compressing) {
    fmt::print(
        "kv_tok/seq = KV tokens a running sequence holds, averaged over steps (what its decode "
        "attention reads);\nshared = admissions served an identical SnapKV request's kept "
        "prompt; copied_tok = tokens the compactions' copy ops moved (per shard);\n"
        "score_MiB = attention scores the shards sent\nfor the score requests (counted by the "
        "ranks under mpirun); exec_s = wall time of the ranks' plan execution and\nof their "
        "stand-in forward pass, which scores the requested sequences with a synthetic "
        "heavy-tailed attention mass:\nthese runs show memory and plan costs, not quality.\n");
  }
  // The summary compares routings without compression (or with the first one given).
  std::vector<ClusterReplayResult> first;
  for (size_t i = 0; i < runs.size(); ++i) {
    if (run_compressions[i] == command.compression_names.front()) first.push_back(runs[i]);
  }
  print_summary(first);
  return ok_status();
}

}  // namespace kvfabric::bench
