// kvfabric-bench attention | quant | copy: the storage kernels against in-run memory baselines.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "bench/progress.h"
#include "bench/report.h"
#include "bench/routines.h"
#include "bench/timing.h"
#include "kvfabric/backend/backend.h"
#include "kvfabric/backend/cuda_backend.h"
#include "kvfabric/quant/numeric.h"

namespace kvfabric::bench {
namespace {

// Shapes default to one Llama-3-8B layer on one GPU (32 query / 8 KV heads, head_dim 128).
struct KernelOptions {
  std::string device = "cpu";
  std::string isa = "auto";
  int threads = 0;
  int iterations = 5;
  uint32_t q_heads = 32;
  uint32_t kv_heads = 8;
  uint32_t head_dim = 128;
  uint32_t block_size = 16;
  uint32_t group_size = 32;
  std::vector<std::string> dtypes = {"f32", "f16", "bf16", "fp8_e4m3", "int8", "int4", "int2"};
};

void add_kernel_options(CLI::App* cmd, KernelOptions& o) {
  cmd->add_option("--device", o.device, "backend: cpu or cuda");
  cmd->add_option("--isa", o.isa, "CPU kernels: auto, generic, avx2 or avx2-vnni");
  cmd->add_option("--threads", o.threads, "threads (0 = all cores)")
      ->check(CLI::Range(0, CpuBackendOptions::kMaxThreads));
  cmd->add_option("--iterations", o.iterations, "timed repetitions (the median is reported)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--q-heads", o.q_heads, "local query heads");
  cmd->add_option("--kv-heads", o.kv_heads, "local KV heads");
  cmd->add_option("--head-dim", o.head_dim, "head dimension");
  cmd->add_option("--block-size", o.block_size, "tokens per block");
  cmd->add_option("--group-size", o.group_size, "integer formats: elements per scale/zero group");
  cmd->add_option("--dtype", o.dtypes, "KV dtypes to measure (comma separated)")->delimiter(',');
}

struct Setup {
  std::unique_ptr<Backend> backend;
  bool cuda = false;
  int threads = 1;
  std::vector<DType> dtypes;

  //! Backend memory holding `host` (a tensor the kernels read).
  template <typename T>
  Result<KvArena> put(const std::vector<T>& host) const {
    KVF_ASSIGN_OR_RETURN(KvArena a,
                         backend->allocate_arena(host.size() * sizeof(T), Tier::kDevice));
    KVF_RETURN_IF_ERROR(backend->upload(a.data(), host.data(), host.size() * sizeof(T)));
    return a;
  }

  //! Mean seconds of `iterations` back-to-back calls after one warm-up call (device work is
  //! waited for before and after, so queued launches overlap as in a serving loop).
  Result<double> time_calls(const std::function<Status()>& call, int iterations) const {
    KVF_RETURN_IF_ERROR(call());
    KVF_RETURN_IF_ERROR(backend->synchronize());
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iterations; ++i)
      KVF_RETURN_IF_ERROR(call());
    KVF_RETURN_IF_ERROR(backend->synchronize());
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() /
           iterations;
  }

