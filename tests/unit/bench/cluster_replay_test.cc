// The replay across replicas (kvfabric-bench replay --dp) without MPI: the coordinator alone on
// the first requests of the shipped conversation trace.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "bench/cluster_replay.h"
#include "bench/cluster_routine.h"
#include "bench/trace.h"

namespace kvfabric::bench {
namespace {

using ::testing::HasSubstr;

const std::vector<MooncakeRequest>& conversation_trace() {
  static const auto trace =
      parse_mooncake_trace(embedded_mooncake_conversation_trace(), "embedded").value();
  return trace;
}

ClusterReplayOptions options(size_t requests, double time_scale) {
  ClusterReplayOptions o;
  o.config.topology.dp = 4;
  o.capacity_tokens = 4u << 20;
  o.host_capacity_tokens = 1u << 20;
  o.time_scale = time_scale;
  o.max_requests = requests;
  return o;
}

// Everything but wall times.
void expect_same_decisions(const ClusterReplayResult& a, const ClusterReplayResult& b) {
  EXPECT_EQ(a.steps, b.steps);
  EXPECT_EQ(a.admissions, b.admissions);
  EXPECT_EQ(a.local_hit_tokens, b.local_hit_tokens);
  EXPECT_EQ(a.migrated_tokens, b.migrated_tokens);
  EXPECT_EQ(a.prefill_tokens, b.prefill_tokens);
  EXPECT_EQ(a.migrated_blocks, b.migrated_blocks);
  EXPECT_EQ(a.swapped_out, b.swapped_out);
  EXPECT_EQ(a.preempted, b.preempted);
  EXPECT_EQ(a.admitted_per_replica, b.admitted_per_replica);
  EXPECT_EQ(a.max_waiting, b.max_waiting);
  EXPECT_EQ(a.queue_steps_per_point, b.queue_steps_per_point);
  EXPECT_EQ(a.queue_mean, b.queue_mean);
  EXPECT_EQ(a.queue_max, b.queue_max);
}

// The queue-length series and the admission-time distribution of a run that queues.
void expect_queue_and_admission_shapes(const ClusterReplayResult& r) {
  ASSERT_FALSE(r.queue_mean.empty());
  EXPECT_LE(r.queue_mean.size(), kQueueSeriesPoints);
  ASSERT_EQ(r.queue_max.size(), r.queue_mean.size());
  // The buckets cover every step, the last one partly.
  EXPECT_GE(r.queue_mean.size() * r.queue_steps_per_point, r.steps);
  EXPECT_LT((r.queue_mean.size() - 1) * r.queue_steps_per_point, r.steps);
  double highest = 0;
  for (size_t i = 0; i < r.queue_mean.size(); ++i) {
    EXPECT_LE(r.queue_mean[i], r.queue_max[i]);
    highest = std::max(highest, r.queue_max[i]);
  }
  EXPECT_GT(r.max_waiting, 0u);
  EXPECT_EQ(highest, static_cast<double>(r.max_waiting));
  EXPECT_EQ(r.queue_mean.back(), 0.0);  // the run ends with nobody waiting

  ASSERT_EQ(r.admit_histogram_edges_us.size(), r.admit_histogram.size() + 1);
  EXPECT_DOUBLE_EQ(r.admit_histogram_edges_us.front(), kAdmitHistogramLowestUs);
  uint64_t counted = 0;
  for (uint64_t c : r.admit_histogram) counted += c;
  EXPECT_EQ(counted, r.admissions);
  EXPECT_LE(r.admit_p50_us, r.admit_p90_us);
  EXPECT_LE(r.admit_p90_us, r.admit_p99_us);
  EXPECT_LE(r.admit_p99_us, r.admit_p999_us);
  EXPECT_LE(r.admit_p999_us, r.admit_max_us);
  EXPECT_GT(r.admit_max_us, 0.0);
}

TEST(ClusterReplay, AGlobalPrefixViewFindsMoreThanIndependentCaches) {
  const auto o = options(1500, 1);
  const auto independent = run_cluster_replay(conversation_trace(), o, ClusterRouting::kIndependent);
  const auto global = run_cluster_replay(conversation_trace(), o, ClusterRouting::kGlobalRouting);
  const auto migration = run_cluster_replay(conversation_trace(), o, ClusterRouting::kGlobalMigration);
  ASSERT_TRUE(independent.ok()) << independent.status();
  ASSERT_TRUE(global.ok()) << global.status();
  ASSERT_TRUE(migration.ok()) << migration.status();
  for (const auto* r : {&*independent, &*global, &*migration}) {
    EXPECT_EQ(r->requests, 1500u);
    EXPECT_EQ(r->admissions, 1500u + r->readmissions);
    EXPECT_EQ(r->prefill_tokens, r->prompt_tokens - r->local_hit_tokens - r->migrated_tokens);
    uint64_t admitted = 0;
    for (uint64_t a : r->admitted_per_replica) {
      EXPECT_GT(a, 0u);  // every replica serves
      admitted += a;
    }
    EXPECT_EQ(admitted, r->admissions);
  }
  EXPECT_GT(global->hit_ratio, independent->hit_ratio * 1.1);
  EXPECT_EQ(independent->migrated_tokens, 0u);
  EXPECT_EQ(global->migrated_tokens, 0u);
  EXPECT_GT(migration->migrated_tokens, 0u);
  EXPECT_EQ(migration->migrated_bytes, migration->migrated_blocks * (512u * 1024u));
}

TEST(ClusterReplay, UnderLoadItSwapsAndStaysDeterministic) {
  const auto o = options(2500, 6);
  const auto first = run_cluster_replay(conversation_trace(), o, ClusterRouting::kGlobalMigration);
  const auto again = run_cluster_replay(conversation_trace(), o, ClusterRouting::kGlobalMigration);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_GT(first->swapped_out, 0u);
  EXPECT_EQ(first->swapped_in, first->swapped_out);  // every swapped sequence came back
  EXPECT_GT(first->mean_queue_steps, 0.0);
  expect_same_decisions(*first, *again);
  expect_queue_and_admission_shapes(*first);
}

// Compression under load (arrivals 6x faster, swapping): each policy holds about half the KV
// per sequence, deterministically, and pays in plan copies; H2O and SnapKV ask the ranks for
// scores, streaming does not.
TEST(ClusterReplay, CompressionHalvesTheKvEachSequenceHolds) {
  auto o = options(120, 6);
  o.config.topology.dp = 2;
  o.capacity_tokens = 2u << 20;
  const auto none = run_cluster_replay(conversation_trace(), o, ClusterRouting::kGlobalMigration);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->compactions, 0u);
  for (const char* spec : {"streaming:ratio=0.5,interval=8", "h2o:ratio=0.5,interval=8",
                           "snapkv:ratio=0.5", "pyramid:ratio=0.5,beta=3"}) {
    SCOPED_TRACE(spec);
    auto policy = parse_compression_spec(spec);
    ASSERT_TRUE(policy.ok()) << policy.status();
    o.compression = *policy;
    const auto run = run_cluster_replay(conversation_trace(), o, ClusterRouting::kGlobalMigration);
    ASSERT_TRUE(run.ok()) << run.status();
    if (policy->value().kind == quant::CompressionPolicy::Kind::kH2o) {
      const auto again = run_cluster_replay(conversation_trace(), o, ClusterRouting::kGlobalMigration);
      ASSERT_TRUE(again.ok()) << again.status();
      expect_same_decisions(*run, *again);
      EXPECT_EQ(run->compacted_tokens, again->compacted_tokens);
    }
    EXPECT_GT(run->compactions, 0u);
    EXPECT_GT(run->compaction_copied_tokens, 0u);
    EXPECT_LT(run->kv_tokens_per_sequence, none->kv_tokens_per_sequence * 0.6);
    EXPECT_GT(run->kv_tokens_per_sequence, none->kv_tokens_per_sequence * 0.4);
    EXPECT_EQ(run->score_requests > 0, policy->value().needs_scores());
  }
}

TEST(ClusterReplay, CompressionSpecsAreParsedOrRefusedNamingTheKey) {
  const auto h2o = parse_compression_spec("h2o:ratio=0.25,interval=16,recent=64");
  ASSERT_TRUE(h2o.ok()) << h2o.status();
  EXPECT_EQ(h2o->value().kind, quant::CompressionPolicy::Kind::kH2o);
  EXPECT_DOUBLE_EQ(h2o->value().budget_ratio, 0.25);
  EXPECT_EQ(h2o->value().interval_steps, 16u);
  EXPECT_EQ(h2o->value().recent_tokens, 64u);
  const auto streaming = parse_compression_spec("streaming:tokens=4096,sink=8");
  ASSERT_TRUE(streaming.ok());
  EXPECT_EQ(streaming->value().budget_tokens, 4096u);
  EXPECT_EQ(streaming->value().sink_tokens, 8u);
  EXPECT_FALSE(parse_compression_spec("none")->has_value());
  for (const auto& [spec, says] : std::vector<std::pair<std::string, std::string>>{
           {"h2o", "a compression budget is needed"},
           {"h2o:ratio=2", "compression.budget_ratio"},
           {"h2o:tokens=1.5", "tokens=1.5"},
           {"h2o:tokens=ten", "tokens=ten"},
           // Past any count (no uint64_t holds them): refused, never converted.
           {"h2o:tokens=1e30", "tokens=1e30"},
           {"streaming:tokens=64,sink=inf", "sink=inf"},
           {"h2o:tokens=18446744073709551616", "tokens=18446744073709551616"},
           {"h2o:tokens=8,window=4,speed=2", "unknown key 'speed'"},
           {"h2o:tokens=8,interval=5000000000", "interval=5000000000"},
           {"lru:tokens=8", "unknown"},
           {"pyramid:tokens=8", "compression.window_tokens 32 (the default) exceeds"},
           {"pyramid:tokens=64,beta=0.5", "compression.beta 0.5"}}) {
    const auto refused = parse_compression_spec(spec);
    ASSERT_FALSE(refused.ok()) << spec;
    EXPECT_THAT(refused.status().message(), HasSubstr(says)) << spec;
  }
}

TEST(ClusterReplay, ReportsProgressOncePerStepUpToEveryRequest) {
  std::vector<ClusterReplayProgress> seen;
  const auto r = run_cluster_replay(conversation_trace(), options(300, 6),
                                    ClusterRouting::kGlobalMigration, nullptr,
                                    [&](const ClusterReplayProgress& p) { seen.push_back(p); });
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(seen.size(), r->steps);
  for (size_t i = 0; i < seen.size(); ++i) {
    EXPECT_EQ(seen[i].step, i);
    EXPECT_EQ(seen[i].total, 300u);
    if (i > 0) {
      EXPECT_GE(seen[i].finished, seen[i - 1].finished);
    }
  }
  EXPECT_EQ(seen.back().finished, 300u);
  EXPECT_EQ(seen.back().waiting, 0u);
  // Watching changes nothing.
  const auto unwatched =
      run_cluster_replay(conversation_trace(), options(300, 6), ClusterRouting::kGlobalMigration);
  ASSERT_TRUE(unwatched.ok()) << unwatched.status();
  expect_same_decisions(*r, *unwatched);
}

TEST(ClusterReplay, TheJsonCarriesWhatTheDemoFigureNeeds) {
  ClusterCommand command;
  command.sim = options(400, 6);
  command.routings = {ClusterRouting::kIndependent, ClusterRouting::kGlobalMigration};
  nlohmann::json results;
  ASSERT_TRUE(run_cluster_command(command, conversation_trace(), "embedded", results).ok());
  EXPECT_EQ(results["routine"], "replay");
  EXPECT_EQ(results["dp"], 4);
  ASSERT_EQ(results["runs"].size(), 2u);
  for (const auto& run : results["runs"]) {
    EXPECT_EQ(run["prefill_tokens_saved"].get<uint64_t>(),
              run["prompt_tokens"].get<uint64_t>() - run["prefill_tokens"].get<uint64_t>());
    EXPECT_GE(run["hit_ratio"].get<double>(), 0.0);
    const auto& queue = run["queue_length"];
    EXPECT_GE(queue["steps_per_point"].get<uint64_t>(), 1u);
    EXPECT_LE(queue["mean"].size(), kQueueSeriesPoints);
    EXPECT_EQ(queue["mean"].size(), queue["max"].size());
    EXPECT_GE(queue["mean"].size() * queue["steps_per_point"].get<uint64_t>(),
              run["steps"].get<uint64_t>());
    const auto& histogram = run["admit_histogram"];
    EXPECT_EQ(histogram["edges_us"].size(), histogram["counts"].size() + 1);
    uint64_t counted = 0;
    for (const auto& c : histogram["counts"]) counted += c.get<uint64_t>();
    EXPECT_EQ(counted, run["admissions"].get<uint64_t>());
    for (const char* q : {"p50", "p90", "p99", "p99.9", "max"}) {
      EXPECT_TRUE(run["admit_quantiles_us"].contains(q)) << q;
    }
  }
}

TEST(ClusterReplay, ExecutesEveryPlanInOrder) {
  uint64_t expected_step = 0, migrations = 0;
  const auto r = run_cluster_replay(conversation_trace(), options(300, 1), ClusterRouting::kGlobalMigration,
                                    [&](const StepPlan& plan) -> Result<std::vector<ReplicaScores>> {
                                      if (plan.step != expected_step) return invalid_operation("step out of order");
                                      ++expected_step;
                                      migrations += plan.count(StepPlan::OpKind::kMigrate);
                                      return std::vector<ReplicaScores>();
                                    });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(expected_step, r->steps);
  EXPECT_EQ(migrations, r->migrated_blocks);
  // An executor's error ends the run with it.
  const auto failed = run_cluster_replay(conversation_trace(), options(10, 1), ClusterRouting::kIndependent,
                                         [](const StepPlan&) -> Result<std::vector<ReplicaScores>> {
                                           return invalid_operation("rank 3 is gone");
                                         });
  EXPECT_THAT(failed.status().message(), HasSubstr("rank 3 is gone"));
}

TEST(ClusterReplay, RejectsOptionsThatCannotWork) {
  auto o = options(10, 1);
  o.capacity_tokens = 1000;  // less than one 512-token block per replica
  EXPECT_THAT(run_cluster_replay(conversation_trace(), o, ClusterRouting::kIndependent).status().message(),
              HasSubstr("gives each of 4 replicas no 512-token block"));
  o = options(10, 1);
  o.step_ms = 0;
  EXPECT_EQ(run_cluster_replay(conversation_trace(), o, ClusterRouting::kIndependent).status().code(),
            ErrorCode::kInvalidArgument);
  EXPECT_THAT(parse_cluster_routings("global-routing,teleport").status().message(), HasSubstr("teleport"));
  const auto parsed = parse_cluster_routings("global-migration,independent");
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(*parsed, (std::vector{ClusterRouting::kGlobalMigration, ClusterRouting::kIndependent}));
}

}  // namespace
}  // namespace kvfabric::bench
