#include "bench/series.h"

#include <algorithm>
#include <cmath>

namespace kvfabric::bench {

// An even number of buckets, so that merging pairs leaves only full buckets behind.
DownsampledSeries::DownsampledSeries(size_t max_points)
    : max_points_(std::max<size_t>(2, max_points & ~size_t{1})) {
  buckets_.reserve(max_points_);
}

void DownsampledSeries::add(double value) {
  if (buckets_.empty() || buckets_.back().count == span_) {
    if (buckets_.size() == max_points_) {
      for (size_t i = 0; i < max_points_ / 2; ++i) {
        const Bucket& a = buckets_[2 * i];
        const Bucket& b = buckets_[2 * i + 1];
        buckets_[i] = {a.sum + b.sum, std::max(a.max, b.max), a.count + b.count};
      }
      buckets_.resize(max_points_ / 2);
      span_ *= 2;
    }
    buckets_.push_back({0, value, 0});
  }
  Bucket& last = buckets_.back();
  last.sum += value;
  last.max = std::max(last.max, value);
  ++last.count;
  ++samples_;
}

std::vector<double> DownsampledSeries::means() const {
  std::vector<double> out;
  out.reserve(buckets_.size());
  for (const Bucket& b : buckets_) out.push_back(b.sum / static_cast<double>(b.count));
  return out;
}

std::vector<double> DownsampledSeries::maxima() const {
  std::vector<double> out;
  out.reserve(buckets_.size());
  for (const Bucket& b : buckets_) out.push_back(b.max);
  return out;
}

LogHistogram::LogHistogram(double lowest, double highest, int bins_per_octave)
    : lowest_(lowest), per_octave_(std::max(1, bins_per_octave)) {
  const double octaves = std::log2(std::max(highest, lowest * 2) / lowest);
  counts_.assign(static_cast<size_t>(std::ceil(octaves * per_octave_)), 0);
}

void LogHistogram::add(double value) {
  size_t bin = 0;
  if (value > lowest_) {
    const double position = std::floor(std::log2(value / lowest_) * per_octave_);
    bin = static_cast<size_t>(std::min(position, static_cast<double>(counts_.size() - 1)));
  }
  ++counts_[bin];
  ++total_;
}

std::vector<double> LogHistogram::edges() const {
  std::vector<double> out;
  out.reserve(counts_.size() + 1);
  for (size_t i = 0; i <= counts_.size(); ++i) {
    out.push_back(lowest_ * std::exp2(static_cast<double>(i) / per_octave_));
  }
  return out;
}

}  // namespace kvfabric::bench
