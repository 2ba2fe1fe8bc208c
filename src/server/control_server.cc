#include "kvfabric/server/control_server.h"

#include <boost/asio.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>
#include <utility>
#include <variant>

#include "common/log.h"
#include "server/byte_stream.h"

namespace kvfabric {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using ErrorCodeT = boost::system::error_code;
using Clock = std::chrono::steady_clock;
using detail::ByteStream;
namespace ssl = asio::ssl;

// The request head of the HTTP endpoint may not exceed this.
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

std::string http_response(std::string_view status, std::string_view type, const std::string& body,
                          std::string_view extra_headers = "") {
  return "HTTP/1.1 " + std::string(status) + "\r\nContent-Type: " + std::string(type) +
         "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n" +
         std::string(extra_headers) + "Connection: close\r\n\r\n" + body;
}

// The token of an "Authorization: Bearer <token>" header (the header name in any case).
std::optional<std::string_view> bearer_token(std::string_view head) {
  constexpr std::string_view kHeader = "authorization:";
  for (size_t at = head.find("\r\n"); at != std::string_view::npos;) {
    const size_t start = at + 2;
    const size_t end = head.find("\r\n", start);
    const std::string_view line =
        head.substr(start, end == std::string_view::npos ? end : end - start);
    at = end;
    if (line.size() < kHeader.size()) continue;
    bool match = true;
    for (size_t i = 0; i < kHeader.size(); ++i) {
      const char c = line[i];
      match = match && (c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c) == kHeader[i];
    }
    if (!match) continue;
    std::string_view value = line.substr(kHeader.size());
    while (!value.empty() && value.front() == ' ')
      value.remove_prefix(1);
    if (value.rfind("Bearer ", 0) != 0) return std::nullopt;
    return value.substr(7);
  }
  return std::nullopt;
}

// The TLS context of a server with a certificate, or why it cannot be made.
Result<std::unique_ptr<ssl::context>> server_tls(const ControlServerOptions& options) {
  auto tls = std::make_unique<ssl::context>(ssl::context::tls_server);
  tls->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                   ssl::context::no_sslv3 | ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1);
  ErrorCodeT ec;
  tls->use_certificate_chain_file(options.tls_cert_file, ec);
  if (ec) {
    return invalid_argument("server.tls_cert_file '" + options.tls_cert_file +
                            "': " + ec.message());
  }
  tls->use_private_key_file(options.tls_key_file, ssl::context::pem, ec);
  if (ec) {
    return invalid_argument("server.tls_key_file '" + options.tls_key_file + "': " + ec.message() +
                            " (it must be the PEM key of server.tls_cert_file)");
  }
  return tls;
}

// The path of a GET request head, or the response refusing it.
std::variant<std::string_view, std::string> http_get_path(std::string_view head) {
  const std::string_view request_line = head.substr(0, head.find("\r\n"));
  const size_t method_end = request_line.find(' ');
  const size_t path_end =
      request_line.find(' ', method_end == std::string_view::npos ? 0 : method_end + 1);
  if (method_end == std::string_view::npos || path_end == std::string_view::npos ||
      request_line.substr(path_end + 1).rfind("HTTP/", 0) != 0) {
    return http_response("400 Bad Request", "text/plain", "not an HTTP request line\n");
  }
  if (request_line.substr(0, method_end) != "GET") {
    return http_response("405 Method Not Allowed", "text/plain", "only GET is served\n");
  }
  const std::string_view target = request_line.substr(method_end + 1, path_end - method_end - 1);
  return target.substr(0, target.find('?'));
}

std::string health_body(const ControlHealth& h, bool draining) {
  nlohmann::json body = {{"status", !h.ok ? "unavailable" : draining ? "draining" : "ok"},
                         {"steps", h.steps},
                         {"stepping", h.stepping}};
  if (!h.ok) body["problem"] = h.problem;
  return body.dump() + "\n";
}

// Waits before accepting again after a failed accept (EMFILE when the process is out of file
// descriptors): 10 ms, doubling up to 1 s, so a loop that cannot accept does not spin.
class AcceptBackoff {
 public:
  static constexpr std::chrono::milliseconds kFirst{10}, kLongest{1000};

  std::chrono::milliseconds failed() {
    delay_ = failures_++ == 0 ? kFirst : std::min(delay_ * 2, kLongest);
    return delay_;
  }
  // Returns the failures since the last success.
  uint64_t succeeded() { return std::exchange(failures_, 0); }
  [[nodiscard]] uint64_t failures() const { return failures_; }

 private:
  uint64_t failures_ = 0;
  std::chrono::milliseconds delay_{0};
};

}  // namespace

ControlServerOptions ControlServerOptions::from(const ServerConfig& config) {
  ControlServerOptions o;
  o.address = config.address;
  o.port = config.port;
  if (config.metrics_port != 0) o.metrics_port = config.metrics_port;
  o.max_request_bytes = config.max_request_bytes;
  o.max_connections = config.max_connections;
  o.max_connections_per_address = config.max_connections_per_address;
  o.idle_timeout = std::chrono::milliseconds(config.idle_timeout_ms);
  o.fault_grace = std::chrono::milliseconds(config.fault_grace_ms);
  o.tls_cert_file = config.tls_cert_file;
  o.tls_key_file = config.tls_key_file;
  return o;
}

