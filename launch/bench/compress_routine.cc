// kvfabric-bench compress: attention quality and memory of the token-compression policies on
// synthetic workloads (compress_sim.h).
#include <fmt/format.h>

#include <memory>
#include <string>
#include <vector>

#include "bench/compress_sim.h"
#include "bench/progress.h"
#include "bench/report.h"
#include "bench/routines.h"

namespace kvfabric::bench {
namespace {

struct CompressCommandOptions {
  CompressOptions sim;
  std::vector<std::string> workloads = {"planted", "power-law"};
  std::vector<std::string> policies = {"full", "streaming", "h2o", "snapkv", "pyramid"};
};

Status parse_names(CompressCommandOptions& cmd) {
  cmd.sim.workloads.clear();
  for (const auto& name : cmd.workloads) {
    KVF_ASSIGN_OR_RETURN(const CompressWorkload w, parse_compress_workload(name));
    cmd.sim.workloads.push_back(w);
  }
  cmd.sim.policies.clear();
  for (const auto& name : cmd.policies) {
    KVF_ASSIGN_OR_RETURN(const CompressPolicy p, parse_compress_policy(name));
    cmd.sim.policies.push_back(p);
  }
  return ok_status();
}

std::string mib(uint64_t bytes) {
  return fmt::format("{:.1f}", static_cast<double>(bytes) / (1024.0 * 1024.0));
}

std::string print_table(const std::vector<CompressPoint>& points) {
  Table table({"workload", "policy", "budget", "tokens", "rel_error", "mass_kept", "saved",
               "KV MiB f16", "planted_kept", "select_ms"});
  for (const CompressPoint& p : points) {
    table.add_row({std::string(workload_name(p.workload)), std::string(policy_name(p.policy)),
                   format_percent(p.budget, 0), fmt::format("{:.0f}", p.kept_tokens),
                   fmt::format("{:.4f}", p.relative_error), format_percent(p.mass_kept),
                   format_percent(p.memory_saved), mib(p.kv_bytes_f16),
                   p.planted_kept >= 0 ? format_percent(p.planted_kept) : "-",
                   fmt::format("{:.2f}", p.selection_seconds * 1e3)});
  }
  return table.to_string();
}

Status run_compress(CompressCommandOptions cmd, nlohmann::json& results) {
  KVF_RETURN_IF_ERROR(parse_names(cmd));
  const CompressOptions& o = cmd.sim;
  KVF_RETURN_IF_ERROR(check_compress_options(o));
  fmt::print(
      "compress: {} prompt tokens + {} decode steps, {} layers x {} heads x head_dim {}, seed {}\n",
      o.tokens, o.decode_steps, o.layers, o.heads, o.head_dim, o.seed);
  ProgressReporter reporter("compress", o.workloads.size() * o.layers, "layers");
  KVF_ASSIGN_OR_RETURN(const std::vector<CompressPoint> points,
                       run_compress_sim(o, [&](size_t done, size_t) { reporter.update(done); }));
  reporter.finish();
  fmt::print("\n{}", print_table(points));
  fmt::print(
      "budget = most tokens held at any step, of the T + D the full cache ends with; rel_error = "
      "decode attention output over the held tokens vs all tokens (L2, all steps, heads, layers);"
      "\nmass_kept = the held tokens' share of the full softmax; saved = 1 - held / (T + D) after "
      "the last step; select_ms = time in the selection calls.\n");
  results = compress_json(o, points);
  return ok_status();
}

}  // namespace

void add_compress_routine(CLI::App& app, RoutineFn& selected) {
  auto cmd = std::make_shared<CompressCommandOptions>();
  CompressOptions& o = cmd->sim;
  CLI::App* sub = app.add_subcommand(
      "compress", "Attention error and memory of token-compression policies (synthetic)");
  sub->add_option("--tokens", o.tokens, "prompt tokens T");
  sub->add_option("--heads", o.heads, "attention heads per layer");
  sub->add_option("--head-dim", o.head_dim, "head dimension");
  sub->add_option("--decode-steps", o.decode_steps, "decode steps D after the prompt");
  sub->add_option("--layers", o.layers,
                  "layers of the synthetic model (deeper = more concentrated attention)");
  sub->add_option("--seed", o.seed, "seed of the synthetic K, V and queries");
  sub->add_option("--budgets", o.budgets, "tokens held, as fractions of T + D (comma separated)")
      ->delimiter(',');
  sub->add_option("--workloads", cmd->workloads, "planted, power-law (comma separated)")
      ->delimiter(',');
  sub->add_option("--policies", cmd->policies,
                  "full, streaming, h2o, snapkv, pyramid (comma separated)")
      ->delimiter(',');
  sub->callback([&selected, cmd] {
    selected = [cmd](nlohmann::json& results) { return run_compress(*cmd, results); };
  });
}

}  // namespace kvfabric::bench
