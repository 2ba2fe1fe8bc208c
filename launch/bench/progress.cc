#include "bench/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

namespace kvfabric::bench {
namespace {

ProgressSettings& mutable_settings() {
  static ProgressSettings settings;
  return settings;
}

constexpr int kBarWidth = 24;

}  // namespace

void set_progress_settings(const ProgressSettings& settings) { mutable_settings() = settings; }
const ProgressSettings& progress_settings() { return mutable_settings(); }

ProgressOutput stderr_progress_output() {
  ProgressOutput out;
  out.write = [](std::string_view text) {
    std::fwrite(text.data(), 1, text.size(), stderr);
    std::fflush(stderr);
  };
  out.terminal = isatty(STDERR_FILENO) != 0;
  out.now_s = [] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  };
  return out;
}

ProgressReporter::ProgressReporter(std::string label, uint64_t total, std::string unit, bool show)
    : ProgressReporter(std::move(label), total, std::move(unit), progress_settings(),
                       stderr_progress_output()) {
  enabled_ = enabled_ && show;
}

ProgressReporter::ProgressReporter(std::string label, uint64_t total, std::string unit,
                                   const ProgressSettings& settings, ProgressOutput output)
    : label_(std::move(label)),
      total_(total),
      unit_(std::move(unit)),
      enabled_(!settings.quiet),
      settings_(settings),
      out_(std::move(output)) {
  if (enabled_) start_s_ = last_print_s_ = out_.now_s();
}

ProgressReporter::~ProgressReporter() { finish(); }

void ProgressReporter::update(uint64_t done, const std::function<std::string()>& detail) {
  if (!enabled_ || finished_) return;
  done_ = done;
  const bool complete = done >= total_;
  // The last detail is kept for finish(), which has no detail of its own.
  if (complete && detail) last_detail_ = detail();
  const double now = out_.now_s();
  const double interval = out_.terminal ? settings_.redraw_interval_s : settings_.line_interval_s;
  // On a terminal the bar appears at once; off one the first line waits an interval, so that
  // short tasks print nothing to logs.
  const bool due = (out_.terminal && !printed_) || now - last_print_s_ >= interval;
  if (!due) return;
  if (!complete && detail) last_detail_ = detail();
  last_print_s_ = now;
  printed_ = true;
  printed_done_ = done;
  const std::string text = render(done, now - start_s_, last_detail_, out_.terminal);
  out_.write(out_.terminal ? "\r" + text + "\x1b[K" : text + "\n");
}

void ProgressReporter::finish() {
  if (finished_) return;
  finished_ = true;
  if (!enabled_ || !printed_) return;
  // The end was already shown: only end the bar's line.
  if (printed_done_ == done_ && done_ >= total_) {
    if (out_.terminal) out_.write("\n");
    return;
  }
  const std::string text = render(done_, out_.now_s() - start_s_, last_detail_, out_.terminal);
  out_.write(out_.terminal ? "\r" + text + "\x1b[K\n" : text + "\n");
}

std::string ProgressReporter::render(uint64_t done, double elapsed, const std::string& detail,
                                     bool bar) const {
  const double fraction =
      total_ == 0 ? 1.0 : std::min(1.0, static_cast<double>(done) / static_cast<double>(total_));
  const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0.0;
  std::string eta;
  if (done >= total_) {
    eta = "took " + duration(elapsed);
  } else if (rate > 0) {
    eta = "ETA " + duration(static_cast<double>(total_ - done) / rate);
  } else {
    eta = "ETA ?";
  }
  const std::string rate_text = fmt::format("{} {}/s", compact(rate), unit_);
  std::string out;
  if (bar) {
    const int filled = static_cast<int>(std::lround(fraction * kBarWidth));
    out = fmt::format("[{}] [{}{}] {:5.1f}% {}/{} {}, {}, {}", label_, std::string(filled, '#'),
                      std::string(kBarWidth - filled, '.'), 100.0 * fraction, done, total_, unit_,
                      rate_text, eta);
  } else {
    const std::string elapsed_text = done >= total_ ? "" : ", elapsed " + duration(elapsed);
    out = fmt::format("[{}] {:.1f}% ({}/{} {}), {}{}, {}", label_, 100.0 * fraction, done, total_,
                      unit_, rate_text, elapsed_text, eta);
  }
  if (!detail.empty()) out += ", " + detail;
  return out;
}

std::string ProgressReporter::compact(double value) {
  if (value >= 1e9) return fmt::format("{:.2f}G", value / 1e9);
  if (value >= 1e6) return fmt::format("{:.2f}M", value / 1e6);
  if (value >= 1e3) return fmt::format("{:.1f}k", value / 1e3);
  if (value >= 10) return fmt::format("{:.0f}", value);
  return fmt::format("{:.2f}", value);
}

std::string ProgressReporter::duration(double seconds) {
  seconds = std::max(0.0, seconds);
  if (seconds < 10) return fmt::format("{:.1f}s", seconds);
  const auto s = static_cast<uint64_t>(std::lround(seconds));
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}h{:02}m", s / 3600, s % 3600 / 60);
}

}  // namespace kvfabric::bench
