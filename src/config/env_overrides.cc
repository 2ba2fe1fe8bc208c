#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/log.h"
#include "config/config_fields.h"
#include "kvfabric/config/config.h"

extern char** environ;  // POSIX: the process environment

namespace kvfabric {
namespace {

constexpr std::string_view kPrefix = "KVF_";

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// A KVF_ variable that is no key's, but looks meant for one: it starts with a section's prefix
// (KVF_CACHE_...) or is within two edits of a key's variable (KVF_CAHCE_BLOCK_SIZE). Other KVF_
// variables (KVF_LOG, KVF_CPU_ISA, a tool's own) are not config and pass.
Status check_variable_name(const std::string& name, const std::vector<std::string>& known) {
  if (std::find(known.begin(), known.end(), name) != known.end()) return ok_status();
  const std::string* closest = nullptr;
  size_t best = SIZE_MAX;
  bool in_a_section = false;
  for (const std::string& var : known) {
    const size_t section_end = var.find('_', kPrefix.size());
    in_a_section = in_a_section || name.rfind(var.substr(0, section_end + 1), 0) == 0;
    const size_t d = edit_distance(name, var);
    if (d < best) {
      best = d;
      closest = &var;
    }
  }
  if (!in_a_section && best > 2) return ok_status();
  return invalid_argument(name + " is not a configuration variable (did you mean " + *closest +
                          "? every key has one: KVF_ and the dotted key in capitals)");
}

}  // namespace

Environment process_environment() {
  Environment env;
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    const std::string_view text(*entry);
    const size_t eq = text.find('=');
    if (eq == std::string_view::npos || text.substr(0, kPrefix.size()) != kPrefix) continue;
    env.emplace(std::string(text.substr(0, eq)), std::string(text.substr(eq + 1)));
  }
  return env;
}

Status apply_env_overrides(Config& config, const Environment& env) {
  std::vector<std::string> known;
  for (const auto& field : detail::config_fields()) known.push_back(env_var_for_key(field.key));
  for (const auto& [name, value] : env) {
    if (name.rfind(kPrefix, 0) == 0) KVF_RETURN_IF_ERROR(check_variable_name(name, known));
  }
  Config updated = config;
  std::vector<std::string> applied;
  for (const auto& field : detail::config_fields()) {
    const std::string var = env_var_for_key(field.key);
    const auto it = env.find(var);
    if (it == env.end()) continue;
    const Status status = field.set(updated, it->second);
    if (!status.ok()) return invalid_argument(var + ": " + status.message());
    applied.push_back(var + "=" + it->second);
  }
  if (applied.empty()) return ok_status();
  const Status status = validate(updated);
  if (!status.ok()) {
    return Status(status.code(), status.message() + " (after environment overrides)");
  }
  for (const auto& item : applied)
    KVF_LOG_INFO(kConfig, "{} set by environment", item);
  config = std::move(updated);
  return ok_status();
}

}  // namespace kvfabric
