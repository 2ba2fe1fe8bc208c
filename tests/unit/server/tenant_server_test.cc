// Tenants over the control plane: the tenants file, authentication (hello, tokens, /metrics),
// isolation (another tenant's sequence is an unknown one, and nothing changes), the prefix-cache
// oracle closed, admin-only ops, a public address refused without tokens, and TLS over loopback.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <boost/asio.hpp>
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include "kvfabric/server/control_server.h"
#include "kvfabric/server/tenant_directory.h"
#include "testing/self_signed_cert.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using testing::serving_config;
using testing::token_run;

constexpr char kTenants[] = R"(tenants:
  - name: ops
    token: ops-token-0123456789
    admin: true
  - name: alice
    token: alice-token-0123456789
    max_sequences: 4
  - name: bob
    token: bob-token-0123456789
)";

TenantDirectory directory() {
  return TenantDirectory::parse(kTenants, "tenants.yaml").value();
}

TEST(TenantDirectoryTest, ParsesTenantsAndAuthenticatesOnlyTheirTokens) {
  const TenantDirectory d = directory();
  ASSERT_EQ(d.entries().size(), 3u);
  EXPECT_TRUE(d.entries()[0].admin);
  ASSERT_TRUE(d.entries()[1].quota.has_value());
  EXPECT_EQ(d.entries()[1].quota->max_sequences, 4u);
  EXPECT_FALSE(d.entries()[2].quota.has_value());
  EXPECT_EQ(d.authenticate("bob-token-0123456789")->name, "bob");
  EXPECT_FALSE(d.authenticate("bob-token-012345678").has_value());
  EXPECT_FALSE(d.authenticate("").has_value());
  EXPECT_FALSE(d.authenticate("alice-token-0123456789 ").has_value());
}

TEST(TenantDirectoryTest, RefusesBadFilesNamingTheProblem) {
  const std::pair<const char*, const char*> cases[] = {
      {"tenants: []\n", "empty"},
      {"users: []\n", "one key, 'tenants'"},
      {"tenants:\n  - name: a\n    token: short\n", "token of 16..512"},
      {"tenants:\n  - name: 'a b'\n    token: 0123456789abcdef\n", "[A-Za-z0-9._-]"},
      {"tenants:\n  - name: a\n    token: 0123456789abcdef\n    color: red\n",
       "unknown key 'color'"},
      {"tenants:\n  - name: a\n    token: 0123456789abcdef\n  - name: a\n    token: "
       "0123456789abcdeX\n",
       "'a' appears twice"},
      {"tenants:\n  - name: a\n    token: 0123456789abcdef\n  - name: b\n    token: "
       "0123456789abcdef\n",
       "reuses a token"},
      {"tenants:\n  - name: a\n    token: 0123456789abcdef\n    admin: yes\n", "true or false"},
      {"tenants:\n  - name: a\n    token: 0123456789abcdef\n    max_blocks: -1\n", "max_blocks"},
      {"tenants:\n  - name: a\n    token: 0123456789abcdef\n    max_blocks: +5\n", "max_blocks"},
      {"tenants:\n  - name: a\n    token: 0123456789abcdef\n    max_sequences: ' 5'\n",
       "max_sequences"},
      {"tenants:\n  - name: a\n    token: 0123456789abcdef\n    max_blocks: 4\n"
       "    max_host_blocks: 8\n",
       "tenant 'a': max_host_blocks (8) exceeds max_blocks (4)"},
      {"tenants:\n  - name: a\n    token: 0123456789abcdef\n---\ntenants:\n  - name: b\n",
       "tenants.yaml:4: a second YAML document"},
      {"tenants: [", "tenants.yaml"},
      {"tenants:\n  - {[a]: 1}\n", "tenants.yaml"},
  };
  for (const auto& [text, message] : cases) {
    const auto parsed = TenantDirectory::parse(text, "tenants.yaml");
    ASSERT_FALSE(parsed.ok()) << text;
    EXPECT_THAT(parsed.status().message(), HasSubstr(message)) << text;
  }
  const auto deep = TenantDirectory::parse(
      "tenants: " + std::string(3000, '[') + std::string(3000, ']'), "tenants.yaml");
  EXPECT_THAT(deep.status().message(), HasSubstr("tenants.yaml:1: nested too deeply")) << deep.status();
  EXPECT_EQ(TenantDirectory::load("/nonexistent/tenants.yaml").status().code(),
            ErrorCode::kIoError);
}

