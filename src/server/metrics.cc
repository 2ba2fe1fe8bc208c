#include "kvfabric/server/metrics.h"

#include <fmt/format.h>

#include <algorithm>
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

// One family per TenantStats field, a sample per tenant (the default tenant is tenant="").
void render_tenant_metrics(std::string& out, const Coordinator& coordinator) {
  const std::vector<std::string> names = coordinator.tenants();
  std::vector<TenantStats> stats;
  for (const std::string& name : names)
    stats.push_back(coordinator.tenant_stats(name));
  const auto per_tenant = [&](std::string_view metric, std::string_view type, std::string_view help,
                              uint64_t TenantStats::*field) {
    family(out, metric, type, help, [&](auto&& sample) {
      for (size_t i = 0; i < names.size(); ++i) {
        sample(fmt::format("tenant=\"{}\"", prometheus_label_value(names[i])), stats[i].*field);
      }
    });
  };
  per_tenant("kvfabric_tenant_admitted_total", "counter", "Sequences admitted, by tenant.",
             &TenantStats::admitted);
  per_tenant("kvfabric_tenant_prompt_tokens_total", "counter",
             "Prompt tokens of admitted sequences, by tenant.", &TenantStats::prompt_tokens);
  per_tenant("kvfabric_tenant_cached_tokens_total", "counter",
             "Prompt tokens served from cache (local or migrated), by tenant.",
             &TenantStats::cached_tokens);
  per_tenant("kvfabric_tenant_refused_total", "counter",
             "Admit, append and fork requests refused for room or quota, by tenant.",
             &TenantStats::refused);
  per_tenant("kvfabric_tenant_preempted_total", "counter",
             "Sequences dropped for recomputation, by tenant.", &TenantStats::preempted);
  per_tenant("kvfabric_tenant_sequences", "gauge", "Live sequences, by tenant.",
             &TenantStats::sequences);
  per_tenant("kvfabric_tenant_blocks", "gauge",
             "Blocks in the tables of live sequences (counted per sequence), by tenant.",
             &TenantStats::blocks);
  per_tenant("kvfabric_tenant_host_blocks", "gauge",
             "Of those, blocks swapped out to the host tier, by tenant.",
             &TenantStats::host_blocks);
}

}  // namespace

