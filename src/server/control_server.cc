#include "kvfabric/server/control_server.h"

#include <boost/asio.hpp>

#include <memory>
#include <optional>
#include <string_view>
#include <utility>

#include "common/log.h"

namespace kvfabric {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using ErrorCodeT = boost::system::error_code;

// The request head of the metrics endpoint may not exceed this.
constexpr size_t kMaxHttpHeadBytes = 8192;

std::string endpoint_text(const tcp::endpoint& e) {
  return e.address().to_string() + ":" + std::to_string(e.port());
}

Result<tcp::acceptor> listen(asio::io_context& io, const asio::ip::address& address, uint16_t port,
                             std::string_view what) {
  const tcp::endpoint endpoint(address, port);
  tcp::acceptor acceptor(io);
  ErrorCodeT ec;
  acceptor.open(endpoint.protocol(), ec);
  if (!ec) acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor.bind(endpoint, ec);
  if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return Status(ErrorCode::kUnavailable, "cannot listen for the " + std::string(what) + " on " +
                                               endpoint_text(endpoint) + ": " + ec.message());
  }
  return acceptor;
}

std::string http_response(std::string_view status, std::string_view type, const std::string& body) {
  return "HTTP/1.1 " + std::string(status) + "\r\nContent-Type: " + std::string(type) +
         "\r\nContent-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" +
         body;
}

// Answers an HTTP request head; `metrics` renders the body of GET /metrics.
template <typename Metrics>
std::string http_reply(std::string_view head, const Metrics& metrics) {
  const std::string_view request_line = head.substr(0, head.find("\r\n"));
  const size_t method_end = request_line.find(' ');
  const size_t path_end =
      request_line.find(' ', method_end == std::string_view::npos ? 0 : method_end + 1);
  if (method_end == std::string_view::npos || path_end == std::string_view::npos ||
      request_line.substr(path_end + 1).rfind("HTTP/", 0) != 0) {
    return http_response("400 Bad Request", "text/plain", "not an HTTP request line\n");
  }
  const std::string_view method = request_line.substr(0, method_end);
  const std::string_view target = request_line.substr(method_end + 1, path_end - method_end - 1);
  if (method != "GET")
    return http_response("405 Method Not Allowed", "text/plain", "only GET is served\n");
  const std::string_view path = target.substr(0, target.find('?'));
  if (path != "/metrics")
    return http_response("404 Not Found", "text/plain", "the metrics are at /metrics\n");
  return http_response("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics());
}

}  // namespace

ControlServerOptions ControlServerOptions::from(const ServerConfig& config) {
  ControlServerOptions o;
  o.address = config.address;
  o.port = config.port;
  if (config.metrics_port != 0) o.metrics_port = config.metrics_port;
  o.max_request_bytes = config.max_request_bytes;
  return o;
}

struct ControlServer::Impl {
  Impl(ControlProtocol& p, size_t max_request) : protocol(p), max_request_bytes(max_request) {}

  // Accepts connections on `acceptor` until it closes, each served by a new Session.
  template <typename Session>
  void accept(tcp::acceptor& acceptor) {
    acceptor.async_accept([this, &acceptor](ErrorCodeT ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (ec) {
        KVF_LOG_WARN(kServer, "accept on port {} failed: {}", acceptor.local_endpoint().port(),
                     ec.message());
      } else {
        socket.set_option(tcp::no_delay(true), ec);
        std::make_shared<Session>(*this, std::move(socket))->read();
      }
      accept<Session>(acceptor);
    });
  }

  // One control connection: read a line, answer it, repeat.
  class ControlSession : public std::enable_shared_from_this<ControlSession> {
   public:
    ControlSession(Impl& server, tcp::socket socket)
        : server_(server), socket_(std::move(socket)) {}

    void read() {
      asio::async_read_until(
          socket_, asio::dynamic_buffer(buffer_, server_.max_request_bytes), '\n',
          [self = shared_from_this()](ErrorCodeT ec, size_t n) { self->on_line(ec, n); });
    }

