// The seed-compatible classes: PagedKvCache (cbtop), KvCache (ferrum), PrefixKvCache with
// CachedKvState and HostKvCache (oxillama), CacheManager and the tensor quantizers (ruvector).
#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "bindings.h"
#include "kvfabric/backend/kv_cache.h"
#include "kvfabric/block/eviction_strategy.h"
#include "kvfabric/block/paged_kv_cache.h"
#include "kvfabric/prefix/prefix_kv_cache.h"
#include "kvfabric/quant/cache_manager.h"
#include "kvfabric/quant/tensor_quantize.h"

namespace kvfabric::python {

namespace {

// A float vector as a NumPy array of `rows` x (size / rows), copied.
py::array_t<float> float_rows(std::span<const float> values, size_t rows) {
  const size_t cols = rows ? values.size() / rows : 0;
  py::array_t<float> out({rows, cols});
  std::copy(values.begin(), values.end(), out.mutable_data());
  return out;
}

std::vector<float> floats_arg(const py::handle& obj, const char* name) {
  refuse_masked(obj, name);
  std::vector<double> wide;  // read as float64 first, so that a float32 overflow is named
  if (py::isinstance<py::array>(obj)) {
    auto array = py::reinterpret_borrow<py::array>(obj);
    if (array.dtype().kind() != 'f' && array.dtype().kind() != 'i' && array.dtype().kind() != 'u') {
      raise_invalid(fmt::format("{} must hold numbers (got dtype {})", name,
                                array.dtype().attr("name").cast<std::string>()));
    }
    auto values = py::array_t<double, py::array::c_style | py::array::forcecast>(array);
    wide.assign(values.data(), values.data() + values.size());
  } else {
    try {
      wide = obj.cast<std::vector<double>>();
    } catch (const py::cast_error&) {
      raise_invalid(fmt::format("{} must be a sequence of floats or a NumPy array", name));
    }
  }
  std::vector<float> out(wide.size());
  for (size_t i = 0; i < wide.size(); ++i) {
    out[i] = static_cast<float>(wide[i]);
    if (std::isinf(out[i]) && std::isfinite(wide[i])) {
      raise_invalid(fmt::format("{}[{}] = {} does not fit in float32 (|x| <= {})", name, i,
                                wide[i], std::numeric_limits<float>::max()));
    }
  }
  return out;
}

std::vector<std::vector<float>> layers_arg(const py::handle& obj, const char* name) {
  std::vector<std::vector<float>> out;
  size_t i = 0;
  for (const py::handle layer : obj) {
    out.push_back(floats_arg(layer, fmt::format("{}[{}]", name, i++).c_str()));
  }
  return out;
}

template <typename T>
std::string display(const T& value) {
  std::ostringstream os;
  os << value;
  return os.str();
}

// The ferrum KvCache with the backend it runs on; attention runs without the GIL, so every
// call holds the mutex (taken without the GIL).
struct PyKvCache {
  std::shared_ptr<BackendHandle> backend;
  KvCache cache;
  std::mutex mutex;

