#include "bench/alloc_sim.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <string>

#include "kvfabric/block/paged_kv_cache.h"

namespace kvfabric::bench {
namespace {

struct Waiting {
  size_t request;
  uint32_t generated;  // tokens produced before a preemption; recomputed at re-admission
};

struct Running {
  SeqId seq;
  size_t request;
  uint32_t generated;
};

}  // namespace

Result<AllocSimResult> run_alloc_sim(const std::vector<TraceRequest>& trace,
                                     const AllocSimOptions& options,
                                     const std::function<void(const AllocSimProgress&)>& progress) {
  if (!(options.step_seconds > 0) || !(options.time_scale > 0)) {
    return invalid_argument("step_seconds and time_scale must be > 0");
  }
  if (!(options.admit_watermark >= 0 && options.admit_watermark < 1)) {
    return invalid_argument("admit_watermark must be in [0, 1)");
  }
  KVF_ASSIGN_OR_RETURN(PagedKvCache cache,
                       PagedKvCache::create(options.num_blocks, options.block_size, 8, 128));
  KVF_RETURN_IF_ERROR(cache.set_eviction_strategy(options.strategy));

  const size_t total =
      options.max_requests == 0 ? trace.size() : std::min(options.max_requests, trace.size());
  const double trace_seconds_per_step = options.step_seconds * options.time_scale;
  // A step so short that the last arrival is past 2^63 steps never reaches it (and converting
  // its step number was undefined): the replay hung.
  double last_arrival_s = 0;
  for (size_t i = 0; i < total; ++i) last_arrival_s = std::max(last_arrival_s, trace[i].arrival_s);
  if (!(std::isfinite(trace_seconds_per_step) && trace_seconds_per_step > 0 &&
        last_arrival_s / trace_seconds_per_step < 0x1p63)) {
    return invalid_argument("a step of " + std::to_string(options.step_seconds) + " s at time "
                            "scale " + std::to_string(options.time_scale) + " puts the last "
                            "arrival (" + std::to_string(last_arrival_s) + " s) past 2^63 steps");
  }
  const size_t bs = options.block_size;
  const auto blocks_for = [bs](uint64_t tokens) { return (tokens + bs - 1) / bs; };
  const auto watermark = static_cast<size_t>(options.admit_watermark * options.num_blocks);

  AllocSimResult result;
  result.requests = total;
  std::deque<Waiting> waiting;
  std::vector<Running> running;
  size_t next_arrival = 0;
  uint64_t next_seq = 1;
  uint64_t step = 0;
  double utilization_sum = 0, fragmentation_sum = 0;
  uint64_t busy_steps = 0;
  size_t next_progress = 0;
  std::vector<double> queue_seconds(total, -1.0);  // first admission only
  const auto start = std::chrono::steady_clock::now();

  while (next_arrival < total || !waiting.empty() || !running.empty()) {
    // Idle: jump to the next arrival instead of stepping through empty time.
    if (running.empty() && waiting.empty()) {
      const auto arrival_step =
          static_cast<uint64_t>(std::ceil(trace[next_arrival].arrival_s / trace_seconds_per_step));
      step = std::max(step, arrival_step);
    }
    const double now = static_cast<double>(step) * trace_seconds_per_step;
    while (next_arrival < total && trace[next_arrival].arrival_s <= now) {
      waiting.push_back({next_arrival++, 0});
    }

    // Decode: every running sequence appends the token it generated in this step.
    for (size_t i = 0; i < running.size();) {
      Running& r = running[i];
      Status status = cache.append(r.seq, 1);
      ++result.operations;
      bool preempted_self = false;
      while (status.code() == ErrorCode::kOutOfMemory) {
        auto victim = cache.evict();
        ++result.operations;
        if (!victim.ok()) return victim.status();
        ++result.preemptions;
        const auto it = std::find_if(running.begin(), running.end(),
                                     [&](const Running& x) { return x.seq == victim.value(); });
        waiting.push_front({it->request, it->generated});
        const bool self = it->seq == r.seq;
        const size_t index = static_cast<size_t>(it - running.begin());
        running.erase(it);
        if (self) {
          preempted_self = true;
          break;
        }
        if (index < i) --i;
        status = cache.append(running[i].seq, 1);
        ++result.operations;
      }
      if (preempted_self) continue;
      if (!status.ok()) return status;
      Running& current = running[i];
      if (++current.generated >= trace[current.request].output_tokens) {
        const Status freed = cache.free(current.seq);
        ++result.operations;
        if (!freed.ok()) return freed;
        ++result.completed;
        running.erase(running.begin() + static_cast<std::ptrdiff_t>(i));
        continue;
      }
      ++i;
    }

    // Admit waiting requests in order (prefill); preempted ones re-prefill what they generated.
    while (!waiting.empty()) {
      const Waiting w = waiting.front();
      const TraceRequest& req = trace[w.request];
      if (blocks_for(uint64_t{req.prompt_tokens} + req.output_tokens) > options.num_blocks) {
        waiting.pop_front();
        ++result.rejected;
        continue;
      }
      const uint64_t tokens = uint64_t{req.prompt_tokens} + w.generated;
      const size_t needed = blocks_for(tokens);
      if (!running.empty() && needed + watermark > cache.free_block_count()) break;
      const SeqId seq{next_seq++};
      const Status status = cache.allocate(seq, tokens);
      ++result.operations;
      if (status.code() == ErrorCode::kOutOfMemory) break;
      if (!status.ok()) return status;
      waiting.pop_front();
      if (queue_seconds[w.request] < 0) queue_seconds[w.request] = now - req.arrival_s;
      if (w.generated >= req.output_tokens) {  // nothing left to generate
        if (Status freed = cache.free(seq); !freed.ok()) return freed;
        ++result.operations;
        ++result.completed;
        continue;
      }
      running.push_back({seq, w.request, w.generated});
    }

    // Step statistics.
    if (!running.empty()) {
      const size_t used = cache.used_block_count();
      uint64_t tokens = 0;
      for (const Running& r : running)
        tokens += cache.get_sequence(r.seq)->num_tokens;
      const double fragmentation =
          used == 0 ? 0.0 : 1.0 - static_cast<double>(tokens) / static_cast<double>(used * bs);
      utilization_sum += cache.utilization();
      fragmentation_sum += fragmentation;
      ++busy_steps;
      if (used > result.peak_blocks_used) {
        result.peak_blocks_used = used;
        result.fragmentation_at_peak = fragmentation;
      }
      result.max_running = std::max(result.max_running, running.size());
    }
    if (progress && result.completed + result.rejected >= next_progress) {
      progress({result.completed + result.rejected, total, step, cache.utilization()});
      next_progress += std::max<size_t>(1, total / 200);
    }
    ++step;
  }

  const auto end = std::chrono::steady_clock::now();
  result.steps = step;
  result.simulated_seconds = static_cast<double>(step) * trace_seconds_per_step;
  result.peak_utilization =
      static_cast<double>(result.peak_blocks_used) / static_cast<double>(options.num_blocks);
  result.mean_utilization = busy_steps ? utilization_sum / static_cast<double>(busy_steps) : 0;
  result.mean_fragmentation = busy_steps ? fragmentation_sum / static_cast<double>(busy_steps) : 0;
  result.wall_seconds = std::chrono::duration<double>(end - start).count();
  result.ops_per_second =
      result.wall_seconds > 0 ? static_cast<double>(result.operations) / result.wall_seconds : 0;
  result.leaked_blocks = cache.used_block_count();
  std::vector<double> waits;
  for (double q : queue_seconds) {
    if (q >= 0) waits.push_back(q);
  }
  if (!waits.empty()) {
    std::sort(waits.begin(), waits.end());
    double sum = 0;
    for (double q : waits)
      sum += q;
    result.mean_queue_seconds = sum / static_cast<double>(waits.size());
    result.p99_queue_seconds = waits[std::min(waits.size() - 1, waits.size() * 99 / 100)];
  }
  if (progress) progress({result.completed + result.rejected, total, step, cache.utilization()});
  return result;
}

}  // namespace kvfabric::bench
