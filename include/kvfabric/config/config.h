// Typed configuration: model shape, cache sizing and eviction, topology. Loaded from YAML
// (configs/*.yaml), overridden by KVF_* environment variables, validated as a whole.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "kvfabric/common/block_layout.h"
#include "kvfabric/common/dtype.h"
#include "kvfabric/common/status.h"

namespace kvfabric {

//! \brief How a block manager picks the sequence to evict (see EvictionStrategy).
enum class EvictionPolicy : uint8_t { kLru, kLfu, kLongestFirst, kPriority, kStreamingLlm };

std::string_view eviction_policy_name(EvictionPolicy policy);  // "lru", "lfu", ...
Result<EvictionPolicy> parse_eviction_policy(std::string_view name);

//! \brief Attention shape of the served model (whole model, before TP sharding).
struct ModelConfig {
  std::string name = "custom";
  uint32_t num_layers = 0;
  uint32_t num_query_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kBF16;  //!< activation dtype (queries, attention output)
};

struct EvictionConfig {
  EvictionPolicy strategy = EvictionPolicy::kLru;
  //! The cache needs eviction when utilization > threshold; eviction stops at <= threshold.
  double threshold = 0.9;
  uint32_t priority_levels = 4;   //!< valid priorities are 0 .. priority_levels-1 (higher = keep)
  uint32_t sink_tokens = 4;       //!< StreamingLLM attention sinks kept at the start
  uint32_t window_tokens = 1024;  //!< StreamingLLM recent window kept at the end
};

//! \brief Paged cache sizing, per rank and tier. Exactly one of num_blocks and
//! memory_budget_bytes is set; the other is derived from the block layout.
struct CacheConfig {
  uint32_t block_size = 16;          //!< tokens per block
  uint64_t num_blocks = 0;           //!< device-tier blocks per rank
  uint64_t memory_budget_bytes = 0;  //!< device-tier KV bytes per rank
  DType kv_dtype = DType::kF16;
  uint32_t quant_group_size = 0;  //!< integer KV formats; 0 = one group per head (head_dim)
  uint64_t host_num_blocks = 0;   //!< host (swap) tier blocks per rank
  uint32_t layers_per_group = 0;  //!< layers sharing one pool and block table; 0 = all
  EvictionConfig eviction;
};

//! \brief world = dp x tp ranks; rank r is shard r % tp of replica r / tp (DESIGN.md §2).
struct TopologyConfig {
  uint32_t tp = 1;
  uint32_t dp = 1;
};

//! \brief How the coordinator places sequences: it picks the replica with the lowest estimated
//! cost, prefill_token_cost * uncached prompt tokens + migration_token_cost * tokens moved from
//! another replica's cache + queue_weight * sequences running there + memory_weight * its
//! device-pool utilization. Moving a cached prefix is chosen when it costs less than recomputing.
struct CoordinatorConfig {
  double prefill_token_cost = 1.0;
  double migration_token_cost = 0.1;
  double queue_weight = 16.0;
  double memory_weight = 4096.0;
  //! Running and swapped sequences a replica may hold; admit, fork and parking beyond it are
  //! refused (ResourceExhausted). Forks share blocks, so memory alone does not bound them.
  uint32_t max_sequences_per_replica = 4096;
  //! What the next plan may gather before step() is called: its ops, tables to publish and
  //! released sequences, plus the blocks of the prompts admitted since the last step (held to be
  //! indexed). Beyond it admit, append and fork are refused (ResourceExhausted) until a step, so
  //! a client that never steps cannot grow the coordinator without bound.
  uint32_t max_pending_plan_entries = 1u << 20;
  //! Free blocks step() keeps on every replica by evicting idle cached prefixes ahead of time
  //! (least recently used first), so that an admission usually finds its blocks free instead of
  //! evicting them itself. 0 = evict only when an allocation needs the room.
  uint32_t free_watermark_blocks = 0;
};

//! \brief What one tenant's sequences may hold at once; 0 = no limit. The `tenants` section is
//! every tenant's default; a tenants file (server.tenants_file) or Coordinator::set_tenant_quota
//! gives a tenant its own.
struct TenantQuota {
  //! Blocks in the tables of its live sequences (running or swapped out), counted per sequence:
  //! a block two of its sequences share counts twice, a cached block none holds not at all.
  uint64_t max_blocks = 0;
  uint64_t max_host_blocks = 0;  //!< of those, blocks swapped out to the host tier
  uint32_t max_sequences = 0;    //!< live sequences (running or swapped out)
  //! The highest priority it may give a sequence (admit, set_priority): priorities decide who
  //! a newcomer may displace, so an unbounded one would let a tenant shield all it holds.
  uint32_t max_priority = UINT32_MAX;

