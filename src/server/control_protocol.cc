#include "kvfabric/server/control_protocol.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "kvfabric/common/check.h"
#include "kvfabric/common/version.h"
#include "kvfabric/server/metrics.h"

namespace kvfabric {
namespace {

using nlohmann::json;

constexpr uint64_t kMaxSeqId = (uint64_t{1} << 63) - 1;  // the Coordinator's limit
constexpr uint64_t kMaxU32 = std::numeric_limits<uint32_t>::max();

constexpr std::pair<std::string_view, ControlOp> kOps[] = {
    {"hello", ControlOp::kHello},   {"admit", ControlOp::kAdmit},
    {"append", ControlOp::kAppend}, {"fork", ControlOp::kFork},
    {"free", ControlOp::kFree},     {"set_priority", ControlOp::kSetPriority},
    {"step", ControlOp::kStep},     {"query", ControlOp::kQuery},
    {"stats", ControlOp::kStats},   {"shutdown", ControlOp::kShutdown},
    {"subscribe", ControlOp::kSubscribe}, {"reset_prefix_cache", ControlOp::kResetPrefixCache},
    {"report_attention", ControlOp::kReportAttention},
    {"admission_costs", ControlOp::kAdmissionCosts},
};
static_assert(std::size(kOps) == kNumControlOps);

// Ops that change nothing; they are still answered after the control plane has failed.
bool is_read_only(ControlOp op) {
  return op == ControlOp::kHello || op == ControlOp::kQuery || op == ControlOp::kStats ||
         op == ControlOp::kShutdown || op == ControlOp::kSubscribe ||
         op == ControlOp::kAdmissionCosts;
}

// At most this much of a client's text (a key, an op name, a string value) is quoted back in
// an error: a reply must not echo a megabyte line.
constexpr size_t kQuotedKeyChars = 64;

// The first `max_bytes` of UTF-8 `text`, never cutting a character in two (a cut one would make
// the reply invalid JSON).
std::string utf8_prefix(const std::string& text, size_t max_bytes) {
  if (text.size() <= max_bytes) return text;
  size_t end = max_bytes;
  while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80)
    --end;
  return text.substr(0, end);
}

// `text` as a JSON string for an error message (quotes and control characters escaped), cut
// to kQuotedKeyChars bytes (marked "...").
std::string quoted(const std::string& text) {
  const std::string prefix = utf8_prefix(text, kQuotedKeyChars);
  return json(prefix).dump(-1, ' ', false, json::error_handler_t::replace) +
         (prefix.size() < text.size() ? "..." : "");
}

// A value for an error message. Containers are named, not printed: printing (like copying) a
// JSON value recurses once per nesting level, and a request line may nest deeply enough to
// overflow the stack.
std::string describe(const json& v) {
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  if (v.is_string()) return quoted(v.get_ref<const std::string&>());
  return v.dump();
}

constexpr size_t kMaxSaltBytes = 256;

// A request object whose fields are read with their types and ranges checked; errors name the
// op and the field.
class Request {
 public:
  Request(const json& object, std::string_view op) : object_(object), op_(op) {}

  // Refuses fields other than "op", "id" and `allowed`.
  Status only(std::initializer_list<std::string_view> allowed) const {
    for (const auto& [key, value] : object_.items()) {
      if (key == "op" || key == "id") continue;
      bool known = false;
      for (std::string_view a : allowed)
        known = known || key == a;
      if (!known) return error("unknown field " + quoted(key));
    }
    return ok_status();
  }

  Result<uint64_t> unsigned_field(const char* key, uint64_t max) const {
    const auto it = object_.find(key);
    if (it == object_.end()) return error(std::string("missing field \"") + key + "\"");
    return to_unsigned(key, *it, max);
  }
  Result<std::optional<uint64_t>> optional_unsigned(const char* key, uint64_t max) const {
    const auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) return std::optional<uint64_t>();
    KVF_ASSIGN_OR_RETURN(const uint64_t v, to_unsigned(key, *it, max));
    return std::optional<uint64_t>(v);
  }
  Result<std::optional<std::string>> optional_string(const char* key, size_t max_bytes) const {
    const auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) return std::optional<std::string>();
    if (!it->is_string() || it->get_ref<const std::string&>().size() > max_bytes) {
      return error(std::string("field \"") + key + "\" must be a string of at most " +
                   std::to_string(max_bytes) + " bytes");
    }
    return std::optional<std::string>(it->get<std::string>());
  }
  //! An optional object, as a Request of its own whose errors name "op: key.field".
  Result<std::optional<json>> optional_object(const char* key) const {
    const auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) return std::optional<json>();
    if (!it->is_object()) return error(std::string("field \"") + key + "\" must be an object");
    return std::optional<json>(*it);
  }
  Result<std::optional<double>> optional_number(const char* key) const {
    const auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) return std::optional<double>();
    if (!it->is_number()) {
      return error(std::string("field \"") + key + "\" must be a number (got " + describe(*it) +
                   ")");
    }
    return std::optional<double>(it->get<double>());
  }
  //! An array of finite numbers >= 0.
  Result<std::vector<double>> scores(const char* key) const {
    const auto it = object_.find(key);
    if (it == object_.end()) return error(std::string("missing field \"") + key + "\"");
    if (!it->is_array()) {
      return error(std::string("field \"") + key + "\" must be an array of numbers");
    }
    std::vector<double> out;
    out.reserve(it->size());
    for (const json& v : *it) {
      if (!v.is_number() || !std::isfinite(v.get<double>()) || v.get<double>() < 0) {
        return error(std::string("field \"") + key + "\" element " + std::to_string(out.size()) +
                     " must be a finite number >= 0 (got " + describe(v) + ")");
      }
      out.push_back(v.get<double>());
    }
    return out;
  }
  Result<std::vector<TokenId>> tokens(const char* key) const {
    const auto it = object_.find(key);
    if (it == object_.end()) return error(std::string("missing field \"") + key + "\"");
    if (!it->is_array())
      return error(std::string("field \"") + key + "\" must be an array of token ids");
    std::vector<TokenId> out;
    out.reserve(it->size());
    for (const json& t : *it) {
      if (!t.is_number_unsigned() || t.get<uint64_t>() > kMaxU32) {
        return error(std::string("field \"") + key + "\" element " + std::to_string(out.size()) +
                     " must be a token id in [0, " + std::to_string(kMaxU32) + "] (got " +
                     describe(t) + ")");
      }
      out.push_back(static_cast<TokenId>(t.get<uint64_t>()));
    }
    return out;
  }

 private:
  Result<uint64_t> to_unsigned(const char* key, const json& v, uint64_t max) const {
    if (!v.is_number_unsigned() || v.get<uint64_t>() > max) {
      return error(std::string("field \"") + key + "\" must be an integer in [0, " +
                   std::to_string(max) + "] (got " + describe(v) + ")");
    }
    return v.get<uint64_t>();
  }
  Status error(const std::string& what) const {
    return invalid_argument(std::string(op_) + ": " + what);
  }

  const json& object_;
  std::string_view op_;
};

