// kvfabric-serve: the control plane of a dp x tp job. Under mpirun every rank holds its shard of
// the KV cache on the backend and transport runtime.* picks (CUDA + NCCL on a GPU machine, else
// CPU + MPI); rank 0 also runs the Coordinator and serves the control protocol, and every step
// plan a scheduler asks for is executed by every rank before the reply. Without mpirun the
// coordinator serves alone (no KV is held). --dry-run prints the effective config and every
// rank's choice, and serves nothing.
//
// Faults: when a rank does not answer a plan within runtime.plan_deadline_ms, the control plane
// names it in every reply and on /health for server.fault_grace_ms, then the job ends with a
// non-zero status (MPI_Abort: MPI_Finalize would wait for that rank for ever). When a rank dies,
// mpirun ends the job itself and names the rank; the other ranks say when the launcher ended them.
//
// Stopping: SIGTERM or SIGINT drains. Rank 0 (or the lone coordinator) takes no new connections,
// answers the requests it has received, ends every rank and exits 0; the other ranks wait for
// rank 0 to end them. A second signal ends the process at once.
#include <fmt/format.h>
#include <unistd.h>
#include <CLI/CLI.hpp>

#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "kvfabric/common/logging.h"
#include "kvfabric/common/version.h"
#include "kvfabric/coordinator/coordinator.h"
#include "kvfabric/runtime/mpi_job.h"
#include "kvfabric/server/control_server.h"
#include "serve/rank_metrics.h"

