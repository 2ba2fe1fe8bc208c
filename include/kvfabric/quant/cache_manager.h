// The seed-compatible token-level KV compressor (ruvector CacheManager): quantized K/V per token
// with H2O, sliding-window (StreamingLLM) or PyramidKV eviction, its defects fixed (README "Seed
// CacheManager").
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <variant>
#include <vector>

#include "kvfabric/common/status.h"
#include "kvfabric/quant/tensor_quantize.h"

namespace kvfabric {

//! H2O: keep the tokens with the most accumulated attention, plus the newest
//! floor(budget * recent_ratio) whatever their score (H2O's "heavy + recent"; the seed had no
//! recent window and so evicted every newcomer once older tokens had scores).
struct H2oPolicy {
  double recent_ratio = 0.5;  //!< [0, 1]; 0 is the seed's pure heavy-hitter rule
};

//! StreamingLLM: keep the first `sink` tokens and the newest `window`.
struct SlidingWindowPolicy {
  size_t window = 0;
  size_t sink = 0;
};

//! PyramidKV: H2O in every layer, with per-layer budgets that decrease linearly with depth and
//! average max_seq_len (so all layers together hold total_layers * max_seq_len tokens); the last
//! layer's budget is max_seq_len / beta (at least 1), as in the paper.
struct PyramidKvPolicy {
  size_t total_layers = 0;
  double beta = 20.0;
  double recent_ratio = 0.5;
};

using TokenEvictionPolicy = std::variant<H2oPolicy, SlidingWindowPolicy, PyramidKvPolicy>;

//! \brief Configuration of a CacheManager (the seed's KVCacheConfig).
struct CacheManagerConfig {
  size_t max_seq_len = 0;  //!< tokens a layer keeps (PyramidKV: the per-layer average)
  size_t num_heads = 0;
  size_t head_dim = 0;
  uint8_t quantization_bits = 0;  //!< 2..8; codes are packed
  TokenEvictionPolicy eviction_policy = H2oPolicy{};
  //! Layers held; 0 means PyramidKV's total_layers, or 1 for the other policies.
  size_t num_layers = 0;
};

//! \brief Dequantized rows returned by CacheManager::get().
struct CachedTokens {
  std::vector<std::vector<float>> keys;    //!< [n][num_heads * head_dim]
  std::vector<std::vector<float>> values;  //!< [n][num_heads * head_dim]
  std::vector<size_t> token_positions;     //!< the position each row was appended at
};

//! \brief Quantized K/V of one sequence, one entry per token and layer, with token eviction.
//!
//! Every layer keeps its own entries, scores and budget (the seed ignored the layer argument and
//! kept one stream). A layer's *index* i names its i-th retained entry, oldest first, as the
//! seed's get() positions did; its *token position* is the append count at which the entry came,
//! which eviction never changes. Appending beyond a layer's budget (layer_budget) evicts down to
//! it. The methods without a layer argument are for one-layer managers and refuse to guess on
//! others. A failed call changes nothing; every decision is a pure function of the calls made.
//! Not thread-safe.
class CacheManager {
 public:
  //! Errors name the bad field: zero heads, head_dim or max_seq_len, bits outside [2, 8],
  //! ratios outside [0, 1], an empty sliding window, PyramidKV without layers or with beta < 1,
  //! num_layers differing from PyramidKV's total_layers.
  static Result<CacheManager> create(const CacheManagerConfig& config);

  [[nodiscard]] const CacheManagerConfig& config() const { return config_; }
  [[nodiscard]] size_t num_layers() const { return layers_.size(); }
  //! Entries of all layers.
  [[nodiscard]] size_t len() const;
  [[nodiscard]] bool is_empty() const { return len() == 0; }
  [[nodiscard]] Result<size_t> len(size_t layer) const;
  //! The budget append() evicts down to: max_seq_len (H2O), min(max_seq_len, sink + window)
  //! (sliding window), or the layer's pyramid budget (PyramidKV).
  [[nodiscard]] Result<size_t> layer_budget(size_t layer) const;

  //! Quantizes K and V (num_heads * head_dim values each, finite) into a new entry of `layer_idx`
  //! with score 0, then evicts the layer down to its budget.
  Status append(std::span<const float> key, std::span<const float> value, size_t layer_idx);

  //! Dequantized K/V of the entries at `indices` (retained order) of the only layer / of `layer`.
  //! An index past the layer's length is an error naming it (the seed skipped it silently).
  [[nodiscard]] Result<CachedTokens> get(std::span<const size_t> indices) const;
  [[nodiscard]] Result<CachedTokens> get(std::span<const size_t> indices, size_t layer) const;

  //! Evicts every layer / one layer down to at most `budget` entries with the policy's rule:
  //! heavy hitters plus the recent window (H2O, PyramidKV), or sink plus window (sliding window,
  //! which also never keeps more than sink + window).
  void evict(size_t budget);
  Status evict(size_t budget, size_t layer);

  //! Adds scores[i] to the accumulated attention of entry i, for exactly len(layer) finite
  //! scores (the seed zipped mismatched lengths silently).
  Status update_attention_scores(std::span<const double> scores);
  Status update_attention_scores(std::span<const double> scores, size_t layer);

  //! Accumulated scores and token positions of a layer's entries, in retained order.
  [[nodiscard]] Result<std::vector<double>> attention_scores(size_t layer) const;
  [[nodiscard]] Result<std::vector<size_t>> token_positions(size_t layer) const;

  //! Budget of layer `layer_idx` of `total_layers` layers averaging max_seq_len, with this
  //! manager's beta (PyramidKV's, else 20). Layers past the last are an error (the seed's
  //! underflowed).
  [[nodiscard]] Result<size_t> pyramid_budget(size_t layer_idx, size_t total_layers) const;

  //! f32 bytes of one token's K and V over their quantized bytes (packed codes, scales and
  //! zero-points): 7.1 at 4 bits with 32 heads of 128 (the seed's ignored the bit width).
  [[nodiscard]] double compression_ratio() const;
  //! Quantized bytes of one entry (K and V) and of all entries.
  [[nodiscard]] size_t entry_bytes() const;
  [[nodiscard]] size_t memory_bytes() const { return len() * entry_bytes(); }

 private:
  struct Entry {
    quant::QuantizedTensor key;
    quant::QuantizedTensor value;
    double score = 0.0;
    size_t position = 0;
  };
  struct Layer {
    std::vector<Entry> entries;
    size_t next_position = 0;
    size_t budget = 0;
  };

  explicit CacheManager(const CacheManagerConfig& config) : config_(config) {}
  [[nodiscard]] Status check_layer(size_t layer) const;
  [[nodiscard]] Result<size_t> only_layer(const char* operation) const;
  static std::vector<double> scores_of(const Layer& layer);
  [[nodiscard]] std::vector<size_t> entries_to_keep(const Layer& layer, size_t budget) const;
  void keep_entries(Layer& layer, const std::vector<size_t>& kept);

  CacheManagerConfig config_;
  std::vector<Layer> layers_;
};

}  // namespace kvfabric