// Replies are serialized replacing any invalid UTF-8 rather than throwing: a reply must always go
// out, whatever a message quotes.
std::string to_line(const json& reply) {
  return reply.dump(-1, ' ', false, json::error_handler_t::replace);
}

// Parses a request line. A key given twice in one object is refused: nlohmann keeps the last
// one, and a request must mean exactly one thing.
Result<json> parse_line(std::string_view line) {
  // The parser takes a NUL byte for the end of its input and would run what comes before it,
  // so one line could mean one request to the server and another to whoever logs or checks it.
  if (const size_t nul = line.find('\0'); nul != std::string_view::npos) {
    return Status(ErrorCode::kParseError, "the request has a NUL byte at offset " +
                                              std::to_string(nul) + "; JSON text has none");
  }
  std::vector<std::set<std::string>> open_objects;  // the keys seen in each object being read
  std::optional<std::string> duplicate;
  const json::parser_callback_t check_keys = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) open_objects.emplace_back();
    if (event == json::parse_event_t::object_end) open_objects.pop_back();
    if (event == json::parse_event_t::key && !duplicate &&
        !open_objects.back().insert(parsed.get<std::string>()).second) {
      duplicate = utf8_prefix(parsed.get<std::string>(), kQuotedKeyChars);
    }
    return true;
  };
  json parsed = json::parse(line, check_keys, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) return Status(ErrorCode::kParseError, "the request is not valid JSON");
  if (duplicate) {
    return invalid_argument("the key \"" + *duplicate +
                            "\" appears twice in one object; each may appear once");
  }
  return parsed;
}

json error_reply(const Status& status) {
  return {{"ok", false},
          {"error", {{"code", error_code_name(status.code())}, {"message", status.message()}}}};
}

// The fields admit and admission_costs share: priority, cache salt and public range, under the
// connection's tenant (which names the salt's namespace).
Result<AdmitOptions> placement_options(const Request& fields, const ControlIdentity& who) {
  KVF_ASSIGN_OR_RETURN(const auto priority, fields.optional_unsigned("priority", kMaxU32));
  KVF_ASSIGN_OR_RETURN(const auto salt, fields.optional_string("cache_salt", kMaxSaltBytes));
  KVF_ASSIGN_OR_RETURN(const auto public_tokens,
                       fields.optional_unsigned("public_tokens", UINT64_MAX));
  AdmitOptions options;
  options.priority = static_cast<uint32_t>(priority.value_or(0));
  options.tenant = who.tenant;
  options.cache_salt = salt;
  options.public_tokens = public_tokens.value_or(0);
  return options;
}

// Every replica's cost, and where admit would go if one has room (null when none has: admit
// then displaces lower priorities where it can, or is refused).
json admission_costs_reply(const std::vector<AdmissionCost>& costs) {
  json replicas = json::array();
  for (const AdmissionCost& c : costs) {
    replicas.push_back({{"replica", c.replica},
                        {"accepts", c.accepts},
                        {"cached_tokens", c.cached_tokens},
                        {"migration_source", c.migration_source ? json(*c.migration_source) : json()},
                        {"migrated_tokens", c.migrated_tokens},
                        {"load", c.load},
                        {"cost", c.cost},
                        {"blocks_needed", c.blocks_needed},
                        {"blocks_available", c.blocks_available},
                        {"has_room", c.has_room()}});
  }
  const std::optional<uint32_t> chosen = cheapest_with_room(costs);
  return json{{"replicas", std::move(replicas)}, {"chosen", chosen ? json(*chosen) : json()}};
}

