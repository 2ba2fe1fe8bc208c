// What the mpi-labelled test binaries share: MPI for the whole run (tests/mpi/mpi_main.cc
// initializes it around RUN_ALL_TESTS) and one MPI transport over all ranks.
//
// Every rank runs the same tests in the same order, so collective calls line up. Tests check
// data with EXPECT_* and keep going, and skip only on conditions every rank sees alike (the
// world size), so a failure on one rank never leaves the others waiting in a collective.
#pragma once

#include "kvfabric/transport/mpi_transport.h"

namespace kvfabric::testing {

MpiRuntime& mpi_runtime();
Transport& mpi_transport();

}  // namespace kvfabric::testing
