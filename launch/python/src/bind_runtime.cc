// Backends, transports and RankCache: a TP worker's side of a job, driven from Python.
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "kvfabric/backend/cuda_backend.h"
#include "kvfabric/runtime/rank_cache.h"
#include "kvfabric/transport/mpi_transport.h"
#include "kvfabric/transport/transport.h"

namespace kvfabric::python {

namespace {

// A transport, and the MPI it runs on when it is the MPI transport (destroyed after it).
struct TransportHandle {
  std::optional<MpiRuntime> mpi;
  std::unique_ptr<Transport> transport;
  int caches = 0;     // RankCaches made on it (they hold a reference to `transport`)
  int in_flight = 0;  // calls running on other threads without the GIL (close() waits for none)

  Transport& get() {
    if (!transport) raise_status(invalid_operation("the transport was closed"));
    return *transport;
  }

  //! The transport for one call that releases the GIL: while it runs, close() is refused
  //! (another thread closing it would free it under the call). Made and destroyed under the GIL.
  class Use {
   public:
    explicit Use(TransportHandle& h) : h_(h), t_(h.get()) { ++h_.in_flight; }
    ~Use() { --h_.in_flight; }
    Use(const Use&) = delete;
    Use& operator=(const Use&) = delete;
    Transport& operator*() const { return t_; }

   private:
    TransportHandle& h_;
    Transport& t_;
  };
};

CpuIsa isa_arg(const std::string& name) {
  if (name == "auto") return CpuIsa::kAuto;
  if (name == "generic") return CpuIsa::kGeneric;
  if (name == "avx2") return CpuIsa::kAvx2;
  if (name == "avx2-vnni") return CpuIsa::kAvx2Vnni;
  raise_invalid(fmt::format("unknown CPU ISA '{}' (auto, generic, avx2, avx2-vnni)", name));
}

// One rank's RankCache with the backend and transport it uses (destroyed after it). Not
// thread-safe in C++: every call holds the mutex, taken without the GIL.
class PyRankCache {
 public:
  PyRankCache(const Config& config, std::optional<uint32_t> rank,
              std::shared_ptr<BackendHandle> backend, std::shared_ptr<TransportHandle> transport)
      : backend_(std::move(backend)), transport_(std::move(transport)), config_(config) {
    Transport& t = transport_->get();
    const uint32_t r = rank.value_or(static_cast<uint32_t>(t.rank().value));
    cache_ = unwrap(RankCache::create(config, r, *backend_->backend, t));
    ++transport_->caches;
  }
  ~PyRankCache() {
    cache_.reset();
    --transport_->caches;
  }
  PyRankCache(const PyRankCache&) = delete;
  PyRankCache& operator=(const PyRankCache&) = delete;

  template <typename F>
  auto locked(F&& f) {
    return without_gil([&] {
      std::lock_guard lock(mutex_);
      return f(*cache_);
    });
  }
  [[nodiscard]] const RankLayout& layout() const { return cache_->layout(); }
  [[nodiscard]] Memory memory() const { return backend_->memory; }
  [[nodiscard]] uint32_t head_dim() const { return config_.model.head_dim; }
  [[nodiscard]] const Config& config() const { return config_; }
  [[nodiscard]] const std::shared_ptr<TransportHandle>& transport() const { return transport_; }

