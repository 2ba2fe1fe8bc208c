#include "bench/plan_executors.h"

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

}  // namespace kvfabric::bench