json block_list(std::span<const BlockId> blocks) {
  json out = json::array();
  for (BlockId b : blocks)
    out.push_back(b.value);
  return out;
}

json seq_list(std::span<const SeqId> seqs) {
  json out = json::array();
  for (SeqId s : seqs)
    out.push_back(s.value);
  return out;
}

// admit's "compression" object: the fields of quant::CompressionPolicy, checked as admit() does.
Result<quant::CompressionPolicy> compression_policy(const json& object) {
  const Request fields(object, "admit: compression");
  KVF_RETURN_IF_ERROR(fields.only({"policy", "budget_tokens", "budget_ratio", "interval_steps",
                                   "sink_tokens", "recent_tokens", "window_tokens", "beta"}));
  KVF_ASSIGN_OR_RETURN(const auto kind, fields.optional_string("policy", 64));
  if (!kind) return invalid_argument("admit: compression: missing field \"policy\"");
  quant::CompressionPolicy policy;
  const auto parsed_kind = quant::parse_compression_kind(*kind);
  if (!parsed_kind.ok()) return invalid_argument("admit: " + parsed_kind.status().message());
  policy.kind = *parsed_kind;
  for (const auto& [key, value] : object.items()) {
    if (key == "policy") continue;
    KVF_ASSIGN_OR_RETURN(const auto number, fields.optional_number(key.c_str()));
    const Status set = quant::set_compression_field(policy, key, number.value_or(0));
    if (!set.ok()) return invalid_argument("admit: " + set.message());
  }
  const Status valid = quant::validate(policy);
  if (!valid.ok()) return invalid_argument("admit: " + valid.message());
  return policy;
}

json compactions_reply(const StepPlan& plan) {
  json out = json::array();
  for (const StepPlan::Compaction& c : plan.compactions) {
    json kept = json::array();
    for (const StepPlan::TokenRange& range : c.kept) kept.push_back({range.first, range.count});
    json& reply = out.emplace_back(json{{"seq", c.seq.value},
                                        {"replica", c.replica},
                                        {"tokens_before", c.tokens_before},
                                        {"kept", std::move(kept)}});
    if (c.layer_group != StepPlan::kAllLayers) reply["layer_group"] = c.layer_group;
  }
  return out;
}

json plan_reply(const StepPlan& plan) {
  json tables = json::array();
  for (const StepPlan::Table& t : plan.tables) {
    json& table = tables.emplace_back(json{{"seq", t.seq.value},
                                           {"replica", t.replica},
                                           {"num_tokens", t.num_tokens},
                                           {"computed_tokens", t.computed_tokens},
                                           {"first_block", t.first_block},
                                           {"blocks", block_list(t.blocks)}});
    // Only a sequence compacted per layer group (pyramid) names one.
    if (t.layer_group != StepPlan::kAllLayers) table["layer_group"] = t.layer_group;
  }
  json score_requests = json::array();
  for (const StepPlan::ScoreRequest& request : plan.score_requests) {
    score_requests.push_back({{"seq", request.seq.value}, {"replica", request.replica}});
  }
  return {{"step", plan.step},
          {"tables", std::move(tables)},
          {"released", seq_list(plan.released)},
          {"preempted", seq_list(plan.preempted)},
          {"compactions", compactions_reply(plan)},
          {"score_requests", std::move(score_requests)},
          {"ops",
           {{"swap_out", plan.count(StepPlan::OpKind::kSwapOut)},
            {"migrate", plan.count(StepPlan::OpKind::kMigrate)},
            {"swap_in", plan.count(StepPlan::OpKind::kSwapIn)},
            {"copy", plan.count(StepPlan::OpKind::kCopy)}}}};
}

json tenant_reply(const TenantStats& t) {
  return {{"admitted", t.admitted},
          {"prompt_tokens", t.prompt_tokens},
          {"cached_tokens", t.cached_tokens},
          {"migrated_tokens", t.migrated_tokens},
          {"refused", t.refused},
          {"preempted", t.preempted},
          {"sequences", t.sequences},
          {"blocks", t.blocks},
          {"host_blocks", t.host_blocks}};
}

// What a tenant that is not an admin may know: its own counters and the cluster's shape.
json own_stats_reply(const Coordinator& coordinator, const std::string& tenant) {
  json own = tenant_reply(coordinator.tenant_stats(tenant));
  own["tenant"] = tenant;
  own["steps"] = coordinator.stats().steps;
  const TenantQuota q = coordinator.tenant_quota(tenant);
  own["quota"] = {{"max_blocks", q.max_blocks},
                  {"max_host_blocks", q.max_host_blocks},
                  {"max_sequences", q.max_sequences},
                  {"max_priority", q.max_priority}};
  return own;
}