   private:
    void on_line(ErrorCodeT ec, size_t n) {
      if (ec == asio::error::not_found) {  // no newline within max_request_bytes
        reply_ = server_.protocol.refuse(invalid_argument(
                     "the request exceeds " + std::to_string(server_.max_request_bytes) +
                     " bytes (server.max_request_bytes); closing the connection")) +
                 "\n";
        asio::async_write(socket_, asio::buffer(reply_),
                          [self = shared_from_this()](ErrorCodeT, size_t) { self->close(); });
        return;
      }
      if (ec) return;  // the client went away
      std::string_view line(buffer_.data(), n - 1);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.empty()) {  // blank lines are not requests
        buffer_.erase(0, n);
        read();
        return;
      }
      reply_ = server_.protocol.handle(line) + "\n";
      buffer_.erase(0, n);
      asio::async_write(socket_, asio::buffer(reply_),
                        [self = shared_from_this()](ErrorCodeT e, size_t) {
                          if (self->server_.protocol.shutdown_requested()) {
                            self->server_.io.stop();
                            return;
                          }
                          if (!e) self->read();
                        });
    }
    void close() {
      ErrorCodeT ignored;
      socket_.shutdown(tcp::socket::shutdown_both, ignored);
      socket_.close(ignored);
    }

    Impl& server_;
    tcp::socket socket_;
    std::string buffer_;
    std::string reply_;
  };

  // One metrics connection: read the request head, answer, close.
  class MetricsSession : public std::enable_shared_from_this<MetricsSession> {
   public:
    MetricsSession(Impl& server, tcp::socket socket)
        : server_(server), socket_(std::move(socket)) {}

    void read() {
      asio::async_read_until(
          socket_, asio::dynamic_buffer(buffer_, kMaxHttpHeadBytes), "\r\n\r\n",
          [self = shared_from_this()](ErrorCodeT ec, size_t n) {
            if (ec && ec != asio::error::not_found) return;
            self->reply_ = ec ? http_response("431 Request Header Fields Too Large", "text/plain",
                                              "the request head exceeds 8 KiB\n")
                              : http_reply(std::string_view(self->buffer_.data(), n),
                                           [&] { return self->server_.protocol.metrics_text(); });
            asio::async_write(self->socket_, asio::buffer(self->reply_),
                              [self](ErrorCodeT, size_t) {
                                ErrorCodeT ignored;
                                self->socket_.shutdown(tcp::socket::shutdown_both, ignored);
                              });
          });
    }

   private:
    Impl& server_;
    tcp::socket socket_;
    std::string buffer_;
    std::string reply_;
  };

  ControlProtocol& protocol;
  size_t max_request_bytes;
  asio::io_context io;
  std::optional<tcp::acceptor> control;
  std::optional<tcp::acceptor> metrics;
};

Result<std::unique_ptr<ControlServer>> ControlServer::create(ControlProtocol& protocol,
                                                             const ControlServerOptions& options) {
  ErrorCodeT ec;
  const asio::ip::address address = asio::ip::make_address(options.address, ec);
  if (ec) {
    return invalid_argument("server.address: '" + options.address + "' is not an IP address");
  }
  if (options.max_request_bytes == 0)
    return invalid_argument("server.max_request_bytes must be >= 1");
  auto impl = std::make_unique<Impl>(protocol, options.max_request_bytes);
  KVF_ASSIGN_OR_RETURN(tcp::acceptor control,
                       listen(impl->io, address, options.port, "control plane"));
  impl->control.emplace(std::move(control));
  if (options.metrics_port) {
    KVF_ASSIGN_OR_RETURN(tcp::acceptor metrics,
                         listen(impl->io, address, *options.metrics_port, "metrics endpoint"));
    impl->metrics.emplace(std::move(metrics));
  }
  impl->accept<Impl::ControlSession>(*impl->control);
  if (impl->metrics) impl->accept<Impl::MetricsSession>(*impl->metrics);
  return std::unique_ptr<ControlServer>(new ControlServer(std::move(impl)));
}

ControlServer::ControlServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ControlServer::~ControlServer() = default;

uint16_t ControlServer::port() const {
  return impl_->control->local_endpoint().port();
}

uint16_t ControlServer::metrics_port() const {
  return impl_->metrics ? impl_->metrics->local_endpoint().port() : 0;
}

