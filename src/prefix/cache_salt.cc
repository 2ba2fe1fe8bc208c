#include "kvfabric/prefix/cache_salt.h"

#include <openssl/evp.h>

#include <array>

#include "kvfabric/common/check.h"

namespace kvfabric {

CacheSalt CacheSalt::of(std::string_view salt) {
  if (salt.empty()) return {};
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int length = 0;
  const int ok =
      EVP_Digest(salt.data(), salt.size(), digest.data(), &length, EVP_sha256(), nullptr);
  KVF_CHECK(ok == 1 && length >= 16, "SHA-256 of a cache salt failed");
  auto word = [&](size_t at) {
    uint64_t w = 0;
    for (size_t i = 0; i < 8; ++i)
      w = (w << 8) | digest[at + i];
    return w;
  };
  CacheSalt id{word(0), word(8)};
  // {0, 0} means "no salt"; a digest starting with 128 zero bits is not going to happen, but the
  // identity must stay distinct from the empty salt even then.
  if (id.empty()) id.lo = 1;
  return id;
}

std::string to_string(const CacheSalt& salt) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(32, '0');
  for (int i = 0; i < 16; ++i) {
    out[static_cast<size_t>(15 - i)] = kHex[(salt.hi >> (4 * i)) & 0xf];
    out[static_cast<size_t>(31 - i)] = kHex[(salt.lo >> (4 * i)) & 0xf];
  }
  return out;
}

}  // namespace kvfabric
