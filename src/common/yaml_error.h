// The ParseError an operator reads when yaml-cpp could not parse a config or tenants file: the
// source, the line where yaml-cpp knows one, and what was wrong (yaml-cpp's own text for too
// deep a nesting is "bad file").
#pragma once

#include <yaml-cpp/depthguard.h>
#include <yaml-cpp/exceptions.h>

#include <string>
#include <string_view>

#include "kvfabric/common/status.h"

namespace kvfabric::detail {

inline Status yaml_parse_error(const YAML::Exception& e, std::string_view source) {
  const bool too_deep = dynamic_cast<const YAML::DeepRecursion*>(&e) != nullptr;
  return Status(ErrorCode::kParseError,
                std::string(source) +
                    (e.mark.is_null() ? std::string() : ":" + std::to_string(e.mark.line + 1)) +
                    ": " + (too_deep ? "nested too deeply (yaml-cpp reads 2000 levels)" : e.msg));
}

}  // namespace kvfabric::detail
