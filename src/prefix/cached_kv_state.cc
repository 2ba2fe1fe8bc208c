#include "kvfabric/prefix/cached_kv_state.h"

#include <limits>
#include <string>

namespace kvfabric {

Result<CachedKvState> CachedKvState::create(std::vector<std::vector<float>> keys,
                                            std::vector<std::vector<float>> values, size_t seq_len,
                                            size_t kv_dim) {
  if (kv_dim == 0) return invalid_argument("a K/V snapshot needs kv_dim >= 1");
  if (keys.size() != values.size()) {
    return invalid_argument("a K/V snapshot has " + std::to_string(keys.size()) +
                            " key layers but " + std::to_string(values.size()) + " value layers");
  }
  if (seq_len > std::numeric_limits<size_t>::max() / kv_dim) {
    return invalid_argument("seq_len * kv_dim overflows");
  }
  const size_t expected = seq_len * kv_dim;
  for (size_t layer = 0; layer < keys.size(); ++layer) {
    if (keys[layer].size() != expected || values[layer].size() != expected) {
      return invalid_argument(
          "layer " + std::to_string(layer) + " of a snapshot of " + std::to_string(seq_len) +
          " positions (kv_dim " + std::to_string(kv_dim) + ") holds " +
          std::to_string(keys[layer].size()) + " keys and " + std::to_string(values[layer].size()) +
          " values, not " + std::to_string(expected));
    }
  }
  auto data = std::make_shared<Data>();
  data->keys = std::move(keys);
  data->values = std::move(values);
  data->seq_len = seq_len;
  data->kv_dim = kv_dim;
  return CachedKvState(std::move(data));
}

Result<CachedKvState> CachedKvState::create(std::vector<std::vector<float>> keys,
                                            std::vector<std::vector<float>> values,
                                            size_t seq_len) {
  if (keys.empty() || seq_len == 0 || keys[0].size() % seq_len != 0 || keys[0].size() < seq_len) {
    return invalid_argument("cannot infer kv_dim of a snapshot with " +
                            std::to_string(keys.size()) + " layers and " + std::to_string(seq_len) +
                            " positions");
  }
  const size_t kv_dim = keys[0].size() / seq_len;
  return create(std::move(keys), std::move(values), seq_len, kv_dim);
}

size_t CachedKvState::memory_bytes() const {
  size_t floats = 0;
  for (const auto& layer : data_->keys)
    floats += layer.size();
  for (const auto& layer : data_->values)
    floats += layer.size();
  return floats * sizeof(float);
}

}  // namespace kvfabric
