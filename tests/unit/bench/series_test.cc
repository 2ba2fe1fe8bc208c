// The compact series and histogram of the replay JSON.
#include <gtest/gtest.h>

#include <vector>

#include "bench/series.h"

namespace kvfabric::bench {
namespace {

TEST(DownsampledSeries, KeepsEveryStepUntilTheBucketsRunOut) {
  DownsampledSeries series(4);
  for (double v : {1.0, 5.0, 2.0}) series.add(v);
  EXPECT_EQ(series.steps_per_point(), 1u);
  EXPECT_EQ(series.means(), (std::vector<double>{1, 5, 2}));
  EXPECT_EQ(series.maxima(), (std::vector<double>{1, 5, 2}));
}

TEST(DownsampledSeries, MergesNeighboursAndDoublesTheSpan) {
  DownsampledSeries series(4);
  for (double v : {1.0, 3.0, 0.0, 8.0, 4.0}) series.add(v);
  // Four buckets were full: they merged into two of two steps, and 4 starts a third.
  EXPECT_EQ(series.steps_per_point(), 2u);
  EXPECT_EQ(series.means(), (std::vector<double>{2, 4, 4}));
  EXPECT_EQ(series.maxima(), (std::vector<double>{3, 8, 4}));
  EXPECT_EQ(series.samples(), 5u);
}

TEST(DownsampledSeries, StaysBoundedAndKeepsTheTotal) {
  DownsampledSeries series(2000);
  double sum = 0;
  for (int step = 0; step < 100'003; ++step) {
    const double waiting = step % 50;
    series.add(waiting);
    sum += waiting;
  }
  EXPECT_LE(series.points(), 2000u);
  EXPECT_GT(series.points(), 1000u);
  EXPECT_EQ(series.steps_per_point(), 64u);
  const std::vector<double> means = series.means();
  double rebuilt = 0;
  for (size_t i = 0; i < means.size(); ++i) {
    const uint64_t steps = i + 1 < means.size()
                               ? series.steps_per_point()
                               : series.samples() - i * series.steps_per_point();
    rebuilt += means[i] * static_cast<double>(steps);
  }
  EXPECT_DOUBLE_EQ(rebuilt, sum);
  for (double m : series.maxima()) EXPECT_EQ(m, 49.0);  // every bucket spans a whole cycle of 50
}

TEST(LogHistogram, BinsByPowersOfTwoWithOpenEnds) {
  LogHistogram h(1.0, 16.0, 1);  // bins [1,2) [2,4) [4,8) [8,16)
  ASSERT_EQ(h.counts().size(), 4u);
  EXPECT_EQ(h.edges(), (std::vector<double>{1, 2, 4, 8, 16}));
  for (double v : {0.01, 1.0, 1.99, 2.0, 7.9, 8.0, 15.9, 16.0, 1e9}) h.add(v);
  EXPECT_EQ(h.counts(), (std::vector<uint64_t>{3, 1, 1, 4}));
  EXPECT_EQ(h.total(), 9u);
}

TEST(LogHistogram, QuarterOctaveBinsOfTheAdmissionTimes) {
  LogHistogram h(0.125, 65536, 4);
  EXPECT_EQ(h.counts().size(), 76u);  // 19 octaves
  h.add(1.0);                         // 3 octaves up: bin 12
  EXPECT_EQ(h.counts()[12], 1u);
  EXPECT_DOUBLE_EQ(h.edges().back(), 65536);
}

}  // namespace
}  // namespace kvfabric::bench
