// kvfabric-bench transfer: block migration bandwidth of MpiTransport::exchange_blocks (scattered
// blocks of a host arena) against raw MPI_Send/MPI_Recv of the same bytes from one contiguous
// buffer, measured in the same run. Needs mpirun with 2 or more ranks; ranks 0 and 1 move data,
// any others only join the barriers.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "bench/progress.h"
#include "bench/report.h"
#include "bench/routines.h"
#include "kvfabric/transport/mpi_transport.h"

namespace kvfabric::bench {
namespace {

struct TransferOptions {
  std::vector<uint64_t> block_bytes = {16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20};
  std::vector<uint64_t> blocks = {1, 16, 64, 256, 1024};
  uint64_t max_batch_bytes = 256ull << 20;
  uint64_t bytes_per_sample = 64ull << 20;
  int repeats = 5;
  int warmup = 2;
  //! Also measures MpiTransportOptions::block_message_min_bytes = this (0: not), for the points
  //! whose blocks are at least this large.
  uint64_t block_message_min_bytes = 1 << 20;
};

// The buffers of one (block size, block count) point on ranks 0 and 1.
struct Buffers {
  std::vector<uint8_t> send_arena, recv_arena;  // scattered blocks
  std::vector<uint8_t> send_flat, recv_flat;    // the raw baseline's contiguous buffers
  std::vector<uint8_t*> send_blocks, recv_blocks;
};

Buffers make_buffers(uint64_t block_bytes, uint64_t count, int rank, std::mt19937_64& rng) {
  Buffers b;
  const uint64_t bytes = block_bytes * count;
  // Distinct values on each rank and buffer, and every page touched before timing.
  b.send_arena.assign(bytes, static_cast<uint8_t>(0x10 + rank));
  b.recv_arena.assign(bytes, 0xEE);
  b.send_flat.assign(bytes, static_cast<uint8_t>(0x20 + rank));
  b.recv_flat.assign(bytes, 0xEE);
  for (uint64_t i = 0; i < count; ++i) {
    // Each block starts with its index, so a misplaced block is seen.
    std::memcpy(b.send_arena.data() + i * block_bytes, &i, std::min<uint64_t>(8, block_bytes));
  }
  // Block i of the batch is a random slot of the arena (a permutation: scattered, no overlap).
  std::vector<uint64_t> send_slots(count), recv_slots(count);
  std::iota(send_slots.begin(), send_slots.end(), uint64_t{0});
  std::iota(recv_slots.begin(), recv_slots.end(), uint64_t{0});
  std::shuffle(send_slots.begin(), send_slots.end(), rng);
  std::shuffle(recv_slots.begin(), recv_slots.end(), rng);
  for (uint64_t i = 0; i < count; ++i) {
    b.send_blocks.push_back(b.send_arena.data() + send_slots[i] * block_bytes);
    b.recv_blocks.push_back(b.recv_arena.data() + recv_slots[i] * block_bytes);
  }
  return b;
}

// Blocks of `b.recv_blocks` that do not hold what the peer's send_blocks held (the peer's
// arena bytes, its rank as filler, each block's index in its first bytes).
uint64_t wrong_blocks(const Buffers& b, uint64_t block_bytes, int peer,
                      const std::vector<uint64_t>& peer_slots) {
  uint64_t wrong = 0;
  std::vector<uint8_t> expected(block_bytes);
  for (uint64_t i = 0; i < b.recv_blocks.size(); ++i) {
    std::fill(expected.begin(), expected.end(), static_cast<uint8_t>(0x10 + peer));
    const uint64_t slot = peer_slots[i];
    std::memcpy(expected.data(), &slot, std::min<uint64_t>(8, block_bytes));
    if (std::memcmp(b.recv_blocks[i], expected.data(), block_bytes) != 0) ++wrong;
  }
  return wrong;
}

// Seconds per operation: `iterations` calls back to back, timed on every rank from a common
// barrier; the slowest rank's time counts.
Result<double> time_op(Transport& t, int iterations, const std::function<Status()>& op) {
  KVF_RETURN_IF_ERROR(t.barrier());
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iterations; ++i)
    KVF_RETURN_IF_ERROR(op());
  const auto ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count();
  std::vector<uint64_t> all;
  KVF_RETURN_IF_ERROR(t.all_gather(static_cast<uint64_t>(ns), all));
  return static_cast<double>(*std::max_element(all.begin(), all.end())) * 1e-9 / iterations;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Status run_transfer(const TransferOptions& o, nlohmann::json& results) {
  // Every point's bytes must be countable: a wrapped product sized the buffers 0 (SIGSEGV).
  for (const uint64_t block_bytes : o.block_bytes) {
    for (const uint64_t count : o.blocks) {
      if (count != 0 && block_bytes > UINT64_MAX / count) {
        return invalid_argument("--block-bytes " + std::to_string(block_bytes) + " x --blocks " +
                                std::to_string(count) + " is more than 2^64 bytes");
      }
    }
  }
  auto runtime = MpiRuntime::init(nullptr, nullptr);
  if (!runtime.ok()) {
    return Status(runtime.status().code(),
                  "transfer needs MPI (run it as `mpirun -n 2 kvfabric-bench transfer`): " +
                      runtime.status().message());
  }
  if (runtime->world_size() < 2) {
    return Status(ErrorCode::kInvalidOperation,
                  "transfer needs mpirun with at least 2 ranks (this run has " +
                      std::to_string(runtime->world_size()) +
                      "): mpirun -n 2 kvfabric-bench transfer");
  }
  // "exchange": one message per batch whatever its blocks (block_message_min_bytes = 0).
  KVF_ASSIGN_OR_RETURN(std::unique_ptr<Transport> t,
                       make_mpi_transport(*runtime, {.block_message_min_bytes = 0}));
  std::unique_ptr<Transport> per_block_t;
  if (o.block_message_min_bytes > 0) {
    KVF_ASSIGN_OR_RETURN(
        per_block_t,
        make_mpi_transport(*runtime, {.block_message_min_bytes = o.block_message_min_bytes}));
  }
  const int rank = t->rank().value;
  const bool active = rank < 2;
  const int peer = 1 - rank;
  const bool print = rank == 0;
  if (print) {
    fmt::print(
        "transfer: MpiTransport::exchange_blocks of scattered host blocks vs raw MPI_Send/"
        "MPI_Recv (MPI_Sendrecv both ways) of one contiguous buffer; ranks R0, R1 of {}; median "
        "of {} samples of >= {} MiB each\n\n",
        t->world_size(), o.repeats, o.bytes_per_sample >> 20);
  }
  Table table({"pattern", "block", "blocks", "MiB", "raw GB/s", "exchange GB/s", "ratio",
               "per-block GB/s", "ratio", "wrong"});
  results["routine"] = "transfer";
  results["world_size"] = t->world_size();
  results["runs"] = nlohmann::json::array();
  std::vector<double> big_ratios[2], big_per_block_ratios[2];
  std::mt19937_64 rng(1234 + rank);
  uint64_t points = 0;
  for (const uint64_t block_bytes : o.block_bytes) {
    for (const uint64_t count : o.blocks) points += block_bytes * count <= o.max_batch_bytes ? 2 : 0;
  }
  // Updated between points, outside every timed sample.
  ProgressReporter reporter("transfer", points, "points", print);
  uint64_t points_done = 0;

  for (const bool both : {false, true}) {
    for (const uint64_t block_bytes : o.block_bytes) {
      for (const uint64_t count : o.blocks) {
        const uint64_t bytes = block_bytes * count;
        if (bytes > o.max_batch_bytes) continue;
        Buffers b = active ? make_buffers(block_bytes, count, rank, rng) : Buffers{};
        // The peer's slot order, for checking what arrived (the slots are the blocks' indices).
        std::vector<uint64_t> my_slots(count), peer_slots(count);
        if (active) {
          for (uint64_t i = 0; i < count; ++i)
            my_slots[i] = (b.send_blocks[i] - b.send_arena.data()) / block_bytes;
        }
        for (int root = 0; root < 2; ++root) {
          std::vector<uint8_t> slots(count * 8);
          if (rank == root) std::memcpy(slots.data(), my_slots.data(), slots.size());
          KVF_RETURN_IF_ERROR(t->broadcast(slots, RankId{root}));
          if (rank == 1 - root) std::memcpy(peer_slots.data(), slots.data(), slots.size());
        }
        const bool sends = active && (rank == 0 || both);
        const bool receives = active && (rank == 1 || both);
        const BlockBatch send{RankId{peer}, b.send_blocks, block_bytes};
        const BlockBatch recv{RankId{peer}, b.recv_blocks, block_bytes};
        auto exchange_on = [&](Transport& via) {
          return via.exchange_blocks(
              sends ? std::span(&send, 1) : std::span<const BlockBatch>(),
              receives ? std::span(&recv, 1) : std::span<const BlockBatch>());
        };
        auto exchange = [&] { return exchange_on(*t); };
        const bool with_per_block =
            per_block_t != nullptr && block_bytes >= o.block_message_min_bytes && count > 1;
        auto exchange_per_block = [&] { return exchange_on(*per_block_t); };
        MpiRawTransfer raw;
        raw.bytes = active ? bytes : 0;
        raw.both_directions = both;
        raw.a_to_b = raw.b_to_a = b.send_flat.data();
        raw.a_from_b = raw.b_from_a = b.recv_flat.data();
        auto baseline = [&] { return mpi_raw_transfer(*t, raw); };

        const int iterations = static_cast<int>(
            std::clamp<uint64_t>(o.bytes_per_sample / std::max<uint64_t>(bytes, 1), 1, 1000));
        for (int w = 0; w < o.warmup; ++w) {
          KVF_RETURN_IF_ERROR(exchange());
          KVF_RETURN_IF_ERROR(baseline());
          if (with_per_block) KVF_RETURN_IF_ERROR(exchange_per_block());
        }
        // Alternating samples, so drift on a shared machine hits all alike.
        std::vector<double> ex_times, raw_times, pb_times;
        for (int r = 0; r < o.repeats; ++r) {
          KVF_ASSIGN_OR_RETURN(const double tr, time_op(*t, iterations, baseline));
          KVF_ASSIGN_OR_RETURN(const double te, time_op(*t, iterations, exchange));
          raw_times.push_back(tr);
          ex_times.push_back(te);
          if (with_per_block) {
            KVF_ASSIGN_OR_RETURN(const double tp, time_op(*t, iterations, exchange_per_block));
            pb_times.push_back(tp);
          }
        }
        const uint64_t wrong_here = receives ? wrong_blocks(b, block_bytes, peer, peer_slots) : 0;
        std::vector<uint64_t> wrong_all;
        KVF_RETURN_IF_ERROR(t->all_gather(wrong_here, wrong_all));
        const uint64_t wrong = std::accumulate(wrong_all.begin(), wrong_all.end(), uint64_t{0});
        const double ex_bw = bytes / median(ex_times);
        const double raw_bw = bytes / median(raw_times);
        const double ratio = ex_bw / raw_bw;
        const double pb_bw = with_per_block ? bytes / median(pb_times) : 0.0;
        if (bytes >= (1u << 20)) {
          big_ratios[both].push_back(ratio);
          if (with_per_block) big_per_block_ratios[both].push_back(pb_bw / raw_bw);
        }
        const std::string pattern = both ? "R0<->R1" : "R0->R1";
        table.add_row(
            {pattern, fmt::format("{} KiB", block_bytes >> 10), std::to_string(count),
             fmt::format("{:.2f}", bytes / double(1 << 20)), fmt::format("{:.2f}", raw_bw / 1e9),
             fmt::format("{:.2f}", ex_bw / 1e9), fmt::format("{:.2f}", ratio),
             with_per_block ? fmt::format("{:.2f}", pb_bw / 1e9) : "-",
             with_per_block ? fmt::format("{:.2f}", pb_bw / raw_bw) : "-", std::to_string(wrong)});
        nlohmann::json run = {{"pattern", both ? "both_directions" : "one_direction"},
                              {"block_bytes", block_bytes},
                              {"blocks", count},
                              {"bytes", bytes},
                              {"iterations", iterations},
                              {"exchange_seconds", median(ex_times)},
                              {"raw_seconds", median(raw_times)},
                              {"exchange_bytes_per_s", ex_bw},
                              {"raw_bytes_per_s", raw_bw},
                              {"ratio", ratio},
                              {"wrong_blocks", wrong}};
        if (with_per_block) {
          run["per_block_seconds"] = median(pb_times);
          run["per_block_bytes_per_s"] = pb_bw;
          run["per_block_ratio"] = pb_bw / raw_bw;
        }
        results["runs"].push_back(std::move(run));
        reporter.update(++points_done, [&] {
          return fmt::format("{} {} KiB x {}", pattern, block_bytes >> 10, count);
        });
        if (wrong != 0) {
          return Status(ErrorCode::kDataLoss,
                        fmt::format("transfer: {} blocks of {} bytes arrived wrong ({}, {} "
                                    "blocks per batch)",
                                    wrong, block_bytes, pattern, count));
        }
      }
    }
  }
  reporter.finish();
  if (print) {
    fmt::print("{}", table.to_string());
    for (const bool both : {false, true}) {
      const char* name = both ? "R0<->R1" : "R0->R1";
      const char* key = both ? "both_directions" : "one_direction";
      for (const bool per_block : {false, true}) {
        const auto& r = per_block ? big_per_block_ratios[both] : big_ratios[both];
        if (r.empty()) continue;
        const double mean = std::accumulate(r.begin(), r.end(), 0.0) / r.size();
        fmt::print("{} {}: batches >= 1 MiB: mean ratio to raw {:.2f}, min {:.2f} ({} points)\n",
                   name, per_block ? "per-block" : "exchange", mean,
                   *std::min_element(r.begin(), r.end()), r.size());
        results[fmt::format("{}_{}_ratio_mean_1mib", key, per_block ? "per_block" : "exchange")] =
            mean;
      }
    }
    fmt::print(
        "GB/s = batch bytes / time per call (per direction; both ways moves twice that in "
        "total). exchange: one message per batch (block_message_min_bytes = 0); per-block: "
        "block_message_min_bytes = {} (blocks at least that large, more than one per batch; "
        "the transport's default is 1 MiB). "
        "wrong = received blocks not bit-exact.\n",
        o.block_message_min_bytes);
  } else {
    results = nlohmann::json();  // only rank 0 reports (and writes --json)
  }
  return ok_status();
}

}  // namespace

void add_transfer_routine(CLI::App& app, RoutineFn& selected) {
  auto opts = std::make_shared<TransferOptions>();
  CLI::App* cmd = app.add_subcommand(
      "transfer", "MPI block migration bandwidth vs raw MPI_Send/Recv (run under mpirun -n 2)");
  cmd->add_option("--block-bytes", opts->block_bytes, "block sizes in bytes (comma separated)")
      ->delimiter(',')
      ->check(CLI::PositiveNumber);
  cmd->add_option("--blocks", opts->blocks, "blocks per batch (comma separated)")
      ->delimiter(',')
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-batch-bytes", opts->max_batch_bytes,
                  "skip points whose batch is larger (memory: 4 batches per rank)");
  cmd->add_option("--bytes-per-sample", opts->bytes_per_sample,
                  "bytes each timed sample moves (sets the calls per sample, 1..1000)");
  cmd->add_option("--repeats", opts->repeats, "timed samples per point (the median counts)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--warmup", opts->warmup, "untimed calls per point");
  cmd->add_option("--block-message-min-bytes", opts->block_message_min_bytes,
                  "also measure per-block messages for blocks at least this large (0: off)");
  cmd->callback([&selected, opts] {
    selected = [opts](nlohmann::json& r) { return run_transfer(*opts, r); };
  });
}

}  // namespace kvfabric::bench
