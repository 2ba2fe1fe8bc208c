// Output helpers shared by the kvfabric-bench routines: aligned text tables and the --json
// results file (progress is in progress.h).
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "kvfabric/common/status.h"

namespace kvfabric::bench {

//! A text table: a header row and data rows, printed with aligned columns.
class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
  void add_row(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  [[nodiscard]] std::string to_string() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

//! IoError naming `path` and why when results could not be written there (a directory, no write
//! permission on it or its folder): checked before a run, so that a long replay does not end in
//! an unwritable --json. Nothing is created or changed.
Status check_json_writable(const std::string& path);
//! Writes `results` to `path` (pretty-printed). A new or plain file is replaced whole or not at
//! all, keeping its permissions; a link, a device, a pipe, a file with other hard links or in a
//! read-only folder is written in place. IoError names the path and why.
Status write_json(const std::string& path, const nlohmann::json& results);
//! The file beside `path` that write_json() writes before renaming it over `path`.
std::string json_scratch_path(const std::string& path);

std::string format_percent(double fraction, int decimals = 1);
std::string format_count(double value);  //!< 1234567 -> "1.23M"

}  // namespace kvfabric::bench
