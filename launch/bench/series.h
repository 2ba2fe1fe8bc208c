// Compact shapes of long measurements for the --json results, so that a figure can be drawn from
// a file of a few kilobytes: a per-step series folded into at most N buckets, and a histogram
// with fixed log-spaced bins.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvfabric::bench {

//! One value per step, kept as at most `max_points` buckets of `steps_per_point()` consecutive
//! steps (a power of two) with their mean and maximum. When the buckets run out, neighbours merge
//! and the span doubles, so the memory stays bounded however long the run. Depends only on the
//! values added (no clock).
class DownsampledSeries {
 public:
  explicit DownsampledSeries(size_t max_points = 2000);

  void add(double value);

  uint64_t steps_per_point() const { return span_; }
  uint64_t samples() const { return samples_; }
  size_t points() const { return buckets_.size(); }
  //! Per bucket; the last bucket may cover fewer steps than the others.
  std::vector<double> means() const;
  std::vector<double> maxima() const;

 private:
  struct Bucket {
    double sum = 0;
    double max = 0;
    uint64_t count = 0;
  };
  size_t max_points_;
  uint64_t span_ = 1;
  uint64_t samples_ = 0;
  std::vector<Bucket> buckets_;
};

//! Counts in fixed log-spaced bins: bin i covers [lowest * 2^(i/per_octave),
//! lowest * 2^((i+1)/per_octave)). Values below `lowest` count in the first bin, values at or
//! above `highest` in the last. Fixed edges, so histograms of different runs compare bin by bin.
class LogHistogram {
 public:
  LogHistogram(double lowest, double highest, int bins_per_octave);

  void add(double value);

  const std::vector<uint64_t>& counts() const { return counts_; }
  std::vector<double> edges() const;  //!< counts().size() + 1 bin edges
  uint64_t total() const { return total_; }

 private:
  double lowest_;
  int per_octave_;
  std::vector<uint64_t> counts_;
  uint64_t total_ = 0;
};

}  // namespace kvfabric::bench
