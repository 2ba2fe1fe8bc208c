#include "kvfabric/prefix/host_kv_cache.h"

#include <algorithm>
#include <limits>
#include <string>

namespace kvfabric {
namespace {

Status for_each_row(const Result<std::span<const float>>& data, size_t kv_dim,
                    const std::function<void(size_t, std::span<const float>)>& f) {
  KVF_RETURN_IF_ERROR(data);
  if (kv_dim == 0) return invalid_operation("cannot split rows of a cache with kv_dim 0");
  const std::span<const float> all = data.value();
  for (size_t pos = 0; (pos + 1) * kv_dim <= all.size(); ++pos)
    f(pos, all.subspan(pos * kv_dim, kv_dim));
  return ok_status();
}

}  // namespace

Status KvCacheAccess::for_each_key(
    size_t layer, const std::function<void(size_t, std::span<const float>)>& f) const {
  return for_each_row(get_keys(layer), kv_dim(), f);
}

Status KvCacheAccess::for_each_value(
    size_t layer, const std::function<void(size_t, std::span<const float>)>& f) const {
  return for_each_row(get_values(layer), kv_dim(), f);
}

Result<HostKvCache> HostKvCache::create(size_t num_layers, size_t max_seq_len, size_t kv_dim) {
  if (num_layers == 0 || kv_dim == 0) {
    return invalid_argument("a host K/V cache needs num_layers >= 1 and kv_dim >= 1 (got " +
                            std::to_string(num_layers) + " and " + std::to_string(kv_dim) + ")");
  }
  if (max_seq_len > std::numeric_limits<size_t>::max() / kv_dim / num_layers / 8) {
    return invalid_argument("host K/V cache of " + std::to_string(max_seq_len) +
                            " positions is too large");
  }
  return HostKvCache(num_layers, max_seq_len, kv_dim);
}

HostKvCache::HostKvCache(size_t num_layers, size_t max_seq_len, size_t kv_dim)
    : keys_(num_layers, std::vector<float>(max_seq_len * kv_dim, 0.0f)),
      values_(num_layers, std::vector<float>(max_seq_len * kv_dim, 0.0f)),
      max_seq_len_(max_seq_len),
      kv_dim_(kv_dim) {}

Status HostKvCache::check_layer(size_t layer) const {
  if (layer >= keys_.size()) {
    return Status(ErrorCode::kNotFound, "layer " + std::to_string(layer) + " out of range (" +
                                            std::to_string(keys_.size()) + " layers)");
  }
  return ok_status();
}

Result<std::span<const float>> HostKvCache::get_keys(size_t layer) const {
  KVF_RETURN_IF_ERROR(check_layer(layer));
  return std::span<const float>(keys_[layer]).first(stored_len_ * kv_dim_);
}

Result<std::span<const float>> HostKvCache::get_values(size_t layer) const {
  KVF_RETURN_IF_ERROR(check_layer(layer));
  return std::span<const float>(values_[layer]).first(stored_len_ * kv_dim_);
}

Status HostKvCache::store_kv(size_t layer, std::span<const float> key,
                             std::span<const float> value) {
  KVF_RETURN_IF_ERROR(check_layer(layer));
  if (key.size() < kv_dim_ || value.size() < kv_dim_) {
    return invalid_argument("store_kv rows of " + std::to_string(key.size()) + " keys and " +
                            std::to_string(value.size()) + " values, kv_dim is " +
                            std::to_string(kv_dim_));
  }
  if (seq_len_ >= max_seq_len_) {
    return Status(ErrorCode::kOutOfMemory,
                  "host K/V cache is full (" + std::to_string(max_seq_len_) + " positions)");
  }
  const size_t offset = seq_len_ * kv_dim_;
  std::copy_n(key.begin(), kv_dim_, keys_[layer].begin() + static_cast<ptrdiff_t>(offset));
  std::copy_n(value.begin(), kv_dim_, values_[layer].begin() + static_cast<ptrdiff_t>(offset));
  // Attention reads the row back before advance() (which comes after every layer wrote).
  stored_len_ = std::max(stored_len_, seq_len_ + 1);
  return ok_status();
}

void HostKvCache::advance() {
  if (seq_len_ < max_seq_len_) {
    ++seq_len_;
    stored_len_ = std::max(stored_len_, seq_len_);
  }
}

void HostKvCache::truncate(size_t n) {
  seq_len_ = std::min(n, seq_len_);
  stored_len_ = seq_len_;
}

void HostKvCache::clear() {
  for (auto& layer : keys_)
    std::fill(layer.begin(), layer.end(), 0.0f);
  for (auto& layer : values_)
    std::fill(layer.begin(), layer.end(), 0.0f);
  seq_len_ = stored_len_ = 0;
}

Status HostKvCache::restore_from_snapshot(const CachedKvState& snapshot, size_t num_tokens) {
  if (snapshot.num_layers() != num_layers() || snapshot.kv_dim() != kv_dim_ ||
      snapshot.dtype() != DType::kF32) {
    return invalid_argument("snapshot of " + std::to_string(snapshot.num_layers()) +
                            " layers, kv_dim " + std::to_string(snapshot.kv_dim()) +
                            " does not fit a cache of " + std::to_string(num_layers()) +
                            " layers, kv_dim " + std::to_string(kv_dim_));
  }
  if (num_tokens > snapshot.seq_len() || num_tokens > max_seq_len_) {
    return invalid_argument("cannot restore " + std::to_string(num_tokens) +
                            " positions from a snapshot of " + std::to_string(snapshot.seq_len()) +
                            " into a cache of " + std::to_string(max_seq_len_));
  }
  const auto n = static_cast<ptrdiff_t>(num_tokens * kv_dim_);
  for (size_t layer = 0; layer < keys_.size(); ++layer) {
    std::copy_n(snapshot.keys()[layer].begin(), n, keys_[layer].begin());
    std::copy_n(snapshot.values()[layer].begin(), n, values_[layer].begin());
  }
  seq_len_ = stored_len_ = num_tokens;
  return ok_status();
}

}  // namespace kvfabric
