// A connection's bytes: plain TCP, or TLS over it (Asio's OpenSSL stream). Internal to the
// server module, so that sessions and the client are written once for both.
#pragma once

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>

#include <utility>
#include <variant>

namespace kvfabric::detail {

namespace asio = boost::asio;
using TcpSocket = asio::ip::tcp::socket;
using TlsSocket = asio::ssl::stream<TcpSocket>;

class ByteStream {
 public:
  explicit ByteStream(TcpSocket socket) : stream_(std::move(socket)) {}
  ByteStream(TcpSocket socket, asio::ssl::context& tls)
      : stream_(std::in_place_type<TlsSocket>, std::move(socket), tls) {}

  [[nodiscard]] bool is_tls() const { return std::holds_alternative<TlsSocket>(stream_); }
  TcpSocket& socket() {
    if (auto* tls = std::get_if<TlsSocket>(&stream_)) return tls->next_layer();
    return std::get<TcpSocket>(stream_);
  }
  //! The TLS stream (for SNI and peer verification); nullptr on plain TCP.
  TlsSocket* tls() { return std::get_if<TlsSocket>(&stream_); }

  //! The TLS handshake; on plain TCP the handler runs at once (posted) with success.
  template <typename Handler>
  void async_handshake(asio::ssl::stream_base::handshake_type side, Handler&& handler) {
    if (TlsSocket* t = tls()) {
      t->async_handshake(side, std::forward<Handler>(handler));
    } else {
      asio::post(socket().get_executor(), [h = std::forward<Handler>(handler)]() mutable {
        h(boost::system::error_code{});
      });
    }
  }
  template <typename Buffer, typename Delimiter, typename Handler>
  void async_read_until(Buffer buffer, const Delimiter& delimiter, Handler&& handler) {
    std::visit(
        [&](auto& s) {
          asio::async_read_until(s, std::move(buffer), delimiter, std::forward<Handler>(handler));
        },
        stream_);
  }
  template <typename Buffer, typename Handler>
  void async_read_some(const Buffer& buffer, Handler&& handler) {
    std::visit([&](auto& s) { s.async_read_some(buffer, std::forward<Handler>(handler)); },
               stream_);
  }
  template <typename Buffer, typename Handler>
  void async_write(const Buffer& buffer, Handler&& handler) {
    std::visit([&](auto& s) { asio::async_write(s, buffer, std::forward<Handler>(handler)); },
               stream_);
  }

  // Blocking forms, for the client.
  void handshake(asio::ssl::stream_base::handshake_type side, boost::system::error_code& ec) {
    if (TlsSocket* t = tls()) t->handshake(side, ec);
  }
  template <typename Buffer>
  size_t write(const Buffer& buffer, boost::system::error_code& ec) {
    return std::visit([&](auto& s) { return asio::write(s, buffer, ec); }, stream_);
  }
  template <typename Buffer>
  size_t read_all(Buffer buffer, boost::system::error_code& ec) {
    return std::visit([&](auto& s) { return asio::read(s, std::move(buffer), ec); }, stream_);
  }
  template <typename Buffer, typename Delimiter>
  size_t read_until(Buffer buffer, const Delimiter& delimiter, boost::system::error_code& ec) {
    return std::visit(
        [&](auto& s) { return asio::read_until(s, std::move(buffer), delimiter, ec); }, stream_);
  }

  //! Closes the socket (a TLS close_notify is not waited for: the peer is going or unwanted).
  void close() {
    boost::system::error_code ignored;
    socket().shutdown(TcpSocket::shutdown_both, ignored);
    socket().close(ignored);
  }

 private:
  std::variant<TcpSocket, TlsSocket> stream_;
};

}  // namespace kvfabric::detail
