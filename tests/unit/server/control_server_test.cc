#include "kvfabric/server/control_server.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <thread>

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
                             ControlProtocolOptions protocol_options = {})
      : coordinator_(Coordinator::create(serving_config(2, 1, 4, 2, 16, 4)).value()),
        protocol_(coordinator_, nullptr, protocol_options) {
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
}

}  // namespace
}  // namespace kvfabric
