#include "kvfabric/server/control_protocol.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <numeric>
#include <optional>
#include <span>

#include "kvfabric/common/version.h"
#include "kvfabric/server/metrics.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using testing::serving_config;

Coordinator make(const Config& config) {
  auto c = Coordinator::create(config);
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(c).value();
}

using testing::token_run;

json call(ControlProtocol& protocol, const json& request) {
  return json::parse(protocol.handle(request.dump()));
}

// The error code of a refused reply ("" when the reply is ok).
std::string error_code(const json& reply) {
  return reply.at("ok").get<bool>() ? "" : reply.at("error").at("code").get<std::string>();
}

std::vector<uint32_t> blocks_of(const json& list) {
  return list.get<std::vector<uint32_t>>();
}

std::vector<uint32_t> ids(std::span<const BlockId> blocks) {
  std::vector<uint32_t> out;
  for (BlockId b : blocks)
    out.push_back(b.value);
  return out;
}

TEST(ControlProtocolTest, HelloDescribesTheJob) {
  Coordinator c = make(serving_config(2, 2, 4, 2, 32, 8));
  ControlProtocol protocol(c);
  const json reply = call(protocol, {{"op", "hello"}, {"id", "h1"}});
  EXPECT_EQ(reply["ok"], true);
  EXPECT_EQ(reply["id"], "h1");
  EXPECT_EQ(reply["protocol"], ControlProtocol::kVersion);
  EXPECT_EQ(reply["version"], std::string(version()));
  EXPECT_EQ(reply["model"], "serving-test");
  EXPECT_EQ(reply["dp"], 2);
  EXPECT_EQ(reply["tp"], 2);
  EXPECT_EQ(reply["block_size"], 16);
  EXPECT_EQ(reply["block_bytes"], c.block_bytes());
}

// The same requests through the protocol and through the C++ API give the same placements and
// plans: the protocol adds nothing to the coordinator's decisions.
TEST(ControlProtocolTest, RequestsMatchTheInProcessApi) {
  const Config config = serving_config(2, 1, 4, 2, 16, 8);
  Coordinator remote = make(config);
  Coordinator local = make(config);
  ControlProtocol protocol(remote);

  auto check_step = [&] {
    const json reply = call(protocol, {{"op", "step"}});
    ASSERT_EQ(reply["ok"], true) << reply;
    const auto plan = local.step();
    ASSERT_TRUE(plan.ok());
    EXPECT_EQ(reply["step"], plan->step);
    ASSERT_EQ(reply["tables"].size(), plan->tables.size());
    for (size_t i = 0; i < plan->tables.size(); ++i) {
      EXPECT_EQ(reply["tables"][i]["seq"], plan->tables[i].seq.value);
      EXPECT_EQ(reply["tables"][i]["replica"], plan->tables[i].replica);
      EXPECT_EQ(reply["tables"][i]["num_tokens"], plan->tables[i].num_tokens);
      EXPECT_EQ(blocks_of(reply["tables"][i]["blocks"]), ids(plan->tables[i].blocks));
    }
    EXPECT_EQ(reply["ops"]["migrate"], plan->count(StepPlan::OpKind::kMigrate));
    EXPECT_EQ(reply["ops"]["swap_out"], plan->count(StepPlan::OpKind::kSwapOut));
    EXPECT_EQ(reply["ops"]["copy"], plan->count(StepPlan::OpKind::kCopy));
    EXPECT_EQ(reply["released"].size(), plan->released.size());
  };

  for (uint64_t s = 1; s <= 3; ++s) {
    const auto prompt = token_run(40, 1000);  // a shared prefix: later ones hit the cache
    const json reply = call(protocol, {{"op", "admit"}, {"seq", s}, {"tokens", prompt}});
    ASSERT_EQ(reply["ok"], true) << reply;
    const auto placed = local.admit(SeqId{s}, prompt);
    ASSERT_TRUE(placed.ok());
    EXPECT_EQ(reply["replica"], placed->replica);
    EXPECT_EQ(reply["cached_tokens"], placed->cached_tokens);
    EXPECT_EQ(reply["migrated_tokens"], placed->migrated_tokens);
    EXPECT_EQ(blocks_of(reply["blocks"]), ids(placed->blocks));
    check_step();
  }
  ASSERT_EQ(call(protocol, {{"op", "append"}, {"seq", 2}, {"num_tokens", 9}})["ok"], true);
  ASSERT_TRUE(local.append(SeqId{2}, 9).ok());
  const json forked = call(protocol, {{"op", "fork"}, {"src", 2}, {"dst", 7}, {"replica", 1}});
  ASSERT_EQ(forked["ok"], true) << forked;
  EXPECT_EQ(forked["replica"], 1);
  ASSERT_TRUE(local.fork(SeqId{2}, SeqId{7}, 1).ok());
  ASSERT_EQ(call(protocol, {{"op", "set_priority"}, {"seq", 7}, {"priority", 2}})["ok"], true);
  ASSERT_TRUE(local.set_priority(SeqId{7}, 2).ok());
  ASSERT_EQ(call(protocol, {{"op", "free"}, {"seq", 1}})["ok"], true);
  ASSERT_TRUE(local.free(SeqId{1}).ok());
  check_step();

  const json query = call(protocol, {{"op", "query"}, {"seq", 7}});
  ASSERT_EQ(query["ok"], true) << query;
  EXPECT_EQ(query["replica"], 1);
  EXPECT_EQ(query["swapped"], false);
  EXPECT_EQ(blocks_of(query["blocks"]), ids(local.blocks_of(SeqId{7})));

  const json stats = call(protocol, {{"op", "stats"}});
  EXPECT_EQ(stats["admitted"], local.stats().admitted);
  EXPECT_EQ(stats["local_hit_tokens"], local.stats().local_hit_tokens);
  EXPECT_EQ(stats["migrated_blocks"], local.stats().migrated_blocks);
  EXPECT_EQ(stats["steps"], local.stats().steps);
  ASSERT_EQ(stats["replicas"].size(), 2u);
  for (uint32_t r = 0; r < 2; ++r) {
    EXPECT_EQ(stats["replicas"][r]["free_blocks"],
              local.replica_stats(r).free_blocks);
    EXPECT_EQ(stats["replicas"][r]["sequences"], local.replica_stats(r).sequences);
  }
  EXPECT_TRUE(remote.verify_integrity().ok());
  EXPECT_EQ(protocol.stats().ok[static_cast<size_t>(ControlOp::kAdmit)], 3u);
  EXPECT_EQ(protocol.stats().ok[static_cast<size_t>(ControlOp::kStep)], 4u);
}

