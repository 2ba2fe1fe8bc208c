// Token lists for tests that need distinct, predictable prompts.
#pragma once

#include <cstddef>
#include <vector>

#include "kvfabric/prefix/radix_tree.h"  // TokenId

namespace kvfabric::testing {

//! The tokens first, first + 1, ..., first + n - 1.
inline std::vector<TokenId> token_run(size_t n, TokenId first) {
  std::vector<TokenId> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = first + static_cast<TokenId>(i);
  return t;
}

}  // namespace kvfabric::testing
