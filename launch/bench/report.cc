#include "bench/report.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

namespace kvfabric::bench {

std::string Table::to_string() const {
  std::vector<size_t> width(header_.size(), 0);
  auto widen = [&](const std::vector<std::string>& row) {
    for (size_t c = 0; c < row.size() && c < width.size(); ++c)
      width[c] = std::max(width[c], row[c].size());
  };
  widen(header_);
  for (const auto& row : rows_)
    widen(row);
  std::string out;
  auto emit = [&](const std::vector<std::string>& row) {
    for (size_t c = 0; c < width.size(); ++c) {
      const std::string cell = c < row.size() ? row[c] : "";
      // First column left-aligned (labels), the rest right-aligned (numbers).
      out +=
          c == 0 ? fmt::format("{:<{}}", cell, width[c]) : fmt::format("  {:>{}}", cell, width[c]);
    }
    out += "\n";
  };
  emit(header_);
  size_t total = 0;
  for (size_t w : width)
    total += w + 2;
  out += std::string(total - 2, '-') + "\n";
  for (const auto& row : rows_)
    emit(row);
  return out;
}

Status check_json_writable(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ignored;
  const fs::file_status target = fs::status(path, ignored);  // through links: /dev/stdout is fine
  const auto refuse = [&path](const std::string& why) {
    return Status(ErrorCode::kIoError, "cannot write results to '" + path + "': " + why);
  };
  if (fs::is_directory(target)) return refuse("it is a directory");
  if (fs::exists(target) && access(path.c_str(), W_OK) != 0) return refuse(std::strerror(errno));
  // A plain file is replaced through a file beside it (write_json), so its folder must take one.
  if (fs::exists(target) && !fs::is_regular_file(fs::symlink_status(path, ignored))) {
    return ok_status();
  }
  const fs::path folder = fs::path(path).has_parent_path() ? fs::path(path).parent_path() : ".";
  if (access(folder.c_str(), W_OK) != 0) {
    return refuse("its folder '" + folder.string() + "': " + std::strerror(errno));
  }
  return ok_status();
}

std::string json_scratch_path(const std::string& path) {
  return path + ".partial-" + std::to_string(getpid());
}

Status write_json(const std::string& path, const nlohmann::json& results) {
  namespace fs = std::filesystem;
  const std::string text = results.dump(2) + "\n";  // before any file is opened
  // A plain file, or a new one, is replaced whole: the text goes to a file beside it that is
  // renamed over it once written, so a failed write leaves the previous results intact rather
  // than half of the new ones. A link, /dev/stdout or a pipe is written in place.
  std::error_code ignored;
  const fs::file_status target = fs::symlink_status(path, ignored);
  const bool replace = !fs::exists(target) || fs::is_regular_file(target);
  const std::string written = replace ? json_scratch_path(path) : path;
  const auto failed = [&](const std::string& what) {
    if (replace) fs::remove(written, ignored);
    return Status(ErrorCode::kIoError, what + " results to '" + path + "'");
  };
  std::ofstream out(written, std::ios::binary);
  if (!out) return failed("cannot write");
  out << text;
  out.close();
  if (!out) return failed("failed writing");
  if (replace) {
    fs::rename(written, path, ignored);
    if (ignored) return failed("cannot move (" + ignored.message() + ")");
  }
  return ok_status();
}

std::string format_percent(double fraction, int decimals) {
  return fmt::format("{:.{}f}%", fraction * 100.0, decimals);
}

std::string format_count(double value) {
  if (value >= 1e9) return fmt::format("{:.2f}G", value / 1e9);
  if (value >= 1e6) return fmt::format("{:.2f}M", value / 1e6);
  if (value >= 1e3) return fmt::format("{:.1f}k", value / 1e3);
  return fmt::format("{:.0f}", value);
}

}  // namespace kvfabric::bench