 private:
  std::shared_ptr<BackendHandle> backend_;
  std::shared_ptr<TransportHandle> transport_;
  Config config_;
  std::unique_ptr<RankCache> cache_;
  std::mutex mutex_;
};

BlockView view_of(bool group_view) {
  return group_view ? BlockView::kLayerGroup : BlockView::kWhole;
}

// Tokens a block holds in the view a call reads: a layer group's holds the groups' worth.
uint64_t block_tokens(const PyRankCache& cache, bool group_view) {
  const uint64_t bs = cache.config().cache.block_size;
  const uint32_t groups = num_layer_groups(cache.config());
  return group_view && groups != 0 ? bs * groups : bs;
}

float softmax_scale_arg(const std::optional<float>& scale, uint32_t head_dim) {
  if (!scale) return 1.0f / std::sqrt(static_cast<float>(head_dim));
  if (!std::isfinite(*scale)) raise_invalid("softmax_scale must be finite");
  return *scale;
}

// The output tensor: `out` when given (checked against the query), else a new host array.
Tensor output_arg(const py::object& out, const Tensor& query, Memory memory) {
  if (out.is_none()) {
    if (memory == Memory::kDevice) {
      raise_invalid("out is required on the CUDA backend (a CUDA tensor shaped like query)");
    }
    return Tensor::from(new_host_array(query.dtype(), query.shape()), "out", memory,
                        {query.dtype()}, static_cast<int>(query.shape().size()), true);
  }
  Tensor t = Tensor::from(out, "out", memory, {query.dtype()},
                          static_cast<int>(query.shape().size()), true);
  for (int d = 0; d < static_cast<int>(query.shape().size()); ++d) {
    t.expect_dim("out", d, query.shape()[d], "as query");
  }
  return t;
}

std::string layout_repr(const RankLayout& l) {
  return fmt::format("RankLayout(rank={}/{}, replica={}, shard={}, kv_heads=[{}, {}), "
                     "q_heads=[{}, {}))",
                     l.rank, l.world_size, l.replica, l.shard, l.first_kv_head,
                     l.first_kv_head + l.num_kv_heads, l.first_q_head,
                     l.first_q_head + l.num_q_heads);
}

}  // namespace

void bind_runtime(py::module_& m) {
  py::class_<BackendHandle, std::shared_ptr<BackendHandle>>(
      m, "Backend", "Where KV lives and the kernels run: Backend.cpu() or Backend.cuda().")
      .def_static(
          "cpu",
          [](int threads, const std::string& isa) {
            if (threads < 0) raise_invalid("threads must be >= 0 (0 = all cores)");
            auto b = unwrap(make_cpu_backend(CpuBackendOptions{isa_arg(isa), threads}));
            return std::make_shared<BackendHandle>(BackendHandle{std::move(b), Memory::kHost});
          },
          py::arg("threads") = 0, py::arg("isa") = "auto",
          "The CPU backend (host memory: tensors are NumPy arrays). threads 0 = all cores.")
      .def_static(
          "cuda",
          [](int device, bool check_finite) {
            auto b = unwrap(make_cuda_backend(CudaBackendOptions{device, check_finite}));
            return std::make_shared<BackendHandle>(BackendHandle{std::move(b), Memory::kDevice});
          },
          py::arg("device") = 0, py::arg("check_finite") = true,
          "The CUDA backend: tensors are CUDA arrays (__cuda_array_interface__ or __dlpack__). "
          "UnimplementedError without CUDA in this build, UnavailableError without a device.")
      .def_property_readonly("name",
                             [](const BackendHandle& b) { return std::string(b.backend->name()); })
      .def_property_readonly("device_memory",
                             [](const BackendHandle& b) { return b.memory == Memory::kDevice; })
      .def("synchronize",
           [](BackendHandle& b) { check(without_gil([&] { return b.backend->synchronize(); })); })
      .def("__repr__", [](const BackendHandle& b) {
        return fmt::format("Backend('{}')", b.backend->name());
      });
  m.def("best_cpu_isa", [] { return std::string(cpu_isa_name(best_cpu_isa())); });

  py::class_<TransportHandle, std::shared_ptr<TransportHandle>>(
      m, "Transport",
      "How ranks move blocks and plans: Transport.local() (one rank) or Transport.mpi().")
      .def_static("local",
                  [] {
                    auto h = std::make_shared<TransportHandle>();
                    h->transport = make_local_transport();
                    return h;
                  })
      .def_static(
          "mpi",
          [](uint64_t block_message_min_bytes) {
            auto h = std::make_shared<TransportHandle>();
            // Borrows MPI when the application (mpi4py) initialized it; otherwise owns it.
            h->mpi = unwrap(MpiRuntime::init(nullptr, nullptr));
            h->transport = unwrap(make_mpi_transport(*h->mpi, {block_message_min_bytes}));
            return h;
          },
          py::arg("block_message_min_bytes") = uint64_t{1} << 20,
          "The MPI transport over a duplicate of MPI_COMM_WORLD. Initializes MPI unless the "
          "application (mpi4py) did; call it from the thread that initialized MPI. One per "
          "process.")
      .def_property_readonly("name",
                             [](TransportHandle& h) { return std::string(h.get().name()); })
      .def_property_readonly("rank", [](TransportHandle& h) { return h.get().rank().value; })
      .def_property_readonly("world_size", [](TransportHandle& h) { return h.get().world_size(); })
      .def("barrier",
           [](TransportHandle& h) {
             const TransportHandle::Use t(h);
             check(without_gil([&] { return (*t).barrier(); }));
           })
      .def(
          "broadcast",
          [](TransportHandle& h, const std::optional<py::bytes>& data, int root) {
            const TransportHandle::Use t(h);
            std::vector<uint8_t> bytes;
            if (data) {
              const std::string_view view = *data;
              bytes.assign(view.begin(), view.end());
            }
            check(without_gil([&] { return (*t).broadcast(bytes, RankId{root}); }));
            return py::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size());
          },
          py::arg("data"), py::arg("root") = 0,
          "Collective: every rank returns the root's bytes (other ranks pass None).")
      .def(
          "all_gather",
          [](TransportHandle& h, uint64_t value) {
            const TransportHandle::Use t(h);
            std::vector<uint64_t> out;
            check(without_gil([&] { return (*t).all_gather(value, out); }));
            return out;
          },
          py::arg("value"), "Collective: every rank's value, in rank order.")
      .def(
          "set_timeout",
          [](TransportHandle& h, std::optional<double> seconds) {
            std::optional<std::chrono::milliseconds> timeout;
            if (seconds) {
              if (!(*seconds >= 0)) raise_invalid("timeout must be >= 0 seconds");
              // Past what milliseconds count (inf included) is for ever: converting it is
              // undefined.
              if (*seconds * 1000 < 9e18) {
                timeout = std::chrono::milliseconds(static_cast<int64_t>(*seconds * 1000));
              }
            }
            if (h.in_flight > 0) {  // a call waiting now reads the timeout as it goes
              raise_status(invalid_operation(
                  std::to_string(h.in_flight) + " call(s) on other threads use this transport: "
                  "set its timeout before or after them"));
            }
            h.get().set_timeout(timeout);
          },
          py::arg("seconds"), "Bounds later blocking calls (None waits for ever).")
      .def(
          "close",
          [](TransportHandle& h) {
            if (h.caches > 0) {
              raise_status(invalid_operation(
                  std::to_string(h.caches) + " RankCache(s) still use this transport: delete "
                  "them before closing it"));
            }
            if (h.in_flight > 0) {
              raise_status(invalid_operation(
                  std::to_string(h.in_flight) + " call(s) on other threads still use this "
                  "transport: join them before closing it"));
            }
            h.transport.reset();
            h.mpi.reset();
          },
          "Frees the transport (and MPI, if this process's MPI was started by it) now; caches "
          "made on it must be gone. Call it before mpi4py finalizes MPI.")
      .def("__repr__", [](TransportHandle& h) {
        if (!h.transport) return std::string("Transport(closed)");
        return fmt::format("Transport('{}', rank={}, world_size={})", h.transport->name(),
                           h.transport->rank().value, h.transport->world_size());
      });

