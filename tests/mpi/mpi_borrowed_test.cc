// mpi label: an application that initializes MPI itself. MpiRuntime then borrows MPI and never
// finalizes it, refuses a second runtime, and once MPI is finalized refuses to start it again.
// This binary has its own main (it plays the application, so it calls MPI directly).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

#include "kvfabric/transport/mpi_transport.h"
#include "testing/block_pattern.h"

namespace kvfabric {
namespace {

using ::testing::HasSubstr;

TEST(MpiBorrowedTest, BorrowsWithoutFinalizing) {
  {
    auto runtime = MpiRuntime::init(nullptr, nullptr);
    ASSERT_TRUE(runtime.ok()) << runtime.status();
    EXPECT_FALSE(runtime->owns_mpi());
    int rank = -1, size = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    EXPECT_EQ(runtime->rank(), RankId{rank});
    EXPECT_EQ(runtime->world_size(), size);
    int provided = 0;
    MPI_Query_thread(&provided);
    EXPECT_EQ(runtime->thread_level() == MpiThreadLevel::kSerialized,
              provided == MPI_THREAD_SERIALIZED);  // what the application got, not re-asked

    auto again = MpiRuntime::init(nullptr, nullptr);
    EXPECT_EQ(again.status().code(), ErrorCode::kInvalidOperation);

    // Moving keeps one live runtime.
    MpiRuntime moved = std::move(runtime).value();
    auto transport = make_mpi_transport(moved);
    ASSERT_TRUE(transport.ok()) << transport.status();
    // Every rank sends one block to itself and one to the next rank.
    std::vector<uint8_t> out(2 * 4096), in(2 * 4096, 0);
    testing::fill_pattern(out.data(), out.size(), 500 + rank);
    std::vector<uint8_t*> o = {out.data()}, o2 = {out.data() + 4096};
    std::vector<uint8_t*> i = {in.data()}, i2 = {in.data() + 4096};
    const BlockBatch sends[] = {{RankId{rank}, o, 4096}, {RankId{(rank + 1) % size}, o2, 4096}};
    const BlockBatch recvs[] = {{RankId{rank}, i, 4096},
                                {RankId{(rank + size - 1) % size}, i2, 4096}};
    ASSERT_TRUE((*transport)->exchange_blocks(sends, recvs).ok());
    EXPECT_EQ(std::vector<uint8_t>(in.begin(), in.begin() + 4096),
              std::vector<uint8_t>(out.begin(), out.begin() + 4096));
    std::vector<uint8_t> expected(2 * 4096);
    testing::fill_pattern(expected.data(), expected.size(), 500 + (rank + size - 1) % size);
    EXPECT_EQ(std::vector<uint8_t>(in.begin() + 4096, in.end()),
              std::vector<uint8_t>(expected.begin() + 4096, expected.end()));
  }
  // The borrowed runtime is gone and MPI is still running.
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  EXPECT_TRUE(initialized);
  EXPECT_FALSE(finalized);
  // And the slot is free again.
  auto later = MpiRuntime::init(nullptr, nullptr);
  EXPECT_TRUE(later.ok()) << later.status();
}

}  // namespace
}  // namespace kvfabric

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int rc = RUN_ALL_TESTS();
  MPI_Finalize();
  // After MPI_Finalize, MPI cannot start again: init says so instead of failing inside MPI.
  auto after = kvfabric::MpiRuntime::init(&argc, &argv);
  if (after.ok() || after.status().code() != kvfabric::ErrorCode::kInvalidOperation ||
      after.status().message().find("already finalized") == std::string::npos) {
    std::fprintf(stderr, "[rank %d] FAILED: MpiRuntime::init after MPI_Finalize gave %s\n", rank,
                 after.status().to_string().c_str());
    rc = 1;
  }
  return rc;
}