  //! Bytes copied per second by one bulk copy between two buffers of the backend (memcpy on the
  //! CPU over `threads` threads, cudaMemcpyAsync on a GPU).
  Result<double> copy_bandwidth(uint64_t bytes, int iterations, Tier from = Tier::kDevice,
                                Tier to = Tier::kDevice) const {
    if (!cuda && from == Tier::kDevice && to == Tier::kDevice)
      return memcpy_bandwidth(bytes, threads, iterations);
    KVF_ASSIGN_OR_RETURN(KvArena src, backend->allocate_arena(bytes, from));
    KVF_ASSIGN_OR_RETURN(KvArena dst, backend->allocate_arena(bytes, to));
    if (!cuda) {  // touch every page: untouched anonymous memory reads as the shared zero page
      std::memset(src.data(), 1, bytes);
      std::memset(dst.data(), 2, bytes);
    }
    KVF_ASSIGN_OR_RETURN(
        const double t,
        time_calls([&] { return backend->copy_bytes(dst.data(), src.data(), bytes); }, iterations));
    return static_cast<double>(bytes) / t;
  }
};

Result<Setup> make_setup(const KernelOptions& o) {
  if (o.device == "cuda") {
    Setup setup;
    KVF_ASSIGN_OR_RETURN(setup.backend, make_cuda_backend());
    setup.cuda = true;
    for (const auto& name : o.dtypes) {
      KVF_ASSIGN_OR_RETURN(const DType d, parse_dtype(name));
      setup.dtypes.push_back(d);
    }
    return setup;
  }
  if (o.device != "cpu")
    return invalid_argument("--device must be cpu or cuda (got " + o.device + ")");
  CpuIsa isa = CpuIsa::kAuto;
  if (o.isa == "generic") {
    isa = CpuIsa::kGeneric;
  } else if (o.isa == "avx2") {
    isa = CpuIsa::kAvx2;
  } else if (o.isa == "avx2-vnni") {
    isa = CpuIsa::kAvx2Vnni;
  } else if (o.isa != "auto") {
    return invalid_argument("--isa must be auto, generic, avx2 or avx2-vnni (got " + o.isa + ")");
  }
  Setup setup;
  KVF_ASSIGN_OR_RETURN(setup.backend, make_cpu_backend(CpuBackendOptions{isa, o.threads}));
  setup.threads = o.threads;
#ifdef _OPENMP
  if (setup.threads == 0) setup.threads = omp_get_num_procs();
#else
  setup.threads = 1;
#endif
  for (const auto& name : o.dtypes) {
    KVF_ASSIGN_OR_RETURN(const DType d, parse_dtype(name));
    setup.dtypes.push_back(d);
  }
  return setup;
}

uint32_t group_for(const KernelOptions& o, DType dtype) {
  return is_integer_quantized(dtype) ? o.group_size : 0;
}

// Bytes a context of `tokens` occupies in one layer's K and V (codes and metadata as stored).
uint64_t stored_kv_bytes(const BlockLayout& layout, uint64_t tokens) {
  const uint64_t rows = tokens * layout.num_kv_heads * 2;
  uint64_t per_row = uint64_t{layout.head_dim} * dtype_bits(layout.dtype) / 8;
  per_row += uint64_t{layout.groups_per_row()} * (is_integer_quantized(layout.dtype) ? 5 : 4);
  return rows * per_row;
}

// A one-layer pool holding `seqs` sequences of `context` tokens of random KV, tables shuffled.
struct FilledPool {
  BlockLayout layout;
  KvArena arena;
  PagedKvView view;
  std::vector<uint32_t> tables;
  uint32_t max_blocks = 0;
};

Result<FilledPool> fill_pool(const Setup& setup, const KernelOptions& o, DType dtype, uint32_t seqs,
                             uint32_t context, uint32_t block_size, std::mt19937& rng) {
  Backend& backend = *setup.backend;
  FilledPool p;
  KVF_ASSIGN_OR_RETURN(p.layout, BlockLayout::create(1, o.kv_heads, block_size, o.head_dim, dtype,
                                                     group_for(o, dtype)));
  p.max_blocks = (context + block_size - 1) / block_size;
  const uint64_t blocks = uint64_t{seqs} * p.max_blocks;
  KVF_ASSIGN_OR_RETURN(p.arena,
                       backend.allocate_arena(blocks * p.layout.block_bytes(), Tier::kDevice));
  p.view = PagedKvView::make(p.layout, p.arena.data(), blocks);
  p.tables.resize(blocks);
  std::iota(p.tables.begin(), p.tables.end(), 0u);
  std::shuffle(p.tables.begin(), p.tables.end(), rng);
  const uint32_t chunk = 1024;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> k(uint64_t{chunk} * o.kv_heads * o.head_dim), v(k.size());
  std::vector<int64_t> slots(chunk);
  for (uint32_t s = 0; s < seqs; ++s) {
    for (uint32_t first = 0; first < context; first += chunk) {
      const uint32_t n = std::min(chunk, context - first);
      for (auto& x : k)
        x = normal(rng);
      for (auto& x : v)
        x = normal(rng);
      for (uint32_t t = 0; t < n; ++t) {
        const uint32_t pos = first + t;
        slots[t] = int64_t{p.tables[uint64_t{s} * p.max_blocks + pos / block_size]} * block_size +
                   pos % block_size;
      }
      KVF_ASSIGN_OR_RETURN(KvArena dk, setup.put(k));
      KVF_ASSIGN_OR_RETURN(KvArena dv, setup.put(v));
      KVF_RETURN_IF_ERROR(
          backend.append_kv(p.view, {0, dk.data(), dv.data(), DType::kF32, n, slots.data()}));
    }
  }
  return p;
}

// Seconds to read a paged pool's KV in the CPU decode kernel's order (a sequence per thread at a
// time; per block, each KV head's K tile and records, then its V tile and records), every byte
// summed and nothing else: the memory floor of one decode call, which splits the call's time
// into reading and computing.
double kernel_order_read_seconds(const FilledPool& p, uint32_t seqs, uint32_t context, int threads,
                                 int iterations) {
  const PagedKvView& view = p.view;
  const uint32_t bs = view.block_size;
  const uint64_t records = uint64_t{bs} * view.groups_per_row;  // scales (fp8, integers)
  const bool zero_points = is_integer_quantized(view.dtype);
  const auto sum_words = [](const void* data, uint64_t bytes) {  // any alignment
    const auto* at = static_cast<const uint8_t*>(data);
    uint64_t sum = 0;
    for (uint64_t i = 0; i + 8 <= bytes; i += 8) {
      uint64_t word;
      std::memcpy(&word, at + i, 8);
      sum += word;
    }
    return sum;
  };
  volatile uint64_t sink = 0;
  return median_seconds(
      [&] {
        uint64_t sum = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : sum) schedule(dynamic, 1)
        for (int64_t s = 0; s < int64_t{seqs}; ++s) {
          for (uint32_t start = 0; start < context; start += bs) {
            const uint32_t block = p.tables[uint64_t(s) * p.max_blocks + start / bs];
            for (uint32_t h = 0; h < view.num_kv_heads; ++h) {
              for (uint32_t kv = 0; kv < 2; ++kv) {
                sum += sum_words(view.codes(block, 0, kv, h), view.tile_bytes);
                if (records == 0) continue;
                sum += sum_words(view.scales(block, 0, kv, h), records * sizeof(float));
                if (zero_points) sum += sum_words(view.zeros(block, 0, kv, h), records);
              }
            }
          }
        }
        sink = sink + sum;
      },
      1, iterations);
}

