// gpu label: needs a CUDA device; skips with the driver's reason when there is none.
#include <gtest/gtest.h>

#include "common/device_probe.h"

namespace kvfabric::kernels {
namespace {

TEST(GpuProbe, KernelRunsOnEveryDevice) {
  const auto devices = list_devices();
  if (!devices.ok()) GTEST_SKIP() << "no CUDA device: " << devices.status().message();
  for (const DeviceInfo& device : devices.value()) {
    SCOPED_TRACE(device.name);
    EXPECT_GE(device.compute_major, 8) << "kvfabric's kernels target sm_80 and newer";
    const auto out = run_probe_kernel(device.ordinal, 1000, 0.5f);
    ASSERT_TRUE(out.ok()) << out.status();
    for (int i = 0; i < 1000; ++i)
      ASSERT_EQ(out.value()[i], 0.5f * static_cast<float>(i));
  }
}

TEST(GpuProbe, BadArgumentsAreErrors) {
  const auto devices = list_devices();
  if (!devices.ok()) GTEST_SKIP() << "no CUDA device: " << devices.status().message();
  EXPECT_EQ(run_probe_kernel(0, 0, 1.0f).status().code(), ErrorCode::kInvalidArgument);
  const auto missing = run_probe_kernel(static_cast<int>(devices->size()) + 7, 4, 1.0f);
  EXPECT_EQ(missing.status().code(), ErrorCode::kInternal);
  EXPECT_NE(missing.status().message().find("device"), std::string::npos);
}

}  // namespace
}  // namespace kvfabric::kernels