// admission_costs answers what admit would weigh, without admitting: every replica's cost and
// where admit would go.
TEST(ControlProtocolTest, AdmissionCostsSayWhereAdmitWouldGo) {
  const Config config = serving_config(3, 1, 4, 2, 16, 8);
  Coordinator c = make(config);
  ControlProtocol protocol(c);
  const auto prompt = token_run(48, 500);
  ASSERT_EQ(call(protocol, {{"op", "admit"}, {"seq", 1}, {"tokens", prompt}})["ok"], true);
  ASSERT_EQ(call(protocol, {{"op", "step"}})["ok"], true);
  const uint32_t holder = *c.replica_of(SeqId{1});

  const json reply =
      call(protocol, {{"op", "admission_costs"}, {"tokens", prompt}, {"priority", 0}});
  ASSERT_EQ(reply["ok"], true) << reply;
  const auto costs = c.admission_costs(prompt).value();
  ASSERT_EQ(reply["replicas"].size(), 3u);
  for (uint32_t r = 0; r < 3; ++r) {
    const json& got = reply["replicas"][r];
    EXPECT_EQ(got["replica"], r);
    EXPECT_EQ(got["accepts"], costs[r].accepts);
    EXPECT_EQ(got["cached_tokens"], costs[r].cached_tokens);
    EXPECT_EQ(got["migrated_tokens"], costs[r].migrated_tokens);
    EXPECT_EQ(got["cost"].get<double>(), costs[r].cost);
    EXPECT_EQ(got["load"].get<double>(), costs[r].load);
    EXPECT_EQ(got["blocks_needed"], costs[r].blocks_needed);
    EXPECT_EQ(got["blocks_available"], costs[r].blocks_available);
    EXPECT_EQ(got["has_room"], costs[r].has_room());
    if (r == holder) {
      EXPECT_TRUE(got["migration_source"].is_null());
    } else {
      EXPECT_EQ(got["migration_source"], holder);
    }
  }
  const json chosen = reply["chosen"];
  ASSERT_TRUE(chosen.is_number());
  EXPECT_EQ(chosen, cheapest_with_room(costs).value());
  // Nothing was admitted; admit then goes where the reply said.
  EXPECT_EQ(c.stats().admitted, 1u);
  const json admitted = call(protocol, {{"op", "admit"}, {"seq", 2}, {"tokens", prompt}});
  EXPECT_EQ(admitted["replica"], chosen);

  // Its fields are checked like admit's, and it refuses what admit would refuse for the prompt.
  const json empty = call(protocol, {{"op", "admission_costs"}, {"tokens", json::array()}});
  EXPECT_EQ(empty["ok"], false);
  EXPECT_THAT(empty["error"]["message"].get<std::string>(), HasSubstr("the prompt is empty"));
  const json unknown =
      call(protocol, {{"op", "admission_costs"}, {"tokens", prompt}, {"seq", 3}});
  EXPECT_EQ(unknown["ok"], false);
  EXPECT_THAT(unknown["error"]["message"].get<std::string>(), HasSubstr("seq"));
  EXPECT_EQ(protocol.stats().ok[static_cast<size_t>(ControlOp::kAdmissionCosts)], 1u);
  EXPECT_EQ(protocol.stats().failed[static_cast<size_t>(ControlOp::kAdmissionCosts)], 2u);
}

TEST(ControlProtocolTest, BadRequestsNameTheProblemAndChangeNothing) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 8, 0));
  ControlProtocol protocol(c);
  ASSERT_EQ(call(protocol, {{"op", "admit"}, {"seq", 1}, {"tokens", token_run(20, 5)}})["ok"], true);
  ASSERT_EQ(call(protocol, {{"op", "step"}})["ok"], true);
  const auto free_before = c.replica_stats(0).free_blocks;

  struct Case {
    std::string line;
    std::string code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"{\"op\": \"admit\", ", "ParseError", "not valid JSON"},
      // Regression: the parser stopped at a NUL byte, so this line admitted S5.
      {std::string("{\"op\": \"admit\", \"seq\": 5, \"tokens\": [1]}\0 }}} garbage", 45),
       "ParseError", "NUL byte at offset 40"},
      {"42", "InvalidArgument", "JSON object (got number)"},
      {"{\"seq\": 1}", "InvalidArgument", "\"op\" string"},
      {"{\"op\": 3}", "InvalidArgument", "\"op\" string"},
      {"{\"op\": \"evict_everything\"}", "InvalidArgument", "unknown op \"evict_everything\""},
      // A client's text is quoted back cut to 64 bytes: a reply must not echo a huge line.
      {"{\"op\": \"" + std::string(5000, 'x') + "\"}", "InvalidArgument",
       "unknown op \"" + std::string(64, 'x') + "\"..."},
      {"{\"op\": \"stats\", \"" + std::string(5000, 'y') + "\": 1}", "InvalidArgument",
       "stats: unknown field \"" + std::string(64, 'y') + "\"..."},
      {"{\"op\": \"admit\", \"seq\": 2, \"tokens\": [1], \"prioirty\": 1}", "InvalidArgument",
       "admit: unknown field \"prioirty\""},
      {"{\"op\": \"admit\", \"tokens\": [1]}", "InvalidArgument", "admit: missing field \"seq\""},
      {"{\"op\": \"admit\", \"seq\": -2, \"tokens\": [1]}", "InvalidArgument",
       "admit: field \"seq\" must be an integer in [0, 9223372036854775807] (got -2)"},
      {"{\"op\": \"admit\", \"seq\": 1.5, \"tokens\": [1]}", "InvalidArgument", "(got 1.5)"},
      {"{\"op\": \"admit\", \"seq\": \"2\", \"tokens\": [1]}", "InvalidArgument", "(got \"2\")"},
      {"{\"op\": \"admit\", \"seq\": \"a\\\"b\", \"tokens\": [1]}", "InvalidArgument",
       "(got \"a\\\"b\")"},  // quoted as JSON, escapes kept
      {"{\"op\": \"admit\", \"seq\": \"" + std::string(5000, 'z') + "\", \"tokens\": [1]}",
       "InvalidArgument", "(got \"" + std::string(64, 'z') + "\"...)"},
      {"{\"op\": \"admit\", \"seq\": 9223372036854775808, \"tokens\": [1]}", "InvalidArgument",
       "field \"seq\""},
      {"{\"op\": \"admit\", \"seq\": 2, \"tokens\": 7}", "InvalidArgument", "array of token ids"},
      {"{\"op\": \"admit\", \"seq\": 2, \"tokens\": [1, 4294967296]}", "InvalidArgument",
       "element 1 must be a token id"},
      {"{\"op\": \"admit\", \"seq\": 2, \"tokens\": []}", "InvalidArgument", ""},
      {"{\"op\": \"admit\", \"seq\": 1, \"tokens\": [1]}", "", ""},
      {"{\"op\": \"admit\", \"seq\": 2, \"tokens\": " + json(token_run(200, 1)).dump() + "}",
       "OutOfMemory", ""},
      {"{\"op\": \"append\", \"seq\": 99, \"num_tokens\": 1}", "SequenceNotFound", "S99"},
      {"{\"op\": \"append\", \"seq\": 1}", "InvalidArgument", "missing field \"num_tokens\""},
      {"{\"op\": \"fork\", \"src\": 1, \"dst\": 1}", "", ""},
      {"{\"op\": \"fork\", \"src\": 1, \"dst\": 3, \"replica\": 5}", "InvalidArgument",
       "fork S1 -> S3: replica 5 does not exist (dp 1); nothing was changed"},
      {"{\"op\": \"free\", \"seq\": 99}", "SequenceNotFound", ""},
      {"{\"op\": \"set_priority\", \"seq\": 8, \"priority\": 1}", "SequenceNotFound", "S8"},
      {"{\"op\": \"set_priority\", \"seq\": 1}", "InvalidArgument", "missing field \"priority\""},
      {"{\"op\": \"query\", \"seq\": 99}", "SequenceNotFound", ""},
      {"{\"op\": \"step\", \"now\": 1}", "InvalidArgument", "step: unknown field \"now\""},
      {"{\"op\": \"shutdown\"}", "InvalidOperation", "does not accept shutdown"},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.line);
    const json reply = json::parse(protocol.handle(k.line));
    ASSERT_EQ(reply["ok"], false) << reply;
    if (!k.code.empty()) {
      EXPECT_EQ(error_code(reply), k.code) << reply;
    }
    EXPECT_THAT(reply["error"]["message"].get<std::string>(), HasSubstr(k.message));
  }
  EXPECT_EQ(c.replica_stats(0).free_blocks, free_before);
  EXPECT_EQ(c.stats().admitted, 1u);
  EXPECT_FALSE(c.replica_of(SeqId{2}).has_value());
  EXPECT_FALSE(c.replica_of(SeqId{3}).has_value());
  EXPECT_FALSE(c.replica_of(SeqId{5}).has_value());  // the line with a NUL byte
  EXPECT_TRUE(c.verify_integrity().ok());
  const json plan = call(protocol, {{"op", "step"}});
  EXPECT_TRUE(plan["tables"].empty()) << plan;
  EXPECT_TRUE(plan["ops"]["copy"] == 0) << plan;
  EXPECT_EQ(protocol.stats().malformed, 7u);
  EXPECT_FALSE(protocol.shutdown_requested());
}

