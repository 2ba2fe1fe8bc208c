#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "kvfabric/config/config.h"

namespace kvfabric {
namespace {

const std::string kConfigDir = std::string(KVF_SOURCE_DIR) + "/configs/";

constexpr const char* kTiny = R"(
model: {name: t, num_layers: 2, num_query_heads: 4, num_kv_heads: 2, head_dim: 64, dtype: f32}
cache: {block_size: 16, num_blocks: 64, kv_dtype: f16}
topology: {tp: 1, dp: 1}
)";


TEST(Config, ShippedConfigsLoad) {
  const auto llama8b = load_config_file(kConfigDir + "llama3-8b.yaml");
  ASSERT_TRUE(llama8b.ok()) << llama8b.status();
  EXPECT_EQ(llama8b->model.num_layers, 32u);
  EXPECT_EQ(llama8b->model.num_kv_heads, 8u);
  EXPECT_EQ(block_layout(*llama8b)->block_bytes(), 2u << 20);
  EXPECT_EQ(resolved_num_blocks(*llama8b).value(), 20480u);

  const auto llama70b = load_config_file(kConfigDir + "llama3-70b-tp8.yaml");
  ASSERT_TRUE(llama70b.ok()) << llama70b.status();
  EXPECT_EQ(llama70b->topology.tp, 8u);
  EXPECT_EQ(local_kv_heads(llama70b->model, llama70b->topology), 1u);
  EXPECT_EQ(block_layout(*llama70b)->block_bytes(), 2u * 80 * 1 * 16 * 128 * 2);

  const auto tiny = load_config_file(kConfigDir + "tiny-cpu.yaml");
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  EXPECT_EQ(tiny->cache.num_blocks, 256u);
  EXPECT_EQ(tiny->cache.kv_dtype, DType::kF32);
  EXPECT_EQ(tiny->cache.eviction.window_tokens, 64u);
}

// Regression: a directory was read as an empty config ("the config is empty"), and /dev/zero
// until memory ran out.
TEST(Config, ADirectoryOrAnEndlessFileIsRefusedByName) {
  const auto directory = load_config_file(kConfigDir);
  EXPECT_EQ(directory.status().code(), ErrorCode::kIoError);
  EXPECT_THAT(directory.status().message(), ::testing::HasSubstr("is a directory"));
  const auto endless = load_config_file("/dev/zero");
  EXPECT_EQ(endless.status().code(), ErrorCode::kIoError);
  EXPECT_THAT(endless.status().message(), ::testing::HasSubstr("is larger than 16 MiB"));
}

// Every file shipped in configs/ (examples and docs use them; `cmake --install` installs them)
// loads, validates and has a valid block layout, so none goes stale unnoticed.
TEST(Config, EveryFileInConfigsLoads) {
  size_t files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(kConfigDir)) {
    if (!entry.is_regular_file()) continue;
    ++files;
    const std::string path = entry.path().string();
    EXPECT_EQ(entry.path().extension(), ".yaml") << path << ": configs/ holds only YAML configs";
    const auto config = load_config_file(path);
    ASSERT_TRUE(config.ok()) << path << ": " << config.status();
    EXPECT_TRUE(block_layout(*config).ok()) << path;
    EXPECT_TRUE(resolved_num_blocks(*config).ok()) << path;
  }
  EXPECT_GE(files, 4u);
}

TEST(Config, MissingFileIsIoError) {
  const auto missing = load_config_file(kConfigDir + "nope.yaml");
  EXPECT_EQ(missing.status().code(), ErrorCode::kIoError);
  EXPECT_NE(missing.status().message().find("nope.yaml"), std::string::npos);
}

TEST(Config, UnknownKeyNamesKeyLineAndAlternatives) {
  const auto bad = parse_config(
      "model: {num_layers: 2, num_query_heads: 4, num_kv_heads: 2, head_dim: 64}\n"
      "cache:\n  blok_size: 16\n  num_blocks: 4\n",
      "x.yaml");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), ErrorCode::kInvalidArgument);
  const std::string& msg = bad.status().message();
  EXPECT_NE(msg.find("x.yaml:3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cache.blok_size"), std::string::npos) << msg;
  EXPECT_NE(msg.find("block_size"), std::string::npos) << msg;

  const auto top = parse_config("modle: {}\n");
  EXPECT_NE(top.status().message().find("unknown key 'modle'"), std::string::npos);
}

