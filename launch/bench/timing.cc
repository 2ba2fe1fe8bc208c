#include "bench/timing.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstring>
#include <memory>

namespace kvfabric::bench {
namespace {

// A page-touched buffer, so first-touch page faults stay out of the timings.
std::unique_ptr<uint8_t[]> touched_buffer(uint64_t bytes) {
  std::unique_ptr<uint8_t[]> buffer(new uint8_t[bytes]);
  for (uint64_t i = 0; i < bytes; i += 4096)
    buffer[i] = static_cast<uint8_t>(i);
  std::memset(buffer.get(), 1, bytes);
  return buffer;
}

}  // namespace

double median_seconds(const std::function<void()>& fn, int warmup, int iterations) {
  for (int i = 0; i < warmup; ++i)
    fn();
  std::vector<double> times;
  for (int i = 0; i < iterations; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    times.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

double memcpy_bandwidth(uint64_t bytes, int threads, int iterations) {
  auto src = touched_buffer(bytes);
  auto dst = touched_buffer(bytes);
  const int64_t chunk = static_cast<int64_t>((bytes + threads - 1) / threads);
  const double seconds = median_seconds(
      [&] {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int t = 0; t < threads; ++t) {
          const int64_t begin = t * chunk;
          const int64_t end = std::min<int64_t>(begin + chunk, static_cast<int64_t>(bytes));
          if (begin < end) std::memcpy(dst.get() + begin, src.get() + begin, end - begin);
        }
      },
      1, iterations);
  return static_cast<double>(bytes) / seconds;
}

double read_bandwidth(uint64_t bytes, int threads, int iterations) {
  auto buffer = touched_buffer(bytes);
  const auto* words = reinterpret_cast<const uint64_t*>(buffer.get());
  const int64_t n = static_cast<int64_t>(bytes / 8);
  volatile uint64_t sink = 0;
  const double seconds = median_seconds(
      [&] {
        uint64_t sum = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : sum) schedule(static)
        for (int64_t i = 0; i < n; ++i)
          sum += words[i];
        sink = sink + sum;
      },
      1, iterations);
  return static_cast<double>(bytes) / seconds;
}

LatencySummary summarize_latencies(std::vector<double> samples) {
  LatencySummary out;
  if (samples.empty()) return out;
  double sum = 0;
  for (double v : samples) sum += v;
  out.mean = sum / static_cast<double>(samples.size());
  std::sort(samples.begin(), samples.end());
  const auto rank = [&](double q) {  // nearest rank
    const auto k = static_cast<size_t>(std::ceil(q * static_cast<double>(samples.size())));
    return samples[std::clamp<size_t>(k, 1, samples.size()) - 1];
  };
  out.p50 = rank(0.50);
  out.p90 = rank(0.90);
  out.p99 = rank(0.99);
  out.p999 = rank(0.999);
  out.max = samples.back();
  return out;
}

}  // namespace kvfabric::bench