// A protocol with the tenants above; each caller is a connection's identity.
class TenantProtocolTest : public ::testing::Test {
 protected:
  TenantProtocolTest()
      : tenants_(directory()),
        coordinator_(Coordinator::create(serving_config(2, 1, 4, 2, 64, 8)).value()),
        protocol_(coordinator_, nullptr, [&] {
          ControlProtocolOptions o;
          o.tenants = &tenants_;
          o.allow_shutdown = true;
          return o;
        }()) {
    login(ops_, "ops-token-0123456789");
    login(alice_, "alice-token-0123456789");
    login(bob_, "bob-token-0123456789");
  }

  void login(ControlIdentity& who, const std::string& token) {
    who = protocol_.new_connection();
    const json reply = call(who, {{"op", "hello"}, {"token", token}});
    ASSERT_EQ(reply["ok"], true) << reply;
  }
  json call(ControlIdentity& who, const json& request) {
    return json::parse(protocol_.handle(request.dump(), who));
  }
  std::string code(const json& reply) { return reply["error"].value("code", ""); }
  // What the admin sees of everything, to compare before and after a refused request.
  std::string everything() {
    json seen = call(ops_, {{"op", "stats"}});
    for (int s = 0; s < 16; ++s)
      seen["q" + std::to_string(s)] = call(ops_, {{"op", "query"}, {"seq", s}});
    return seen.dump();
  }

  TenantDirectory tenants_;
  Coordinator coordinator_;
  ControlProtocol protocol_;
  ControlIdentity ops_, alice_, bob_;
};

TEST_F(TenantProtocolTest, NothingButHelloBeforeAValidToken) {
  ControlIdentity fresh = protocol_.new_connection();
  EXPECT_FALSE(fresh.authenticated);
  for (const char* op : {"stats", "step", "query", "admit"}) {
    const json reply = call(fresh, {{"op", op}});
    EXPECT_EQ(code(reply), "Unauthenticated") << reply;
  }
  EXPECT_EQ(code(call(fresh, {{"op", "hello"}})), "Unauthenticated");
  EXPECT_EQ(code(call(fresh, {{"op", "hello"}, {"token", "guess-guess-guess-guess"}})),
            "Unauthenticated");
  EXPECT_FALSE(fresh.authenticated);
  EXPECT_TRUE(fresh.refused);  // after a wrong token even the right one is refused
  EXPECT_EQ(code(call(fresh, {{"op", "hello"}, {"token", "bob-token-0123456789"}})),
            "Unauthenticated");
  EXPECT_FALSE(fresh.authenticated);
  fresh = protocol_.new_connection();  // a new connection
  const json hello = call(fresh, {{"op", "hello"}, {"token", "bob-token-0123456789"}});
  EXPECT_EQ(hello["tenant"], "bob");
  EXPECT_EQ(hello["admin"], false);
  // Once per connection.
  EXPECT_EQ(code(call(fresh, {{"op", "hello"}, {"token", "ops-token-0123456789"}})),
            "InvalidOperation");
  EXPECT_EQ(fresh.tenant, "bob");
  EXPECT_EQ(call(fresh, {{"op", "hello"}})["tenant"], "bob");  // a plain hello still answers
}