TEST(Config, MalformedValuesAreErrors) {
  auto with = [](const std::string& cache) {
    return parse_config(
        "model: {num_layers: 2, num_query_heads: 4, num_kv_heads: 2, head_dim: 64}\n"
        "cache: {" +
        cache + "}\n");
  };
  EXPECT_NE(with("block_size: -1, num_blocks: 4").status().message().find("cache.block_size"),
            std::string::npos);
  EXPECT_NE(with("block_size: 5000, num_blocks: 4").status().message().find("[1, 4096]"),
            std::string::npos);
  EXPECT_NE(with("num_blocks: 4, kv_dtype: int3").status().message().find("int3"),
            std::string::npos);
  EXPECT_NE(with("num_blocks: 4, eviction: {threshold: 1.5}").status().message().find("[0, 1]"),
            std::string::npos);
  EXPECT_NE(with("num_blocks: 4, eviction: {strategy: random}").status().message().find("random"),
            std::string::npos);
  EXPECT_NE(with("num_blocks: 4, memory_budget: 1GiB").status().message().find("exactly one"),
            std::string::npos);
  EXPECT_NE(with("block_size: 16").status().message().find("exactly one"), std::string::npos);
  EXPECT_NE(with("num_blocks: [1, 2]").status().message().find("single value"), std::string::npos);
  EXPECT_NE(with("memory_budget: 1KiB").status().message().find("holds no block"),
            std::string::npos);
  EXPECT_EQ(parse_config("model: [").status().code(), ErrorCode::kParseError);
  EXPECT_EQ(parse_config("").status().code(), ErrorCode::kInvalidArgument);
}

TEST(Config, CrossFieldRules) {
  auto model = [](const std::string& m, const std::string& topo) {
    return parse_config("model: {" + m + "}\ncache: {num_blocks: 8}\ntopology: {" + topo + "}\n");
  };
  EXPECT_NE(model("num_layers: 2, num_query_heads: 6, num_kv_heads: 4, head_dim: 64", "tp: 1")
                .status()
                .message()
                .find("multiple of model.num_kv_heads"),
            std::string::npos);
  EXPECT_NE(model("num_layers: 2, num_query_heads: 6, num_kv_heads: 6, head_dim: 64", "tp: 4")
                .status()
                .message()
                .find("topology.tp"),
            std::string::npos);
  EXPECT_NE(model("num_layers: 2, num_query_heads: 4, num_kv_heads: 4, head_dim: 64, dtype: int8",
                  "tp: 1")
                .status()
                .message()
                .find("model.dtype"),
            std::string::npos);
  // Hkv < tp replicates each KV head on tp / Hkv shards.
  const auto replicated =
      model("num_layers: 2, num_query_heads: 8, num_kv_heads: 2, head_dim: 64", "tp: 8");
  ASSERT_TRUE(replicated.ok()) << replicated.status();
  EXPECT_EQ(local_kv_heads(replicated->model, replicated->topology), 1u);
}

TEST(Config, MemoryBudgetDerivesBlocks) {
  const auto config = parse_config(
      "model: {num_layers: 2, num_query_heads: 4, num_kv_heads: 2, head_dim: 64}\n"
      "cache: {block_size: 16, memory_budget: 1MiB, kv_dtype: f16}\n");
  ASSERT_TRUE(config.ok()) << config.status();
  // 2 layers * 2 (K, V) * 2 heads * 16 tokens * 64 * 2 B = 16 KiB per block.
  EXPECT_EQ(block_layout(*config)->block_bytes(), 16384u);
  EXPECT_EQ(resolved_num_blocks(*config).value(), 64u);
}