// `tenants_file`: whether connections log in as named tenants, so that none can be the default
// tenant "": it is then listed only when something else (an embedding program) used it.
json stats_reply(const Coordinator& coordinator, bool tenants_file) {
  const CoordinatorStats& s = coordinator.stats();
  json replicas = json::array();
  for (uint32_t r = 0; r < coordinator.num_replicas(); ++r) {
    const ReplicaStats pools = coordinator.replica_stats(r);
    replicas.push_back({{"replica", r},
                        {"device_blocks", pools.device_blocks},
                        {"used_blocks", pools.used_blocks},
                        {"cached_blocks", pools.cached_blocks},
                        {"free_blocks", pools.free_blocks},
                        {"sequences", pools.sequences},
                        {"swapped", pools.swapped},
                        {"host_free_blocks", pools.host_free_blocks}});
  }
  json tenants = json::object();
  for (const std::string& name : coordinator.tenants()) {
    const TenantStats used = coordinator.tenant_stats(name);
    if (tenants_file && name.empty() && used.admitted == 0 && used.refused == 0) continue;
    tenants[name] = tenant_reply(used);
  }
  return {{"admitted", s.admitted},
          {"tenants", std::move(tenants)},
          {"prompt_tokens", s.prompt_tokens},
          {"local_hit_tokens", s.local_hit_tokens},
          {"migrated_tokens", s.migrated_tokens},
          {"migrated_blocks", s.migrated_blocks},
          {"swapped_out", s.swapped_out},
          {"swapped_in", s.swapped_in},
          {"parked", s.parked},
          {"preempted", s.preempted},
          {"steps", s.steps},
          {"compactions", s.compactions},
          {"compacted_tokens", s.compacted_tokens},
          {"compacted_blocks", s.compacted_blocks},
          {"compressed_indexed", s.compressed_indexed},
          {"compressed_hits", s.compressed_hits},
          {"missed_tokens",
           {{"partial_block", s.missed.partial_block},
            {"other_replica", s.missed.other_replica},
            {"evicted", s.missed.evicted},
            {"other_salt", s.missed.other_salt},
            {"never_seen", s.missed.never_seen}}},
          {"replicas", std::move(replicas)}};
}

}  // namespace

std::string kv_events_json(const KvEventBatch& batch, uint32_t block_size) {
  json events = json::array();
  for (const KvEvent& e : batch.events) {
    json event = {{"type", kv_event_type_name(e.type)}, {"replica", e.replica}, {"tier", "device"}};
    if (e.type == KvEventType::kBlockStored) {
      event["block_hashes"] = e.block_hashes;
      event["parent_block_hash"] = e.parent_block_hash ? json(*e.parent_block_hash) : json(nullptr);
      event["block_size"] = block_size;
      event["num_tokens"] = e.num_tokens;
      event["salt"] = e.salt.empty() ? json(nullptr) : json(to_string(e.salt));
    } else if (e.type == KvEventType::kBlockRemoved) {
      event["block_hashes"] = e.block_hashes;
    }
    events.push_back(std::move(event));
  }
  return json{{"step", batch.step}, {"events", std::move(events)}}.dump();
}

std::string_view control_op_name(ControlOp op) {
  for (const auto& [name, o] : kOps) {
    if (o == op) return name;
  }
  return "?";
}

ControlProtocolOptions ControlProtocolOptions::from(const ServerConfig& config) {
  ControlProtocolOptions o;
  o.max_batch_requests = config.max_batch_requests;
  o.max_reply_bytes = config.max_reply_bytes;
  o.event_queue_batches = config.event_queue_batches;
  o.max_connections_per_tenant = config.max_connections_per_tenant;
  return o;
}

ControlProtocol::ControlProtocol(Coordinator& coordinator, PlanSink sink,
                                 ControlProtocolOptions options)
    : coordinator_(&coordinator),
      sink_(std::move(sink)),
      options_(options),
      events_(options.event_queue_batches) {
  if (options_.tenants == nullptr) return;
  for (const TenantEntry& tenant : options_.tenants->entries()) {
    if (!tenant.quota) continue;
    const Status set = coordinator_->set_tenant_quota(tenant.name, *tenant.quota);
    KVF_CHECK(set.ok(), set.message());  // the tenants file refused such quotas when it was read
  }
}

ControlProtocol::~ControlProtocol() {
  if (publishing_events_) coordinator_->set_kv_event_sink(nullptr);
}

std::string ControlProtocol::refuse(const Status& why) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++stats_.malformed;
  return to_line(error_reply(why));
}

// The handlers of one request, with access to the protocol's state.
class ControlRequestHandler {
 public:
  static json handle(ControlProtocol& protocol, const json& request, ControlIdentity& who);
  static std::string handle_batch(ControlProtocol& protocol, const json& batch,
                                  ControlIdentity& who);

 private:
  using Lock = std::unique_lock<std::mutex>;
  static json handle_locked(ControlProtocol& protocol, const json& request, ControlIdentity& who,
                            Lock& lock);
  static Result<json> run(ControlProtocol& protocol, ControlOp op, const Request& fields,
                          ControlIdentity& who, Lock& lock);
  static Result<json> hello(ControlProtocol& protocol, const Request& fields, ControlIdentity& who);
  //! A place among `tenant`'s logged-in connections (none needed without a limit, or for an
  //! admin); ResourceExhausted when it holds server.max_connections_per_tenant already.
  static Result<std::shared_ptr<const void>> take_tenant_place(ControlProtocol& protocol,
                                                               const TenantEntry& tenant);
  // SequenceNotFound, as for an unknown id, when `seq` is another tenant's and `who` no admin.
  static Status check_owner(const ControlProtocol& protocol, const ControlIdentity& who, SeqId seq);
  static Status check_admin(const ControlIdentity& who, ControlOp op);
  static Result<json> step(ControlProtocol& protocol, Lock& lock);
};

