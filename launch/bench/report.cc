#include "bench/report.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

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

namespace {

std::filesystem::path folder_of(const std::string& path) {
  const std::filesystem::path p(path);
  return p.has_parent_path() ? p.parent_path() : std::filesystem::path(".");
}

// Whether write_json replaces `path` through a scratch file: a new file, or a plain file (not a
// link, no other hard link: those would keep the old results) in a folder that takes a new file.
// Anything else (/dev/stdout, a pipe, a link, a file in a read-only folder) is written in place.
bool replaced_through_scratch(const std::string& path) {
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) return errno == ENOENT;
  return S_ISREG(st.st_mode) && st.st_nlink == 1 && access(folder_of(path).c_str(), W_OK) == 0;
}

}  // namespace

Status check_json_writable(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ignored;
  const fs::file_status target = fs::status(path, ignored);  // through links: /dev/stdout is fine
  const auto refuse = [&path](const std::string& why) {
    return Status(ErrorCode::kIoError, "cannot write results to '" + path + "': " + why);
  };
  if (fs::is_directory(target)) return refuse("it is a directory");
  if (fs::exists(target)) {
    return access(path.c_str(), W_OK) == 0 ? ok_status() : refuse(std::strerror(errno));
  }
  const fs::path folder = folder_of(path);
  if (access(folder.c_str(), W_OK) != 0) {
    return refuse("its folder '" + folder.string() + "': " + std::strerror(errno));
  }
  return ok_status();
}

std::string json_scratch_path(const std::string& path) {
  return (folder_of(path) / (".kvfabric-results-" + std::to_string(getpid()))).string();
}

Status write_json(const std::string& path, const nlohmann::json& results) {
  const std::string text = results.dump(2) + "\n";  // before any file is opened
  // Replaced whole where it can be (replaced_through_scratch): the text goes to a scratch file
  // beside it, flushed to disk, given the old file's permissions and renamed over it, so a
  // failed write or a crash leaves the previous results rather than half of the new ones.
  const bool replace = replaced_through_scratch(path);
  const std::string written = replace ? json_scratch_path(path) : path;
  const auto failed = [&](const std::string& what) {
    const std::string why = std::strerror(errno);
    if (replace) std::remove(written.c_str());
    return Status(ErrorCode::kIoError, what + " results to '" + path + "': " + why);
  };
  std::FILE* out = std::fopen(written.c_str(), "wb");
  if (out == nullptr) return failed("cannot write");
  const bool wrote = std::fwrite(text.data(), 1, text.size(), out) == text.size() &&
                     std::fflush(out) == 0 && (!replace || fsync(fileno(out)) == 0);
  if (std::fclose(out) != 0 || !wrote) return failed("failed writing");
  if (!replace) return ok_status();
  struct stat old {};
  if (stat(path.c_str(), &old) == 0) chmod(written.c_str(), old.st_mode & 07777);
  if (std::rename(written.c_str(), path.c_str()) != 0) return failed("cannot move the new");
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