TEST(Config, EnvOverridesApplyAndValidate) {
  Config config = parse_config(kTiny).value();
  ASSERT_TRUE(apply_env_overrides(config, Environment({{"KVF_CACHE_BLOCK_SIZE", "32"},
                                                  {"KVF_CACHE_EVICTION_STRATEGY", "lfu"},
                                                  {"KVF_TOPOLOGY_DP", "4"},
                                                  {"KVF_UNRELATED", "x"}}))
                  .ok());
  EXPECT_EQ(config.cache.block_size, 32u);
  EXPECT_EQ(config.cache.eviction.strategy, EvictionPolicy::kLfu);
  EXPECT_EQ(config.topology.dp, 4u);

  const Config before = config;
  const Status malformed = apply_env_overrides(config, Environment({{"KVF_CACHE_NUM_BLOCKS", "lots"}}));
  EXPECT_EQ(malformed.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(malformed.message().find("KVF_CACHE_NUM_BLOCKS"), std::string::npos);
  const Status invalid = apply_env_overrides(
      config, Environment({{"KVF_CACHE_BLOCK_SIZE", "0"}, {"KVF_TOPOLOGY_TP", "2"}}));
  EXPECT_NE(invalid.message().find("cache.block_size"), std::string::npos);
  EXPECT_EQ(config.cache.block_size, before.cache.block_size);
  EXPECT_EQ(config.topology.tp, before.topology.tp);
}

TEST(Config, AMisspeltVariableIsAnErrorNamingTheKey) {
  Config config = parse_config(kTiny).value();
  const Config before = config;
  for (const auto& [name, closest] : {std::pair{"KVF_CAHCE_BLOCK_SIZE", "KVF_CACHE_BLOCK_SIZE"},
                                      std::pair{"KVF_CACHE_BLOKSIZE", "KVF_CACHE_BLOCK_SIZE"},
                                      std::pair{"KVF_SERVER_PROT", "KVF_SERVER_PORT"},
                                      std::pair{"KVF_TOPOLOGY_REPLICAS", "KVF_TOPOLOGY_TP"}}) {
    const Status s = apply_env_overrides(config, Environment{{name, "32"}, {"KVF_TOPOLOGY_DP", "2"}});
    EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << name;
    EXPECT_NE(s.message().find(std::string(name) + " is not a configuration variable (did you mean " +
                               closest + "?"),
              std::string::npos)
        << s;
    EXPECT_EQ(config.topology.dp, before.topology.dp);  // nothing applied
  }
  // kvfabric's other variables and unrelated ones are not config.
  EXPECT_TRUE(apply_env_overrides(config, Environment{{"KVF_LOG", "debug"}, {"KVF_CPU_ISA", "avx2"}}).ok());
  // The process environment is read by default.
  EXPECT_EQ(process_environment().count("PATH"), 0u);  // only KVF_ variables
}

TEST(Config, ADuplicateKeyIsAnErrorNamingBothLines) {
  const auto twice = parse_config(std::string(kTiny) + "cache: {block_size: 32, num_blocks: 8}\n",
                                  "dup.yaml");
  ASSERT_FALSE(twice.ok());
  EXPECT_NE(twice.status().message().find("dup.yaml:5: 'cache' appears twice (first on line 3)"),
            std::string::npos)
      << twice.status();
  const auto inner = parse_config(
      "model: {num_layers: 2, num_query_heads: 4, num_kv_heads: 2, head_dim: 64, num_layers: 4}\n"
      "cache: {num_blocks: 8}\n");
  ASSERT_FALSE(inner.ok());
  EXPECT_NE(inner.status().message().find("'model.num_layers' appears twice"), std::string::npos)
      << inner.status();
  // Regression: a dotted key set a nested one past the duplicate check (the later won).
  const auto dotted = parse_config(std::string(kTiny) + "model.num_layers: 8\n", "dot.yaml");
  EXPECT_THAT(dotted.status().message(),
              ::testing::HasSubstr("'model.num_layers' is a dotted key; nest it (model: {...})"));
}

// Every product of config sizes is checked: shapes whose bytes overflow 64 bits crashed the
// tools (SIGFPE dividing the memory budget by a block size of 0) or were accepted with a wrapped
// block size of 4 bytes.
TEST(Config, SizesThatOverflowAreRefusedNamingTheShape) {
  const std::vector<std::string> shapes = {
      "num_layers: 1073741824, num_query_heads: 1048576, num_kv_heads: 1048576, head_dim: 1024",
      "num_layers: 4294967295, num_query_heads: 4294967295, num_kv_heads: 4294967295, head_dim: 1024",
      "num_layers: 2147483648, num_query_heads: 2147483648, num_kv_heads: 2147483648, head_dim: 2",
  };
  for (const std::string& shape : shapes) {
    for (const char* size : {"memory_budget: 16GiB", "num_blocks: 8"}) {
      const auto parsed = parse_config("model: {" + shape + "}\ncache: {block_size: 4096, " + size +
                                       ", kv_dtype: int4}\n");
      ASSERT_FALSE(parsed.ok()) << shape;
      EXPECT_EQ(parsed.status().code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(parsed.status().message().find("model and cache shape: a KV block of"),
                std::string::npos)
          << parsed.status();
      EXPECT_NE(parsed.status().message().find("more than the 1099511627776 bytes (1 TiB)"),
                std::string::npos)
          << parsed.status();
    }
  }
  // A block within limits, but a pool whose bytes do not fit in 64 bits.
  const auto pool = parse_config(
      "model: {num_layers: 128, num_query_heads: 64, num_kv_heads: 64, head_dim: 1024}\n"
      "cache: {block_size: 4096, num_blocks: 4294967295, kv_dtype: f32}\n");
  ASSERT_FALSE(pool.ok());
  EXPECT_NE(pool.status().message().find(
                "cache.num_blocks 4294967295 x 274877906944-byte blocks is more than 2^64 bytes"),
            std::string::npos)
      << pool.status();
}

TEST(Config, DumpRoundTripsAndShowsDerivedValues) {
  Config config = load_config_file(kConfigDir + "llama3-70b-tp8.yaml").value();
  const std::string dumped = dump_config(config);
  EXPECT_NE(dumped.find("local_kv_heads: 1"), std::string::npos) << dumped;
  EXPECT_NE(dumped.find("block_bytes: 655360"), std::string::npos) << dumped;
  const auto reparsed = parse_config(dumped, "dump");
  ASSERT_TRUE(reparsed.ok()) << reparsed.status() << "\n" << dumped;
  EXPECT_EQ(dump_config(reparsed.value()), dumped);
}

TEST(Config, KeysAndEnvNames) {
  const auto keys = config_keys();
  EXPECT_EQ(keys.front(), "model.name");
  EXPECT_EQ(env_var_for_key("cache.eviction.threshold"), "KVF_CACHE_EVICTION_THRESHOLD");
}

TEST(Config, ServerSection) {
  const auto parsed = parse_config(std::string(kTiny) + R"(
server: {address: 0.0.0.0, port: 7100, metrics_port: 9464, max_request_bytes: 65536}
)");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->server.address, "0.0.0.0");
  EXPECT_EQ(parsed->server.port, 7100);
  EXPECT_EQ(parsed->server.metrics_port, 9464);
  EXPECT_EQ(parsed->server.max_request_bytes, 65536u);

  const auto defaults = parse_config(kTiny);
  ASSERT_TRUE(defaults.ok());
  EXPECT_EQ(defaults->server.address, "127.0.0.1");
  EXPECT_EQ(defaults->server.port, 7070);
  EXPECT_EQ(defaults->server.metrics_port, 0);

  const auto too_big = parse_config(std::string(kTiny) + "server: {port: 70000}\n");
  EXPECT_NE(too_big.status().message().find("server.port: 70000 is larger than 65535"),
            std::string::npos)
      << too_big.status();
  // Regression: only serving checked the address, so a dry run passed what a real one refused.
  const auto bogus = parse_config(std::string(kTiny) + "server: {address: bogus}\n");
  EXPECT_THAT(bogus.status().message(),
              ::testing::HasSubstr("server.address: 'bogus' is not an IP address"));
  EXPECT_TRUE(parse_config(std::string(kTiny) + "server: {address: '::1'}\n").ok());
  const auto same = parse_config(std::string(kTiny) + "server: {port: 9000, metrics_port: 9000}\n");
  EXPECT_NE(same.status().message().find("server.metrics_port (9000) must differ from server.port"),
            std::string::npos)
      << same.status();
  const auto tiny_lines = parse_config(std::string(kTiny) + "server: {max_request_bytes: 10}\n");
  EXPECT_NE(tiny_lines.status().message().find("server.max_request_bytes must be >= 256"),
            std::string::npos)
      << tiny_lines.status();
  const auto no_address = parse_config(std::string(kTiny) + "server: {address: ''}\n");
  EXPECT_FALSE(no_address.ok());

  Config config = *defaults;
  ASSERT_TRUE(apply_env_overrides(config, Environment({{"KVF_SERVER_METRICS_PORT", "9100"}})).ok());
  EXPECT_EQ(config.server.metrics_port, 9100);
}

TEST(Config, TenantsAndTls) {
  const auto parsed = parse_config(std::string(kTiny) + R"(
server: {tenants_file: /etc/kvfabric/tenants.yaml, tls_cert_file: a.crt, tls_key_file: a.key}
tenants: {max_blocks: 4096, max_host_blocks: 512, max_sequences: 64}
)");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->server.tenants_file, "/etc/kvfabric/tenants.yaml");
  EXPECT_EQ(parsed->server.tls_cert_file, "a.crt");
  EXPECT_EQ(parsed->tenants, (TenantQuota{4096, 512, 64}));
  const auto defaults = parse_config(kTiny);
  ASSERT_TRUE(defaults.ok());
  EXPECT_EQ(defaults->tenants, TenantQuota{});  // no limits
  EXPECT_TRUE(defaults->server.tenants_file.empty());
  // The dump reads back the same (empty paths included).
  const auto again = parse_config(dump_config(*parsed));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->tenants, parsed->tenants);
  EXPECT_EQ(again->server.tls_key_file, "a.key");
  const auto half = parse_config(std::string(kTiny) + "server: {tls_cert_file: a.crt}\n");
  ASSERT_FALSE(half.ok());
  EXPECT_NE(half.status().message().find("server.tls_cert_file and server.tls_key_file go together "
                                         "(the key is missing)"),
            std::string::npos)
      << half.status();
  Config config = *defaults;
  ASSERT_TRUE(apply_env_overrides(config, Environment({{"KVF_TENANTS_MAX_SEQUENCES", "8"}})).ok());
  EXPECT_EQ(config.tenants.max_sequences, 8u);
  // Host blocks count toward max_blocks, so a larger host limit contradicts it.
  const auto host_over_all =
      parse_config(std::string(kTiny) + "tenants: {max_blocks: 4, max_host_blocks: 8}\n");
  EXPECT_THAT(host_over_all.status().message(),
              ::testing::HasSubstr("tenants.max_host_blocks (8) exceeds max_blocks (4)"));
  EXPECT_TRUE(parse_config(std::string(kTiny) + "tenants: {max_host_blocks: 8}\n").ok());
}

// yaml-cpp reads a file's first document; a second one after '---' would be dropped unseen.
TEST(Config, ASecondYamlDocumentIsRefusedNamingItsLine) {
  const auto second = parse_config(std::string(kTiny) + "---\ncache: {num_blocks: 8}\n", "two.yaml");
  EXPECT_EQ(second.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(second.status().message(),
              ::testing::HasSubstr("two.yaml:5: a second YAML document starts here"));
  const auto after_end = parse_config(std::string(kTiny) + "...\ncache: {num_blocks: 8}\n", "end.yaml");
  EXPECT_THAT(after_end.status().message(), ::testing::HasSubstr("end.yaml:6: a second YAML"));
  EXPECT_FALSE(parse_config("---\n---\n" + std::string(kTiny)).ok());
  EXPECT_THAT(parse_config(std::string(kTiny) + "... {cache: {num_blocks: 8}}\n", "same.yaml")
                  .status()
                  .message(),
              ::testing::HasSubstr("same.yaml:5: a second YAML"));
  EXPECT_TRUE(parse_config("\xEF\xBB\xBF# a BOM first\n---\n" + std::string(kTiny)).ok());
  // One document, marked or not, with comments and markers' look-alikes inside content.
  EXPECT_TRUE(parse_config("%YAML 1.2\n--- # the tiny model\n" + std::string(kTiny) + "...\n# end\n").ok());
  EXPECT_TRUE(parse_config(std::string(kTiny) + "server: {tenants_file: ---x}\n").ok());
  EXPECT_TRUE(parse_config("--- {model: {num_layers: 2, num_query_heads: 4, num_kv_heads: 2, "
                           "head_dim: 64}, cache: {num_blocks: 8}}\n").ok());
  const auto indented = parse_config(
      "model:\n  name: |\n    ---\n    a\n  num_layers: 2\n  num_query_heads: 4\n"
      "  num_kv_heads: 2\n  head_dim: 64\ncache: {num_blocks: 8}\n");
  ASSERT_TRUE(indented.ok()) << indented.status();
  EXPECT_EQ(indented->model.name, "---\na\n");
}

// yaml-cpp stops at 2000 nested levels with the text "bad file".
TEST(Config, TooDeepANestingIsNamedWithItsLine) {
  const auto deep = parse_config(std::string(kTiny) + "server: " + std::string(3000, '[') +
                                     std::string(3000, ']') + "\n",
                                 "deep.yaml");
  EXPECT_EQ(deep.status().code(), ErrorCode::kParseError);
  EXPECT_THAT(deep.status().message(),
              ::testing::HasSubstr("deep.yaml:5: nested too deeply (yaml-cpp reads 2000 levels)"));
}

TEST(Config, QuantGroupSizeOnlyForIntegerFormats) {
  const auto floats = parse_config(
      "model: {num_layers: 2, num_query_heads: 4, num_kv_heads: 2, head_dim: 64}\n"
      "cache: {num_blocks: 8, kv_dtype: fp8_e4m3, quant_group_size: 32}\n");
  EXPECT_THAT(floats.status().message(),
              ::testing::HasSubstr("cache.quant_group_size (32) applies to the integer kv_dtypes "
                                   "int8, int4 and int2 only (got fp8_e4m3)"));
  EXPECT_TRUE(parse_config("model: {num_layers: 2, num_query_heads: 4, num_kv_heads: 2, "
                           "head_dim: 64}\ncache: {num_blocks: 8, kv_dtype: int4, "
                           "quant_group_size: 32}\n")
                  .ok());
}

TEST(Config, LimitsAndDeadlines) {
  const auto parsed = parse_config(std::string(kTiny) + R"(
server: {max_batch_requests: 64, max_reply_bytes: 65536, max_connections: 8, idle_timeout_ms: 0,
         fault_grace_ms: 100, event_queue_batches: 16}
coordinator: {max_sequences_per_replica: 512}
runtime: {plan_deadline_ms: 2500}
)");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->server.max_batch_requests, 64u);
  EXPECT_EQ(parsed->server.max_reply_bytes, 65536u);
  EXPECT_EQ(parsed->server.max_connections, 8u);
  EXPECT_EQ(parsed->server.idle_timeout_ms, 0u);
  EXPECT_EQ(parsed->server.fault_grace_ms, 100u);
  EXPECT_EQ(parsed->server.event_queue_batches, 16u);
  EXPECT_EQ(parsed->coordinator.max_sequences_per_replica, 512u);
  EXPECT_EQ(parsed->runtime.plan_deadline_ms, 2500u);

  const auto defaults = parse_config(kTiny);
  EXPECT_EQ(defaults->server.max_batch_requests, 1024u);
  EXPECT_EQ(defaults->server.max_reply_bytes, 8u << 20);
  EXPECT_EQ(defaults->server.max_connections, 256u);
  EXPECT_EQ(defaults->server.idle_timeout_ms, 300000u);
  EXPECT_EQ(defaults->server.event_queue_batches, 1024u);
  EXPECT_EQ(defaults->coordinator.max_sequences_per_replica, 4096u);
  EXPECT_EQ(defaults->runtime.plan_deadline_ms, 30000u);

  for (const auto& [yaml, message] :
       {std::pair{"server: {max_batch_requests: 0}", "server.max_batch_requests must be >= 1"},
        std::pair{"server: {max_reply_bytes: 100}", "server.max_reply_bytes must be >= 4096"},
        std::pair{"server: {max_connections: 0}", "server.max_connections must be >= 1"},
        std::pair{"server: {event_queue_batches: 0}", "server.event_queue_batches must be >= 1"},
        std::pair{"coordinator: {max_sequences_per_replica: 0}",
                  "coordinator.max_sequences_per_replica must be >= 1"}}) {
    const auto bad = parse_config(std::string(kTiny) + yaml + "\n");
    EXPECT_NE(bad.status().message().find(message), std::string::npos) << bad.status();
  }
  Config config = *defaults;
  ASSERT_TRUE(apply_env_overrides(config, Environment({{"KVF_RUNTIME_PLAN_DEADLINE_MS", "750"}})).ok());
  EXPECT_EQ(config.runtime.plan_deadline_ms, 750u);
}

TEST(Config, RuntimeBackendTransportAndDevice) {
  const auto defaults = parse_config(kTiny);
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->runtime.backend, BackendKind::kAuto);
  EXPECT_EQ(defaults->runtime.transport, TransportKind::kAuto);
  EXPECT_EQ(defaults->runtime.device, kLocalRankDevice);

  const auto parsed = parse_config(std::string(kTiny) + "runtime: {backend: cuda, transport: nccl, device: 3}\n");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->runtime.backend, BackendKind::kCuda);
  EXPECT_EQ(parsed->runtime.transport, TransportKind::kNccl);
  EXPECT_EQ(parsed->runtime.device, 3);
  // The dump reads back as the same config.
  const std::string dumped = dump_config(*parsed);
  EXPECT_NE(dumped.find("backend: cuda"), std::string::npos) << dumped;
  EXPECT_NE(dumped.find("device: 3"), std::string::npos) << dumped;
  const auto again = parse_config(dumped);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->runtime.device, 3);
  EXPECT_NE(dump_config(*defaults).find("device: local-rank"), std::string::npos);

  for (const auto& [yaml, message] :
       {std::pair{"runtime: {backend: tpu}",
                  "runtime.backend: unknown backend 'tpu' (expected auto, cpu or cuda)"},
        std::pair{"runtime: {transport: ucx}",
                  "runtime.transport: unknown transport 'ucx' (expected auto, mpi or nccl)"},
        std::pair{"runtime: {device: first}",
                  "runtime.device: 'first' is not local-rank or a device index"},
        std::pair{"runtime: {device: -2}", "runtime.device: '-2' is not local-rank"},
        std::pair{"runtime: {device: 4096}", "runtime.device must be local-rank or an index in [0, 1023] (got 4096)"},
        std::pair{"runtime: {backend: cpu, transport: nccl}",
                  "runtime.transport nccl moves GPU memory and needs runtime.backend cuda or auto "
                  "(got cpu)"}}) {
    const auto bad = parse_config(std::string(kTiny) + yaml + "\n");
    ASSERT_FALSE(bad.ok()) << yaml;
    EXPECT_NE(bad.status().message().find(message), std::string::npos) << bad.status();
  }

  Config config = *defaults;
  ASSERT_TRUE(apply_env_overrides(config, Environment({{"KVF_RUNTIME_BACKEND", "cpu"},
                                                       {"KVF_RUNTIME_TRANSPORT", "mpi"},
                                                       {"KVF_RUNTIME_DEVICE", "1"}}))
                  .ok());
  EXPECT_EQ(config.runtime.backend, BackendKind::kCpu);
  EXPECT_EQ(config.runtime.transport, TransportKind::kMpi);
  EXPECT_EQ(config.runtime.device, 1);
  // A refused override changes nothing.
  const Status refused =
      apply_env_overrides(config, Environment({{"KVF_RUNTIME_BACKEND", "cuda"},
                                               {"KVF_RUNTIME_TRANSPORT", "nccl"},
                                               {"KVF_RUNTIME_DEVICE", "gpu0"}}));
  EXPECT_NE(refused.message().find("KVF_RUNTIME_DEVICE"), std::string::npos) << refused;
  EXPECT_EQ(config.runtime.backend, BackendKind::kCpu);
  EXPECT_EQ(config.runtime.device, 1);
}

