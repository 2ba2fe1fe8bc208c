#include "kvfabric/server/control_server.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <atomic>
#include <boost/asio.hpp>
#include <cerrno>
#include <future>
#include <thread>

#include "kvfabric/common/logging.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using testing::serving_config;

// A coordinator served on loopback ports picked by the OS, its event loop on a thread.
class ServedCoordinator {
 public:
  explicit ServedCoordinator(ControlServerOptions options = loopback(),
                             ControlProtocolOptions protocol_options = {}, PlanSink sink = nullptr)
      : coordinator_(Coordinator::create(serving_config(2, 1, 4, 2, 16, 4)).value()),
        protocol_(coordinator_, std::move(sink), protocol_options) {
    auto server = ControlServer::create(protocol_, options);
    EXPECT_TRUE(server.ok()) << server.status();
    server_ = std::move(server).value();
    thread_ = std::thread([this] { run_status_ = server_->run(); });
  }
  ~ServedCoordinator() {
    server_->stop();
    thread_.join();
  }

  static ControlServerOptions loopback() {
    ControlServerOptions o;
    o.metrics_port = 0;
    return o;
  }
  ControlClient client() { return ControlClient::connect("127.0.0.1", server_->port()).value(); }
  ControlServer& server() { return *server_; }
  ControlProtocol& protocol() { return protocol_; }
  // Waits for run() to return (after a shutdown request).
  Status join() {
    thread_.join();
    thread_ = std::thread([] {});
    return run_status_;
  }

 private:
  Coordinator coordinator_;
  ControlProtocol protocol_;
  std::unique_ptr<ControlServer> server_;
  std::thread thread_;
  Status run_status_;
};

json call(ControlClient& client, const json& request) {
  const auto reply = client.call(request.dump());
  EXPECT_TRUE(reply.ok()) << reply.status();
  return reply.ok() ? json::parse(*reply) : json();
}

TEST(ControlServerTest, ServesRequestsFromSeveralConnectionsInOrder) {
  ServedCoordinator served;
  ControlClient a = served.client();
  ControlClient b = served.client();
  EXPECT_EQ(call(a, {{"op", "hello"}})["dp"], 2);
  const json admitted = call(a, {{"op", "admit"}, {"seq", 1}, {"tokens", {1, 2, 3, 4, 5}}});
  ASSERT_EQ(admitted["ok"], true) << admitted;
  EXPECT_EQ(call(b, {{"op", "admit"}, {"seq", 1}, {"tokens", {9}}})["ok"], false);  // already known
  const json step = call(b, {{"op", "step"}});
  ASSERT_EQ(step["tables"].size(), 1u) << step;
  EXPECT_EQ(step["tables"][0]["blocks"], admitted["blocks"]);
  // A carriage return before the newline (a telnet-style client) is accepted.
  const auto crlf = a.call(R"({"op": "query", "seq": 1})"
                           "\r");
  ASSERT_TRUE(crlf.ok()) << crlf.status();
  EXPECT_EQ(json::parse(*crlf)["replica"], admitted["replica"]);
  EXPECT_EQ(a.call("{\"op\": \"hello\"}\n{\"op\": \"step\"}").status().code(),
            ErrorCode::kInvalidArgument);
}

// A plan sink that holds every step's plan until release(): a step in progress, as long as a
// test needs one.
class HeldPlans {
 public:
  PlanSink sink() {
    return [this](const StepPlan&) {
      held_ = true;
      released_.wait();
      return ok_status();
    };
  }
  void wait_until_held() const {
    while (!held_) std::this_thread::yield();
  }
  void release() { release_.set_value(); }

 private:
  std::promise<void> release_;
  std::shared_future<void> released_ = release_.get_future().share();
  std::atomic<bool> held_{false};
};

