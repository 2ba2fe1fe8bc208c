// Every rank's side of a coordinated dp x tp job: the plan loop around the rank's RankCache.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "kvfabric/backend/backend.h"
#include "kvfabric/config/config.h"
#include "kvfabric/plan/step_plan.h"
#include "kvfabric/runtime/rank_cache.h"
#include "kvfabric/transport/transport.h"

namespace kvfabric {

//! \brief The plan loop of a job (DESIGN.md §5). Rank 0, which runs the coordinator, calls
//! execute() for every step: the plan is broadcast, every rank checks it, the ranks agree, each
//! executes its share and reports back, and execute() returns OK only once every rank has
//! executed the plan; otherwise its error names the ranks that refused or failed it, or that did
//! not answer (rank and host). The other ranks call serve(), which executes plans until rank 0
//! calls finish().
//!
//! Deadlines (runtime.plan_deadline_ms): each of rank 0's waits, and each of the other ranks'
//! waits inside a step, gives up after the deadline and names the ranks that do not answer; the
//! transport then refuses every later call, because messages still in flight cannot be withdrawn
//! (the job must end: see MpiRuntime::abort). A rank waiting for the next plan waits without a
//! deadline and without spinning a core.
//!
//! The transport and backend are the caller's and must outlive the job. Not thread-safe (but for
//! rank_stats()): call it from the thread that initialized the transport.
class RankJob {
 public:
  //! What a rank does with its cache after each plan it executed and before the next: the
  //! serving engine's forward pass (append_kv, attention, accumulate_attention for compressed
  //! sequences), or a stand-in for it.
  using ForwardPass = std::function<Status(RankCache& cache, const StepPlan& plan)>;

  static Result<std::unique_ptr<RankJob>> create(const Config& config, Transport& transport,
                                                 Backend& backend);

  //! Rank 0: runs `plan` on every rank (see above).
  Status execute(const StepPlan& plan);
  //! Rank 0: ends the other ranks' serve().
  Status finish();
  //! The other ranks: execute plans until rank 0 calls finish(). An error ends the loop.
  Status serve();
  //! Runs `pass` on this rank after every plan it executes: in execute() on rank 0 (before it
  //! returns), in serve() on the others. An error fails the step (rank 0) or ends serve().
  void set_forward_pass(ForwardPass pass) { forward_pass_ = std::move(pass); }
  //! Collective: every rank's received migration blocks, in rank order.
  Result<std::vector<uint64_t>> received_blocks();
  //! Collective: every rank's RankCache::tables_digest(), in rank order.
  Result<std::vector<uint64_t>> table_digests();

  //! Rank 0: every rank's RankCacheStats as of the last plan (empty before the first). Unlike
  //! the rest of the job, callable from any thread (a metrics endpoint) while a plan runs.
  [[nodiscard]] std::vector<RankCacheStats> rank_stats() const;

  [[nodiscard]] bool is_root() const { return transport_->rank().value == 0; }
  [[nodiscard]] int world_size() const { return transport_->world_size(); }
  [[nodiscard]] const RankCache& cache() const { return *cache_; }
  [[nodiscard]] Transport& transport() const { return *transport_; }

 private:
  RankJob(std::unique_ptr<RankCache> cache, Transport& transport,
          std::optional<std::chrono::milliseconds> deadline);
  // The deadline while a step runs (rank 0 always).
  void bound_waits() { transport_->set_timeout(deadline_); }

  std::unique_ptr<RankCache> cache_;
  ForwardPass forward_pass_;
  Transport* transport_;
  std::optional<std::chrono::milliseconds> deadline_;
  mutable std::mutex stats_mutex_;  // guards rank_stats_
  std::vector<RankCacheStats> rank_stats_;
};

}  // namespace kvfabric
