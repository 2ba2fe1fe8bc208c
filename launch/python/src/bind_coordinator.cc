// Coordinator and StepPlan: the scheduler's API and the plan every rank executes.
#include <fmt/format.h>

#include <limits>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "bindings.h"
#include "kvfabric/coordinator/coordinator.h"
#include "kvfabric/plan/step_plan.h"

namespace kvfabric::python {

namespace {

using Op = StepPlan::Op;
using OpKind = StepPlan::OpKind;

// A plan entry's layer group for Python: None for whole blocks.
std::optional<uint32_t> layer_group_of(uint32_t group) {
  if (group == StepPlan::kAllLayers) return std::nullopt;
  return group;
}

std::string_view op_kind_name(OpKind kind) {
  switch (kind) {
    case OpKind::kSwapOut:
      return "swap_out";
    case OpKind::kMigrate:
      return "migrate";
    case OpKind::kSwapIn:
      return "swap_in";
    case OpKind::kCopy:
      return "copy";
  }
  return "unknown";
}

OpKind op_kind_arg(const std::string& name) {
  for (OpKind k : {OpKind::kSwapOut, OpKind::kMigrate, OpKind::kSwapIn, OpKind::kCopy}) {
    if (op_kind_name(k) == name) return k;
  }
  raise_invalid(fmt::format("unknown op kind '{}' (swap_out, migrate, swap_in, copy)", name));
}

// What query() answers about a live sequence (the control protocol's query reply).
struct SequenceState {
  uint32_t replica = 0;
  bool swapped = false;
  std::vector<BlockId> blocks;
  std::string tenant;
};

// The Coordinator is not thread-safe, and step() runs without the GIL: every call holds this
// object's mutex, taken after the GIL is released so that a thread waiting for it never blocks
// the others.
class PyCoordinator {
 public:
  explicit PyCoordinator(Coordinator coordinator) : coordinator_(std::move(coordinator)) {}

  template <typename F>
  auto locked(F&& f) {
    return without_gil([&] {
      std::lock_guard lock(mutex_);
      return f(coordinator_);
    });
  }
  void check_replica(uint32_t replica) {
    const uint32_t n = locked([](Coordinator& c) { return c.num_replicas(); });
    if (replica >= n) {
      raise_invalid(fmt::format("replica {} is out of range: the job has {} replicas", replica, n));
    }
  }

