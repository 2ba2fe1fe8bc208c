// The control protocol: a scheduler's requests to the Coordinator as JSON, one per line.
#pragma once

#include <array>
#include <cstdint>
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "kvfabric/common/status.h"
#include "kvfabric/config/config.h"
#include "kvfabric/coordinator/coordinator.h"
#include "kvfabric/server/kv_event_hub.h"
#include "kvfabric/server/metrics.h"
#include "kvfabric/server/tenant_directory.h"

namespace kvfabric {

//! Receives every step's plan before the step's reply goes out (rank 0 broadcasts it to the
//! ranks and executes its own share). An error fails the control plane (see ControlProtocol).
using PlanSink = std::function<Status(const StepPlan& plan)>;

//! The requests the protocol knows, in the order metrics list them.
enum class ControlOp : uint8_t {
  kHello,
  kAdmit,
  kAppend,
  kFork,
  kFree,
  kSetPriority,
  kStep,
  kQuery,
  kStats,
  kShutdown,
  kSubscribe,
  kResetPrefixCache,
  kReportAttention,
  kAdmissionCosts,
};
inline constexpr size_t kNumControlOps = 14;
std::string_view control_op_name(ControlOp op);  // "hello", "admit", ..., "set_priority", ...

//! Requests handled so far, by op, and those refused before reaching an op (unreadable JSON,
//! unknown op, a line too long, a batch too large) or not run because a batch's reply was full.
struct ControlStats {
  std::array<uint64_t, kNumControlOps> ok{};
  std::array<uint64_t, kNumControlOps> failed{};
  uint64_t malformed = 0;
  uint64_t limited = 0;  //!< batch requests not run: the batch's reply reached max_reply_bytes
  uint64_t kv_event_batches = 0;          //!< KV-event batches published to subscribers
  uint64_t kv_event_batches_dropped = 0;  //!< not queued: a subscriber's queue was full
  uint64_t kv_event_subscribers = 0;      //!< subscribed connections open now
};

//! Who is on one connection (the server keeps one per connection).
struct ControlIdentity {
  std::string tenant;          //!< "" = the default tenant
  bool admin = false;          //!< may see and change every tenant's sequences, step, shut down
  bool authenticated = false;  //!< false until hello presents a valid token
  //! A hello presented a wrong token: every later request is refused and the server closes the
  //! connection, so that tokens cannot be guessed at a batch's pace.
  bool refused = false;
  //! Set by subscribe: from the reply on, the connection carries this subscription's events.
  std::shared_ptr<KvEventSubscription> events;
  //! Its place among its tenant's connections (server.max_connections_per_tenant), given up
  //! when the connection (its last copy of this) goes.
  std::shared_ptr<const void> tenant_place;
};

struct ControlProtocolOptions {
  bool allow_shutdown = false;  //!< whether a client (an admin) may stop the server
  //! Who may connect (server.tenants_file); must outlive the protocol. nullptr: no
  //! authentication, every connection is the admin of the default tenant.
  const TenantDirectory* tenants = nullptr;
  uint32_t max_batch_requests = 1024;  //!< server.max_batch_requests
  uint32_t max_reply_bytes = 8u << 20;  //!< server.max_reply_bytes
  uint32_t event_queue_batches = 1024;  //!< server.event_queue_batches
  uint32_t max_connections_per_tenant = 0;  //!< server.max_connections_per_tenant; 0 = no limit
  //! What executes the plans, for the info metric: "cpu" or "cuda" when ranks hold the KV,
  //! "none" when the coordinator serves alone.
  std::string backend = "none";
  //! More Prometheus families for /metrics (kvfabric-serve adds every rank's RankCacheStats);
  //! called from the metrics thread without the protocol's lock.
  std::function<std::string()> extra_metrics{};