Status ControlServer::run() {
  KVF_LOG_INFO(
      kServer, "control plane listening on {}{}", endpoint_text(impl_->control->local_endpoint()),
      impl_->metrics ? ", metrics on " + endpoint_text(impl_->metrics->local_endpoint()) : "");
  impl_->io.run();
  return impl_->protocol.failure();
}

void ControlServer::stop() {
  impl_->io.stop();
}

// --- client ---------------------------------------------------------------------------------

namespace {

Result<tcp::socket> connect_to(asio::io_context& io, const std::string& host, uint16_t port) {
  ErrorCodeT ec;
  tcp::resolver resolver(io);
  const auto endpoints = resolver.resolve(host, std::to_string(port), ec);
  if (ec) return Status(ErrorCode::kUnavailable, "cannot resolve '" + host + "': " + ec.message());
  tcp::socket socket(io);
  asio::connect(socket, endpoints, ec);
  if (ec) {
    return Status(ErrorCode::kUnavailable,
                  "cannot connect to " + host + ":" + std::to_string(port) + ": " + ec.message());
  }
  return socket;
}

}  // namespace

struct ControlClient::Impl {
  asio::io_context io;
  tcp::socket socket{io};
  std::string where;
  std::string buffer;
};

ControlClient::ControlClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ControlClient::ControlClient(ControlClient&&) noexcept = default;
ControlClient& ControlClient::operator=(ControlClient&&) noexcept = default;
ControlClient::~ControlClient() = default;

Result<ControlClient> ControlClient::connect(const std::string& host, uint16_t port) {
  auto impl = std::make_unique<Impl>();
  KVF_ASSIGN_OR_RETURN(tcp::socket socket, connect_to(impl->io, host, port));
  ErrorCodeT ignored;
  socket.set_option(tcp::no_delay(true), ignored);
  impl->socket = std::move(socket);
  impl->where = host + ":" + std::to_string(port);
  return ControlClient(std::move(impl));
}

Result<std::string> ControlClient::call(const std::string& request) {
  if (request.find('\n') != std::string::npos) {
    return invalid_argument("a control request is one line; this one holds a newline");
  }
  Impl& c = *impl_;
  if (!c.socket.is_open()) {
    return Status(ErrorCode::kUnavailable, "the connection to " + c.where + " is closed");
  }
  ErrorCodeT ec;
  const std::string line = request + "\n";
  asio::write(c.socket, asio::buffer(line), ec);
  size_t n = 0;
  if (!ec) n = asio::read_until(c.socket, asio::dynamic_buffer(c.buffer), '\n', ec);
  if (ec) {
    c.socket.close(ec);
    return Status(ErrorCode::kUnavailable,
                  "the control plane at " + c.where + " closed the connection: " + ec.message());
  }
  std::string reply = c.buffer.substr(0, n - 1);
  c.buffer.erase(0, n);
  return reply;
}

Result<std::string> http_get(const std::string& host, uint16_t port, const std::string& path) {
  asio::io_context io;
  KVF_ASSIGN_OR_RETURN(tcp::socket socket, connect_to(io, host, port));
  const std::string request =
      "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\n";
  ErrorCodeT ec;
  asio::write(socket, asio::buffer(request), ec);
  std::string response;
  if (!ec) asio::read(socket, asio::dynamic_buffer(response), ec);
  if (ec && ec != asio::error::eof) {
    return Status(ErrorCode::kUnavailable, "GET " + path + " from " + host + ":" +
                                               std::to_string(port) + ": " + ec.message());
  }
  const size_t head_end = response.find("\r\n\r\n");
  const std::string status_line = response.substr(0, response.find("\r\n"));
  if (head_end == std::string::npos || status_line.rfind("HTTP/1.1 ", 0) != 0) {
    return Status(ErrorCode::kParseError, "GET " + path + ": not an HTTP response");
  }
  if (status_line.compare(9, 3, "200") != 0) {
    return Status(ErrorCode::kUnavailable, "GET " + path + ": " + status_line.substr(9));
  }
  return response.substr(head_end + 4);
}

}  // namespace kvfabric