TEST(Config, ByteSizes) {
  EXPECT_EQ(parse_byte_size("1024").value(), 1024u);
  EXPECT_EQ(parse_byte_size("16GiB").value(), 16ull << 30);
  EXPECT_EQ(parse_byte_size("512 MiB").value(), 512ull << 20);
  EXPECT_EQ(parse_byte_size("1.5GB").value(), 1500000000ull);
  EXPECT_FALSE(parse_byte_size("12 parsecs").ok());
  EXPECT_FALSE(parse_byte_size("GiB").ok());
  EXPECT_FALSE(parse_byte_size("-5").ok());
  EXPECT_EQ(parse_byte_size("0").value(), 0u);
  // Under one byte floored to 0, which also means "no budget" and slipped past "set exactly one".
  EXPECT_THAT(parse_byte_size("0.5").status().message(),
              ::testing::HasSubstr("'0.5' is less than one byte"));
  const auto half_byte = parse_config(
      "model: {num_layers: 2, num_query_heads: 4, num_kv_heads: 2, head_dim: 64}\n"
      "cache: {num_blocks: 8, memory_budget: 0.5}\n");
  EXPECT_THAT(half_byte.status().message(), ::testing::HasSubstr("cache.memory_budget"));
}

}  // namespace
}  // namespace kvfabric