  //! The limits of config.server (allow_shutdown stays false).
  static ControlProtocolOptions from(const ServerConfig& config);
};

//! What /health reports: whether the control plane accepts changes, and why not.
struct ControlHealth {
  bool ok = true;         //!< false once a plan failed to reach the ranks
  bool stepping = false;  //!< a step's plan is being executed by the ranks right now
  uint64_t steps = 0;     //!< plans issued so far
  std::string problem;    //!< why it is not ok (names the rank, host and step)
};

//! A batch of KV events as subscribers read it (JSON text): {"step", "events": [{"type",
//! "replica", "tier": "device", and for BlockStored "block_hashes", "parent_block_hash" (null at
//! a prompt's start), "block_size", "num_tokens", "salt" (hex of the salt's identity, null for
//! public blocks); for BlockRemoved "block_hashes"}]}. Hashes are unsigned 64-bit integers
//! (kv_block_hash).
std::string kv_events_json(const KvEventBatch& batch, uint32_t block_size);

//! \brief Turns request lines into Coordinator calls and their replies (DESIGN.md §1, §5).
//!
//! A request is a JSON object with an "op" and the op's fields; an optional "id" (a JSON scalar
//! value) is echoed in the reply. A line holding a JSON array is a batch: its requests run in
//! order, independently, and the reply is the array of their replies. Every reply carries
//! "ok": true and the op's result, or "ok": false and "error": {"code", "message"}; a refused
//! request changes nothing. Unknown fields and a key given twice in one object are refused, so a
//! request means exactly one thing.
//!
//! Limits (each refusal names its config key): a batch of more than max_batch_requests requests
//! is refused whole (nothing runs); once a batch's reply has reached max_reply_bytes, its
//! remaining requests do not run and each gets a ResourceExhausted reply, so that a short line
//! cannot ask for a large reply. A single request's reply is never cut (a step has happened).
//!
//! | op | fields | result |
//! |---|---|---|
//! | hello | token? | protocol, version, model, dp, tp, block_size, block_bytes, next_step, tenant, admin |
//! | admit | seq, tokens, priority?, cache_salt?, public_tokens? | replica, cached_tokens, migrated_tokens, blocks |
//! | append | seq, num_tokens | |
//! | fork | src, dst, replica? | replica |
//! | free | seq | |
//! | set_priority | seq, priority | |
//! | step | | step, tables, released, preempted, ops {swap_out, migrate, swap_in, copy} |
//! | query | seq | replica, swapped, blocks |
//! | stats | | the coordinator's counters with missed_tokens by cause, replicas and tenants (an admin); the caller's tenant (others) |
//! | shutdown | | (when allowed, an admin) |
//! | subscribe | | subscribed, queue_limit, step (an admin; see KV events below) |
//! | reset_prefix_cache | replica? | freed_blocks (an admin) |
//! | report_attention | seq, step, scores | (a compressed sequence's summed attention scores) |
//! | admission_costs | tokens, priority?, cache_salt?, public_tokens? | replicas (each replica's cost as admit weighs it), chosen (an admin) |
//!
//! Tenants (with options.tenants): a connection first sends hello with its token; any other
//! request before that is Unauthenticated. A tenant admits under its own name (and cache salt),
//! and sees and changes only its own sequences: another tenant's sequence answers exactly as an
//! unknown one (SequenceNotFound). step, shutdown and the cluster-wide stats are an admin's
//! (PermissionDenied otherwise): a step's plan lists every tenant's tables. A cache_salt is
//! scoped to the tenant (two tenants giving the same salt do not share); public_tokens marks
//! the leading tokens shared with every tenant.
//!
//! KV events (subscribe): the connection then carries only event lines, each
//! `{"kv_events": {"step", "events": [...]}, "dropped": D}`: first a snapshot of what every
//! replica caches (BlockStored events), then the changes of each step and reset
//! (Coordinator::set_kv_event_sink; kv_events_json names the fields). Lines the client sends
//! afterwards are discarded. Each subscriber has a queue of server.event_queue_batches batches; a
//! batch that finds it full is dropped for that subscriber and counted, and D (batches dropped
//! before this one) tells the subscriber its view has a gap: it subscribes again for a fresh
//! snapshot. The protocol holds the coordinator's event sink while it has subscribers and gives
//! it up (no hashing cost) when the last one goes.
//!
//! A step's plan goes to the PlanSink before the reply. When the sink fails, the ranks may no
//! longer agree with the coordinator, so the protocol fails for good: that reply and every later
//! change is an Unavailable error naming the step and the sink's reason (a rank that did not
//! answer); reads still answer.
//!
//! Threads: handle() is called by one thread at a time (the server's request thread, which on
//! rank 0 also broadcasts the plans); refuse(), metrics_text() and health() may be called from
//! any thread at any time, also while handle() waits for a step's PlanSink, which runs without
//! the protocol's lock.
class ControlProtocol {
 public:
  static constexpr int kVersion = 1;

