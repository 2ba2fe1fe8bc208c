// The whole public kvfabric API. Compiles without CUDA, NCCL, MPI or Boost.
#pragma once

#include "kvfabric/block/block_allocator.h"
#include "kvfabric/block/block_retainer.h"
#include "kvfabric/block/eviction_strategy.h"
#include "kvfabric/block/paged_kv_cache.h"
#include "kvfabric/block/sequence_info.h"
#include "kvfabric/block/token_copy.h"
#include "kvfabric/common/block_layout.h"
#include "kvfabric/common/check.h"
#include "kvfabric/common/dtype.h"
#include "kvfabric/common/ids.h"
#include "kvfabric/common/logging.h"
#include "kvfabric/common/status.h"
#include "kvfabric/config/config.h"
#include "kvfabric/prefix/paged_prefix_cache.h"
#include "kvfabric/prefix/prefix_block_index.h"
#include "kvfabric/prefix/radix_tree.h"
