#include <fmt/format.h>

#include <memory>

#include "bench/routines.h"
#include "kvfabric/config/config.h"

namespace kvfabric::bench {

void add_config_routine(CLI::App& app, RoutineFn& selected) {
  auto path = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("config", "Print the effective config with derived values");
  cmd->add_option("config", *path, "YAML config, e.g. configs/llama3-8b.yaml")->required();
  cmd->callback([&selected, path] {
    selected = [path](nlohmann::json& results) -> Status {
      KVF_ASSIGN_OR_RETURN(Config config, load_config_file(*path));
      KVF_RETURN_IF_ERROR(apply_env_overrides(config));
      const std::string dump = dump_config(config);
      fmt::print("{}", dump);
      results["routine"] = "config";
      results["config"] = dump;
      return ok_status();
    };
  });
}

}  // namespace kvfabric::bench