  friend bool operator==(const TenantQuota&, const TenantQuota&) = default;
};

//! \brief The control plane on rank 0 (DESIGN.md §1): a JSON-lines TCP endpoint for a scheduler
//! in another process, and an optional HTTP endpoint serving Prometheus metrics.
struct ServerConfig {
  std::string address = "127.0.0.1";  //!< listen address; "0.0.0.0" listens on every interface
  uint16_t port = 7070;                //!< control protocol; 0 picks a free port
  uint16_t metrics_port = 0;           //!< GET /metrics and /health; 0 serves neither
  uint32_t max_request_bytes = 1u << 20;  //!< longest accepted request line
  uint32_t max_batch_requests = 1024;     //!< requests in one batch (a JSON array line)
  //! A batch stops running requests once its reply has reached this size (each of the rest gets
  //! a short "not run" reply), so a small request line cannot ask for a huge reply.
  uint32_t max_reply_bytes = 8u << 20;
  uint32_t max_connections = 256;       //!< open control connections; more are refused and closed
  //! Logged-in control connections one tenant that is no admin may hold at once; 0 = no limit.
  //! With tenants, so that one tenant cannot take every place of max_connections.
  uint32_t max_connections_per_tenant = 0;
  //! Connections from one client IP address, per endpoint (control, HTTP); 0 = no limit.
  uint32_t max_connections_per_address = 0;
  uint32_t idle_timeout_ms = 300'000;   //!< a connection with no request for this long is closed; 0 = never
  //! After a rank fault the control plane keeps answering (reads, /health, Unavailable to
  //! changes) this long, then the job ends with a non-zero status.
  uint32_t fault_grace_ms = 5'000;
  //! Who may connect: a YAML file of tenants with their tokens, roles and quotas (see
  //! TenantDirectory). Empty: no authentication, allowed only on a loopback address.
  std::string tenants_file;
  //! TLS for the control connections: a PEM certificate chain and its private key (both or
  //! neither). Empty: plain TCP.
  std::string tls_cert_file;
  std::string tls_key_file;
  //! KV-event batches queued per subscriber; a batch that finds the queue full is dropped (and
  //! counted) for that subscriber instead of holding up the coordinator.
  uint32_t event_queue_batches = 1024;
};

//! \brief Where a rank keeps its KV shard and runs its kernels.
enum class BackendKind : uint8_t {
  kAuto,  //!< CUDA when this build has it and the process sees a GPU, else CPU
  kCpu,
  kCuda,
};
//! \brief How a job's ranks move blocks between each other.
enum class TransportKind : uint8_t {
  kAuto,  //!< NCCL when the backend is CUDA and this build has NCCL, else MPI
  kMpi,   //!< host memory; a CUDA rank stages its blocks through pinned host memory
  kNccl,  //!< GPU memory; bootstrapped over MPI (the unique id is broadcast)
};
std::string_view backend_kind_name(BackendKind kind);        // "auto", "cpu", "cuda"
std::string_view transport_kind_name(TransportKind kind);    // "auto", "mpi", "nccl"
Result<BackendKind> parse_backend_kind(std::string_view name);
Result<TransportKind> parse_transport_kind(std::string_view name);

//! runtime.device: the launcher's local rank (modulo the visible devices) picks the device.
inline constexpr int32_t kLocalRankDevice = -1;

//! \brief How the ranks run the plans (DESIGN.md §5).
struct RuntimeConfig {
  //! Rank 0 waits this long for every rank to take, agree on and execute a step's plan; a rank
  //! that does not answer is named and the control plane stops accepting changes. 0 = wait forever.
  uint32_t plan_deadline_ms = 30'000;
  BackendKind backend = BackendKind::kAuto;
  TransportKind transport = TransportKind::kAuto;
  //! The CUDA device of a GPU rank, an index among the visible ones (CUDA_VISIBLE_DEVICES is
  //! honoured), or kLocalRankDevice ("local-rank" in YAML).
  int32_t device = kLocalRankDevice;
};

struct Config {
  ModelConfig model;
  CacheConfig cache;
  TopologyConfig topology;
  CoordinatorConfig coordinator;
  ServerConfig server;
  RuntimeConfig runtime;
  TenantQuota tenants;
};

//! KV heads stored on each rank: Hkv / tp, or 1 when Hkv < tp (heads replicated, as vLLM does).
uint32_t local_kv_heads(const ModelConfig& model, const TopologyConfig& topology);
//! The per-rank block layout this config implies.
Result<BlockLayout> block_layout(const Config& config);
//! The layer groups a rank's pool is seen as (PyramidKV's tables per group): num_layers /
//! cache.layers_per_group, or 0 when one group holds every layer (layers_per_group 0 or all).
uint32_t num_layer_groups(const Config& config);
//! Device-tier blocks per rank: num_blocks, or memory_budget_bytes / block_bytes.
Result<uint64_t> resolved_num_blocks(const Config& config);

//! \brief Checks every field range and the cross-field rules; the message names the key.
Status validate(const Config& config);
//! What contradicts itself in a quota ("max_host_blocks (8) exceeds max_blocks (4), ..."), or
//! "" when nothing does. The config's defaults and a tenants file's entries are checked with it.
std::string quota_conflict(const TenantQuota& quota);

//! \brief Parses YAML text. Unknown keys, non-scalar values and malformed numbers are errors that
//! name the key and line. `source` names the text in messages (usually the file path).
//! The result is validated.
Result<Config> parse_config(std::string_view yaml_text, std::string_view source = "<yaml>");
//! Reads and parses a YAML file (see parse_config).
Result<Config> load_config_file(const std::string& path);

//! Environment variables by name.
using Environment = std::map<std::string, std::string>;
//! The KVF_* variables of this process's environment.
Environment process_environment();

//! \brief Applies KVF_<SECTION>_<KEY> overrides (e.g. KVF_CACHE_BLOCK_SIZE, KVF_TOPOLOGY_TP,
//! KVF_CACHE_EVICTION_THRESHOLD), then validates. On error the config is unchanged.
//! A KVF_ variable that looks meant for a key but names none (it starts with a section,
//! KVF_CACHE_..., or is a near miss such as KVF_CAHCE_BLOCK_SIZE) is an error naming the closest
//! key's variable; other KVF_ variables (KVF_LOG, KVF_CPU_ISA) are not config and are ignored.
//! Each applied override is logged at info level.
Status apply_env_overrides(Config& config, const Environment& env = process_environment());

//! \brief The effective config as YAML, followed by the derived values as comments
//! (local KV heads, block layout and bytes, resolved num_blocks).
std::string dump_config(const Config& config);

//! Every settable key, dotted ("cache.eviction.threshold"), in dump order.
std::vector<std::string> config_keys();
//! The environment variable that overrides `key`, e.g. "KVF_CACHE_BLOCK_SIZE".
std::string env_var_for_key(std::string_view key);

//! Parses "17179869184", "16GiB", "512 MiB", "1.5GB" into bytes (fractions of a byte dropped;
//! a size that is not 0 but under one byte is an error).
Result<uint64_t> parse_byte_size(std::string_view text);

}  // namespace kvfabric
