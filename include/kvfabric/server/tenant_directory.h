// Who may use the control plane: tenants, their tokens, roles and quotas (server.tenants_file).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvfabric/common/status.h"
#include "kvfabric/config/config.h"

namespace kvfabric {

//! One tenant of a shared cache.
struct TenantEntry {
  std::string name;
  bool admin = false;  //!< sees every tenant's sequences and statistics, steps, may shut down
  //! Its own quota; nullopt: the config's `tenants` defaults.
  std::optional<TenantQuota> quota;
};

//! \brief The tenants file: who may connect, as whom, with what quota. YAML:
//!
//!     tenants:
//!       - name: scheduler          # [A-Za-z0-9._-], 1..64 characters, unique
//!         token: "..."             # 16..512 printable characters, unique
//!         admin: true
//!       - name: team-a
//!         token: "..."
//!         max_blocks: 4096         # optional quota fields (TenantQuota); 0 = no limit
//!         max_host_blocks: 1024
//!         max_sequences: 64
//!
//! Tokens are kept as SHA-256 digests and compared in constant time (every entry, every byte),
//! so neither the reply time nor its content tells a guess how close it came.
class TenantDirectory {
 public:
  //! Parses the file's text. Errors name the line and the key: unknown keys, a missing or short
  //! token, a name or token given twice, no tenant at all.
  static Result<TenantDirectory> parse(std::string_view yaml_text, std::string_view source);
  static Result<TenantDirectory> load(const std::string& path);

  //! The tenant whose token this is; nullopt for any other string.
  [[nodiscard]] std::optional<TenantEntry> authenticate(std::string_view token) const;
  [[nodiscard]] const std::vector<TenantEntry>& entries() const { return entries_; }

 private:
  std::vector<TenantEntry> entries_;
  std::vector<std::string> digests_;  // SHA-256 of each entry's token, in entries_' order
};

}  // namespace kvfabric