struct AttentionOptions {
  KernelOptions kernel;
  uint32_t seqs = 16;
  uint32_t context = 4096;
};

Status run_attention(const AttentionOptions& opts, nlohmann::json& results) {
  const KernelOptions& o = opts.kernel;
  KVF_ASSIGN_OR_RETURN(Setup setup, make_setup(o));
  std::mt19937 rng(1);
  const uint32_t seqs = opts.seqs, ctx = opts.context;
  fmt::print(
      "attention: decode, {} sequences x {} tokens, {} query / {} KV heads, head_dim {}, "
      "block {}, backend {}{}\n",
      seqs, ctx, o.q_heads, o.kv_heads, o.head_dim, o.block_size, setup.backend->name(),
      setup.cuda ? "" : fmt::format(" with {} threads", setup.threads));

  // Baselines over a buffer as large as the f16 KV of one layer. On a GPU the copy is counted as
  // bytes read + written (as HBM sees it); on the CPU memcpy counts bytes copied.
  const uint64_t baseline_bytes = uint64_t{seqs} * ctx * o.kv_heads * 2 * o.head_dim * 2;
  KVF_ASSIGN_OR_RETURN(double copy_bw, setup.copy_bandwidth(baseline_bytes, o.iterations));
  if (setup.cuda) copy_bw *= 2;
  const double read_bw =
      setup.cuda ? 0.0 : read_bandwidth(baseline_bytes, setup.threads, o.iterations);
  fmt::print("baseline on {:.0f} MB: {} {:.2f} GB/s{}\n\n", baseline_bytes / 1e6,
             setup.cuda ? "device-to-device copy (read + write)" : "memcpy (bytes copied)",
             copy_bw / 1e9,
             setup.cuda ? "" : fmt::format(", streaming read {:.2f} GB/s", read_bw / 1e9));

  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(uint64_t{seqs} * o.q_heads * o.head_dim);
  for (auto& x : q)
    x = normal(rng);
  KVF_ASSIGN_OR_RETURN(KvArena dq, setup.put(q));
  KVF_ASSIGN_OR_RETURN(KvArena dout, setup.put(q));
  const std::vector<uint32_t> lens(seqs, ctx);
  results["routine"] = "attention";
  results["shape"] = {{"seqs", seqs},
                      {"context", ctx},
                      {"q_heads", o.q_heads},
                      {"kv_heads", o.kv_heads},
                      {"head_dim", o.head_dim},
                      {"block_size", o.block_size},
                      {"threads", setup.threads},
                      {"backend", setup.backend->name()}};
  results["copy_bytes_per_s"] = copy_bw;
  results["copy_counts_read_and_write"] = setup.cuda;
  results["read_bytes_per_s"] = read_bw;
  results["runs"] = nlohmann::json::array();
  Table table({"kv_dtype", "kv_MB", "paged_ms", "GB/s", setup.cuda ? "vs_d2d" : "vs_memcpy",
               "vs_read", "contig_ms", "paged/contig", "read_ms", "time_vs_f16"});
  double f16_seconds = 0;
  // Updated after each dtype, outside its timed calls.
  ProgressReporter reporter("attention", setup.dtypes.size(), "dtypes");
  for (DType dtype : setup.dtypes) {
    KVF_ASSIGN_OR_RETURN(FilledPool paged,
                         fill_pool(setup, o, dtype, seqs, ctx, o.block_size, rng));
    KVF_ASSIGN_OR_RETURN(FilledPool contiguous, fill_pool(setup, o, dtype, seqs, ctx, ctx, rng));
    auto time_decode = [&](const FilledPool& p) -> Result<double> {
      DecodeAttentionArgs args;
      args.query = dq.data();
      args.output = dout.data();
      args.num_seqs = seqs;
      args.num_q_heads = o.q_heads;
      args.block_tables = p.tables.data();
      args.max_blocks_per_seq = p.max_blocks;
      args.context_lens = lens.data();
      args.softmax_scale = 1.0f / std::sqrt(static_cast<float>(o.head_dim));
      return setup.time_calls([&] { return setup.backend->paged_decode_attention(p.view, args); },
                              o.iterations);
    };
    KVF_ASSIGN_OR_RETURN(const double t_paged, time_decode(paged));
    KVF_ASSIGN_OR_RETURN(const double t_contig, time_decode(contiguous));
    const double t_read =
        setup.cuda ? 0.0 : kernel_order_read_seconds(paged, seqs, ctx, setup.threads, o.iterations);
    // Bytes the kernel must move: KV as stored, the queries read and the outputs written.
    const uint64_t kv_bytes = stored_kv_bytes(paged.layout, uint64_t{seqs} * ctx);
    const uint64_t moved = kv_bytes + 2 * q.size() * sizeof(float);
    const double bw = static_cast<double>(moved) / t_paged;
    if (dtype == DType::kF16) f16_seconds = t_paged;
    table.add_row({std::string(dtype_name(dtype)), fmt::format("{:.0f}", kv_bytes / 1e6),
                   fmt::format("{:.3f}", t_paged * 1e3), fmt::format("{:.1f}", bw / 1e9),
                   fmt::format("{:.2f}", bw / copy_bw),
                   setup.cuda ? "-" : fmt::format("{:.2f}", bw / read_bw),
                   fmt::format("{:.3f}", t_contig * 1e3), fmt::format("{:.3f}", t_paged / t_contig),
                   setup.cuda ? "-" : fmt::format("{:.3f}", t_read * 1e3),
                   f16_seconds > 0 ? fmt::format("{:.2f}", t_paged / f16_seconds) : "-"});
    results["runs"].push_back({{"kv_dtype", dtype_name(dtype)},
                               {"kv_bytes", kv_bytes},
                               {"bytes_moved", moved},
                               {"paged_seconds", t_paged},
                               {"contiguous_seconds", t_contig},
                               {"bytes_per_s", bw},
                               {"ratio_vs_copy", bw / copy_bw},
                               {"ratio_vs_read", setup.cuda ? 0.0 : bw / read_bw},
                               {"paged_over_contiguous", t_paged / t_contig},
                               {"kernel_order_read_seconds", t_read},
                               {"time_vs_f16", f16_seconds > 0 ? t_paged / f16_seconds : 0.0}});
    reporter.update(results["runs"].size(), [&] { return std::string(dtype_name(dtype)); });
  }
  reporter.finish();
  fmt::print("{}", table.to_string());
  fmt::print(
      "GB/s = (KV bytes as stored + queries + outputs) per second of one decode call (mean of "
      "back-to-back calls);\ncontig = the same kernel with one block per sequence; "
      "read = the paged KV read in the kernel's order, no arithmetic (CPU);\n"
      "time_vs_f16 = this dtype's decode time over f16's.\n");
  return ok_status();
}