std::string prometheus_label_value(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

void append_metric_family(std::string& out, std::string_view name, std::string_view type,
                          std::string_view help, std::span<const MetricSample> samples) {
  fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
  for (const MetricSample& s : samples) {
    if (s.labels.empty()) {
      fmt::format_to(std::back_inserter(out), "{} {}\n", name, s.value);
    } else {
      fmt::format_to(std::back_inserter(out), "{}{{{}}} {}\n", name, s.labels, s.value);
    }
  }
}

void LatencyHistogram::observe(std::chrono::nanoseconds took) {
  const double seconds = std::chrono::duration<double>(took).count();
  const auto bucket = std::lower_bound(kBounds.begin(), kBounds.end(), seconds) - kBounds.begin();
  ++counts_[static_cast<size_t>(bucket)];
  sum_seconds_ += seconds;
  ++count_;
}

void LatencyHistogram::render(std::string& out, std::string_view name, std::string_view help) const {
  fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
  uint64_t cumulative = 0;
  for (size_t i = 0; i < kBounds.size(); ++i) {
    cumulative += counts_[i];
    fmt::format_to(std::back_inserter(out), "{}_bucket{{le=\"{}\"}} {}\n", name, kBounds[i],
                   cumulative);
  }
  fmt::format_to(std::back_inserter(out), "{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n",
                 name, count_, name, sum_seconds_, name, count_);
}

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
  family(out, "kvfabric_prefix_miss_tokens_total", "counter",
         "Prompt tokens no cache served, by why: partial_block (the last, partial block), "
         "other_replica (cached on another replica, not moved), evicted (cached before), "
         "other_salt (cached under another tenant or salt), never_seen.",
         [&](auto&& sample) {
           sample("cause=\"partial_block\"", s.missed.partial_block);
           sample("cause=\"other_replica\"", s.missed.other_replica);
           sample("cause=\"evicted\"", s.missed.evicted);
           sample("cause=\"other_salt\"", s.missed.other_salt);
           sample("cause=\"never_seen\"", s.missed.never_seen);
         });
  {
    const auto ratio = [&](uint64_t tokens) {
      return s.prompt_tokens == 0 ? 0.0 : static_cast<double>(tokens) / s.prompt_tokens;
    };
    const MetricSample ratios[] = {
        {"tier=\"local\"", ratio(s.local_hit_tokens)},
        {"tier=\"migrated\"", ratio(s.migrated_tokens)},
        {"tier=\"any\"", ratio(s.local_hit_tokens + s.migrated_tokens)}};
    append_metric_family(out, "kvfabric_prefix_hit_ratio", "gauge",
                         "Prompt tokens served from cache / prompt tokens admitted, by where the "
                         "cache was: the chosen replica's device pool (local), another replica's "
                         "moved to it (migrated), either (any).",
                         ratios);
  }
  counter(out, "kvfabric_migrated_blocks_total", "Blocks moved between replicas.",
          s.migrated_blocks);
  counter(out, "kvfabric_swapped_out_total", "Sequences moved to the host tier.", s.swapped_out);
  counter(out, "kvfabric_swapped_in_total", "Sequences brought back from the host tier.",
          s.swapped_in);
  counter(out, "kvfabric_parked_total", "Sequences moved to a peer replica under pressure.",
          s.parked);
  counter(out, "kvfabric_preempted_total", "Sequences dropped for recomputation.", s.preempted);
  counter(out, "kvfabric_steps_total", "Step plans produced.", s.steps);
  counter(out, "kvfabric_compactions_total", "Token compactions planned.", s.compactions);
  counter(out, "kvfabric_compacted_tokens_total", "Tokens token compactions dropped.",
          s.compacted_tokens);
  counter(out, "kvfabric_compressed_prompts_indexed_total",
          "SnapKV compacted prompts indexed for identical requests.", s.compressed_indexed);
  counter(out, "kvfabric_compressed_prompt_hits_total",
          "Admissions served an indexed compacted prompt (counted in the local hit tokens too).",
          s.compressed_hits);

  family(out, "kvfabric_device_blocks", "gauge",
         "Device-pool blocks of each replica, by state (used: held by sequences; cached: "
         "indexed prefixes no sequence holds; free).",
         [&](auto&& sample) {
           for (uint32_t r = 0; r < coordinator.num_replicas(); ++r) {
             const ReplicaStats pools = coordinator.replica_stats(r);
             sample(fmt::format("replica=\"{}\",state=\"used\"", r), pools.used_blocks);
             sample(fmt::format("replica=\"{}\",state=\"cached\"", r), pools.cached_blocks);
             sample(fmt::format("replica=\"{}\",state=\"free\"", r), pools.free_blocks);
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
             sample(fmt::format("replica=\"{}\"", r), coordinator.replica_stats(r).sequences);
           }
         });
  family(out, "kvfabric_block_bytes", "gauge", "Bytes of one block on one rank.",
         [&](auto&& sample) { sample("", coordinator.block_bytes()); });
  render_tenant_metrics(out, coordinator);

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
    family(out, "kvfabric_kv_event_subscribers", "gauge",
           "Connections subscribed to KV events.",
           [&](auto&& sample) { sample("", requests->kv_event_subscribers); });
    counter(out, "kvfabric_kv_event_batches_total", "KV-event batches published to subscribers.",
            requests->kv_event_batches);
    counter(out, "kvfabric_kv_event_batches_dropped_total",
            "KV-event batches dropped for a subscriber whose queue (server.event_queue_batches) "
            "was full, counted once per subscriber.",
            requests->kv_event_batches_dropped);
  }
  return out;
}

}  // namespace kvfabric