// Two threads: the io thread (started by run()) runs every socket, the accept loops and the
// HTTP endpoint; the thread that calls run() takes the control requests one at a time from a
// queue and answers them through the protocol, so a long step never holds up the sockets, and
// on rank 0 the plans are broadcast from the thread that initialized MPI.
struct ControlServer::Impl {
  Impl(ControlProtocol& p, const ControlServerOptions& o) : protocol(p), options(o) {}

  class Session;
  class ControlSession;
  class HttpSession;

  // What one endpoint's sessions hold besides their count in `open`: open connections per client
  // address (max_connections_per_address), and refusals waiting for a TLS handshake.
  struct Places {
    std::mutex mutex;
    std::map<asio::ip::address, uint32_t> held;  // guarded by mutex
    std::atomic<uint32_t> pending_refusals{0};
  };

  // One endpoint: its acceptor, the back-off of its accept loop, and its open connections
  // (counted by the sessions, whose destructors may run on either thread, and as late as the
  // io_context's destruction: the count lives in Impl, which outlives it, as do the places).
  struct Listener {
    Listener(tcp::acceptor a, std::string_view name, std::atomic<uint32_t>& connections,
             Places& endpoint_places, ssl::context* tls_context = nullptr)
        : acceptor(std::move(a)),
          what(name),
          open(connections),
          places(endpoint_places),
          tls(tls_context) {}
    tcp::acceptor acceptor;
    asio::steady_timer retry{acceptor.get_executor()};
    AcceptBackoff backoff;
    std::string_view what;
    std::atomic<uint32_t>& open;
    Places& places;
    ssl::context* tls;  // the connections speak TLS; nullptr: plain TCP
    // Its connections in arrival order, as long as they have proven nothing (io thread only;
    // entries of sessions gone or proven since are dropped as they are met).
    std::deque<std::weak_ptr<Session>> unproven;
  };

  struct Job {
    std::shared_ptr<ControlSession> session;
    std::string line;
  };

  // Accepts connections on `listener` until it closes, each served by a new Session.
  template <typename Session>
  void accept(Listener& listener) {
    listener.acceptor.async_accept([this, &listener](ErrorCodeT ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (ec) {
        accept_failed<Session>(listener, ec);
        return;
      }
      if (const uint64_t failures = listener.backoff.succeeded(); failures > 0) {
        KVF_LOG_INFO(kServer, "the {} accepts connections again after {} failed accepts",
                     listener.what, failures);
      }
      socket.set_option(tcp::no_delay(true), ec);
      ByteStream stream = listener.tls ? ByteStream(std::move(socket), *listener.tls)
                                       : ByteStream(std::move(socket));
      std::make_shared<Session>(*this, listener, std::move(stream))->start();
      accept<Session>(listener);
    });
  }

  template <typename Session>
  void accept_failed(Listener& listener, ErrorCodeT ec) {
    ++accept_errors;
    const std::chrono::milliseconds delay = listener.backoff.failed();
    // One warning per run of failures: a loop out of file descriptors would otherwise log
    // thousands of lines a second.
    if (listener.backoff.failures() == 1) {
      KVF_LOG_WARN(kServer,
                   "accept on {} failed: {} ({} connections open); retrying with back-off up to "
                   "{} ms, without further warnings until an accept succeeds",
                   endpoint_text(listener.acceptor.local_endpoint()), ec.message(),
                   listener.open.load(), AcceptBackoff::kLongest.count());
    }
    listener.retry.expires_after(delay);
    listener.retry.async_wait([this, &listener](ErrorCodeT wait) {
      if (!wait) accept<Session>(listener);  // else cancelled: the server stops
    });
  }

  // Called on the io thread; the request thread answers `line` and posts the reply back.
  void submit(Job job) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      jobs.push_back(std::move(job));
    }
    wake.notify_one();
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
    }
    wake.notify_all();
    io.stop();
  }

  // No new connections; the requests received are answered, then run() returns.
  void drain() {
    draining = true;
    {
      std::lock_guard<std::mutex> lock(mutex);  // serve_requests() waits on `wake` under it
    }
    wake.notify_all();
    asio::post(io, [this] {
      ErrorCodeT ignored;
      control->acceptor.close(ignored);
    });
  }

  // A reply has been written (or failed): drain() waits for the last one.
  void reply_done() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      --replies_in_flight;
    }
    wake.notify_all();
  }

  // The request thread: answers queued lines until stop(), or until fault_grace after the
  // protocol failed (a rank did not answer).
  void serve_requests();
  std::string metrics_text() const;
  std::string http_reply(std::string_view head) const;

  ControlProtocol& protocol;
  ControlServerOptions options;
  std::unique_ptr<ssl::context> tls;  // with a certificate: the control connections' TLS
  // Declared before io: sessions destroyed with io's pending handlers still count down here.
  std::atomic<uint32_t> control_open{0}, http_open{0};
  Places control_places, http_places;
  std::atomic<uint64_t> refused_connections{0}, idle_closed{0}, accept_errors{0},
      displaced_connections{0}, address_refused_connections{0};
  asio::io_context io;
  std::unique_ptr<Listener> control, http;

  std::mutex mutex;  // guards jobs, stopping and replies_in_flight
  std::condition_variable wake;
  std::deque<Job> jobs;
  bool stopping = false;
  uint64_t replies_in_flight = 0;  // posted to the io thread, not written yet
  std::atomic<bool> draining{false};
};