std::string ControlProtocol::metrics_text() const {
  const ControlStats requests = stats();
  std::string text;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    text = render_metrics(*coordinator_, &requests);
    const Config& config = coordinator_->config();
    const BuildFeatures built = build_features();
    const MetricSample info{
        fmt::format("version=\"{}\",model=\"{}\",dp=\"{}\",tp=\"{}\",backend=\"{}\","
                    "kv_dtype=\"{}\",cuda=\"{}\",nccl=\"{}\",mpi=\"{}\"",
                    version(), prometheus_label_value(config.model.name), config.topology.dp,
                    config.topology.tp, prometheus_label_value(options_.backend),
                    dtype_name(config.cache.kv_dtype), built.cuda ? "on" : "off",
                    built.nccl ? "on" : "off", built.mpi ? "on" : "off"),
        1};
    append_metric_family(text, "kvfabric_build_info", "gauge",
                         "The build and the job: version, model, topology, backend and KV dtype "
                         "as labels; the value is always 1.",
                         std::span(&info, 1));
    admit_seconds_.render(text, "kvfabric_admit_duration_seconds",
                          "Coordinator time of each admit request (lookup, placement, allocation).");
    step_seconds_.render(text, "kvfabric_step_duration_seconds",
                         "Coordinator time of each step request, before its plan goes out.");
    plan_seconds_.render(text, "kvfabric_plan_execution_duration_seconds",
                         "From a step's plan going out to every rank having executed it.");
  }
  // Outside the lock: the ranks' figures come from the plan sink's side (kvfabric-serve).
  if (options_.extra_metrics) text += options_.extra_metrics();
  return text;
}

ControlHealth ControlProtocol::health() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ControlHealth{failure_.ok(), stepping_, coordinator_->stats().steps, failure_.message()};
}

ControlStats ControlProtocol::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  ControlStats stats = stats_;
  stats.kv_event_batches = events_.published();
  stats.kv_event_batches_dropped = events_.dropped();
  stats.kv_event_subscribers = events_.subscribers();
  return stats;
}

void ControlProtocol::follow_subscribers() {
  const bool wanted = events_.subscribers() > 0;
  if (wanted == publishing_events_) return;
  publishing_events_ = wanted;
  if (!wanted) {
    coordinator_->set_kv_event_sink(nullptr);
    return;
  }
  const uint32_t block_size = coordinator_->config().cache.block_size;
  coordinator_->set_kv_event_sink([this, block_size](const KvEventBatch& batch) {
    events_.publish(kv_events_json(batch, block_size));
  });
}

bool ControlProtocol::shutdown_requested() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return shutdown_requested_;
}

Status ControlProtocol::failure() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return failure_;
}

namespace {
// Who a connection is when nobody needs to authenticate: the admin of the default tenant.
ControlIdentity default_admin() {
  ControlIdentity identity;
  identity.admin = true;
  identity.authenticated = true;
  return identity;
}
}  // namespace

ControlIdentity ControlProtocol::new_connection() const {
  return options_.tenants != nullptr ? ControlIdentity{} : default_admin();
}

std::string ControlProtocol::handle(std::string_view line) {
  ControlIdentity local = default_admin();
  return handle(line, local);
}

std::string ControlProtocol::handle(std::string_view line, ControlIdentity& who) {
  try {
    Result<json> parsed = parse_line(line);
    if (!parsed.ok()) return refuse(parsed.status());
    if (parsed->is_array()) return ControlRequestHandler::handle_batch(*this, *parsed, who);
    return to_line(ControlRequestHandler::handle(*this, *parsed, who));
  } catch (const std::exception& e) {
    // A bug, not the client's fault; the reply still goes out and the server keeps serving.
    return refuse(Status(ErrorCode::kInternal, std::string("the request failed: ") + e.what()));
  }
}

json ControlRequestHandler::handle(ControlProtocol& protocol, const json& request,
                                   ControlIdentity& who) {
  Lock lock(protocol.mutex_);
  protocol.follow_subscribers();  // the last subscriber may have gone since
  return handle_locked(protocol, request, who, lock);
}

std::string ControlRequestHandler::handle_batch(ControlProtocol& protocol, const json& batch,
                                                ControlIdentity& who) {
  const ControlProtocolOptions& limits = protocol.options_;
  if (batch.size() > limits.max_batch_requests) {
    return protocol.refuse(Status(
        ErrorCode::kResourceExhausted,
        "a batch holds at most " + std::to_string(limits.max_batch_requests) +
            " requests (server.max_batch_requests); this one has " + std::to_string(batch.size()) +
            " and none of them ran"));
  }
  // Replies are joined as text, so that each is serialized once and the size is known as it grows.
  std::string replies = "[";
  bool full = false;
  for (const json& request : batch) {
    if (replies.size() > 1) replies += ',';
    if (!full) {
      replies += to_line(handle(protocol, request, who));
      full = replies.size() >= limits.max_reply_bytes;
      continue;
    }
    json not_run = error_reply(Status(
        ErrorCode::kResourceExhausted, "not run: the batch's reply reached " +
                                           std::to_string(limits.max_reply_bytes) +
                                           " bytes (server.max_reply_bytes)"));
    if (request.is_object()) {
      const auto id = request.find("id");
      if (id != request.end() && !id->is_structured()) not_run["id"] = *id;
    }
    Lock lock(protocol.mutex_);
    ++protocol.stats_.limited;
    lock.unlock();
    replies += to_line(not_run);
  }
  return replies + "]";
}

