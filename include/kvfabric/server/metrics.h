// Prometheus text exposition of a coordinator's state, for the control plane's /metrics.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "kvfabric/coordinator/coordinator.h"

namespace kvfabric {

struct ControlStats;

//! \brief The coordinator's counters (admissions, prefix hits, migrations, swaps, preemptions,
//! steps) and every replica's device pool (used, cached, free blocks) and host tier, in the
//! Prometheus text format (version 0.0.4), names prefixed `kvfabric_`. With `requests`, also
//! the control plane's request counts by op and outcome. Engines that drive the Coordinator
//! in process can serve this themselves.
std::string render_metrics(const Coordinator& coordinator, const ControlStats* requests = nullptr);

//! A label value as the text format wants it: backslash, quote and newline escaped.
std::string prometheus_label_value(std::string_view text);

//! One sample of a metric family: its labels (`a="x",b="y"`, empty for none) and its value.
struct MetricSample {
  std::string labels;
  double value = 0;
};
//! Appends a metric family (HELP, TYPE, then each sample) in the Prometheus text format.
void append_metric_family(std::string& out, std::string_view name, std::string_view type,
                          std::string_view help, std::span<const MetricSample> samples);

//! \brief How long something took, as a Prometheus histogram: cumulative buckets from 1 µs to
//! 10 s (1, 2.5, 5 per decade), their sum and count. For reporting only: nothing decides on it.
//! Not thread-safe.
class LatencyHistogram {
 public:
  static constexpr std::array<double, 22> kBounds = {
      1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3,
      5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,    0.25,  0.5,  1,      2.5,    5,      10};

  void observe(std::chrono::nanoseconds took);
  [[nodiscard]] uint64_t count() const { return count_; }
  //! The family `name` (which ends in _seconds): _bucket{le=...}, _sum and _count.
  void render(std::string& out, std::string_view name, std::string_view help) const;

 private:
  std::array<uint64_t, kBounds.size() + 1> counts_{};  // per bucket, the last one above 10 s
  double sum_seconds_ = 0;
  uint64_t count_ = 0;
};

}  // namespace kvfabric
