// Reading a small text file an operator names (a config, a tenants file), with the errors an
// operator needs: what the path is, and no endless read.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "kvfabric/common/status.h"

namespace kvfabric {

//! The whole of the file at `path` (a config, a tenants file, a trace), at most `max_bytes` of it. IoError naming `what` and the
//! path when it cannot be opened, is a directory, or holds more (/dev/zero, a runaway pipe).
Result<std::string> read_text_file(const std::string& path, std::string_view what,
                                   size_t max_bytes = size_t{16} << 20);

}  // namespace kvfabric
