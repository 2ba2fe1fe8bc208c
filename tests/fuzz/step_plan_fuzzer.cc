// Step-plan bytes as a rank receives them: deserialize() refuses anything malformed with an
// error naming the field (never a crash or an out-of-bounds read), and a plan it accepts
// serializes back to the same plan and gets a wave for every op.
#include <cstddef>
#include <cstdint>
#include <span>

#include "fuzz_check.h"
#include "kvfabric/plan/step_plan.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvfabric;
  const auto plan = StepPlan::deserialize(std::span(data, size));
  if (!plan.ok()) return 0;
  const auto again = StepPlan::deserialize(plan->serialize());
  fuzz::require(again.ok() && *again == *plan, "a plan serializes back to itself");
  fuzz::require(plan_waves(plan->ops).size() == plan->ops.size(), "every op has a wave");
  return 0;
}