// One tenant cannot take every place of server.max_connections: beyond its own limit its
// hello is refused (the connection stays unauthenticated) until one of its connections goes.
TEST(TenantConnectionLimit, ATenantHoldsAtMostItsConnectionsAndAdminsAreNotCounted) {
  const TenantDirectory tenants = directory();
  Coordinator coordinator = Coordinator::create(serving_config(1, 1, 4, 2, 16, 0)).value();
  ControlProtocolOptions options;
  options.tenants = &tenants;
  options.max_connections_per_tenant = 2;
  ControlProtocol protocol(coordinator, nullptr, options);
  const auto hello = [&](ControlIdentity& who, const std::string& token) {
    who = protocol.new_connection();
    return json::parse(protocol.handle(json{{"op", "hello"}, {"token", token}}.dump(), who));
  };
  std::vector<ControlIdentity> alice(3), ops(3);
  EXPECT_EQ(hello(alice[0], "alice-token-0123456789")["ok"], true);
  EXPECT_EQ(hello(alice[1], "alice-token-0123456789")["ok"], true);
  const json third = hello(alice[2], "alice-token-0123456789");
  EXPECT_EQ(third["error"]["code"], "ResourceExhausted");
  EXPECT_EQ(third["error"]["message"],
            "hello: tenant 'alice' already holds 2 connections "
            "(server.max_connections_per_tenant); close one first");
  EXPECT_FALSE(alice[2].authenticated);
  ControlIdentity bob;
  EXPECT_EQ(hello(bob, "bob-token-0123456789")["ok"], true);  // another tenant's own count
  for (ControlIdentity& admin : ops) EXPECT_EQ(hello(admin, "ops-token-0123456789")["ok"], true);
  alice[0] = ControlIdentity{};  // that connection went
  EXPECT_EQ(hello(alice[2], "alice-token-0123456789")["ok"], true);
  ControlIdentity copy = alice[1];  // a copy is the same connection's place, not a new one
  alice[1] = ControlIdentity{};
  ControlIdentity fourth;
  EXPECT_EQ(hello(fourth, "alice-token-0123456789")["error"]["code"], "ResourceExhausted");
  copy = ControlIdentity{};
  EXPECT_EQ(hello(fourth, "alice-token-0123456789")["ok"], true);
  ServerConfig server;
  server.max_connections_per_tenant = 3;
  EXPECT_EQ(ControlProtocolOptions::from(server).max_connections_per_tenant, 3u);
}

TEST_F(TenantProtocolTest, EveryOpOnAnotherTenantsSequenceIsRefusedAsUnknownAndChangesNothing) {
  ASSERT_EQ(call(alice_, {{"op", "admit"}, {"seq", 1}, {"tokens", token_run(40, 1)}})["ok"], true);
  ASSERT_EQ(call(ops_, {{"op", "step"}})["ok"], true);
  const std::string before = everything();
  const json unknown = call(bob_, {{"op", "append"}, {"seq", 9}, {"num_tokens", 1}});
  const std::vector<json> requests = {
      {{"op", "append"}, {"seq", 1}, {"num_tokens", 1}},
      {{"op", "fork"}, {"src", 1}, {"dst", 2}},
      {{"op", "fork"}, {"src", 1}, {"dst", 2}, {"replica", 1}},
      {{"op", "free"}, {"seq", 1}},
      {{"op", "set_priority"}, {"seq", 1}, {"priority", 0}},
      {{"op", "query"}, {"seq", 1}},
  };
  for (const json& request : requests) {
    const json reply = call(bob_, request);
    EXPECT_EQ(code(reply), "SequenceNotFound") << request << reply;
    EXPECT_EQ(reply["error"]["message"], "Sequence not found: S1") << reply;
  }
  EXPECT_EQ(unknown["error"]["message"], "Sequence not found: S9");
  EXPECT_EQ(everything(), before);
  // The owner and the admin may.
  EXPECT_EQ(call(alice_, {{"op", "query"}, {"seq", 1}})["ok"], true);
  EXPECT_EQ(call(ops_, {{"op", "append"}, {"seq", 1}, {"num_tokens", 1}})["ok"], true);
}