  template <typename F>
  auto locked(F&& f) {
    return without_gil([&] {
      std::lock_guard lock(mutex);
      return f(cache);
    });
  }
};

void bind_paged_kv_cache(py::module_& m) {
  py::class_<EvictionStrategy>(m, "EvictionStrategy",
                               "Which sequence a PagedKvCache gives up first (seed names).")
      .def_static("lru", &EvictionStrategy::lru)
      .def_static("lfu", &EvictionStrategy::lfu)
      .def_static("longest_first", &EvictionStrategy::longest_first)
      .def_static("priority", &EvictionStrategy::priority, py::arg("levels"))
      .def_static("streaming_llm", &EvictionStrategy::streaming_llm, py::arg("sink_tokens"),
                  py::arg("window_tokens"))
      .def_property_readonly("policy", &EvictionStrategy::policy)
      .def_property_readonly("levels", &EvictionStrategy::levels)
      .def_property_readonly("sink_tokens", &EvictionStrategy::sink_tokens)
      .def_property_readonly("window_tokens", &EvictionStrategy::window_tokens)
      .def(py::self == py::self)  // NOLINT(misc-redundant-expression)
      .def("__str__", &EvictionStrategy::to_string)
      .def("__repr__", [](const EvictionStrategy& s) { return "EvictionStrategy." + s.to_string(); })
      .attr("__hash__") = py::none();

  Record<SequenceInfo>(m, "SequenceInfo", "A sequence's block table and eviction bookkeeping.")
      .field("seq_id", &SequenceInfo::seq_id)
      .field("num_tokens", &SequenceInfo::num_tokens)
      .field("block_ids", &SequenceInfo::block_ids)
      .field("last_access", &SequenceInfo::last_access)
      .field("access_count", &SequenceInfo::access_count)
      .field("priority", &SequenceInfo::priority);
  Record<CacheStats>(m, "CacheStats")
      .field("total_allocations", &CacheStats::total_allocations)
      .field("total_frees", &CacheStats::total_frees)
      .field("total_evictions", &CacheStats::total_evictions)
      .field("total_forks", &CacheStats::total_forks)
      .field("peak_blocks_used", &CacheStats::peak_blocks_used)
      .field("cow_copies", &CacheStats::cow_copies)
      .field("cow_copied_tokens", &CacheStats::cow_copied_tokens)
      .field("compactions", &CacheStats::compactions)
      .field("compaction_copied_tokens", &CacheStats::compaction_copied_tokens)
      .field("streaming_evicted_tokens", &CacheStats::streaming_evicted_tokens)
      .field("selection_evicted_tokens", &CacheStats::selection_evicted_tokens)
      .field("shared_prefix_blocks", &CacheStats::shared_prefix_blocks)
      .field("cached_blocks_reclaimed", &CacheStats::cached_blocks_reclaimed);

  using C = PagedKvCache;
  py::class_<C>(m, "PagedKvCache",
                "The paged block manager (seed cbtop PagedKvCache): block tables, reference "
                "counts, copy-on-write, eviction, StreamingLLM. Holds no tensors; the copies a "
                "storage backend must make are take_pending_copies().")
      .def(py::init([](size_t num_blocks, size_t block_size, size_t num_heads, size_t head_dim) {
             return unwrap(C::create(num_blocks, block_size, num_heads, head_dim));
           }),
           py::arg("num_blocks"), py::arg("block_size"), py::arg("num_heads"),
           py::arg("head_dim"), "fp16 K and V of one layer (the seed's block bytes).")
      .def_static(
          "from_config", [](const Config& config) { return unwrap(C::create(config)); },
          py::arg("config"), "Sized from a config: its per-rank block layout and eviction.")
      .def(
          "with_eviction_strategy",
          [](py::object self, const EvictionStrategy& s) {
            self.cast<C&>().with_eviction_strategy(s);
            return self;
          },
          py::arg("strategy"), "Seed builder: sets the strategy, returns the cache.")
      .def(
          "with_eviction_threshold",
          [](py::object self, double t) {
            self.cast<C&>().with_eviction_threshold(t);
            return self;
          },
          py::arg("threshold"), "Seed builder: clamps to [0, 1] like the seed.")
      .def("set_eviction_strategy",
           [](C& c, const EvictionStrategy& s) { check(c.set_eviction_strategy(s)); })
      .def("set_eviction_threshold", [](C& c, double t) { check(c.set_eviction_threshold(t)); })
      .def_property_readonly("block_size", &C::block_size)
      .def_property_readonly("total_blocks", &C::total_blocks)
      .def_property_readonly("free_block_count", &C::free_block_count)
      .def_property_readonly("used_block_count", &C::used_block_count)
      .def_property_readonly("cached_block_count", &C::cached_block_count)
      .def_property_readonly("available_block_count", &C::available_block_count)
      .def_property_readonly("utilization", &C::utilization)
      .def_property_readonly("block_memory_bytes", &C::block_memory_bytes)
      .def_property_readonly("total_memory_bytes", &C::total_memory_bytes)
      .def_property_readonly("used_memory_bytes", &C::used_memory_bytes)
      .def_property_readonly("needs_eviction", &C::needs_eviction)
      .def_property_readonly("eviction_threshold", &C::eviction_threshold)
      .def_property_readonly("eviction_strategy", &C::eviction_strategy)
      .def_property_readonly("num_sequences", &C::num_sequences)
      .def_property_readonly("stats", &C::stats)
      .def("__len__", &C::num_sequences)
      .def(
          "get_sequence",
          [](const C& c, SeqId seq) -> std::optional<SequenceInfo> {
            const SequenceInfo* info = c.get_sequence(seq);
            return info ? std::optional<SequenceInfo>(*info) : std::nullopt;
          },
          py::arg("seq"), "The sequence's record, or None.")
      .def("block_ref_count", &C::block_ref_count, py::arg("block"))
      .def("allocate", [](C& c, SeqId seq, size_t n) { check(c.allocate(seq, n)); },
           py::arg("seq"), py::arg("num_tokens"))
      .def("append", [](C& c, SeqId seq, size_t n) { check(c.append(seq, n)); }, py::arg("seq"),
           py::arg("num_new_tokens"))
      .def("free", [](C& c, SeqId seq) { check(c.free(seq)); }, py::arg("seq"))
      .def("fork", [](C& c, SeqId src, SeqId dst) { check(c.fork(src, dst)); }, py::arg("src"),
           py::arg("dst"))
      .def("set_priority", [](C& c, SeqId seq, uint32_t p) { check(c.set_priority(seq, p)); },
           py::arg("seq"), py::arg("priority"))
      .def("select_eviction_target", &C::select_eviction_target)
      .def("evict", [](C& c) { return unwrap(c.evict()); })
      .def(
          "evict_to_threshold",
          [](C& c, std::optional<double> target) {
            return unwrap(target ? c.evict_to_threshold(*target) : c.evict_to_threshold());
          },
          py::arg("target") = py::none(),
          "Evicts until utilization <= target (default: the configured threshold); returns the "
          "evicted ids in order.")
      .def(
          "apply_streaming_llm",
          [](C& c, SeqId seq, std::optional<size_t> sink, std::optional<size_t> window) {
            if (sink.has_value() != window.has_value()) {
              raise_invalid("apply_streaming_llm takes both sink_tokens and window_tokens, or "
                            "neither (the configured strategy's)");
            }
            return unwrap(sink ? c.apply_streaming_llm(seq, *sink, *window)
                               : c.apply_streaming_llm(seq));
          },
          py::arg("seq"), py::arg("sink_tokens") = py::none(),
          py::arg("window_tokens") = py::none(), "Returns the number of dropped tokens.")
      .def(
          "retain_tokens",
          [](C& c, SeqId seq, const py::object& positions) {
            const std::vector<uint64_t> keep = index_vector<uint64_t>(positions, "positions");
            return unwrap(c.retain_tokens(seq, std::vector<size_t>(keep.begin(), keep.end())));
          },
          py::arg("seq"), py::arg("positions"),
          "Keeps the tokens at `positions` (distinct, each at or after its new slot: "
          "positions[i] >= i; increasing ones qualify) as one contiguous sequence, the i-th "
          "kept token at slot i; returns the number dropped.")
      .def("sequence_ids", &C::sequence_ids)
      .def_property_readonly("pending_copies", &C::pending_copies)
      .def("take_pending_copies", &C::take_pending_copies)
      .def("verify_integrity", [](const C& c) { check(c.verify_integrity()); })
      .def("__str__", &display<C>);
}

void bind_kv_cache(py::module_& m) {
  py::class_<PyKvCache>(m, "KvCache",
                        "The seed ferrum per-request KV cache on a backend: append every "
                        "layer's new tokens, attend, advance().")
      .def(py::init([](std::shared_ptr<BackendHandle> backend, uint32_t num_layers,
                       uint32_t num_kv_heads, uint32_t head_dim, DType dtype, uint32_t group_size,
                       uint32_t block_size, uint32_t capacity, uint64_t pool_blocks) {
             if (!backend) backend = std::make_shared<BackendHandle>(BackendHandle{
                               unwrap(make_cpu_backend()), Memory::kHost});
             KvCacheOptions options{num_layers, num_kv_heads, head_dim, dtype,
                                    group_size, block_size,   capacity, pool_blocks};
             auto cache = unwrap(KvCache::create(*backend->backend, options));
             return std::unique_ptr<PyKvCache>(
                 new PyKvCache{std::move(backend), std::move(cache), {}});
           }),
           py::arg("backend") = nullptr, py::kw_only(), py::arg("num_layers"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("dtype") = DType::kF16,
           py::arg("group_size") = 0, py::arg("block_size") = 16, py::arg("capacity") = 512,
           py::arg("pool_blocks"),
           "block_size 0 selects the contiguous layout; pool_blocks is the shared pool (paged) "
           "or the resident sequences (contiguous).")
      .def_property_readonly("is_paged", [](PyKvCache& s) { return s.cache.is_paged(); })
      .def_property_readonly("capacity", [](PyKvCache& s) { return s.cache.capacity(); })
      .def_property_readonly("block_size", [](PyKvCache& s) { return s.cache.block_size(); })
      .def_property_readonly("max_blocks_per_seq",
                             [](PyKvCache& s) { return s.cache.max_blocks_per_seq(); })
      .def_property_readonly("free_blocks",
                             [](PyKvCache& s) { return s.locked([](KvCache& c) { return c.free_blocks(); }); })
      .def_property_readonly("num_sequences", [](PyKvCache& s) {
        return s.locked([](KvCache& c) { return c.num_sequences(); });
      })
      .def(
          "ensure",
          [](PyKvCache& s, uint64_t id) { check(s.locked([&](KvCache& c) { return c.ensure(id); })); },
          py::arg("cache_id"))
      .def(
          "append",
          [](PyKvCache& s, uint64_t id, uint32_t layer, const py::object& key,
             const py::object& value) {
            const Memory mem = s.backend->memory;
            const Tensor k = Tensor::from(key, "key", mem, {DType::kF32, DType::kF16, DType::kBF16}, 3, false);
            const Tensor v = Tensor::from(value, "value", mem, {k.dtype()}, 3, false);
            const PagedKvView& view = s.cache.view();
            k.expect_dim("key", 1, view.num_kv_heads, "num_kv_heads");
            k.expect_dim("key", 2, view.head_dim, "head_dim");
            for (int d = 0; d < 3; ++d) v.expect_dim("value", d, k.shape()[d], "as key");
            const auto n = static_cast<uint32_t>(k.shape()[0]);
            check(s.locked([&](KvCache& c) {
              return c.append(id, layer, k.data(), v.data(), k.dtype(), n);
            }));
          },
          py::arg("cache_id"), py::arg("layer"), py::arg("key"), py::arg("value"),
          "Writes [n, num_kv_heads, head_dim] K and V of `layer` after this step's tokens.")
      .def(
          "attention",
          [](PyKvCache& s, uint64_t id, uint32_t layer, const py::object& query,
             std::optional<float> softmax_scale, const py::object& out) {
            const Memory mem = s.backend->memory;
            const Tensor q = Tensor::from(query, "query", mem, {DType::kF32, DType::kF16, DType::kBF16}, 3, false);
            const PagedKvView& view = s.cache.view();
            q.expect_dim("query", 2, view.head_dim, "head_dim");
            Tensor o;
            if (out.is_none()) {
              if (mem == Memory::kDevice) raise_invalid("out is required on the CUDA backend");
              o = Tensor::from(new_host_array(q.dtype(), q.shape()), "out", mem, {q.dtype()}, 3, true);
            } else {
              o = Tensor::from(out, "out", mem, {q.dtype()}, 3, true);
              for (int d = 0; d < 3; ++d) o.expect_dim("out", d, q.shape()[d], "as query");
            }
            const float scale = softmax_scale ? *softmax_scale
                                              : 1.0f / std::sqrt(static_cast<float>(view.head_dim));
            check(s.locked([&](KvCache& c) {
              return c.attention(id, layer, q.data(), q.dtype(), static_cast<uint32_t>(q.shape()[0]),
                                 static_cast<uint32_t>(q.shape()[1]), o.data(), scale);
            }));
            return out.is_none() ? o.source() : out;
          },
          py::arg("cache_id"), py::arg("layer"), py::arg("query"),
          py::arg("softmax_scale") = py::none(), py::kw_only(), py::arg("out") = py::none(),
          "Causal attention of this step's last q_len tokens ([q_len, num_q_heads, head_dim]).")
      .def(
          "advance",
          [](PyKvCache& s, uint64_t id) { check(s.locked([&](KvCache& c) { return c.advance(id); })); },
          py::arg("cache_id"))
      .def(
          "truncate",
          [](PyKvCache& s, uint64_t id, uint32_t n) {
            check(s.locked([&](KvCache& c) { return c.truncate(id, n); }));
          },
          py::arg("cache_id"), py::arg("new_len"))
      .def(
          "release",
          [](PyKvCache& s, uint64_t id) { check(s.locked([&](KvCache& c) { return c.release(id); })); },
          py::arg("cache_id"))
      .def("reset", [](PyKvCache& s) { s.locked([](KvCache& c) { c.reset(); }); })
      .def(
          "len",
          [](PyKvCache& s, uint64_t id) { return unwrap(s.locked([&](KvCache& c) { return c.len(id); })); },
          py::arg("cache_id"), "Committed tokens of a sequence.")
      .def(
          "block_table",
          [](PyKvCache& s, uint64_t id) {
            return unwrap(s.locked([&](KvCache& c) { return c.block_table(id); }));
          },
          py::arg("cache_id"), "Padded to max_blocks_per_seq with 0xFFFFFFFF.");
}

void bind_prefix_kv_cache(py::module_& m) {
  py::class_<CachedKvState>(m, "CachedKvState",
                            "Keys and values of seq_len positions per layer, token-major "
                            "([seq_len, kv_dim] each); immutable, copies share the buffers.")
      .def(py::init([](const py::object& keys, const py::object& values, size_t seq_len,
                       std::optional<size_t> kv_dim) {
             auto k = layers_arg(keys, "keys");
             auto v = layers_arg(values, "values");
             return unwrap(kv_dim ? CachedKvState::create(std::move(k), std::move(v), seq_len, *kv_dim)
                                  : CachedKvState::create(std::move(k), std::move(v), seq_len));
           }),
           py::arg("keys"), py::arg("values"), py::arg("seq_len"), py::arg("kv_dim") = py::none())
      .def_property_readonly("seq_len", &CachedKvState::seq_len)
      .def_property_readonly("num_layers", &CachedKvState::num_layers)
      .def_property_readonly("kv_dim", &CachedKvState::kv_dim)
      .def_property_readonly("dtype", &CachedKvState::dtype)
      .def_property_readonly("memory_bytes", &CachedKvState::memory_bytes)
      .def_property_readonly("keys",
                             [](const CachedKvState& s) {
                               py::list out;
                               for (const auto& layer : s.keys()) out.append(float_rows(layer, s.seq_len()));
                               return out;
                             })
      .def_property_readonly("values", [](const CachedKvState& s) {
        py::list out;
        for (const auto& layer : s.values()) out.append(float_rows(layer, s.seq_len()));
        return out;
      });

  using H = HostKvCache;
  py::class_<H>(m, "HostKvCache",
                "The seed's contiguous fp32 host cache: store_kv per layer, then advance().")
      .def(py::init([](size_t num_layers, size_t max_seq_len, size_t kv_dim) {
             return unwrap(H::create(num_layers, max_seq_len, kv_dim));
           }),
           py::arg("num_layers"), py::arg("max_seq_len"), py::arg("kv_dim"))
      .def_property_readonly("seq_len", &H::seq_len)
      .def_property_readonly("num_layers", &H::num_layers)
      .def_property_readonly("kv_dim", &H::kv_dim)
      .def_property_readonly("max_seq_len", &H::max_seq_len)
      .def_property_readonly("stored_len", &H::stored_len)
      .def(
          "store_kv",
          [](H& h, size_t layer, const py::object& key, const py::object& value) {
            const std::vector<float> k = floats_arg(key, "key"), v = floats_arg(value, "value");
            check(h.store_kv(layer, k, v));
          },
          py::arg("layer"), py::arg("key"), py::arg("value"))
      .def("advance", &H::advance)
      .def("truncate", &H::truncate, py::arg("n"))
      .def("clear", &H::clear)
      .def(
          "get_keys",
          [](const H& h, size_t layer) {
            const auto keys = unwrap(h.get_keys(layer));
            return float_rows(keys, keys.size() / h.kv_dim());
          },
          py::arg("layer"))
      .def(
          "get_values",
          [](const H& h, size_t layer) {
            const auto values = unwrap(h.get_values(layer));
            return float_rows(values, values.size() / h.kv_dim());
          },
          py::arg("layer"))
      .def(
          "restore_from_snapshot",
          [](H& h, const CachedKvState& s, size_t n) { check(h.restore_from_snapshot(s, n)); },
          py::arg("snapshot"), py::arg("num_tokens"));

  py::class_<PrefixHit>(m, "PrefixHit",
                        "A lookup result that pins its entry until release() (or the end of a "
                        "`with` block).")
      .def_property_readonly("matched_len", &PrefixHit::matched_len)
      .def_property_readonly("state", &PrefixHit::state)
      .def_property_readonly("pinned", &PrefixHit::pinned)
      .def("release", &PrefixHit::release)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PrefixHit& hit, const py::args&) { hit.release(); });

