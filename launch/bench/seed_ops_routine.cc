#include <fmt/format.h>

#include <string>

#include "bench/progress.h"
#include "bench/routines.h"
#include "bench/seed_ops.h"

namespace kvfabric::bench {
namespace {

struct SeedOpsCommand {
  SeedOpOptions options;
  std::string write_path;
  std::string run_path;
};

Status run_seed_ops(const SeedOpsCommand& command, nlohmann::json& results) {
  SeedOpScript script;
  if (!command.run_path.empty()) {
    KVF_ASSIGN_OR_RETURN(script, read_seed_op_script(command.run_path));
  } else {
    script = make_seed_op_script(command.options);
  }
  if (!command.write_path.empty()) {
    KVF_RETURN_IF_ERROR(write_seed_op_script(script, command.write_path));
    fmt::print("seed-ops: wrote {} setup and {} timed operations ({} blocks of {} tokens) to {}\n",
               script.setup.size(), script.timed.size(), script.num_blocks, script.block_size,
               command.write_path);
    return ok_status();
  }
  ProgressReporter reporter("seed-ops", script.timed.size(), "ops");
  KVF_ASSIGN_OR_RETURN(const SeedOpRun run,
                       run_seed_op_script(script, [&](size_t done, size_t) { reporter.update(done); }));
  reporter.finish();
  const double rate = run.seconds > 0 ? static_cast<double>(run.operations) / run.seconds : 0.0;
  fmt::print("kvfabric PagedKvCache: {} live sequences, {} operations in {:.3f} s: {:.2f} M ops/s "
             "({} evictions chose another victim)\n",
             script.setup.size(), run.operations, run.seconds, rate / 1e6, run.evict_mismatches);
  results = {{"routine", "seed-ops"},          {"live", script.setup.size()},
             {"operations", run.operations},   {"seconds", run.seconds},
             {"ops_per_second", rate},         {"evict_mismatches", run.evict_mismatches}};
  return ok_status();
}

}  // namespace

void add_seed_ops_routine(CLI::App& app, RoutineFn& selected) {
  auto command = std::make_shared<SeedOpsCommand>();
  CLI::App* cmd = app.add_subcommand(
      "seed-ops",
      "The seed op script (allocate/append/fork/free/evict) through kvfabric's PagedKvCache; "
      "launch/seed-bench/run compares it with the seed's Rust PagedKvCache");
  cmd->add_option("--live", command->options.live, "live sequences")->check(CLI::Range(1, 10'000'000));
  cmd->add_option("--ops", command->options.operations, "timed operations")
      ->check(CLI::Range(1, 100'000'000));
  cmd->add_option("--block-size", command->options.block_size, "tokens per block")
      ->check(CLI::Range(1, 65536));
  cmd->add_option("--seed", command->options.seed, "generator seed");
  cmd->add_option("--write", command->write_path, "write the script to FILE instead of running it");
  cmd->add_option("--run", command->run_path, "run the script in FILE (as the Rust runner does)");
  cmd->callback([command, &selected] {
    selected = [command](nlohmann::json& results) { return run_seed_ops(*command, results); };
  });
}

}  // namespace kvfabric::bench
