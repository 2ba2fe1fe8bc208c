// The K/V snapshot a seed PrefixKvCache entry holds (oxillama CachedKvState, with metadata).
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "kvfabric/common/dtype.h"
#include "kvfabric/common/status.h"

namespace kvfabric {

//! \brief Keys and values of `seq_len` positions for each of `num_layers` layers, token-major:
//! keys()[layer][pos * kv_dim + j]. Unlike the seed's, it carries its layer count, kv_dim, dtype
//! and length, and creation checks that every buffer holds exactly seq_len * kv_dim values.
//! Copies share the buffers (they are immutable), so handing a snapshot out copies nothing.
class CachedKvState {
 public:
  //! Checked construction. InvalidArgument when kv_dim is 0, the key and value layer counts
  //! differ, or a buffer does not hold seq_len * kv_dim floats (the message names the layer).
  static Result<CachedKvState> create(std::vector<std::vector<float>> keys,
                                      std::vector<std::vector<float>> values, size_t seq_len,
                                      size_t kv_dim);
  //! The seed's CachedKvState::new(keys, values, seq_len): kv_dim is inferred from the buffers
  //! (InvalidArgument if it cannot be: no layers, seq_len 0, or sizes that disagree).
  static Result<CachedKvState> create(std::vector<std::vector<float>> keys,
                                      std::vector<std::vector<float>> values, size_t seq_len);

  [[nodiscard]] size_t seq_len() const { return data_->seq_len; }
  [[nodiscard]] size_t num_layers() const { return data_->keys.size(); }
  [[nodiscard]] size_t kv_dim() const { return data_->kv_dim; }
  //! Always kF32: the seed's snapshots are fp32.
  [[nodiscard]] DType dtype() const { return DType::kF32; }
  [[nodiscard]] const std::vector<std::vector<float>>& keys() const { return data_->keys; }
  [[nodiscard]] const std::vector<std::vector<float>>& values() const { return data_->values; }
  //! 4 bytes per stored float, keys and values (the seed's estimate; metadata excluded).
  [[nodiscard]] size_t memory_bytes() const;

 private:
  struct Data {
    std::vector<std::vector<float>> keys;
    std::vector<std::vector<float>> values;
    size_t seq_len = 0;
    size_t kv_dim = 0;
  };
  explicit CachedKvState(std::shared_ptr<const Data> data) : data_(std::move(data)) {}

  std::shared_ptr<const Data> data_;
};

}  // namespace kvfabric