  //! With options.tenants, gives each tenant of the file that names a quota that quota.
  ControlProtocol(Coordinator& coordinator, PlanSink sink = nullptr,
                  ControlProtocolOptions options = {});
  //! Gives the coordinator's KV-event sink back (it points into this protocol).
  ~ControlProtocol();
  ControlProtocol(const ControlProtocol&) = delete;
  ControlProtocol& operator=(const ControlProtocol&) = delete;

  //! One request line (without its newline) from the connection `who`, to one reply line
  //! (without newline). hello may change `who`.
  std::string handle(std::string_view line, ControlIdentity& who);
  //! handle() as the in-process admin of the default tenant (tools and tests in this process).
  std::string handle(std::string_view line);
  //! Who a new connection is before its hello.
  [[nodiscard]] ControlIdentity new_connection() const;
  //! Whether connections must present a token (options.tenants is set).
  [[nodiscard]] bool requires_auth() const { return options_.tenants != nullptr; }
  //! The tenant owning `token` (nullopt without tenants or for a wrong token).
  [[nodiscard]] std::optional<TenantEntry> authenticate(std::string_view token) const {
    return options_.tenants ? options_.tenants->authenticate(token) : std::nullopt;
  }
  //! The reply to a line the transport refused (too long), counted as malformed.
  std::string refuse(const Status& why);

  //! Prometheus text exposition of the coordinator's counters, the replicas' pools, the request
  //! counts, the build info, the admit / step / plan-execution latency histograms and
  //! options.extra_metrics.
  [[nodiscard]] std::string metrics_text() const;
  [[nodiscard]] ControlHealth health() const;

  [[nodiscard]] ControlStats stats() const;
  //! A shutdown request was accepted: the server stops after sending its reply.
  [[nodiscard]] bool shutdown_requested() const;
  //! Ok, or why the control plane stopped accepting requests (a failed PlanSink).
  [[nodiscard]] Status failure() const;

 private:
  friend class ControlRequestHandler;  // the op handlers, in control_protocol.cc

  // Keeps the coordinator's event sink set while someone subscribes (under mutex_).
  void follow_subscribers();

  Coordinator* coordinator_;
  PlanSink sink_;
  ControlProtocolOptions options_;
  mutable KvEventHub events_;
  bool publishing_events_ = false;
  LatencyHistogram admit_seconds_;
  LatencyHistogram step_seconds_;
  LatencyHistogram plan_seconds_;
  mutable std::mutex mutex_;  // guards everything below and the coordinator (see above)
  // Logged-in connections per tenant; each counter outlives the protocol while a connection's
  // place holds it, and is decremented from whichever thread drops the connection.
  std::map<std::string, std::shared_ptr<std::atomic<uint32_t>>, std::less<>> tenant_connections_;
  ControlStats stats_;
  bool shutdown_requested_ = false;
  bool stepping_ = false;
  Status failure_;
};

}  // namespace kvfabric
