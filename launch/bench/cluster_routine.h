// `kvfabric-bench replay --dp N`: the cluster replay's command (routing modes side by side, the
// plans executed by the MPI ranks when run under mpirun).
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

#include "bench/cluster_replay.h"

namespace kvfabric::bench {

struct ClusterCommand {
  ClusterReplayOptions sim;
  std::string config_path;  //!< model shape and KV dtype; empty = a small built-in model
  std::vector<ClusterRouting> routings = {ClusterRouting::kIndependent,
                                          ClusterRouting::kGlobalRouting,
                                          ClusterRouting::kGlobalMigration};
  //! Token compression of every request, one replay per entry and routing (nullopt: none),
  //! with the text each was given as.
  std::vector<std::optional<quant::CompressionPolicy>> compressions = {std::nullopt};
  std::vector<std::string> compression_names = {"none"};
};

//! Parses a compression spec: "none", or KIND[:KEY=VALUE,...] with KIND streaming, h2o or snapkv
//! and KEY tokens (the budget), ratio (the budget as a share of the prompt), interval, sink,
//! recent, window, e.g. "h2o:ratio=0.25,interval=16". Errors name the key or value; the policy
//! is validated as admit() would.
Result<std::optional<quant::CompressionPolicy>> parse_compression_spec(const std::string& spec);

//! Parses "independent,global-routing,global-migration" (any subset, in any order).
Result<std::vector<ClusterRouting>> parse_cluster_routings(const std::string& list);

//! Runs every routing of `command` on `trace`; under mpirun with dp x tp ranks the ranks hold
//! the KV caches and execute every plan (rank 0 coordinates and reports), otherwise the
//! coordinator runs alone. Results go to `results` on rank 0 (null elsewhere); so does the
//! progress display (progress.h).
Status run_cluster_command(const ClusterCommand& command, const std::vector<MooncakeRequest>& trace,
                           const std::string& trace_name, nlohmann::json& results);

}  // namespace kvfabric::bench