// Token compression over the control plane: admit takes a policy, the step replies carry the
// score requests and compactions, and report_attention hands the shards' summed scores in.
// PyramidKV over the wire: the step that compacts lists a compaction and a table per layer
// group, each naming its group; whole-block tables name none.
TEST(ControlProtocolTest, PyramidStepsNameEachLayerGroupsTableAndCompaction) {
  Config config = serving_config(1, 1, 4, 2, 32, 0);
  config.cache.layers_per_group = 1;
  Coordinator c = make(config);
  ControlProtocol protocol(c);
  const json admitted = call(protocol, {{"op", "admit"},
                                        {"seq", 1},
                                        {"tokens", token_run(80, 3)},
                                        {"compression",
                                         {{"policy", "pyramid"},
                                          {"budget_tokens", 24},
                                          {"window_tokens", 8},
                                          {"beta", 3}}}});
  ASSERT_EQ(admitted["ok"], true) << admitted;
  json step = call(protocol, {{"op", "step"}});  // the prefill
  EXPECT_FALSE(step["tables"][0].contains("layer_group")) << step;
  step = call(protocol, {{"op", "step"}});  // prefilled: the votes are wanted
  ASSERT_EQ(step["score_requests"].size(), 1u) << step;
  std::vector<double> scores(80, 0.5);
  ASSERT_EQ(call(protocol, {{"op", "report_attention"},
                            {"seq", 1},
                            {"step", step["step"]},
                            {"scores", scores}})["ok"],
            true);
  step = call(protocol, {{"op", "step"}});
  ASSERT_EQ(step["compactions"].size(), 2u) << step;
  ASSERT_EQ(step["tables"].size(), 2u) << step;
  for (uint32_t g = 0; g < 2; ++g) {
    EXPECT_EQ(step["compactions"][g]["layer_group"], g) << step;
    EXPECT_EQ(step["tables"][g]["layer_group"], g) << step;
    EXPECT_EQ(step["tables"][g]["first_block"], 0) << step;
  }
  // Budgets of 40 and 8 of 80 tokens for an average of 24 (beta 3), kept in whole blocks of
  // the groups' 32-token view short of the prompt: 48 and 16, the newest on equal votes.
  EXPECT_EQ(step["tables"][0]["num_tokens"], 48) << step;
  EXPECT_EQ(step["tables"][1]["num_tokens"], 16) << step;
  EXPECT_EQ(step["compactions"][0]["kept"], json::parse("[[32, 48]]")) << step;
  EXPECT_EQ(step["compactions"][1]["kept"], json::parse("[[64, 16]]")) << step;
  EXPECT_TRUE(c.verify_integrity().ok());
}