TEST_F(TenantProtocolTest, StepShutdownAndClusterStatsAreAnAdminsOnly) {
  for (const char* op : {"step", "shutdown", "subscribe", "reset_prefix_cache"}) {
    const json reply = call(alice_, {{"op", op}});
    EXPECT_EQ(code(reply), "PermissionDenied") << reply;
    EXPECT_THAT(reply["error"]["message"].get<std::string>(),
                HasSubstr("tenant 'alice' is not one"));
  }
  EXPECT_FALSE(protocol_.shutdown_requested());
  // Every replica's load and room, as stats shows them to an admin only.
  const json costs = call(alice_, {{"op", "admission_costs"}, {"tokens", token_run(20, 1)}});
  EXPECT_EQ(code(costs), "PermissionDenied") << costs;
  EXPECT_EQ(call(ops_, {{"op", "admission_costs"}, {"tokens", token_run(20, 1)}})["ok"], true);
  ASSERT_EQ(call(bob_, {{"op", "admit"}, {"seq", 5}, {"tokens", token_run(20, 1)}})["ok"], true);
  const json mine = call(alice_, {{"op", "stats"}});
  EXPECT_EQ(mine["tenant"], "alice");
  EXPECT_EQ(mine["admitted"], 0);
  EXPECT_EQ(mine["quota"]["max_sequences"], 4);
  EXPECT_FALSE(mine.contains("replicas"));
  EXPECT_FALSE(mine.contains("tenants"));
  const json all = call(ops_, {{"op", "stats"}});
  EXPECT_EQ(all["tenants"]["bob"]["admitted"], 1);
  // No connection can be the default tenant "" when a tenants file names everyone.
  EXPECT_FALSE(all["tenants"].contains("")) << all["tenants"];
  EXPECT_EQ(all["replicas"].size(), 2u);
  EXPECT_EQ(call(ops_, {{"op", "shutdown"}})["ok"], true);
}

// The attack that found the leak: guess a prompt, read cached_tokens.
TEST_F(TenantProtocolTest, ThePrefixCacheOracleIsClosed) {
  const auto secret = token_run(48, 5000);
  ASSERT_EQ(call(alice_, {{"op", "admit"}, {"seq", 1}, {"tokens", secret}})["ok"], true);
  call(ops_, {{"op", "step"}});
  call(ops_, {{"op", "step"}});
  std::vector<TokenId> first_block_right = token_run(48, 1);
  std::copy_n(secret.begin(), 16, first_block_right.begin());
  uint64_t seq = 10;
  for (const auto& guess : {token_run(48, 1), first_block_right, secret}) {
    const json placed = call(bob_, {{"op", "admit"}, {"seq", seq}, {"tokens", guess}});
    ASSERT_EQ(placed["ok"], true) << placed;
    EXPECT_EQ(placed["cached_tokens"], 0) << placed;
    EXPECT_EQ(placed["migrated_tokens"], 0) << placed;
    call(bob_, {{"op", "free"}, {"seq", seq++}});
  }
  // Bob giving Alice's name as his salt reaches nothing either; Alice herself hits.
  const json salted =
      call(bob_, {{"op", "admit"}, {"seq", 20}, {"tokens", secret}, {"cache_salt", "alice"}});
  EXPECT_EQ(salted["cached_tokens"], 0) << salted;
  EXPECT_EQ(call(alice_, {{"op", "admit"}, {"seq", 21}, {"tokens", secret}})["cached_tokens"], 48);
}

TEST_F(TenantProtocolTest, PublicTokensAreSharedAcrossTenantsAndQuotasApply) {
  auto prompt = token_run(32, 1);
  const auto question = token_run(16, 900);
  prompt.insert(prompt.end(), question.begin(), question.end());
  ASSERT_EQ(
      call(alice_, {{"op", "admit"}, {"seq", 1}, {"tokens", prompt}, {"public_tokens", 32}})["ok"],
      true);
  call(ops_, {{"op", "step"}});
  call(ops_, {{"op", "step"}});
  const json bob =
      call(bob_, {{"op", "admit"}, {"seq", 2}, {"tokens", prompt}, {"public_tokens", 32}});
  EXPECT_EQ(bob["cached_tokens"], 32) << bob;
  EXPECT_EQ(code(call(bob_, {{"op", "admit"}, {"seq", 3}, {"tokens", {1}}, {"cache_salt", 7}})),
            "InvalidArgument");
  // Alice's own quota (the tenants file): 4 sequences.
  for (uint64_t s = 10; s < 13; ++s) {
    ASSERT_EQ(call(alice_, {{"op", "admit"}, {"seq", s}, {"tokens", token_run(8, 100 * s)}})["ok"],
              true);
  }
  const json over = call(alice_, {{"op", "admit"}, {"seq", 13}, {"tokens", {1, 2}}});
  EXPECT_EQ(code(over), "ResourceExhausted");
  EXPECT_THAT(over["error"]["message"].get<std::string>(), HasSubstr("max_sequences"));
}