TEST(ControlServerTest, ASubscribedConnectionCarriesKvEventsAsStepsHappen) {
  ServedCoordinator served;
  ControlClient scheduler = served.client();
  ControlClient router = served.client();
  const json subscribed = call(router, {{"op", "subscribe"}});
  ASSERT_EQ(subscribed["ok"], true) << subscribed;
  // Nothing is cached yet, so no snapshot: the first line is step 0's batch.
  ASSERT_EQ(call(scheduler, {{"op", "admit"}, {"seq", 1}, {"tokens", testing::token_run(48, 1)}})["ok"],
            true);
  ASSERT_EQ(call(scheduler, {{"op", "step"}})["ok"], true);
  auto line = router.read_line();
  ASSERT_TRUE(line.ok()) << line.status();
  json batch = json::parse(*line);
  EXPECT_EQ(batch["dropped"], 0);
  EXPECT_EQ(batch["kv_events"]["step"], 0);
  ASSERT_EQ(batch["kv_events"]["events"].size(), 1u);
  EXPECT_EQ(batch["kv_events"]["events"][0]["type"], "BlockStored");
  EXPECT_EQ(batch["kv_events"]["events"][0]["num_tokens"], 48);
  ASSERT_EQ(call(scheduler, {{"op", "free"}, {"seq", 1}})["ok"], true);
  ASSERT_EQ(call(scheduler, {{"op", "reset_prefix_cache"}})["freed_blocks"], 3);
  // A request from the subscriber is read and dropped: the next line is the reset's batch.
  line = router.call(R"({"op": "stats"})");
  ASSERT_TRUE(line.ok()) << line.status();
  batch = json::parse(*line);
  EXPECT_EQ(batch["kv_events"]["events"][0]["type"], "AllBlocksCleared");
  const auto text = http_get("127.0.0.1", served.server().metrics_port(), "/metrics");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_THAT(*text, HasSubstr("\nkvfabric_kv_event_subscribers 1\n"));
  EXPECT_THAT(*text, HasSubstr("\nkvfabric_kv_event_batches_total 2\n"));
}

TEST(ControlServerTest, MetricsEndpointServesPrometheusText) {
  ServedCoordinator served;
  ControlClient client = served.client();
  ASSERT_EQ(call(client, {{"op", "admit"}, {"seq", 4}, {"tokens", {7, 8}}})["ok"], true);
  ASSERT_NE(served.server().metrics_port(), 0);
  const auto text = http_get("127.0.0.1", served.server().metrics_port(), "/metrics");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_THAT(*text, HasSubstr("\nkvfabric_admitted_total 1\n"));
  EXPECT_THAT(*text, HasSubstr("kvfabric_control_requests_total{op=\"admit\",outcome=\"ok\"} 1\n"));
  const auto other = http_get("127.0.0.1", served.server().metrics_port(), "/");
  EXPECT_EQ(other.status().code(), ErrorCode::kUnavailable);
  EXPECT_THAT(other.status().message(), HasSubstr("404 Not Found"));
}

TEST(ControlServerTest, AnOverlongRequestIsRefusedAndItsConnectionClosed) {
  ControlServerOptions options = ServedCoordinator::loopback();
  options.max_request_bytes = 256;
  ServedCoordinator served(options);
  ControlClient client = served.client();
  const auto reply =
      client.call("{\"op\": \"admit\", \"seq\": 1, \"tokens\": [" + std::string(300, '1') + "]}");
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_THAT(json::parse(*reply)["error"]["message"].get<std::string>(),
              HasSubstr("exceeds 256 bytes (server.max_request_bytes)"));
  EXPECT_EQ(client.call("{\"op\": \"hello\"}").status().code(), ErrorCode::kUnavailable);
  // The server goes on serving others.
  ControlClient other = served.client();
  EXPECT_EQ(call(other, {{"op", "hello"}})["ok"], true);
}

TEST(ControlServerTest, AnAllowedShutdownRequestEndsRun) {
  ServedCoordinator served(ServedCoordinator::loopback(),
                           ControlProtocolOptions{.allow_shutdown = true});
  ControlClient client = served.client();
  EXPECT_EQ(call(client, {{"op", "shutdown"}})["ok"], true);
  EXPECT_TRUE(served.join().ok());
}

