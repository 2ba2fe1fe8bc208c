// Config: load from a YAML file or string, the fields a user sets, validate, dump.
#include <fmt/format.h>

#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "bindings.h"
#include "kvfabric/common/version.h"

namespace pybind11::detail {

bool type_caster<kvfabric::DType>::load(handle src, bool) {
  if (!isinstance<str>(src)) return false;
  auto parsed = kvfabric::parse_dtype(src.cast<std::string>());
  if (!parsed.ok()) kvfabric::python::raise_status(parsed.status());
  value = *parsed;
  return true;
}

handle type_caster<kvfabric::DType>::cast(kvfabric::DType dtype, return_value_policy, handle) {
  const std::string_view name = kvfabric::dtype_name(dtype);
  return str(name.data(), name.size()).release();
}

bool type_caster<kvfabric::EvictionPolicy>::load(handle src, bool) {
  if (!isinstance<str>(src)) return false;
  auto parsed = kvfabric::parse_eviction_policy(src.cast<std::string>());
  if (!parsed.ok()) kvfabric::python::raise_status(parsed.status());
  value = *parsed;
  return true;
}

handle type_caster<kvfabric::EvictionPolicy>::cast(kvfabric::EvictionPolicy policy,
                                                   return_value_policy, handle) {
  const std::string_view name = kvfabric::eviction_policy_name(policy);
  return str(name.data(), name.size()).release();
}

}  // namespace pybind11::detail

namespace kvfabric::python {

DType dtype_arg(const std::string& name, const char* what) {
  auto parsed = parse_dtype(name);
  if (!parsed.ok()) raise_invalid(fmt::format("{}: {}", what, parsed.status().message()));
  return *parsed;
}

namespace {

// `value` as a config field of type M, or an InvalidArgumentError naming `where`: integers in
// M's range (not bools, not floats), bools for bools, numbers for floating-point fields.
template <typename M>
M number_arg(const py::object& value, const std::string& where) {
  const bool is_bool = PyBool_Check(value.ptr()) != 0;
  if constexpr (std::is_same_v<M, bool>) {
    if (!is_bool) raise_invalid(fmt::format("{} must be True or False (got {})", where, type_name(value)));
    return value.ptr() == Py_True;
  } else if constexpr (std::is_floating_point_v<M>) {
    // Python and NumPy floats and integers: whatever converts with __float__ or __index__.
    const PyNumberMethods* number = Py_TYPE(value.ptr())->tp_as_number;
    const bool has_float = number != nullptr && number->nb_float != nullptr;
    if (is_bool || !(has_float || PyIndex_Check(value.ptr()))) {
      raise_invalid(fmt::format("{} must be a number (got {})", where, type_name(value)));
    }
    return static_cast<M>(py::cast<double>(value));
  } else {
    if (is_bool || !PyIndex_Check(value.ptr())) {
      raise_invalid(fmt::format("{} must be an integer (got {})", where, type_name(value)));
    }
    const py::int_ number = py::reinterpret_steal<py::int_>(PyNumber_Index(value.ptr()));
    const auto lowest = py::int_(std::numeric_limits<M>::lowest());
    const auto highest = py::int_(std::numeric_limits<M>::max());
    if (number < lowest || number > highest) {
      raise_invalid(fmt::format("{} = {} is outside [{}, {}]", where,
                                py::repr(number).cast<std::string>(),
                                std::numeric_limits<M>::lowest(), std::numeric_limits<M>::max()));
    }
    return py::cast<M>(number);
  }
}

// A config section: read-write attributes (set in place: `config.cache.block_size = 32`), a
// keyword constructor, and a __repr__ listing the fields.
template <typename T>
class Section {
 public:
  Section(py::module_& m, const char* name, const char* doc)
      : cls_(m, name, doc), name_(name), fields_(std::make_shared<std::vector<std::string>>()) {
    cls_.def(py::init<>());
  }
  template <typename M>
  Section& field(const char* name, M T::*member, const char* doc = "") {
    if constexpr (std::is_arithmetic_v<M>) {
      // Numbers are converted here, so that a refusal names the field (pybind11's own cast
      // would only say the setter's arguments do not match).
      const std::string where = name_ + "." + name;
      cls_.def_property(
          name, [member](const T& self) { return self.*member; },
          [member, where](T& self, const py::object& value) {
            self.*member = number_arg<M>(value, where);
          },
          doc);
    } else {
      cls_.def_readwrite(name, member, doc);
    }
    fields_->push_back(name);
    return *this;
  }
  ~Section() {
    auto fields = fields_;
    std::string type = name_;
    def_repr_and_eq(cls_, name_, fields_);
    // Keyword construction: ModelConfig(num_layers=2, head_dim=64); unknown names are refused.
    cls_.def(py::init([fields, type](const py::kwargs& kwargs) {
      py::object self = py::cast(T{});
      for (const auto& [key, value] : kwargs) {
        const auto name = py::cast<std::string>(key);
        if (std::find(fields->begin(), fields->end(), name) == fields->end()) {
          raise_invalid(fmt::format("{} has no field '{}'", type, name));
        }
        self.attr(name.c_str()) = value;
      }
      return self.cast<T>();
    }));
  }

