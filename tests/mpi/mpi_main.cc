// main() of the mpi-labelled GoogleTest binaries: MPI around the whole run. Rank 0 prints the
// usual report; the other ranks print only their failures, each line tagged with the rank.
// mpirun fails the run when any rank returns non-zero.
#include <gtest/gtest.h>

#include <cstdio>

#include "mpi/mpi_env.h"

namespace kvfabric::testing {
namespace {

MpiRuntime* g_runtime = nullptr;
Transport* g_transport = nullptr;

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                 result.file_name() != nullptr ? result.file_name() : "?", result.line_number(),
                 result.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
    }
  }

 private:
  int rank_;
};

}  // namespace

MpiRuntime& mpi_runtime() {
  return *g_runtime;
}
Transport& mpi_transport() {
  return *g_transport;
}

namespace {

int run(int argc, char** argv) {
  auto runtime = MpiRuntime::init(&argc, &argv);
  if (!runtime.ok()) {
    std::fprintf(stderr, "MPI: %s\n", runtime.status().to_string().c_str());
    return 1;
  }
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = runtime->rank().value;
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  auto transport = make_mpi_transport(*runtime);
  if (!transport.ok()) {
    std::fprintf(stderr, "[rank %d] %s\n", rank, transport.status().to_string().c_str());
    return 1;
  }
  g_runtime = &*runtime;
  g_transport = transport->get();
  const int rc = RUN_ALL_TESTS();
  g_transport = nullptr;
  g_runtime = nullptr;
  return rc;  // the transport goes first, then MPI_Finalize
}

}  // namespace
}  // namespace kvfabric::testing

int main(int argc, char** argv) {
  return kvfabric::testing::run(argc, argv);
}
