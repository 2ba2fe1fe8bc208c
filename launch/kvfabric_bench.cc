// kvfabric-bench: the benchmark and trace-replay launcher (`kvfabric-bench <routine> --help`).
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "bench/progress.h"
#include "bench/report.h"
#include "bench/routines.h"
#include "kvfabric/common/logging.h"
#include "kvfabric/common/version.h"

int main(int argc, char** argv) {
  using namespace kvfabric;
  CLI::App app{"kvfabric-bench: benchmarks and trace replays for kvfabric"};
  app.set_version_flag("--version", version_line("kvfabric-bench"));
  app.fallthrough();  // --json, --quiet may follow the routine name
  app.require_subcommand(1);
  std::string json_path;
  app.add_option("--json", json_path, "also write machine-readable results to FILE");
  // Progress goes to stderr and never changes what a routine decides, prints to stdout or writes.
  bench::ProgressSettings progress;
  app.add_flag("--quiet", progress.quiet, "no progress on stderr");
  app.add_option("--progress-interval", progress.line_interval_s,
                 "seconds between progress lines when stderr is not a terminal")
      ->check(bench::kFiniteNumber)
      ->check(CLI::NonNegativeNumber);

  bench::RoutineFn routine;
  bench::add_alloc_routine(app, routine);
  bench::add_kernel_routines(app, routine);
  bench::add_replay_routine(app, routine);
  bench::add_transfer_routine(app, routine);
  bench::add_compress_routine(app, routine);
  bench::add_config_routine(app, routine);
  bench::add_seed_ops_routine(app, routine);
  CLI11_PARSE(app, argc, argv);

  if (const Status log = configure_logging_from_env(); !log.ok()) {
    fmt::print(stderr, "kvfabric-bench: {}\n", log.message());
    return 2;
  }
  if (!json_path.empty()) {
    if (const Status writable = bench::check_json_writable(json_path); !writable.ok()) {
      fmt::print(stderr, "kvfabric-bench: {}\n", writable.to_string());
      return 1;
    }
  }
  bench::set_progress_settings(progress);
  nlohmann::json results;
  Status status;
  try {
    status = routine(results);
  } catch (const std::exception& e) {  // std::bad_alloc for sizes past this machine's memory
    fmt::print(stderr, "kvfabric-bench: the run failed: {} (its sizes may need more memory than "
                       "this machine has)\n", e.what());
    return 1;
  }
  if (status.ok() && !json_path.empty() && !results.is_null())
    status = bench::write_json(json_path, results);
  if (!status.ok()) {
    fmt::print(stderr, "kvfabric-bench: {}\n", status.to_string());
    return 1;
  }
  return 0;
}
