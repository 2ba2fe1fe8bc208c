#include "bench/cluster_replay.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <string>

#include "bench/replay_sim.h"
#include "bench/series.h"
#include "bench/timing.h"
#include "kvfabric/coordinator/coordinator.h"

namespace kvfabric::bench {
namespace {

using Clock = std::chrono::steady_clock;

double micros(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

// Generated tokens live above 2^31, apart from the trace's expanded prompt tokens, so a
// continuation never matches another request's prompt by accident.
TokenId generated_token(size_t request, uint32_t position) {
  uint64_t h = (uint64_t{request} << 32 | position) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 29;
  return static_cast<TokenId>((h & 0x7FFFFFFFu) | 0x80000000u);
}

// Keeps a buffer's contents observable so the timed memcpy into it is not optimized away.
void benchmark_keep(const void* p) { asm volatile("" : : "g"(p) : "memory"); }

struct Pending {
  size_t request = 0;
  uint32_t generated = 0;  // tokens generated before a preemption
  uint64_t arrival_step = 0;
  bool readmission = false;
};

struct Running {
  size_t request = 0;
  uint32_t generated = 0;
  uint32_t output = 0;
};

}  // namespace

Status synthetic_forward_pass(RankCache& cache, const StepPlan& plan) {
  const RankLayout& layout = cache.layout();
  std::vector<float> mass;
  for (const StepPlan::ScoreRequest& request : plan.score_requests) {
    const auto table = cache.tables().find(request.seq);
    if (request.replica != layout.replica || table == cache.tables().end()) continue;
    mass.resize(table->second.computed_tokens);
    for (size_t i = 0; i < mass.size(); ++i) {
      mass[i] = static_cast<float>(synthetic_attention(request.seq.value, i) / layout.tp);
    }
    KVF_RETURN_IF_ERROR(cache.accumulate_attention(request.seq, mass));
  }
  return ok_status();
}

double synthetic_attention(size_t request, size_t position) {
  uint64_t h = (uint64_t{request} << 24 ^ position) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 31;
  const double u = static_cast<double>(h >> 11) * 0x1.0p-53;  // uniform in [0, 1)
  const double u2 = u * u, u4 = u2 * u2;
  return u4 * u4;  // u^8, heavy-tailed: about 1 token in 10 holds most of the mass
}

std::string_view cluster_routing_name(ClusterRouting routing) {
  switch (routing) {
    case ClusterRouting::kIndependent: return "independent";
    case ClusterRouting::kGlobalRouting: return "global-routing";
    case ClusterRouting::kGlobalMigration: return "global-migration";
  }
  return "?";
}

Config cluster_replay_model() {
  Config c;
  c.model.name = "replay-small";
  c.model.num_layers = 2;
  c.model.num_query_heads = 4;
  c.model.num_kv_heads = 2;
  c.model.head_dim = 64;
  c.model.dtype = DType::kF16;
  c.cache.kv_dtype = DType::kF16;
  c.cache.layers_per_group = 1;  // two layer groups: a budget each under --compression pyramid
  return c;
}

Result<Config> cluster_replay_config(const ClusterReplayOptions& options, ClusterRouting routing) {
  Config c = options.config;
  const uint32_t dp = c.topology.dp;
  if (dp == 0 || options.block_tokens == 0) return invalid_argument("dp and block_tokens must be >= 1");
  const uint64_t per_replica = options.capacity_tokens / dp / options.block_tokens;
  if (per_replica == 0) {
    return invalid_argument("a capacity of " + std::to_string(options.capacity_tokens) +
                            " tokens gives each of " + std::to_string(dp) + " replicas no " +
                            std::to_string(options.block_tokens) + "-token block");
  }
  c.cache.block_size = options.block_tokens;
  c.cache.num_blocks = per_replica;
  c.cache.memory_budget_bytes = 0;
  c.cache.host_num_blocks = options.host_capacity_tokens / dp / options.block_tokens;
  switch (routing) {
    case ClusterRouting::kIndependent:
      // A load balancer that cannot see other replicas' caches: prefill cost plays no part.
      c.coordinator.prefill_token_cost = 0;
      c.coordinator.migration_token_cost = 0;
      break;
    case ClusterRouting::kGlobalRouting:
      c.coordinator.migration_token_cost = c.coordinator.prefill_token_cost;  // never cheaper
      break;
    case ClusterRouting::kGlobalMigration:
      break;
  }
  KVF_RETURN_IF_ERROR(validate(c));
  return c;
}

namespace {

// The ranks of a replay run no forward pass, so the scores the plan's requests ask for come
// from synthetic_attention (by position as the sequence holds it now).
Status report_synthetic_scores(Coordinator& coordinator, const StepPlan& plan,
                               ClusterReplayResult& r) {
  for (const StepPlan::ScoreRequest& request : plan.score_requests) {
    std::vector<double> scores(coordinator.tokens_of(request.seq));
    for (size_t i = 0; i < scores.size(); ++i) scores[i] = synthetic_attention(request.seq.value, i);
    KVF_RETURN_IF_ERROR(coordinator.report_attention(request.seq, plan.step, scores));
    r.score_bytes += scores.size() * sizeof(float) * coordinator.config().topology.tp;
  }
  return ok_status();
}

}  // namespace

Result<ClusterReplayResult> run_cluster_replay(const std::vector<MooncakeRequest>& trace,
                                               const ClusterReplayOptions& options,
                                               ClusterRouting routing,
                                               const PlanExecutor& execute,
                                               const std::function<void(const ClusterReplayProgress&)>& progress) {
  KVF_ASSIGN_OR_RETURN(const Config config, cluster_replay_config(options, routing));
  KVF_ASSIGN_OR_RETURN(Coordinator coordinator, Coordinator::create(config));
  const size_t count = options.max_requests ? std::min(options.max_requests, trace.size()) : trace.size();
  const uint64_t replica_tokens = config.cache.num_blocks * options.block_tokens;
  const double ms_per_step = options.step_ms * options.time_scale;
  // NaN compared false with every arrival and a tiny step never reached the last one: the
  // replay hung. The last arrival's step number must be countable.
  double last_arrival_ms = 0;
  for (size_t i = 0; i < count; ++i) last_arrival_ms = std::max(last_arrival_ms, trace[i].timestamp_ms);
  if (!(std::isfinite(ms_per_step) && ms_per_step > 0 &&
        last_arrival_ms / ms_per_step < 0x1p63)) {
    return invalid_argument("step_ms " + std::to_string(options.step_ms) + " and time_scale " +
                            std::to_string(options.time_scale) + " must be finite and > 0, and "
                            "put the last arrival (" + std::to_string(last_arrival_ms) +
                            " ms) within 2^63 steps");
  }

  ClusterReplayResult r;
  r.routing = routing;
  r.requests = count;
  r.admitted_per_replica.assign(config.topology.dp, 0);
  auto output_of = [&](size_t i) {
    const uint32_t out = std::max<uint32_t>(trace[i].output_length, 1);
    return options.max_output_tokens ? std::min(out, options.max_output_tokens) : out;
  };
  auto tokens_of = [&](const Pending& p) -> Result<std::vector<TokenId>> {
    KVF_ASSIGN_OR_RETURN(std::vector<TokenId> tokens, expand_prompt(trace[p.request], options.block_tokens));
    for (uint32_t g = 0; g < p.generated; ++g) tokens.push_back(generated_token(p.request, g));
    return tokens;
  };

  std::deque<Pending> queue;
  std::map<SeqId, Running> running;  // running or swapped, by SeqId (= request index)
  std::vector<double> admit_us;
  double memcpy_us = 0;
  std::vector<TokenId> matched;  // the copy the physical-limit memcpy writes
  double coordinator_us = 0, queue_steps = 0;
  double context_tokens = 0, sequence_steps = 0;  // for kv_tokens_per_sequence
  AdmitOptions admit_options;
  admit_options.compression = options.compression;
  DownsampledSeries waiting(kQueueSeriesPoints);
  size_t next = 0, finished = 0;
  const auto start = Clock::now();
  for (uint64_t step = 0; next < count || !queue.empty() || !running.empty(); ++step) {
    // Nothing to run until an arrival far ahead (a trace of epoch timestamps, say): jump to it
    // rather than step through the gap. Shorter gaps are stepped through, so that the shipped
    // traces' steps and queue series stay as they were.
    constexpr double kLongestIdleSteps = 1e6;
    if (queue.empty() && running.empty() && next < count) {
      const double arrival_step = std::ceil(trace[next].timestamp_ms / ms_per_step);
      if (arrival_step - static_cast<double>(step) > kLongestIdleSteps) {
        step = static_cast<uint64_t>(arrival_step);
      }
    }
    // Arrivals up to this step's time. A request that cannot fit one replica is never served.
    while (next < count && trace[next].timestamp_ms <= static_cast<double>(step) * ms_per_step) {
      if (trace[next].input_length + uint64_t{output_of(next)} > replica_tokens) {
        ++r.unfit_requests;
        ++finished;
      } else {
        queue.push_back({next, 0, step, false});
      }
      ++next;
    }
    // Decode: every running sequence gets one more token; finished ones leave.
    for (auto it = running.begin(); it != running.end();) {
      const SeqId seq = it->first;
      Running& s = it->second;
      if (coordinator.is_swapped(seq) || !coordinator.replica_of(seq)) {
        ++it;  // waiting on the host tier, or preempted by this step's pressure
        continue;
      }
      const auto t0 = Clock::now();
      if (s.generated >= s.output) {
        const Status freed = coordinator.free(seq);
        coordinator_us += micros(t0, Clock::now());
        KVF_RETURN_IF_ERROR(freed);
        it = running.erase(it);
        ++finished;
        continue;
      }
      const Status appended = coordinator.append(seq, 1);
      coordinator_us += micros(t0, Clock::now());
      if (appended.ok()) {
        ++s.generated;
      } else if (appended.code() != ErrorCode::kOutOfMemory) {
        return appended;
      }
      ++it;
    }
    // Admissions in arrival order; the first that finds no room waits for a later step.
    while (!queue.empty()) {
      const Pending& p = queue.front();
      KVF_ASSIGN_OR_RETURN(std::vector<TokenId> prompt, tokens_of(p));
      const size_t prompt_tokens = prompt.size();
      const std::vector<TokenId> kept = prompt;  // for the memcpy, after admit took the prompt
      const SeqId seq{p.request};
      const auto t0 = Clock::now();
      const auto placed = coordinator.admit(seq, std::move(prompt), admit_options);
      const double us = micros(t0, Clock::now());
      coordinator_us += us;
      if (!placed.ok()) {
        if (placed.status().code() != ErrorCode::kOutOfMemory) return placed.status();
        break;
      }
      admit_us.push_back(us);
      if (const size_t n = std::min(placed->cached_tokens, kept.size()); n > 0) {
        matched.resize(std::max(matched.size(), n));
        const auto c0 = Clock::now();
        std::memcpy(matched.data(), kept.data(), n * sizeof(TokenId));
        benchmark_keep(matched.data());
        memcpy_us += micros(c0, Clock::now());
      }
      ++r.admissions;
      ++r.admitted_per_replica[placed->replica];
      r.prompt_tokens += prompt_tokens;
      r.prefill_tokens += prompt_tokens - placed->cached_tokens;
      if (p.readmission) {
        ++r.readmissions;
      } else {
        queue_steps += static_cast<double>(step - p.arrival_step);
      }
      running[seq] = Running{p.request, p.generated, output_of(p.request)};
      queue.pop_front();
    }
    const auto t0 = Clock::now();
    KVF_ASSIGN_OR_RETURN(const StepPlan plan, coordinator.step());
    const auto t1 = Clock::now();
    coordinator_us += micros(t0, t1);
    std::vector<ReplicaScores> scores;
    if (execute) {
      KVF_ASSIGN_OR_RETURN(scores, execute(plan));
      r.executor_seconds += micros(t1, Clock::now()) * 1e-6;
      for (const ReplicaScores& s : scores) {
        KVF_RETURN_IF_ERROR(coordinator.report_attention(s.seq, plan.step, s.scores));
      }
    } else {
      KVF_RETURN_IF_ERROR(report_synthetic_scores(coordinator, plan, r));
    }
    r.score_requests += plan.score_requests.size();
    for (const StepPlan::Op& op : plan.ops) {
      if (op.kind == StepPlan::OpKind::kCopy && op.copy.reason == CopyReason::kCompaction) {
        r.compaction_copied_tokens += op.copy.num_tokens;
      }
    }
    for (const auto& [seq, s] : running) {
      if (coordinator.is_swapped(seq) || !coordinator.replica_of(seq)) continue;
      context_tokens += static_cast<double>(coordinator.tokens_of(seq));
      sequence_steps += 1;
    }
    // Preempted sequences start over (keeping what they generated), ahead of new arrivals.
    for (auto it = plan.preempted.rbegin(); it != plan.preempted.rend(); ++it) {
      const auto found = running.find(*it);
      if (found == running.end()) continue;
      queue.push_front({found->second.request, found->second.generated, step, true});
      running.erase(found);
    }
    r.steps = step + 1;
    waiting.add(static_cast<double>(queue.size()));
    r.max_waiting = std::max<uint64_t>(r.max_waiting, queue.size());
    if (progress) progress({finished, count, step, queue.size()});
  }
  r.wall_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  r.kv_tokens_per_sequence = sequence_steps == 0 ? 0.0 : context_tokens / sequence_steps;
  r.decode_context_tokens_per_step = r.steps == 0 ? 0.0 : context_tokens / static_cast<double>(r.steps);
  KVF_RETURN_IF_ERROR(coordinator.verify_integrity());
  r.coordinator_bytes = coordinator.host_memory_bytes();
  r.index_nodes = coordinator.prefix_index().node_count();

  const CoordinatorStats& stats = coordinator.stats();
  r.local_hit_tokens = stats.local_hit_tokens;
  r.migrated_tokens = stats.migrated_tokens;
  r.hit_ratio = r.prompt_tokens == 0 ? 0.0
                                     : static_cast<double>(r.local_hit_tokens + r.migrated_tokens) /
                                           static_cast<double>(r.prompt_tokens);
  r.migrated_blocks = stats.migrated_blocks;
  r.migrated_bytes = stats.migrated_blocks * coordinator.block_bytes() * config.topology.tp;
  r.swapped_out = stats.swapped_out;
  r.swapped_in = stats.swapped_in;
  r.parked = stats.parked;
  r.preempted = stats.preempted;
  r.compactions = stats.compactions;
  r.compacted_tokens = stats.compacted_tokens;
  r.compressed_hits = stats.compressed_hits;
  const uint64_t first_admissions = r.admissions - r.readmissions;
  r.mean_queue_steps = first_admissions == 0 ? 0.0 : queue_steps / static_cast<double>(first_admissions);
  r.coordinator_us_per_request = count == 0 ? 0.0 : coordinator_us / static_cast<double>(count);
  r.queue_steps_per_point = waiting.steps_per_point();
  r.queue_mean = waiting.means();
  r.queue_max = waiting.maxima();
  LogHistogram histogram(kAdmitHistogramLowestUs, kAdmitHistogramHighestUs,
                         kAdmitHistogramBinsPerOctave);
  for (double us : admit_us) histogram.add(us);
  r.admit_histogram = histogram.counts();
  r.admit_histogram_edges_us = histogram.edges();
  const LatencySummary admit = summarize_latencies(std::move(admit_us));
  r.admit_mean_us = admit.mean;
  r.admit_p50_us = admit.p50;
  r.admit_p90_us = admit.p90;
  r.admit_p99_us = admit.p99;
  r.admit_p999_us = admit.p999;
  r.admit_max_us = admit.max;
  r.matched_memcpy_us = r.admissions == 0 ? 0.0 : memcpy_us / static_cast<double>(r.admissions);
  return r;
}

}  // namespace kvfabric::bench
