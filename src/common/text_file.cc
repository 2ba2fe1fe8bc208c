#include "kvfabric/common/text_file.h"

#include <filesystem>
#include <fstream>

namespace kvfabric {

Result<std::string> read_text_file(const std::string& path, std::string_view what,
                                   size_t max_bytes) {
  const std::string named = std::string(what) + " '" + path + "'";
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return Status(ErrorCode::kIoError, named + " is a directory");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status(ErrorCode::kIoError, "cannot open " + named);
  std::string text;
  char chunk[1 << 16];
  while (in.read(chunk, sizeof chunk) || in.gcount() > 0) {
    text.append(chunk, static_cast<size_t>(in.gcount()));
    if (text.size() > max_bytes) {
      return Status(ErrorCode::kIoError,
                    named + " is larger than " + std::to_string(max_bytes >> 20) + " MiB");
    }
  }
  if (in.bad()) return Status(ErrorCode::kIoError, "reading " + named + " failed");
  return text;
}

}  // namespace kvfabric