// What every connection has: its socket, a timer, buffers, and its place among the endpoint's
// open connections (counted in `open` for as long as the session lives).
class ControlServer::Impl::Session {
 public:  // inherited by the sessions' own constructors
  Session(Impl& server, Listener& listener, ByteStream stream)
      : server_(server),
        listener_(listener),
        open_(listener.open),
        places_(listener.places),
        stream_(std::move(stream)),
        idle_(stream_.socket().get_executor()) {}
  virtual ~Session() {
    if (counted_) --open_;
    if (pending_refusal_) --places_.pending_refusals;
    give_address_place_back();
  }

  // A connection that has shown what it is for (logged in; sent an HTTP request head), or that
  // is closing already, is never displaced by a newcomer.
  [[nodiscard]] bool settled() const { return proven_ || closing_; }
  // Closes a connection that proved nothing, to make room for a newcomer.
  virtual void displace() = 0;

 protected:
  enum class Admission { kAdmitted, kEndpointFull, kAddressFull };

  // Counts this connection in (`self` is this session). A newcomer from an address that holds
  // max_connections_per_address already is refused and displaces nobody. Beyond max_connections
  // the oldest connection that has proven nothing yet gives its place up: connections that only
  // sit there (or hang up and reconnect) cannot lock out clients that log in. Without one, the
  // newcomer is refused. Refusals are counted.
  Admission admit(const std::shared_ptr<Session>& self) {
    if (!take_address_place()) {  // not counted in open_: it must not crowd anyone out
      ++server_.refused_connections;
      ++server_.address_refused_connections;
      return Admission::kAddressFull;
    }
    ++open_;
    counted_ = true;
    const std::shared_ptr<Session> oldest = oldest_unsettled();
    if (open_ > server_.options.max_connections) {
      if (oldest == nullptr) {
        ++server_.refused_connections;
        return Admission::kEndpointFull;
      }
      listener_.unproven.pop_front();
      ++server_.displaced_connections;
      oldest->displace();
    }
    listener_.unproven.push_back(self);
    return Admission::kAdmitted;
  }
  // Whether a refused TLS newcomer is closed at once, without a reply: the reply waits for the
  // client's handshake (login_timeout, http_timeout), so refusals could otherwise hold a
  // descriptor each for that long, as many as a flood sends. One refused for its address always
  // is; one refused at max_connections gets its reply while fewer than max_connections others
  // wait for theirs. Plain TCP refusals are written at once.
  bool refused_before_handshake(Admission admission) {
    if (admission == Admission::kAdmitted || !stream_.is_tls()) return false;
    if (admission == Admission::kEndpointFull) {
      if (++places_.pending_refusals <= server_.options.max_connections) {
        pending_refusal_ = true;
        return false;
      }
      --places_.pending_refusals;
    }
    close_stream();
    return true;
  }
  // The limit that refused a newcomer, for the client: "at most 4 connections (key)".
  [[nodiscard]] std::string limit_text(Admission admission) const {
    return admission == Admission::kAddressFull
               ? "at most " + std::to_string(server_.options.max_connections_per_address) +
                     " connections from one address (server.max_connections_per_address)"
               : "at most " + std::to_string(server_.options.max_connections) +
                     " connections (server.max_connections)";
  }
  void mark_proven() { proven_ = true; }
  // Ends the connection: pending handlers finish with errors, and the session then goes (the
  // timer must not keep it, nor its place among the connections, until it fires).
  void close_stream() {
    closing_ = true;
    idle_.cancel();
    stream_.close();
  }

  Impl& server_;
  Listener& listener_;
  std::atomic<uint32_t>& open_;
  Places& places_;  // outlives the session, unlike listener_ (see Listener::open)
  ByteStream stream_;
  asio::steady_timer idle_;
  std::string buffer_;
  std::string reply_;

 private:
  // The front of the listener's list once the entries of sessions gone or settled are dropped
  // (from the front, and all of them once they outnumber the places, so that the list stays
  // about as long as the connections that may be displaced); nullptr when none is left.
  std::shared_ptr<Session> oldest_unsettled() {
    auto& unproven = listener_.unproven;
    const auto settled = [](const std::weak_ptr<Session>& w) {
      const auto s = w.lock();
      return s == nullptr || s->settled();
    };
    if (unproven.size() > 2 * size_t{server_.options.max_connections}) {
      std::erase_if(unproven, settled);
    }
    while (!unproven.empty()) {
      if (auto oldest = unproven.front().lock(); oldest != nullptr && !oldest->settled()) {
        return oldest;
      }
      unproven.pop_front();
    }
    return nullptr;
  }