json ControlRequestHandler::handle_locked(ControlProtocol& protocol, const json& request,
                                          ControlIdentity& who, Lock& lock) {
  auto malformed = [&](const Status& why) {
    ++protocol.stats_.malformed;
    return error_reply(why);
  };
  if (!request.is_object()) {
    return malformed(invalid_argument("a request must be a JSON object (got " +
                                      std::string(request.type_name()) + ")"));
  }
  // Scalars only (as JSON-RPC): an id is echoed, and echoing copies it (see describe()).
  const auto id = request.find("id");
  if (id != request.end() && id->is_structured()) {
    return malformed(invalid_argument("\"id\" must be a string, number, boolean or null (got " +
                                      describe(*id) + ")"));
  }
  json reply = [&] {
    const auto op_field = request.find("op");
    if (op_field == request.end() || !op_field->is_string()) {
      return malformed(invalid_argument("a request needs an \"op\" string"));
    }
    const std::string& name = op_field->get_ref<const std::string&>();
    std::optional<ControlOp> op;
    for (const auto& [n, o] : kOps) {
      if (n == name) op = o;
    }
    if (!op) return malformed(invalid_argument("unknown op " + quoted(name)));
    const size_t index = static_cast<size_t>(*op);
    Result<json> result = run(protocol, *op, Request(request, name), who, lock);
    if (!result.ok()) {
      ++protocol.stats_.failed[index];
      return error_reply(result.status());
    }
    ++protocol.stats_.ok[index];
    json done = std::move(result).value();
    done["ok"] = true;
    return done;
  }();
  if (id != request.end()) reply["id"] = *id;
  return reply;
}

Result<json> ControlRequestHandler::step(ControlProtocol& protocol, Lock& lock) {
  using Clock = std::chrono::steady_clock;  // for the histograms only
  const auto started = Clock::now();
  Result<StepPlan> planned = protocol.coordinator_->step();
  protocol.step_seconds_.observe(Clock::now() - started);
  KVF_ASSIGN_OR_RETURN(const StepPlan plan, std::move(planned));
  if (protocol.sink_) {
    // The ranks execute the plan without the lock: metrics, health and other readers answer
    // meanwhile, and nothing else changes the coordinator (handle() has one caller at a time).
    protocol.stepping_ = true;
    lock.unlock();
    const auto sent = Clock::now();
    const Status delivered = protocol.sink_(plan);
    const auto executed = Clock::now();
    lock.lock();
    protocol.plan_seconds_.observe(executed - sent);
    protocol.stepping_ = false;
    if (!delivered.ok()) {
      protocol.failure_ =
          Status(ErrorCode::kUnavailable,
                 "step " + std::to_string(plan.step) + "'s plan did not reach the ranks (" +
                     delivered.to_string() + "); the control plane accepts no more changes");
      return protocol.failure_;
    }
  }
  return plan_reply(plan);
}

Result<json> ControlRequestHandler::hello(ControlProtocol& protocol, const Request& fields,
                                          ControlIdentity& who) {
  KVF_RETURN_IF_ERROR(fields.only({"token"}));
  KVF_ASSIGN_OR_RETURN(const auto token, fields.optional_string("token", 4096));
  const TenantDirectory* tenants = protocol.options_.tenants;
  if (token && tenants == nullptr) {
    return invalid_argument("hello: this server has no tenants file; send hello without a token");
  }
  if (token && who.authenticated && tenants != nullptr) {
    return invalid_operation("hello: this connection is already authenticated as tenant '" +
                             who.tenant + "'; a token is sent once per connection");
  }
  if (tenants != nullptr && !who.authenticated) {
    if (!token) return Status(ErrorCode::kUnauthenticated, "hello: this server needs a token");
    const std::optional<TenantEntry> entry = tenants->authenticate(*token);
    if (!entry) {
      who.refused = true;
      return Status(ErrorCode::kUnauthenticated,
                    "hello: the token is not valid; closing the connection");
    }
    KVF_ASSIGN_OR_RETURN(std::shared_ptr<const void> place, take_tenant_place(protocol, *entry));
    who = ControlIdentity{entry->name, entry->admin, /*authenticated=*/true, /*refused=*/false,
                          who.events, std::move(place)};
  }
  const Coordinator& coordinator = *protocol.coordinator_;
  const Config& c = coordinator.config();
  return json{{"protocol", ControlProtocol::kVersion},
              {"version", version()},
              {"model", c.model.name},
              {"dp", c.topology.dp},
              {"tp", c.topology.tp},
              {"block_size", c.cache.block_size},
              {"block_bytes", coordinator.block_bytes()},
              {"next_step", coordinator.stats().steps},
              {"tenant", who.tenant},
              {"admin", who.admin}};
}

