// A config or tenants file is one YAML document. yaml-cpp's Load reads the first and ignores any
// after a '---' (its LoadAll, which would see them, never returns on some inputs), so the markers
// are found in the text itself.
#pragma once

#include <string_view>

#include "kvfabric/common/status.h"

namespace kvfabric::detail {

//! InvalidArgument naming `source` and the line when `yaml_text` (UTF-8) holds more than one
//! document: a '---' after content or after another '---', or content after a '...'. YAML allows
//! document markers only at the start of a line, and a marker line inside a quoted scalar or a
//! flow collection fails yaml-cpp's own parse, so a scan of the lines finds every other one.
Status check_single_yaml_document(std::string_view yaml_text, std::string_view source);

}  // namespace kvfabric::detail
