// What the fuzz targets share: a failed property ends the run the way libFuzzer reports a crash.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

namespace kvfabric::fuzz {

//! Aborts (a finding, with the input saved by libFuzzer) when `holds` is false.
inline void require(bool holds, const std::string& what) {
  if (holds) return;
  std::fprintf(stderr, "fuzz property violated: %s\n", what.c_str());
  std::abort();
}

}  // namespace kvfabric::fuzz
