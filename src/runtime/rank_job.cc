#include "kvfabric/runtime/rank_job.h"

#include <string>

namespace kvfabric {
namespace {

constexpr RankId kRoot{0};

// Names the deadline in a timeout's message, so that the operator knows which key to change.
Status with_deadline_key(Status status, uint64_t step) {
  if (status.ok() || status.code() != ErrorCode::kUnavailable) return status;
  return Status(status.code(), "step " + std::to_string(step) + ": " + status.message() +
                                   " (runtime.plan_deadline_ms)");
}

}  // namespace

RankJob::RankJob(std::unique_ptr<RankCache> cache, Transport& transport,
                 std::optional<std::chrono::milliseconds> deadline)
    : cache_(std::move(cache)), transport_(&transport), deadline_(deadline) {}

Result<std::unique_ptr<RankJob>> RankJob::create(const Config& config, Transport& transport,
                                                 Backend& backend) {
  KVF_ASSIGN_OR_RETURN(
      std::unique_ptr<RankCache> cache,
      RankCache::create(config, static_cast<uint32_t>(transport.rank().value), backend, transport));
  std::optional<std::chrono::milliseconds> deadline;
  if (config.runtime.plan_deadline_ms != 0) {
    deadline = std::chrono::milliseconds(config.runtime.plan_deadline_ms);
  }
  auto job = std::unique_ptr<RankJob>(new RankJob(std::move(cache), transport, deadline));
  job->bound_waits();
  return job;
}

Status RankJob::execute(const StepPlan& plan) {
  bound_waits();
  std::vector<uint8_t> bytes = plan.serialize();
  Status done = transport_->broadcast(bytes, kRoot);
  if (done.ok()) done = cache_->execute_agreed(bytes, kRoot);
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    rank_stats_ = cache_->job_stats();
  }
  if (done.ok() && forward_pass_) done = forward_pass_(*cache_, plan);
  return with_deadline_key(std::move(done), plan.step);
}

std::vector<RankCacheStats> RankJob::rank_stats() const {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  return rank_stats_;
}

Status RankJob::finish() {
  bound_waits();
  std::vector<uint8_t> none;  // a plan is never empty: it carries at least its step number
  return transport_->broadcast(none, kRoot);
}

Status RankJob::serve() {
  std::vector<uint8_t> bytes;
  StepPlan plan;
  while (true) {
    transport_->set_timeout(std::nullopt);  // the next plan may be long in coming
    KVF_RETURN_IF_ERROR(transport_->broadcast(bytes, kRoot));
    if (bytes.empty()) break;
    bound_waits();
    KVF_RETURN_IF_ERROR(with_deadline_key(
        cache_->execute_agreed(bytes, kRoot, forward_pass_ ? &plan : nullptr),
        cache_->next_step()));
    if (forward_pass_) KVF_RETURN_IF_ERROR(forward_pass_(*cache_, plan));
  }
  bound_waits();
  return ok_status();
}

Result<std::vector<uint64_t>> RankJob::received_blocks() {
  std::vector<uint64_t> all;
  KVF_RETURN_IF_ERROR(transport_->all_gather(cache_->stats().migrated_blocks_received, all));
  return all;
}

Result<std::vector<uint64_t>> RankJob::table_digests() {
  std::vector<uint64_t> all;
  KVF_RETURN_IF_ERROR(transport_->all_gather(cache_->tables_digest(), all));
  return all;
}

}  // namespace kvfabric