// --- over TCP -------------------------------------------------------------------------------

// A dp-1 coordinator served with the tenants above, its event loop on a thread until destroyed.
class ServedWithTenants {
 public:
  explicit ServedWithTenants(const ControlServerOptions& options)
      : coordinator_(Coordinator::create(serving_config(1, 1, 4, 2, 16, 0)).value()),
        tenants_(directory()),
        protocol_(coordinator_, nullptr, [&] {
          ControlProtocolOptions o;
          o.tenants = &tenants_;
          return o;
        }()) {
    auto server = ControlServer::create(protocol_, options);
    KVF_CHECK(server.ok(), server.status().to_string());
    server_ = std::move(server).value();
    loop_ = std::thread([this] { (void)server_->run(); });
  }
  ~ServedWithTenants() {
    server_->stop();
    loop_.join();
  }
  ControlServer& server() { return *server_; }

 private:
  Coordinator coordinator_;
  TenantDirectory tenants_;
  ControlProtocol protocol_;
  std::unique_ptr<ControlServer> server_;
  std::thread loop_;
};

class TenantServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("kvf-tls-" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
    cert_ = testing::write_self_signed_cert(dir_, "server");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // TLS with tenants, max_connections places, and a login deadline no test waits for.
  ControlServerOptions tls_options(uint32_t max_connections) const {
    ControlServerOptions so;
    so.max_connections = max_connections;
    so.login_timeout = std::chrono::minutes(10);
    so.tls_cert_file = cert_.cert;
    so.tls_key_file = cert_.key;
    return so;
  }
  ControlClientOptions ops_over_tls() const {
    ControlClientOptions ops;
    ops.token = "ops-token-0123456789";
    ops.tls = true;
    ops.ca_file = cert_.cert;
    return ops;
  }

  std::filesystem::path dir_;
  testing::PemFiles cert_;
};

