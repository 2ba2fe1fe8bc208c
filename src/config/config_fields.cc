#include "config/config_fields.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

namespace kvfabric::detail {
namespace {

Status bad_value(std::string_view key, std::string_view text, std::string_view expected) {
  return invalid_argument(std::string(key) + ": '" + std::string(text) + "' is not " +
                          std::string(expected));
}

Result<uint64_t> parse_unsigned(std::string_view key, std::string_view text, uint64_t max) {
  uint64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec == std::errc::result_out_of_range || (ec == std::errc() && value > max)) {
    return invalid_argument(std::string(key) + ": " + std::string(text) + " is larger than " +
                            std::to_string(max));
  }
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) {
    return bad_value(key, text, "an unsigned integer");
  }
  return value;
}

// A field holding an unsigned integer; `access` returns a reference into the Config.
template <typename T, typename Access>
ConfigField unsigned_field(std::string_view key, std::string_view help, Access access) {
  return ConfigField{
      key, help,
      [key, access](Config& c, std::string_view text) -> Status {
        KVF_ASSIGN_OR_RETURN(const uint64_t v,
                             parse_unsigned(key, text, std::numeric_limits<T>::max()));
        access(c) = static_cast<T>(v);
        return ok_status();
      },
      [access](const Config& c) { return std::to_string(access(const_cast<Config&>(c))); }};
}

// A field holding free text (a path); `access` returns a reference into the Config.
template <typename Access>
ConfigField string_field(std::string_view key, std::string_view help, Access access) {
  return ConfigField{key, help,
                     [access](Config& c, std::string_view text) -> Status {
                       access(c) = std::string(text);
                       return ok_status();
                     },
                     [access](const Config& c) { return access(const_cast<Config&>(c)); }};
}

template <typename Access>
ConfigField double_field(std::string_view key, std::string_view help, Access access) {
  return ConfigField{key, help,
                     [key, access](Config& c, std::string_view text) -> Status {
                       const std::string copy(text);
                       char* end = nullptr;
                       const double v = std::strtod(copy.c_str(), &end);
                       if (copy.empty() || end != copy.c_str() + copy.size()) {
                         return bad_value(key, text, "a number");
                       }
                       if (!std::isfinite(v)) return bad_value(key, text, "a finite number");
                       access(c) = v;
                       return ok_status();
                     },
                     [access](const Config& c) {
                       std::string s = std::to_string(access(const_cast<Config&>(c)));
                       while (s.size() > 1 && s.back() == '0' && s[s.size() - 2] != '.')
                         s.pop_back();
                       return s;
                     }};
}

template <typename Access>
ConfigField dtype_field(std::string_view key, std::string_view help, Access access) {
  return ConfigField{
      key, help,
      [key, access](Config& c, std::string_view text) -> Status {
        auto dtype = parse_dtype(text);
        if (!dtype.ok()) {
          return invalid_argument(std::string(key) + ": " + dtype.status().message());
        }
        access(c) = dtype.value();
        return ok_status();
      },
      [access](const Config& c) {
        return std::string(dtype_name(access(const_cast<Config&>(c))));
      }};
}

// A field holding one of an enum's names; `parse` and `name` convert, `access` returns a
// reference into the Config.
template <typename Parse, typename Name, typename Access>
ConfigField choice_field(std::string_view key, std::string_view help, Parse parse, Name name,
                         Access access) {
  return ConfigField{key, help,
                     [key, parse, access](Config& c, std::string_view text) -> Status {
                       auto value = parse(text);
                       if (!value.ok()) {
                         return invalid_argument(std::string(key) + ": " +
                                                 value.status().message());
                       }
                       access(c) = value.value();
                       return ok_status();
                     },
                     [name, access](const Config& c) {
                       return std::string(name(access(const_cast<Config&>(c))));
                     }};
}

constexpr std::string_view kLocalRankName = "local-rank";

Status set_device(Config& c, std::string_view text) {
  if (text == kLocalRankName) {
    c.runtime.device = kLocalRankDevice;
    return ok_status();
  }
  int32_t index = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), index);
  if (ec != std::errc() || end != text.data() + text.size() || index < 0) {
    return bad_value("runtime.device", text, "local-rank or a device index (0, 1, ...)");
  }
  c.runtime.device = index;
  return ok_status();
}

std::string device_text(const Config& c) {
  return c.runtime.device == kLocalRankDevice ? std::string(kLocalRankName)
                                              : std::to_string(c.runtime.device);
}

}  // namespace