  // Counts this connection against its client address's limit; false when that address holds
  // max_connections_per_address already (an address that cannot be read is not limited).
  bool take_address_place() {
    const uint32_t limit = server_.options.max_connections_per_address;
    if (limit == 0) return true;
    ErrorCodeT ec;
    const tcp::endpoint peer = stream_.socket().remote_endpoint(ec);
    if (ec) return true;  // already gone: its reads fail at once
    std::lock_guard<std::mutex> lock(places_.mutex);
    uint32_t& held = places_.held[peer.address()];  // >= limit: the entry existed
    if (held >= limit) return false;
    ++held;
    address_ = peer.address();
    return true;
  }
  void give_address_place_back() {
    if (!address_) return;
    std::lock_guard<std::mutex> lock(places_.mutex);
    const auto it = places_.held.find(*address_);
    if (it != places_.held.end() && --it->second == 0) places_.held.erase(it);
  }

  std::atomic<bool> proven_{false};
  std::atomic<bool> closing_{false};
  std::optional<asio::ip::address> address_;  // counted in places_
  bool counted_ = false;                       // counted in open_
  bool pending_refusal_ = false;               // counted in places_.pending_refusals
};

// One control connection: read a line, queue it, write its reply, repeat. An idle timer closes
// a connection that sends no request (or does not read its reply) for options.idle_timeout.
class ControlServer::Impl::ControlSession
    : public Session, public std::enable_shared_from_this<ControlServer::Impl::ControlSession> {
 public:
  using Session::Session;

  void start() {
    const Admission admission = admit(shared_from_this());
    if (refused_before_handshake(admission)) return;
    identity_ = server_.protocol.new_connection();
    arm_login_timer();
    stream_.async_handshake(ssl::stream_base::server, [self = shared_from_this(),
                                                       admission](ErrorCodeT ec) {
      if (ec) {
        KVF_LOG_DEBUG(kServer, "TLS handshake failed: {}", ec.message());
        self->close();
        return;
      }
      if (self->identity_.authenticated) self->logged_in();  // no tokens
      if (admission == Admission::kAdmitted) {
        self->read();
      } else {
        self->refuse_and_close(Status(ErrorCode::kResourceExhausted,
                                      "the control plane serves " +
                                          self->limit_text(admission) + "; closing this one"));
      }
    });
  }

  //! Who this connection is: used (and changed by hello) on the request thread only.
  ControlIdentity& identity() { return identity_; }
  //! Called on the request thread after each request: the io thread reads the outcome.
  void note_identity() {
    // Proven at once, not when the io thread gets to logged_in(): a newcomer must not displace
    // a connection whose hello has just succeeded.
    if (identity_.authenticated) mark_proven();
    if (identity_.authenticated && !logged_in_) {
      asio::post(stream_.socket().get_executor(),
                 [self = shared_from_this()] { self->logged_in(); });
    }
    close_after_reply_ = identity_.refused;
    stream_after_reply_ = identity_.events != nullptr;
  }

  // On the io thread, posted by the request thread.
  void send(std::string reply) {
    reply_ = std::move(reply);
    arm_idle_timer();  // a client that does not read its reply is idle too
    stream_.async_write(asio::buffer(reply_), [self = shared_from_this()](ErrorCodeT e, size_t) {
      self->idle_.cancel();
      self->server_.reply_done();
      if (self->server_.protocol.shutdown_requested()) {
        self->server_.stop();
        return;
      }
      if (self->close_after_reply_ || self->server_.draining) {
        self->close();
        return;
      }
      if (e) {
        self->close();
        return;
      }
      if (self->stream_after_reply_) {
        self->stream_events();
      } else {
        self->read();
      }
    });
  }

 private:
  void displace() override {
    KVF_LOG_DEBUG(kServer, "closing a control connection that has not logged in: a newcomer needs "
                           "its place (server.max_connections)");
    close();
  }

  // On the io thread: the login deadline no longer applies.
  void logged_in() {
    logged_in_ = true;
    mark_proven();
    login_.cancel();
  }

  // Sends one refusal line, then closes the connection.
  void refuse_and_close(const Status& why) {
    reply_ = server_.protocol.refuse(why) + "\n";
    stream_.async_write(asio::buffer(reply_),
                        [self = shared_from_this()](ErrorCodeT, size_t) { self->close(); });
  }

  void read() {
    arm_idle_timer();
    stream_.async_read_until(
        asio::dynamic_buffer(buffer_, server_.options.max_request_bytes), '\n',
        [self = shared_from_this()](ErrorCodeT ec, size_t n) { self->on_line(ec, n); });
  }

  void on_line(ErrorCodeT ec, size_t n) {
    idle_.cancel();
    if (ec == asio::error::not_found) {  // no newline within max_request_bytes
      refuse_and_close(invalid_argument(
          "the request exceeds " + std::to_string(server_.options.max_request_bytes) +
          " bytes (server.max_request_bytes); closing the connection"));
      return;
    }
    if (ec) {  // the client went away, or the idle timer closed the socket
      close();
      return;
    }
    std::string_view line(buffer_.data(), n - 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    std::string request(line);
    buffer_.erase(0, n);
    if (request.empty()) {  // blank lines are not requests
      read();
      return;
    }
    server_.submit(Job{shared_from_this(), std::move(request)});
  }

  // A subscribed connection: from now on it carries its subscription's event lines, written as
  // they are queued, and whatever the client sends is read and dropped (which also notices when
  // it goes away). It is not closed for idling: a subscriber only listens.
  void stream_events() {
    const std::weak_ptr<ControlSession> weak = shared_from_this();
    auto executor = stream_.socket().get_executor();
    identity_.events->set_notify([weak, executor] {
      asio::post(executor, [weak] {
        if (auto self = weak.lock()) self->write_events();
      });
    });
    write_events();  // the snapshot, and whatever was queued since the subscription
    discard_input();
  }

  void write_events() {
    if (writing_events_) return;
    events_out_ = identity_.events->take();
    if (events_out_.empty()) return;
    writing_events_ = true;
    stream_.async_write(asio::buffer(events_out_), [self = shared_from_this()](ErrorCodeT ec, size_t) {
      self->writing_events_ = false;
      if (ec) {
        self->close();
        return;
      }
      self->write_events();
    });
  }

  void discard_input() {
    stream_.async_read_some(asio::buffer(discarded_), [self = shared_from_this()](ErrorCodeT ec, size_t) {
      if (ec) {  // the subscriber went away: no more batches for it
        self->identity_.events->close();
        self->close();
        return;
      }
      self->discard_input();
    });
  }

  void arm_idle_timer() {
    if (server_.options.idle_timeout.count() == 0) return;
    idle_.expires_after(server_.options.idle_timeout);
    idle_.async_wait([self = shared_from_this()](ErrorCodeT ec) {
      if (ec) return;  // cancelled: the connection was active
      ++self->server_.idle_closed;
      KVF_LOG_DEBUG(kServer, "closing a control connection idle for {} ms (server.idle_timeout_ms)",
                    self->server_.options.idle_timeout.count());
      self->close();
    });
  }

  void arm_login_timer() {
    login_.expires_after(server_.options.login_timeout);
    login_.async_wait([self = shared_from_this()](ErrorCodeT ec) {
      if (ec || self->logged_in_) return;
      ++self->server_.idle_closed;
      KVF_LOG_DEBUG(kServer, "closing a control connection that did not log in within {} ms",
                    self->server_.options.login_timeout.count());
      self->close();
    });
  }

  // The timers hold the session too: cancelled, they let it go at once, and with it its place
  // among the endpoint's connections (a client that hung up before logging in kept its place
  // until login_timeout, so connecting and closing in a loop locked everyone out).
  void close() {
    login_.cancel();
    close_stream();
  }

  ControlIdentity identity_;
  asio::steady_timer login_{stream_.socket().get_executor()};
  std::atomic<bool> logged_in_{false};          // handshake done and, with tenants, hello
  std::atomic<bool> close_after_reply_{false};  // a wrong token was presented
  std::atomic<bool> stream_after_reply_{false};  // subscribed: carries KV events from now on
  bool writing_events_ = false;                  // io thread only
  std::string events_out_;
  std::array<char, 4096> discarded_{};
};

// One HTTP connection: read the request head, answer /metrics or /health, close.
class ControlServer::Impl::HttpSession
    : public Session, public std::enable_shared_from_this<ControlServer::Impl::HttpSession> {
 public:
  using Session::Session;

  void start() {
    idle_.expires_after(server_.options.http_timeout);
    idle_.async_wait([self = shared_from_this()](ErrorCodeT ec) {
      if (ec) return;
      ++self->server_.idle_closed;
      self->close_stream();
    });
    const Admission admission = admit(shared_from_this());
    if (refused_before_handshake(admission)) return;
    stream_.async_handshake(
        ssl::stream_base::server, [self = shared_from_this(), admission](ErrorCodeT ec) {
          if (ec) {
            self->close_stream();
          } else if (admission == Admission::kAdmitted) {
            self->read_request();
          } else {
            self->respond(http_response("503 Service Unavailable", "text/plain",
                                        "the metrics endpoint serves " +
                                            self->limit_text(admission) + "\n"));
          }
        });
  }

 private:
  void read_request() {
    stream_.async_read_until(
        asio::dynamic_buffer(buffer_, kMaxHttpHeadBytes), std::string_view("\r\n\r\n"),
        [self = shared_from_this()](ErrorCodeT ec, size_t n) {
          if (ec && ec != asio::error::not_found) {  // gone
            self->close_stream();
            return;
          }
          self->mark_proven();
          self->respond(ec ? http_response("431 Request Header Fields Too Large", "text/plain",
                                           "the request head exceeds 8 KiB\n")
                           : self->server_.http_reply(std::string_view(self->buffer_.data(), n)));
        });
  }

  void displace() override {
    KVF_LOG_DEBUG(kServer, "closing an HTTP connection that sent no request: a newcomer needs "
                           "its place (server.max_connections)");
    close_stream();
  }

  void respond(std::string reply) {
    reply_ = std::move(reply);
    stream_.async_write(asio::buffer(reply_), [self = shared_from_this()](ErrorCodeT, size_t) {
      self->idle_.cancel();
      ErrorCodeT ignored;
      self->stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    });
  }
};

void ControlServer::Impl::serve_requests() {
  std::optional<Clock::time_point> give_up;   // fault_grace after the protocol failed
  std::optional<Clock::time_point> drain_by;  // a drain waits this long for slow readers at most
  while (true) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mutex);
      // Draining ends once every received request is answered and its reply written.
      const auto drained = [&] { return draining && jobs.empty() && replies_in_flight == 0; };
      const auto ready = [&] {
        return stopping || !jobs.empty() || drained() || (draining && !drain_by);
      };
      if (draining && !drain_by) drain_by = Clock::now() + options.http_timeout;
      std::optional<Clock::time_point> until = give_up;
      if (drain_by && (!until || *drain_by < *until)) until = drain_by;
      if (until) {
        // The clock ends the grace, not a quiet moment: clients that keep asking (retrying
        // after Unavailable, polling stats) must not keep a job with a dead rank alive.
        wake.wait_until(lock, *until, ready);
        if (Clock::now() >= *until) break;
      } else {
        wake.wait(lock, ready);
      }
      if (draining && !drain_by) continue;  // woken by drain(): wait again, with its deadline
      if (stopping || drained()) break;
      job = std::move(jobs.front());
      jobs.pop_front();
      ++replies_in_flight;
    }
    std::string reply = protocol.handle(job.line, job.session->identity()) + "\n";
    job.session->note_identity();
    asio::post(io, [session = std::move(job.session), reply = std::move(reply)]() mutable {
      session->send(std::move(reply));
    });
    if (!give_up && !protocol.failure().ok()) {
      give_up = Clock::now() + options.fault_grace;
      KVF_LOG_ERROR(kServer, "{}; the control plane answers reads for {} ms (server.fault_grace_ms), "
                    "then stops", protocol.failure().message(), options.fault_grace.count());
    }
  }
}

