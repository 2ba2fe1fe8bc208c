#include "bench/plan_executors.h"

#include <fmt/format.h>

#include <cstdlib>

namespace kvfabric::bench {

bool under_mpi_launcher() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

Status PlanExecutors::start(const Config& config) {
  KVF_ASSIGN_OR_RETURN(
      cache_, RankCache::create(config, static_cast<uint32_t>(transport_->rank().value), *backend_,
                                *transport_));
  return ok_status();
}

Status PlanExecutors::broadcast_and_execute(const StepPlan& plan) {
  std::vector<uint8_t> bytes = plan.serialize();
  KVF_RETURN_IF_ERROR(transport_->broadcast(bytes, RankId{0}));
  return cache_->execute_agreed(bytes, RankId{0});
}

Status PlanExecutors::finish() {
  std::vector<uint8_t> none;  // a plan is never empty: it carries at least its step number
  return transport_->broadcast(none, RankId{0});
}

Status PlanExecutors::serve() {
  std::vector<uint8_t> bytes;
  while (true) {
    KVF_RETURN_IF_ERROR(transport_->broadcast(bytes, RankId{0}));
    if (bytes.empty()) return ok_status();
    KVF_RETURN_IF_ERROR(cache_->execute_agreed(bytes, RankId{0}));
  }
}

Result<std::vector<uint64_t>> PlanExecutors::received_blocks() {
  std::vector<uint64_t> all;
  KVF_RETURN_IF_ERROR(transport_->all_gather(cache_->stats().migrated_blocks_received, all));
  return all;
}

Result<std::vector<uint64_t>> PlanExecutors::table_digests() {
  std::vector<uint64_t> all;
  KVF_RETURN_IF_ERROR(transport_->all_gather(cache_->tables_digest(), all));
  return all;
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
  KVF_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend,
                       make_cpu_backend(CpuBackendOptions{best_cpu_isa(), 1}));
  job->executors_.emplace(*job->transport_, std::move(backend));
  return job;
}

}  // namespace kvfabric::bench
