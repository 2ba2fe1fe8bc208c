// The live sequences of one block pool: records in dense slots, found by SeqId through an
// open-addressing hash map (absl::flat_hash_map), so a lookup touches one table group and one
// slot.
#pragma once

#include <absl/container/flat_hash_map.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "kvfabric/block/sequence_info.h"

namespace kvfabric::detail {

//! \brief Live sequences by slot. A slot keeps its address for as long as its sequence lives
//! (records are never moved), and a freed slot is reused by a later sequence. Lookups never
//! decide anything by the map's order; every order the pool exposes is sorted or the victim
//! index's.
class SequenceTable {
 public:
  static constexpr uint32_t kNoSlot = UINT32_MAX;

  [[nodiscard]] uint32_t slot_of(SeqId seq) const {
    const auto it = slots_.find(seq.value);
    return it == slots_.end() ? kNoSlot : it->second;
  }
  [[nodiscard]] bool contains(SeqId seq) const { return slots_.count(seq.value) > 0; }
  [[nodiscard]] SequenceInfo& at(uint32_t slot) {
    return records_[slot >> kChunkBits][slot & (kChunk - 1)];
  }
  [[nodiscard]] const SequenceInfo& at(uint32_t slot) const {
    return records_[slot >> kChunkBits][slot & (kChunk - 1)];
  }
  [[nodiscard]] bool alive(uint32_t slot) const { return slot < alive_.size() && alive_[slot]; }
  [[nodiscard]] size_t size() const { return slots_.size(); }
  //! One past the highest slot ever used (slots below it may be free).
  [[nodiscard]] uint32_t slot_limit() const { return static_cast<uint32_t>(alive_.size()); }

  //! A record for `seq` (which must be new): empty, with the block list of the slot's last
  //! sequence cleared but its capacity kept, so that steady traffic allocates no tables.
  uint32_t insert(SeqId seq) {
    uint32_t slot = 0;
    if (free_.empty()) {
      slot = static_cast<uint32_t>(alive_.size());
      if ((slot & (kChunk - 1)) == 0) records_.push_back(std::make_unique<SequenceInfo[]>(kChunk));
      alive_.push_back(true);
    } else {
      slot = free_.back();
      free_.pop_back();
      alive_[slot] = true;
    }
    SequenceInfo& info = at(slot);
    std::vector<BlockId> blocks = std::move(info.block_ids);
    blocks.clear();
    info = SequenceInfo{};
    info.seq_id = seq;
    info.block_ids = std::move(blocks);
    slots_.emplace(seq.value, slot);
    return slot;
  }
  void erase(uint32_t slot) {
    slots_.erase(at(slot).seq_id.value);
    alive_[slot] = false;
    free_.push_back(slot);
  }

 private:
  // Records live in fixed chunks, so they stay in place as the table grows.
  static constexpr uint32_t kChunkBits = 10;
  static constexpr uint32_t kChunk = 1u << kChunkBits;

  // absl's hash is seeded per process: clients choose sequence ids, and a fixed hash would let
  // them pick ids that collide. The seed changes only where entries sit, never an answer.
  absl::flat_hash_map<uint64_t, uint32_t> slots_;
  std::vector<std::unique_ptr<SequenceInfo[]>> records_;
  std::vector<bool> alive_;
  std::vector<uint32_t> free_;
};

}  // namespace kvfabric::detail