Result<std::shared_ptr<const void>> ControlRequestHandler::take_tenant_place(
    ControlProtocol& protocol, const TenantEntry& tenant) {
  const uint32_t limit = protocol.options_.max_connections_per_tenant;
  if (limit == 0 || tenant.admin) return std::shared_ptr<const void>();
  auto& slot = protocol.tenant_connections_[tenant.name];
  if (!slot) slot = std::make_shared<std::atomic<uint32_t>>(0);
  std::shared_ptr<std::atomic<uint32_t>> count = slot;
  uint32_t held = count->load();
  do {
    if (held >= limit) {
      return Status(ErrorCode::kResourceExhausted,
                    "hello: tenant '" + tenant.name + "' already holds " + std::to_string(held) +
                        " connections (server.max_connections_per_tenant); close one first");
    }
  } while (!count->compare_exchange_weak(held, held + 1));
  // Given back when the connection's identity goes, on whichever thread that happens.
  return std::shared_ptr<const void>(nullptr, [count](const void*) { --*count; });
}

Status ControlRequestHandler::check_owner(const ControlProtocol& protocol,
                                          const ControlIdentity& who, SeqId seq) {
  if (who.admin) return ok_status();
  const auto owner = protocol.coordinator_->tenant_of(seq);
  return owner && *owner == who.tenant ? ok_status() : sequence_not_found(seq);
}

Status ControlRequestHandler::check_admin(const ControlIdentity& who, ControlOp op) {
  if (who.admin) return ok_status();
  return Status(ErrorCode::kPermissionDenied, std::string(control_op_name(op)) +
                                                  ": only an admin tenant may do this (tenant '" +
                                                  who.tenant + "' is not one)");
}

