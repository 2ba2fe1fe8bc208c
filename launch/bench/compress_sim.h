// `kvfabric-bench compress`: how much of the attention output token-compression policies keep on
// synthetic attention workloads. A prompt of T tokens, then D decode steps, each appending one
// token; every policy holds at most its budget of tokens at every step, and each decode query's
// attention over the held tokens is compared with its attention over all tokens.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "kvfabric/common/status.h"

namespace kvfabric::bench {

//! planted: Gaussian K/V; 5 % of the prompt on average (8 % in the first layer to 2 % in the
//! last), in spans of 8 consecutive tokens, has keys aligned with the heads' query directions.
//! power-law: the queries' attention over the prompt follows a Zipf law over a random
//! permutation of positions (exponent 0.6 in the first layer to 1.4 in the last), with 4
//! attention sinks first that take a quarter of it.
enum class CompressWorkload { kPlanted, kPowerLaw };
//! full: no compression (the reference). streaming: sink + newest window. h2o: attention mass
//! accumulated over the prompt's queries and every decode step, newest half of the budget
//! protected. snapkv: the prompt compressed once by its last queries' pooled votes. pyramid:
//! snapkv with PyramidKV's per-layer budgets (the window in every layer, the rest more for
//! shallow layers).
enum class CompressPolicy { kFull, kStreaming, kH2o, kSnapKv, kPyramid };

std::string_view workload_name(CompressWorkload workload);
std::string_view policy_name(CompressPolicy policy);
//! Errors list the known names.
Result<CompressWorkload> parse_compress_workload(std::string_view name);
Result<CompressPolicy> parse_compress_policy(std::string_view name);

// The policies' fixed parameters (their papers' defaults).
inline constexpr size_t kStreamingSink = 4;
inline constexpr size_t kSnapKvWindow = 32;  //!< capped at the prompt budget when that is smaller
inline constexpr size_t kSnapKvKernel = 7;   //!< max pooling
inline constexpr double kPyramidBeta = 20.0;
// The workloads' shape.
inline constexpr double kPlantedFraction = 0.05;  //!< the mean over layers
inline constexpr size_t kPlantedSpan = 8;
inline constexpr size_t kAttentionSinks = 4;

struct CompressOptions {
  size_t tokens = 2048;  //!< prompt tokens T
  size_t heads = 4;      //!< attention heads per layer (one KV head each)
  size_t head_dim = 128;
  size_t decode_steps = 64;  //!< D
  //! Layers of the synthetic model; deeper layers' attention is more concentrated.
  size_t layers = 8;
  uint64_t seed = 1;
  //! Tokens held, as fractions of the T + D tokens the full cache holds at the last step.
  std::vector<double> budgets = {0.1, 0.2, 0.3, 0.5};
  std::vector<CompressWorkload> workloads = {CompressWorkload::kPlanted,
                                             CompressWorkload::kPowerLaw};
  std::vector<CompressPolicy> policies = {CompressPolicy::kFull, CompressPolicy::kStreaming,
                                          CompressPolicy::kH2o, CompressPolicy::kSnapKv,
                                          CompressPolicy::kPyramid};
};

//! One (workload, policy, budget). `full` has one point per workload, at budget 1.
struct CompressPoint {
  CompressWorkload workload = CompressWorkload::kPlanted;
  CompressPolicy policy = CompressPolicy::kFull;
  double budget = 1.0;       //!< fraction of T + D
  size_t budget_tokens = 0;  //!< round(budget * (T + D)): the most tokens held at any step
  //! Per layer sqrt(sum ||held output - full output||^2 / sum ||full output||^2) over every
  //! decode step and head, in double precision; the mean over layers.
  double relative_error = 0;
  //! The held tokens' share of each decode query's full softmax, averaged over steps, heads and
  //! layers.
  double mass_kept = 0;
  double kept_tokens = 0;     //!< tokens held after the last step, mean over layers
  double memory_saved = 0;    //!< 1 - kept_tokens / (T + D)
  uint64_t kv_bytes_f16 = 0;  //!< K and V of the held tokens of every layer, f16
  //! planted workload: share of the planted prompt tokens held after the last step (mean over
  //! layers); -1 on the power-law workload.
  double planted_kept = -1;
  double selection_seconds = 0;  //!< wall time in the policy's selection calls (for display)
};

//! Refuses options the simulation cannot run, naming the command-line option.
Status check_compress_options(const CompressOptions& options);

//! round(budget * (T + D)).
size_t budget_tokens(const CompressOptions& options, double budget);

//! Runs every workload, policy and budget. Deterministic: the same options give the same points
//! (selection_seconds aside). `progress` is called after each layer with (done, total) layers.
Result<std::vector<CompressPoint>> run_compress_sim(
    const CompressOptions& options,
    const std::function<void(size_t done, size_t total)>& progress = {});

//! The --json results: "routine": "compress", the options and fixed parameters, and one "runs"
//! entry per point (selection_us is the only wall-clock field).
nlohmann::json compress_json(const CompressOptions& options,
                             const std::vector<CompressPoint>& points);

}  // namespace kvfabric::bench
