#include "bench/mpi_job.h"

#include <fmt/format.h>

#include <cstdlib>

namespace kvfabric::bench {

bool under_mpi_launcher() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

Result<std::unique_ptr<MpiPlanJob>> MpiPlanJob::launch(const TopologyConfig& topology) {
  if (!under_mpi_launcher() || !mpi_transport_built()) return std::unique_ptr<MpiPlanJob>();
  KVF_ASSIGN_OR_RETURN(MpiRuntime runtime, MpiRuntime::init(nullptr, nullptr));
  const uint32_t world = topology.dp * topology.tp;
  if (runtime.world_size() != static_cast<int>(world)) {
    return invalid_argument(fmt::format("dp {} x tp {} needs {} MPI ranks, this job has {}",
                                        topology.dp, topology.tp, world, runtime.world_size()));
  }
  std::unique_ptr<MpiPlanJob> job(new MpiPlanJob(std::move(runtime)));
  KVF_ASSIGN_OR_RETURN(job->transport_, make_mpi_transport(job->mpi_));
  KVF_ASSIGN_OR_RETURN(job->backend_, make_cpu_backend(CpuBackendOptions{best_cpu_isa(), 1}));
  return job;
}

Status MpiPlanJob::start(const Config& config) {
  ranks_.reset();  // its arenas go before the next ones are allocated
  KVF_ASSIGN_OR_RETURN(ranks_, RankJob::create(config, *transport_, *backend_));
  return ok_status();
}

}  // namespace kvfabric::bench