TEST(ControlServerTest, EndpointErrorsNameTheAddressOrPort) {
  Coordinator c = Coordinator::create(serving_config(1, 1, 4, 2, 16, 0)).value();
  ControlProtocol protocol(c);
  ControlServerOptions bad;
  bad.address = "localhost:80";
  const auto not_ip = ControlServer::create(protocol, bad);
  EXPECT_EQ(not_ip.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(not_ip.status().message(), HasSubstr("'localhost:80' is not an IP address"));

  auto first = ControlServer::create(protocol, ControlServerOptions{});
  ASSERT_TRUE(first.ok()) << first.status();
  ControlServerOptions taken;
  taken.metrics_port = (*first)->port();
  const auto in_use = ControlServer::create(protocol, taken);
  EXPECT_EQ(in_use.status().code(), ErrorCode::kUnavailable);
  EXPECT_THAT(in_use.status().message(),
              HasSubstr("metrics endpoint on 127.0.0.1:" + std::to_string((*first)->port())));

  // Nobody listens once the server is gone.
  const uint16_t port = (*first)->port();
  first->reset();
  EXPECT_EQ(ControlClient::connect("127.0.0.1", port).status().code(), ErrorCode::kUnavailable);
}

TEST(ControlServerTest, StopBeforeRunReturnsAtOnce) {
  Coordinator c = Coordinator::create(serving_config(1, 1, 4, 2, 16, 0)).value();
  ControlProtocol protocol(c);
  auto server = ControlServer::create(protocol, ControlServerOptions{});
  ASSERT_TRUE(server.ok());
  (*server)->stop();
  EXPECT_TRUE((*server)->run().ok());
}

// A step used to run on the network thread: /metrics waited for it, and a rank that hung held
// every connection. Now the ranks execute the plan while the sockets are served.
TEST(ControlServerTest, HealthAndMetricsAnswerWhileAStepRuns) {
  HeldPlans plans;
  ServedCoordinator served(ServedCoordinator::loopback(), {}, plans.sink());
  std::thread stepper([&] {
    ControlClient client = served.client();
    EXPECT_EQ(call(client, {{"op", "step"}})["step"], 0);
  });
  plans.wait_until_held();
  const auto health = http_get("127.0.0.1", served.server().metrics_port(), "/health");
  ASSERT_TRUE(health.ok()) << health.status();
  const json h = json::parse(*health);
  EXPECT_EQ(h["status"], "ok");
  EXPECT_EQ(h["stepping"], true);
  EXPECT_EQ(h["steps"], 1);
  const auto metrics = http_get("127.0.0.1", served.server().metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_THAT(*metrics, HasSubstr("\nkvfabric_steps_total 1\n"));
  EXPECT_THAT(*metrics, HasSubstr("\nkvfabric_control_connections 1\n"));
  plans.release();
  stepper.join();
  EXPECT_EQ(json::parse(*http_get("127.0.0.1", served.server().metrics_port(), "/health"))["stepping"],
            false);
}

// A drain (SIGTERM in kvfabric-serve) answers the request in progress, takes no new connection,
// says "draining" on /health, and then run() returns.
TEST(ControlServerTest, DrainAnswersTheRequestInProgressThenRunReturns) {
  HeldPlans plans;
  ServedCoordinator served(ServedCoordinator::loopback(), {}, plans.sink());
  const uint16_t port = served.server().port();
  std::thread stepper([&] {
    ControlClient client = served.client();
    EXPECT_EQ(call(client, {{"op", "step"}})["step"], 0);  // answered although draining
    // The connection closes after that reply.
    EXPECT_EQ(client.call(R"({"op": "stats"})").status().code(), ErrorCode::kUnavailable);
  });
  plans.wait_until_held();
  served.server().drain();
  // Not ready any more, and no new connection is taken.
  const auto health = http_get("127.0.0.1", served.server().metrics_port(), "/health");
  ASSERT_FALSE(health.ok());
  EXPECT_THAT(health.status().message(), HasSubstr("503"));
  EXPECT_THAT(health.status().message(), HasSubstr("draining"));
  // The io thread closes the acceptor soon after.
  bool refused = false;
  for (int i = 0; i < 500 && !refused; ++i) {
    refused = !ControlClient::connect("127.0.0.1", port).ok();
    if (!refused) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(refused);
  plans.release();
  stepper.join();
  EXPECT_TRUE(served.join().ok());
}

// Without a metrics endpoint the drain leaves the io thread nothing to wait on but the reply of
// the request in progress: it must still be sent.
TEST(ControlServerTest, DrainWithoutAMetricsEndpointStillAnswersTheRequestInProgress) {
  HeldPlans plans;
  ControlServerOptions options;  // no metrics_port
  options.http_timeout = std::chrono::milliseconds(20'000);  // the drain's limit: not reached
  ServedCoordinator served(options, {}, plans.sink());
  std::thread stepper([&] {
    ControlClient client = served.client();
    EXPECT_EQ(call(client, {{"op", "step"}})["step"], 0);
  });
  plans.wait_until_held();
  served.server().drain();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the acceptor closes meanwhile
  const auto released = std::chrono::steady_clock::now();
  plans.release();
  stepper.join();
  EXPECT_TRUE(served.join().ok());
  EXPECT_LT(std::chrono::steady_clock::now() - released, std::chrono::seconds(10));
}

// After a plan failed to reach the ranks, reads and /health still answer, changes are refused
// naming the cause, and run() returns the failure once the grace period is over.
TEST(ControlServerTest, AfterARankFaultReadsAnswerAndRunEndsWithTheFailure) {
  ControlServerOptions options = ServedCoordinator::loopback();
  options.fault_grace = std::chrono::milliseconds(200);
  ServedCoordinator served(options, {}, [](const StepPlan& plan) {
    return Status(ErrorCode::kUnavailable, "rank 1 (node-b) did not answer step " +
                                               std::to_string(plan.step) + " within 100 ms");
  });
  ControlClient client = served.client();
  const json step = call(client, {{"op", "step"}});
  EXPECT_EQ(step["error"]["code"], "Unavailable");
  EXPECT_THAT(step["error"]["message"].get<std::string>(),
              HasSubstr("rank 1 (node-b) did not answer step 0 within 100 ms"));
  EXPECT_EQ(call(client, {{"op", "stats"}})["ok"], true);
  EXPECT_EQ(call(client, {{"op", "admit"}, {"seq", 1}, {"tokens", {1}}})["error"]["code"],
            "Unavailable");
  const auto health = http_get("127.0.0.1", served.server().metrics_port(), "/health");
  EXPECT_EQ(health.status().code(), ErrorCode::kUnavailable);
  EXPECT_THAT(health.status().message(), HasSubstr("503 Service Unavailable"));
  EXPECT_THAT(health.status().message(), HasSubstr("rank 1 (node-b) did not answer step 0"));
  const Status ended = served.join();  // within fault_grace, without a stop() or shutdown
  EXPECT_EQ(ended.code(), ErrorCode::kUnavailable);
  EXPECT_THAT(ended.message(), HasSubstr("rank 1 (node-b)"));
}

// Regression: the grace ended only when no request was queued, so clients that kept asking kept
// a job with a dead rank serving for ever.
TEST(ControlServerTest, TheFaultGraceEndsWhileClientsKeepAsking) {
  ControlServerOptions options = ServedCoordinator::loopback();
  options.fault_grace = std::chrono::milliseconds(200);
  auto served = std::make_unique<ServedCoordinator>(options, ControlProtocolOptions{},
                                                    [](const StepPlan&) {
    return Status(ErrorCode::kUnavailable, "rank 1 (node-b) did not answer");
  });
  // Four clients poll with batches of reads that take longer to answer than to send, so that
  // a request is always queued, until the server goes away or for 5 s (so that a regression
  // fails instead of hanging).
  json reads = json::array();
  for (int i = 0; i < 200; ++i) reads.push_back({{"op", "stats"}});
  const std::string batch = reads.dump();
  const auto started = std::chrono::steady_clock::now();
  std::vector<std::thread> pollers;
  for (int i = 0; i < 4; ++i) {
    pollers.emplace_back([&, client = served->client()]() mutable {
      (void)client.call("{\"op\": \"step\"}");
      while (std::chrono::steady_clock::now() - started < std::chrono::seconds(5) &&
             client.call(batch).ok()) {
      }
    });
  }
  const Status status = served->join();
  const auto took = std::chrono::steady_clock::now() - started;
  served.reset();  // closes the connections that still wait for a reply
  for (std::thread& poller : pollers) poller.join();
  EXPECT_EQ(status.code(), ErrorCode::kUnavailable);
  EXPECT_LT(took, std::chrono::seconds(4)) << "the grace is 200 ms";
}

TEST(ControlServerTest, ConnectionsBeyondTheLimitAreRefusedNamingIt) {
  ControlServerOptions options = ServedCoordinator::loopback();
  options.max_connections = 2;
  ServedCoordinator served(options);
  auto first = std::make_unique<ControlClient>(served.client());
  ControlClient second = served.client();
  EXPECT_EQ(call(*first, {{"op", "hello"}})["ok"], true);
  EXPECT_EQ(call(second, {{"op", "hello"}})["ok"], true);
  ControlClient third = served.client();
  const json refused = call(third, {{"op", "hello"}});
  EXPECT_EQ(refused["error"]["code"], "ResourceExhausted");
  EXPECT_THAT(refused["error"]["message"].get<std::string>(),
              HasSubstr("at most 2 connections (server.max_connections)"));
  EXPECT_EQ(third.call("{\"op\": \"hello\"}").status().code(), ErrorCode::kUnavailable);
  EXPECT_EQ(served.server().stats().refused_connections, 1u);
  // A closed connection frees its place.
  first.reset();
  while (served.server().stats().connections > 1) std::this_thread::yield();
  ControlClient fourth = served.client();
  EXPECT_EQ(call(fourth, {{"op", "hello"}})["ok"], true);
}

// One address's connections hold at most max_connections_per_address places of an endpoint and
// displace nobody: its newcomers are refused, while clients from other addresses still get in
// (the loopback network is 127.0.0.0/8, so a client may connect from 127.0.0.2).
TEST(ControlServerTest, OneAddressHoldsAtMostItsShareOfThePlaces) {
  namespace asio = boost::asio;
  using asio::ip::tcp;
  ControlServerOptions options = ServedCoordinator::loopback();
  options.max_connections = 3;  // the refused newcomer must not take the third place either
  options.max_connections_per_address = 2;
  options.http_timeout = std::chrono::minutes(10);
  ServedCoordinator served(options);
  asio::io_context io;
  const auto connect_from = [&](const char* source, uint16_t port) {
    tcp::socket socket(io);
    socket.open(tcp::v4());
    socket.bind({asio::ip::make_address(source), 0});
    socket.connect({asio::ip::make_address("127.0.0.1"), port});
    return socket;
  };
  const auto hello_from = [&](const char* source) {
    tcp::socket socket = connect_from(source, served.server().port());
    asio::write(socket, asio::buffer(std::string("{\"op\": \"hello\"}\n")));
    std::string reply;
    asio::read_until(socket, asio::dynamic_buffer(reply), '\n');
    return std::pair{json::parse(reply.substr(0, reply.find('\n'))), std::move(socket)};
  };
  std::vector<tcp::socket> silent;  // never log in: the oldest would give way to a newcomer
  for (int i = 0; i < 2; ++i)
    silent.push_back(connect_from("127.0.0.1", served.server().port()));
  auto [refused, refused_socket] = hello_from("127.0.0.1");
  EXPECT_EQ(refused["error"]["code"], "ResourceExhausted") << refused;
  EXPECT_THAT(refused["error"]["message"].get<std::string>(),
              HasSubstr("at most 2 connections from one address "
                        "(server.max_connections_per_address)"));
  EXPECT_EQ(served.server().stats().displaced_connections, 0u);
  auto [other, other_socket] = hello_from("127.0.0.2");
  EXPECT_EQ(other["ok"], true) << other;
  EXPECT_EQ(served.server().stats().refused_connections, 1u);
  EXPECT_EQ(served.server().stats().address_refused_connections, 1u);
  // A place given back is the address's again.
  silent.pop_back();
  while (served.server().stats().connections > 2) std::this_thread::yield();
  auto [again, again_socket] = hello_from("127.0.0.1");
  EXPECT_EQ(again["ok"], true) << again;

  // The metrics endpoint counts its own connections the same way.
  const uint16_t http_port = served.server().metrics_port();
  std::vector<tcp::socket> probes;
  for (int i = 0; i < 2; ++i) probes.push_back(connect_from("127.0.0.1", http_port));
  const auto health = http_get("127.0.0.1", http_port, "/health");
  ASSERT_FALSE(health.ok());
  EXPECT_THAT(health.status().message(), HasSubstr("server.max_connections_per_address"));
  EXPECT_EQ(served.server().stats().address_refused_connections, 2u);
}

// Regression: silent HTTP connections were kept for idle_timeout (or for ever with 0), so a few
// hundred of them locked Prometheus and the health probes out; beyond the limit a probe got no
// answer at all. Now a probe takes the place of the oldest connection that sent no request.
TEST(ControlServerTest, SilentHttpConnectionsGiveWayToProbes) {
  ControlServerOptions options = ServedCoordinator::loopback();
  options.max_connections = 2;
  options.idle_timeout = std::chrono::milliseconds(0);  // never, for control connections
  options.http_timeout = std::chrono::minutes(10);
  ServedCoordinator served(options);
  const uint16_t port = served.server().metrics_port();
  boost::asio::io_context io;
  std::vector<boost::asio::ip::tcp::socket> silent;
  for (int i = 0; i < 2; ++i) {
    silent.emplace_back(io).connect({boost::asio::ip::make_address("127.0.0.1"), port});
  }
  while (served.server().stats().displaced_connections == 0) {
    const auto health = http_get("127.0.0.1", port, "/health");  // never a 503
    ASSERT_TRUE(health.ok()) << health.status();
  }
  EXPECT_EQ(served.server().stats().displaced_connections, 1u);
  EXPECT_EQ(served.server().stats().refused_connections, 0u);
  char byte = 0;
  boost::system::error_code ec;
  boost::asio::read(silent[0], boost::asio::buffer(&byte, 1), ec);  // the oldest gave way
  EXPECT_EQ(ec, boost::asio::error::eof);
  EXPECT_TRUE(http_get("127.0.0.1", port, "/health").ok());
  EXPECT_EQ(served.server().stats().displaced_connections, 1u);  // one silent one is left
}

// Regression: an HTTP connection that hung up before sending its request head kept its place
// until http_timeout, so a loop of TCP-only probes answered /health with 503.
TEST(ControlServerTest, HttpConnectionsThatHangUpLeaveAtOnce) {
  ControlServerOptions options = ServedCoordinator::loopback();
  options.max_connections = 2;
  options.http_timeout = std::chrono::minutes(10);
  ServedCoordinator served(options);
  const uint16_t port = served.server().metrics_port();
  boost::asio::io_context io;
  for (int i = 0; i < 40; ++i) {
    boost::asio::ip::tcp::socket probe(io);
    probe.connect({boost::asio::ip::make_address("127.0.0.1"), port});
    if (i % 2 == 0) boost::asio::write(probe, boost::asio::buffer(std::string("GET /hea")));
  }
  // Accepted after every hung-up one (one accept loop, in order). Some of those may give way
  // to later ones before they notice their end, but none may keep its place once it has: the
  // open count falls to zero (it stayed up for http_timeout).
  const auto health = http_get("127.0.0.1", port, "/health");
  EXPECT_TRUE(health.ok()) << health.status();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (served.server().stats().http_connections > 0 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(served.server().stats().http_connections, 0u);
}

TEST(ControlServerTest, AnIdleConnectionIsClosed) {
  ControlServerOptions options = ServedCoordinator::loopback();
  options.idle_timeout = std::chrono::milliseconds(50);
  ServedCoordinator served(options);
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket idle(io);
  idle.connect({boost::asio::ip::make_address("127.0.0.1"), served.server().port()});
  char byte = 0;
  boost::system::error_code ec;
  idle.read_some(boost::asio::buffer(&byte, 1), ec);  // returns when the server closes it
  EXPECT_EQ(ec, boost::asio::error::eof);
  EXPECT_EQ(served.server().stats().idle_closed, 1u);
  ControlClient active = served.client();
  EXPECT_EQ(call(active, {{"op", "hello"}})["ok"], true);
}

// Out of file descriptors, accept() fails at once every time it is called: the loop spun at 97 %
// CPU and logged 886 MB of warnings in 15 s. It now backs off (10 ms doubling to 1 s) and warns
// once until an accept succeeds.
TEST(ControlServerTest, AcceptBacksOffWhenOutOfFileDescriptors) {
#ifdef KVF_UBSAN_BUILD
  // With every descriptor taken, UBSan cannot open the pipe it probes memory through and reports
  // each virtual call as an invalid vptr; the plain build runs this test.
  GTEST_SKIP() << "UBSan's vptr check needs a free file descriptor";
#endif
  std::atomic<int> warnings{0};
  set_log_observer([&](Subsystem s, LogLevel level, std::string_view line) {
    if (s == Subsystem::kServer && level == LogLevel::kWarn && line.find("accept on") != std::string_view::npos) {
      ++warnings;
    }
  });
  ServedCoordinator served;
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket client(io);
  client.open(boost::asio::ip::tcp::v4());  // its descriptor is taken before the table fills
  // Take every free descriptor: the server cannot accept the client's connection.
  std::vector<int> hogs;
  for (int fd = dup(0); fd >= 0; fd = dup(0)) hogs.push_back(fd);
  ASSERT_EQ(errno, EMFILE);
  boost::system::error_code ec;
  // The clock starts before the connection exists: the server's first failed accept may come
  // before connect() returns here.
  const auto before_first_failure = std::chrono::steady_clock::now();
  client.connect({boost::asio::ip::make_address("127.0.0.1"), served.server().port()}, ec);
  ASSERT_FALSE(ec) << ec.message();
  while (served.server().stats().accept_errors < 4) std::this_thread::yield();
  const auto elapsed = std::chrono::steady_clock::now() - before_first_failure;
  for (int fd : hogs) close(fd);
  // The waiting connection is accepted at the next retry, and served.
  const std::string request = "{\"op\": \"hello\"}\n";
  boost::asio::write(client, boost::asio::buffer(request));
  std::string reply;
  boost::asio::read_until(client, boost::asio::dynamic_buffer(reply), '\n');
  EXPECT_EQ(json::parse(reply)["ok"], true);
  set_log_observer(nullptr);
  // Four failures take at least 10 + 20 + 40 ms of waiting; without back-off they take microseconds.
  EXPECT_GE(elapsed, std::chrono::milliseconds(70));
  EXPECT_EQ(warnings.load(), 1);
}

TEST(ControlServerTest, APublicAddressWithoutTlsIsWarnedAbout) {
  std::vector<std::string> warnings;
  set_log_observer([&](Subsystem, LogLevel level, std::string_view line) {
    if (level == LogLevel::kWarn) warnings.emplace_back(line);
  });
  Coordinator c = Coordinator::create(serving_config(1, 1, 4, 2, 16, 0)).value();
  const TenantDirectory tenants =
      TenantDirectory::parse("tenants: [{name: a, token: 0123456789abcdef}]", "inline").value();
  ControlProtocolOptions with_tokens;
  with_tokens.tenants = &tenants;
  ControlProtocol protocol(c, nullptr, with_tokens);
  ControlServerOptions loopback;
  ASSERT_TRUE(ControlServer::create(protocol, loopback).ok());
  EXPECT_TRUE(warnings.empty());
  ControlServerOptions everywhere;
  everywhere.address = "0.0.0.0";
  ASSERT_TRUE(ControlServer::create(protocol, everywhere).ok());
  set_log_observer(nullptr);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_THAT(warnings[0], HasSubstr("listens on 0.0.0.0 (every interface) without TLS"));
}

TEST(ControlServerTest, OptionsFromConfig) {
  ServerConfig config;
  config.port = 7000;
  config.metrics_port = 0;
  EXPECT_FALSE(ControlServerOptions::from(config).metrics_port.has_value());
  config.metrics_port = 9400;
  const ControlServerOptions o = ControlServerOptions::from(config);
  EXPECT_EQ(o.port, 7000);
  EXPECT_EQ(o.metrics_port, 9400);
  EXPECT_EQ(o.max_request_bytes, config.max_request_bytes);
  EXPECT_EQ(o.max_connections, config.max_connections);
  EXPECT_EQ(o.idle_timeout, std::chrono::milliseconds(config.idle_timeout_ms));
  EXPECT_EQ(o.fault_grace, std::chrono::milliseconds(config.fault_grace_ms));
}

}  // namespace
}  // namespace kvfabric
