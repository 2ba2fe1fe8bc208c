#include "kvfabric/server/tenant_directory.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <yaml-cpp/yaml.h>

#include <charconv>
#include <set>

#include "common/yaml_documents.h"
#include "common/yaml_error.h"
#include "kvfabric/common/text_file.h"

namespace kvfabric {
namespace {

constexpr size_t kMinTokenChars = 16, kMaxTokenChars = 512, kMaxNameChars = 64;

std::string sha256(std::string_view text) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_Digest(text.data(), text.size(), digest, &length, EVP_sha256(), nullptr) != 1) {
    return {};
  }
  return std::string(reinterpret_cast<const char*>(digest), length);
}

bool valid_name(std::string_view name) {
  if (name.empty() || name.size() > kMaxNameChars) return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

bool valid_token(std::string_view token) {
  if (token.size() < kMinTokenChars || token.size() > kMaxTokenChars) return false;
  for (char c : token) {
    if (c < 0x21 || c > 0x7e) return false;  // printable, no spaces: it travels in JSON
  }
  return true;
}

class Parser {
 public:
  explicit Parser(std::string_view source) : source_(source) {}

  Status error(const YAML::Node& at, const std::string& what) const {
    return invalid_argument(std::string(source_) + ":" + std::to_string(at.Mark().line + 1) + ": " +
                            what);
  }

  Result<uint64_t> number(const YAML::Node& value, const std::string& key, uint64_t max) const {
    if (!value.IsScalar()) return error(value, key + " must be an unsigned integer");
    const std::string text = value.Scalar();
    uint64_t v = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc() || end != text.data() + text.size() || v > max) {  // digits only
      return error(value, key + " must be an unsigned integer <= " + std::to_string(max) +
                              " (got '" + text + "')");
    }
    return v;
  }

  Result<TenantEntry> entry(const YAML::Node& node, std::string& token) const {
    if (!node.IsMap()) return error(node, "each tenant is a mapping (name, token, ...)");
    TenantEntry e;
    TenantQuota quota;
    bool has_quota = false;
    std::set<std::string> seen;
    for (const auto& item : node) {
      const std::string key = item.first.as<std::string>();
      const YAML::Node& value = item.second;
      if (!seen.insert(key).second) return error(item.first, "'" + key + "' appears twice");
      if (key == "name" || key == "token") {
        if (!value.IsScalar()) return error(value, key + " must be a string");
        (key == "name" ? e.name : token) = value.Scalar();
      } else if (key == "admin") {
        if (!value.IsScalar() || (value.Scalar() != "true" && value.Scalar() != "false")) {
          return error(value, "admin must be true or false");
        }
        e.admin = value.Scalar() == "true";
      } else if (key == "max_blocks" || key == "max_host_blocks") {
        KVF_ASSIGN_OR_RETURN(const uint64_t v, number(value, key, UINT64_MAX));
        (key == "max_blocks" ? quota.max_blocks : quota.max_host_blocks) = v;
        has_quota = true;
      } else if (key == "max_sequences" || key == "max_priority") {
        KVF_ASSIGN_OR_RETURN(const uint64_t v, number(value, key, UINT32_MAX));
        (key == "max_sequences" ? quota.max_sequences : quota.max_priority) =
            static_cast<uint32_t>(v);
        has_quota = true;
      } else {
        return error(item.first, "unknown key '" + key +
                                     "' (known: name, token, admin, max_blocks, max_host_blocks, "
                                     "max_sequences, max_priority)");
      }
    }
    if (!valid_name(e.name)) {
      return error(node, "a tenant needs a name of 1.." + std::to_string(kMaxNameChars) +
                             " characters from [A-Za-z0-9._-] (got '" + e.name + "')");
    }
    if (!valid_token(token)) {
      return error(node, "tenant '" + e.name + "' needs a token of " +
                             std::to_string(kMinTokenChars) + ".." +
                             std::to_string(kMaxTokenChars) + " printable characters");
    }
    if (const std::string conflict = quota_conflict(quota); !conflict.empty()) {
      return error(node, "tenant '" + e.name + "': " + conflict);
    }
    if (has_quota) e.quota = quota;
    return e;
  }

 private:
  std::string_view source_;
};

}  // namespace

Result<TenantDirectory> TenantDirectory::parse(std::string_view yaml_text,
                                               std::string_view source) {
  // yaml-cpp throws on malformed text and on a key that is not a scalar, wherever it is read.
  KVF_RETURN_IF_ERROR(detail::check_single_yaml_document(yaml_text, source));
  try {
    const YAML::Node root = YAML::Load(std::string(yaml_text));
    const Parser parser(source);
    if (!root.IsMap() || root.size() != 1 || !root["tenants"] || !root["tenants"].IsSequence()) {
      return parser.error(root, "the tenants file holds one key, 'tenants': a list of tenants");
    }
    TenantDirectory directory;
    std::set<std::string> names;
    for (const YAML::Node& node : root["tenants"]) {
      std::string token;
      KVF_ASSIGN_OR_RETURN(TenantEntry entry, parser.entry(node, token));
      if (!names.insert(entry.name).second) {
        return parser.error(node, "tenant '" + entry.name + "' appears twice");
      }
      std::string digest = sha256(token);
      for (const std::string& other : directory.digests_) {
        if (other == digest)
          return parser.error(node, "tenant '" + entry.name + "' reuses a token");
      }
      directory.entries_.push_back(std::move(entry));
      directory.digests_.push_back(std::move(digest));
    }
    if (directory.entries_.empty()) return parser.error(root, "the tenants list is empty");
    return directory;
  } catch (const YAML::Exception& e) {
    return detail::yaml_parse_error(e, source);
  }
}

Result<TenantDirectory> TenantDirectory::load(const std::string& path) {
  KVF_ASSIGN_OR_RETURN(const std::string text, read_text_file(path, "tenants file"));
  return parse(text, path);
}

std::optional<TenantEntry> TenantDirectory::authenticate(std::string_view token) const {
  // Digests have one length whatever the token's, and every entry is compared in full.
  const std::string digest = sha256(token);
  std::optional<size_t> found;
  for (size_t i = 0; i < digests_.size(); ++i) {
    const bool equal = digest.size() == digests_[i].size() &&
                       CRYPTO_memcmp(digest.data(), digests_[i].data(), digest.size()) == 0;
    if (equal) found = i;
  }
  if (!found) return std::nullopt;
  return entries_[*found];
}

}  // namespace kvfabric