TEST(ControlProtocolTest, CompressionIsAdmittedScoredAndCompactedOverTheWire) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 32, 0));
  ControlProtocol protocol(c);
  const std::vector<TokenId> prompt = token_run(80, 3);
  const json admitted = call(protocol, {{"op", "admit"},
                                        {"seq", 1},
                                        {"tokens", prompt},
                                        {"compression",
                                         {{"policy", "h2o"},
                                          {"budget_tokens", 32},
                                          {"recent_tokens", 8},
                                          {"interval_steps", 1}}}});
  ASSERT_EQ(admitted["ok"], true) << admitted;
  json step = call(protocol, {{"op", "step"}});  // the prefill
  ASSERT_EQ(step["ok"], true) << step;
  EXPECT_TRUE(step["score_requests"].empty());
  ASSERT_EQ(call(protocol, {{"op", "append"}, {"seq", 1}, {"num_tokens", 1}})["ok"], true);
  step = call(protocol, {{"op", "step"}});  // prefilled: the next compaction wants scores
  ASSERT_EQ(step["score_requests"], json::parse(R"([{"seq": 1, "replica": 0}])"));
  const uint64_t scored_step = step["step"];
  std::vector<double> scores(81, 0.0);
  scores[5] = scores[6] = 3.0;
  const json late = call(protocol, {{"op", "report_attention"},
                                    {"seq", 1},
                                    {"step", scored_step - 1},
                                    {"scores", scores}});
  EXPECT_EQ(error_code(late), "InvalidArgument") << late;
  EXPECT_THAT(late["error"]["message"].get<std::string>(),
              HasSubstr("its outstanding request is step " + std::to_string(scored_step)));
  ASSERT_EQ(call(protocol, {{"op", "report_attention"},
                            {"seq", 1},
                            {"step", scored_step},
                            {"scores", scores}})["ok"],
            true);
  ASSERT_EQ(call(protocol, {{"op", "append"}, {"seq", 1}, {"num_tokens", 1}})["ok"], true);
  step = call(protocol, {{"op", "step"}});
  ASSERT_EQ(step["compactions"].size(), 1u) << step;
  const json& compaction = step["compactions"][0];
  EXPECT_EQ(compaction["tokens_before"], 82);
  uint64_t kept = 0;
  for (const json& range : compaction["kept"]) kept += range[1].get<uint64_t>();
  EXPECT_EQ(kept, 32u);
  EXPECT_EQ(step["tables"][0]["num_tokens"], 32);
  // The heavy tokens 5 and 6 stay in their slots; the newest tokens fill the dropped ones.
  EXPECT_EQ(compaction["kept"][0], json::array({52, 5}));
  EXPECT_EQ(compaction["kept"][1], json::array({5, 2}));

  // Refusals name the field and change nothing.
  const auto refused = [&](const json& request, const std::string& says) {
    const json reply = call(protocol, request);
    EXPECT_EQ(error_code(reply), "InvalidArgument") << reply;
    EXPECT_THAT(reply["error"]["message"].get<std::string>(), HasSubstr(says)) << reply;
  };
  const json base = {{"op", "admit"}, {"seq", 2}, {"tokens", prompt}};
  for (const auto& [compression, says] : std::vector<std::pair<json, std::string>>{
           {json::array(), "must be an object"},
           {{{"budget_tokens", 8}}, "missing field \"policy\""},
           {{{"policy", "pyramid"}, {"budget_tokens", 64}}, "makes no groups"},
           {{{"policy", "pyramid"}, {"budget_tokens", 64}, {"beta", 0.5}}, "compression.beta"},
           {{{"policy", "h2o"}, {"budget_ratio", "half"}}, "budget_ratio"},
           {{{"policy", "h2o"}, {"budget_ratio", 0.5}, {"budget_tokens", 8}}, "set only one"},
           {{{"policy", "h2o"}, {"budget_tokens", 8}, {"speed", 1}}, "unknown field \"speed\""}}) {
    json request = base;
    request["compression"] = compression;
    refused(request, says);
  }
  EXPECT_FALSE(c.replica_of(SeqId{2}).has_value());
  const uint64_t last_step = step["step"];
  refused({{"op", "report_attention"}, {"seq", 1}, {"step", last_step}, {"scores", {1.0, -2.0}}},
          "element 1");
  refused({{"op", "report_attention"}, {"seq", 1}, {"step", last_step}, {"scores", "none"}},
          "array of numbers");
  refused({{"op", "report_attention"}, {"seq", 1}, {"scores", {1.0}}}, "missing field \"step\"");
  const json unknown = call(
      protocol, {{"op", "report_attention"}, {"seq", 9}, {"step", last_step}, {"scores", {1.0}}});
  EXPECT_EQ(error_code(unknown), "SequenceNotFound") << unknown;
}


TEST(ControlProtocolTest, BatchesRunInOrderAndEchoIds) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 0));
  ControlProtocol protocol(c);
  const json batch =
      json::array({{{"op", "admit"}, {"id", 1}, {"seq", 5}, {"tokens", token_run(10, 0)}},
                   {{"op", "append"}, {"id", "two"}, {"seq", 5}, {"num_tokens", 3}},
                   {{"op", "free"}, {"id", json::array({3})}, {"seq", 6}},
                   "not a request",
                   {{"op", "step"}, {"id", nullptr}}});
  const json replies = json::parse(protocol.handle(batch.dump()));
  ASSERT_TRUE(replies.is_array());
  ASSERT_EQ(replies.size(), 5u);
  EXPECT_EQ(replies[0]["id"], 1);
  EXPECT_EQ(replies[0]["ok"], true);
  EXPECT_EQ(replies[1]["id"], "two");
  EXPECT_EQ(replies[1]["ok"], true);
  EXPECT_EQ(error_code(replies[2]), "InvalidArgument");  // ids are scalars
  EXPECT_THAT(replies[2]["error"]["message"].get<std::string>(),
              HasSubstr("\"id\" must be a string, number, boolean or null (got an array)"));
  EXPECT_EQ(error_code(replies[3]), "InvalidArgument");
  EXPECT_TRUE(replies[4]["id"].is_null());
  ASSERT_EQ(replies[4]["tables"].size(), 1u);
  EXPECT_EQ(replies[4]["tables"][0]["num_tokens"], 13);
}

// Copying or printing a JSON value recurses per nesting level; a request is never echoed or
// printed whole, so a deeply nested one is refused without exhausting the stack.
TEST(ControlProtocolTest, DeeplyNestedRequestsAreRefusedWithoutRecursion) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 0));
  ControlProtocol protocol(c);
  const size_t depth = 300000;
  const std::string nested = std::string(depth, '[') + std::string(depth, ']');
  for (const std::string& line : {"{\"op\": \"hello\", \"id\": " + nested + "}",
                                  "{\"op\": \"admit\", \"seq\": " + nested + ", \"tokens\": [1]}",
                                  "{\"op\": \"admit\", \"seq\": 1, \"tokens\": [" + nested + "]}",
                                  "{\"op\": \"hello\", \"extra\": " + nested + "}", nested}) {
    const json reply = json::parse(protocol.handle(line));
    const json& first = reply.is_array() ? reply.at(0) : reply;
    EXPECT_EQ(error_code(first), "InvalidArgument") << first;
  }
  EXPECT_EQ(c.stats().admitted, 0u);
}

