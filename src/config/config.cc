#include "kvfabric/config/config.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <string>

#include "common/checked_math.h"
#include "config/config_fields.h"

namespace kvfabric {
namespace {

constexpr uint32_t kMaxBlockSize = 4096;
constexpr uint32_t kMaxHeadDim = 1024;
constexpr uint32_t kMaxWorldSize = 1u << 16;
constexpr int32_t kMaxDeviceIndex = 1023;
// Room for a small request (an admit of a few tokens); below this nothing useful fits.
constexpr uint32_t kMinRequestBytes = 256;
// Room for one ordinary reply (a step's plan of a few tables, the stats of a few replicas).
constexpr uint32_t kMinReplyBytes = 4096;

Status out_of_range(std::string_view key, uint64_t value, std::string_view rule) {
  return invalid_argument(std::string(key) + " must be " + std::string(rule) + " (got " +
                          std::to_string(value) + ")");
}

}  // namespace

std::string_view eviction_policy_name(EvictionPolicy policy) {
  switch (policy) {
    case EvictionPolicy::kLru:
      return "lru";
    case EvictionPolicy::kLfu:
      return "lfu";
    case EvictionPolicy::kLongestFirst:
      return "longest_first";
    case EvictionPolicy::kPriority:
      return "priority";
    case EvictionPolicy::kStreamingLlm:
      return "streaming_llm";
  }
  return "unknown";
}

Result<EvictionPolicy> parse_eviction_policy(std::string_view name) {
  for (EvictionPolicy policy :
       {EvictionPolicy::kLru, EvictionPolicy::kLfu, EvictionPolicy::kLongestFirst,
        EvictionPolicy::kPriority, EvictionPolicy::kStreamingLlm}) {
    if (eviction_policy_name(policy) == name) return policy;
  }
  return invalid_argument("unknown eviction strategy '" + std::string(name) +
                          "' (expected lru, lfu, longest_first, priority or streaming_llm)");
}

std::string_view backend_kind_name(BackendKind kind) {
  switch (kind) {
    case BackendKind::kAuto:
      return "auto";
    case BackendKind::kCpu:
      return "cpu";
    case BackendKind::kCuda:
      return "cuda";
  }
  return "unknown";
}

std::string_view transport_kind_name(TransportKind kind) {
  switch (kind) {
    case TransportKind::kAuto:
      return "auto";
    case TransportKind::kMpi:
      return "mpi";
    case TransportKind::kNccl:
      return "nccl";
  }
  return "unknown";
}

Result<BackendKind> parse_backend_kind(std::string_view name) {
  for (BackendKind kind : {BackendKind::kAuto, BackendKind::kCpu, BackendKind::kCuda}) {
    if (backend_kind_name(kind) == name) return kind;
  }
  return invalid_argument("unknown backend '" + std::string(name) + "' (expected auto, cpu or cuda)");
}

Result<TransportKind> parse_transport_kind(std::string_view name) {
  for (TransportKind kind : {TransportKind::kAuto, TransportKind::kMpi, TransportKind::kNccl}) {
    if (transport_kind_name(kind) == name) return kind;
  }
  return invalid_argument("unknown transport '" + std::string(name) +
                          "' (expected auto, mpi or nccl)");
}

uint32_t local_kv_heads(const ModelConfig& model, const TopologyConfig& topology) {
  if (topology.tp == 0) return model.num_kv_heads;
  return model.num_kv_heads >= topology.tp ? model.num_kv_heads / topology.tp : 1;
}

uint32_t num_layer_groups(const Config& config) {
  const uint32_t per_group = config.cache.layers_per_group;
  const uint32_t layers = config.model.num_layers;
  if (per_group == 0 || per_group == layers) return 0;
  return layers / per_group;
}

Result<BlockLayout> block_layout(const Config& config) {
  return BlockLayout::create(config.model.num_layers, local_kv_heads(config.model, config.topology),
                             config.cache.block_size, config.model.head_dim, config.cache.kv_dtype,
                             config.cache.quant_group_size);
}

Result<uint64_t> resolved_num_blocks(const Config& config) {
  if (config.cache.num_blocks > 0) return config.cache.num_blocks;
  KVF_ASSIGN_OR_RETURN(const BlockLayout layout, block_layout(config));
  const uint64_t blocks = config.cache.memory_budget_bytes / layout.block_bytes();
  if (blocks == 0) {
    return invalid_argument(
        "cache.memory_budget of " + std::to_string(config.cache.memory_budget_bytes) +
        " bytes holds no block of " + std::to_string(layout.block_bytes()) + " bytes");
  }
  return std::min<uint64_t>(blocks, kMaxBlocksPerPool);
}

Status validate(const Config& config) {
  const ModelConfig& m = config.model;
  if (m.num_layers == 0) return out_of_range("model.num_layers", 0, ">= 1");
  if (m.num_query_heads == 0) return out_of_range("model.num_query_heads", 0, ">= 1");
  if (m.num_kv_heads == 0) return out_of_range("model.num_kv_heads", 0, ">= 1");
  if (m.num_query_heads % m.num_kv_heads != 0) {
    return invalid_argument("model.num_query_heads (" + std::to_string(m.num_query_heads) +
                            ") must be a multiple of model.num_kv_heads (" +
                            std::to_string(m.num_kv_heads) + ")");
  }
  if (m.head_dim == 0 || m.head_dim > kMaxHeadDim) {
    return out_of_range("model.head_dim", m.head_dim, "in [1, 1024]");
  }
  if (!is_float_compute(m.dtype)) {
    return invalid_argument("model.dtype must be f32, f16 or bf16 (got " +
                            std::string(dtype_name(m.dtype)) + ")");
  }

  const CacheConfig& c = config.cache;
  if (c.block_size == 0 || c.block_size > kMaxBlockSize) {
    return out_of_range("cache.block_size", c.block_size, "in [1, 4096]");
  }
  if ((c.num_blocks == 0) == (c.memory_budget_bytes == 0)) {
    return invalid_argument(
        "set exactly one of cache.num_blocks and cache.memory_budget (got num_blocks=" +
        std::to_string(c.num_blocks) + ", memory_budget=" + std::to_string(c.memory_budget_bytes) +
        ")");
  }
  if (c.quant_group_size != 0 && !is_integer_quantized(c.kv_dtype)) {
    return invalid_argument("cache.quant_group_size (" + std::to_string(c.quant_group_size) +
                            ") applies to the integer kv_dtypes int8, int4 and int2 only (got " +
                            std::string(dtype_name(c.kv_dtype)) + "); leave it out or set 0");
  }
  if (c.num_blocks > kMaxBlocksPerPool) {
    return out_of_range("cache.num_blocks", c.num_blocks, "<= 4294967295");
  }
  if (c.host_num_blocks > kMaxBlocksPerPool) {
    return out_of_range("cache.host_num_blocks", c.host_num_blocks, "<= 4294967295");
  }
  if (c.layers_per_group > m.num_layers) {
    return invalid_argument("cache.layers_per_group (" + std::to_string(c.layers_per_group) +
                            ") exceeds model.num_layers (" + std::to_string(m.num_layers) + ")");
  }
  const EvictionConfig& e = c.eviction;
  if (!(e.threshold >= 0.0 && e.threshold <= 1.0)) {
    return invalid_argument("cache.eviction.threshold must be in [0, 1] (got " +
                            std::to_string(e.threshold) + ")");
  }
  if (e.priority_levels == 0) return out_of_range("cache.eviction.priority_levels", 0, ">= 1");
  if (e.strategy == EvictionPolicy::kStreamingLlm && e.window_tokens == 0) {
    return out_of_range("cache.eviction.window_tokens", 0, ">= 1 for streaming_llm");
  }

  const CoordinatorConfig& k = config.coordinator;
  for (const auto& [name, value] : {std::pair{"coordinator.prefill_token_cost", k.prefill_token_cost},
                                    std::pair{"coordinator.migration_token_cost", k.migration_token_cost},
                                    std::pair{"coordinator.queue_weight", k.queue_weight},
                                    std::pair{"coordinator.memory_weight", k.memory_weight}}) {
    if (!(value >= 0.0 && std::isfinite(value))) {
      return invalid_argument(std::string(name) + " must be a finite number >= 0 (got " +
                              std::to_string(value) + ")");
    }
  }

  if (k.max_sequences_per_replica == 0) {
    return out_of_range("coordinator.max_sequences_per_replica", 0, ">= 1");
  }
  if (k.max_pending_plan_entries == 0) {
    return out_of_range("coordinator.max_pending_plan_entries", 0, ">= 1");
  }

  const TopologyConfig& t = config.topology;
  if (t.tp == 0) return out_of_range("topology.tp", 0, ">= 1");
  if (t.dp == 0) return out_of_range("topology.dp", 0, ">= 1");
  if (uint64_t{t.tp} * t.dp > kMaxWorldSize) {
    return out_of_range("topology.tp * topology.dp", uint64_t{t.tp} * t.dp, "<= 65536");
  }
  if (m.num_kv_heads >= t.tp ? m.num_kv_heads % t.tp != 0 : t.tp % m.num_kv_heads != 0) {
    return invalid_argument("topology.tp (" + std::to_string(t.tp) +
                            ") must divide model.num_kv_heads (" + std::to_string(m.num_kv_heads) +
                            ") or be a multiple of it");
  }

  const ServerConfig& srv = config.server;
  if (srv.address.empty()) return invalid_argument("server.address must not be empty");
  if (srv.metrics_port != 0 && srv.metrics_port == srv.port) {
    return invalid_argument("server.metrics_port (" + std::to_string(srv.metrics_port) +
                            ") must differ from server.port");
  }
  if (srv.max_request_bytes < kMinRequestBytes) {
    return out_of_range("server.max_request_bytes", srv.max_request_bytes,
                        ">= " + std::to_string(kMinRequestBytes));
  }
  if (srv.max_batch_requests == 0) return out_of_range("server.max_batch_requests", 0, ">= 1");
  if (srv.max_reply_bytes < kMinReplyBytes) {
    return out_of_range("server.max_reply_bytes", srv.max_reply_bytes,
                        ">= " + std::to_string(kMinReplyBytes));
  }
  if (srv.max_connections == 0) return out_of_range("server.max_connections", 0, ">= 1");
  // An IP literal (the server binds it as given): checked here, so that --dry-run and every
  // tool refuse what serving would, before anything starts.
  in6_addr parsed{};
  if (inet_pton(AF_INET, srv.address.c_str(), &parsed) != 1 &&
      inet_pton(AF_INET6, srv.address.c_str(), &parsed) != 1) {
    return invalid_argument("server.address: '" + srv.address + "' is not an IP address");
  }
  if (srv.event_queue_batches == 0) return out_of_range("server.event_queue_batches", 0, ">= 1");
  if (srv.tls_cert_file.empty() != srv.tls_key_file.empty()) {
    return invalid_argument(
        std::string("server.tls_cert_file and server.tls_key_file go together (") +
        (srv.tls_cert_file.empty() ? "the certificate" : "the key") + " is missing)");
  }

  if (const std::string conflict = quota_conflict(config.tenants); !conflict.empty()) {
    return invalid_argument("tenants." + conflict);
  }

  const RuntimeConfig& rt = config.runtime;
  if (rt.transport == TransportKind::kNccl && rt.backend == BackendKind::kCpu) {
    return invalid_argument(
        "runtime.transport nccl moves GPU memory and needs runtime.backend cuda or auto (got cpu)");
  }
  if (rt.device < kLocalRankDevice || rt.device > kMaxDeviceIndex) {
    return invalid_argument("runtime.device must be local-rank or an index in [0, " +
                            std::to_string(kMaxDeviceIndex) + "] (got " +
                            std::to_string(rt.device) + ")");
  }

  auto layout = block_layout(config);
  if (!layout.ok()) {
    return Status(ErrorCode::kInvalidArgument, "model and cache shape: " + layout.status().message());
  }
  KVF_ASSIGN_OR_RETURN(const uint64_t blocks, resolved_num_blocks(config));
  if (k.free_watermark_blocks > blocks) {
    return invalid_argument("coordinator.free_watermark_blocks " +
                            std::to_string(k.free_watermark_blocks) +
                            " is more than the device pool's " + std::to_string(blocks) +
                            " blocks (cache.num_blocks)");
  }
  for (const auto& [key, count] : {std::pair{"cache.num_blocks", blocks},
                                   std::pair{"cache.host_num_blocks", c.host_num_blocks}}) {
    if (!detail::checked_product({count, layout->block_bytes()})) {
      return invalid_argument(std::string(key) + " " + std::to_string(count) + " x " +
                              std::to_string(layout->block_bytes()) +
                              "-byte blocks is more than 2^64 bytes per rank");
    }
  }
  return ok_status();
}

std::string quota_conflict(const TenantQuota& quota) {
  if (quota.max_blocks == 0 || quota.max_host_blocks <= quota.max_blocks) return {};
  return "max_host_blocks (" + std::to_string(quota.max_host_blocks) + ") exceeds max_blocks (" +
         std::to_string(quota.max_blocks) + "), which counts host blocks too";
}

Result<uint64_t> parse_byte_size(std::string_view text) {
  std::string_view rest = text;
  while (!rest.empty() && std::isspace(static_cast<unsigned char>(rest.front()))) {
    rest.remove_prefix(1);
  }
  size_t number_end = 0;
  while (number_end < rest.size() &&
         (std::isdigit(static_cast<unsigned char>(rest[number_end])) || rest[number_end] == '.')) {
    ++number_end;
  }
  const std::string number(rest.substr(0, number_end));
  std::string_view unit = rest.substr(number_end);
  while (!unit.empty() && std::isspace(static_cast<unsigned char>(unit.front()))) {
    unit.remove_prefix(1);
  }
  while (!unit.empty() && std::isspace(static_cast<unsigned char>(unit.back()))) {
    unit.remove_suffix(1);
  }
  char* end = nullptr;
  const double value = std::strtod(number.c_str(), &end);
  if (number.empty() || end != number.c_str() + number.size()) {
    return invalid_argument("'" + std::string(text) +
                            "' is not a byte size (e.g. 1073741824, 16GiB, 512 MiB, 1.5GB)");
  }
  static constexpr std::pair<std::string_view, double> kUnits[] = {{"", 1.0},
                                                                   {"B", 1.0},
                                                                   {"KiB", 1024.0},
                                                                   {"MiB", 1048576.0},
                                                                   {"GiB", 1073741824.0},
                                                                   {"TiB", 1099511627776.0},
                                                                   {"KB", 1e3},
                                                                   {"MB", 1e6},
                                                                   {"GB", 1e9},
                                                                   {"TB", 1e12}};
  for (const auto& [name, factor] : kUnits) {
    if (name == unit) {
      const double bytes = std::floor(value * factor);
      if (bytes > 1.8e19) return invalid_argument("'" + std::string(text) + "' is too large");
      if (bytes == 0 && value > 0) {
        return invalid_argument("'" + std::string(text) + "' is less than one byte");
      }
      return static_cast<uint64_t>(bytes);
    }
  }
  return invalid_argument("'" + std::string(text) +
                          "' has an unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)");
}

std::vector<std::string> config_keys() {
  std::vector<std::string> keys;
  for (const auto& field : detail::config_fields())
    keys.emplace_back(field.key);
  return keys;
}

std::string env_var_for_key(std::string_view key) {
  std::string name = "KVF_";
  for (char ch : key) {
    name += ch == '.' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  }
  return name;
}

}  // namespace kvfabric
