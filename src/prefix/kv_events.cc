#include "kvfabric/prefix/kv_events.h"

#include <openssl/evp.h>

#include <array>
#include <bit>
#include <memory>

#include "kvfabric/common/check.h"

namespace kvfabric {
namespace {

static_assert(std::endian::native == std::endian::little,
              "kv_block_hash hashes tokens in memory order, which is little-endian here");

void put_le64(unsigned char* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<unsigned char>(v >> (8 * i));
}

void put_be64(unsigned char* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<unsigned char>(v >> (56 - 8 * i));
}

struct DigestContextFree {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

}  // namespace

std::string_view kv_event_type_name(KvEventType type) {
  switch (type) {
    case KvEventType::kBlockStored:
      return "BlockStored";
    case KvEventType::kBlockRemoved:
      return "BlockRemoved";
    case KvEventType::kAllBlocksCleared:
      return "AllBlocksCleared";
  }
  return "Unknown";
}

uint64_t kv_block_hash(std::optional<uint64_t> parent, std::span<const TokenId> tokens,
                       const CacheSalt& salt) {
  // One context per thread: creating one per block would cost as much as the hash.
  thread_local const std::unique_ptr<EVP_MD_CTX, DigestContextFree> ctx(EVP_MD_CTX_new());
  std::array<unsigned char, 24> head{};
  put_le64(head.data(), parent.value_or(0));
  size_t head_bytes = 8;
  if (!salt.empty()) {  // the identity's bytes as CacheSalt::of read them (big-endian words)
    put_be64(head.data() + 8, salt.hi);
    put_be64(head.data() + 16, salt.lo);
    head_bytes = 24;
  }
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int length = 0;
  const bool ok = ctx && EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) == 1 &&
                  EVP_DigestUpdate(ctx.get(), head.data(), head_bytes) == 1 &&
                  EVP_DigestUpdate(ctx.get(), tokens.data(), tokens.size_bytes()) == 1 &&
                  EVP_DigestFinal_ex(ctx.get(), digest.data(), &length) == 1;
  KVF_CHECK(ok && length >= 8, "SHA-256 of a KV block failed");
  uint64_t hash = 0;
  for (int i = 7; i >= 0; --i) hash = (hash << 8) | digest[static_cast<size_t>(i)];
  return hash;
}

}  // namespace kvfabric