// A duplicate key is quoted back cut to 64 bytes; cut inside a character, the reply was invalid
// UTF-8 and serializing it threw, ending the process. Every reply must be valid JSON.
TEST(ControlProtocolTest, AQuotedKeyIsNeverCutInsideACharacter) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 0));
  ControlProtocol protocol(c);
  const std::string key = std::string(63, 'a') + "\xC3\xA9";  // "é" straddles byte 64
  const std::string line = "{\"" + key + "\": 1, \"" + key + "\": 1}";
  const std::string reply = protocol.handle(line);
  ASSERT_TRUE(json::accept(reply)) << reply;
  const json parsed = json::parse(reply);
  EXPECT_EQ(error_code(parsed), "InvalidArgument");
  EXPECT_THAT(parsed["error"]["message"].get<std::string>(),
              HasSubstr("\"" + std::string(63, 'a') + "\" appears twice"));
}

// nlohmann keeps the last of two equal keys; a request that says seq twice means two things.
TEST(ControlProtocolTest, AKeyGivenTwiceIsRefused) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 0));
  ControlProtocol protocol(c);
  for (const std::string& line :
       {std::string(R"({"op": "admit", "seq": 1, "tokens": [1], "seq": 2})"),
        std::string(R"({"op": "admit", "op": "free", "seq": 1, "tokens": [1]})"),
        std::string(R"([{"op": "hello"}, {"op": "admit", "seq": 3, "tokens": [1], "tokens": [2]}])"),
        std::string(R"({"op": "hello", "id": 1, "x": {"a": 1, "a": 2}})")}) {
    const json reply = json::parse(protocol.handle(line));
    EXPECT_EQ(error_code(reply), "InvalidArgument") << line;
    EXPECT_THAT(reply["error"]["message"].get<std::string>(), HasSubstr("appears twice in one object"));
  }
  EXPECT_EQ(c.stats().admitted, 0u);
  // Equal keys in different objects are fine.
  const json batch = json::parse(protocol.handle(R"([{"op": "hello", "id": 1}, {"op": "hello", "id": 2}])"));
  EXPECT_EQ(batch[1]["ok"], true);
}

TEST(ControlProtocolTest, ABatchOverTheRequestLimitRunsNothing) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 0));
  ControlProtocol protocol(c, nullptr, ControlProtocolOptions{.max_batch_requests = 4});
  json batch = json::array();
  for (uint64_t s = 1; s <= 5; ++s) batch.push_back({{"op", "admit"}, {"seq", s}, {"tokens", token_run(4, 0)}});
  const json reply = json::parse(protocol.handle(batch.dump()));
  ASSERT_TRUE(reply.is_object()) << reply;
  EXPECT_EQ(error_code(reply), "ResourceExhausted");
  EXPECT_THAT(reply["error"]["message"].get<std::string>(),
              HasSubstr("a batch holds at most 4 requests (server.max_batch_requests); this one has 5 "
                        "and none of them ran"));
  EXPECT_EQ(c.stats().admitted, 0u);
  batch.erase(batch.size() - 1);
  EXPECT_EQ(json::parse(protocol.handle(batch.dump())).size(), 4u);
  EXPECT_EQ(c.stats().admitted, 4u);
}

// A 1 MiB batch of stats asked for 21 MB of replies: a batch stops running requests once its
// reply has reached server.max_reply_bytes, and says so in each reply it did not run.
TEST(ControlProtocolTest, ABatchStopsOnceItsReplyIsFull) {
  Coordinator c = make(serving_config(4, 1, 4, 2, 16, 0));
  ControlProtocol protocol(c, nullptr, ControlProtocolOptions{.max_reply_bytes = 4096});
  json batch = json::array();
  for (int i = 0; i < 1000; ++i) batch.push_back({{"op", "stats"}, {"id", i}});
  batch.push_back({{"op", "admit"}, {"id", "last"}, {"seq", 1}, {"tokens", token_run(4, 0)}});
  const std::string text = protocol.handle(batch.dump());
  const json replies = json::parse(text);
  ASSERT_EQ(replies.size(), 1001u);
  size_t ran = 0;
  while (replies[ran]["ok"] == true) ++ran;
  EXPECT_GT(ran, 1u);
  EXPECT_LT(ran, 20u);
  for (size_t i = ran; i < replies.size(); ++i) {
    ASSERT_EQ(error_code(replies[i]), "ResourceExhausted") << i;
    EXPECT_THAT(replies[i]["error"]["message"].get<std::string>(),
                HasSubstr("not run: the batch's reply reached 4096 bytes (server.max_reply_bytes)"));
  }
  EXPECT_EQ(replies[1000]["id"], "last");
  EXPECT_EQ(c.stats().admitted, 0u);  // the admit after the limit did not run
  EXPECT_EQ(protocol.stats().limited, 1001u - ran);
  // What the reply costs is bounded by the limit plus a short refusal per request.
  EXPECT_LT(text.size(), 4096u + 1001u * 160u);
  // A single request's reply is never cut.
  EXPECT_EQ(call(protocol, {{"op", "stats"}})["ok"], true);
}

TEST(ControlProtocolTest, HealthSaysWhenAStepRunsAndWhyChangesStopped) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 0));
  ControlHealth during;
  ControlProtocol* self = nullptr;
  bool fail = false;
  ControlProtocol protocol(c, [&](const StepPlan&) {
    during = self->health();  // the sink runs without the protocol's lock
    return fail ? Status(ErrorCode::kUnavailable, "rank 1 (node-b) did not answer step 1")
                : ok_status();
  });
  self = &protocol;
  EXPECT_TRUE(protocol.health().ok);
  EXPECT_FALSE(protocol.health().stepping);
  ASSERT_EQ(call(protocol, {{"op", "step"}})["ok"], true);
  EXPECT_TRUE(during.stepping);
  EXPECT_EQ(during.steps, 1u);
  EXPECT_FALSE(protocol.health().stepping);
  fail = true;
  EXPECT_EQ(error_code(call(protocol, {{"op", "step"}})), "Unavailable");
  const ControlHealth after = protocol.health();
  EXPECT_FALSE(after.ok);
  EXPECT_THAT(after.problem, HasSubstr("rank 1 (node-b) did not answer step 1"));
  EXPECT_EQ(after.steps, 2u);
}

