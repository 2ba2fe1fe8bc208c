// kvfabric-bench routines. Each adds its CLI11 subcommand; when that subcommand is parsed it sets
// `selected` to the function that runs it and fills the --json results (left null: nothing to
// write, e.g. on the MPI ranks that do not report).
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <functional>
#include <string>

#include "kvfabric/common/status.h"

namespace kvfabric::bench {

using RoutineFn = std::function<Status(nlohmann::json& results)>;

//! Refuses nan and inf, which CLI11's range checks let through (a comparison with nan is false);
//! check it first: `->check(kFiniteNumber)->check(CLI::PositiveNumber)`.
inline const CLI::Validator kFiniteNumber(
    [](std::string& text) -> std::string {
      double value = 0;
      if (CLI::detail::lexical_cast(text, value) && !std::isfinite(value)) {
        return "Value " + text + " is not a finite number";
      }
      return {};
    },
    "FINITE");

//! `alloc`: replays the Azure code trace through the block manager (utilization, fragmentation,
//! preemptions, operations per second).
void add_alloc_routine(CLI::App& app, RoutineFn& selected);
//! `attention`, `quant`, `copy`: the storage kernels against in-run memcpy / read baselines.
void add_kernel_routines(CLI::App& app, RoutineFn& selected);
//! `replay`: replays a Mooncake trace through the block-granular prefix cache (block and token
//! hit ratios per capacity, evictions, time per request).
void add_replay_routine(CLI::App& app, RoutineFn& selected);
//! `transfer`: MPI block migration bandwidth (exchange_blocks of scattered host blocks) vs raw
//! MPI_Send/MPI_Recv of the same bytes; needs mpirun with >= 2 ranks, only rank 0 reports.
void add_transfer_routine(CLI::App& app, RoutineFn& selected);
//! `seed-ops`: the seed op script through PagedKvCache (ops/s), or written for the Rust seed.
void add_seed_ops_routine(CLI::App& app, RoutineFn& selected);
//! `compress`: attention error, mass kept and memory of token-compression policies (streaming,
//! H2O, SnapKV, PyramidKV) against full attention on synthetic workloads.
void add_compress_routine(CLI::App& app, RoutineFn& selected);
//! `config`: prints the effective config (file + KVF_* overrides) with derived values.
void add_config_routine(CLI::App& app, RoutineFn& selected);

}  // namespace kvfabric::bench