 private:
  Coordinator coordinator_;
  std::mutex mutex_;
};

// admit()'s compression= dict: the control plane's fields (docs/compression.md), checked as
// admit() checks them.
quant::CompressionPolicy compression_arg(const py::dict& fields) {
  quant::CompressionPolicy policy;
  bool has_kind = false;
  for (const auto& [key_handle, value] : fields) {
    if (!py::isinstance<py::str>(key_handle)) {
      raise_invalid(fmt::format("compression: keys are field names (got a {} key)",
                                type_name(key_handle)));
    }
    const std::string key = key_handle.cast<std::string>();
    if (key == "policy") {
      if (!py::isinstance<py::str>(value)) {
        raise_invalid(fmt::format("compression['policy'] must be a string (got {})",
                                  type_name(value)));
      }
      policy.kind = unwrap(quant::parse_compression_kind(value.cast<std::string>()));
      has_kind = true;
    } else {
      // Numbers only: a bool or a string is no budget (int and float, NumPy's too).
      const bool number = PyNumber_Check(value.ptr()) && !PyBool_Check(value.ptr()) &&
                          !PyComplex_Check(value.ptr()) && !py::isinstance<py::array>(value);
      if (!number) {
        raise_invalid(fmt::format("compression['{}'] must be a number (got {})", key,
                                  type_name(value)));
      }
      const double x = PyFloat_AsDouble(value.ptr());
      if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        raise_invalid(fmt::format("compression['{}'] is out of range", key));
      }
      check(quant::set_compression_field(policy, key, x));
    }
  }
  if (!has_kind) raise_invalid("compression: 'policy' is missing (streaming, h2o, snapkv or pyramid)");
  check(quant::validate(policy));
  return policy;
}

AdmitOptions admit_options(uint32_t priority, std::string tenant, std::optional<std::string> salt,
                           size_t public_tokens, const std::optional<py::dict>& compression) {
  AdmitOptions options;
  options.priority = priority;
  options.tenant = std::move(tenant);
  options.cache_salt = std::move(salt);
  options.public_tokens = public_tokens;
  if (compression) options.compression = compression_arg(*compression);
  return options;
}

std::string plan_repr(const StepPlan& p) {
  std::string released, preempted;
  for (SeqId s : p.released) released += (released.empty() ? "" : ", ") + std::to_string(s.value);
  for (SeqId s : p.preempted) {
    preempted += (preempted.empty() ? "" : ", ") + std::to_string(s.value);
  }
  return fmt::format("StepPlan(step={}, ops=[swap_out {}, migrate {}, swap_in {}, copy {}], "
                     "tables={}, released=[{}], preempted=[{}], compactions={}, "
                     "score_requests={})",
                     p.step, p.count(OpKind::kSwapOut), p.count(OpKind::kMigrate),
                     p.count(OpKind::kSwapIn), p.count(OpKind::kCopy), p.tables.size(), released,
                     preempted, p.compactions.size(), p.score_requests.size());
}

void bind_plan(py::module_& m) {
  Record<TokenCopy>(m, "TokenCopy",
                    "Copy num_tokens token slots (every layer, K and V, every local KV head) "
                    "between two blocks, like memmove.")
      .field("src_block", &TokenCopy::src_block)
      .field("src_offset", &TokenCopy::src_offset)
      .field("dst_block", &TokenCopy::dst_block)
      .field("dst_offset", &TokenCopy::dst_offset)
      .field("num_tokens", &TokenCopy::num_tokens)
      .computed("reason", [](const TokenCopy& c) {
        return c.reason == CopyReason::kCopyOnWrite ? "copy_on_write" : "compaction";
      });

  Record<Op> op(m, "PlanOp", "One storage op of a StepPlan.");
  op.computed("kind", [](const Op& o) { return std::string(op_kind_name(o.kind)); },
              "'swap_out', 'migrate', 'swap_in' or 'copy'")
      .field("replica", &Op::replica, "where it runs (a migration's source)")
      .field("dst_replica", &Op::dst_replica, "a migration's destination")
      .field("src", &Op::src, "swap-out, migration: device block; swap-in: host block")
      .field("dst", &Op::dst, "swap-out: host block; migration, swap-in: device block")
      .computed(
          "copy",
          [](const Op& o) -> std::optional<TokenCopy> {
            if (o.kind != OpKind::kCopy) return std::nullopt;
            return o.copy;
          },
          "the token copy (copies only, else None)")
      .computed("from_group", [](const Op& o) { return layer_group_of(o.from_group); },
                "copies: the layer group view the copy reads (None: whole blocks)")
      .computed("to_group", [](const Op& o) { return layer_group_of(o.to_group); },
                "copies: the layer group view the copy writes (None: whole blocks); differs "
                "from from_group for a regrouping (PyramidKV)");
  op.cls()
      .def_static("swap_out", &Op::swap_out, py::arg("replica"), py::arg("device"),
                  py::arg("host"))
      .def_static("swap_in", &Op::swap_in, py::arg("replica"), py::arg("host"), py::arg("device"))
      .def_static("migrate", &Op::migrate, py::arg("src_replica"), py::arg("src"),
                  py::arg("dst_replica"), py::arg("dst"))
      .def_static(
          "token_copy",
          [](uint32_t replica, BlockId src_block, uint32_t src_offset, BlockId dst_block,
             uint32_t dst_offset, uint32_t num_tokens) {
            return Op::token_copy(replica, TokenCopy{src_block, src_offset, dst_block, dst_offset,
                                                     num_tokens, CopyReason::kCopyOnWrite});
          },
          py::arg("replica"), py::arg("src_block"), py::arg("src_offset"), py::arg("dst_block"),
          py::arg("dst_offset"), py::arg("num_tokens"));

  Record<StepPlan::Table> table_cls(
      m, "PlanTable",
      "A sequence's block table as of this step. blocks are the table's blocks from index "
      "first_block on (the first first_block are unchanged from its previous table); the "
      "forward pass fills tokens [computed_tokens, num_tokens). A sequence compacted per layer "
      "group (pyramid) has one per group: layer_group names it (None for whole blocks).");
  table_cls.field("seq", &StepPlan::Table::seq)
      .field("replica", &StepPlan::Table::replica)
      .field("num_tokens", &StepPlan::Table::num_tokens)
      .field("computed_tokens", &StepPlan::Table::computed_tokens)
      .field("first_block", &StepPlan::Table::first_block)
      .field("blocks", &StepPlan::Table::blocks)
      .computed("layer_group", [](const StepPlan::Table& t) { return layer_group_of(t.layer_group); });
  table_cls.cls().def(py::init([](SeqId seq, uint32_t replica, uint64_t num_tokens,
                              uint64_t computed_tokens, uint32_t first_block,
                              std::vector<BlockId> blocks, std::optional<uint32_t> layer_group) {
                    return StepPlan::Table{seq, replica, num_tokens, computed_tokens, first_block,
                                           std::move(blocks),
                                           layer_group.value_or(StepPlan::kAllLayers)};
                  }),
                  py::arg("seq"), py::arg("replica"), py::arg("num_tokens"),
                  py::arg("computed_tokens"), py::arg("first_block"), py::arg("blocks"),
                  py::arg("layer_group") = py::none());

  Record<StepPlan::Compaction>(
      m, "PlanCompaction",
      "A sequence compacted in this step (token compression): kept lists the (first, count) "
      "ranges of its positions before the compaction that stay, in order; the i-th kept token "
      "is now position i.")
      .field("seq", &StepPlan::Compaction::seq)
      .field("replica", &StepPlan::Compaction::replica)
      .field("tokens_before", &StepPlan::Compaction::tokens_before)
      .computed("layer_group",
                [](const StepPlan::Compaction& c) { return layer_group_of(c.layer_group); })
      .computed("kept", [](const StepPlan::Compaction& c) {
        std::vector<std::pair<uint64_t, uint64_t>> kept;
        for (const StepPlan::TokenRange& r : c.kept) kept.emplace_back(r.first, r.count);
        return kept;
      });
  Record<StepPlan::ScoreRequest>(
      m, "ScoreRequest",
      "A sequence whose attention scores the coordinator needs: every shard of `replica` sends "
      "its scores with the report of this plan.")
      .field("seq", &StepPlan::ScoreRequest::seq)
      .field("replica", &StepPlan::ScoreRequest::replica);

  py::class_<StepPlan>(m, "StepPlan",
                       "One step's storage work: ops in order, changed block tables, released "
                       "and preempted sequences. Broadcast it as serialize() bytes.")
      .def(py::init([](uint64_t step, std::vector<Op> ops, std::vector<StepPlan::Table> tables,
                       std::vector<SeqId> released, std::vector<SeqId> preempted) {
             return StepPlan{step, std::move(ops), std::move(tables), std::move(released),
                             std::move(preempted), {}, {}};
           }),
           py::arg("step") = 0, py::arg("ops") = std::vector<Op>{},
           py::arg("tables") = std::vector<StepPlan::Table>{},
           py::arg("released") = std::vector<SeqId>{}, py::arg("preempted") = std::vector<SeqId>{})
      .def_readonly("step", &StepPlan::step)
      .def_readonly("ops", &StepPlan::ops)
      .def_readonly("tables", &StepPlan::tables)
      .def_readonly("released", &StepPlan::released)
      .def_readonly("preempted", &StepPlan::preempted,
                    "released sequences the engine must recompute from scratch")
      .def_readonly("compactions", &StepPlan::compactions,
                    "sequences compacted in this step (PlanCompaction)")
      .def_readonly("score_requests", &StepPlan::score_requests,
                    "sequences whose attention scores the coordinator needs (ScoreRequest)")
      .def_property_readonly("empty", &StepPlan::empty)
      .def(
          "count", [](const StepPlan& p, const std::string& kind) { return p.count(op_kind_arg(kind)); },
          py::arg("kind"), "Ops of one kind: 'swap_out', 'migrate', 'swap_in' or 'copy'.")
      .def(
          "serialize",
          [](const StepPlan& p) {
            const std::vector<uint8_t> bytes = p.serialize();
            return py::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size());
          },
          "The compact binary form every rank parses with deserialize().")
      .def_static(
          "deserialize",
          [](const py::buffer& data) {
            const py::buffer_info info = data.request();
            if (info.ndim != 1 || info.itemsize != 1) {
              raise_invalid("StepPlan.deserialize takes bytes (a 1-D buffer of bytes)");
            }
            // A strided view (buf[::2], a reversed array) is not the bytes at ptr .. ptr + size.
            if (info.size > 1 && info.strides[0] != 1) {
              raise_invalid("StepPlan.deserialize takes contiguous bytes (got a view with stride " +
                            std::to_string(info.strides[0]) + "; pass bytes(view))");
            }
            return unwrap(StepPlan::deserialize(
                {static_cast<const uint8_t*>(info.ptr), static_cast<size_t>(info.size)}));
          },
          py::arg("data"), "Parses serialize() output; malformed bytes raise ParseError.")
      .def(py::self == py::self)  // NOLINT(misc-redundant-expression)
      .def("__repr__", &plan_repr)
      .attr("__hash__") = py::none();