namespace kvfabric {
namespace {

struct ServeOptions {
  std::string config_path;
  std::optional<std::string> address;
  std::optional<uint16_t> port;
  std::optional<uint16_t> metrics_port;
  bool allow_shutdown = false;
  bool dry_run = false;
};

// What a rank says when a signal arrives, composed once the rank knows who it is.
struct SignalWords {
  std::mutex mutex;
  std::string who = "kvfabric-serve";
  ControlServer* server = nullptr;  // rank 0 while it serves: the signal drains it
  bool coordinating = false;        // rank 0: a signal before the server exists drains at once
  bool drain_requested = false;
};
SignalWords g_signal;
std::atomic<uint64_t> g_step{0};

// SIGTERM and SIGINT go to one thread (they are blocked in every other, MPI's included, since
// threads inherit the mask), so that draining runs as ordinary code, not in a signal handler.
void block_stop_signals(sigset_t& set) {
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

void on_stop_signal(int signal) {
  std::lock_guard<std::mutex> lock(g_signal.mutex);
  const char* name = signal == SIGINT ? "SIGINT" : "SIGTERM";
  // Remembered whatever this process turns out to be: a signal during start-up drains rank 0 as
  // soon as its server exists.
  g_signal.drain_requested = true;
  if (g_signal.coordinating) {
    fmt::print(stderr,
               "kvfabric-serve: {} received {}: draining (no new connections, the requests "
               "received are answered), then every rank ends; if another rank of the job died, "
               "the launcher's message names it\nkvfabric-serve: {}: the last plan was step {}\n",
               g_signal.who, name, g_signal.who, g_step.load());
    if (g_signal.server != nullptr) g_signal.server->drain();
  } else {
    fmt::print(stderr,
               "kvfabric-serve: {} received {}: it waits for rank 0 to end the job (a second "
               "signal ends it now); if another rank of the job died, the launcher's message "
               "names it\n",
               g_signal.who, name);
  }
  std::fflush(stderr);
}

// Runs for the life of the process: the first signal drains, a second ends the process.
void watch_stop_signals(sigset_t set) {
  std::thread([set] {
    int signal = 0;
    if (sigwait(&set, &signal) != 0) return;
    on_stop_signal(signal);
    if (sigwait(&set, &signal) != 0) return;
    fmt::print(stderr, "kvfabric-serve: {}: a second signal: ending now\n", g_signal.who);
    std::fflush(stderr);
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
    ::signal(signal, SIG_DFL);
    raise(signal);
  }).detach();
}

void say_who(const std::string& who, bool coordinating) {
  std::lock_guard<std::mutex> lock(g_signal.mutex);
  g_signal.who = who;
  g_signal.coordinating = coordinating;
}

// The running server, drained at once when a signal came before it existed.
void serve_until_signalled(ControlServer* server) {
  std::lock_guard<std::mutex> lock(g_signal.mutex);
  g_signal.server = server;
  if (server != nullptr && g_signal.drain_requested) server->drain();
}

// Rank 0's role: the Coordinator behind the control server, until a shutdown or an error.
Status coordinate(const Config& config, const ServeOptions& options, MpiJob* job) {
  RankJob* ranks = job ? &job->ranks() : nullptr;
  KVF_ASSIGN_OR_RETURN(Coordinator coordinator, Coordinator::create(config));
  PlanSink sink;
  if (ranks) {
    sink = [&](const StepPlan& plan) {
      g_step = plan.step;
      return ranks->execute(plan);
    };
  }
  ControlProtocolOptions limits = ControlProtocolOptions::from(config.server);
  limits.allow_shutdown = options.allow_shutdown;
  if (ranks) {
    limits.backend = std::string(backend_kind_name(job->placement().backend));
    limits.extra_metrics = [ranks, tp = config.topology.tp] {
      return serve::rank_metrics_text(ranks->rank_stats(), tp);
    };
  }
  std::optional<TenantDirectory> tenants;
  if (!config.server.tenants_file.empty()) {
    KVF_ASSIGN_OR_RETURN(tenants, TenantDirectory::load(config.server.tenants_file));
    limits.tenants = &*tenants;
  }
  ControlProtocol protocol(coordinator, sink, limits);
  KVF_ASSIGN_OR_RETURN(std::unique_ptr<ControlServer> server,
                       ControlServer::create(protocol, ControlServerOptions::from(config.server)));
  // Scripts wait for this line (and read the ports from it when 0 was asked for).
  fmt::print("kvfabric-serve: control plane on {}:{} ({}, {}){}; model {}, dp {} x tp {}, {}\n",
             config.server.address, server->port(),
             config.server.tls_cert_file.empty() ? "plain TCP" : "TLS",
             tenants ? fmt::format("{} tenants, tokens required", tenants->entries().size())
                     : "no authentication",
             server->metrics_port()
                 ? fmt::format(", metrics and health on port {}", server->metrics_port())
                 : "",
             config.model.name, config.topology.dp, config.topology.tp,
             ranks ? fmt::format("{} MPI ranks execute the plans (rank 0: {})", ranks->world_size(),
                                 job->placement().describe())
                   : "coordinator only (no MPI launcher: no KV is held)");
  std::fflush(stdout);
  serve_until_signalled(server.get());
  const Status served = server->run();
  serve_until_signalled(nullptr);
  KVF_RETURN_IF_ERROR(served);
  fmt::print("kvfabric-serve: stopped after {} steps\n", coordinator.stats().steps);
  return coordinator.verify_integrity();
}

// Every rank says where it runs: rank, host, process id, its shard, backend, device, transport.
void announce(const MpiJob& job, const Config& config) {
  const int rank = job.rank();
  fmt::print("kvfabric-serve: {} (pid {}, {} ranks): replica {}, shard {}, {}\n", job.who(),
             getpid(), config.topology.dp * config.topology.tp, rank / config.topology.tp,
             rank % config.topology.tp, job.placement().describe());
  std::fflush(stdout);
  say_who(job.who(), rank == 0);
}

// --dry-run: the effective config and what each rank got, then nothing is served.
// What serving would read before it listens: the tenants file and the TLS files, so that a
// dry run refuses what a real one would.
Status check_server_files(const ServerConfig& server) {
  if (!server.tenants_file.empty()) {
    const Result<TenantDirectory> tenants = TenantDirectory::load(server.tenants_file);
    if (!tenants.ok()) return tenants.status();
  }
  for (const auto& [key, path] : {std::pair{"server.tls_cert_file", &server.tls_cert_file},
                                  std::pair{"server.tls_key_file", &server.tls_key_file}}) {
    if (!path->empty() && !std::ifstream(*path)) {
      return Status(ErrorCode::kIoError, std::string(key) + ": cannot read '" + *path + "'");
    }
  }
  return ok_status();
}

Status dry_run(const Config& config, MpiJob* job) {
  KVF_RETURN_IF_ERROR(check_server_files(config.server));
  std::vector<std::string> placements;
  if (job) {
    KVF_ASSIGN_OR_RETURN(placements, job->gather_placements());
    if (job->rank() != 0) return ok_status();
  } else {
    KVF_ASSIGN_OR_RETURN(const RankPlacement alone,
                         place_rank(config.runtime, observe_process(), "this process"));
    placements.push_back(alone.describe());
  }
  fmt::print("# kvfabric-serve --dry-run: the effective config\n{}\n", dump_config(config));
  if (!job) {
    fmt::print("# no MPI launcher: the coordinator would serve alone and hold no KV; under mpirun "
               "with {} ranks, a rank of this machine would get: {}\n",
               config.topology.dp * config.topology.tp, placements.front());
  }
  for (size_t r = 0; job && r < placements.size(); ++r) {
    const auto rank = static_cast<uint32_t>(r);
    fmt::print("# {}: replica {}, shard {}, {}\n",
               job->transport().describe(RankId{static_cast<int32_t>(rank)}),
               rank / config.topology.tp, rank % config.topology.tp, placements[r]);
  }
  fmt::print("# dry run: nothing served\n");
  std::fflush(stdout);
  return ok_status();
}

int serve_job(const ServeOptions& options) {
  auto fail = [](const Status& status) {
    fmt::print(stderr, "kvfabric-serve: {}\n", status.to_string());
    return 1;
  };
  auto config = load_config_file(options.config_path);
  if (!config.ok()) return fail(config.status());
  if (const Status env = apply_env_overrides(*config); !env.ok()) return fail(env);
  if (options.address) config->server.address = *options.address;
  if (options.port) config->server.port = *options.port;
  if (options.metrics_port) config->server.metrics_port = *options.metrics_port;
  if (const Status valid = validate(*config); !valid.ok()) return fail(valid);

  auto job = MpiJob::launch(*config);
  if (!job.ok()) return fail(job.status());
  if (options.dry_run) {
    const Status shown = dry_run(*config, job->get());
    return shown.ok() ? 0 : fail(shown);
  }
  if (!*job) {
    say_who("the coordinator", /*coordinating=*/true);
    const Status served = coordinate(*config, options, nullptr);
    return served.ok() ? 0 : fail(served);
  }
  MpiJob& mpi = **job;
  if (const Status started = mpi.start(*config); !started.ok()) {
    // The other ranks would wait for this one for ever (or, on rank 0, until the first deadline).
    fail(started);
    mpi.abort(1);
  }
  RankJob& ranks = mpi.ranks();
  announce(mpi, *config);
  if (!ranks.is_root()) {
    const Status served = ranks.serve();
    if (served.ok()) return 0;
    // The job cannot go on, and rank 0 decides how it ends: it names the fault to the clients
    // for server.fault_grace_ms, then ends every rank.
    fail(served);
    fmt::print(stderr, "kvfabric-serve: rank {} waits for rank 0 to end the job\n",
               ranks.transport().rank().value);
    while (true) pause();
  }
  const Status served = coordinate(*config, options, &mpi);
  if (!served.ok()) {
    // A rank that does not answer would hold MPI_Finalize (and mpirun) for ever.
    fail(served);
    mpi.abort(1);
  }
  const Status finished = ranks.finish();
  if (!finished.ok()) {
    fail(finished);
    mpi.abort(1);
  }
  return 0;
}

}  // namespace
}  // namespace kvfabric

int main(int argc, char** argv) {
  using namespace kvfabric;
  CLI::App app{
      "kvfabric-serve: the coordinator's control plane (JSON lines over TCP) with the ranks "
      "executing its step plans; run under mpirun with dp x tp ranks"};
  app.set_version_flag("--version", version_line("kvfabric-serve"));
  ServeOptions options;
  app.add_option("--config", options.config_path, "YAML config (model, cache, topology, server)")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("--address", options.address, "listen address (overrides server.address)");
  app.add_option("--port", options.port, "control port, 0 = any free port (overrides server.port)");
  app.add_option("--metrics-port", options.metrics_port,
                 "HTTP /metrics and /health port, 0 = none (overrides server.metrics_port)");
  app.add_flag("--allow-shutdown", options.allow_shutdown,
               "accept {\"op\": \"shutdown\"} from clients (ends every rank)");
  app.add_flag("--dry-run", options.dry_run,
               "print the effective config and each rank's backend, device and transport; serve "
               "nothing");
  CLI11_PARSE(app, argc, argv);

  if (const Status log = configure_logging_from_env(); !log.ok()) {
    fmt::print(stderr, "kvfabric-serve: {}\n", log.message());
    return 2;
  }
  // Before MPI starts its threads, so that they inherit the mask.
  sigset_t stop_signals;
  block_stop_signals(stop_signals);
  watch_stop_signals(stop_signals);
  try {
    return serve_job(options);
  } catch (const std::exception& e) {  // std::bad_alloc, say: named, not an abort's core dump
    fmt::print(stderr, "kvfabric-serve: stopped: {}\n", e.what());
    return 1;
  }
}