TEST(ControlProtocolTest, PlansReachTheSinkBeforeTheReply) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 0));
  std::vector<StepPlan> delivered;
  ControlProtocol protocol(c, [&](const StepPlan& plan) {
    delivered.push_back(plan);
    return ok_status();
  });
  ASSERT_EQ(call(protocol, {{"op", "admit"}, {"seq", 1}, {"tokens", token_run(17, 0)}})["ok"], true);
  const json reply = call(protocol, {{"op", "step"}});
  ASSERT_EQ(delivered.size(), 1u);
  EXPECT_EQ(reply["step"], delivered[0].step);
  ASSERT_EQ(delivered[0].tables.size(), 1u);
  EXPECT_EQ(blocks_of(reply["tables"][0]["blocks"]), ids(delivered[0].tables[0].blocks));
}

TEST(ControlProtocolTest, AFailedSinkStopsChangesButNotReads) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 0));
  ControlProtocol protocol(
      c, [](const StepPlan&) { return Status(ErrorCode::kInternal, "rank 3: MPI_Bcast failed"); });
  ASSERT_EQ(call(protocol, {{"op", "admit"}, {"seq", 1}, {"tokens", token_run(17, 0)}})["ok"], true);
  const json step = call(protocol, {{"op", "step"}});
  EXPECT_EQ(error_code(step), "Unavailable");
  EXPECT_THAT(
      step["error"]["message"].get<std::string>(),
      HasSubstr("step 0's plan did not reach the ranks (Internal: rank 3: MPI_Bcast failed)"));
  EXPECT_EQ(protocol.failure().code(), ErrorCode::kUnavailable);
  EXPECT_EQ(error_code(call(protocol, {{"op", "admit"}, {"seq", 2}, {"tokens", token_run(3, 0)}})),
            "Unavailable");
  EXPECT_EQ(error_code(call(protocol, {{"op", "step"}})), "Unavailable");
  EXPECT_FALSE(c.replica_of(SeqId{2}).has_value());
  EXPECT_EQ(call(protocol, {{"op", "query"}, {"seq", 1}})["ok"], true);
  EXPECT_EQ(call(protocol, {{"op", "stats"}})["ok"], true);
}

TEST(ControlProtocolTest, ShutdownOnlyWhenAllowed) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 0));
  ControlProtocol refusing(c);
  EXPECT_EQ(error_code(call(refusing, {{"op", "shutdown"}})), "InvalidOperation");
  EXPECT_FALSE(refusing.shutdown_requested());
  ControlProtocol allowing(c, nullptr, ControlProtocolOptions{.allow_shutdown = true});
  EXPECT_EQ(call(allowing, {{"op", "shutdown"}})["ok"], true);
  EXPECT_TRUE(allowing.shutdown_requested());
}

// One sample line of a Prometheus exposition, e.g. `name{labels} value`.
bool has_sample(const std::string& text, const std::string& sample) {
  return text.find("\n" + sample + "\n") != std::string::npos;
}

// A SnapKV request identical to one already compacted is served its kept prompt: the reply says
// how many tokens the sequence starts with, and the stats and metrics count it.
TEST(ControlProtocolTest, AnIdenticalSnapKvRequestIsServedTheCompactedPrompt) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 32, 0));
  ControlProtocol protocol(c);
  const json admit = {{"op", "admit"},
                      {"seq", 1},
                      {"tokens", token_run(80, 3)},
                      {"compression", {{"policy", "snapkv"}, {"budget_tokens", 12}, {"window_tokens", 4}}}};
  json reply = call(protocol, admit);
  ASSERT_EQ(reply["ok"], true) << reply;
  EXPECT_EQ(reply["compressed_tokens"], 0);
  ASSERT_EQ(call(protocol, {{"op", "step"}})["ok"], true);  // the prefill
  const json scored = call(protocol, {{"op", "step"}});
  ASSERT_EQ(scored["score_requests"], json::parse(R"([{"seq": 1, "replica": 0}])")) << scored;
  ASSERT_EQ(call(protocol, {{"op", "report_attention"},
                            {"seq", 1},
                            {"step", scored["step"]},
                            {"scores", std::vector<double>(80, 1.0)}})["ok"],
            true);
  const json compacted = call(protocol, {{"op", "step"}});
  ASSERT_EQ(compacted["compactions"].size(), 1u) << compacted;

  json again = admit;
  again["seq"] = 2;
  reply = call(protocol, again);
  ASSERT_EQ(reply["ok"], true) << reply;
  EXPECT_EQ(reply["compressed_tokens"], 16);  // a budget of 12 kept in whole blocks
  EXPECT_EQ(reply["cached_tokens"], 80);
  EXPECT_EQ(reply["blocks"].size(), 1u);
  const json stats = call(protocol, {{"op", "stats"}});
  EXPECT_EQ(stats["compactions"], 1) << stats;
  EXPECT_EQ(stats["compressed_indexed"], 1) << stats;
  EXPECT_EQ(stats["compressed_hits"], 1) << stats;
  const std::string text = protocol.metrics_text();
  EXPECT_TRUE(has_sample(text, "kvfabric_compactions_total 1")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_compressed_prompts_indexed_total 1")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_compressed_prompt_hits_total 1")) << text;
}

// A subscriber's lines, parsed: {"kv_events": batch, "dropped": n} each.
std::vector<json> event_lines(KvEventSubscription& subscription) {
  std::vector<json> lines;
  const std::string text = subscription.take();
  for (size_t at = 0; at < text.size();) {
    const size_t end = text.find('\n', at);
    lines.push_back(json::parse(text.substr(at, end - at)));
    at = end + 1;
  }
  return lines;
}