std::string ControlServer::Impl::metrics_text() const {
  std::string text = protocol.metrics_text();
  const auto gauge = [&](std::string_view name, std::string_view type, std::string_view help,
                         uint64_t value) {
    text += fmt::format("# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, value);
  };
  gauge("kvfabric_control_connections", "gauge", "Open control-plane connections.",
        control_open.load());
  gauge("kvfabric_control_refused_connections_total", "counter",
        "Connections refused because server.max_connections were open (or "
        "server.max_connections_per_address from the newcomer's address).",
        refused_connections.load());
  gauge("kvfabric_control_address_refused_connections_total", "counter",
        "Of those, connections refused because their address held "
        "server.max_connections_per_address.",
        address_refused_connections.load());
  gauge("kvfabric_control_idle_closed_total", "counter",
        "Connections closed after server.idle_timeout_ms without a request.", idle_closed.load());
  gauge("kvfabric_control_displaced_connections_total", "counter",
        "Connections that had not logged in (or sent an HTTP request) closed to make room for a "
        "newcomer at server.max_connections.",
        displaced_connections.load());
  gauge("kvfabric_control_accept_errors_total", "counter",
        "Failed accepts (for example out of file descriptors), retried with back-off.",
        accept_errors.load());
  return text;
}

std::string ControlServer::Impl::http_reply(std::string_view head) const {
  auto path = http_get_path(head);
  if (auto* refusal = std::get_if<std::string>(&path)) return std::move(*refusal);
  const std::string_view target = std::get<std::string_view>(path);
  if (target == "/metrics") {
    // Per-tenant figures are an admin's: with tenants, the scraper sends an admin's token.
    if (protocol.requires_auth()) {
      const std::optional<std::string_view> token = bearer_token(head);
      const std::optional<TenantEntry> who = token ? protocol.authenticate(*token) : std::nullopt;
      if (!who) {
        return http_response("401 Unauthorized", "text/plain",
                             "send an admin tenant's token: Authorization: Bearer <token>\n",
                             "WWW-Authenticate: Bearer\r\n");
      }
      if (!who->admin) {
        return http_response("403 Forbidden", "text/plain",
                             "tenant '" + who->name + "' is not an admin\n");
      }
    }
    return http_response("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics_text());
  }
  if (target == "/health") {
    // Draining is not ready: a load balancer stops sending before the server goes.
    const ControlHealth health = protocol.health();
    const bool drain = draining.load();
    return http_response(health.ok && !drain ? "200 OK" : "503 Service Unavailable",
                         "application/json", health_body(health, drain));
  }
  return http_response("404 Not Found", "text/plain", "served here: /metrics and /health\n");
}

Result<std::unique_ptr<ControlServer>> ControlServer::create(ControlProtocol& protocol,
                                                             const ControlServerOptions& options) {
  ErrorCodeT ec;
  const asio::ip::address address = asio::ip::make_address(options.address, ec);
  if (ec) {
    return invalid_argument("server.address: '" + options.address + "' is not an IP address");
  }
  if (options.max_request_bytes == 0)
    return invalid_argument("server.max_request_bytes must be >= 1");
  if (options.max_connections == 0) return invalid_argument("server.max_connections must be >= 1");
  if (!address.is_loopback() && !protocol.requires_auth()) {
    return Status(ErrorCode::kPermissionDenied,
                  "server.address " + options.address + " is not a loopback address: other hosts " +
                      "could connect, and without server.tenants_file nobody is authenticated; "
                      "set a tenants file (tokens) or listen on 127.0.0.1");
  }
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return invalid_argument("server.tls_cert_file and server.tls_key_file go together");
  }
  auto impl = std::make_unique<Impl>(protocol, options);
  if (!options.tls_cert_file.empty()) {
    KVF_ASSIGN_OR_RETURN(impl->tls, server_tls(options));
  }
  KVF_ASSIGN_OR_RETURN(tcp::acceptor control,
                       listen(impl->io, address, options.port, "control plane"));
  impl->control = std::make_unique<Impl::Listener>(std::move(control), "control plane",
                                                   impl->control_open, impl->control_places,
                                                   impl->tls.get());
  if (options.metrics_port) {
    KVF_ASSIGN_OR_RETURN(tcp::acceptor http,
                         listen(impl->io, address, *options.metrics_port, "metrics endpoint"));
    impl->http =
        std::make_unique<Impl::Listener>(std::move(http), "metrics endpoint", impl->http_open,
                                         impl->http_places,
                                         impl->tls.get());  // the bearer token is a secret too
  }
  if (!address.is_loopback() && !impl->tls) {
    KVF_LOG_WARN(kServer,
                 "the control plane listens on {} ({}) without TLS: tokens and requests cross "
                 "the network in clear text; set server.tls_cert_file and server.tls_key_file",
                 options.address, address.is_unspecified() ? "every interface" : "not loopback");
  }
  impl->accept<Impl::ControlSession>(*impl->control);
  if (impl->http) impl->accept<Impl::HttpSession>(*impl->http);
  return std::unique_ptr<ControlServer>(new ControlServer(std::move(impl)));
}

ControlServer::ControlServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ControlServer::~ControlServer() {
  impl_->stop();
}

uint16_t ControlServer::port() const {
  return impl_->control->acceptor.local_endpoint().port();
}

uint16_t ControlServer::metrics_port() const {
  return impl_->http ? impl_->http->acceptor.local_endpoint().port() : 0;
}

ControlServerStats ControlServer::stats() const {
  return ControlServerStats{impl_->control_open.load(), impl_->refused_connections.load(),
                            impl_->idle_closed.load(), impl_->accept_errors.load(),
                            impl_->displaced_connections.load(), impl_->http_open.load(),
                            impl_->address_refused_connections.load()};
}

Status ControlServer::run() {
  KVF_LOG_INFO(
      kServer, "control plane listening on {} ({}, {}){}",
      endpoint_text(impl_->control->acceptor.local_endpoint()), impl_->tls ? "TLS" : "plain TCP",
      impl_->protocol.requires_auth() ? "tokens required" : "no authentication",
      impl_->http
          ? ", metrics and health on " + endpoint_text(impl_->http->acceptor.local_endpoint())
          : "");
  // The io thread runs until serve_requests() is done, also when it has nothing to wait for:
  // a drain closes the acceptor, and the replies still to come must find it running.
  auto keep_running = asio::make_work_guard(impl_->io);
  std::thread io_thread([this] { impl_->io.run(); });
  impl_->serve_requests();
  keep_running.reset();
  impl_->io.stop();
  io_thread.join();
  return impl_->protocol.failure();
}

void ControlServer::stop() {
  impl_->stop();
}

void ControlServer::drain() {
  impl_->drain();
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
  std::unique_ptr<ssl::context> tls;  // outlives the stream that uses it
  std::optional<ByteStream> stream;
  bool open = false;
  std::string where;
  std::string buffer;
};

namespace {

// The client's TLS context: verify the server's chain against `ca_file` (or the system's CAs).
Result<std::unique_ptr<ssl::context>> client_tls(const ControlClientOptions& options) {
  auto tls = std::make_unique<ssl::context>(ssl::context::tls_client);
  tls->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                   ssl::context::no_sslv3 | ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1);
  ErrorCodeT ec;
  if (options.ca_file.empty()) {
    tls->set_default_verify_paths(ec);
  } else {
    tls->load_verify_file(options.ca_file, ec);
  }
  if (ec) {
    return invalid_argument(
        "TLS certificate authorities '" +
        (options.ca_file.empty() ? std::string("system default") : options.ca_file) +
        "': " + ec.message());
  }
  tls->set_verify_mode(ssl::verify_peer);
  return tls;
}

}  // namespace

