// The table of settable config keys: one entry per key, shared by the YAML loader, the
// environment overrides and the dump, so the three can never disagree on names or formats.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "kvfabric/config/config.h"

namespace kvfabric::detail {

struct ConfigField {
  std::string_view key;  //!< dotted path, e.g. "cache.eviction.threshold"
  std::string_view help;
  //! Parses `text` into the field; the message names the key and the expected format.
  std::function<Status(Config&, std::string_view text)> set;
  //! The field's value as YAML scalar text.
  std::function<std::string(const Config&)> get;
};

const std::vector<ConfigField>& config_fields();
const ConfigField* find_config_field(std::string_view key);

}  // namespace kvfabric::detail
