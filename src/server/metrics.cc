#include "kvfabric/server/metrics.h"

#include <fmt/format.h>

#include <iterator>

#include "kvfabric/server/control_protocol.h"

namespace kvfabric {
namespace {

// Appends one metric family: its HELP and TYPE lines, then the samples `write` adds.
template <typename Write>
void family(std::string& out, std::string_view name, std::string_view type, std::string_view help,
            Write&& write) {
  fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
  write([&](std::string_view labels, uint64_t value) {
    if (labels.empty()) {
      fmt::format_to(std::back_inserter(out), "{} {}\n", name, value);
    } else {
      fmt::format_to(std::back_inserter(out), "{}{{{}}} {}\n", name, labels, value);
    }
  });
}

void counter(std::string& out, std::string_view name, std::string_view help, uint64_t value) {
  family(out, name, "counter", help, [&](auto&& sample) { sample("", value); });
}

}  // namespace

std::string render_metrics(const Coordinator& coordinator, const ControlStats* requests) {
  std::string out;
  const CoordinatorStats& s = coordinator.stats();
  counter(out, "kvfabric_admitted_total", "Sequences admitted.", s.admitted);
  counter(out, "kvfabric_prompt_tokens_total", "Prompt tokens of admitted sequences.",
          s.prompt_tokens);
  family(out, "kvfabric_prefix_hit_tokens_total", "counter",
         "Prompt tokens served from cache, by where the cache was.", [&](auto&& sample) {
           sample("source=\"local\"", s.local_hit_tokens);
           sample("source=\"migrated\"", s.migrated_tokens);
         });
  counter(out, "kvfabric_migrated_blocks_total", "Blocks moved between replicas.",
          s.migrated_blocks);
  counter(out, "kvfabric_swapped_out_total", "Sequences moved to the host tier.", s.swapped_out);
  counter(out, "kvfabric_swapped_in_total", "Sequences brought back from the host tier.",
          s.swapped_in);
  counter(out, "kvfabric_parked_total", "Sequences moved to a peer replica under pressure.",
          s.parked);
  counter(out, "kvfabric_preempted_total", "Sequences dropped for recomputation.", s.preempted);
  counter(out, "kvfabric_steps_total", "Step plans produced.", s.steps);

  family(out, "kvfabric_device_blocks", "gauge",
         "Device-pool blocks of each replica, by state (used: held by sequences; cached: "
         "indexed prefixes no sequence holds; free).",
         [&](auto&& sample) {
           for (uint32_t r = 0; r < coordinator.num_replicas(); ++r) {
             const PagedKvCache& pool = coordinator.replica_cache(r).pool();
             sample(fmt::format("replica=\"{}\",state=\"used\"", r), pool.used_block_count());
             sample(fmt::format("replica=\"{}\",state=\"cached\"", r), pool.cached_block_count());
             sample(fmt::format("replica=\"{}\",state=\"free\"", r), pool.free_block_count());
           }
         });
  family(out, "kvfabric_host_free_blocks", "gauge", "Free host-tier (swap) blocks of each replica.",
         [&](auto&& sample) {
           for (uint32_t r = 0; r < coordinator.num_replicas(); ++r) {
             sample(fmt::format("replica=\"{}\"", r), coordinator.host_free_blocks(r));
           }
         });
  family(out, "kvfabric_sequences", "gauge", "Sequences resident on each replica's device pool.",
         [&](auto&& sample) {
           for (uint32_t r = 0; r < coordinator.num_replicas(); ++r) {
             sample(fmt::format("replica=\"{}\"", r),
                    coordinator.replica_cache(r).pool().num_sequences());
           }
         });
  family(out, "kvfabric_block_bytes", "gauge", "Bytes of one block on one rank.",
         [&](auto&& sample) { sample("", coordinator.block_bytes()); });

  if (requests != nullptr) {
    family(out, "kvfabric_control_requests_total", "counter",
           "Control-plane requests by op and outcome.", [&](auto&& sample) {
             for (size_t i = 0; i < kNumControlOps; ++i) {
               const std::string_view op = control_op_name(static_cast<ControlOp>(i));
               sample(fmt::format("op=\"{}\",outcome=\"ok\"", op), requests->ok[i]);
               sample(fmt::format("op=\"{}\",outcome=\"error\"", op), requests->failed[i]);
             }
           });
    counter(out, "kvfabric_control_malformed_requests_total",
            "Control-plane requests refused before reaching an op.", requests->malformed);
    counter(out, "kvfabric_control_limited_requests_total",
            "Batch requests not run because the batch's reply reached server.max_reply_bytes.",
            requests->limited);
  }
  return out;
}

}  // namespace kvfabric
