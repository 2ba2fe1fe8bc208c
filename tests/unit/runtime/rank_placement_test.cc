// Which backend, device and transport a rank gets from runtime.* and what its process sees.
#include "kvfabric/runtime/rank_placement.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "kvfabric/backend/cuda_backend.h"
#include "kvfabric/transport/nccl_transport.h"

namespace kvfabric {
namespace {

using ::testing::HasSubstr;

ProcessView cpu_machine() {
  ProcessView view;
  view.cuda_built = true;
  view.nccl_built = true;
  view.no_device_reason = "no usable CUDA device: no CUDA-capable device is detected";
  return view;
}

ProcessView gpu_machine(int gpus, std::optional<uint32_t> local_rank) {
  ProcessView view = cpu_machine();
  for (int d = 0; d < gpus; ++d) view.devices.push_back("NVIDIA H100 80GB HBM3 #" + std::to_string(d));
  view.local_rank = local_rank;
  return view;
}

RuntimeConfig runtime(BackendKind backend, TransportKind transport, int32_t device = kLocalRankDevice) {
  RuntimeConfig r;
  r.backend = backend;
  r.transport = transport;
  r.device = device;
  return r;
}

TEST(RankPlacement, AutoPicksCpuAndMpiWithoutAGpu) {
  const auto placed = place_rank(RuntimeConfig{}, cpu_machine(), "rank 1 on vm");
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(placed->backend, BackendKind::kCpu);
  EXPECT_EQ(placed->transport, TransportKind::kMpi);
  EXPECT_EQ(placed->device, -1);
  EXPECT_FALSE(placed->staged());
  EXPECT_EQ(placed->describe(), "cpu backend, mpi transport");
}

TEST(RankPlacement, AutoOnThisMachinePicksWhatItHas) {
  // This process's own view: without a device (CI), auto must come out as CPU + MPI.
  const ProcessView view = observe_process();
  EXPECT_EQ(view.cuda_built, cuda_backend_built());
  EXPECT_EQ(view.nccl_built, nccl_transport_built());
  const auto placed = place_rank(RuntimeConfig{}, view, "rank 0");
  ASSERT_TRUE(placed.ok()) << placed.status();
  if (view.devices.empty()) {
    EXPECT_FALSE(view.no_device_reason.empty());
    EXPECT_EQ(placed->backend, BackendKind::kCpu);
    EXPECT_EQ(placed->transport, TransportKind::kMpi);
  } else {
    EXPECT_EQ(placed->backend, BackendKind::kCuda);
  }
}

TEST(RankPlacement, AutoPicksCudaAndNcclOnTheLocalRanksDevice) {
  const auto placed = place_rank(RuntimeConfig{}, gpu_machine(4, 6), "rank 6 on node-b");
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(placed->backend, BackendKind::kCuda);
  EXPECT_EQ(placed->transport, TransportKind::kNccl);
  EXPECT_EQ(placed->device, 2);  // local rank 6 modulo 4 devices
  EXPECT_EQ(placed->describe(), "cuda backend on device 2 (NVIDIA H100 80GB HBM3 #2), nccl transport");

  const auto no_launcher = place_rank(RuntimeConfig{}, gpu_machine(2, std::nullopt), "rank 0");
  ASSERT_TRUE(no_launcher.ok());
  EXPECT_EQ(no_launcher->device, 0);
}

TEST(RankPlacement, AutoTransportIsMpiStagedWhenTheBuildHasNoNccl) {
  ProcessView view = gpu_machine(1, 0);
  view.nccl_built = false;
  const auto placed = place_rank(RuntimeConfig{}, view, "rank 0");
  ASSERT_TRUE(placed.ok());
  EXPECT_EQ(placed->backend, BackendKind::kCuda);
  EXPECT_EQ(placed->transport, TransportKind::kMpi);
  EXPECT_TRUE(placed->staged());
  EXPECT_THAT(placed->describe(), HasSubstr("mpi transport (staged through pinned host memory)"));
}

TEST(RankPlacement, ExplicitChoicesAreHonoured) {
  const auto cpu = place_rank(runtime(BackendKind::kCpu, TransportKind::kAuto), gpu_machine(8, 1), "r");
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(cpu->backend, BackendKind::kCpu);
  EXPECT_EQ(cpu->transport, TransportKind::kMpi);  // auto never pairs NCCL with the CPU

  const auto device = place_rank(runtime(BackendKind::kCuda, TransportKind::kMpi, 5), gpu_machine(8, 1), "r");
  ASSERT_TRUE(device.ok());
  EXPECT_EQ(device->device, 5);
  EXPECT_TRUE(device->staged());
}

TEST(RankPlacement, WhatCannotBeHonouredIsRefusedNamingRankDeviceAndReason) {
  ProcessView view = cpu_machine();
  view.cuda_visible_devices = "";
  const auto no_gpu = place_rank(runtime(BackendKind::kCuda, TransportKind::kAuto), view, "rank 3 on node-b");
  ASSERT_FALSE(no_gpu.ok());
  EXPECT_EQ(no_gpu.status().code(), ErrorCode::kUnavailable);
  EXPECT_THAT(no_gpu.status().message(),
              HasSubstr("rank 3 on node-b: runtime.backend cuda, but no CUDA device is visible "
                        "(no usable CUDA device: no CUDA-capable device is detected), "
                        "CUDA_VISIBLE_DEVICES="));

  ProcessView unbuilt = gpu_machine(1, 0);
  unbuilt.cuda_built = false;
  const auto no_cuda = place_rank(runtime(BackendKind::kCuda, TransportKind::kAuto), unbuilt, "rank 0 on a");
  EXPECT_EQ(no_cuda.status().code(), ErrorCode::kUnimplemented);
  EXPECT_THAT(no_cuda.status().message(), HasSubstr("rank 0 on a: runtime.backend cuda, but kvfabric was built without CUDA"));

  const auto missing = place_rank(runtime(BackendKind::kAuto, TransportKind::kAuto, 2), gpu_machine(2, 0), "rank 1 on a");
  EXPECT_EQ(missing.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(missing.status().message(), HasSubstr("rank 1 on a: runtime.device 2 does not exist: 2 CUDA device(s) visible"));

  const auto nccl_on_cpu = place_rank(runtime(BackendKind::kAuto, TransportKind::kNccl), cpu_machine(), "rank 2 on c");
  EXPECT_EQ(nccl_on_cpu.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(nccl_on_cpu.status().message(),
              HasSubstr("rank 2 on c: runtime.transport nccl moves GPU memory, but this rank runs on the CPU backend"));

  ProcessView no_nccl = gpu_machine(1, 0);
  no_nccl.nccl_built = false;
  const auto unbuilt_nccl = place_rank(runtime(BackendKind::kCuda, TransportKind::kNccl), no_nccl, "rank 0");
  EXPECT_EQ(unbuilt_nccl.status().code(), ErrorCode::kUnimplemented);
  EXPECT_THAT(unbuilt_nccl.status().message(), HasSubstr("built without NCCL"));
}

TEST(RankPlacement, RanksSharingTheHostsDevicesAreStagedOverMpiNotNccl) {
  ProcessView view = gpu_machine(2, 3);
  view.local_size = 4;  // 4 ranks of this host, 2 GPUs: NCCL would find two ranks on one device
  const auto placed = place_rank(RuntimeConfig{}, view, "rank 3 on node-a");
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(placed->backend, BackendKind::kCuda);
  EXPECT_EQ(placed->transport, TransportKind::kMpi);
  EXPECT_TRUE(placed->staged());
  EXPECT_EQ(placed->device, 1);  // local rank 3 modulo 2

  const auto nccl = place_rank(runtime(BackendKind::kAuto, TransportKind::kNccl), view, "rank 3 on node-a");
  EXPECT_EQ(nccl.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(nccl.status().message(),
              HasSubstr("rank 3 on node-a: runtime.transport nccl needs a device per rank, but 4 ranks "
                        "of this host share 2 CUDA device(s) visible"));

  view.local_size = 2;  // one device each: NCCL
  EXPECT_EQ(place_rank(RuntimeConfig{}, view, "r")->transport, TransportKind::kNccl);
}

TEST(RankPlacement, TheLauncherNamesTheLocalRank) {
  EXPECT_EQ(launcher_local_rank({}), std::nullopt);
  EXPECT_EQ(launcher_local_rank({{"OMPI_COMM_WORLD_LOCAL_RANK", "3"}}), 3u);
  EXPECT_EQ(launcher_local_rank({{"SLURM_LOCALID", "5"}}), 5u);
  EXPECT_EQ(launcher_local_rank({{"MPI_LOCALRANKID", "1"}, {"LOCAL_RANK", "7"}}), 1u);
  // Open MPI's variable wins over Slurm's; a variable that is not a number is passed over.
  EXPECT_EQ(launcher_local_rank({{"OMPI_COMM_WORLD_LOCAL_RANK", "2"}, {"SLURM_LOCALID", "0"}}), 2u);
  EXPECT_EQ(launcher_local_rank({{"OMPI_COMM_WORLD_LOCAL_RANK", "x"}, {"SLURM_LOCALID", "4"}}), 4u);

  EXPECT_EQ(launcher_local_size({}), std::nullopt);
  EXPECT_EQ(launcher_local_size({{"OMPI_COMM_WORLD_LOCAL_SIZE", "8"}}), 8u);
  EXPECT_EQ(launcher_local_size({{"MPI_LOCALNRANKS", "2"}, {"SLURM_NTASKS_PER_NODE", "4"}}), 2u);
  EXPECT_EQ(launcher_local_size({{"SLURM_NTASKS_PER_NODE", "4"}}), 4u);
  EXPECT_EQ(launcher_local_size({{"LOCAL_WORLD_SIZE", "two"}}), std::nullopt);
}

}  // namespace
}  // namespace kvfabric
