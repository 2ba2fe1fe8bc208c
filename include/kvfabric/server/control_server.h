// The control plane's network side: the JSON-lines TCP endpoint and the /metrics HTTP endpoint.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "kvfabric/common/status.h"
#include "kvfabric/config/config.h"
#include "kvfabric/server/control_protocol.h"

namespace kvfabric {

struct ControlServerOptions {
  std::string address = "127.0.0.1";     //!< an IPv4 or IPv6 literal
  uint16_t port = 0;                     //!< 0 picks a free port (see ControlServer::port())
  std::optional<uint16_t> metrics_port;  //!< HTTP GET /metrics; none when empty, 0 = free port
  size_t max_request_bytes = 1u << 20;   //!< a longer line is refused and its connection closed

  //! The options of config.server (a metrics_port of 0 there means no metrics endpoint).
  static ControlServerOptions from(const ServerConfig& config);
};

//! \brief Serves a ControlProtocol over TCP (Boost.Asio): each connection sends requests, one JSON
//! line each, and reads one reply line per request, in order. Requests from all connections run
//! one at a time on the thread that calls run(), so the protocol (and its Coordinator and
//! PlanSink) is only ever used from that thread; on rank 0 that is the thread that broadcasts
//! plans. The optional metrics endpoint answers `GET /metrics` with
//! ControlProtocol::metrics_text().
class ControlServer {
 public:
  //! Binds the endpoints (nothing is served until run()). Errors: an address that is not an IP
  //! literal (InvalidArgument), a port in use or not permitted (Unavailable), naming the
  //! endpoint.
  static Result<std::unique_ptr<ControlServer>> create(ControlProtocol& protocol,
                                                       const ControlServerOptions& options);
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  //! The bound ports (useful when 0 was asked for); metrics_port() is 0 without metrics.
  [[nodiscard]] uint16_t port() const;
  [[nodiscard]] uint16_t metrics_port() const;

  //! Serves until stop() or an accepted shutdown request (after its reply is sent). Returns the
  //! protocol's failure(), if any, once stopped.
  Status run();
  //! Makes run() return soon; callable from any thread, also before run().
  void stop();

 private:
  struct Impl;
  explicit ControlServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

//! \brief A blocking client of the control protocol, for schedulers and tools written in C++.
class ControlClient {
 public:
  //! Connects to `host` (a name or IP literal) at `port`; Unavailable when nobody answers.
  static Result<ControlClient> connect(const std::string& host, uint16_t port);
  ControlClient(ControlClient&&) noexcept;
  ControlClient& operator=(ControlClient&&) noexcept;
  ~ControlClient();

  //! Sends one request (a JSON object or batch array, without newline) and returns the reply
  //! line. A request holding a newline is InvalidArgument; a lost connection is Unavailable.
  Result<std::string> call(const std::string& request);

 private:
  struct Impl;
  explicit ControlClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

//! GETs `path` from an HTTP server (the metrics endpoint) and returns the body of a 200 reply;
//! another status is Unavailable naming it.
Result<std::string> http_get(const std::string& host, uint16_t port, const std::string& path);

}  // namespace kvfabric