struct QuantOptions {
  KernelOptions kernel;
  uint32_t tokens = 16384;
};

Status run_quant(const QuantOptions& opts, nlohmann::json& results) {
  const KernelOptions& o = opts.kernel;
  KVF_ASSIGN_OR_RETURN(Setup setup, make_setup(o));
  std::mt19937 rng(2);
  const uint32_t n = opts.tokens;
  const uint64_t elements = uint64_t{n} * o.kv_heads * o.head_dim;
  std::vector<uint16_t> k(elements), v(elements);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& x : k)
    x = numeric::f32_to_f16(normal(rng));
  for (auto& x : v)
    x = numeric::f32_to_f16(normal(rng));
  KVF_ASSIGN_OR_RETURN(KvArena dk, setup.put(k));
  KVF_ASSIGN_OR_RETURN(KvArena dv, setup.put(v));
  const uint64_t input_bytes = elements * 2 * 2;  // K and V, f16
  KVF_ASSIGN_OR_RETURN(const double copy_bw, setup.copy_bandwidth(input_bytes, o.iterations));
  fmt::print(
      "quant: append_kv of {} tokens x {} KV heads x {} from f16, backend {}; copy {:.2f} GB/s "
      "(bytes copied) on {:.0f} MB\n\n",
      n, o.kv_heads, o.head_dim, setup.backend->name(), copy_bw / 1e9, input_bytes / 1e6);
  results["routine"] = "quant";
  results["tokens"] = n;
  results["copy_bytes_per_s"] = copy_bw;
  results["runs"] = nlohmann::json::array();
  Table table({"kv_dtype", "ms", "Mtokens/s", "in_GB/s", "in+out_GB/s", "vs_copy_traffic",
               "vs_copy_input"});
  ProgressReporter reporter("quant", setup.dtypes.size(), "dtypes");
  for (DType dtype : setup.dtypes) {
    KVF_ASSIGN_OR_RETURN(
        const BlockLayout layout,
        BlockLayout::create(1, o.kv_heads, o.block_size, o.head_dim, dtype, group_for(o, dtype)));
    const uint64_t blocks = (n + o.block_size - 1) / o.block_size;
    KVF_ASSIGN_OR_RETURN(
        KvArena arena, setup.backend->allocate_arena(blocks * layout.block_bytes(), Tier::kDevice));
    const PagedKvView view = PagedKvView::make(layout, arena.data(), blocks);
    std::vector<int64_t> slots(n);
    std::iota(slots.begin(), slots.end(), int64_t{0});
    KVF_ASSIGN_OR_RETURN(const double t,
                         setup.time_calls(
                             [&] {
                               return setup.backend->append_kv(
                                   view, {0, dk.data(), dv.data(), DType::kF16, n, slots.data()});
                             },
                             o.iterations));
    const uint64_t stored = stored_kv_bytes(layout, n);
    const double in_bw = input_bytes / t, traffic_bw = (input_bytes + stored) / t;
    table.add_row({std::string(dtype_name(dtype)), fmt::format("{:.3f}", t * 1e3),
                   fmt::format("{:.2f}", n / t / 1e6), fmt::format("{:.2f}", in_bw / 1e9),
                   fmt::format("{:.2f}", traffic_bw / 1e9),
                   fmt::format("{:.2f}", traffic_bw / (2 * copy_bw)),
                   fmt::format("{:.2f}", in_bw / copy_bw)});
    results["runs"].push_back({{"kv_dtype", dtype_name(dtype)},
                               {"seconds", t},
                               {"input_bytes", input_bytes},
                               {"stored_bytes", stored},
                               {"ratio_vs_copy_traffic", traffic_bw / (2 * copy_bw)},
                               {"ratio_vs_copy_input", in_bw / copy_bw}});
    reporter.update(results["runs"].size(), [&] { return std::string(dtype_name(dtype)); });
  }
  reporter.finish();
  fmt::print("{}", table.to_string());
  fmt::print(
      "vs_copy_traffic = (input + stored bytes)/s over the copy's (read + written) bytes/s; "
      "vs_copy_input = input bytes/s over bytes copied/s.\nThe append includes the NaN/Inf "
      "check of the input and the slot validation.\n");
  return ok_status();
}

