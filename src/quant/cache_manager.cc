#include "kvfabric/quant/cache_manager.h"

#include <cmath>
#include <string>
#include <utility>

#include "kvfabric/quant/token_selection.h"

namespace kvfabric {
namespace {

// PyramidKV's default beta; pyramid_budget() uses it when the manager runs another policy.
constexpr double kDefaultPyramidBeta = 20.0;

Status check_ratio(const char* name, double ratio) {
  if (!(ratio >= 0.0 && ratio <= 1.0)) {
    return invalid_argument(std::string(name) + " " + std::to_string(ratio) + " outside [0, 1]");
  }
  return ok_status();
}

// The policy's recent-window share; sliding windows have none.
double recent_ratio(const TokenEvictionPolicy& policy) {
  if (const auto* h2o = std::get_if<H2oPolicy>(&policy)) return h2o->recent_ratio;
  if (const auto* pyramid = std::get_if<PyramidKvPolicy>(&policy)) return pyramid->recent_ratio;
  return 0.0;
}

Status validate(const CacheManagerConfig& c) {
  if (c.num_heads == 0) return invalid_argument("num_heads must be positive");
  if (c.head_dim == 0) return invalid_argument("head_dim must be positive");
  // A row of num_heads * head_dim values must be countable (it wrapped to 0 past 2^64, and an
  // append of an empty row never ended), and one row of f32 values addressable.
  if (c.num_heads > SIZE_MAX / sizeof(float) / c.head_dim) {
    return invalid_argument("num_heads " + std::to_string(c.num_heads) + " x head_dim " +
                            std::to_string(c.head_dim) + " values per row are more than a "
                            "row can hold");
  }
  if (c.max_seq_len == 0) return invalid_argument("max_seq_len must be positive");
  if (c.quantization_bits < quant::kMinTensorBits || c.quantization_bits > quant::kMaxTensorBits) {
    return invalid_argument("quantization_bits " + std::to_string(c.quantization_bits) +
                            " outside [2, 8]");
  }
  KVF_RETURN_IF_ERROR(check_ratio("recent_ratio", recent_ratio(c.eviction_policy)));
  if (const auto* sliding = std::get_if<SlidingWindowPolicy>(&c.eviction_policy)) {
    if (sliding->sink + sliding->window == 0)
      return invalid_argument("a sliding window keeps no token (sink 0, window 0)");
  }
  if (const auto* pyramid = std::get_if<PyramidKvPolicy>(&c.eviction_policy)) {
    if (c.num_layers != 0 && c.num_layers != pyramid->total_layers) {
      return invalid_argument("num_layers " + std::to_string(c.num_layers) +
                              " differs from PyramidKV total_layers " +
                              std::to_string(pyramid->total_layers));
    }
  }
  return ok_status();
}

}  // namespace

Result<CacheManager> CacheManager::create(const CacheManagerConfig& config) {
  KVF_RETURN_IF_ERROR(validate(config));
  CacheManager manager(config);
  if (const auto* pyramid = std::get_if<PyramidKvPolicy>(&config.eviction_policy)) {
    KVF_ASSIGN_OR_RETURN(
        std::vector<size_t> budgets,
        quant::pyramid_layer_budgets(config.max_seq_len, pyramid->total_layers, pyramid->beta));
    manager.layers_.resize(budgets.size());
    for (size_t l = 0; l < budgets.size(); ++l)
      manager.layers_[l].budget = budgets[l];
    return manager;
  }
  size_t budget = config.max_seq_len;
  if (const auto* sliding = std::get_if<SlidingWindowPolicy>(&config.eviction_policy))
    budget = std::min(budget, sliding->sink + sliding->window);
  manager.layers_.resize(config.num_layers == 0 ? 1 : config.num_layers);
  for (Layer& layer : manager.layers_)
    layer.budget = budget;
  return manager;
}

size_t CacheManager::len() const {
  size_t total = 0;
  for (const Layer& layer : layers_)
    total += layer.entries.size();
  return total;
}

Status CacheManager::check_layer(size_t layer) const {
  if (layer >= layers_.size()) {
    return invalid_argument("layer " + std::to_string(layer) + " of a cache of " +
                            std::to_string(layers_.size()) + " layers");
  }
  return ok_status();
}

Result<size_t> CacheManager::only_layer(const char* operation) const {
  if (layers_.size() != 1) {
    return invalid_operation(std::string(operation) + " without a layer on a cache of " +
                             std::to_string(layers_.size()) + " layers; name the layer");
  }
  return size_t{0};
}

Result<size_t> CacheManager::len(size_t layer) const {
  KVF_RETURN_IF_ERROR(check_layer(layer));
  return layers_[layer].entries.size();
}

Result<size_t> CacheManager::layer_budget(size_t layer) const {
  KVF_RETURN_IF_ERROR(check_layer(layer));
  return layers_[layer].budget;
}

Status CacheManager::append(std::span<const float> key, std::span<const float> value,
                            size_t layer_idx) {
  KVF_RETURN_IF_ERROR(check_layer(layer_idx));
  const size_t row = config_.num_heads * config_.head_dim;
  if (key.size() != row || value.size() != row) {
    return invalid_argument("key of " + std::to_string(key.size()) + " and value of " +
                            std::to_string(value.size()) +
                            " values; num_heads * head_dim = " + std::to_string(row));
  }
  Entry entry;
  KVF_ASSIGN_OR_RETURN(
      entry.key, quant::quantize_asymmetric(key, config_.num_heads, config_.quantization_bits));
  KVF_ASSIGN_OR_RETURN(
      entry.value, quant::quantize_asymmetric(value, config_.num_heads, config_.quantization_bits));
  Layer& layer = layers_[layer_idx];
  entry.position = layer.next_position++;
  layer.entries.push_back(std::move(entry));
  if (layer.entries.size() > layer.budget)
    keep_entries(layer, entries_to_keep(layer, layer.budget));
  return ok_status();
}

Result<CachedTokens> CacheManager::get(std::span<const size_t> indices) const {
  KVF_ASSIGN_OR_RETURN(const size_t layer, only_layer("get"));
  return get(indices, layer);
}

Result<CachedTokens> CacheManager::get(std::span<const size_t> indices, size_t layer) const {
  KVF_RETURN_IF_ERROR(check_layer(layer));
  const std::vector<Entry>& entries = layers_[layer].entries;
  for (const size_t i : indices) {
    if (i >= entries.size()) {
      return invalid_argument("index " + std::to_string(i) + " past the " +
                              std::to_string(entries.size()) + " entries of layer " +
                              std::to_string(layer));
    }
  }
  CachedTokens out;
  out.keys.reserve(indices.size());
  out.values.reserve(indices.size());
  out.token_positions.reserve(indices.size());
  for (const size_t i : indices) {
    KVF_ASSIGN_OR_RETURN(std::vector<float> k,
                         quant::dequantize(entries[i].key, config_.num_heads));
    KVF_ASSIGN_OR_RETURN(std::vector<float> v,
                         quant::dequantize(entries[i].value, config_.num_heads));
    out.keys.push_back(std::move(k));
    out.values.push_back(std::move(v));
    out.token_positions.push_back(entries[i].position);
  }
  return out;
}

std::vector<size_t> CacheManager::entries_to_keep(const Layer& layer, size_t budget) const {
  if (const auto* sliding = std::get_if<SlidingWindowPolicy>(&config_.eviction_policy))
    return quant::select_sliding_window(layer.entries.size(), budget, sliding->sink,
                                        sliding->window);
  const std::vector<double> scores = scores_of(layer);
  const auto recent = static_cast<size_t>(
      std::floor(static_cast<double>(budget) * recent_ratio(config_.eviction_policy)));
  return quant::select_heavy_hitters(scores, budget, recent);
}

void CacheManager::keep_entries(Layer& layer, const std::vector<size_t>& kept) {
  // `kept` ascends, so moving entry kept[i] to slot i never overwrites one still to be moved.
  for (size_t i = 0; i < kept.size(); ++i) {
    if (kept[i] != i) layer.entries[i] = std::move(layer.entries[kept[i]]);
  }
  layer.entries.resize(kept.size());
}

void CacheManager::evict(size_t budget) {
  for (Layer& layer : layers_)
    keep_entries(layer, entries_to_keep(layer, budget));
}

Status CacheManager::evict(size_t budget, size_t layer) {
  KVF_RETURN_IF_ERROR(check_layer(layer));
  keep_entries(layers_[layer], entries_to_keep(layers_[layer], budget));
  return ok_status();
}

Status CacheManager::update_attention_scores(std::span<const double> scores) {
  KVF_ASSIGN_OR_RETURN(const size_t layer, only_layer("update_attention_scores"));
  return update_attention_scores(scores, layer);
}

Status CacheManager::update_attention_scores(std::span<const double> scores, size_t layer) {
  KVF_RETURN_IF_ERROR(check_layer(layer));
  std::vector<Entry>& entries = layers_[layer].entries;
  if (scores.size() != entries.size()) {
    return invalid_argument(std::to_string(scores.size()) + " scores for the " +
                            std::to_string(entries.size()) + " entries of layer " +
                            std::to_string(layer));
  }
  for (size_t i = 0; i < scores.size(); ++i) {
    if (!std::isfinite(entries[i].score + scores[i])) {
      return invalid_argument("score " + std::to_string(i) + " (" + std::to_string(scores[i]) +
                              ") would make entry " + std::to_string(i) + "'s total non-finite");
    }
  }
  for (size_t i = 0; i < scores.size(); ++i)
    entries[i].score += scores[i];
  return ok_status();
}

std::vector<double> CacheManager::scores_of(const Layer& layer) {
  std::vector<double> scores;
  scores.reserve(layer.entries.size());
  for (const Entry& e : layer.entries)
    scores.push_back(e.score);
  return scores;
}

Result<std::vector<double>> CacheManager::attention_scores(size_t layer) const {
  KVF_RETURN_IF_ERROR(check_layer(layer));
  return scores_of(layers_[layer]);
}

Result<std::vector<size_t>> CacheManager::token_positions(size_t layer) const {
  KVF_RETURN_IF_ERROR(check_layer(layer));
  std::vector<size_t> positions;
  for (const Entry& e : layers_[layer].entries)
    positions.push_back(e.position);
  return positions;
}

Result<size_t> CacheManager::pyramid_budget(size_t layer_idx, size_t total_layers) const {
  if (layer_idx >= total_layers) {
    return invalid_argument("layer " + std::to_string(layer_idx) + " of " +
                            std::to_string(total_layers) + " layers");
  }
  const auto* pyramid = std::get_if<PyramidKvPolicy>(&config_.eviction_policy);
  KVF_ASSIGN_OR_RETURN(std::vector<size_t> budgets,
                       quant::pyramid_layer_budgets(config_.max_seq_len, total_layers,
                                                    pyramid ? pyramid->beta : kDefaultPyramidBeta));
  return budgets[layer_idx];
}

double CacheManager::compression_ratio() const {
  const size_t row = config_.num_heads * config_.head_dim;
  return static_cast<double>(2 * row * sizeof(float)) / static_cast<double>(entry_bytes());
}

size_t CacheManager::entry_bytes() const {
  return 2 * quant::quantized_bytes(config_.num_heads * config_.head_dim, config_.num_heads,
                                    config_.quantization_bits);
}

}  // namespace kvfabric