  m.def(
      "plan_waves", [](const std::vector<Op>& ops) { return plan_waves(ops); }, py::arg("ops"),
      "The wave of each op: ops of one wave touch disjoint blocks.");
  m.def(
      "apply_table_change",
      [](std::vector<BlockId> table, const StepPlan::Table& change) {
        check(apply_table_change(table, change));
        return table;
      },
      py::arg("table"), py::arg("change"),
      "The sequence's block list after `change` (its previous list, or [] for a new sequence).");
}

}  // namespace

void bind_coordinator(py::module_& m) {
  bind_plan(m);

  Record<Placement>(m, "Placement", "Where admit() put a sequence.")
      .field("replica", &Placement::replica)
      .field("cached_tokens", &Placement::cached_tokens,
             "prompt tokens whose K/V is in place after this step's plan; prefill the rest")
      .field("migrated_tokens", &Placement::migrated_tokens)
      .field("compressed_tokens", &Placement::compressed_tokens,
             "non-zero: served an identical SnapKV request's kept prompt of this many tokens")
      .field("blocks", &Placement::blocks);
  Record<SequenceState>(m, "SequenceState", "What query() knows about a live sequence.")
      .field("replica", &SequenceState::replica)
      .field("swapped", &SequenceState::swapped)
      .field("blocks", &SequenceState::blocks, "its block table (empty while swapped out)")
      .field("tenant", &SequenceState::tenant);
  Record<CoordinatorStats>(m, "CoordinatorStats")
      .field("admitted", &CoordinatorStats::admitted)
      .field("prompt_tokens", &CoordinatorStats::prompt_tokens)
      .field("local_hit_tokens", &CoordinatorStats::local_hit_tokens)
      .field("migrated_tokens", &CoordinatorStats::migrated_tokens)
      .field("migrated_blocks", &CoordinatorStats::migrated_blocks)
      .field("swapped_out", &CoordinatorStats::swapped_out)
      .field("swapped_in", &CoordinatorStats::swapped_in)
      .field("parked", &CoordinatorStats::parked)
      .field("preempted", &CoordinatorStats::preempted)
      .field("steps", &CoordinatorStats::steps)
      .field("compactions", &CoordinatorStats::compactions)
      .field("compacted_tokens", &CoordinatorStats::compacted_tokens)
      .field("compacted_blocks", &CoordinatorStats::compacted_blocks)
      .field("compressed_indexed", &CoordinatorStats::compressed_indexed)
      .field("compressed_hits", &CoordinatorStats::compressed_hits);
  Record<ReplicaStats>(m, "ReplicaStats")
      .field("device_blocks", &ReplicaStats::device_blocks)
      .field("used_blocks", &ReplicaStats::used_blocks)
      .field("cached_blocks", &ReplicaStats::cached_blocks)
      .field("free_blocks", &ReplicaStats::free_blocks)
      .field("indexed_blocks", &ReplicaStats::indexed_blocks)
      .field("sequences", &ReplicaStats::sequences)
      .field("swapped", &ReplicaStats::swapped)
      .field("host_blocks", &ReplicaStats::host_blocks)
      .field("host_free_blocks", &ReplicaStats::host_free_blocks);
  Record<AdmissionCost>(m, "AdmissionCost", "How admit() weighs one replica for a prompt.")
      .field("replica", &AdmissionCost::replica)
      .field("accepts", &AdmissionCost::accepts,
             "takes a newcomer of the asked priority (not full, no swapped sequence of that "
             "priority or higher waiting to come back)")
      .field("cached_tokens", &AdmissionCost::cached_tokens)
      .field("migration_source", &AdmissionCost::migration_source,
             "the replica a longer cached prefix would move from, or None")
      .field("migrated_tokens", &AdmissionCost::migrated_tokens)
      .field("load", &AdmissionCost::load)
      .field("cost", &AdmissionCost::cost, "tokens to compute (and to move) at their costs, plus load")
      .field("blocks_needed", &AdmissionCost::blocks_needed)
      .field("blocks_available", &AdmissionCost::blocks_available)
      .computed("has_room", [](const AdmissionCost& c) { return c.has_room(); },
                "blocks_needed fit in blocks_available (no one displaced)");
  m.def(
      "cheapest_with_room",
      [](const std::vector<AdmissionCost>& costs) { return cheapest_with_room(costs); },
      py::arg("costs"),
      "The replica admit() takes among Coordinator.admission_costs() when one accepts the "
      "request and has room: the cheapest (ties: the lower id); None when none has room.");
  Record<TenantStats>(m, "TenantStats")
      .field("admitted", &TenantStats::admitted)
      .field("prompt_tokens", &TenantStats::prompt_tokens)
      .field("cached_tokens", &TenantStats::cached_tokens)
      .field("migrated_tokens", &TenantStats::migrated_tokens)
      .field("refused", &TenantStats::refused)
      .field("preempted", &TenantStats::preempted)
      .field("sequences", &TenantStats::sequences)
      .field("blocks", &TenantStats::blocks)
      .field("host_blocks", &TenantStats::host_blocks);

  py::class_<PyCoordinator>(
      m, "Coordinator",
      "Places sequences on the dp replicas and turns requests into one StepPlan per step. A "
      "refused call raises kvfabric.Error and changes nothing. Calls from several threads are "
      "serialized; step() releases the GIL.")
      .def(py::init([](const Config& config) {
             return std::make_unique<PyCoordinator>(unwrap(Coordinator::create(config)));
           }),
           py::arg("config"))
      .def(
          "admit",
          [](PyCoordinator& self, SeqId seq, const py::object& tokens, uint32_t priority,
             std::string tenant, std::optional<std::string> cache_salt, size_t public_tokens,
             const std::optional<py::dict>& compression) {
            std::vector<TokenId> prompt = tokens_arg(tokens, "tokens");
            AdmitOptions options = admit_options(priority, std::move(tenant), std::move(cache_salt),
                                                 public_tokens, compression);
            return unwrap(self.locked(
                [&](Coordinator& c) { return c.admit(seq, std::move(prompt), options); }));
          },
          py::arg("seq"), py::arg("tokens"), py::arg("priority") = 0, py::kw_only(),
          py::arg("tenant") = "", py::arg("cache_salt") = py::none(), py::arg("public_tokens") = 0,
          py::arg("compression") = py::none(),
          "Places `seq` holding the prompt `tokens`; returns its Placement. compression: a dict "
          "such as {'policy': 'h2o', 'budget_ratio': 0.25, 'interval_steps': 16}.")
      .def(
          "admission_costs",
          [](PyCoordinator& self, const py::object& tokens, uint32_t priority, std::string tenant,
             std::optional<std::string> cache_salt, size_t public_tokens) {
            const std::vector<TokenId> prompt = tokens_arg(tokens, "tokens");
            const AdmitOptions options = admit_options(priority, std::move(tenant),
                                                       std::move(cache_salt), public_tokens, {});
            return unwrap(self.locked(
                [&](Coordinator& c) { return c.admission_costs(prompt, options); }));
          },
          py::arg("tokens"), py::arg("priority") = 0, py::kw_only(), py::arg("tenant") = "",
          py::arg("cache_salt") = py::none(), py::arg("public_tokens") = 0,
          "How admit() would weigh each replica for the prompt now, in replica order (a list of "
          "AdmissionCost); admit() takes the cheapest that accepts it and has room "
          "(kvfabric.cheapest_with_room). Changes nothing.")
      .def(
          "report_attention",
          [](PyCoordinator& self, SeqId seq, uint64_t step, const py::object& given) {
            refuse_masked(given, "scores");
            const auto scores =
                py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(given);
            if (!scores) {
              PyErr_Clear();
              raise_invalid(fmt::format("scores must be numbers (got {})", type_name(given)));
            }
            if (scores.ndim() != 1) raise_invalid("scores must be 1-D: one per token");
            const std::span<const double> values(scores.data(), static_cast<size_t>(scores.size()));
            check(self.locked(
                [&](Coordinator& c) { return c.report_attention(seq, step, values); }));
          },
          py::arg("seq"), py::arg("step"), py::arg("scores"),
          "A compressed sequence's attention scores per token, summed over its replica's shards "
          "(RankCache.reported_scores()) after running plan `step`, whose score request they "
          "answer; its next H2O or SnapKV compaction reads them.")
      .def(
          "tokens_of",
          [](PyCoordinator& self, SeqId seq) {
            return self.locked([&](Coordinator& c) { return c.tokens_of(seq); });
          },
          py::arg("seq"), "The tokens a live sequence holds (after its compactions); 0 if unknown.")
      .def(
          "append",
          [](PyCoordinator& self, const py::object& seqs, size_t num_tokens) {
            // One id: a Python int or a NumPy integer scalar (a 0-d array is no list either).
            if (PyIndex_Check(seqs.ptr()) && !py::isinstance<py::array>(seqs)) {
              const auto seq = SeqId{index_arg(seqs, "seqs", std::numeric_limits<int64_t>::max())};
              check(self.locked([&](Coordinator& c) { return c.append(seq, num_tokens); }));
              return;
            }
            std::vector<SeqId> batch;
            for (uint64_t s : index_vector<uint64_t>(seqs, "seqs")) batch.push_back(SeqId{s});
            const Coordinator::BatchResult r =
                self.locked([&](Coordinator& c) { return c.append(batch, num_tokens); });
            if (!r.status.ok()) {
              py::dict extra;
              extra["done"] = r.done;
              raise_status(r.status, extra);
            }
          },
          py::arg("seqs"), py::arg("num_tokens"),
          "Adds num_tokens slots to a sequence, or to each of a list of sequences in order (a "
          "decode step). A refused batch raises with .done = the sequences that grew.")
      .def(
          "fork",
          [](PyCoordinator& self, SeqId src, SeqId dst, std::optional<uint32_t> replica) {
            check(self.locked([&](Coordinator& c) { return c.fork(src, dst, replica); }));
            return self.locked([&](Coordinator& c) { return c.replica_of(dst).value_or(0); });
          },
          py::arg("src"), py::arg("dst"), py::arg("replica") = py::none(),
          "Creates `dst` sharing src's blocks (on `replica`: migrated there); returns its replica.")
      .def(
          "free",
          [](PyCoordinator& self, SeqId seq) {
            check(self.locked([&](Coordinator& c) { return c.free(seq); }));
          },
          py::arg("seq"))
      .def(
          "set_priority",
          [](PyCoordinator& self, SeqId seq, uint32_t priority) {
            check(self.locked([&](Coordinator& c) { return c.set_priority(seq, priority); }));
          },
          py::arg("seq"), py::arg("priority"))
      .def(
          "step",
          [](PyCoordinator& self) { return unwrap(self.locked([](Coordinator& c) { return c.step(); })); },
          "Closes the step and returns the plan every rank executes before the forward pass.")
      .def(
          "query",
          [](PyCoordinator& self, SeqId seq) {
            auto state = self.locked([&](Coordinator& c) -> std::optional<SequenceState> {
              const std::optional<uint32_t> replica = c.replica_of(seq);
              if (!replica) return std::nullopt;
              return SequenceState{*replica, c.is_swapped(seq), c.blocks_of(seq),
                                   std::string(c.tenant_of(seq).value_or(""))};
            });
            if (!state) raise_status(sequence_not_found(seq));
            return *state;
          },
          py::arg("seq"), "A live sequence's replica, blocks and state (SequenceNotFoundError).")
      .def("stats", [](PyCoordinator& self) { return self.locked([](Coordinator& c) { return c.stats(); }); })
      .def(
          "replica_stats",
          [](PyCoordinator& self, uint32_t replica) {
            self.check_replica(replica);
            return self.locked([&](Coordinator& c) { return c.replica_stats(replica); });
          },
          py::arg("replica"))
      .def(
          "tenant_stats",
          [](PyCoordinator& self, const std::string& tenant) {
            return self.locked([&](Coordinator& c) { return c.tenant_stats(tenant); });
          },
          py::arg("tenant") = "")
      .def(
          "tenant_quota",
          [](PyCoordinator& self, const std::string& tenant) {
            return self.locked([&](Coordinator& c) { return c.tenant_quota(tenant); });
          },
          py::arg("tenant"))
      .def(
          "set_tenant_quota",
          [](PyCoordinator& self, const std::string& tenant, const TenantQuota& quota) {
            check(self.locked([&](Coordinator& c) { return c.set_tenant_quota(tenant, quota); }));
          },
          py::arg("tenant"), py::arg("quota"))
      .def("tenants", [](PyCoordinator& self) { return self.locked([](Coordinator& c) { return c.tenants(); }); })
      .def(
          "cached_tokens",
          [](PyCoordinator& self, uint32_t replica, const py::object& tokens, std::string tenant,
             std::optional<std::string> cache_salt, size_t public_tokens) {
            self.check_replica(replica);
            const std::vector<TokenId> prompt = tokens_arg(tokens, "tokens");
            const AdmitOptions options =
                admit_options(0, std::move(tenant), std::move(cache_salt), public_tokens, {});
            return self.locked(
                [&](Coordinator& c) { return c.cached_tokens(replica, prompt, options); });
          },
          py::arg("replica"), py::arg("tokens"), py::kw_only(), py::arg("tenant") = "",
          py::arg("cache_salt") = py::none(), py::arg("public_tokens") = 0,
          "Leading tokens of the prompt cached on `replica` under that salt (whole blocks).")
      .def(
          "replica_of",
          [](PyCoordinator& self, SeqId seq) {
            return self.locked([&](Coordinator& c) { return c.replica_of(seq); });
          },
          py::arg("seq"), "The replica of a live sequence, None when unknown.")
      .def(
          "host_free_blocks",
          [](PyCoordinator& self, uint32_t replica) {
            self.check_replica(replica);
            return self.locked([&](Coordinator& c) { return c.host_free_blocks(replica); });
          },
          py::arg("replica"))
      .def("verify_integrity",
           [](PyCoordinator& self) {
             check(self.locked([](Coordinator& c) { return c.verify_integrity(); }));
           })
      .def_property_readonly(
          "num_replicas", [](PyCoordinator& self) { return self.locked([](Coordinator& c) { return c.num_replicas(); }); })
      .def_property_readonly(
          "block_bytes", [](PyCoordinator& self) { return self.locked([](Coordinator& c) { return c.block_bytes(); }); })
      .def_property_readonly(
          "host_memory_bytes",
          [](PyCoordinator& self) { return self.locked([](Coordinator& c) { return c.host_memory_bytes(); }); })
      .def_property_readonly(
          "config", [](PyCoordinator& self) { return self.locked([](Coordinator& c) { return c.config(); }); },
          "A copy of the config it was created with.");
}

}  // namespace kvfabric::python