// Polls `sockets` until `expected` of them have been closed by the server (they read EOF or a
// reset) or 5 s pass; which ones were.
std::vector<bool> closed_by_server(std::vector<boost::asio::ip::tcp::socket>& sockets,
                                   size_t expected) {
  std::vector<bool> closed(sockets.size(), false);
  size_t count = 0;
  for (auto& socket : sockets) socket.non_blocking(true);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (count < expected && std::chrono::steady_clock::now() < deadline) {
    for (size_t i = 0; i < sockets.size(); ++i) {
      if (closed[i]) continue;
      char byte = 0;
      boost::system::error_code ec;
      sockets[i].read_some(boost::asio::buffer(&byte, 1), ec);
      if (ec == boost::asio::error::eof || ec == boost::asio::error::connection_reset) {
        closed[i] = true;
        ++count;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return closed;
}

TEST_F(TenantServerTest, APublicAddressNeedsTokens) {
  Coordinator c = Coordinator::create(serving_config(1, 1, 4, 2, 16, 0)).value();
  ControlProtocol open(c);
  ControlServerOptions everywhere;
  everywhere.address = "0.0.0.0";
  const auto refused = ControlServer::create(open, everywhere);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(refused.status().message(), HasSubstr("server.tenants_file"));
  const TenantDirectory tenants = directory();
  ControlProtocolOptions with_tokens;
  with_tokens.tenants = &tenants;
  ControlProtocol guarded(c, nullptr, with_tokens);
  EXPECT_TRUE(ControlServer::create(guarded, everywhere).ok());
}

TEST_F(TenantServerTest, TlsRoundTripWithTokensAndGuardedMetrics) {
  ControlServerOptions so;
  so.metrics_port = 0;
  so.tls_cert_file = cert_.cert;
  so.tls_key_file = cert_.key;
  ServedWithTenants served(so);
  const uint16_t port = served.server().port();

  ControlClientOptions tls;
  tls.tls = true;
  tls.ca_file = cert_.cert;
  tls.token = "alice-token-0123456789";
  {
    auto alice = ControlClient::connect("127.0.0.1", port, tls);
    ASSERT_TRUE(alice.ok()) << alice.status();
    const auto placed =
        alice->call(json{{"op", "admit"}, {"seq", 1}, {"tokens", {1, 2, 3}}}.dump());
    ASSERT_TRUE(placed.ok());
    EXPECT_EQ(json::parse(*placed)["ok"], true) << *placed;
  }
  // A wrong token, a certificate for another name, and plain TCP to a TLS port all fail.
  ControlClientOptions wrong = tls;
  wrong.token = "alice-token-9999999999";
  EXPECT_EQ(ControlClient::connect("127.0.0.1", port, wrong).status().code(),
            ErrorCode::kUnauthenticated);
  ControlClientOptions other_name = tls;
  other_name.server_name = "kvfabric.example";
  const auto mismatch = ControlClient::connect("127.0.0.1", port, other_name);
  EXPECT_EQ(mismatch.status().code(), ErrorCode::kUnavailable);
  EXPECT_THAT(mismatch.status().message(), HasSubstr("TLS handshake"));
  const testing::PemFiles stranger = testing::write_self_signed_cert(dir_, "stranger");
  ControlClientOptions untrusted = tls;
  untrusted.ca_file = stranger.cert;
  EXPECT_EQ(ControlClient::connect("127.0.0.1", port, untrusted).status().code(),
            ErrorCode::kUnavailable);
  auto plain = ControlClient::connect("127.0.0.1", port);
  if (plain.ok()) {
    EXPECT_FALSE(plain->call(R"({"op":"hello"})").ok());
  }

  // /metrics (HTTPS, like the control port): an admin's bearer token only; /health: anyone.
  const uint16_t metrics = served.server().metrics_port();
  ControlClientOptions https;
  https.tls = true;
  https.ca_file = cert_.cert;
  EXPECT_THAT(http_get("127.0.0.1", metrics, "/metrics", https).status().message(),
              HasSubstr("401"));
  https.token = "bob-token-0123456789";
  EXPECT_THAT(http_get("127.0.0.1", metrics, "/metrics", https).status().message(),
              HasSubstr("403"));
  https.token = "ops-token-0123456789";
  const auto text = http_get("127.0.0.1", metrics, "/metrics", https);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_THAT(*text, HasSubstr("kvfabric_tenant_admitted_total{tenant=\"alice\"} 1"));
  https.token.clear();
  EXPECT_TRUE(http_get("127.0.0.1", metrics, "/health", https).ok());
  ControlClientOptions plain_http;
  plain_http.token = "ops-token-0123456789";
  EXPECT_FALSE(http_get("127.0.0.1", metrics, "/metrics", plain_http).ok());  // no clear text
}

// Connections that never log in, or guess a token, do not keep their slot.
TEST_F(TenantServerTest, AWrongTokenOrNoLoginClosesTheConnection) {
  ControlServerOptions so;
  so.login_timeout = std::chrono::milliseconds(200);
  ServedWithTenants served(so);
  const uint16_t port = served.server().port();

  auto guesser = ControlClient::connect("127.0.0.1", port).value();
  const auto batch = guesser.call(
      R"([{"op":"hello","token":"guess-number-one-0000"},{"op":"hello","token":"ops-token-0123456789"}])");
  ASSERT_TRUE(batch.ok());
  const json replies = json::parse(*batch);
  EXPECT_THAT(replies[0]["error"]["message"].get<std::string>(),
              HasSubstr("closing the connection"));
  EXPECT_THAT(replies[1]["error"]["message"].get<std::string>(), HasSubstr("wrong token"));
  EXPECT_FALSE(guesser.call(R"({"op":"hello"})").ok());  // closed

  auto idle = ControlClient::connect("127.0.0.1", port).value();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  EXPECT_FALSE(idle.call(R"({"op":"hello","token":"ops-token-0123456789"})").ok());

  ControlClientOptions ok;
  ok.token = "ops-token-0123456789";
  auto ops = ControlClient::connect("127.0.0.1", port, ok);
  ASSERT_TRUE(ops.ok()) << ops.status();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // logged in: the deadline is off
  EXPECT_TRUE(ops->call(R"({"op":"stats"})").ok());
}

// Regression: a connection that hung up before logging in (or before its TLS handshake ended)
// was kept until login_timeout by its timer, so connecting and closing in a loop, with no token,
// held every place and locked every client out.
TEST_F(TenantServerTest, ConnectionsThatHangUpBeforeLoggingInLeaveAtOnce) {
  for (const bool tls : {false, true}) {
    SCOPED_TRACE(tls ? "TLS" : "plain TCP");
    ControlServerOptions so;
    so.max_connections = 4;
    so.login_timeout = std::chrono::minutes(10);
    if (tls) {
      so.tls_cert_file = cert_.cert;
      so.tls_key_file = cert_.key;
    }
    ServedWithTenants served(so);
    const uint16_t port = served.server().port();
    boost::asio::io_context io;
    for (int i = 0; i < 40; ++i) {  // plain TCP to a TLS port fails its handshake
      boost::asio::ip::tcp::socket hang_up(io);
      hang_up.connect({boost::asio::ip::make_address("127.0.0.1"), port});
      if (i % 2 == 0) boost::asio::write(hang_up, boost::asio::buffer(std::string("{\"op\"")));
    }
    ControlClientOptions ops;
    ops.token = "ops-token-0123456789";
    ops.tls = tls;
    ops.ca_file = tls ? cert_.cert : "";
    // Accepted after every hung-up one; the count then falls to this one alone (the hung-up
    // ones kept their places for login_timeout).
    auto client = ControlClient::connect("127.0.0.1", port, ops);
    ASSERT_TRUE(client.ok()) << client.status();
    EXPECT_TRUE(client->call(R"({"op":"stats"})").ok());
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (served.server().stats().connections > 1 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    EXPECT_EQ(served.server().stats().connections, 1u);
    // A full server refuses the connection, not the token.
    std::vector<ControlClient> others;
    for (int i = 0; i < 3; ++i) others.push_back(ControlClient::connect("127.0.0.1", port, ops).value());
    const auto full = ControlClient::connect("127.0.0.1", port, ops);
    EXPECT_EQ(full.status().code(), ErrorCode::kResourceExhausted) << full.status();
    EXPECT_THAT(full.status().message(), HasSubstr("refused the connection: the control plane "
                                                   "serves at most 4 connections"));
  }
}

// A host over server.max_connections_per_address crowds nobody out: its refused newcomers (here
// TLS connections that never start their handshake) take no place of max_connections and are
// closed at once, so a client from another address neither displaces nor is refused, and the
// refused ones cannot pile up descriptors until login_timeout.
TEST_F(TenantServerTest, ConnectionsRefusedForTheirAddressTakeNoPlace) {
  ControlServerOptions so = tls_options(3);
  so.max_connections_per_address = 2;
  ServedWithTenants served(so);
  const uint16_t port = served.server().port();
  boost::asio::io_context io;
  std::vector<boost::asio::ip::tcp::socket> flood;  // from 127.0.0.2; the clients below: .1
  for (int i = 0; i < 12; ++i) {
    boost::asio::ip::tcp::socket& socket = flood.emplace_back(io);
    socket.open(boost::asio::ip::tcp::v4());
    socket.bind({boost::asio::ip::make_address("127.0.0.2"), 0});
    socket.connect({boost::asio::ip::make_address("127.0.0.1"), port});
  }
  while (served.server().stats().address_refused_connections < 10) std::this_thread::yield();
  EXPECT_EQ(served.server().stats().connections, 2u);
  // Nor do they hold a descriptor each until login_timeout: the server closed them at once.
  const std::vector<bool> closed = closed_by_server(flood, 10);
  for (size_t i = 2; i < flood.size(); ++i) EXPECT_TRUE(closed[i]) << "flood connection " << i;
  const ControlClientOptions ops = ops_over_tls();
  auto client = ControlClient::connect("127.0.0.1", port, ops);
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_TRUE(client->call(R"({"op":"stats"})").ok());
  EXPECT_EQ(served.server().stats().displaced_connections, 0u);
  EXPECT_EQ(served.server().stats().connections, 3u);
}

// At a server whose every place is logged in, a TLS newcomer's refusal waits for its handshake;
// at most max_connections such refusals wait, and further newcomers are closed at once, so a
// flood of connections that never handshake cannot pile up descriptors until login_timeout.
TEST_F(TenantServerTest, RefusalsWaitingForAHandshakeAreBounded) {
  ServedWithTenants served(tls_options(2));
  const uint16_t port = served.server().port();
  const ControlClientOptions ops = ops_over_tls();
  std::vector<ControlClient> clients;
  for (int i = 0; i < 2; ++i) clients.push_back(ControlClient::connect("127.0.0.1", port, ops).value());
  boost::asio::io_context io;
  std::vector<boost::asio::ip::tcp::socket> flood;
  for (int i = 0; i < 10; ++i) {
    flood.emplace_back(io).connect({boost::asio::ip::make_address("127.0.0.1"), port});
  }
  while (served.server().stats().refused_connections < 10) std::this_thread::yield();
  const std::vector<bool> is_closed = closed_by_server(flood, 8);
  const auto closed = std::count(is_closed.begin(), is_closed.end(), true);
  EXPECT_EQ(closed, 8) << "two refusals wait for their handshake, the rest are closed";
  for (size_t i = 0; i < flood.size(); ++i) {  // the two waiting ones are still open
    if (is_closed[i]) continue;
    char byte = 0;
    boost::system::error_code ec;
    flood[i].read_some(boost::asio::buffer(&byte, 1), ec);
    EXPECT_EQ(ec, boost::asio::error::would_block) << "flood connection " << i;
  }
  for (auto& client : clients) EXPECT_TRUE(client.call(R"({"op":"stats"})").ok());
}

// Connections that sit there without logging in cannot lock out clients that log in: at
// max_connections a newcomer takes the place of the oldest of them. Logged-in ones keep theirs.
TEST_F(TenantServerTest, ConnectionsThatDoNotLogInGiveWayToNewcomers) {
  ControlServerOptions so;
  so.max_connections = 4;
  so.login_timeout = std::chrono::minutes(10);
  ServedWithTenants served(so);
  const uint16_t port = served.server().port();
  boost::asio::io_context io;
  std::vector<boost::asio::ip::tcp::socket> silent;
  for (int i = 0; i < 4; ++i) {
    silent.emplace_back(io).connect({boost::asio::ip::make_address("127.0.0.1"), port});
  }
  while (served.server().stats().connections < 4) std::this_thread::yield();
  ControlClientOptions ops;
  ops.token = "ops-token-0123456789";
  std::vector<ControlClient> clients;
  for (int i = 0; i < 4; ++i) {
    auto client = ControlClient::connect("127.0.0.1", port, ops);
    ASSERT_TRUE(client.ok()) << client.status();
    clients.push_back(std::move(client).value());
  }
  EXPECT_EQ(served.server().stats().displaced_connections, 4u);
  for (auto& socket : silent) {  // each was closed, oldest first
    char byte = 0;
    boost::system::error_code ec;
    boost::asio::read(socket, boost::asio::buffer(&byte, 1), ec);
    EXPECT_EQ(ec, boost::asio::error::eof);
  }
  const auto full = ControlClient::connect("127.0.0.1", port, ops);  // every place logged in
  EXPECT_EQ(full.status().code(), ErrorCode::kResourceExhausted) << full.status();
  EXPECT_EQ(served.server().stats().refused_connections, 1u);
  for (auto& client : clients) EXPECT_TRUE(client.call(R"({"op":"stats"})").ok());
}

TEST_F(TenantServerTest, AnUnreadableCertificateOrKeyIsNamed) {
  Coordinator c = Coordinator::create(serving_config(1, 1, 4, 2, 16, 0)).value();
  ControlProtocol protocol(c);
  ControlServerOptions so;
  so.tls_cert_file = (dir_ / "missing.crt").string();
  so.tls_key_file = cert_.key;
  auto bad = ControlServer::create(protocol, so);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("server.tls_cert_file"));
  const testing::PemFiles other = testing::write_self_signed_cert(dir_, "other");
  so.tls_cert_file = cert_.cert;
  so.tls_key_file = other.key;  // not this certificate's key
  bad = ControlServer::create(protocol, so);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("server.tls_key_file"));
}

}  // namespace
}  // namespace kvfabric
