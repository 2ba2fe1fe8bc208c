// Progress of a long kvfabric-bench routine on stderr: on a terminal a bar redrawn in place, off a
// terminal (a log, a pipe, CI) a plain line at most every few seconds; both with done/total, rate
// and ETA. The clock is read for display only: nothing a routine decides or reports depends on it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace kvfabric::bench {

//! Process-wide settings, set once by kvfabric-bench's main from its global options.
struct ProgressSettings {
  bool quiet = false;               //!< --quiet: no progress at all
  double line_interval_s = 5.0;     //!< off a terminal: seconds between plain lines
  double redraw_interval_s = 0.1;   //!< on a terminal: seconds between redraws of the bar
};
void set_progress_settings(const ProgressSettings& settings);
const ProgressSettings& progress_settings();

//! Where a reporter writes and what time it is; tests inject a fake stream and clock.
struct ProgressOutput {
  std::function<void(std::string_view)> write;  //!< receives whole lines or \r-redraws
  bool terminal = false;
  std::function<double()> now_s;  //!< monotonic seconds
};
//! stderr (a terminal when isatty says so) and std::chrono::steady_clock.
ProgressOutput stderr_progress_output();

//! One task's progress: `update(done)` as work completes, `finish()` (or the destructor) at the
//! end. Cheap enough to call once per request or step: it only formats when it will print.
class ProgressReporter {
 public:
  //! `label` names the task ("replay global-migration"), `unit` what is counted ("requests").
  //! `show` = false (e.g. on MPI ranks other than 0) or the global --quiet silence it entirely.
  ProgressReporter(std::string label, uint64_t total, std::string unit, bool show = true);
  ProgressReporter(std::string label, uint64_t total, std::string unit,
                   const ProgressSettings& settings, ProgressOutput output);
  ~ProgressReporter();
  ProgressReporter(const ProgressReporter&) = delete;
  ProgressReporter& operator=(const ProgressReporter&) = delete;

  //! `done` of `total` finished; `detail` (e.g. "hit 0.2971") is shown after the figures and is
  //! only evaluated when a line is printed.
  void update(uint64_t done, const std::function<std::string()>& detail = nullptr);
  //! Ends the bar with a newline on a terminal; off a terminal prints a last line only when
  //! earlier lines were printed (short tasks stay silent). Idempotent.
  void finish();

  //! "12.3k", "1.50M": counts and rates in the lines.
  static std::string compact(double value);
  //! "42s", "3m05s", "1h02m".
  static std::string duration(double seconds);

 private:
  std::string render(uint64_t done, double elapsed, const std::string& detail, bool bar) const;

  std::string label_;
  uint64_t total_;
  std::string unit_;
  bool enabled_;
  ProgressSettings settings_;
  ProgressOutput out_;
  double start_s_ = 0;
  double last_print_s_ = 0;
  uint64_t done_ = 0;
  std::string last_detail_;
  bool printed_ = false;  // a line or a bar is on the stream
  uint64_t printed_done_ = 0;  // the count the last line or bar showed
  bool finished_ = false;
};

}  // namespace kvfabric::bench