TEST(ControlProtocolTest, SubscribersGetASnapshotThenEachStepsChanges) {
  Coordinator coordinator = make(serving_config(2, 1, 4, 2, 16, 4));
  ControlProtocol protocol(coordinator);
  const auto prompt = token_run(40, 3);  // two full blocks
  ASSERT_EQ(call(protocol, {{"op", "admit"}, {"seq", 1}, {"tokens", prompt}})["ok"], true);
  ASSERT_EQ(call(protocol, {{"op", "step"}})["ok"], true);

  ControlIdentity who = protocol.new_connection();
  const json subscribed = json::parse(protocol.handle(R"({"op": "subscribe", "id": 7})", who));
  ASSERT_EQ(subscribed["ok"], true) << subscribed;
  EXPECT_EQ(subscribed["id"], 7);
  EXPECT_EQ(subscribed["queue_limit"], 1024);
  EXPECT_EQ(subscribed["step"], 1);
  ASSERT_NE(who.events, nullptr);
  EXPECT_TRUE(coordinator.prefix_index().recording_events());
  std::vector<json> lines = event_lines(*who.events);
  ASSERT_EQ(lines.size(), 1u);
  const std::optional<uint64_t> none;
  const uint64_t first = kv_block_hash(none, std::span(prompt).first(16), CacheSalt{});
  const uint64_t second = kv_block_hash(first, std::span(prompt).subspan(16, 16), CacheSalt{});
  EXPECT_EQ(lines[0], json::parse(fmt::format(
                          R"({{"kv_events": {{"step": 1, "events": [{{"type": "BlockStored",
                          "replica": 0, "tier": "device", "block_hashes": [{}, {}],
                          "parent_block_hash": null, "block_size": 16, "num_tokens": 32,
                          "salt": null}}]}}, "dropped": 0}})",
                          first, second)));

  // A prompt extending it, on the same replica, is stored after the snapshot's last block.
  auto longer = prompt;
  longer.insert(longer.end(), {50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65});
  ASSERT_EQ(call(protocol, {{"op", "free"}, {"seq", 1}})["ok"], true);
  ASSERT_EQ(call(protocol, {{"op", "admit"}, {"seq", 2}, {"tokens", longer}})["cached_tokens"], 32);
  ASSERT_EQ(call(protocol, {{"op", "step"}})["step"], 1);
  lines = event_lines(*who.events);
  ASSERT_EQ(lines.size(), 1u);
  const json& stored = lines[0]["kv_events"]["events"][0];
  EXPECT_EQ(lines[0]["kv_events"]["step"], 1);
  EXPECT_EQ(stored["parent_block_hash"], second);
  EXPECT_EQ(stored["block_hashes"].size(), 1u);

  // A reset that empties a replica says so in one event.
  ASSERT_EQ(call(protocol, {{"op", "free"}, {"seq", 2}})["ok"], true);
  const json reset = call(protocol, {{"op", "reset_prefix_cache"}, {"replica", 0}});
  EXPECT_EQ(reset["freed_blocks"], 3) << reset;
  lines = event_lines(*who.events);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0]["kv_events"]["events"],
            json::parse(R"([{"type": "AllBlocksCleared", "replica": 0, "tier": "device"}])"));

  // Twice on one connection is refused; when the subscriber goes, recording stops.
  EXPECT_EQ(error_code(json::parse(protocol.handle(R"({"op": "subscribe"})", who))),
            "InvalidOperation");
  who.events.reset();
  ASSERT_EQ(call(protocol, {{"op", "stats"}})["ok"], true);
  EXPECT_FALSE(coordinator.prefix_index().recording_events());
  EXPECT_EQ(protocol.stats().kv_event_subscribers, 0u);
  EXPECT_EQ(protocol.stats().kv_event_batches, 2u);
}

// Evictions wait for the next step's batch; a subscriber who joins before it must not get them
// after a snapshot that no longer lists those blocks.
TEST(ControlProtocolTest, ALateSubscriberGetsNoChangeItsSnapshotAlreadyShows) {
  Coordinator coordinator = make(serving_config(1, 1, 4, 2, 16, 4));  // 16 blocks
  ControlProtocol protocol(coordinator);
  ControlIdentity early = protocol.new_connection();
  ASSERT_EQ(json::parse(protocol.handle(R"({"op": "subscribe"})", early))["ok"], true);
  ASSERT_EQ(call(protocol, {{"op", "admit"}, {"seq", 1}, {"tokens", token_run(64, 1)}})["ok"], true);
  ASSERT_EQ(call(protocol, {{"op", "step"}})["ok"], true);
  ASSERT_EQ(call(protocol, {{"op", "free"}, {"seq", 1}})["ok"], true);
  ASSERT_EQ(event_lines(*early.events).size(), 1u);  // stored
  // Every block for a new prompt: the cached one is evicted, reported at the next step.
  ASSERT_EQ(call(protocol, {{"op", "admit"}, {"seq", 2}, {"tokens", token_run(256, 900)}})["ok"],
            true);
  ControlIdentity late = protocol.new_connection();
  ASSERT_EQ(json::parse(protocol.handle(R"({"op": "subscribe"})", late))["ok"], true);
  std::vector<json> lines = event_lines(*early.events);
  ASSERT_EQ(lines.size(), 1u);  // the eviction, delivered before the newcomer's snapshot
  EXPECT_EQ(lines[0]["kv_events"]["events"][0]["type"], "BlockRemoved");
  EXPECT_TRUE(event_lines(*late.events).empty());  // nothing is cached: an empty snapshot
  ASSERT_EQ(call(protocol, {{"op", "step"}})["ok"], true);
  for (ControlIdentity* who : {&early, &late}) {
    lines = event_lines(*who->events);
    ASSERT_EQ(lines.size(), 1u);
    ASSERT_EQ(lines[0]["kv_events"]["events"].size(), 1u) << lines[0];
    EXPECT_EQ(lines[0]["kv_events"]["events"][0]["type"], "BlockStored");
  }
}

TEST(ControlProtocolTest, BadResetsAreRefusedAndChangeNothing) {
  Coordinator coordinator = make(serving_config(2, 1, 4, 2, 16, 4));
  ControlProtocol protocol(coordinator);
  ASSERT_EQ(call(protocol, {{"op", "admit"}, {"seq", 1}, {"tokens", token_run(32, 3)}})["ok"], true);
  ASSERT_EQ(call(protocol, {{"op", "step"}})["ok"], true);
  ASSERT_EQ(call(protocol, {{"op", "free"}, {"seq", 1}})["ok"], true);
  const json unknown = call(protocol, {{"op", "reset_prefix_cache"}, {"replica", 5}});
  EXPECT_EQ(error_code(unknown), "InvalidArgument");
  EXPECT_EQ(unknown["error"]["message"], "reset_prefix_cache: replica 5 does not exist (dp 2)");
  EXPECT_EQ(error_code(call(protocol, {{"op", "reset_prefix_cache"}, {"replica", -1}})),
            "InvalidArgument");
  EXPECT_EQ(error_code(call(protocol, {{"op", "reset_prefix_cache"}, {"all", true}})),
            "InvalidArgument");
  EXPECT_EQ(coordinator.cached_tokens(0, token_run(32, 3)), 32u);
  EXPECT_EQ(call(protocol, {{"op", "reset_prefix_cache"}})["freed_blocks"], 2);
  EXPECT_EQ(coordinator.cached_tokens(0, token_run(32, 3)), 0u);
}

