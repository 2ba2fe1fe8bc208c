#include <cstdlib>
#include <string>

#include "common/log.h"
#include "config/config_fields.h"
#include "kvfabric/config/config.h"

namespace kvfabric {

Status apply_env_overrides(Config& config, const EnvLookup& lookup) {
  const EnvLookup get =
      lookup ? lookup : EnvLookup([](const char* name) { return std::getenv(name); });
  Config updated = config;
  std::vector<std::string> applied;
  for (const auto& field : detail::config_fields()) {
    const std::string var = env_var_for_key(field.key);
    const char* value = get(var.c_str());
    if (value == nullptr) continue;
    const Status status = field.set(updated, value);
    if (!status.ok()) return invalid_argument(var + ": " + status.message());
    applied.push_back(var + "=" + value);
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