struct CopyOptions {
  KernelOptions kernel;
  uint32_t layers = 4;
  uint32_t blocks = 2048;
  uint32_t moves = 512;
  bool swap_only = false;
};

Status run_copy(const CopyOptions& opts, nlohmann::json& results) {
  // Each move reads three distinct blocks of a shuffled pool (source, copy target, swap target).
  if (uint64_t{opts.moves} * 3 > opts.blocks) {
    return invalid_argument("--blocks " + std::to_string(opts.blocks) + " holds too few blocks for "
                            "--moves " + std::to_string(opts.moves) + " (at least 3 x moves)");
  }
  KernelOptions o = opts.kernel;
  KVF_ASSIGN_OR_RETURN(Setup setup, make_setup(o));
  std::mt19937 rng(3);
  KVF_ASSIGN_OR_RETURN(
      const BlockLayout layout,
      BlockLayout::create(opts.layers, o.kv_heads, o.block_size, o.head_dim, DType::kF16));
  const uint64_t bb = layout.block_bytes();
  KVF_ASSIGN_OR_RETURN(KvArena device,
                       setup.backend->allocate_arena(opts.blocks * bb, Tier::kDevice));
  KVF_ASSIGN_OR_RETURN(KvArena host, setup.backend->allocate_arena(opts.blocks * bb, Tier::kHost));
  if (!setup.cuda) {  // CUDA arenas come zeroed by cudaMemset; touch the CPU ones' pages
    std::memset(device.data(), 3, device.bytes());
    std::memset(host.data(), 5, host.bytes());
  }
  const PagedKvView dv = PagedKvView::make(layout, device.data(), opts.blocks);
  const PagedKvView hv = PagedKvView::make(layout, host.data(), opts.blocks);
  std::vector<uint32_t> ids(opts.blocks);
  std::iota(ids.begin(), ids.end(), 0u);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<BlockMove> moves(opts.moves), pairs(opts.moves);
  for (uint32_t i = 0; i < opts.moves; ++i) {
    moves[i] = {ids[i], ids[opts.moves + i]};
    pairs[i] = {ids[i], ids[2 * opts.moves + i]};
  }
  std::vector<TokenCopy> tokens(opts.moves);
  const uint32_t half = o.block_size / 2;
  for (uint32_t i = 0; i < opts.moves; ++i) {
    tokens[i] = TokenCopy{BlockId{ids[i]},
                          0,
                          BlockId{ids[(3 * uint64_t{opts.moves} + i) % opts.blocks]},
                          half,
                          half,
                          CopyReason::kCompaction};
  }
  const uint64_t moved = uint64_t{opts.moves} * bb;
  // Baselines: one bulk copy of the same bytes (host memcpy on the CPU; cudaMemcpyAsync
  // device<->pinned host and device-to-device on a GPU).
  KVF_ASSIGN_OR_RETURN(const double d2h_bw,
                       setup.copy_bandwidth(moved, o.iterations, Tier::kDevice, Tier::kHost));
  KVF_ASSIGN_OR_RETURN(const double h2d_bw,
                       setup.copy_bandwidth(moved, o.iterations, Tier::kHost, Tier::kDevice));
  KVF_ASSIGN_OR_RETURN(const double d2d_bw, setup.copy_bandwidth(moved, o.iterations));
  fmt::print(
      "{}: {} blocks of {} KB ({} layers, {} KV heads, head_dim {}, block {}, f16), backend {}\n"
      "bulk copies of {:.0f} MB: device->host {:.2f} GB/s, host->device {:.2f} GB/s, "
      "device->device {:.2f} GB/s\n\n",
      opts.swap_only ? "swap" : "copy", opts.moves, bb / 1024, opts.layers, o.kv_heads, o.head_dim,
      o.block_size, setup.backend->name(), moved / 1e6, d2h_bw / 1e9, h2d_bw / 1e9, d2d_bw / 1e9);
  Table table({"operation", "MB", "ms", "GB/s", "vs_bulk_copy"});
  results["routine"] = opts.swap_only ? "swap" : "copy";
  results["bulk_copy_bytes_per_s"] = {
      {"device_to_host", d2h_bw}, {"host_to_device", h2d_bw}, {"device_to_device", d2d_bw}};
  results["runs"] = nlohmann::json::array();
  auto report = [&](const std::string& name, uint64_t bytes, double baseline,
                    const std::function<Status()>& op) -> Status {
    KVF_ASSIGN_OR_RETURN(const double t, setup.time_calls(op, o.iterations));
    const double bw = bytes / t;
    table.add_row({name, fmt::format("{:.1f}", bytes / 1e6), fmt::format("{:.3f}", t * 1e3),
                   fmt::format("{:.2f}", bw / 1e9), fmt::format("{:.2f}", bw / baseline)});
    results["runs"].push_back({{"operation", name},
                               {"bytes", bytes},
                               {"seconds", t},
                               {"ratio_vs_bulk_copy", bw / baseline}});
    return ok_status();
  };
  KVF_RETURN_IF_ERROR(report("swap_blocks device->host", moved, d2h_bw,
                             [&] { return setup.backend->swap_blocks(dv, hv, moves); }));
  KVF_RETURN_IF_ERROR(report("swap_blocks host->device", moved, h2d_bw,
                             [&] { return setup.backend->swap_blocks(hv, dv, moves); }));
  if (!opts.swap_only) {
    const std::vector<GroupBlockCopies> block_batch = {{dv, pairs}};
    KVF_RETURN_IF_ERROR(report("copy_blocks", moved, d2d_bw,
                               [&] { return setup.backend->copy_blocks(block_batch); }));
    const std::vector<GroupTokenCopies> token_batch = {{dv, tokens}};
    KVF_RETURN_IF_ERROR(report("compact_tokens (half blocks)", moved / 2, d2d_bw,
                               [&] { return setup.backend->compact_tokens(token_batch); }));
  }
  fmt::print("{}", table.to_string());
  fmt::print(
      "Each operation moves randomly placed blocks in one call; the baseline is one bulk "
      "copy of the same bytes in the same direction.\n");
  return ok_status();
}

}  // namespace

