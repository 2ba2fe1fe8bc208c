// Strong identifiers: a SeqId cannot be passed where a BlockId is expected.
#pragma once

#include <compare>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <ostream>
#include <string>

namespace kvfabric {

//! \brief An integer id with its own type. Prints as its tag's prefix followed by the value.
template <typename Tag, typename Rep>
struct StrongId {
  using rep_type = Rep;
  Rep value{};

  constexpr StrongId() = default;
  template <std::integral I>
  constexpr explicit StrongId(I v) : value(static_cast<Rep>(v)) {}

  friend constexpr auto operator<=>(const StrongId&, const StrongId&) = default;
  friend std::ostream& operator<<(std::ostream& os, const StrongId& id) {
    return os << Tag::kPrefix << +id.value;
  }
};

template <typename Tag, typename Rep>
std::string to_string(StrongId<Tag, Rep> id) {
  return std::string(1, Tag::kPrefix) + std::to_string(id.value);
}

struct SeqIdTag {
  static constexpr char kPrefix = 'S';
};
struct BlockIdTag {
  static constexpr char kPrefix = 'B';
};
struct RankIdTag {
  static constexpr char kPrefix = 'R';
};

//! A sequence (request, beam) known to a block manager. Prints as `S{n}`.
using SeqId = StrongId<SeqIdTag, uint64_t>;
//! A physical block slot, the same on every shard of a replica. Prints as `B{n}`.
using BlockId = StrongId<BlockIdTag, uint32_t>;
//! An MPI/NCCL rank. Prints as `R{n}`.
using RankId = StrongId<RankIdTag, int32_t>;

//! Padding value in block tables handed to kernels: never a valid block.
inline constexpr BlockId kInvalidBlockId{std::numeric_limits<uint32_t>::max()};
//! The largest number of blocks one pool can hold (every id below kInvalidBlockId).
inline constexpr uint64_t kMaxBlocksPerPool = std::numeric_limits<uint32_t>::max();

}  // namespace kvfabric

template <typename Tag, typename Rep>
struct std::hash<kvfabric::StrongId<Tag, Rep>> {
  size_t operator()(const kvfabric::StrongId<Tag, Rep>& id) const noexcept {
    return std::hash<Rep>{}(id.value);
  }
};