 private:
  py::class_<T> cls_;
  std::string name_;
  std::shared_ptr<std::vector<std::string>> fields_;
};

Environment environment_arg(const py::object& env) {
  if (env.is_none()) return process_environment();
  if (!py::isinstance<py::dict>(env)) {
    raise_invalid(fmt::format("env must be a dict of strings (got {})", type_name(env)));
  }
  Environment out;
  for (const auto& [key, value] : env.cast<py::dict>()) {
    if (!py::isinstance<py::str>(key) || !py::isinstance<py::str>(value)) {
      raise_invalid(fmt::format("env must map strings to strings (got {} -> {} for {})",
                                type_name(key), type_name(value),
                                py::repr(key).cast<std::string>()));
    }
    out[key.cast<std::string>()] = value.cast<std::string>();
  }
  return out;
}

}  // namespace

void bind_config(py::module_& m) {
  Section<ModelConfig>(m, "ModelConfig", "model: the attention shape before TP sharding")
      .field("name", &ModelConfig::name)
      .field("num_layers", &ModelConfig::num_layers)
      .field("num_query_heads", &ModelConfig::num_query_heads)
      .field("num_kv_heads", &ModelConfig::num_kv_heads)
      .field("head_dim", &ModelConfig::head_dim)
      .field("dtype", &ModelConfig::dtype, "activations: 'f32', 'f16' or 'bf16'");
  Section<EvictionConfig>(m, "EvictionConfig", "cache.eviction")
      .field("strategy", &EvictionConfig::strategy,
             "'lru', 'lfu', 'longest_first', 'priority' or 'streaming_llm'")
      .field("threshold", &EvictionConfig::threshold)
      .field("priority_levels", &EvictionConfig::priority_levels)
      .field("sink_tokens", &EvictionConfig::sink_tokens)
      .field("window_tokens", &EvictionConfig::window_tokens);
  Section<CacheConfig>(m, "CacheConfig", "cache: per-rank block pools")
      .field("block_size", &CacheConfig::block_size)
      .field("num_blocks", &CacheConfig::num_blocks, "device blocks per rank (or memory_budget)")
      .field("memory_budget_bytes", &CacheConfig::memory_budget_bytes)
      .field("kv_dtype", &CacheConfig::kv_dtype)
      .field("quant_group_size", &CacheConfig::quant_group_size)
      .field("host_num_blocks", &CacheConfig::host_num_blocks)
      .field("layers_per_group", &CacheConfig::layers_per_group)
      .field("eviction", &CacheConfig::eviction);
  Section<TopologyConfig>(m, "TopologyConfig", "topology: world = dp x tp ranks")
      .field("tp", &TopologyConfig::tp)
      .field("dp", &TopologyConfig::dp);
  Section<CoordinatorConfig>(m, "CoordinatorConfig", "coordinator: placement costs and limits")
      .field("prefill_token_cost", &CoordinatorConfig::prefill_token_cost)
      .field("migration_token_cost", &CoordinatorConfig::migration_token_cost)
      .field("queue_weight", &CoordinatorConfig::queue_weight)
      .field("memory_weight", &CoordinatorConfig::memory_weight)
      .field("max_sequences_per_replica", &CoordinatorConfig::max_sequences_per_replica)
      .field("max_pending_plan_entries", &CoordinatorConfig::max_pending_plan_entries)
      .field("free_watermark_blocks", &CoordinatorConfig::free_watermark_blocks);
  Section<ServerConfig>(m, "ServerConfig", "server: the control plane (kvfabric-serve)")
      .field("address", &ServerConfig::address)
      .field("port", &ServerConfig::port)
      .field("metrics_port", &ServerConfig::metrics_port)
      .field("max_request_bytes", &ServerConfig::max_request_bytes)
      .field("max_batch_requests", &ServerConfig::max_batch_requests)
      .field("max_reply_bytes", &ServerConfig::max_reply_bytes)
      .field("max_connections", &ServerConfig::max_connections)
      .field("max_connections_per_tenant", &ServerConfig::max_connections_per_tenant)
      .field("max_connections_per_address", &ServerConfig::max_connections_per_address)
      .field("idle_timeout_ms", &ServerConfig::idle_timeout_ms)
      .field("fault_grace_ms", &ServerConfig::fault_grace_ms)
      .field("tenants_file", &ServerConfig::tenants_file)
      .field("tls_cert_file", &ServerConfig::tls_cert_file)
      .field("tls_key_file", &ServerConfig::tls_key_file)
      .field("event_queue_batches", &ServerConfig::event_queue_batches);
  Section<RuntimeConfig>(m, "RuntimeConfig", "runtime: how the ranks run the plans")
      .field("plan_deadline_ms", &RuntimeConfig::plan_deadline_ms);
  Section<TenantQuota>(m, "TenantQuota", "a tenant's limits; 0 = no limit")
      .field("max_blocks", &TenantQuota::max_blocks)
      .field("max_host_blocks", &TenantQuota::max_host_blocks)
      .field("max_sequences", &TenantQuota::max_sequences)
      .field("max_priority", &TenantQuota::max_priority);

  py::class_<Config>(m, "Config",
                     "The typed configuration (configs/*.yaml). Sections are attributes, set in "
                     "place (config.cache.block_size = 32); validate() checks the whole.")
      .def(py::init<>())
      .def_static(
          "load", [](const std::string& path) { return unwrap(load_config_file(path)); },
          py::arg("path"), "Reads and validates a YAML file.")
      .def_static(
          "parse",
          [](const std::string& text, const std::string& source) {
            return unwrap(parse_config(text, source));
          },
          py::arg("yaml"), py::arg("source") = "<yaml>",
          "Parses and validates YAML text; errors name the key and line.")
      .def_readwrite("model", &Config::model)
      .def_readwrite("cache", &Config::cache)
      .def_readwrite("topology", &Config::topology)
      .def_readwrite("coordinator", &Config::coordinator)
      .def_readwrite("server", &Config::server)
      .def_readwrite("runtime", &Config::runtime)
      .def_readwrite("tenants", &Config::tenants, "every tenant's default quota")
      .def("validate", [](const Config& c) { check(validate(c)); },
           "Raises InvalidArgumentError naming the first bad key.")
      .def(
          "apply_env_overrides",
          [](Config& c, const py::object& env) { check(apply_env_overrides(c, environment_arg(env))); },
          py::arg("env") = py::none(),
          "Applies KVF_<SECTION>_<KEY> variables (of `env`, a dict, or of this process); on "
          "error nothing changes.")
      .def("dump", &dump_config, "The effective config as YAML, with the derived values.")
      // Equal when every key has the same value (the dump lists every key), as sections compare.
      .def("__eq__",
           [](const Config& a, const py::object& b) -> py::object {
             if (!py::isinstance<Config>(b)) return py::reinterpret_borrow<py::object>(Py_NotImplemented);
             return py::bool_(dump_config(a) == dump_config(b.cast<const Config&>()));
           })
      .def_property_readonly(
          "block_bytes", [](const Config& c) { return unwrap(block_layout(c)).block_bytes(); },
          "Bytes of one block on one rank.")
      .def_property_readonly(
          "resolved_num_blocks", [](const Config& c) { return unwrap(resolved_num_blocks(c)); },
          "Device blocks per rank: num_blocks, or memory_budget_bytes / block_bytes.")
      .def_property_readonly(
          "local_kv_heads",
          [](const Config& c) {
            check(validate(c));  // the division is meaningless for a tp the config refuses
            return local_kv_heads(c.model, c.topology);
          },
          "KV heads each rank stores (raises for an invalid config).")
      .def_static("keys", &config_keys, "Every settable key, dotted.")
      .def_static("env_var_for_key", [](const std::string& key) { return env_var_for_key(key); })
      .def("copy", [](const Config& c) { return Config(c); })
      .def("__copy__", [](const Config& c) { return Config(c); })
      .def("__deepcopy__", [](const Config& c, const py::dict&) { return Config(c); })
      .def("__str__", &dump_config)
      .def("__repr__", [](const Config& c) {
        return fmt::format("Config(model='{}', layers={}, heads={}/{}x{}, block_size={}, "
                           "kv_dtype={}, tp={}, dp={})",
                           c.model.name, c.model.num_layers, c.model.num_query_heads,
                           c.model.num_kv_heads, c.model.head_dim, c.cache.block_size,
                           dtype_name(c.cache.kv_dtype), c.topology.tp, c.topology.dp);
      })
      .attr("__hash__") = py::none();  // mutable, compared by value

  m.def("version", [] { return std::string(version()); }, "The kvfabric library version.");
  m.def(
      "build_features",
      [] {
        const BuildFeatures f = build_features();
        py::dict d;
        d["cuda"] = f.cuda;
        d["nccl"] = f.nccl;
        d["mpi"] = f.mpi;
        return d;
      },
      "Whether CUDA, NCCL and MPI are built into this module.");
}

}  // namespace kvfabric::python
