// kvfabric-serve: the control plane of a dp x tp job. Under mpirun every rank holds its shard of
// the KV cache (CPU backend, MPI transport); rank 0 also runs the Coordinator and serves the
// control protocol, and every step plan a scheduler asks for is broadcast to the ranks and
// executed before the reply. Without mpirun the coordinator serves alone (no KV is held).
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <cstdio>
#include <memory>
#include <optional>

#include "bench/plan_executors.h"
#include "kvfabric/common/logging.h"
#include "kvfabric/coordinator/coordinator.h"
#include "kvfabric/server/control_server.h"

namespace kvfabric {
namespace {

struct ServeOptions {
  std::string config_path;
  std::optional<std::string> address;
  std::optional<uint16_t> port;
  std::optional<uint16_t> metrics_port;
  bool allow_shutdown = false;
};

// Rank 0's role: the Coordinator behind the control server, until a shutdown or an error.
Status coordinate(const Config& config, const ServeOptions& options,
                  bench::PlanExecutors* executors) {
  KVF_ASSIGN_OR_RETURN(Coordinator coordinator, Coordinator::create(config));
  PlanSink sink;
  if (executors)
    sink = [&](const StepPlan& plan) { return executors->broadcast_and_execute(plan); };
  ControlProtocolOptions limits = ControlProtocolOptions::from(config.server);
  limits.allow_shutdown = options.allow_shutdown;
  ControlProtocol protocol(coordinator, sink, limits);
  KVF_ASSIGN_OR_RETURN(std::unique_ptr<ControlServer> server,
                       ControlServer::create(protocol, ControlServerOptions::from(config.server)));
  // Scripts wait for this line (and read the ports from it when 0 was asked for).
  fmt::print(
      "kvfabric-serve: control plane on {}:{}{}; model {}, dp {} x tp {}, {}\n",
      config.server.address, server->port(),
      server->metrics_port() ? fmt::format(", metrics on port {}", server->metrics_port()) : "",
      config.model.name, config.topology.dp, config.topology.tp,
      executors
          ? fmt::format("{} MPI ranks execute the plans (CPU backend)", executors->world_size())
          : "coordinator only (no MPI launcher: no KV is held)");
  std::fflush(stdout);
  KVF_RETURN_IF_ERROR(server->run());
  fmt::print("kvfabric-serve: stopped after {} steps\n", coordinator.stats().steps);
  return coordinator.verify_integrity();
}

Status serve(const ServeOptions& options) {
  KVF_ASSIGN_OR_RETURN(Config config, load_config_file(options.config_path));
  KVF_RETURN_IF_ERROR(apply_env_overrides(config));
  if (options.address) config.server.address = *options.address;
  if (options.port) config.server.port = *options.port;
  if (options.metrics_port) config.server.metrics_port = *options.metrics_port;
  KVF_RETURN_IF_ERROR(validate(config));

  KVF_ASSIGN_OR_RETURN(const std::unique_ptr<bench::MpiPlanJob> job,
                       bench::MpiPlanJob::launch(config.topology));
  if (!job) return coordinate(config, options, nullptr);
  bench::PlanExecutors& executors = job->executors();
  KVF_RETURN_IF_ERROR(executors.start(config));
  if (!executors.is_root()) return executors.serve();
  // Rank 0. Whatever happens here, the other ranks are released at the end.
  const Status served = coordinate(config, options, &executors);
  const Status finished = executors.finish();
  return served.ok() ? finished : served;
}

}  // namespace
}  // namespace kvfabric

int main(int argc, char** argv) {
  using namespace kvfabric;
  CLI::App app{
      "kvfabric-serve: the coordinator's control plane (JSON lines over TCP) with the ranks "
      "executing its step plans; run under mpirun with dp x tp ranks"};
  ServeOptions options;
  app.add_option("--config", options.config_path, "YAML config (model, cache, topology, server)")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("--address", options.address, "listen address (overrides server.address)");
  app.add_option("--port", options.port, "control port, 0 = any free port (overrides server.port)");
  app.add_option("--metrics-port", options.metrics_port,
                 "Prometheus /metrics port, 0 = none (overrides server.metrics_port)");
  app.add_flag("--allow-shutdown", options.allow_shutdown,
               "accept {\"op\": \"shutdown\"} from clients (ends every rank)");
  CLI11_PARSE(app, argc, argv);

  if (const Status log = configure_logging_from_env(); !log.ok()) {
    fmt::print(stderr, "kvfabric-serve: {}\n", log.message());
    return 2;
  }
  if (const Status status = serve(options); !status.ok()) {
    fmt::print(stderr, "kvfabric-serve: {}\n", status.to_string());
    return 1;
  }
  return 0;
}