ControlClient::ControlClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ControlClient::ControlClient(ControlClient&&) noexcept = default;
ControlClient& ControlClient::operator=(ControlClient&&) noexcept = default;
ControlClient::~ControlClient() = default;

static Status open_client_stream(asio::io_context& io, const std::string& host, uint16_t port,
                                 const ControlClientOptions& options,
                                 std::unique_ptr<ssl::context>& tls,
                                 std::optional<ByteStream>& stream) {
  KVF_ASSIGN_OR_RETURN(tcp::socket socket, connect_to(io, host, port));
  ErrorCodeT ec;
  socket.set_option(tcp::no_delay(true), ec);
  if (!options.tls) {
    stream.emplace(std::move(socket));
    return ok_status();
  }
  KVF_ASSIGN_OR_RETURN(tls, client_tls(options));
  stream.emplace(std::move(socket), *tls);
  const std::string name = options.server_name.empty() ? host : options.server_name;
  detail::TlsSocket& tls_stream = *stream->tls();
  tls_stream.set_verify_callback(ssl::host_name_verification(name));
  if (SSL_set_tlsext_host_name(tls_stream.native_handle(), name.c_str()) != 1) {
    return invalid_argument("TLS server name '" + name + "' cannot be sent (SNI)");
  }
  stream->handshake(ssl::stream_base::client, ec);
  if (ec) {
    return Status(ErrorCode::kUnavailable, "TLS handshake with " + host + ":" +
                                               std::to_string(port) + " (expecting '" + name +
                                               "') failed: " + ec.message());
  }
  return ok_status();
}

