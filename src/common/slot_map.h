// Records in dense, stable slots, found by a 64-bit id through an open-addressing hash map.
#pragma once

#include <absl/container/flat_hash_map.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace kvfabric::detail {

//! \brief Records of type R by slot, and slot by id. A record never moves (records live in fixed
//! chunks), so a caller may keep a slot, or a reference, for as long as the record lives; a freed
//! slot is reused by a later record, which finds the previous occupant's contents and overwrites
//! what it needs (a record can keep an allocation for its successor that way). absl's hash is
//! seeded per process: ids come from clients, and a fixed hash would let them pick colliding ids;
//! the seed moves entries, never changes an answer, and nothing iterates the map to decide.
template <typename R>
class SlotMap {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;

  [[nodiscard]] uint32_t find(uint64_t id) const {
    const auto it = slots_.find(id);
    return it == slots_.end() ? kNone : it->second;
  }
  [[nodiscard]] bool contains(uint64_t id) const { return slots_.contains(id); }
  //! Starts loading where `id` would be found, ahead of a find() of it.
  void prefetch(uint64_t id) const { slots_.prefetch(id); }
  [[nodiscard]] R& at(uint32_t slot) { return chunks_[slot >> kChunkBits][slot & (kChunk - 1)]; }
  [[nodiscard]] const R& at(uint32_t slot) const {
    return chunks_[slot >> kChunkBits][slot & (kChunk - 1)];
  }
  [[nodiscard]] uint64_t id_at(uint32_t slot) const { return ids_[slot]; }
  [[nodiscard]] bool alive(uint32_t slot) const { return slot < alive_.size() && alive_[slot]; }
  [[nodiscard]] size_t size() const { return slots_.size(); }
  //! One past the highest slot ever used (slots below it may be free).
  [[nodiscard]] uint32_t slot_limit() const { return static_cast<uint32_t>(alive_.size()); }

  //! A slot for the new id `id` (which must not be live); its record holds whatever the slot's
  //! last occupant left.
  uint32_t insert(uint64_t id) {
    uint32_t slot = 0;
    if (free_.empty()) {
      slot = static_cast<uint32_t>(alive_.size());
      if ((slot & (kChunk - 1)) == 0) chunks_.push_back(std::make_unique<R[]>(kChunk));
      alive_.push_back(true);
      ids_.push_back(id);
    } else {
      slot = free_.back();
      free_.pop_back();
      alive_[slot] = true;
      ids_[slot] = id;
    }
    slots_.emplace(id, slot);
    return slot;
  }
  void erase(uint32_t slot) {
    slots_.erase(ids_[slot]);
    alive_[slot] = false;
    free_.push_back(slot);
  }
  //! Host memory of the records and the id map (what a record owns elsewhere not included).
  [[nodiscard]] size_t memory_bytes() const {
    return chunks_.size() * kChunk * sizeof(R) + ids_.capacity() * sizeof(uint64_t) +
           alive_.capacity() / 8 + free_.capacity() * sizeof(uint32_t) +
           slots_.capacity() * (sizeof(std::pair<const uint64_t, uint32_t>) + 1);
  }
  //! Calls f(slot, record) for every live record, in slot order (not id order).
  template <typename F>
  void for_each(F&& f) const {
    for (uint32_t slot = 0; slot < slot_limit(); ++slot) {
      if (alive_[slot]) f(slot, at(slot));
    }
  }

 private:
  static constexpr uint32_t kChunkBits = 10;
  static constexpr uint32_t kChunk = 1u << kChunkBits;

  absl::flat_hash_map<uint64_t, uint32_t> slots_;
  std::vector<std::unique_ptr<R[]>> chunks_;
  std::vector<uint64_t> ids_;
  std::vector<bool> alive_;
  std::vector<uint32_t> free_;
};

}  // namespace kvfabric::detail
