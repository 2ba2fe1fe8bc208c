// YAML loading and dumping; the only place that includes yaml-cpp.
#include <yaml-cpp/yaml.h>

#include <map>
#include <set>
#include <sstream>
#include <string>

#include "common/checked_math.h"
#include "common/yaml_documents.h"
#include "common/yaml_error.h"
#include "kvfabric/common/text_file.h"
#include "config/config_fields.h"
#include "kvfabric/config/config.h"

namespace kvfabric {
namespace {

std::string where(std::string_view source, const YAML::Node& node) {
  return std::string(source) + ":" + std::to_string(node.Mark().line + 1);
}

// The keys directly under `prefix` ("cache." -> block_size, num_blocks, eviction, ...).
std::string known_children(std::string_view prefix) {
  std::set<std::string> names;
  for (const auto& field : detail::config_fields()) {
    if (field.key.substr(0, prefix.size()) != prefix) continue;
    const std::string_view rest = field.key.substr(prefix.size());
    names.emplace(rest.substr(0, rest.find('.')));
  }
  std::string out;
  for (const auto& name : names)
    out += (out.empty() ? "" : ", ") + name;
  return out;
}

bool is_section(std::string_view path) {
  const std::string prefix = std::string(path) + ".";
  for (const auto& field : detail::config_fields()) {
    if (field.key.substr(0, prefix.size()) == prefix) return true;
  }
  return false;
}

Status apply_map(const YAML::Node& map, const std::string& prefix, std::string_view source,
                 Config& config) {
  std::map<std::string, int> first_line;  // keys of this mapping: YAML would let the last win
  for (const auto& item : map) {
    const std::string name = item.first.as<std::string>();
    const std::string path = prefix + name;
    // A dotted key would name a key of a nested mapping too, and the later of the two would win.
    if (name.find('.') != std::string::npos) {
      return Status(ErrorCode::kInvalidArgument,
                    where(source, item.first) + ": '" + name + "' is a dotted key; nest it (" +
                        name.substr(0, name.find('.')) + ": {...}) as the other keys are");
    }
    const auto [seen, fresh] = first_line.emplace(name, item.first.Mark().line + 1);
    if (!fresh) {
      return Status(ErrorCode::kInvalidArgument,
                    where(source, item.first) + ": '" + path + "' appears twice (first on line " +
                        std::to_string(seen->second) + ")");
    }
    const YAML::Node& value = item.second;
    const bool section = is_section(path);
    const bool leaf = detail::find_config_field(path) != nullptr;
    if (!section && !leaf) {
      const std::string parent =
          prefix.empty() ? "the top level" : "'" + prefix.substr(0, prefix.size() - 1) + "'";
      return Status(ErrorCode::kInvalidArgument, where(source, item.first) + ": unknown key '" +
                                                     path + "' (known keys in " + parent + ": " +
                                                     known_children(prefix) + ")");
    }
    if (section) {
      if (!value.IsMap()) {
        return Status(ErrorCode::kInvalidArgument,
                      where(source, value) + ": '" + path + "' must be a mapping of keys");
      }
      KVF_RETURN_IF_ERROR(apply_map(value, path + ".", source, config));
      continue;
    }
    if (!value.IsScalar()) {
      return Status(ErrorCode::kInvalidArgument,
                    where(source, item.first) + ": '" + path + "' needs a single value");
    }
    const Status status = detail::find_config_field(path)->set(config, value.Scalar());
    if (!status.ok()) {
      return Status(status.code(), where(source, value) + ": " + status.message());
    }
  }
  return ok_status();
}

// Sets the dotted `key` ("cache.eviction.threshold") under `node`, creating the maps on the way.
void set_path(YAML::Node node, std::string_view key, const std::string& value) {
  const size_t dot = key.find('.');
  if (dot == std::string_view::npos) {
    node[std::string(key)] = value;
    return;
  }
  set_path(node[std::string(key.substr(0, dot))], key.substr(dot + 1), value);
}

}  // namespace

Result<Config> parse_config(std::string_view yaml_text, std::string_view source) {
  KVF_RETURN_IF_ERROR(detail::check_single_yaml_document(yaml_text, source));
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml_text));
  } catch (const YAML::Exception& e) {
    return detail::yaml_parse_error(e, source);
  }
  Config config;
  if (root.IsNull()) {
    return Status(ErrorCode::kInvalidArgument, std::string(source) + ": the config is empty");
  }
  if (!root.IsMap()) {
    return Status(ErrorCode::kInvalidArgument,
                  where(source, root) + ": the config must be a mapping (model, cache, topology)");
  }
  try {
    KVF_RETURN_IF_ERROR(apply_map(root, "", source, config));
  } catch (const YAML::Exception& e) {
    return detail::yaml_parse_error(e, source);
  }
  const Status status = validate(config);
  if (!status.ok()) return Status(status.code(), std::string(source) + ": " + status.message());
  return config;
}

Result<Config> load_config_file(const std::string& path) {
  KVF_ASSIGN_OR_RETURN(const std::string text, read_text_file(path, "config file"));
  return parse_config(text, path);
}

std::string dump_config(const Config& config) {
  YAML::Node root(YAML::NodeType::Map);  // a map from the start, so copies of the handle share it
  for (const auto& field : detail::config_fields())
    set_path(root, field.key, field.get(config));
  YAML::Emitter out;
  out << root;
  std::ostringstream text;
  text << out.c_str() << "\n";

  text << "# derived:\n";
  text << "#   local_kv_heads: " << local_kv_heads(config.model, config.topology)
       << " (num_kv_heads " << config.model.num_kv_heads << " over tp " << config.topology.tp
       << ")\n";
  text << "#   world_size: " << config.topology.tp * config.topology.dp << "\n";
  auto layout = block_layout(config);
  if (!layout.ok()) {
    text << "#   block_layout: invalid (" << layout.status().message() << ")\n";
    return text.str();
  }
  text << "#   block_bytes: " << layout->block_bytes() << " (" << layout->to_string() << ")\n";
  auto blocks = resolved_num_blocks(config);
  if (blocks.ok()) {
    const auto bytes = detail::checked_product({blocks.value(), layout->block_bytes()});
    text << "#   num_blocks: " << blocks.value() << " per rank ("
         << blocks.value() * config.cache.block_size << " tokens, "
         << (bytes ? std::to_string(*bytes) : std::string("more than 2^64")) << " bytes)\n";
  } else {
    text << "#   num_blocks: invalid (" << blocks.status().message() << ")\n";
  }
  return text.str();
}

}  // namespace kvfabric
