// Replays an arrival trace through the block manager the way a continuous-batching server uses it:
// prompt allocation at admission, one append per generated token, free at completion, and
// recompute preemption when the pool runs out.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "bench/trace.h"
#include "kvfabric/block/eviction_strategy.h"
#include "kvfabric/common/status.h"

namespace kvfabric::bench {

struct AllocSimOptions {
  uint64_t num_blocks = 8192;
  uint32_t block_size = 16;
  //! Trace seconds per decode step: every running sequence generates one token per step.
  double step_seconds = 0.025;
  //! Replays the trace this many times faster (arrivals compressed, steps unchanged).
  double time_scale = 1.0;
  //! Preemption victims are chosen by this strategy.
  EvictionStrategy strategy = EvictionStrategy::lru();
  //! Admission keeps this fraction of blocks free while other requests run (vLLM's watermark),
  //! which avoids preempting right after admitting.
  double admit_watermark = 0.01;
  size_t max_requests = 0;  //!< 0 = the whole trace
};

struct AllocSimProgress {
  size_t completed = 0;
  size_t total = 0;
  uint64_t step = 0;
  double utilization = 0;
};

struct AllocSimResult {
  size_t requests = 0;
  size_t completed = 0;
  size_t rejected = 0;  //!< prompt + output larger than the whole pool: can never run
  uint64_t preemptions = 0;
  uint64_t steps = 0;
  double simulated_seconds = 0;  //!< trace time covered
  size_t peak_blocks_used = 0;
  double peak_utilization = 0;
  double mean_utilization = 0;    //!< over steps with a running request
  double mean_fragmentation = 0;  //!< allocated-but-unused token slots / allocated slots, mean
  double fragmentation_at_peak = 0;
  size_t max_running = 0;
  double mean_queue_seconds = 0;  //!< trace time from arrival to first admission, mean
  double p99_queue_seconds = 0;
  uint64_t operations = 0;  //!< allocate + append + free + evict calls
  double wall_seconds = 0;  //!< replay time, simulator bookkeeping included
  double ops_per_second = 0;
  size_t leaked_blocks = 0;  //!< used blocks after the last request finished (must be 0)
};

//! Runs the replay. Deterministic: the same trace and options give the same result (except the
//! wall-clock figures). `progress` is called about every 0.5% of requests
//! and at the end.
Result<AllocSimResult> run_alloc_sim(
    const std::vector<TraceRequest>& trace, const AllocSimOptions& options,
    const std::function<void(const AllocSimProgress&)>& progress = {});

}  // namespace kvfabric::bench