Result<json> ControlRequestHandler::run(ControlProtocol& protocol, ControlOp op,
                                        const Request& fields, ControlIdentity& who, Lock& lock) {
  Coordinator& coordinator = *protocol.coordinator_;
  if (who.refused) {
    return Status(ErrorCode::kUnauthenticated,
                  std::string(control_op_name(op)) + ": this connection presented a wrong token");
  }
  if (!who.authenticated && op != ControlOp::kHello) {
    return Status(ErrorCode::kUnauthenticated,
                  std::string(control_op_name(op)) + ": send hello with this tenant's token first");
  }
  if (!protocol.failure_.ok() && !is_read_only(op)) return protocol.failure_;
  switch (op) {
    case ControlOp::kHello:
      return hello(protocol, fields, who);
    case ControlOp::kAdmit: {
      KVF_RETURN_IF_ERROR(fields.only(
          {"seq", "tokens", "priority", "cache_salt", "public_tokens", "compression"}));
      KVF_ASSIGN_OR_RETURN(const uint64_t seq, fields.unsigned_field("seq", kMaxSeqId));
      KVF_ASSIGN_OR_RETURN(std::vector<TokenId> tokens, fields.tokens("tokens"));
      KVF_ASSIGN_OR_RETURN(AdmitOptions options, placement_options(fields, who));
      KVF_ASSIGN_OR_RETURN(const auto compression, fields.optional_object("compression"));
      if (compression) {
        KVF_ASSIGN_OR_RETURN(options.compression, compression_policy(*compression));
      }
      const auto started = std::chrono::steady_clock::now();
      Result<Placement> admitted = coordinator.admit(SeqId{seq}, std::move(tokens), options);
      protocol.admit_seconds_.observe(std::chrono::steady_clock::now() - started);
      KVF_ASSIGN_OR_RETURN(const Placement placed, std::move(admitted));
      return json{{"replica", placed.replica},
                  {"cached_tokens", placed.cached_tokens},
                  {"migrated_tokens", placed.migrated_tokens},
                  {"compressed_tokens", placed.compressed_tokens},
                  {"blocks", block_list(placed.blocks)}};
    }
    case ControlOp::kAdmissionCosts: {
      KVF_RETURN_IF_ERROR(fields.only({"tokens", "priority", "cache_salt", "public_tokens"}));
      // Every replica's load and room: what stats shows only an admin.
      KVF_RETURN_IF_ERROR(check_admin(who, op));
      KVF_ASSIGN_OR_RETURN(const std::vector<TokenId> tokens, fields.tokens("tokens"));
      KVF_ASSIGN_OR_RETURN(const AdmitOptions options, placement_options(fields, who));
      KVF_ASSIGN_OR_RETURN(const std::vector<AdmissionCost> costs,
                           coordinator.admission_costs(tokens, options));
      return admission_costs_reply(costs);
    }
    case ControlOp::kAppend: {
      KVF_RETURN_IF_ERROR(fields.only({"seq", "num_tokens"}));
      KVF_ASSIGN_OR_RETURN(const uint64_t seq, fields.unsigned_field("seq", kMaxSeqId));
      KVF_ASSIGN_OR_RETURN(const uint64_t n, fields.unsigned_field("num_tokens", kMaxU32));
      KVF_RETURN_IF_ERROR(check_owner(protocol, who, SeqId{seq}));
      KVF_RETURN_IF_ERROR(coordinator.append(SeqId{seq}, n));
      return json::object();
    }
    case ControlOp::kFork: {
      KVF_RETURN_IF_ERROR(fields.only({"src", "dst", "replica"}));
      KVF_ASSIGN_OR_RETURN(const uint64_t src, fields.unsigned_field("src", kMaxSeqId));
      KVF_ASSIGN_OR_RETURN(const uint64_t dst, fields.unsigned_field("dst", kMaxSeqId));
      KVF_ASSIGN_OR_RETURN(const auto replica, fields.optional_unsigned("replica", kMaxU32));
      std::optional<uint32_t> target;
      if (replica) target = static_cast<uint32_t>(*replica);
      KVF_RETURN_IF_ERROR(check_owner(protocol, who, SeqId{src}));
      KVF_RETURN_IF_ERROR(coordinator.fork(SeqId{src}, SeqId{dst}, target));
      return json{{"replica", coordinator.replica_of(SeqId{dst}).value_or(0)}};
    }
    case ControlOp::kReportAttention: {
      KVF_RETURN_IF_ERROR(fields.only({"seq", "step", "scores"}));
      KVF_ASSIGN_OR_RETURN(const uint64_t seq, fields.unsigned_field("seq", kMaxSeqId));
      KVF_ASSIGN_OR_RETURN(const uint64_t step, fields.unsigned_field("step", UINT64_MAX));
      KVF_ASSIGN_OR_RETURN(const std::vector<double> scores, fields.scores("scores"));
      KVF_RETURN_IF_ERROR(check_owner(protocol, who, SeqId{seq}));
      KVF_RETURN_IF_ERROR(coordinator.report_attention(SeqId{seq}, step, scores));
      return json::object();
    }
    case ControlOp::kFree: {
      KVF_RETURN_IF_ERROR(fields.only({"seq"}));
      KVF_ASSIGN_OR_RETURN(const uint64_t seq, fields.unsigned_field("seq", kMaxSeqId));
      KVF_RETURN_IF_ERROR(check_owner(protocol, who, SeqId{seq}));
      KVF_RETURN_IF_ERROR(coordinator.free(SeqId{seq}));
      return json::object();
    }
    case ControlOp::kSetPriority: {
      KVF_RETURN_IF_ERROR(fields.only({"seq", "priority"}));
      KVF_ASSIGN_OR_RETURN(const uint64_t seq, fields.unsigned_field("seq", kMaxSeqId));
      KVF_ASSIGN_OR_RETURN(const uint64_t priority, fields.unsigned_field("priority", kMaxU32));
      KVF_RETURN_IF_ERROR(check_owner(protocol, who, SeqId{seq}));
      KVF_RETURN_IF_ERROR(coordinator.set_priority(SeqId{seq}, static_cast<uint32_t>(priority)));
      return json::object();
    }
    case ControlOp::kStep:
      KVF_RETURN_IF_ERROR(fields.only({}));
      KVF_RETURN_IF_ERROR(check_admin(who, op));
      return step(protocol, lock);
    case ControlOp::kQuery: {
      KVF_RETURN_IF_ERROR(fields.only({"seq"}));
      KVF_ASSIGN_OR_RETURN(const uint64_t seq, fields.unsigned_field("seq", kMaxSeqId));
      KVF_RETURN_IF_ERROR(check_owner(protocol, who, SeqId{seq}));
      const auto replica = coordinator.replica_of(SeqId{seq});
      if (!replica) return sequence_not_found(SeqId{seq});
      return json{{"replica", *replica},
                  {"swapped", coordinator.is_swapped(SeqId{seq})},
                  {"blocks", block_list(coordinator.blocks_of(SeqId{seq}))}};
    }
    case ControlOp::kStats:
      KVF_RETURN_IF_ERROR(fields.only({}));
      return who.admin ? stats_reply(coordinator, protocol.options_.tenants != nullptr)
                       : own_stats_reply(coordinator, who.tenant);
    case ControlOp::kShutdown:
      KVF_RETURN_IF_ERROR(fields.only({}));
      KVF_RETURN_IF_ERROR(check_admin(who, op));
      if (!protocol.options_.allow_shutdown) {
        return invalid_operation("shutdown: this server does not accept shutdown requests");
      }
      protocol.shutdown_requested_ = true;
      return json::object();
    case ControlOp::kSubscribe: {
      KVF_RETURN_IF_ERROR(fields.only({}));
      KVF_RETURN_IF_ERROR(check_admin(who, op));
      if (who.events) return invalid_operation("subscribe: this connection is subscribed already");
      // Changes not delivered yet (evictions since the last step) go to the subscribers that
      // came before: the newcomer's snapshot already reflects them.
      if (protocol.publishing_events_) coordinator.flush_kv_events();
      who.events = protocol.events_.subscribe();
      protocol.follow_subscribers();
      // What every replica caches now comes first; every later batch follows on from it.
      const KvEventBatch snapshot = coordinator.kv_event_snapshot();
      if (!snapshot.events.empty()) {
        (void)who.events->offer(std::make_shared<const std::string>(
            kv_events_json(snapshot, coordinator.config().cache.block_size)));
      }
      return json{{"subscribed", true},
                  {"queue_limit", who.events->queue_limit()},
                  {"step", snapshot.step}};
    }
    case ControlOp::kResetPrefixCache: {
      KVF_RETURN_IF_ERROR(fields.only({"replica"}));
      KVF_RETURN_IF_ERROR(check_admin(who, op));
      KVF_ASSIGN_OR_RETURN(const auto replica, fields.optional_unsigned("replica", kMaxU32));
      std::optional<uint32_t> which;
      if (replica) which = static_cast<uint32_t>(*replica);
      KVF_ASSIGN_OR_RETURN(const uint64_t freed, coordinator.reset_prefix_cache(which));
      return json{{"freed_blocks", freed}};
    }
  }
  return Status(ErrorCode::kInternal, "unhandled op " + std::string(control_op_name(op)));
}

}  // namespace kvfabric