TEST(KvEventHubTest, AFullQueueDropsAndCountsInsteadOfWaiting) {
  KvEventHub hub(2);
  auto slow = hub.subscribe();
  auto fast = hub.subscribe();
  int woken = 0;
  fast->set_notify([&] { ++woken; });
  for (int i = 0; i < 5; ++i) {
    hub.publish(fmt::format(R"({{"step": {}, "events": []}})", i));
    if (i < 3) (void)fast->take();  // the fast one keeps up for three batches
  }
  EXPECT_EQ(woken, 5);
  // The slow subscriber kept the first two; the next three were dropped for it.
  std::vector<json> lines = event_lines(*slow);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0]["kv_events"]["step"], 0);
  EXPECT_EQ(lines[1]["dropped"], 0);
  EXPECT_EQ(slow->dropped(), 3u);
  EXPECT_EQ(event_lines(*fast).size(), 2u);
  EXPECT_EQ(hub.dropped(), 3u);
  EXPECT_EQ(hub.published(), 5u);
  // The next batch after a gap says how many were lost before it.
  hub.publish(R"({"step": 5, "events": []})");
  lines = event_lines(*slow);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0]["dropped"], 3);
  // A released or closed subscription is forgotten.
  EXPECT_EQ(hub.subscribers(), 2u);
  fast->close();
  slow.reset();
  EXPECT_EQ(hub.subscribers(), 0u);
}

TEST(MetricsTest, HistogramBucketsAreCumulativeAndNamedByTheirUpperBound) {
  LatencyHistogram h;
  h.observe(std::chrono::microseconds(1));    // on a bound: that bucket
  h.observe(std::chrono::microseconds(3));    // (2.5 µs, 5 µs]
  h.observe(std::chrono::seconds(20));        // above every bound
  std::string text;
  h.render(text, "kvfabric_test_seconds", "A test.");
  EXPECT_THAT(text, HasSubstr("# TYPE kvfabric_test_seconds histogram\n"));
  EXPECT_TRUE(has_sample(text, "kvfabric_test_seconds_bucket{le=\"1e-06\"} 1")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_test_seconds_bucket{le=\"2.5e-06\"} 1")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_test_seconds_bucket{le=\"5e-06\"} 2")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_test_seconds_bucket{le=\"10\"} 2")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_test_seconds_bucket{le=\"+Inf\"} 3")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_test_seconds_count 3")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_test_seconds_sum 20.000004")) << text;
}

TEST(MetricsTest, ExtraFamiliesFollowTheProtocolsOwn) {
  Coordinator c = make(serving_config(1, 1, 4, 2, 16, 4));
  ControlProtocolOptions options;
  options.backend = "cpu";
  options.extra_metrics = [] { return std::string("# TYPE kvfabric_rank_steps_total counter\n"); };
  ControlProtocol protocol(c, nullptr, options);
  const std::string text = protocol.metrics_text();
  EXPECT_THAT(text, HasSubstr("backend=\"cpu\""));
  EXPECT_THAT(text, HasSubstr("\n# TYPE kvfabric_rank_steps_total counter\n"));
}

TEST(MetricsTest, ExposeCountersPoolsAndRequests) {
  Coordinator c = make(serving_config(2, 1, 4, 2, 16, 4));
  ControlProtocol protocol(c);
  ASSERT_EQ(call(protocol, {{"op", "admit"}, {"seq", 1}, {"tokens", token_run(40, 0)}})["ok"], true);
  ASSERT_EQ(call(protocol, {{"op", "free"}, {"seq", 9}})["ok"], false);
  ASSERT_EQ(call(protocol, {{"op", "step"}})["ok"], true);
  protocol.handle("{");
  const uint32_t replica = c.replica_of(SeqId{1}).value();

  const std::string text = protocol.metrics_text();
  EXPECT_THAT(text, HasSubstr("# TYPE kvfabric_admitted_total counter\n"));
  EXPECT_TRUE(has_sample(text, "kvfabric_admitted_total 1")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_prompt_tokens_total 40")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_steps_total 1")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_prefix_hit_tokens_total{source=\"local\"} 0")) << text;
  EXPECT_TRUE(has_sample(
      text, "kvfabric_device_blocks{replica=\"" + std::to_string(replica) + "\",state=\"used\"} 3"))
      << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_device_blocks{replica=\"" + std::to_string(1 - replica) +
                                   "\",state=\"free\"} 16"))
      << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_host_free_blocks{replica=\"0\"} 4")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_sequences{replica=\"" + std::to_string(replica) + "\"} 1"))
      << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_block_bytes " + std::to_string(c.block_bytes()))) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_control_requests_total{op=\"admit\",outcome=\"ok\"} 1"))
      << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_control_requests_total{op=\"free\",outcome=\"error\"} 1"))
      << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_control_malformed_requests_total 1")) << text;

  // Why tokens missed, the hit ratio by tier, the build, and how long requests took.
  EXPECT_TRUE(has_sample(text, "kvfabric_prefix_miss_tokens_total{cause=\"never_seen\"} 32")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_prefix_miss_tokens_total{cause=\"partial_block\"} 8"))
      << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_prefix_hit_ratio{tier=\"any\"} 0")) << text;
  EXPECT_THAT(text, HasSubstr("kvfabric_build_info{version=\"" + std::string(version()) +
                              "\",model=\"serving-test\",dp=\"2\",tp=\"1\",backend=\"none\","
                              "kv_dtype=\"f16\","));
  EXPECT_THAT(text, HasSubstr("# TYPE kvfabric_admit_duration_seconds histogram\n"));
  EXPECT_TRUE(has_sample(text, "kvfabric_admit_duration_seconds_bucket{le=\"+Inf\"} 1")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_admit_duration_seconds_count 1")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_step_duration_seconds_count 1")) << text;
  EXPECT_TRUE(has_sample(text, "kvfabric_plan_execution_duration_seconds_count 0")) << text;
  const json stats = call(protocol, {{"op", "stats"}});
  EXPECT_EQ(stats["missed_tokens"], json::parse(R"({"partial_block": 8, "other_replica": 0,
                                       "evicted": 0, "other_salt": 0, "never_seen": 32})"));

  // Without request counts (an engine using the in-process API).
  const std::string plain = render_metrics(c);
  EXPECT_TRUE(has_sample(plain, "kvfabric_admitted_total 1"));
  EXPECT_EQ(plain.find("kvfabric_control_requests_total"), std::string::npos);
}

}  // namespace
}  // namespace kvfabric
