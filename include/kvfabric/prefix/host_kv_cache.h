// Read access to a live K/V cache, and the seed's contiguous host cache (oxillama KvCache), the
// restore target of PrefixKvCache.
#pragma once

#include <cstddef>
#include <functional>
#include <span>
#include <vector>

#include "kvfabric/common/status.h"
#include "kvfabric/prefix/cached_kv_state.h"

namespace kvfabric {

//! \brief What PrefixKvCache::store reads from a live cache (the seed's KvCacheAccess trait,
//! read side): fp32 keys and values per layer, token-major, kv_dim floats per position.
class KvCacheAccess {
 public:
  virtual ~KvCacheAccess() = default;

  [[nodiscard]] virtual size_t seq_len() const = 0;
  [[nodiscard]] virtual size_t num_layers() const = 0;
  //! Floats per position and layer (num_kv_heads * head_dim).
  [[nodiscard]] virtual size_t kv_dim() const = 0;
  //! The written keys of `layer`: stored positions * kv_dim floats. NotFound for a bad layer.
  [[nodiscard]] virtual Result<std::span<const float>> get_keys(size_t layer) const = 0;
  [[nodiscard]] virtual Result<std::span<const float>> get_values(size_t layer) const = 0;

  //! Calls f(position, row) for each stored position of `layer` in order, row = kv_dim floats.
  Status for_each_key(size_t layer,
                      const std::function<void(size_t, std::span<const float>)>& f) const;
  Status for_each_value(size_t layer,
                        const std::function<void(size_t, std::span<const float>)>& f) const;
};

//! \brief The seed's contiguous fp32 host cache: for each layer, keys and values of up to
//! max_seq_len positions, preallocated and zeroed. store_kv writes the current position in one
//! layer; advance() moves to the next position once every layer has written. Differences from
//! the seed: writing into a full cache or a row shorter than kv_dim is an error (the seed
//! returned Ok without writing, or panicked), and restoring a snapshot checks its shape.
class HostKvCache final : public KvCacheAccess {
 public:
  //! InvalidArgument for 0 layers, 0 kv_dim or a size that overflows.
  static Result<HostKvCache> create(size_t num_layers, size_t max_seq_len, size_t kv_dim);

  [[nodiscard]] size_t seq_len() const override { return seq_len_; }
  [[nodiscard]] size_t num_layers() const override { return keys_.size(); }
  [[nodiscard]] size_t kv_dim() const override { return kv_dim_; }
  [[nodiscard]] size_t max_seq_len() const { return max_seq_len_; }
  //! Positions with data: seq_len(), or one more between store_kv and advance().
  [[nodiscard]] size_t stored_len() const { return stored_len_; }

  [[nodiscard]] Result<std::span<const float>> get_keys(size_t layer) const override;
  [[nodiscard]] Result<std::span<const float>> get_values(size_t layer) const override;

  //! Writes the first kv_dim floats of `key` and `value` at position seq_len() of `layer`.
  //! Errors: NotFound for a bad layer, InvalidArgument for rows shorter than kv_dim,
  //! OutOfMemory when the cache is full.
  Status store_kv(size_t layer, std::span<const float> key, std::span<const float> value);
  //! Next position; stops at max_seq_len (as the seed).
  void advance();
  //! Keeps the first min(n, seq_len()) positions.
  void truncate(size_t n);
  //! Zeroes every buffer and goes back to position 0.
  void clear();
  //! Copies the first `num_tokens` positions of `snapshot` and makes them the cache's content.
  //! InvalidArgument (nothing changes) unless layers and kv_dim match, the snapshot is fp32, and
  //! num_tokens <= min(snapshot.seq_len(), max_seq_len()).
  Status restore_from_snapshot(const CachedKvState& snapshot, size_t num_tokens);

 private:
  HostKvCache(size_t num_layers, size_t max_seq_len, size_t kv_dim);
  Status check_layer(size_t layer) const;

  std::vector<std::vector<float>> keys_;
  std::vector<std::vector<float>> values_;
  size_t max_seq_len_ = 0;
  size_t kv_dim_ = 0;
  size_t seq_len_ = 0;
  size_t stored_len_ = 0;
};

}  // namespace kvfabric