const std::vector<ConfigField>& config_fields() {
  static const std::vector<ConfigField> kFields = {
      ConfigField{"model.name", "model name (informational)",
                  [](Config& c, std::string_view text) -> Status {
                    c.model.name = std::string(text);
                    return ok_status();
                  },
                  [](const Config& c) { return c.model.name; }},
      unsigned_field<uint32_t>(
          "model.num_layers", "transformer layers",
          [](Config & c) -> auto& { return c.model.num_layers; }),
      unsigned_field<uint32_t>(
          "model.num_query_heads", "attention query heads",
          [](Config & c) -> auto& { return c.model.num_query_heads; }),
      unsigned_field<uint32_t>(
          "model.num_kv_heads", "KV heads (GQA groups)",
          [](Config & c) -> auto& { return c.model.num_kv_heads; }),
      unsigned_field<uint32_t>(
          "model.head_dim", "elements per head",
          [](Config & c) -> auto& { return c.model.head_dim; }),
      dtype_field(
          "model.dtype", "activation dtype: f32, f16 or bf16",
          [](Config & c) -> auto& { return c.model.dtype; }),
      unsigned_field<uint32_t>(
          "cache.block_size", "tokens per block",
          [](Config & c) -> auto& { return c.cache.block_size; }),
      unsigned_field<uint64_t>(
          "cache.num_blocks", "device blocks per rank (or memory_budget)",
          [](Config & c) -> auto& { return c.cache.num_blocks; }),
      ConfigField{"cache.memory_budget", "device KV bytes per rank, e.g. 16GiB (or num_blocks)",
                  [](Config& c, std::string_view text) -> Status {
                    auto bytes = parse_byte_size(text);
                    if (!bytes.ok()) {
                      return invalid_argument("cache.memory_budget: " + bytes.status().message());
                    }
                    c.cache.memory_budget_bytes = bytes.value();
                    return ok_status();
                  },
                  [](const Config& c) { return std::to_string(c.cache.memory_budget_bytes); }},
      dtype_field(
          "cache.kv_dtype", "stored KV dtype: f32 f16 bf16 fp8_e4m3 int8 int4 int2",
          [](Config & c) -> auto& { return c.cache.kv_dtype; }),
      unsigned_field<uint32_t>(
          "cache.quant_group_size", "integer KV: elements per scale/zero group (0 = head_dim)",
          [](Config & c) -> auto& { return c.cache.quant_group_size; }),
      unsigned_field<uint64_t>(
          "cache.host_num_blocks", "host (swap) tier blocks per rank",
          [](Config & c) -> auto& { return c.cache.host_num_blocks; }),
      unsigned_field<uint32_t>(
          "cache.layers_per_group", "layers per pool and block table (0 = all layers in one group)",
          [](Config & c) -> auto& { return c.cache.layers_per_group; }),
      ConfigField{"cache.eviction.strategy", "lru, lfu, longest_first, priority or streaming_llm",
                  [](Config& c, std::string_view text) -> Status {
                    auto policy = parse_eviction_policy(text);
                    if (!policy.ok()) {
                      return invalid_argument("cache.eviction.strategy: " +
                                              policy.status().message());
                    }
                    c.cache.eviction.strategy = policy.value();
                    return ok_status();
                  },
                  [](const Config& c) {
                    return std::string(eviction_policy_name(c.cache.eviction.strategy));
                  }},
      double_field(
          "cache.eviction.threshold", "evict when utilization exceeds this (0..1)",
          [](Config & c) -> auto& { return c.cache.eviction.threshold; }),
      unsigned_field<uint32_t>(
          "cache.eviction.priority_levels", "priority strategy: number of levels",
          [](Config & c) -> auto& { return c.cache.eviction.priority_levels; }),
      unsigned_field<uint32_t>(
          "cache.eviction.sink_tokens", "StreamingLLM sink tokens",
          [](Config & c) -> auto& { return c.cache.eviction.sink_tokens; }),
      unsigned_field<uint32_t>(
          "cache.eviction.window_tokens", "StreamingLLM window tokens",
          [](Config & c) -> auto& { return c.cache.eviction.window_tokens; }),
      unsigned_field<uint32_t>(
          "topology.tp", "tensor-parallel shards per replica",
          [](Config & c) -> auto& { return c.topology.tp; }),
      unsigned_field<uint32_t>(
          "topology.dp", "data-parallel replicas",
          [](Config & c) -> auto& { return c.topology.dp; }),
      double_field("coordinator.prefill_token_cost", "cost of computing one uncached prompt token",
                   [](Config& c) -> auto& { return c.coordinator.prefill_token_cost; }),
      double_field("coordinator.migration_token_cost",
                   "cost of moving one cached token from another replica",
                   [](Config& c) -> auto& { return c.coordinator.migration_token_cost; }),
      double_field("coordinator.queue_weight", "cost per sequence running on a replica",
                   [](Config& c) -> auto& { return c.coordinator.queue_weight; }),
      double_field("coordinator.memory_weight", "cost per unit of device-pool utilization",
                   [](Config& c) -> auto& { return c.coordinator.memory_weight; }),
      unsigned_field<uint32_t>(
          "coordinator.max_sequences_per_replica", "running and swapped sequences per replica",
          [](Config& c) -> auto& { return c.coordinator.max_sequences_per_replica; }),
      unsigned_field<uint32_t>(
          "coordinator.max_pending_plan_entries",
          "ops, tables, releases and admitted prompt blocks gathered before a step",
          [](Config& c) -> auto& { return c.coordinator.max_pending_plan_entries; }),
      unsigned_field<uint32_t>(
          "coordinator.free_watermark_blocks",
          "free blocks step() keeps on each replica by evicting idle cached prefixes early",
          [](Config& c) -> auto& { return c.coordinator.free_watermark_blocks; }),
      string_field("server.address", "control plane listen address (IPv4 or IPv6 literal)",
                   [](Config& c) -> auto& { return c.server.address; }),
      unsigned_field<uint16_t>("server.port", "control plane TCP port (0 = any free port)",
                               [](Config& c) -> auto& { return c.server.port; }),
      unsigned_field<uint16_t>("server.metrics_port", "Prometheus /metrics HTTP port (0 = none)",
                               [](Config& c) -> auto& { return c.server.metrics_port; }),
      unsigned_field<uint32_t>("server.max_request_bytes", "longest accepted request line",
                               [](Config& c) -> auto& { return c.server.max_request_bytes; }),
      unsigned_field<uint32_t>("server.max_batch_requests", "requests in one batch line",
                               [](Config& c) -> auto& { return c.server.max_batch_requests; }),
      unsigned_field<uint32_t>("server.max_reply_bytes",
                               "a batch stops running requests once its reply is this large",
                               [](Config& c) -> auto& { return c.server.max_reply_bytes; }),
      unsigned_field<uint32_t>("server.max_connections", "open control connections",
                               [](Config& c) -> auto& { return c.server.max_connections; }),
      unsigned_field<uint32_t>(
          "server.max_connections_per_tenant",
          "logged-in control connections of one tenant that is no admin (0 = no limit)",
          [](Config& c) -> auto& { return c.server.max_connections_per_tenant; }),
      unsigned_field<uint32_t>(
          "server.max_connections_per_address",
          "connections from one client IP address, per endpoint (0 = no limit)",
          [](Config& c) -> auto& { return c.server.max_connections_per_address; }),
      unsigned_field<uint32_t>("server.idle_timeout_ms",
                               "close a connection idle this long (0 = never)",
                               [](Config& c) -> auto& { return c.server.idle_timeout_ms; }),
      unsigned_field<uint32_t>("server.fault_grace_ms",
                               "after a rank fault, answer this long before the job exits",
                               [](Config& c) -> auto& { return c.server.fault_grace_ms; }),
      string_field("server.tenants_file", "tenants, tokens and quotas (YAML); empty = no auth",
                   [](Config& c) -> auto& { return c.server.tenants_file; }),
      string_field("server.tls_cert_file", "PEM certificate chain for TLS; empty = plain TCP",
                   [](Config& c) -> auto& { return c.server.tls_cert_file; }),
      string_field("server.tls_key_file", "PEM private key of server.tls_cert_file",
                   [](Config& c) -> auto& { return c.server.tls_key_file; }),
      unsigned_field<uint32_t>("server.event_queue_batches",
                               "KV-event batches queued per subscriber (more are dropped)",
                               [](Config& c) -> auto& { return c.server.event_queue_batches; }),
      unsigned_field<uint64_t>("tenants.max_blocks",
                               "blocks a tenant's live sequences may hold (0 = no limit)",
                               [](Config& c) -> auto& { return c.tenants.max_blocks; }),
      unsigned_field<uint64_t>("tenants.max_host_blocks",
                               "of those, blocks swapped to the host tier (0 = no limit)",
                               [](Config& c) -> auto& { return c.tenants.max_host_blocks; }),
      unsigned_field<uint32_t>("tenants.max_sequences",
                               "live sequences of one tenant (0 = no limit)",
                               [](Config& c) -> auto& { return c.tenants.max_sequences; }),
      unsigned_field<uint32_t>("tenants.max_priority",
                               "the highest priority a tenant may give a sequence",
                               [](Config& c) -> auto& { return c.tenants.max_priority; }),
      unsigned_field<uint32_t>("runtime.plan_deadline_ms",
                               "rank 0 waits this long for every rank to run a plan (0 = forever)",
                               [](Config& c) -> auto& { return c.runtime.plan_deadline_ms; }),
      choice_field("runtime.backend", "where ranks keep KV: auto (CUDA when a GPU is seen), cpu, cuda",
                   parse_backend_kind, backend_kind_name,
                   [](Config& c) -> auto& { return c.runtime.backend; }),
      choice_field("runtime.transport", "how ranks move blocks: auto (NCCL on CUDA), mpi, nccl",
                   parse_transport_kind, transport_kind_name,
                   [](Config& c) -> auto& { return c.runtime.transport; }),
      ConfigField{"runtime.device", "CUDA device: local-rank (the launcher's, modulo the visible) or an index",
                  set_device, device_text},
  };
  return kFields;
}

const ConfigField* find_config_field(std::string_view key) {
  for (const ConfigField& field : config_fields()) {
    if (field.key == key) return &field;
  }
  return nullptr;
}

}  // namespace kvfabric::detail
