#include "kvfabric/common/check.h"

#include <cstdio>
#include <cstdlib>

namespace kvfabric::detail {

void check_failed(const char* file, int line, const char* expr, std::string_view message) {
  std::fprintf(stderr, "kvfabric: %s:%d: check failed: %s: %.*s\n", file, line, expr,
               static_cast<int>(message.size()), message.data());
  std::fflush(stderr);
  std::abort();
}

}  // namespace kvfabric::detail
