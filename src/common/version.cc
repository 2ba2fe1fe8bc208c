#include "kvfabric/common/version.h"

#include <fmt/format.h>

namespace kvfabric {

std::string_view version() { return KVF_VERSION; }

BuildFeatures build_features() {
  // Set by the build (src/CMakeLists.txt) from what CMake found.
  return BuildFeatures{.cuda = KVF_BUILT_WITH_CUDA != 0,
                       .nccl = KVF_BUILT_WITH_NCCL != 0,
                       .mpi = KVF_BUILT_WITH_MPI != 0};
}

std::string version_line(std::string_view tool) {
  const BuildFeatures built = build_features();
  auto on_off = [](bool on) { return on ? "on" : "off"; };
  return fmt::format("{} {} (CUDA {}, NCCL {}, MPI {})", tool, version(), on_off(built.cuda),
                     on_off(built.nccl), on_off(built.mpi));
}

}  // namespace kvfabric