// Why the server refused connect()'s hello, or nullopt when it accepted it: a full server
// (ResourceExhausted, worth retrying later) or, for anything else, the token.
static std::optional<Status> hello_refusal(const std::string& reply, const std::string& where) {
  const nlohmann::json parsed = nlohmann::json::parse(reply, nullptr, /*allow_exceptions=*/false);
  if (!parsed.is_object()) {
    return Status(ErrorCode::kUnauthenticated,
                  "the control plane at " + where + " refused the token: " + reply);
  }
  if (const auto ok = parsed.find("ok"); ok != parsed.end() && *ok == true) return std::nullopt;
  const nlohmann::json error = parsed.value("error", nlohmann::json::object());
  // The server's own words when they are where they should be; the raw reply otherwise.
  const std::string why = error.is_object() && error.contains("message") &&
                                  error["message"].is_string()
                              ? error["message"].get<std::string>()
                              : reply;
  const bool full = error.is_object() && error.contains("code") && error["code"].is_string() &&
                    error["code"].get<std::string>() ==
                        error_code_name(ErrorCode::kResourceExhausted);
  if (full) {
    return Status(ErrorCode::kResourceExhausted,
                  "the control plane at " + where + " refused the connection: " + why);
  }
  return Status(ErrorCode::kUnauthenticated,
                "the control plane at " + where + " refused the token: " + why);
}

