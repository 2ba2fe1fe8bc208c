// Replays a Mooncake trace through the Coordinator of a dp-replica job as a serving loop: requests
// arrive on the trace's clock, are admitted (placement, prefix hits, migrations), decode one token
// per step and finish; the coordinator's plan of every step goes to an executor (the MPI ranks,
// or nobody). Compares routing with a global prefix view and migration against independent
// per-replica prefix caches.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string_view>
#include <vector>

#include "bench/trace.h"
#include "kvfabric/config/config.h"
#include "kvfabric/plan/step_plan.h"
#include "kvfabric/quant/compression_policy.h"
#include "kvfabric/runtime/rank_cache.h"

namespace kvfabric::bench {

enum class ClusterRouting : uint8_t {
  //! The baseline: each replica has its own prefix cache and requests go where load is lowest
  //! (prefill cost weight 0: the router knows nothing of other replicas' caches); no migration.
  kIndependent,
  //! The global prefix view steers requests to the replica holding their prefix; no migration.
  kGlobalRouting,
  //! The global view and migration of cached prefixes between replicas.
  kGlobalMigration,
};

std::string_view cluster_routing_name(ClusterRouting routing);  // "independent", ...

//! The default model of the replay, small enough for CPU runs: 2 layers, 4 query and 2 KV heads
//! of 64, f16 KV (1 KiB per token).
Config cluster_replay_model();

struct ClusterReplayOptions {
  //! Model shape, KV dtype, topology (dp x tp) and coordinator weights. The cache's block size,
  //! device and host blocks are set from the fields below.
  Config config = cluster_replay_model();
  uint32_t block_tokens = 512;          //!< tokens per trace hash id and per cache block
  uint64_t capacity_tokens = 1 << 20;   //!< device-tier tokens of all replicas together
  uint64_t host_capacity_tokens = 0;    //!< host-tier (swap) tokens of all replicas together
  double step_ms = 50;                  //!< trace time per serving step (one decode token each)
  double time_scale = 1;                //!< arrivals this many times faster than recorded
  uint32_t max_output_tokens = 0;       //!< caps each request's output; 0 = as in the trace
  size_t max_requests = 0;              //!< 0 = the whole trace
  //! Every request admitted with this token compression. The replay has no model: H2O and
  //! SnapKV read a synthetic heavy-tailed attention mass (synthetic_attention), so a run shows
  //! what compression costs and saves in memory and plans, not its quality (`compress` does).
  std::optional<quant::CompressionPolicy> compression;
};

//! Executes a step's plan on the ranks and returns the attention scores it gathered.
using PlanExecutor = std::function<Result<std::vector<ReplicaScores>>(const StepPlan&)>;

//! What a rank of the replay does between plans, standing in for a model's forward pass: for
//! the sequences of its replica whose scores the plan requests, adds its share (1/tp) of
//! synthetic_attention to their scores (RankJob::set_forward_pass).
Status synthetic_forward_pass(RankCache& cache, const StepPlan& plan);

//! The replay's stand-in for a model's attention: a deterministic heavy-tailed mass per token
//! of a request (a few tokens take most of it), the same on every run.
double synthetic_attention(size_t request, size_t position);

struct ClusterReplayResult {
  ClusterRouting routing = ClusterRouting::kGlobalMigration;
  size_t requests = 0;
  uint64_t steps = 0;
  uint64_t admissions = 0;     //!< first admissions and re-admissions after preemption
  uint64_t readmissions = 0;
  uint64_t unfit_requests = 0;  //!< prompts larger than one replica: never admitted
  uint64_t prompt_tokens = 0;   //!< of every admission
  uint64_t local_hit_tokens = 0;
  uint64_t migrated_tokens = 0;
  uint64_t prefill_tokens = 0;  //!< computed: prompt tokens minus those found cached or migrated
  double hit_ratio = 0;         //!< (local hits + migrated) / prompt tokens
  uint64_t migrated_blocks = 0;  //!< every migration (prefixes, parked sequences)
  uint64_t migrated_bytes = 0;   //!< migrated_blocks x block bytes x tp shards
  uint64_t swapped_out = 0, swapped_in = 0, parked = 0, preempted = 0;
  double mean_queue_steps = 0;   //!< steps from arrival to first admission
  //! Waiting requests (arrived or preempted, not admitted) at the end of each step, folded into
  //! at most kQueueSeriesPoints buckets of queue_steps_per_point steps: mean and maximum.
  uint64_t queue_steps_per_point = 1;
  std::vector<double> queue_mean, queue_max;
  uint64_t max_waiting = 0;
  std::vector<uint64_t> admitted_per_replica;
  //! Wall time in the coordinator, reported only (never used in a decision): admit() per
  //! admission, and every coordinator call (admit, append, free, step) per request.
  double admit_mean_us = 0, admit_p50_us = 0, admit_p99_us = 0;
  double admit_p90_us = 0, admit_p999_us = 0, admit_max_us = 0;
  //! Every admit() time in log-spaced bins (kAdmitHistogram*); reported only, like the above.
  std::vector<uint64_t> admit_histogram;
  std::vector<double> admit_histogram_edges_us;
  //! The physical limit beside it, timed in the same run: a memcpy of the prompt tokens each
  //! admission found cached (what any index comparing tokens must read at least once).
  double matched_memcpy_us = 0;
  uint64_t coordinator_bytes = 0;  //!< Coordinator::host_memory_bytes() at the end of the run
  uint64_t index_nodes = 0;        //!< nodes of the global prefix tree at the end
  double coordinator_us_per_request = 0;
  double executor_seconds = 0;  //!< wall time in the plan executor
  double wall_seconds = 0;
  //! KV the running sequences hold, averaged over steps and sequences (tokens of context each
  //! decode step attends to: what decode attention reads).
  double kv_tokens_per_sequence = 0;
  double decode_context_tokens_per_step = 0;
  uint64_t compactions = 0;
  uint64_t compacted_tokens = 0;         //!< dropped by them
  uint64_t compressed_hits = 0;          //!< admissions served an identical request's kept prompt
  uint64_t compaction_copied_tokens = 0;  //!< moved by their copy ops (per shard)
  uint64_t score_requests = 0;
  //! Sent to rank 0 for them, 4 bytes per token per shard: counted by the ranks under MPI,
  //! what they would send otherwise.
  uint64_t score_bytes = 0;
};

//! The queue-length series' bound: the JSON stays small however long the run.
inline constexpr size_t kQueueSeriesPoints = 2000;
//! Admission-time histogram: 1/8 µs to 64 ms, four bins per octave.
inline constexpr double kAdmitHistogramLowestUs = 0.125;
inline constexpr double kAdmitHistogramHighestUs = 65536;
inline constexpr int kAdmitHistogramBinsPerOctave = 4;

//! Reported once per serving step, for a progress display only.
struct ClusterReplayProgress {
  size_t finished = 0;  //!< requests completed or found unfit
  size_t total = 0;
  uint64_t step = 0;
  size_t waiting = 0;
};

//! Runs one routing mode. `execute` (optional) receives every step's plan and a last, empty plan
//! is never sent: the caller ends its executors itself; it returns the scores the plan's score
//! requests gathered from the ranks (RankCache::reported_scores), and without it the scores
//! come from synthetic_attention directly. `progress` (optional) is called after
//! every step. Deterministic apart from wall times.
Result<ClusterReplayResult> run_cluster_replay(
    const std::vector<MooncakeRequest>& trace, const ClusterReplayOptions& options,
    ClusterRouting routing, const PlanExecutor& execute = nullptr,
    const std::function<void(const ClusterReplayProgress&)>& progress = nullptr);

//! The config run_cluster_replay builds its coordinator from (and the ranks their caches).
Result<Config> cluster_replay_config(const ClusterReplayOptions& options, ClusterRouting routing);

}  // namespace kvfabric::bench