void add_kernel_routines(CLI::App& app, RoutineFn& selected) {
  {
    auto opts = std::make_shared<AttentionOptions>();
    CLI::App* cmd =
        app.add_subcommand("attention", "Paged decode attention bandwidth per KV dtype");
    add_kernel_options(cmd, opts->kernel);
    cmd->add_option("--seqs", opts->seqs, "sequences in the batch")->check(CLI::PositiveNumber);
    cmd->add_option("--context", opts->context, "tokens per sequence")->check(CLI::PositiveNumber);
    cmd->callback([&selected, opts] {
      selected = [opts](nlohmann::json& r) { return run_attention(*opts, r); };
    });
  }
  {
    auto opts = std::make_shared<QuantOptions>();
    opts->kernel.dtypes = {"f16", "bf16", "fp8_e4m3", "int8", "int4", "int2"};
    CLI::App* cmd =
        app.add_subcommand("quant", "append_kv (quantize on write) throughput per KV dtype");
    add_kernel_options(cmd, opts->kernel);
    cmd->add_option("--tokens", opts->tokens, "tokens per append")->check(CLI::PositiveNumber);
    cmd->callback([&selected, opts] {
      selected = [opts](nlohmann::json& r) { return run_quant(*opts, r); };
    });
  }
  for (const bool swap_only : {false, true}) {
    auto opts = std::make_shared<CopyOptions>();
    opts->swap_only = swap_only;
    CLI::App* cmd =
        swap_only
            ? app.add_subcommand("swap",
                                 "swap_blocks bandwidth vs one bulk copy (device <-> host tier)")
            : app.add_subcommand("copy", "swap_blocks, copy_blocks and compact_tokens bandwidth");
    add_kernel_options(cmd, opts->kernel);
    cmd->add_option("--layers", opts->layers, "layers per block")->check(CLI::PositiveNumber);
    cmd->add_option("--blocks", opts->blocks, "blocks per pool")->check(CLI::PositiveNumber);
    cmd->add_option("--moves", opts->moves, "blocks moved per call")->check(CLI::PositiveNumber);
    cmd->callback(
        [&selected, opts] { selected = [opts](nlohmann::json& r) { return run_copy(*opts, r); }; });
  }
}

}  // namespace kvfabric::bench