  Record<RankLayout>(m, "RankLayout",
                     "Where a rank sits: shard `shard` of replica `replica`, holding KV heads "
                     "[first_kv_head, +num_kv_heads) and query heads [first_q_head, +num_q_heads).")
      .field("rank", &RankLayout::rank)
      .field("world_size", &RankLayout::world_size)
      .field("tp", &RankLayout::tp)
      .field("dp", &RankLayout::dp)
      .field("replica", &RankLayout::replica)
      .field("shard", &RankLayout::shard)
      .field("first_kv_head", &RankLayout::first_kv_head)
      .field("num_kv_heads", &RankLayout::num_kv_heads)
      .field("first_q_head", &RankLayout::first_q_head)
      .field("num_q_heads", &RankLayout::num_q_heads)
      .cls()
      .def("__repr__", &layout_repr);
  m.def(
      "rank_layout",
      [](const Config& config, uint32_t rank) { return unwrap(rank_layout(config, rank)); },
      py::arg("config"), py::arg("rank"), "The layout of `rank` in the config's topology.");

  Record<RankCacheStats>(m, "RankCacheStats")
      .field("steps", &RankCacheStats::steps)
      .field("waves", &RankCacheStats::waves)
      .field("swapped_out_blocks", &RankCacheStats::swapped_out_blocks)
      .field("swapped_in_blocks", &RankCacheStats::swapped_in_blocks)
      .field("migrated_blocks_sent", &RankCacheStats::migrated_blocks_sent)
      .field("migrated_blocks_received", &RankCacheStats::migrated_blocks_received)
      .field("token_copies", &RankCacheStats::token_copies)
      .field("overlapped_waves", &RankCacheStats::overlapped_waves)
      .field("scores_sent", &RankCacheStats::scores_sent);