Result<ControlClient> ControlClient::connect(const std::string& host, uint16_t port,
                                             const ControlClientOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->where = host + ":" + std::to_string(port);
  KVF_RETURN_IF_ERROR(open_client_stream(impl->io, host, port, options, impl->tls, impl->stream));
  impl->open = true;
  ControlClient client(std::move(impl));
  if (!options.token.empty()) {
    nlohmann::json hello = {{"op", "hello"}, {"token", options.token}};
    KVF_ASSIGN_OR_RETURN(const std::string reply, client.call(hello.dump()));
    if (const auto refused = hello_refusal(reply, client.impl_->where)) return *refused;
  }
  return client;
}

Result<std::string> ControlClient::call(const std::string& request) {
  if (request.find('\n') != std::string::npos) {
    return invalid_argument("a control request is one line; this one holds a newline");
  }
  Impl& c = *impl_;
  if (!c.open) {
    return Status(ErrorCode::kUnavailable, "the connection to " + c.where + " is closed");
  }
  ErrorCodeT ec;
  const std::string line = request + "\n";
  c.stream->write(asio::buffer(line), ec);
  if (ec) return lost(ec.message());
  return read_line();
}

Result<std::string> ControlClient::read_line() {
  Impl& c = *impl_;
  if (!c.open) {
    return Status(ErrorCode::kUnavailable, "the connection to " + c.where + " is closed");
  }
  ErrorCodeT ec;
  const size_t n = c.stream->read_until(asio::dynamic_buffer(c.buffer), '\n', ec);
  if (ec) return lost(ec.message());
  std::string reply = c.buffer.substr(0, n - 1);
  c.buffer.erase(0, n);
  return reply;
}

Status ControlClient::lost(const std::string& why) {
  Impl& c = *impl_;
  c.stream->close();
  c.open = false;
  return Status(ErrorCode::kUnavailable,
                "the control plane at " + c.where + " closed the connection: " + why);
}

Result<std::string> http_get(const std::string& host, uint16_t port, const std::string& path,
                             const ControlClientOptions& options) {
  asio::io_context io;
  std::unique_ptr<ssl::context> tls;
  std::optional<ByteStream> stream;
  KVF_RETURN_IF_ERROR(open_client_stream(io, host, port, options, tls, stream));
  const std::string auth =
      options.token.empty() ? "" : "Authorization: Bearer " + options.token + "\r\n";
  const std::string request =
      "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "Connection: close\r\n\r\n";
  ErrorCodeT ec;
  stream->write(asio::buffer(request), ec);
  std::string response;
  if (!ec) stream->read_all(asio::dynamic_buffer(response), ec);
  // The server closes after its reply; over TLS without a close_notify, which is no error here.
  if (ec == ssl::error::stream_truncated) ec = asio::error::eof;
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
    return Status(ErrorCode::kUnavailable, "GET " + path + ": " + status_line.substr(9) + ": " +
                                               response.substr(head_end + 4));
  }
  return response.substr(head_end + 4);
}

}  // namespace kvfabric
