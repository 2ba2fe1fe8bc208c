// Timing helpers and in-run bandwidth baselines for the kernel benchmarks.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace kvfabric::bench {

//! Median wall time of `iterations` calls after `warmup` untimed calls, in seconds.
double median_seconds(const std::function<void()>& fn, int warmup, int iterations);

//! Bytes copied per second by memcpy of a `bytes`-sized buffer, split over `threads` threads
//! (each byte is read once and written once).
double memcpy_bandwidth(uint64_t bytes, int threads, int iterations);
//! Bytes read per second by a streaming sum over a `bytes`-sized buffer on `threads` threads.
double read_bandwidth(uint64_t bytes, int threads, int iterations);

//! Mean and nearest-rank percentiles of a set of latencies (all 0 when there are none).
struct LatencySummary {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, p999 = 0, max = 0;
};
LatencySummary summarize_latencies(std::vector<double> samples);

}  // namespace kvfabric::bench