  py::class_<PyRankCache>(
      m, "RankCache",
      "One rank's KV shard (every layer's local KV heads, device and host tier) and the "
      "executor of step plans. Tensors hold this rank's heads only: NumPy arrays on the CPU "
      "backend, CUDA arrays on the CUDA backend. Long calls release the GIL.")
      .def(py::init([](const Config& config, std::optional<uint32_t> rank,
                       std::shared_ptr<BackendHandle> backend,
                       std::shared_ptr<TransportHandle> transport) {
             if (!backend) backend = std::make_shared<BackendHandle>(BackendHandle{
                               unwrap(make_cpu_backend()), Memory::kHost});
             if (!transport) {
               transport = std::make_shared<TransportHandle>();
               transport->transport = make_local_transport();
             }
             return std::make_unique<PyRankCache>(config, rank, std::move(backend),
                                                  std::move(transport));
           }),
           py::arg("config"), py::arg("rank") = py::none(), py::arg("backend") = nullptr,
           py::arg("transport") = nullptr,
           "rank defaults to the transport's; backend to Backend.cpu(), transport to "
           "Transport.local() (a one-rank job).")
      .def_property_readonly("layout", &PyRankCache::layout)
      .def_property_readonly("stats",
                             [](PyRankCache& self) {
                               return self.locked([](RankCache& c) { return c.stats(); });
                             })
      .def_property_readonly("next_step",
                             [](PyRankCache& self) {
                               return self.locked([](RankCache& c) { return c.next_step(); });
                             })
      .def_property_readonly("transport", &PyRankCache::transport)
      .def(
          "validate",
          [](PyRankCache& self, const StepPlan& plan) {
            check(self.locked([&](RankCache& c) { return c.validate(plan); }));
          },
          py::arg("plan"), "The checks execute() makes before anything runs.")
      .def(
          "execute",
          [](PyRankCache& self, const StepPlan& plan) {
            check(self.locked([&](RankCache& c) { return c.execute(plan); }));
          },
          py::arg("plan"),
          "Runs this rank's share of the plan (its migrations pair with the peers' execute).")
      .def(
          "receive_and_execute",
          [](PyRankCache& self, const py::object& plan, int root) {
            std::vector<uint8_t> bytes;
            if (!plan.is_none()) {
              if (py::isinstance<StepPlan>(plan)) {
                bytes = plan.cast<const StepPlan&>().serialize();
              } else if (py::isinstance<py::bytes>(plan)) {
                const std::string_view view = plan.cast<py::bytes>();
                bytes.assign(view.begin(), view.end());
              } else if (PyObject_CheckBuffer(plan.ptr()) != 0) {  // bytearray, memoryview, ...
                // The same buffers StepPlan.deserialize takes: contiguous bytes.
                const py::buffer_info info = py::reinterpret_borrow<py::buffer>(plan).request();
                if (info.ndim != 1 || info.itemsize != 1 || (info.size > 1 && info.strides[0] != 1)) {
                  raise_invalid("plan must be contiguous bytes (a 1-D buffer of bytes)");
                }
                const auto* at = static_cast<const uint8_t*>(info.ptr);
                bytes.assign(at, at + info.size);
              } else {
                raise_invalid(fmt::format("plan must be a StepPlan, its bytes or None (got {})",
                                          type_name(plan)));
              }
            }
            check(self.locked([&](RankCache& c) { return c.receive_and_execute(bytes, RankId{root}); }));
            return unwrap(StepPlan::deserialize(bytes));
          },
          py::arg("plan") = py::none(), py::arg("root") = 0,
          "Collective: the root passes the plan (a StepPlan or its bytes), the others None. The "
          "ranks agree, every rank executes its share, and each returns the plan. When any "
          "rank refuses it, none executes it and every rank raises naming the refusing ranks.")
      .def(
          "tables",
          [](PyRankCache& self) {
            return self.locked([](RankCache& c) { return c.tables(); });
          },
          "This replica's block tables as of the last plan: {seq: PlanTable} (whole tables).")
      .def(
          "group_tables",
          [](PyRankCache& self) {
            return self.locked([](RankCache& c) { return c.group_tables(); });
          },
          "The tables of this replica's sequences compacted per layer group (pyramid): {seq: "
          "[PlanTable per group]}, read with group_view=True.")
      .def(
          "block_table",
          [](PyRankCache& self, SeqId seq) {
            bool grouped = false;
            auto blocks = self.locked([&](RankCache& c) -> std::optional<std::vector<BlockId>> {
              const auto it = c.tables().find(seq);
              grouped = c.group_tables().count(seq) > 0;
              if (it == c.tables().end()) return std::nullopt;
              return it->second.blocks;
            });
            if (grouped) {
              raise_invalid(to_string(seq) + " is compacted per layer group: its tables are "
                            "group_tables()[seq], one per group");
            }
            if (!blocks) raise_status(sequence_not_found(seq));
            return *blocks;
          },
          py::arg("seq"), "A sequence's whole block list as of the last plan.")
      .def(
          "accumulate_attention",
          [](PyRankCache& self, SeqId seq, const py::object& given) {
            // As report_attention: a masked array's hidden values would count, and bools are
            // no masses.
            refuse_masked(given, "mass");
            if (py::isinstance<py::array>(given)) {
              const char kind = py::reinterpret_borrow<py::array>(given).dtype().kind();
              if (kind != 'f' && kind != 'i' && kind != 'u') {
                raise_invalid(fmt::format("mass must hold numbers (got dtype {})",
                                          given.attr("dtype").attr("name").cast<std::string>()));
              }
            }
            const auto mass =
                py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(given);
            if (!mass) {
              PyErr_Clear();
              raise_invalid(fmt::format("mass must be numbers (got {})", type_name(given)));
            }
            if (mass.ndim() != 1) raise_invalid("mass must be 1-D: one value per token");
            const std::span<const float> values(mass.data(), static_cast<size_t>(mass.size()));
            check(self.locked([&](RankCache& c) { return c.accumulate_attention(seq, values); }));
          },
          py::arg("seq"), py::arg("mass"),
          "Token compression: adds this shard's attention mass per token of `seq` (its query "
          "heads; decode_attention(..., attention_mass=True) gives it per layer) to the "
          "sequence's scores, which the plans' score requests send to the root.")
      .def(
          "attention_scores",
          [](PyRankCache& self, SeqId seq) {
            return self.locked([&](RankCache& c) {
              const std::span<const double> s = c.attention_scores(seq);
              return std::vector<double>(s.begin(), s.end());
            });
          },
          py::arg("seq"), "The scores accumulated for `seq` (empty when none).")
      .def(
          "reported_scores",
          [](PyRankCache& self) {
            return self.locked([](RankCache& c) {
              std::vector<std::tuple<SeqId, uint32_t, std::vector<double>>> out;
              for (const ReplicaScores& r : c.reported_scores()) out.emplace_back(r.seq, r.replica, r.scores);
              return out;
            });
          },
          "On the root: [(seq, replica, scores)] the last plan's score requests gathered, "
          "summed over each replica's shards; hand each to Coordinator.report_attention.")
      .def_property_readonly("tables_digest",
                             [](PyRankCache& self) {
                               return self.locked([](RankCache& c) { return c.tables_digest(); });
                             })
      .def(
          "append_kv",
          [](PyRankCache& self, uint32_t layer, const py::object& key, const py::object& value,
             const py::object& slot_mapping, bool group_view) {
            const RankLayout& l = self.layout();
            const Memory mem = self.memory();
            const Tensor k = Tensor::from(key, "key", mem, {DType::kF32, DType::kF16, DType::kBF16}, 3, false);
            const Tensor v = Tensor::from(value, "value", mem, {k.dtype()}, 3, false);
            const int64_t n = k.shape()[0];
            k.expect_dim("key", 1, l.num_kv_heads, "this rank's KV heads");
            k.expect_dim("key", 2, self.head_dim(), "head_dim");
            for (int d = 0; d < 3; ++d) v.expect_dim("value", d, k.shape()[d], "as key");
            const std::vector<int64_t> slots = index_vector<int64_t>(slot_mapping, "slot_mapping");
            if (static_cast<int64_t>(slots.size()) != n) {
              raise_invalid(fmt::format("slot_mapping has {} entries; key has {} tokens",
                                        slots.size(), n));
            }
            AppendKvArgs args;
            args.key = k.data();
            args.value = v.data();
            args.input_dtype = k.dtype();
            args.num_tokens = static_cast<uint32_t>(n);
            args.slot_mapping = slots.data();
            check(self.locked([&](RankCache& c) { return c.append_kv(layer, args, view_of(group_view)); }));
          },
          py::arg("layer"), py::arg("key"), py::arg("value"), py::arg("slot_mapping"),
          py::kw_only(), py::arg("group_view") = false,
          "Writes new tokens' K and V ([n, local_kv_heads, head_dim]) of model layer `layer` "
          "into their slots (block * block_size + offset; -1 skips). group_view=True: the slots "
          "of the layer's group view (block * groups * block_size + offset), for a sequence "
          "compacted per layer group.")
      .def(
          "gather_kv",
          [](PyRankCache& self, uint32_t layer, const py::object& block_table,
             uint32_t num_tokens, bool group_view) {
            if (self.memory() == Memory::kDevice) {
              raise_invalid("gather_kv returns NumPy arrays: it runs on the CPU backend only");
            }
            const RankLayout& l = self.layout();
            const std::vector<uint32_t> table = index_vector<uint32_t>(block_table, "block_table");
            // Checked before the outputs are allocated: a wrong num_tokens is named, not a
            // MemoryError for terabytes.
            const uint64_t bs = block_tokens(self, group_view);
            if (table.size() < (uint64_t{num_tokens} + bs - 1) / bs) {
              raise_invalid(fmt::format("block_table has {} blocks; {} tokens need {}",
                                        table.size(), num_tokens,
                                        (uint64_t{num_tokens} + bs - 1) / bs));
            }
            const std::vector<int64_t> shape = {num_tokens, l.num_kv_heads, self.head_dim()};
            py::array key = new_host_array(DType::kF32, shape);
            py::array value = new_host_array(DType::kF32, shape);
            GatherKvArgs args;
            args.block_table = table.data();
            args.num_tokens = num_tokens;
            args.key_out = static_cast<float*>(key.mutable_data());
            args.value_out = static_cast<float*>(value.mutable_data());
            check(self.locked([&](RankCache& c) { return c.gather_kv(layer, args, view_of(group_view)); }));
            return py::make_tuple(key, value);
          },
          py::arg("layer"), py::arg("block_table"), py::arg("num_tokens"), py::kw_only(),
          py::arg("group_view") = false,
          "A sequence's K and V of one layer as float32 [num_tokens, local_kv_heads, head_dim].")
      .def(
          "decode_attention",
          [](PyRankCache& self, uint32_t layer, const py::object& query,
             const py::object& block_tables, const py::object& context_lens,
             std::optional<float> softmax_scale, const py::object& out, bool attention_mass,
             bool group_view) {
            const RankLayout& l = self.layout();
            const Memory mem = self.memory();
            const Tensor q = Tensor::from(query, "query", mem, {DType::kF32, DType::kF16, DType::kBF16}, 3, false);
            const auto num_seqs = static_cast<size_t>(q.shape()[0]);
            q.expect_dim("query", 1, l.num_q_heads, "this rank's query heads");
            q.expect_dim("query", 2, self.head_dim(), "head_dim");
            const std::vector<uint32_t> lens = index_vector<uint32_t>(context_lens, "context_lens");
            if (lens.size() != num_seqs) {
              raise_invalid(fmt::format("context_lens has {} entries; query has {} sequences",
                                        lens.size(), num_seqs));
            }
            const auto [tables, width] = block_table_arg(block_tables, "block_tables", num_seqs);
            Tensor o = output_arg(out, q, mem);
            DecodeAttentionArgs args;
            args.query = q.data();
            args.query_dtype = q.dtype();
            args.output = o.data();
            args.num_seqs = static_cast<uint32_t>(num_seqs);
            args.num_q_heads = l.num_q_heads;
            args.block_tables = tables.data();
            args.max_blocks_per_seq = width;
            args.context_lens = lens.data();
            args.softmax_scale = softmax_scale_arg(softmax_scale, self.head_dim());
            py::array mass;
            if (attention_mass) {
              if (mem == Memory::kDevice) {
                raise_invalid("attention_mass is returned as a NumPy array: CPU backend only");
              }
              uint32_t longest = 1;
              const uint64_t room = uint64_t{width} * block_tokens(self, group_view);
              for (size_t i = 0; i < lens.size(); ++i) {
                if (lens[i] > room) {  // before allocating [num_seqs, longest]
                  raise_invalid(fmt::format("context_lens[{}] = {} is more than block_tables' {} "
                                            "blocks hold",
                                            i, lens[i], width));
                }
                longest = std::max(longest, lens[i]);
              }
              mass = new_host_array(DType::kF32, {static_cast<int64_t>(num_seqs), longest});
              args.attention_mass = static_cast<float*>(mass.mutable_data());
              args.mass_stride = longest;
            }
            check(self.locked(
                [&](RankCache& c) { return c.decode_attention(layer, args, view_of(group_view)); }));
            if (attention_mass) return py::object(py::make_tuple(o.source(), mass));
            return out.is_none() ? o.source() : out;
          },
          py::arg("layer"), py::arg("query"), py::arg("block_tables"), py::arg("context_lens"),
          py::arg("softmax_scale") = py::none(), py::kw_only(), py::arg("out") = py::none(),
          py::arg("attention_mass") = false, py::arg("group_view") = false,
          "One query token per sequence ([num_seqs, local_q_heads, head_dim]) over its context "
          "(block_tables: a list of block lists or a 2-D array padded with -1). Returns the "
          "output (shaped like query; `out` when given), and with attention_mass=True also each "
          "context token's softmax weight summed over the heads, [num_seqs, max(context_lens)]. "
          "softmax_scale defaults to 1/sqrt(head_dim).")
      .def(
          "prefill_attention",
          [](PyRankCache& self, uint32_t layer, const py::object& query,
             const py::object& query_start, const py::object& context_lens,
             const py::object& block_tables, std::optional<float> softmax_scale,
             const py::object& out, bool group_view) {
            const RankLayout& l = self.layout();
            const Memory mem = self.memory();
            const Tensor q = Tensor::from(query, "query", mem, {DType::kF32, DType::kF16, DType::kBF16}, 3, false);
            q.expect_dim("query", 1, l.num_q_heads, "this rank's query heads");
            q.expect_dim("query", 2, self.head_dim(), "head_dim");
            const std::vector<uint32_t> starts = index_vector<uint32_t>(query_start, "query_start");
            const std::vector<uint32_t> lens = index_vector<uint32_t>(context_lens, "context_lens");
            if (starts.size() != lens.size() + 1) {
              raise_invalid(fmt::format("query_start has {} entries; expected len(context_lens) "
                                        "+ 1 = {}",
                                        starts.size(), lens.size() + 1));
            }
            if (starts.front() != 0 || starts.back() != q.shape()[0] ||
                !std::is_sorted(starts.begin(), starts.end())) {
              raise_invalid(fmt::format("query_start must rise from 0 to the query's {} tokens",
                                        q.shape()[0]));
            }
            const auto [tables, width] = block_table_arg(block_tables, "block_tables", lens.size());
            Tensor o = output_arg(out, q, mem);
            PrefillAttentionArgs args;
            args.query = q.data();
            args.query_dtype = q.dtype();
            args.output = o.data();
            args.num_seqs = static_cast<uint32_t>(lens.size());
            args.num_q_heads = l.num_q_heads;
            args.query_start = starts.data();
            args.context_lens = lens.data();
            args.block_tables = tables.data();
            args.max_blocks_per_seq = width;
            args.softmax_scale = softmax_scale_arg(softmax_scale, self.head_dim());
            check(self.locked(
                [&](RankCache& c) { return c.prefill_attention(layer, args, view_of(group_view)); }));
            return out.is_none() ? o.source() : out;
          },
          py::arg("layer"), py::arg("query"), py::arg("query_start"), py::arg("context_lens"),
          py::arg("block_tables"), py::arg("softmax_scale") = py::none(), py::kw_only(),
          py::arg("out") = py::none(), py::arg("group_view") = false,
          "New tokens attend causally to their sequence's cached prefix and to themselves: "
          "query [total_new_tokens, local_q_heads, head_dim], sequence i's queries are rows "
          "[query_start[i], query_start[i+1]); their K/V must be appended first.");
}

}  // namespace kvfabric::python