  py::class_<PrefixKvCache>(m, "PrefixKvCache",
                            "The seed oxillama prefix cache: K/V snapshots keyed by token "
                            "prefix, LRU by entries then memory.")
      .def(py::init([](size_t max_entries, size_t max_memory_bytes, size_t min_prefix_len,
                       bool partial_prefix_reuse) {
             return PrefixKvCache(PrefixCacheConfig{max_entries, max_memory_bytes, min_prefix_len,
                                                    partial_prefix_reuse});
           }),
           py::arg("max_entries") = 256, py::arg("max_memory_bytes") = size_t{512} << 20,
           py::arg("min_prefix_len") = 4, py::arg("partial_prefix_reuse") = false)
      .def(
          "lookup",
          [](PrefixKvCache& c, const py::object& tokens) -> std::unique_ptr<PrefixHit> {
            const std::vector<TokenId> t = tokens_arg(tokens, "tokens");
            std::optional<PrefixHit> hit = c.lookup(t);
            if (!hit) return nullptr;
            return std::make_unique<PrefixHit>(std::move(*hit));
          },
          py::arg("tokens"), "The pinned entry serving the longest prefix, or None.")
      .def(
          "store",
          [](PrefixKvCache& c, const py::object& tokens, const H& kv, size_t seq_len,
             size_t kv_dim, size_t num_layers) {
            const std::vector<TokenId> t = tokens_arg(tokens, "tokens");
            return unwrap(c.store(t, kv, seq_len, kv_dim, num_layers));
          },
          py::arg("tokens"), py::arg("kv"), py::arg("seq_len"), py::arg("kv_dim"),
          py::arg("num_layers"),
          "Snapshots the first seq_len positions of `kv`; False when skipped (key below "
          "min_prefix_len, or larger than the limits).")
      .def(
          "store_snapshot",
          [](PrefixKvCache& c, const py::object& tokens, const CachedKvState& s) {
            return unwrap(c.store_snapshot(tokens_arg(tokens, "tokens"), s));
          },
          py::arg("tokens"), py::arg("snapshot"))
      .def_static(
          "restore", [](const CachedKvState& s, H& target) { check(PrefixKvCache::restore(s, target)); },
          py::arg("cached"), py::arg("target"))
      .def_static(
          "restore", [](const PrefixHit& hit, H& target) { check(PrefixKvCache::restore(hit, target)); },
          py::arg("hit"), py::arg("target"))
      .def_property_readonly("memory_usage", &PrefixKvCache::memory_usage)
      .def("__len__", &PrefixKvCache::len)
      .def_property_readonly("is_empty", &PrefixKvCache::is_empty)
      .def("clear", &PrefixKvCache::clear)
      .def_property_readonly("hits", &PrefixKvCache::hits)
      .def_property_readonly("misses", &PrefixKvCache::misses)
      .def_property_readonly("pinned", &PrefixKvCache::pinned)
      .def("verify", [](const PrefixKvCache& c) { check(c.verify()); });
}

void bind_cache_manager(py::module_& m) {
  py::class_<H2oPolicy>(m, "H2oPolicy", "Heavy hitters plus the newest budget * recent_ratio.")
      .def(py::init([](double r) { return H2oPolicy{r}; }), py::arg("recent_ratio") = 0.5)
      .def_readwrite("recent_ratio", &H2oPolicy::recent_ratio)
      .def("__repr__", [](const H2oPolicy& p) { return fmt::format("H2oPolicy(recent_ratio={})", p.recent_ratio); });
  py::class_<SlidingWindowPolicy>(m, "SlidingWindowPolicy", "StreamingLLM: sink plus window.")
      .def(py::init([](size_t window, size_t sink) { return SlidingWindowPolicy{window, sink}; }),
           py::arg("window"), py::arg("sink") = 0)
      .def_readwrite("window", &SlidingWindowPolicy::window)
      .def_readwrite("sink", &SlidingWindowPolicy::sink)
      .def("__repr__", [](const SlidingWindowPolicy& p) {
        return fmt::format("SlidingWindowPolicy(window={}, sink={})", p.window, p.sink);
      });
  py::class_<PyramidKvPolicy>(m, "PyramidKvPolicy", "H2O per layer with pyramid budgets.")
      .def(py::init([](size_t layers, double beta, double r) { return PyramidKvPolicy{layers, beta, r}; }),
           py::arg("total_layers"), py::arg("beta") = 20.0, py::arg("recent_ratio") = 0.5)
      .def_readwrite("total_layers", &PyramidKvPolicy::total_layers)
      .def_readwrite("beta", &PyramidKvPolicy::beta)
      .def_readwrite("recent_ratio", &PyramidKvPolicy::recent_ratio)
      .def("__repr__", [](const PyramidKvPolicy& p) {
        return fmt::format("PyramidKvPolicy(total_layers={}, beta={}, recent_ratio={})",
                           p.total_layers, p.beta, p.recent_ratio);
      });

  py::class_<CachedTokens>(m, "CachedTokens", "Dequantized rows returned by CacheManager.get().")
      .def_property_readonly("keys",
                             [](const CachedTokens& t) {
                               std::vector<float> flat;
                               for (const auto& row : t.keys) flat.insert(flat.end(), row.begin(), row.end());
                               return float_rows(flat, t.keys.size());
                             })
      .def_property_readonly("values",
                             [](const CachedTokens& t) {
                               std::vector<float> flat;
                               for (const auto& row : t.values) flat.insert(flat.end(), row.begin(), row.end());
                               return float_rows(flat, t.values.size());
                             })
      .def_readonly("token_positions", &CachedTokens::token_positions);

  using CM = CacheManager;
  py::class_<CM>(m, "CacheManager",
                 "The seed ruvector token compressor: quantized K/V per token and layer with "
                 "H2O, sliding-window or PyramidKV eviction.")
      .def(py::init([](size_t max_seq_len, size_t num_heads, size_t head_dim, uint8_t bits,
                       TokenEvictionPolicy policy, size_t num_layers) {
             return unwrap(CM::create(
                 CacheManagerConfig{max_seq_len, num_heads, head_dim, bits, policy, num_layers}));
           }),
           py::arg("max_seq_len"), py::arg("num_heads"), py::arg("head_dim"),
           py::arg("quantization_bits"), py::arg("eviction_policy") = H2oPolicy{},
           py::arg("num_layers") = 0)
      .def_property_readonly("num_layers", &CM::num_layers)
      .def("__len__", [](const CM& c) { return c.len(); })
      .def_property_readonly("is_empty", &CM::is_empty)
      .def("len", [](const CM& c, size_t layer) { return unwrap(c.len(layer)); }, py::arg("layer"))
      .def("layer_budget", [](const CM& c, size_t layer) { return unwrap(c.layer_budget(layer)); },
           py::arg("layer"))
      .def(
          "append",
          [](CM& c, const py::object& key, const py::object& value, size_t layer) {
            const std::vector<float> k = floats_arg(key, "key"), v = floats_arg(value, "value");
            check(c.append(k, v, layer));
          },
          py::arg("key"), py::arg("value"), py::arg("layer") = 0,
          "Quantizes num_heads * head_dim values of K and V into a new entry of `layer`.")
      .def(
          "get",
          [](const CM& c, const py::object& indices, std::optional<size_t> layer) {
            const std::vector<uint64_t> idx = index_vector<uint64_t>(indices, "indices");
            const std::vector<size_t> i(idx.begin(), idx.end());
            return unwrap(layer ? c.get(i, *layer) : c.get(i));
          },
          py::arg("indices"), py::arg("layer") = py::none())
      .def(
          "evict",
          [](CM& c, size_t budget, std::optional<size_t> layer) {
            if (layer) {
              check(c.evict(budget, *layer));
            } else {
              c.evict(budget);
            }
          },
          py::arg("budget"), py::arg("layer") = py::none())
      .def(
          "update_attention_scores",
          [](CM& c, const std::vector<double>& scores, std::optional<size_t> layer) {
            check(layer ? c.update_attention_scores(scores, *layer) : c.update_attention_scores(scores));
          },
          py::arg("scores"), py::arg("layer") = py::none())
      .def("attention_scores", [](const CM& c, size_t layer) { return unwrap(c.attention_scores(layer)); },
           py::arg("layer") = 0)
      .def("token_positions", [](const CM& c, size_t layer) { return unwrap(c.token_positions(layer)); },
           py::arg("layer") = 0)
      .def(
          "pyramid_budget",
          [](const CM& c, size_t layer, size_t total) { return unwrap(c.pyramid_budget(layer, total)); },
          py::arg("layer_idx"), py::arg("total_layers"))
      .def_property_readonly("compression_ratio", &CM::compression_ratio)
      .def_property_readonly("entry_bytes", &CM::entry_bytes)
      .def_property_readonly("memory_bytes", &CM::memory_bytes);

  using Q = quant::QuantizedTensor;
  py::class_<Q>(m, "QuantizedTensor", "Codes packed `bits` wide with a scale and zero-point per "
                                      "segment: x = scale * (code - zero_point).")
      .def_property_readonly("data", [](const Q& q) {
        return py::bytes(reinterpret_cast<const char*>(q.data.data()), q.data.size());
      })
      .def_readonly("scales", &Q::scales)
      .def_readonly("zero_points", &Q::zero_points)
      .def_readonly("bits", &Q::bits)
      .def_readonly("num_elements", &Q::num_elements)
      .def("code", [](const Q& q, size_t i) {
        if (i >= q.num_elements) raise_invalid(fmt::format("code {} of {} elements", i, q.num_elements));
        return q.code(i);
      })
      .def_property_readonly("byte_size", &Q::byte_size);
  m.def("round_to_nearest_even", &quant::round_to_nearest_even, py::arg("x"));
  m.def(
      "quantize_asymmetric",
      [](const py::object& tensor, size_t num_heads, uint8_t bits) {
        return unwrap(quant::quantize_asymmetric(floats_arg(tensor, "tensor"), num_heads, bits));
      },
      py::arg("tensor"), py::arg("num_heads"), py::arg("bits"));
  m.def(
      "quantize_symmetric",
      [](const py::object& tensor, uint8_t bits) {
        return unwrap(quant::quantize_symmetric(floats_arg(tensor, "tensor"), bits));
      },
      py::arg("tensor"), py::arg("bits"));
  m.def(
      "dequantize",
      [](const Q& q, size_t num_segments) {
        const std::vector<float> values = unwrap(quant::dequantize(q, num_segments));
        py::array_t<float> out(values.size());
        std::copy(values.begin(), values.end(), out.mutable_data());
        return out;
      },
      py::arg("tensor"), py::arg("num_segments"));
}

}  // namespace

void bind_seed(py::module_& m) {
  bind_paged_kv_cache(m);
  bind_kv_cache(m);
  bind_prefix_kv_cache(m);
  bind_cache_manager(m);
}

}  // namespace kvfabric::python
