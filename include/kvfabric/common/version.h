// The library's version and what this build of it contains, for `--version`, the info metric
// and the control protocol's hello.
#pragma once

#include <string>
#include <string_view>

namespace kvfabric {

//! The project version ("0.1.0"), from CMake's project(VERSION).
std::string_view version();

//! What this build was compiled with: which optional parts are in (CUDA kernels, NCCL, MPI).
struct BuildFeatures {
  bool cuda = false;
  bool nccl = false;
  bool mpi = false;
};
BuildFeatures build_features();

//! "<tool> <version> (CUDA on|off, NCCL on|off, MPI on|off)": what every tool prints for
//! --version.
std::string version_line(std::string_view tool);

}  // namespace kvfabric
