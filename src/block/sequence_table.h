// The live sequences of one block pool: their records in dense, stable slots, found by SeqId.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "common/slot_map.h"
#include "kvfabric/block/sequence_info.h"

namespace kvfabric::detail {

//! \brief Live sequences by slot (a SlotMap of SequenceInfo). A new sequence's record starts
//! empty but keeps the block-list capacity of the slot's last sequence, so steady traffic
//! allocates no tables.
class SequenceTable {
 public:
  static constexpr uint32_t kNoSlot = SlotMap<SequenceInfo>::kNone;

  [[nodiscard]] uint32_t slot_of(SeqId seq) const { return map_.find(seq.value); }
  [[nodiscard]] bool contains(SeqId seq) const { return map_.contains(seq.value); }
  [[nodiscard]] SequenceInfo& at(uint32_t slot) { return map_.at(slot); }
  [[nodiscard]] const SequenceInfo& at(uint32_t slot) const { return map_.at(slot); }
  [[nodiscard]] bool alive(uint32_t slot) const { return map_.alive(slot); }
  [[nodiscard]] size_t size() const { return map_.size(); }
  [[nodiscard]] uint32_t slot_limit() const { return map_.slot_limit(); }

  //! An empty record for `seq` (which must be new).
  uint32_t insert(SeqId seq) {
    const uint32_t slot = map_.insert(seq.value);
    SequenceInfo& info = at(slot);
    std::vector<BlockId> blocks = std::move(info.block_ids);
    blocks.clear();
    info = SequenceInfo{};
    info.seq_id = seq;
    info.block_ids = std::move(blocks);
    return slot;
  }
  void erase(uint32_t slot) { map_.erase(slot); }
  //! Host memory of the records, their block lists and the id map.
  [[nodiscard]] size_t memory_bytes() const {
    size_t bytes = map_.memory_bytes();
    for (uint32_t slot = 0; slot < slot_limit(); ++slot) {
      bytes += at(slot).block_ids.capacity() * sizeof(BlockId);
    }
    return bytes;
  }

 private:
  SlotMap<SequenceInfo> map_;
};

}  // namespace kvfabric::detail
