// gpu label: a rank of the tools on the GPU. Placement on a GPU machine picks CUDA + NCCL and
// names the device; one CUDA rank runs the scripted serving workload (prefix hits, forks,
// copy-on-write, swaps to its pinned host tier) with the NCCL transport in place and again with
// the MPI-style host-staged one, and after every step every sequence's K/V gathered from the GPU
// is exactly its tokens' K/V, with no block leaked at the end. One rank is one replica, so no
// block migrates here: the transports' own block moves are gpu_nccl_transport_test's and
// gpu_backend_test's (staged), and several ranks on the GPU need mpirun (launch/gpu-check). Skips
// with the reason when there is no device.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>

#include "kvfabric/backend/cuda_backend.h"
#include "kvfabric/runtime/rank_placement.h"
#include "kvfabric/runtime/staged_transport.h"
#include "kvfabric/transport/nccl_transport.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

class GpuRankTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto cuda = make_cuda_backend();
    if (!cuda.ok()) GTEST_SKIP() << "no CUDA backend: " << cuda.status().message();
    cuda_ = std::move(cuda).value();
    bootstrap_ = make_local_transport();
  }

  std::unique_ptr<Backend> cuda_;
  std::unique_ptr<Transport> bootstrap_;
};

TEST_F(GpuRankTest, AutoPlacesTheRankOnTheGpu) {
  const ProcessView view = observe_process();
  ASSERT_FALSE(view.devices.empty()) << view.no_device_reason;
  const auto placed = place_rank(RuntimeConfig{}, view, "rank 0");
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(placed->backend, BackendKind::kCuda);
  EXPECT_EQ(placed->transport, nccl_transport_built() ? TransportKind::kNccl : TransportKind::kMpi);
  EXPECT_GE(placed->device, 0);
  EXPECT_FALSE(placed->device_name.empty());
  std::printf("placement on this machine: %s\n", placed->describe().c_str());
}

TEST_F(GpuRankTest, ServingWorkloadWithTheNcclTransportInPlace) {
  if (!nccl_transport_built()) GTEST_SKIP() << "kvfabric was built without NCCL";
  auto nccl = make_nccl_transport(*bootstrap_, {.device = 0});
  ASSERT_TRUE(nccl.ok()) << nccl.status();
  testing::run_one_rank_workload(*cuda_, **nccl, /*device_buffers=*/true);
}

TEST_F(GpuRankTest, ServingWorkloadWithTheStagedTransportInPlace) {
  auto staged = make_host_staged_transport(*bootstrap_, *cuda_);
  ASSERT_TRUE(staged.ok()) << staged.status();
  testing::run_one_rank_workload(*cuda_, **staged, /*device_buffers=*/true);
}

}  // namespace
}  // namespace kvfabric
