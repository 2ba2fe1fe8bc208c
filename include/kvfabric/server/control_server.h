// The control plane's network side: the JSON-lines TCP endpoint and the /metrics HTTP endpoint.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "kvfabric/common/status.h"
#include "kvfabric/config/config.h"
#include "kvfabric/server/control_protocol.h"

namespace kvfabric {

//! What the network side has done (also on /metrics).
struct ControlServerStats {
  uint32_t connections = 0;          //!< control connections open now
  uint64_t refused_connections = 0;  //!< beyond max_connections
  uint64_t idle_closed = 0;          //!< closed after idle_timeout
  uint64_t accept_errors = 0;        //!< failed accepts, retried with back-off
  //! connections that had proven nothing (not logged in, no HTTP request head) closed to make
  //! room for a newcomer at max_connections
  uint64_t displaced_connections = 0;
  uint32_t http_connections = 0;  //!< HTTP (/metrics, /health) connections open now
  //! of refused_connections, those refused for max_connections_per_address
  uint64_t address_refused_connections = 0;
};

struct ControlServerOptions {
  std::string address = "127.0.0.1";     //!< an IPv4 or IPv6 literal
  uint16_t port = 0;                     //!< 0 picks a free port (see ControlServer::port())
  std::optional<uint16_t> metrics_port;  //!< HTTP /metrics and /health; none when empty, 0 = free port
  size_t max_request_bytes = 1u << 20;   //!< a longer line is refused and its connection closed
  uint32_t max_connections = 256;        //!< per endpoint; more are refused and closed
  //! Per endpoint and client IP address (0 = no limit): a newcomer from an address that holds
  //! this many is refused and closed, and displaces nobody.
  uint32_t max_connections_per_address = 0;
  std::chrono::milliseconds idle_timeout{300'000};  //!< 0: connections are never closed for idling
  std::chrono::milliseconds fault_grace{5'000};     //!< run() returns this long after a rank fault
  //! An HTTP connection must send its request and read the reply within this, whatever
  //! idle_timeout is: silent sockets would otherwise lock the scrapers and probes out.
  std::chrono::milliseconds http_timeout{10'000};
  //! A control connection must finish its TLS handshake and (with tenants) its hello within
  //! this, whatever idle_timeout is: connections that never log in would otherwise hold the
  //! max_connections slots.
  std::chrono::milliseconds login_timeout{10'000};
  //! TLS on the control connections: a PEM certificate chain and its key (both or neither).
  std::string tls_cert_file;
  std::string tls_key_file;

  //! The options of config.server (a metrics_port of 0 there means no metrics endpoint).
  static ControlServerOptions from(const ServerConfig& config);
};

//! \brief Serves a ControlProtocol over TCP (Boost.Asio): each connection sends requests, one JSON
//! line each, and reads one reply line per request, in order.
//!
//! Threads: run() starts an io thread for every socket and answers the control requests of all
//! connections one at a time on the thread that called it, in arrival order, so the protocol's
//! handle() (and its Coordinator and PlanSink) is only ever used from that thread; on rank 0 that
//! is the thread that initialized MPI and broadcasts the plans. While a step's plan runs on the
//! ranks, the sockets stay served and the HTTP endpoint answers `GET /metrics` (the protocol's
//! metrics and the server's own) and `GET /health` (200, or 503 with the problem once a plan
//! failed to reach the ranks).
//!
//! Limits: at most max_connections per endpoint (a further control connection gets one
//! ResourceExhausted line naming server.max_connections, a further HTTP one a 503, then each is
//! closed); a control connection that sends no request, or does not read its reply, for
//! idle_timeout is closed, an HTTP one after http_timeout; a failed accept (EMFILE:
//! out of file descriptors) is retried after 10 ms, doubling to 1 s, with one warning per run of
//! failures. The protocol limits batches and replies (ControlProtocolOptions).
//!
//! Security: a listen address that is not loopback is refused unless the protocol authenticates
//! (a tenants file); with a certificate both endpoints speak TLS 1.2 or later (HTTPS for
//! /metrics and /health); with tenants, /metrics answers only an admin's bearer token (401/403
//! otherwise), /health anyone.
//!
//! Faults: once the protocol has failed (a rank did not answer a plan), run() keeps answering
//! for fault_grace (reads, /health, Unavailable to changes), then returns the failure.
class ControlServer {
 public:
  //! Binds the endpoints (nothing is served until run()). Errors: an address that is not an IP
  //! literal (InvalidArgument), a port in use or not permitted (Unavailable), naming the
  //! endpoint; a public address without authentication (PermissionDenied); an unreadable
  //! certificate or key (InvalidArgument, naming the file).
  static Result<std::unique_ptr<ControlServer>> create(ControlProtocol& protocol,
                                                       const ControlServerOptions& options);
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  //! The bound ports (useful when 0 was asked for); metrics_port() is 0 without metrics.
  [[nodiscard]] uint16_t port() const;
  [[nodiscard]] uint16_t metrics_port() const;
  //! Callable from any thread.
  [[nodiscard]] ControlServerStats stats() const;

  //! Serves until stop(), an accepted shutdown request (after its reply is sent), or fault_grace
  //! after the protocol failed. Returns the protocol's failure(), if any.
  Status run();
  //! Makes run() return soon; callable from any thread, also before run().
  void stop();
  //! A graceful stop (SIGTERM): no new connections, /health answers 503 "draining", the
  //! requests already received are answered and each connection is closed after its reply; then
  //! run() returns. Callable from any thread (not from a signal handler).
  void drain();

 private:
  struct Impl;
  explicit ControlServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

//! How a ControlClient reaches a server that has TLS or tokens.
struct ControlClientOptions {
  bool tls = false;
  //! PEM file of the certificate authorities to trust; empty: the system's.
  std::string ca_file;
  //! The name the server's certificate must carry (and SNI); empty: the host connected to.
  std::string server_name;
  //! A tenant's token: connect() sends hello with it and fails (Unauthenticated) if refused, or
  //! ResourceExhausted when the server is full (server.max_connections, or the tenant's
  //! server.max_connections_per_tenant).
  std::string token;
};

//! \brief A blocking client of the control protocol, for schedulers and tools written in C++.
class ControlClient {
 public:
  //! Connects to `host` (a name or IP literal) at `port`; Unavailable when nobody answers (or
  //! the TLS handshake or the certificate check fails, with OpenSSL's reason).
  static Result<ControlClient> connect(const std::string& host, uint16_t port,
                                       const ControlClientOptions& options = {});
  ControlClient(ControlClient&&) noexcept;
  ControlClient& operator=(ControlClient&&) noexcept;
  ~ControlClient();

  //! Sends one request (a JSON object or batch array, without newline) and returns the reply
  //! line. A request holding a newline is InvalidArgument; a lost connection is Unavailable.
  Result<std::string> call(const std::string& request);
  //! The next line the server sends (after subscribe: a batch of KV events), waiting for it.
  Result<std::string> read_line();

 private:
  struct Impl;
  explicit ControlClient(std::unique_ptr<Impl> impl);
  // Closes the connection after a failed read or write; Unavailable naming the server and why.
  Status lost(const std::string& why);
  std::unique_ptr<Impl> impl_;
};

//! GETs `path` from an HTTP server (the metrics endpoint) and returns the body of a 200 reply;
//! another status is Unavailable naming it and quoting the body. With options.tls it speaks
//! HTTPS (the metrics endpoint of a server with a certificate); options.token is sent as
//! `Authorization: Bearer` (the metrics of a server with tenants).
Result<std::string> http_get(const std::string& host, uint16_t port, const std::string& path,
                             const ControlClientOptions& options = {});

}  // namespace kvfabric
