// The progress reporter with a fake stream and an injected clock.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "bench/progress.h"

namespace kvfabric::bench {
namespace {

using ::testing::HasSubstr;

struct FakeStream {
  std::vector<std::string> writes;
  double now = 100;  // an arbitrary epoch: only differences count

  ProgressOutput output(bool terminal) {
    return {[this](std::string_view text) { writes.emplace_back(text); }, terminal,
            [this] { return now; }};
  }
};

ProgressSettings settings(double line_interval_s = 5, bool quiet = false) {
  ProgressSettings s;
  s.quiet = quiet;
  s.line_interval_s = line_interval_s;
  s.redraw_interval_s = 0.1;
  return s;
}

TEST(Progress, OffATerminalPrintsAPlainLineAtMostEveryInterval) {
  FakeStream stream;
  ProgressReporter p("replay test", 1280, "requests", settings(), stream.output(false));
  for (int done = 1; done <= 1280; ++done) {
    stream.now += 1.0 / 128;  // exact in binary: 10 s in all
    p.update(done);
  }
  // 10 s of work at a 5 s interval: one line at 5 s and one at 10 s, which already shows the end.
  p.finish();
  ASSERT_EQ(stream.writes.size(), 2u);
  for (const std::string& line : stream.writes) {
    EXPECT_EQ(line.back(), '\n');
    EXPECT_EQ(line.find('\r'), std::string::npos);
  }
  EXPECT_THAT(stream.writes[0], HasSubstr("[replay test] 50.0% (640/1280 requests)"));
  EXPECT_THAT(stream.writes[0], HasSubstr("128 requests/s"));
  EXPECT_THAT(stream.writes[0], HasSubstr("ETA 5.0s"));
  EXPECT_THAT(stream.writes[1], HasSubstr("100.0% (1280/1280 requests)"));
  EXPECT_THAT(stream.writes[1], HasSubstr("took 10s"));
}

TEST(Progress, FinishPrintsTheEndWhenTheLastLineWasEarlier) {
  FakeStream stream;
  ProgressReporter p("tail", 100, "requests", settings(), stream.output(false));
  stream.now += 6;
  p.update(60);  // printed: 6 s since the start
  stream.now += 1;
  p.update(100);  // not printed: 1 s since the last line
  p.finish();
  ASSERT_EQ(stream.writes.size(), 2u);
  EXPECT_THAT(stream.writes[1], HasSubstr("100.0% (100/100 requests)"));
}

TEST(Progress, ShortTasksOffATerminalPrintNothing) {
  FakeStream stream;
  {
    ProgressReporter p("short", 10, "requests", settings(), stream.output(false));
    for (int done = 1; done <= 10; ++done) {
      stream.now += 0.1;
      p.update(done);
    }
  }  // the destructor finishes
  EXPECT_TRUE(stream.writes.empty());
}

TEST(Progress, AZeroIntervalPrintsEveryUpdate) {
  FakeStream stream;
  ProgressReporter p("every", 3, "steps", settings(0), stream.output(false));
  for (int done = 1; done <= 3; ++done) {
    stream.now += 1;
    p.update(done, [done] { return "detail " + std::to_string(done); });
  }
  p.finish();  // the end is already printed: no second last line
  ASSERT_EQ(stream.writes.size(), 3u);
  EXPECT_THAT(stream.writes[1], HasSubstr("(2/3 steps), 1.00 steps/s, elapsed 2.0s, ETA 1.0s, detail 2"));
  EXPECT_THAT(stream.writes[2], HasSubstr("(3/3 steps), 1.00 steps/s, took 3.0s, detail 3"));
}

TEST(Progress, OnATerminalRedrawsOneBarInPlace) {
  FakeStream stream;
  ProgressReporter p("bar", 100, "requests", settings(), stream.output(true));
  for (int done = 1; done <= 100; ++done) {
    stream.now += 1.0 / 16;  // redraws at most every 0.1 s: every other update
    p.update(done);
  }
  p.finish();
  ASSERT_GE(stream.writes.size(), 40u);
  ASSERT_LE(stream.writes.size(), 60u);
  for (size_t i = 0; i + 1 < stream.writes.size(); ++i) {
    EXPECT_EQ(stream.writes[i].front(), '\r');
    EXPECT_EQ(stream.writes[i].find('\n'), std::string::npos);
  }
  EXPECT_THAT(stream.writes.front(), HasSubstr("[bar] [........................]   1.0% 1/100"));  // drawn at the first update
  EXPECT_THAT(stream.writes.back(), HasSubstr("[########################] 100.0% 100/100"));
  EXPECT_EQ(stream.writes.back().back(), '\n');  // the finished bar stays on its own line
}

TEST(Progress, QuietOrHiddenPrintsNothing) {
  for (const bool terminal : {false, true}) {
    FakeStream stream;
    {
      ProgressReporter p("quiet", 10, "requests", settings(0, /*quiet=*/true), stream.output(terminal));
      for (int done = 1; done <= 10; ++done) {
        stream.now += 10;
        p.update(done, [] { return std::string("never asked"); });
      }
    }
    EXPECT_TRUE(stream.writes.empty());
  }
}

TEST(Progress, DetailIsOnlyFormattedWhenALineIsPrinted) {
  FakeStream stream;
  int formatted = 0;
  ProgressReporter p("lazy", 1000, "requests", settings(), stream.output(false));
  for (int done = 1; done < 1000; ++done) {
    stream.now += 0.001;  // 1 s in all: below the interval
    p.update(done, [&] {
      ++formatted;
      return std::string();
    });
  }
  EXPECT_EQ(formatted, 0);
  EXPECT_TRUE(stream.writes.empty());
}

TEST(Progress, FormatsCountsAndDurations) {
  EXPECT_EQ(ProgressReporter::compact(0.5), "0.50");
  EXPECT_EQ(ProgressReporter::compact(42), "42");
  EXPECT_EQ(ProgressReporter::compact(12345), "12.3k");
  EXPECT_EQ(ProgressReporter::compact(1.5e6), "1.50M");
  EXPECT_EQ(ProgressReporter::duration(3.25), "3.2s");
  EXPECT_EQ(ProgressReporter::duration(42), "42s");
  EXPECT_EQ(ProgressReporter::duration(185), "3m05s");
  EXPECT_EQ(ProgressReporter::duration(3720), "1h02m");
}

}  // namespace
}  // namespace kvfabric::bench
