// mpi label, 4 ranks (dp 2 x tp 2): the control plane end to end. Rank 0 serves the Coordinator
// over TCP and a scheduler thread drives it with protocol requests (admissions sharing prefixes,
// a fork onto the other replica, appends, frees, a batch); every step plan it asks for reaches
// all ranks over MPI and runs on their caches before the reply. Afterwards the shards of each
// replica hold identical tables, rank 0's tables equal the coordinator's, and every planned
// migration arrived on each shard of its destination.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <numeric>
#include <thread>

#include "kvfabric/runtime/rank_job.h"
#include "kvfabric/server/control_server.h"
#include "mpi/mpi_env.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using nlohmann::json;

using testing::token_run;

// The scheduler: another process in production, a thread of rank 0 here.
void drive(uint16_t port) {
  auto connected = ControlClient::connect("127.0.0.1", port);
  ASSERT_TRUE(connected.ok()) << connected.status();
  ControlClient& client = *connected;
  auto call = [&](const json& request) {
    const auto reply = client.call(request.dump());
    EXPECT_TRUE(reply.ok()) << reply.status();
    return reply.ok() ? json::parse(*reply) : json::object();
  };
  auto expect_ok = [&](const json& request) {
    const json reply = call(request);
    EXPECT_EQ(reply.value("ok", false), true) << request << " -> " << reply;
    return reply;
  };

  EXPECT_EQ(expect_ok({{"op", "hello"}})["dp"], 2);
  const auto prompt = token_run(100, 0);
  expect_ok({{"op", "admit"}, {"seq", 1}, {"tokens", prompt}});
  expect_ok({{"op", "admit"}, {"seq", 2}, {"tokens", token_run(50, 1000)}});
  expect_ok({{"op", "step"}});
  expect_ok({{"op", "append"}, {"seq", 1}, {"num_tokens", 1}});
  expect_ok({{"op", "step"}});  // indexes both prompts
  const uint32_t home = expect_ok({{"op", "query"}, {"seq", 1}})["replica"];
  expect_ok({{"op", "fork"}, {"src", 1}, {"dst", 3}, {"replica", 1 - home}});
  const json hit = expect_ok({{"op", "admit"}, {"seq", 4}, {"tokens", token_run(80, 0)}});
  EXPECT_GT(hit["cached_tokens"].get<uint64_t>(), 0u) << hit;
  const json forked_step = expect_ok({{"op", "step"}});
  EXPECT_GT(forked_step["ops"]["migrate"].get<uint64_t>(), 0u) << forked_step;
  expect_ok({{"op", "free"}, {"seq", 2}});
  expect_ok({{"op", "append"}, {"seq", 3}, {"num_tokens", 20}});
  expect_ok({{"op", "step"}});
  const json batch = call(json::array({{{"op", "admit"}, {"seq", 5}, {"tokens", token_run(33, 500)}},
                                       {{"op", "append"}, {"seq", 4}, {"num_tokens", 2}},
                                       {{"op", "step"}}}));
  ASSERT_TRUE(batch.is_array()) << batch;
  for (const json& reply : batch)
    EXPECT_EQ(reply["ok"], true) << reply;
  EXPECT_GT(expect_ok({{"op", "stats"}})["migrated_blocks"].get<uint64_t>(), 0u);
  expect_ok({{"op", "shutdown"}});
}

TEST(MpiServerTest, StepPlansRequestedOverTcpRunOnEveryRank) {
  Transport& transport = testing::mpi_transport();
  ASSERT_EQ(transport.world_size(), 4);
  const Config config = testing::serving_config(2, 2, 8, 4, 24, 8);
  auto backend = make_cpu_backend();
  ASSERT_TRUE(backend.ok());
  auto job = RankJob::create(config, transport, **backend);
  ASSERT_TRUE(job.ok()) << job.status();
  RankJob& executors = **job;

  uint64_t migrated_blocks = 0;
  if (executors.is_root()) {
    auto coordinator = Coordinator::create(config);
    EXPECT_TRUE(coordinator.ok()) << coordinator.status();
    if (coordinator.ok()) {
      ControlProtocol protocol(
          *coordinator, [&](const StepPlan& plan) { return executors.execute(plan); },
          ControlProtocolOptions{.allow_shutdown = true});
      auto server = ControlServer::create(protocol, ControlServerOptions{});
      EXPECT_TRUE(server.ok()) << server.status();
      if (server.ok()) {
        std::thread scheduler(drive, (*server)->port());
        EXPECT_TRUE((*server)->run().ok());
        scheduler.join();
      }
      EXPECT_TRUE(coordinator->verify_integrity().ok());
      migrated_blocks = coordinator->stats().migrated_blocks;
      // Rank 0 knows every rank's figures as of the last plan (its /metrics shows them).
      const std::vector<RankCacheStats> ranks = executors.rank_stats();
      ASSERT_EQ(ranks.size(), 4u);
      uint64_t received = 0;
      for (const RankCacheStats& r : ranks) {
        EXPECT_EQ(r.steps, coordinator->stats().steps);
        received += r.migrated_blocks_received;
      }
      EXPECT_EQ(received, migrated_blocks * config.topology.tp);
      // Rank 0 is shard 0 of replica 0: its tables are the coordinator's for that replica.
      for (const auto& [seq, table] : executors.cache().tables()) {
        EXPECT_EQ(coordinator->replica_of(seq), 0u) << seq;
        EXPECT_EQ(table.blocks, coordinator->blocks_of(seq)) << seq;
      }
      EXPECT_GT(executors.cache().tables().size(), 0u);
    }
    ASSERT_TRUE(executors.finish().ok());
  } else {
    ASSERT_TRUE(executors.serve().ok());
  }

  const auto digests = executors.table_digests();
  ASSERT_TRUE(digests.ok()) << digests.status();
  EXPECT_EQ((*digests)[0], (*digests)[1]);
  EXPECT_EQ((*digests)[2], (*digests)[3]);
  const auto received = executors.received_blocks();
  ASSERT_TRUE(received.ok()) << received.status();
  if (executors.is_root()) {
    EXPECT_GT(migrated_blocks, 0u);
    EXPECT_EQ(std::accumulate(received->begin(), received->end(), uint64_t{0}),
              migrated_blocks * config.topology.tp);
  }
}

}  // namespace
}  // namespace kvfabric
