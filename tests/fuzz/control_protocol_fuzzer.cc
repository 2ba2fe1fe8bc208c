// The control protocol, fed request lines (one per input line) on a small coordinator: every
// line gets exactly one reply that is valid JSON, the coordinator keeps its integrity (tenants'
// counts included), and nothing crashes or leaks (ASan, UBSan). Lines take turns on four
// connections: an admin, two tenants (one with a quota) and one that has not said hello.
#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "fuzz_check.h"
#include "kvfabric/coordinator/coordinator.h"
#include "kvfabric/server/control_protocol.h"

namespace kvfabric {
namespace {

// Two replicas of 12 blocks of 4 tokens, a host tier, priorities: small enough that a few
// requests reach swapping, parking, preemption and the limits.
Config fuzz_config() {
  Config c;
  c.model.num_layers = 1;
  c.model.num_query_heads = 2;
  c.model.num_kv_heads = 1;
  c.model.head_dim = 8;
  c.model.dtype = DType::kF32;
  c.cache.block_size = 4;
  c.cache.num_blocks = 12;
  c.cache.host_num_blocks = 4;
  c.cache.eviction.strategy = EvictionPolicy::kPriority;
  c.topology.dp = 2;
  c.coordinator.max_sequences_per_replica = 16;
  return c;
}

const TenantDirectory& fuzz_tenants() {
  static const TenantDirectory tenants = TenantDirectory::parse(R"(tenants:
  - {name: ops, token: ops-token-0123456789, admin: true}
  - {name: a, token: a-token-0123456789, max_blocks: 10, max_host_blocks: 2, max_sequences: 3}
  - {name: b, token: b-token-0123456789}
)",
                                                                "fuzz")
                                             .value();
  return tenants;
}

}  // namespace
}  // namespace kvfabric

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvfabric;
  static const Config config = fuzz_config();
  auto coordinator = Coordinator::create(config);
  fuzz::require(coordinator.ok(), "the fuzz config is valid");
  uint64_t sunk = 0;
  ControlProtocolOptions limits;
  limits.max_batch_requests = 32;
  limits.max_reply_bytes = 16 << 10;
  limits.tenants = &fuzz_tenants();
  // Every 13th plan does not reach the ranks: the protocol's failed state is fuzzed too.
  const PlanSink sink = [&](const StepPlan&) {
    return ++sunk % 13 == 0 ? Status(ErrorCode::kUnavailable, "a rank did not answer")
                            : ok_status();
  };
  ControlProtocol protocol(*coordinator, sink, limits);
  ControlIdentity connections[4] = {
      {.tenant = "ops", .admin = true, .authenticated = true},
      {.tenant = "a", .authenticated = true},
      {.tenant = "b", .authenticated = true},
      protocol.new_connection()};
  size_t turn = 0;
  std::string_view input(reinterpret_cast<const char*>(data), size);
  while (!input.empty()) {
    const size_t end = input.find('\n');
    const std::string_view line = input.substr(0, end);
    input = end == std::string_view::npos ? std::string_view() : input.substr(end + 1);
    const std::string reply = protocol.handle(line, connections[turn++ % 4]);
    fuzz::require(!reply.empty() && (reply.front() == '{' || reply.front() == '['),
                  "the reply is an object or a batch: " + reply);
    fuzz::require(nlohmann::json::accept(reply), "the reply is JSON: " + reply);
  }
  const Status integrity = coordinator->verify_integrity();
  fuzz::require(integrity.ok(), integrity.to_string());
  return 0;
}
