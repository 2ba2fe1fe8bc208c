// `kvfabric-bench replay --dp N`: the cluster replay's command (routing modes side by side, the
// plans executed by the MPI ranks when run under mpirun).
#pragma once

#include <nlohmann/json.hpp>

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
};

//! Parses "independent,global-routing,global-migration" (any subset, in any order).
Result<std::vector<ClusterRouting>> parse_cluster_routings(const std::string& list);

//! Runs every routing of `command` on `trace`; under mpirun with dp x tp ranks the ranks hold
//! the KV caches and execute every plan (rank 0 coordinates and reports), otherwise the
//! coordinator runs alone. Results go to `results` on rank 0 (null elsewhere); so does the
//! progress display (progress.h).
Status run_cluster_command(const ClusterCommand& command, const std::vector<MooncakeRequest>& trace,
                           const std::string& trace_name, nlohmann::json& results);

}  // namespace kvfabric::bench
